"""``HydraScorer``: scores (training id, target) pairs from tracked hypergradients."""

from __future__ import annotations

from typing import Any, Mapping, Union

import torch
from torch import nn

from ...data import check_ids_known
from ...errors import ConfigMismatchError, TurnoverError
from ...files import PathLike
from ..gradients import PerExampleGrads, target_gradients
from ..registry import BuiltEstimator, Estimator, EstimatorContext, SavedState, register_estimator
from .saved import HYDRA_DIR, META_NAME, tracked_weights_fingerprint
from .table import SavedHypergradients
from .tracker import HydraTracker, check_seen


# ---------------------------------------------------------------------------------------------------------------
class HydraScorer(Estimator):
    """HYDRA scores of (training id, target) pairs, an :class:`~turnover_hf.estimators.Estimator`.

    ``scores[i, j] = -grad_w loss_j(w_T) . h_i``, the paper's ``C(i, j)`` (Eq. 8; see the module docstring for
    the normalisation): the first-order change of target ``j``'s loss when training example ``i`` is left out.
    Positive = the example helped the target (lowered its loss). Target gradients are taken in eval mode on the
    model as it is (the full network of a patched model), at the weights the training ended with; with
    ``strict=True`` a model whose tracked parameters differ from those final weights is refused.

    Args:
        model: the trained model.
        hypergradients: a :class:`HydraTracker` (right after training) or a folder written by
            :meth:`HydraTracker.save`.
        batch_size: targets per gradient batch; training ids are scored in blocks of ``4 * batch_size`` rows.
        strict: check the model's weights against the fingerprint saved with the hypergradients.

    Example:
        >>> scorer = HydraScorer(model, "out/hydra")
        >>> scorer.scores(targets, targets["labels"], example_ids=torch.arange(100))   # (100, n_targets)
    """

    def __init__(self, model: nn.Module, hypergradients: Union[HydraTracker, SavedHypergradients, PathLike], *,
                 batch_size: int = 64, strict: bool = True) -> None:
        if isinstance(hypergradients, HydraTracker):
            table, specs = hypergradients.table, hypergradients.specs
            expected, self.meta = None, None  # the tracker's own model: nothing to compare with
        else:
            saved = hypergradients if isinstance(hypergradients, SavedHypergradients) else SavedHypergradients.load(hypergradients)
            table, specs, expected = saved.table, saved.specs, saved.meta.get("weights_fingerprint")
            self.meta = saved.meta
        named = dict(model.named_parameters())
        bad = [s.name for s in specs if s.name not in named or tuple(named[s.name].shape) != s.shape]
        if bad:
            raise ConfigMismatchError(
                f"the model lacks the tracked parameters {bad[:5]} (or their shapes differ): score with the model "
                "whose training was tracked."
            )
        if strict and expected is not None and tracked_weights_fingerprint(model, specs) != expected:
            raise ConfigMismatchError(
                "the model's tracked parameters differ from the weights the tracked training ended with; HYDRA "
                "scores need that final model (pass strict=False to score another one anyway)."
            )
        self.model = model
        self.table = table
        self.specs = specs
        self.batch_size = max(1, int(batch_size))
        self.device = next(model.parameters()).device
        self.grads = PerExampleGrads(model, specs)

    def cache_key(self) -> Any:
        return self.meta

    @property
    def known_ids(self) -> torch.Tensor:
        return self.table.example_ids

    def _rows(self, example_ids: torch.Tensor) -> torch.Tensor:
        example_ids = check_ids_known(torch.as_tensor(example_ids).cpu(), self.table.example_ids)
        rows = self.table.rows_of(example_ids)
        check_seen(self.table, example_ids, rows)
        return rows

    def target_grads(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Gradient of each target's loss at the model's weights, float32 ``(n_targets, D)``."""
        return target_gradients(self.grads, targets, labels, self.batch_size)

    def scores(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        """HYDRA influence of each id on each target, float32 ``(n_ids, n_targets)`` on the CPU."""
        rows = self._rows(example_ids)
        G = self.target_grads(targets, labels).cpu()  # (T, D)
        out = torch.empty(len(rows), len(G), dtype=torch.float32)
        block = 4 * self.batch_size
        for start in range(0, len(rows), block):
            H = self.table.read(rows[start : start + block])  # (n, D), from memory or the memory map
            out[start : start + len(H)] = -(H.double() @ G.double().T).float()
        return out

    def self_scores(self, batch: Mapping[str, torch.Tensor], labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        """Self-influence ``-grad loss_i(w_T) . h_i`` of each training row (with its id), float32 ``(n,)``."""
        rows = self._rows(example_ids)
        G = self.target_grads(batch, labels).cpu()
        H = self.table.read(rows)
        return -(H.double() * G.double()).sum(1).float()


@register_estimator(
    "hydra",
    description=f"hypergradients saved in <model>/{HYDRA_DIR} by a HYDRA trainer.",
    definition="the change of the target's loss if the example were left out of training, from its hypergradient "
               "tracked through the optimiser's updates (HYDRA).",
    auto=lambda context: "hydra_dir was given" if "hydra" in context.state_dirs else None,
    auto_priority=10,
    saved_state=SavedState(HYDRA_DIR, META_NAME, tracked_only=True),
)
def build(context: EstimatorContext) -> BuiltEstimator:
    """The hypergradients a HYDRA trainer saved (``hydra_dir``, by default ``<checkpoint>/hydra``)."""
    folder = context.state_dir()
    if folder is None:
        raise TurnoverError("estimator='hydra' needs hydra_dir=... (the folder trainer.hydra.save(...) wrote).")
    saved = SavedHypergradients.load(folder)
    scorer = HydraScorer(context.model, saved, batch_size=context.batch_size)
    return BuiltEstimator(scorer, saved.meta.get("id_column", "example_id"), saved.meta.get("num_examples"))
