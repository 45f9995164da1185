"""HYDRA's file format: where a tracked table is saved beside a model and how it is read back."""

from __future__ import annotations

import logging
from typing import Sequence

from torch import nn

from ...fingerprints import weights_fingerprint
from ..gradients import ParamSpec

logger = logging.getLogger(__name__)

FORMAT = "turnover-hf/hydra"
FORMAT_VERSION = 1
META_NAME = "hydra.json"
IDS_NAME = "hydra_example_ids.safetensors"
TABLE_SAFETENSORS = "hydra_hypergradients.safetensors"
TABLE_NPY = "hydra_hypergradients.npy"
NORMALISATION = (
    "h_i = d w_T / d delta_i, example i's loss weighted a_i (1 + delta_i) in every step it enters; "
    "score(i, j) = -grad loss_j(w_T) . h_i = paper's C(i, j) (Chen et al. 2021, Eq. 8)"
)
ROW_CHUNK = 4096  # rows per pass when a whole table is rewritten (bounded temporary memory)
HYDRA_DIR = "hydra"  # beside a saved model: where save_model writes and InfluencePipeline reads the hypergradients
HYDRA_MODES = ("full", "lean")



def tracked_weights_fingerprint(model: nn.Module, specs: Sequence[ParamSpec]) -> str:
    """The weights fingerprint of the tracked parameters only (what the hypergradients depend on)."""
    return weights_fingerprint(model, [s.name for s in specs])
