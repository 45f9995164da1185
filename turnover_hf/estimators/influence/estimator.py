"""The influence function as a registered estimator: its typed options and how ``InfluencePipeline`` builds it
(loaded from a saved fit beside the checkpoint, or fitted on the training set on first use)."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from typing import Optional

from ...context import state_of
from ..fitted import refuse_changed_options
from ..registry import BuiltEstimator, EstimatorContext, SavedState, register_estimator
from .saved import INFLUENCE_DIR, META_NAME
from .scorer import InfluenceFunctionScorer

logger = logging.getLogger(__name__)

# Options that change how a saved fit is used, not the fit itself
RUNTIME_OPTIONS = ("show_progress", "factorised")


@dataclass
class InfluenceOptions:
    """Options of the influence-function estimator (``InfluencePipeline(..., influence_options=...)``).

    Example:
        >>> InfluencePipeline(model, train_dataset=train, estimator="influence",
        ...                   influence_options=InfluenceOptions(sketch_dim=4096))
    """

    damping_factor: float = field(default=0.1, metadata={"help": "Damping as a multiple of the mean eigenvalue of G."})
    sketch_dim: Optional[int] = field(
        default=None,
        metadata={"help": "Sketch gradients to this many dimensions with a CountSketch (for many trainable "
                          "parameters; an approximation). Default: exact while it fits in memory."},
    )
    sketch_seed: int = field(default=0, metadata={"help": "Seed of the gradient sketch."})
    parameters: Optional[list[str]] = field(
        default=None, metadata={"help": "Tracked parameter names (default: those with requires_grad)."}
    )
    max_memory_gb: float = field(default=4.0, metadata={"help": "Largest fit kept in memory, in GB."})
    solver: str = field(default="auto", metadata={"help": "auto, woodbury or direct."})
    factorised: Optional[bool] = field(
        default=None, metadata={"help": "Factorised fit for Linear layers: None (automatic), True or False."}
    )
    show_progress: bool = field(default=True, metadata={"help": "Show a progress bar while fitting."})
    id_column: Optional[str] = field(default=None, metadata={"help": "The training set's id column."})
    projection_dim: Optional[int] = field(default=None, metadata={"deprecated": "sketch_dim"})
    projection_seed: Optional[int] = field(default=None, metadata={"deprecated": "sketch_seed"})

    def __post_init__(self) -> None:
        for old, new in (("projection_dim", "sketch_dim"), ("projection_seed", "sketch_seed")):
            value = getattr(self, old)
            if value is not None:
                warnings.warn(f"InfluenceOptions({old}=...) is deprecated (it meant the sketch's width, not the "
                              f"projected estimator's directions); pass {new}=...", DeprecationWarning, stacklevel=3)
                setattr(self, new, value)
                setattr(self, old, None)


def _given(options: InfluenceOptions) -> dict:
    """The options that differ from the defaults (what the user asked for)."""
    defaults = InfluenceOptions()
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
            if getattr(options, f.name) != getattr(defaults, f.name) and "deprecated" not in f.metadata}


@register_estimator(
    "influence",
    description="damped Gauss-Newton influence function on the trainable parameters (classifiers; the most "
                f"faithful in benchmarks/fidelity.py; fitted once and kept in <model>/{INFLUENCE_DIR}/).",
    definition="the first-order change of the target's loss if the example were removed and the model re-fitted "
               "(damped Gauss-Newton influence function on the trainable parameters).",
    options_class=InfluenceOptions,
    auto=lambda context: "the influence function is the most faithful estimator for a classifier",
    auto_priority=90,
    saved_state=SavedState(INFLUENCE_DIR, META_NAME),
    worth="Scored by the damped Gauss-Newton influence function on the adapters and the classifier: in "
          "benchmarks/fidelity.py its rankings predict retraining best (LDS 0.41 on a MiniLM adapter) and two "
          "seeds agree (0.38).",
    low_self_influence="Lowest: reviews the rest of the data already predicts (self-influence is never negative "
                       "here).",
)
def build(context: EstimatorContext) -> BuiltEstimator:
    """Load the fit kept in the state folder when there is one (options that would change it are refused), else
    a scorer that fits on the training set when first used; ``auto`` sketches gradients when an exact fit of the
    training set would exceed the memory budget and no projection was asked for."""
    model = context.model
    options = context.options or InfluenceOptions()
    given = _given(options)
    folder = context.saved_folder()
    if folder is not None:
        runtime = {k: given.pop(k) for k in RUNTIME_OPTIONS if k in given}
        refuse_changed_options(folder, InfluenceFunctionScorer.read_meta(folder), given, "influence function")
        scorer = InfluenceFunctionScorer.load(model, folder, batch_size=context.batch_size, **runtime)
    else:
        scorer = InfluenceFunctionScorer(model, batch_size=context.batch_size, **given)
        if context.automatic and scorer.sketch is None:
            # the first batch may show an exact fit larger than estimated: the projected estimator then scores
            scorer.fallback = "projected"
    expected = state_of(model).config.num_train_examples if scorer.patched else None
    if scorer.factors is not None:
        expected = scorer.factors.num_examples
    return BuiltEstimator(scorer, scorer.id_column, expected)
