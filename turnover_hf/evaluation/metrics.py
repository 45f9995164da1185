"""Fidelity metrics for influence scores: LDS, leave-one-out correlation, agreement between independent runs,
mislabel detection and the choice of examples for data cleansing.

Sign convention (the one :func:`turnover_hf.influence` uses): ``scores[i, t] > 0`` means training example ``i``
helps target ``t``, i.e. training on it lowers the target's loss. A model trained on a subset ``S`` of the
training set is therefore predicted to have the target loss ``const - sum_{i in S} scores[i, t]``.

Everything here is plain numpy (inputs may be numpy arrays, torch tensors or nested lists) and has no optional
dependency: ranks and Spearman correlations come from :mod:`turnover_hf.ranks`, the ROC AUC is computed here.

Example:
    >>> import numpy as np
    >>> scores = np.random.default_rng(0).normal(size=(100, 5))          # (n_train, n_targets)
    >>> subsets = np.random.default_rng(1).random((20, 100)) < 0.5     # (S, n_train)
    >>> losses = -(subsets @ scores)                                   # a perfectly additive ground truth
    >>> round(lds(scores, subsets, losses), 6)
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..ranks import ArrayLike, _pearson_columns, as_numpy, rankdata, spearman, spearman_columns

DEFAULT_RECALL_FRACTIONS: tuple[float, ...] = (0.05, 0.10, 0.20)


def predicted_subset_losses(predicted_scores: ArrayLike, subset_masks: ArrayLike) -> np.ndarray:
    """Predicted target loss of a model trained on each subset, up to a per-target constant: ``(S, n_targets)``.

    ``-subset_masks @ predicted_scores``: an included example that helps a target lowers its predicted loss.
    """
    scores, masks = as_numpy(predicted_scores), as_numpy(subset_masks)
    if scores.ndim != 2 or masks.ndim != 2 or masks.shape[1] != scores.shape[0]:
        raise ValueError(
            f"predicted_scores must be (n_train, n_targets) and subset_masks (S, n_train); got {scores.shape} and "
            f"{masks.shape}."
        )
    return -(masks @ scores)


def lds_per_target(predicted_scores: ArrayLike, subset_masks: ArrayLike, actual_target_losses: ArrayLike) -> np.ndarray:
    """The linear datamodeling score of each target: Spearman over subsets of predicted vs actual target loss.

    Args:
        predicted_scores: ``(n_train, n_targets)``, positive where an example lowers the target's loss.
        subset_masks: ``(S, n_train)`` booleans, row ``s`` marking the examples subset ``s`` was trained on.
        actual_target_losses: ``(S, n_targets)``, each target's loss under the model retrained on each subset.

    Returns:
        ``(n_targets,)`` correlations; NaN for a target whose predicted or actual losses are constant.
    """
    predicted = predicted_subset_losses(predicted_scores, subset_masks)
    actual = as_numpy(actual_target_losses)
    if actual.shape != predicted.shape:
        raise ValueError(f"actual_target_losses must be (S, n_targets) = {predicted.shape}, got {actual.shape}.")
    return spearman_columns(predicted, actual)


def lds(predicted_scores: ArrayLike, subset_masks: ArrayLike, actual_target_losses: ArrayLike) -> float:
    """Linear datamodeling score (Park et al., 2023): :func:`lds_per_target` averaged over targets (NaNs skipped).

    1 means the scores rank the subsets exactly as retraining does for every target, -1 exactly reversed.

    Example:
        >>> lds(scores, subsets, losses)          # scores (n, T), subsets (S, n) bool, losses (S, T)
        0.21
    """
    per_target = lds_per_target(predicted_scores, subset_masks, actual_target_losses)
    return float(np.nanmean(per_target)) if np.isfinite(per_target).any() else float("nan")


def seed_agreement(scores_a: ArrayLike, scores_b: ArrayLike) -> dict[str, float]:
    """How much two independent runs (other mask / init seeds) agree on the same ``(n_train, n_targets)`` scores.

    Returns ``{"overall": ..., "per_target": ...}``: the Spearman correlation over all (train, target) pairs, and
    the mean over targets of the Spearman correlation over training examples (the ranking a user reads).

    Example:
        >>> seed_agreement(scores_seed0, scores_seed1)
        {'overall': 0.31, 'per_target': 0.05}
    """
    a, b = as_numpy(scores_a), as_numpy(scores_b)
    if a.shape != b.shape:
        raise ValueError(f"the two score matrices differ in shape: {a.shape} vs {b.shape}.")
    if a.ndim == 1:
        a, b = a[:, None], b[:, None]
    per_target = spearman_columns(a, b)
    return {
        "overall": spearman(a, b),
        "per_target": float(np.nanmean(per_target)) if np.isfinite(per_target).any() else float("nan"),
    }


def roc_auc(scores: ArrayLike, positives: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` (higher = more likely positive), ties counted as one half.

    Computed as the Mann-Whitney U statistic from average ranks, so it needs no optional dependency.

    Example:
        >>> roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True])
        0.75
    """
    s = as_numpy(scores).ravel()
    y = as_numpy(positives).ravel() > 0
    if s.shape != y.shape:
        raise ValueError(f"scores and positives differ in length: {s.size} vs {y.size}.")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("the AUC needs at least one positive and one negative example.")
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _weighted_auc(scores: np.ndarray, positives: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of ``scores`` ``(n,)`` under each row of ``weights`` ``(R, n)`` (how often each example is counted:
    a bootstrap resample), ties counted as one half, float64 ``(R,)``; one sort for all rows."""
    order = np.argsort(scores[~positives], kind="mergesort")
    negatives = scores[~positives][order]
    below = np.concatenate([np.zeros((len(weights), 1)), np.cumsum(weights[:, ~positives][:, order], axis=1)], axis=1)
    lo = np.searchsorted(negatives, scores[positives], side="left")
    hi = np.searchsorted(negatives, scores[positives], side="right")
    beaten = below[:, lo] + 0.5 * (below[:, hi] - below[:, lo])  # (R, n_pos): weighted negatives below each positive
    pos_weights = weights[:, positives]
    return (pos_weights * beaten).sum(1) / (pos_weights.sum(1) * weights[:, ~positives].sum(1))


def auc_difference(
    scores: ArrayLike,
    reference: ArrayLike,
    positives: ArrayLike,
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """``roc_auc(scores) - roc_auc(reference)`` on the same examples, with a paired bootstrap interval.

    Both scores are judged on the same resamples of the examples (positives and negatives resampled apart, so
    every resample keeps their counts), which is what makes a small difference between two similar detectors
    measurable: the interval is that of the difference, far narrower than either AUC's own. Higher = more likely
    positive for both (negate a score whose low end is suspicious).

    Returns:
        ``{"difference", "low", "high", "level", "resamples"}``: the observed difference and the percentile
        interval of the resampled ones.

    Example:
        >>> auc_difference(projected_self_influence, exact_self_influence, flipped)["high"] >= 0   # not worse?
        True
    """
    a, b = as_numpy(scores).ravel().astype(np.float64), as_numpy(reference).ravel().astype(np.float64)
    y = as_numpy(positives).ravel() > 0
    if not a.shape == b.shape == y.shape:
        raise ValueError(f"scores, reference and positives differ in length: {a.size}, {b.size}, {y.size}.")
    if not 0.0 < level < 1.0 or resamples < 1:
        raise ValueError(f"level must be in (0, 1) and resamples positive; got {level} and {resamples}.")
    observed = roc_auc(a, y) - roc_auc(b, y)
    rng = np.random.default_rng(seed)
    weights = np.zeros((resamples, len(y)))
    for group in (np.flatnonzero(y), np.flatnonzero(~y)):
        weights[:, group] = rng.multinomial(len(group), np.full(len(group), 1.0 / len(group)), size=resamples)
    resampled = _weighted_auc(a, y, weights) - _weighted_auc(b, y, weights)
    low, high = np.quantile(resampled, [(1 - level) / 2, (1 + level) / 2])
    return {"difference": float(observed), "low": float(low), "high": float(high), "level": level,
            "resamples": resamples}


def mislabel_detection(
    self_influence: ArrayLike,
    is_flipped: ArrayLike,
    *,
    low_is_suspicious: bool,
    fractions: Sequence[float] = DEFAULT_RECALL_FRACTIONS,
) -> dict[str, float]:
    """How well a per-example score finds mislabelled (label-flipped) training examples.

    Args:
        self_influence: one score per training example.
        is_flipped: booleans, True where the example's label was flipped.
        low_is_suspicious: which end of the score flags mislabels; required, because a wrong direction silently
            turns an AUC ``a`` into ``1 - a``. On the head benchmark (``benchmarks/fidelity.py``) high turn-over
            self-influence flags them (a mislabelled example lowers its own loss under its mask much more than
            a clean one), as do high training loss and high gradient self-influence.
        fractions: inspection budgets: ``recall@f`` is the share of all flipped examples found among the
            ``round(f * n)`` most suspicious examples.

    Returns:
        ``{"auc": ..., "recall@5%": ..., "recall@10%": ..., "recall@20%": ...}`` for the default fractions.

    Example:
        >>> mislabel_detection(train_loss, flipped, low_is_suspicious=False)["auc"]
        0.81
    """
    s = as_numpy(self_influence).ravel()
    flipped = as_numpy(is_flipped).ravel() > 0
    if s.shape != flipped.shape:
        raise ValueError(f"self_influence and is_flipped differ in length: {s.size} vs {flipped.size}.")
    suspicion = -s if low_is_suspicious else s
    out = {"auc": roc_auc(suspicion, flipped)}
    # A stable sort on the negated suspicion keeps the original order among ties, so results are reproducible.
    order = np.argsort(-suspicion, kind="mergesort")
    n_flipped = int(flipped.sum())
    for fraction in fractions:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"recall fractions must be in (0, 1], got {fraction}.")
        budget = round(fraction * len(s))
        out[f"recall@{fraction * 100:g}%"] = float(flipped[order[:budget]].sum() / n_flipped)
    return out


def linear_residuals(scores: ArrayLike, design: ArrayLike, *, center: bool = True) -> np.ndarray:
    """Residuals of the least-squares fit of each column of ``scores`` ``(n, k)`` on ``design`` ``(n, d)``.

    With ``center=True`` the design's columns are centred and an intercept is fitted as well. Used to remove the
    part of turn-over scores that is a linear function of the examples' mask bits.

    Example:
        >>> residuals = linear_residuals(scores, keep_bits(example_ids, "head.hidden", 128).float())
    """
    y, x = as_numpy(scores), as_numpy(design)
    if y.ndim == 1:
        y = y[:, None]
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"scores have {y.shape[0]} rows but the design has {x.shape[0]}.")
    if center:
        x = np.concatenate([x - x.mean(axis=0), np.ones((x.shape[0], 1))], axis=1)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return y - x @ coef


def explained_variance(scores: ArrayLike, residuals: ArrayLike) -> np.ndarray:
    """Per column, the share of the variance of ``scores`` (around its mean) that a fit leaving ``residuals`` explains.

    Returns ``(k,)`` for ``(n, k)`` inputs (NaN for a constant column).

    Example:
        >>> explained_variance(scores, linear_residuals(scores, bits)).mean()
        0.99
    """
    y, r = as_numpy(scores), as_numpy(residuals)
    if y.ndim == 1:
        y, r = y[:, None], r[:, None]
    total = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 1.0 - (r**2).sum(axis=0) / np.where(total > 0, total, 1.0), np.nan)


def loo_correlation(predicted_scores: ArrayLike, actual_changes: ArrayLike) -> dict[str, float]:
    """How well predicted influence matches the actual leave-one-out effect on the same (example, target) pairs.

    Args:
        predicted_scores: ``(n, n_targets)`` scores of the ``n`` left-out examples, positive where an example helps.
        actual_changes: ``(n, n_targets)`` ``L(model without z, target) - L(model, target)`` from retraining
            (positive where z helped), e.g. from :func:`turnover_hf.evaluation.retrain.loo_effects`.

    Returns:
        ``{"pearson": ..., "spearman": ..., "per_target_spearman": ...}``: Pearson and Spearman correlation over all
        pairs (the scatter plot of Koh & Liang, 2017), and the mean over targets of the Spearman correlation over
        the left-out examples.

    Example:
        >>> loo_correlation(scores[sample], actual)["pearson"]
        0.42
    """
    predicted, actual = as_numpy(predicted_scores), as_numpy(actual_changes)
    if predicted.ndim == 1:
        predicted, actual = predicted[:, None], actual[:, None] if actual.ndim == 1 else actual
    if predicted.shape != actual.shape or predicted.ndim != 2:
        raise ValueError(
            f"predicted_scores and actual_changes must both be (n, n_targets); got {predicted.shape} and "
            f"{actual.shape}."
        )
    pearson = _pearson_columns(predicted.reshape(-1, 1), actual.reshape(-1, 1))[0]
    per_target = spearman_columns(predicted, actual)
    return {
        "pearson": float(pearson),
        "spearman": spearman(predicted, actual),
        "per_target_spearman": float(np.nanmean(per_target)) if np.isfinite(per_target).any() else float("nan"),
    }


def most_harmful(scores: ArrayLike, fraction: float = 0.01) -> np.ndarray:
    """Row positions of the ``round(fraction * n)`` examples with the most negative mean influence, most harmful first.

    ``scores`` is ``(n_train, n_targets)`` (influence on validation examples; positive = helps) or ``(n_train,)``
    (an already averaged influence). This is the selection rule of data cleansing in Kobayashi et al. (2020,
    Sec. 4.4): an example whose mean influence on unseen examples is negative may hurt generalisation.

    Example:
        >>> removed = most_harmful(scores_on_validation, fraction=0.01)   # 20 row positions for n = 2,000
    """
    values = as_numpy(scores)
    mean = values.mean(axis=1) if values.ndim == 2 else values.ravel()
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}.")
    count = max(1, round(fraction * len(mean)))
    return np.argsort(mean, kind="mergesort")[:count]
