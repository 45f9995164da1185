"""Rank statistics in plain numpy (inputs may be numpy arrays, torch tensors or nested lists): ranks with ties and
Spearman correlations, column by column. Small and dependency-free, so estimators can measure agreement without
importing the evaluation package.

Example:
    >>> spearman([1, 2, 3, 4], [10, 20, 30, 25])
    0.8
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import numpy as np

ArrayLike = Union[np.ndarray, Sequence[Any], "torch.Tensor"]  # noqa: F821 - torch is optional here


def as_numpy(values: ArrayLike) -> np.ndarray:
    """``values`` as a float64 numpy array (torch tensors are detached and moved to the CPU first)."""
    detach = getattr(values, "detach", None)
    if callable(detach):
        values = detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def rankdata(values: ArrayLike, axis: int = 0) -> np.ndarray:
    """Ranks ``1 .. n`` along ``axis``, ties sharing their average rank (like ``scipy.stats.rankdata``)."""
    x = np.moveaxis(as_numpy(values), axis, -1)
    flat = x.reshape(-1, x.shape[-1])
    ranks = np.empty_like(flat)
    for row, out in zip(flat, ranks):
        order = np.argsort(row, kind="mergesort")
        sorted_row = row[order]
        # Runs of equal values: every member gets the mean of the ranks the run spans.
        starts = np.flatnonzero(np.r_[True, sorted_row[1:] != sorted_row[:-1]])
        ends = np.r_[starts[1:], len(row)]
        average = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
        out[order] = np.repeat(average, ends - starts)
    return np.moveaxis(ranks.reshape(x.shape), -1, axis)


def _pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column pair; NaN where a column is constant."""
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    denominator = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis=0) / np.where(denominator > 0, denominator, 1.0), np.nan)


def spearman_columns(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Spearman rank correlation of each column of ``a`` with the same column of ``b`` (both ``(n, k)``).

    Columns where either side is constant have no defined correlation and come back as NaN.
    """
    a, b = as_numpy(a), as_numpy(b)
    if a.ndim == 1:
        a, b = a[:, None], b[:, None] if b.ndim == 1 else b
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"spearman_columns needs two arrays of the same 2-D shape, got {a.shape} and {b.shape}.")
    if a.shape[0] < 2:
        raise ValueError("a rank correlation needs at least 2 rows.")
    return _pearson_columns(rankdata(a, axis=0), rankdata(b, axis=0))


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman rank correlation of two equally long sequences (flattened); NaN if either is constant.

    Example:
        >>> spearman([1, 2, 3, 4], [10, 20, 30, 25])
        0.8
    """
    a, b = as_numpy(a).ravel(), as_numpy(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"spearman needs two sequences of the same length, got {a.size} and {b.size}.")
    return float(spearman_columns(a[:, None], b[:, None])[0])
