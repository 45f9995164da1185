"""Fidelity evaluation of influence scores: metrics, cheap retraining (ground truths) and peers on the same model.

* :mod:`.metrics`: LDS, leave-one-out correlation, seed agreement, mislabel detection, the cleansing selection.
* :mod:`.retrain`: a small head on cached features (:func:`train_head`) and model-agnostic ground truths
  (:func:`subset_losses`, :func:`loo_effects`, :class:`Cleansing`).
* :mod:`.cached`: a transformer whose adapter and head sit in its top layer, retrained on its cached lower layers.
* :mod:`.peers`: exact gradient dot / TracIn / Gauss-Newton influence, and Captum / Kronfluence bridges.

Not imported by ``turnover_hf`` itself; import it explicitly:

Example:
    >>> from turnover_hf.evaluation import lds, seed_agreement, mislabel_detection
    >>> lds(scores, subsets, losses)          # scores (n_train, T) positive = helps; subsets (S, n_train)
"""

from .cached import (
    TopInputs,
    TopModel,
    TopRecipe,
    TrainedTop,
    cache_top_inputs,
    top_accuracy,
    top_losses,
    top_self_scores,
    top_turnover_scores,
    train_top,
)
from .metrics import (
    auc_difference,
    explained_variance,
    lds,
    lds_per_target,
    linear_residuals,
    loo_correlation,
    mislabel_detection,
    most_harmful,
    predicted_subset_losses,
    rankdata,
    roc_auc,
    seed_agreement,
    spearman,
    spearman_columns,
)
from .peers import (
    KronfluenceEKFAC,
    MarginFactors,
    captum_tracin,
    gauss_newton_influence,
    gradient_dot,
    margin_factors,
    save_trainer_checkpoint,
)
from .retrain import (
    Cleansing,
    HeadClassifier,
    HeadRecipe,
    TrainedHead,
    TurnoverHead,
    head_masks,
    leave_one_out,
    loo_effects,
    patched_classifier,
    random_subsets,
    subset_losses,
    subset_target_losses,
    train_head,
)

__all__ = [
    "Cleansing",
    "HeadClassifier",
    "HeadRecipe",
    "KronfluenceEKFAC",
    "MarginFactors",
    "TopInputs",
    "TopModel",
    "TopRecipe",
    "TrainedHead",
    "TrainedTop",
    "TurnoverHead",
    "auc_difference",
    "cache_top_inputs",
    "captum_tracin",
    "explained_variance",
    "gauss_newton_influence",
    "gradient_dot",
    "head_masks",
    "lds",
    "lds_per_target",
    "leave_one_out",
    "linear_residuals",
    "loo_correlation",
    "loo_effects",
    "margin_factors",
    "mislabel_detection",
    "most_harmful",
    "patched_classifier",
    "predicted_subset_losses",
    "random_subsets",
    "rankdata",
    "roc_auc",
    "save_trainer_checkpoint",
    "seed_agreement",
    "spearman",
    "spearman_columns",
    "subset_losses",
    "subset_target_losses",
    "top_accuracy",
    "top_losses",
    "top_self_scores",
    "top_turnover_scores",
    "train_head",
    "train_top",
]
