"""Sampled classes for a classifier's Gauss-Newton curvature: labels drawn from (a reweighting of) the model's own
predictive distribution, so that the projected fit takes ``1 + label_samples`` backward passes per example whatever
the number of classes, and the exact per-class fit where that is cheap and measured closer
(``benchmarks/class_count.py``, docs/method/class-count.md).

Example:
    >>> classes, weights = sampled_classes(torch.softmax(logits.double(), -1), batch["example_ids"], seed=0, draw=0)
"""

from __future__ import annotations

import torch

from ...masks import keyed_hash

CURVATURE_CLASSES = ("auto", "exact", "sampled")


# ``curvature_classes="auto"`` keeps the exact per-class curvature up to this many classes even where one draw
# would be cheaper: at 5 classes (N = 2,048, k = 4,096) one draw per example followed the exact fit's scores at
# Pearson 0.80, four draws at 0.98 (benchmarks/class_count.py, docs/method/class-count.md)
AUTO_EXACT_CLASSES = 5


def samples_classes(curvature_classes: str, num_classes: int, label_samples: int) -> bool:
    """Whether a classifier's curvature comes from sampled labels: ``"sampled"``, or ``"auto"`` beyond
    :data:`AUTO_EXACT_CLASSES` classes where the exact per-class fit also takes more backward passes per example
    (``C - 1``) than the sampled one (the loss's own label and ``label_samples`` draws: ``1 + label_samples``);
    the fit's cost follows its backward passes (``benchmarks/class_count.py``).

    Example:
        >>> samples_classes("auto", 5, 1), samples_classes("auto", 20, 1)
        (False, True)
    """
    if curvature_classes == "auto":
        return num_classes > AUTO_EXACT_CLASSES and num_classes - 1 > 1 + label_samples
    return curvature_classes == "sampled"


def class_proposal(probs: torch.Tensor) -> torch.Tensor:
    """The distribution sampled classes are drawn from, float64 ``(B, C)``: class ``c`` in proportion to its share
    of the Gauss-Newton matrix's trace in the logits, ``p_c ||p - e_c||^2`` (``sum_c p_c (p - e_c)(p - e_c)^T`` is
    the matrix). Reweighted by ``p_c / q_c`` the draws stay unbiased; against draws from ``p`` itself they skip the
    confident prediction, whose gradient is nearly zero, for the classes that carry the curvature (two classes:
    every draw is the exact matrix)."""
    probs = probs.double()
    share = probs * ((probs * probs).sum(1, keepdim=True) - 2 * probs + 1)
    total = share.sum(1, keepdim=True)
    return torch.where(total > 0, share / total.clamp_min(torch.finfo(torch.float64).tiny), probs)


def sampled_classes(probs: torch.Tensor, ids: torch.Tensor, seed: int, draw: int, draws: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class ``draw`` of ``draws`` per row, drawn from :func:`class_proposal` of ``probs`` ``(B, C)``, and its
    importance weight ``p_c / q_c``: ``weight x g_c g_c^T`` is, in expectation, the Gauss-Newton matrix over the
    classes. The draws of a row invert the proposal's CDF at ``u + draw / draws`` (mod 1), ``u`` uniform and hashed
    from ``(seed, id)`` (systematic sampling: each draw is drawn from ``q``, and together they spread over it), so
    the same example gets the same classes in every batch composition and process count. ``(classes int64 (B,),
    weights float64 (B,))`` on ``probs``' device.

    Example:
        >>> classes, weights = sampled_classes(torch.softmax(logits.double(), -1), batch["example_ids"], 0, 0)
    """
    proposal = class_proposal(probs)
    hashes = keyed_hash(seed, "sampled classes 0", ids.to(probs.device))
    uniform = ((hashes.double() + 0.5) / 2.0 ** 32 + draw / draws) % 1.0
    cumulative = proposal.cumsum(1)
    picked = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None]).squeeze(1)
    picked = picked.clamp_max_(probs.shape[1] - 1)
    weights = probs.double().gather(1, picked[:, None])[:, 0] / proposal.gather(1, picked[:, None])[:, 0]
    return picked, weights
