"""How much memory an influence fit keeps and uses at its peak, and the refusals (naming the fixes) when it exceeds
the budget.

The materialised fit's bound: with ``max_memory_gb`` = B, no step of the exact estimator (the fit, self-influence of
every training example, a target set) holds more than B beyond the model and one batch of per-example gradients
(``tests/test_influence.py`` measures the process's peak resident memory against it). :func:`materialised_gb`
counts what the fit keeps and its largest transients (the Woodbury system while it is factorised, a float64 block
of the stored gradients); the float64 copy of the stored gradients and self-influence's groups of rows take only
what is left of B (:func:`materialised_working_bytes`). A target set of T targets also holds ``T x D'`` float64.
"""

from __future__ import annotations

from ...errors import TurnoverError
from .curvature import BLOCK_BYTES

GB = 2**30


class FitBudgetError(TurnoverError):
    """A fit would keep more than ``max_memory_gb``; ``need`` says how much, without the ways out."""

    def __init__(self, message: str, need: str = "") -> None:
        super().__init__(message)
        self.need = need or message


def materialised_gb(examples: int, kept_classes: int, width: int, solver: str) -> float:
    """Peak memory of a materialised fit beyond the model and a batch: the float32 class gradients and the float64
    factor it keeps, the system beside its factor while it is factorised, and two float64 working blocks."""
    rows = examples * kept_classes
    side = min(rows, width) if solver == "auto" else (rows if solver == "woodbury" else width)
    return (rows * width * 4 + 2 * side * side * 8 + 2 * BLOCK_BYTES) / GB


def materialised_working_bytes(examples: int, kept_classes: int, width: int, solver: str,
                               max_memory_gb: float) -> int:
    """Bytes of ``max_memory_gb`` a materialised fit leaves for its optional working memory (the float64 copy of
    the stored gradients, self-influence's groups of rows): the budget minus :func:`materialised_gb`, at least 0."""
    left = max_memory_gb * GB - materialised_gb(examples, kept_classes, width, solver) * GB
    return int(min(max(left, 0), 2**62))  # max_memory_gb may be inf


def check_materialised_budget(examples: int, kept_classes: int, width: int, solver: str,
                              max_memory_gb: float) -> None:
    """Refuse a materialised fit above ``max_memory_gb``, naming the ways out."""
    rows = examples * kept_classes
    side = min(rows, width) if solver == "auto" else (rows if solver == "woodbury" else width)
    needed = materialised_gb(examples, kept_classes, width, solver)
    if needed > max_memory_gb:
        what = f"{examples} examples x {kept_classes} class gradient(s) x {width} coordinates"
        need = (f"fitting the influence function needs about {needed:.1f} GB ({what} as float32, plus a "
                f"{side} x {side} factor and working memory), above max_memory_gb={max_memory_gb:g}.")
        raise FitBudgetError(
            f"{need} Use estimator='projected' (the same influence function in the directions of largest "
            "curvature, at any size), pass sketch_dim=4096 (a CountSketch of every gradient: an approximation "
            "whose error shrinks as it grows), select fewer parameters=[...], or raise max_memory_gb.", need)


def factorised_gb(examples: int, kept_classes: int, per_example: int) -> float:
    """Memory budgeted for a factorised fit: float32 factors, three float64 ``m x m`` and two ``m x N`` matrices
    (the budget of the fit that kept ``U G`` and ``S^-1 U G``; the fit now keeps ``S``, its float32 and float64
    factors and ``S^-1`` instead, and the input Gram matrices within
    :data:`~turnover_hf.estimators.influence.factorised.INPUT_GRAMS_BYTES`)."""
    rows = examples * kept_classes
    return (examples * per_example * 4 + (3 * rows * rows + 2 * rows * examples) * 8) / 2**30


def check_factorised_budget(examples: int, kept_classes: int, per_example: int, max_memory_gb: float) -> None:
    """Refuse a factorised fit above ``max_memory_gb``, naming the ways out."""
    needed = factorised_gb(examples, kept_classes, per_example)
    if needed > max_memory_gb:
        rows = examples * kept_classes
        need = (f"fitting the influence function (factorised) needs about {needed:.1f} GB ({examples} examples x "
                f"{per_example} layer inputs and output gradients as float32, plus {rows} x {rows} float64 "
                f"kernels), above max_memory_gb={max_memory_gb:g}.")
        raise FitBudgetError(
            f"{need} Pass factorised=False (per-example gradients, solved in parameter space when that is "
            "smaller), use estimator='projected' (any size), sketch_dim=4096 (a CountSketch: an "
            "approximation), or raise max_memory_gb.", need)
