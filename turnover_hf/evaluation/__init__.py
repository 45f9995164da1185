"""Fidelity evaluation of influence scores: metrics (LDS, seed agreement, mislabel detection) and cheap retraining.

Not imported by ``turnover_hf`` itself; import it explicitly:

Example:
    >>> from turnover_hf.evaluation import lds, seed_agreement, mislabel_detection
    >>> lds(scores, subsets, losses)          # scores (n_train, T) positive = helps; subsets (S, n_train)
"""

from .metrics import (
    explained_variance,
    lds,
    lds_per_target,
    linear_residuals,
    mislabel_detection,
    predicted_subset_losses,
    rankdata,
    roc_auc,
    seed_agreement,
    spearman,
    spearman_columns,
)
from .retrain import (
    HeadClassifier,
    HeadRecipe,
    TrainedHead,
    TurnoverHead,
    head_masks,
    leave_one_out,
    patched_classifier,
    random_subsets,
    subset_target_losses,
    train_head,
)

__all__ = [
    "HeadClassifier",
    "HeadRecipe",
    "TrainedHead",
    "TurnoverHead",
    "explained_variance",
    "head_masks",
    "lds",
    "lds_per_target",
    "leave_one_out",
    "linear_residuals",
    "mislabel_detection",
    "patched_classifier",
    "predicted_subset_losses",
    "random_subsets",
    "rankdata",
    "roc_auc",
    "seed_agreement",
    "spearman",
    "spearman_columns",
    "subset_target_losses",
    "train_head",
]
