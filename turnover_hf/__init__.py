"""turnover-hf: influence-ready Hugging Face models with turn-over dropout (Kobayashi et al., 2020).

Example:
    >>> import turnover_hf
    >>> model = turnover_hf.patch_model(model, turnover_hf.TurnoverConfig(seed=0))
    >>> trainer = turnover_hf.TurnoverTrainer(model=model, args=args, train_dataset=turnover_hf.add_example_ids(train))
"""

import warnings as _warnings

from .version import __version__

# transformers' Trainer imports PEFT when it is installed, and PEFT warns on import that transformers < 5.6 is
# deprecated: the transformers that `adapters` pins (see pyproject.toml), so nobody using this package can act on it.
# Only that message, only while importing; every other warning and any later import are left as they are.
with _warnings.catch_warnings():
    _warnings.filterwarnings("ignore", message=r"Support for Transformers < \S+ is deprecated in PEFT", category=FutureWarning)
    import transformers.trainer  # noqa: F401

from .config import CONFIG_NAME, TurnoverConfig
from .context import instance_masks
from .errors import (
    ConfigMismatchError,
    ExampleIdError,
    MissingExampleIdsError,
    NoTargetMatchedError,
    NotPatchedError,
    TurnoverError,
)
from .masks import flip, keep_bits, mask_for
from .patcher import freeze_leaking_parameters, is_patched, leakage_report, patch_model, unpatch_model
from .data import CausalLMCollator, InstanceIdCollator, add_example_ids, prompt_completion_features
from .losses import per_example_loss, per_token_loss
from .estimators.turnover import TurnoverScorer, influence
from .trainer import TurnoverTrainer
from .training_set import DatasetSource, attach_training_set, record_training_set
from .callbacks import FlipSanityCallback
from .dynamics import TrainingDynamics, TrainingDynamicsCallback
from .label_issues import LabelSignals, cleansing_report, rank_label_issues
from .duplicates import DuplicateOptions, find_duplicates
from . import assets
from .checkpoint import load_influence_ready
from .estimators import Estimator, EstimatorContext, SavedState, register_estimator, unregister_estimator
from .estimators.ensemble import EnsembleScorer, ensemble_members, record_ensemble, split_half_agreement, train_ensemble
from .estimators.hydra import HydraScorer, HydraTrainer, HydraTurnoverTrainer
from .estimators.influence import InfluenceFunctionScorer, InfluenceOptions
from .estimators.projected import ProjectedInfluenceScorer, ProjectedOptions
from .pipeline import InfluencePipeline
from . import plots, report  # matplotlib and Chromium are imported only when a plot or screenshot is made

__all__ = [
    "CONFIG_NAME",
    "CausalLMCollator",
    "ConfigMismatchError",
    "DatasetSource",
    "EnsembleScorer",
    "Estimator",
    "EstimatorContext",
    "ExampleIdError",
    "FlipSanityCallback",
    "HydraScorer",
    "HydraTrainer",
    "HydraTurnoverTrainer",
    "InfluenceFunctionScorer",
    "InfluenceOptions",
    "ProjectedInfluenceScorer",
    "ProjectedOptions",
    "InfluencePipeline",
    "InstanceIdCollator",
    "MissingExampleIdsError",
    "NoTargetMatchedError",
    "NotPatchedError",
    "TurnoverConfig",
    "TurnoverError",
    "TurnoverScorer",
    "TurnoverTrainer",
    "TrainingDynamics",
    "TrainingDynamicsCallback",
    "LabelSignals",
    "DuplicateOptions",
    "cleansing_report",
    "find_duplicates",
    "rank_label_issues",
    "add_example_ids",
    "flip",
    "freeze_leaking_parameters",
    "influence",
    "instance_masks",
    "is_patched",
    "keep_bits",
    "leakage_report",
    "load_influence_ready",
    "mask_for",
    "patch_model",
    "split_half_agreement",
    "train_ensemble",
    "record_ensemble",
    "ensemble_members",
    "per_example_loss",
    "per_token_loss",
    "prompt_completion_features",
    "attach_training_set",
    "record_training_set",
    "register_estimator",
    "SavedState",
    "unregister_estimator",
    "unpatch_model",
]
