"""The materialised fit: every example's class gradients stored, the damped system solved in the smaller space."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ...data import rows_of_ids
from .curvature import BLOCK_BYTES, TRIANGLE_BLOCKS, curvature_roots, label_coefficients, mirror_lower

# The float64 curvature rows U are rebuilt from the float32 gradients at every preconditioning unless they are kept;
# they are kept when at most this large (rebuilding costs more than the products with them) and when the memory
# budget leaves room for them (``MaterialisedFit.room``, set by the scorer).
ROWS_CACHE_BYTES = 2**30


@dataclass
class MaterialisedFit:
    """What a materialised fit produces: the training examples' kept-class gradients and the factor of the damped
    system."""

    example_ids: torch.Tensor  # (N,) int64
    labels: torch.Tensor  # (N,) int64
    probabilities: torch.Tensor  # (N, C) float64, under each example's training mask
    classes: torch.Tensor  # (N, C-1) int64: the pseudo-labels kept (every class but the predicted one)
    class_gradients: torch.Tensor  # (N, C-1, D') float32 (D' = D, or the sketch's dim)
    factor: torch.Tensor  # lower Cholesky factor, float64: (m, m) for woodbury, (D', D') for direct
    solver: str
    damping: float
    trace: float
    method = "materialised"

    def __post_init__(self) -> None:
        self._order = torch.argsort(self.example_ids)
        self._sorted = self.example_ids[self._order]
        self.roots = curvature_roots(self.probabilities, self.classes)  # R R^T = A
        self.coefficients = label_coefficients(self.probabilities, self.classes, self.labels)
        self._gradients64: Optional[torch.Tensor] = None  # the stored gradients as float64, if kept (see cached_bytes)
        self.room: Optional[int] = None  # bytes the memory budget leaves for that copy (None: no limit); the scorer's

    @property
    def num_examples(self) -> int:
        return len(self.example_ids)

    @property
    def width(self) -> int:
        return self.class_gradients.shape[2]

    def rows_of(self, example_ids: torch.Tensor) -> torch.Tensor:
        return rows_of_ids(self._sorted, self._order, example_ids)

    def columns(self, other: int = 0) -> Iterator[slice]:
        """Column blocks of the stored gradients whose float64 copy ``(N (C-1), block)`` fits in :data:`BLOCK_BYTES`,
        and so does a float64 ``(block, other)`` block of the matrix they meet."""
        rows = self.class_gradients.shape[0] * self.class_gradients.shape[1]
        step = max(1, BLOCK_BYTES // (8 * max(rows, other, 1)))
        for start in range(0, self.width, step):
            yield slice(start, min(start + step, self.width))

    def curvature_rows(self, examples: slice) -> torch.Tensor:
        """``U[examples]``, float64 ``(n (C-1), D')``: ``G = U^T U``, rows ``R_z^T G'_z / sqrt(N)`` (the direct
        solver's blocks; the Woodbury path never builds ``U``, see :meth:`products`)."""
        block = self.class_gradients[examples].double()
        rows = torch.einsum("nce,ncd->ned", self.roots[examples], block)
        return rows.reshape(-1, block.shape[2]) / math.sqrt(self.num_examples)

    def train_gradients(self, rows: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``g_z`` of the training rows ``rows``, ``(n, D')`` (float64 unless asked otherwise)."""
        return torch.einsum("nc,ncd->nd", self.coefficients[rows].to(dtype), self.class_gradients[rows].to(dtype))

    def cached_bytes(self) -> int:
        """Size of the float64 copy of the stored gradients when it is kept (at most :data:`ROWS_CACHE_BYTES` and
        ``room``), else 0."""
        size = 8 * self.class_gradients.numel()
        return size if size <= ROWS_CACHE_BYTES and (self.room is None or size <= self.room) else 0

    def _flat64(self, columns: slice) -> torch.Tensor:
        """Columns of the stored gradients as float64 ``(N (C-1), len)``: from a float64 copy kept once when
        :meth:`cached_bytes` allows it, else converted block by block."""
        n, c, width = self.class_gradients.shape
        if self.cached_bytes():
            if self._gradients64 is None:
                self._gradients64 = self.class_gradients.view(n * c, -1).double()
            return self._gradients64[:, columns]
        return self.class_gradients.view(n * c, -1)[:, columns].double()

    def products(self, x: torch.Tensor) -> torch.Tensor:
        """``U x`` for the columns of ``x`` ``(D', T)`` (any float dtype), float64 ``(m, T)``: the stored gradients
        times ``x`` block by block in float64, then each example's rows mixed by its curvature root (so ``U``
        itself is never built)."""
        n, c, _ = self.class_gradients.shape
        out = torch.zeros(n * c, x.shape[1], dtype=torch.float64)
        for columns in self.columns(x.shape[1]):
            out.addmm_(self._flat64(columns), x[columns].double())
        return torch.einsum("nce,nct->net", self.roots, out.view(n, c, -1)).reshape(n * c, -1) / math.sqrt(n)

    def transposed_products(self, y: torch.Tensor) -> torch.Tensor:
        """``U^T y`` for ``y`` float64 ``(m, T)``: float64 ``(D', T)``."""
        n, c, width = self.class_gradients.shape
        mixed = torch.einsum("nce,net->nct", self.roots, y.view(n, c, -1)).reshape(n * c, -1) / math.sqrt(n)
        out = torch.empty(y.shape[1], width, dtype=torch.float64)
        for columns in self.columns(y.shape[1]):
            out[:, columns] = mixed.T @ self._flat64(columns)  # (T, N) x (N, len): far faster than a transposed block
        return out.T

    def system(self) -> torch.Tensor:
        """``U U^T``, float64 ``(m, m)``: the stored gradients' Gram matrix (block by block), mixed by the roots."""
        n, c, _ = self.class_gradients.shape
        m = n * c
        step = -(-m // TRIANGLE_BLOCKS)
        gram = torch.zeros(m, m, dtype=torch.float64)
        for columns in self.columns():
            block = self._flat64(columns)
            for start in range(0, m, step):  # the lower triangle's row blocks only: about half the work
                stop = min(start + step, m)
                gram[start:stop, :stop].addmm_(block[start:stop], block[:stop].T)
        gram = mirror_lower(gram, step)
        if c == 1:  # scalar roots: mixed in place (no second m x m matrix)
            r = self.roots.reshape(n)
            return gram.mul_(r[:, None]).mul_(r[None, :]).div_(n)
        mixed = torch.einsum("nce,ncmd,mdf->nemf", self.roots, gram.view(n, c, n, c), self.roots)
        del gram
        return mixed.reshape(n * c, n * c).div_(n)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "example_ids": self.example_ids, "labels": self.labels, "probabilities": self.probabilities,
            "classes": self.classes, "class_gradients": self.class_gradients, "factor": self.factor,
        }


def solve_system(factors: MaterialisedFit) -> torch.Tensor:
    """The Cholesky factor of ``lambda I + U U^T`` (woodbury) or ``U^T U + lambda I`` (direct), float64."""
    if factors.solver == "woodbury":
        system = factors.system()
    else:
        system = torch.zeros(factors.width, factors.width, dtype=torch.float64)
        step = max(1, BLOCK_BYTES // (8 * factors.width * factors.class_gradients.shape[1]))
        for start in range(0, factors.num_examples, step):
            u = factors.curvature_rows(slice(start, start + step))
            system.addmm_(u.T, u)
    system.diagonal().add_(factors.damping)
    return torch.linalg.cholesky(system)


def precondition(factors: MaterialisedFit, target_grads: torch.Tensor) -> torch.Tensor:
    """``(G + lambda I)^-1 g_t`` for every target, float64 ``(D', T)``."""
    g = target_grads.double().T  # (D', T)
    if factors.solver == "direct":
        return torch.cholesky_solve(g, factors.factor)
    solved = torch.cholesky_solve(factors.products(g), factors.factor)
    return (g - factors.transposed_products(solved)) / factors.damping


def materialised_self_influence(factors: MaterialisedFit, target_grads: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``g_t(z)^T (G + lambda I)^-1 g_z / N`` of training rows ``rows`` whose target gradients are ``target_grads``
    ``(n, D')``, float64 ``(n,)``. In the Woodbury form ``(g_t . g_z - (U g_t)^T S^-1 (U g_z)) / lambda``: one
    pass over the stored gradients for both sides, never a ``(D', n)`` float64 matrix."""
    train = factors.train_gradients(rows, torch.float32)
    if factors.solver == "direct":
        v = precondition(factors, target_grads)
        return (train.double() * v.T).sum(1) / factors.num_examples
    n = len(rows)
    projected = factors.products(torch.cat([target_grads.float(), train]).T)
    solved = torch.cholesky_solve(projected[:, n:], factors.factor)
    dots = torch.zeros(n, dtype=torch.float64)
    for columns in factors.columns():
        dots += (target_grads[:, columns].double() * train[:, columns].double()).sum(1)
    return (dots - (projected[:, :n] * solved).sum(0)) / (factors.damping * factors.num_examples)
