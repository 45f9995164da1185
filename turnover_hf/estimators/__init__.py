"""Estimators: how ``InfluencePipeline`` turns (training example, target) pairs into scores. One protocol, one
registry; an estimator is a module plus one :func:`register_estimator` call.

The pipeline, the CLI, the report and the demo ask this registry: which names exist, what ``"auto"`` picks for a
set of models, how to build an estimator from a pipeline's inputs, what one of its scores means. None of them
compares estimator names.

Example:
    >>> @register_estimator("my-estimator", description="...", definition="...")
    ... def build(context: EstimatorContext) -> Estimator: return MyScorer(context.models[0])
    >>> InfluencePipeline(model, train_dataset=train, estimator="my-estimator")
"""

from .registry import (
    AUTO,
    BuiltEstimator,
    Estimator,
    EstimatorContext,
    EstimatorFallback,
    EstimatorSpec,
    SavedState,
    attach_fitted,
    carried_options,
    choose_estimator,
    describe_estimators,
    estimator_names,
    fitted_of,
    get_estimator,
    options_classes,
    options_owner,
    register_estimator,
    resolve_estimator,
    saved_states,
    unregister_estimator,
)

# The built-in estimators register themselves when imported, in this order (the order "auto" breaks ties in).
from . import ensemble, influence, hydra, projected  # noqa: E402,F401  isort: skip

__all__ = [
    "AUTO", "BuiltEstimator", "Estimator", "EstimatorContext", "EstimatorFallback", "EstimatorSpec", "SavedState",
    "attach_fitted", "carried_options", "choose_estimator", "describe_estimators", "estimator_names", "fitted_of",
    "get_estimator", "options_classes", "options_owner", "register_estimator", "resolve_estimator", "saved_states",
    "unregister_estimator",
]
