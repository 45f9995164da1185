"""The factorised fit: for tracked ``nn.Linear`` layers that see one row per example, gradients kept as their outer
product factors and the system built from N x N kernels."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...data import rows_of_ids
from ..gradients import ParamSpec, tracked_linears
from .curvature import BLOCK_BYTES, TRIANGLE_BLOCKS, curvature_roots, label_coefficients, mirror_lower


# ---------------------------------------------------------------------------------------------------------------
# The factorised fit: tracked nn.Linear layers that see one row per example
# ---------------------------------------------------------------------------------------------------------------
class NotFactorisable(Exception):
    """A batch in which a tracked Linear does not see one row per example (the reason is the message)."""


@dataclass
class TrackedLayer:
    """A tracked ``nn.Linear``: its module name and which of its parameters are tracked."""

    name: str
    weight: bool = False
    bias: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight, "bias": self.bias}


def linear_layers(model: nn.Module, specs: Sequence[ParamSpec]) -> tuple[list[TrackedLayer], Optional[str]]:
    """The tracked Linear layers, or ``[]`` and the reason (naming a parameter) the factorised path does not apply."""
    layers, reason = tracked_linears(model, specs)
    return [TrackedLayer(name, weight is not None, bias is not None) for name, (weight, bias) in layers.items()], reason


def one_row_each(tensor: Any, n: int) -> Optional[torch.Tensor]:
    """``(n, features)`` from ``(n, features)`` or ``(n, 1, features)``; None for anything else."""
    if not isinstance(tensor, torch.Tensor):
        return None
    if tensor.dim() == 2 and tensor.shape[0] == n:
        return tensor
    if tensor.dim() == 3 and tensor.shape[0] == n and tensor.shape[1] == 1:
        return tensor[:, 0]
    return None


def layer_inputs(layers: Sequence[TrackedLayer], rows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each layer's ``a``: its input rows if the weight is tracked, then a column of ones if the bias is, float32."""
    out = []
    for layer, x in zip(layers, rows):
        parts = [x.float()] if layer.weight else []
        if layer.bias:
            parts.append(torch.ones(len(x), 1, dtype=torch.float32, device=x.device))
        out.append(torch.cat(parts, 1).cpu())
    return out


def output_gradients(model: nn.Module, layers: Sequence[TrackedLayer], logits: torch.Tensor,
                     outputs: Sequence[torch.Tensor], rows: Sequence[torch.Tensor], classes: torch.Tensor,
                     check: bool) -> list[torch.Tensor]:
    """``d CE(logits, classes[:, k]) / d output`` of each row and layer, float32 ``(B, K, out)`` per layer.

    With ``check``, the summed parameter gradient of the first class column is compared with the factorised
    one (``sum_b delta_b a_b^T``): a weight also used outside its Linear would break the factorisation."""
    n, k = classes.shape
    per_layer: list[list[torch.Tensor]] = [[] for _ in outputs]
    classes = classes.to(logits.device)
    for j in range(k):
        loss = F.cross_entropy(logits.float(), classes[:, j], reduction="sum")
        grads = torch.autograd.grad(loss, list(outputs), retain_graph=True, allow_unused=True)
        for i, (g, out) in enumerate(zip(grads, outputs)):
            per_layer[i].append(one_row_each(torch.zeros_like(out) if g is None else g, n).detach().float())
    if check:
        named = dict(model.named_parameters())
        tracked = [(i, leaf, f"{layer.name}.{leaf}") for i, layer in enumerate(layers)
                   for leaf in ("weight", "bias") if getattr(layer, leaf) and named[f"{layer.name}.{leaf}"].requires_grad]
        if tracked:
            loss = F.cross_entropy(logits.float(), classes[:, 0], reduction="sum")
            actual = torch.autograd.grad(loss, [named[name] for _, _, name in tracked], retain_graph=True,
                                         allow_unused=True)
            for (i, leaf, name), g in zip(tracked, actual):
                delta = per_layer[i][0].double()
                expected = delta.T @ rows[i].double() if leaf == "weight" else delta.sum(0)
                g = torch.zeros_like(expected) if g is None else g.double()
                if not torch.allclose(expected, g, rtol=1e-3, atol=1e-5 * float(g.abs().max()) + 1e-30):
                    raise NotFactorisable(
                        f"the gradient of {name!r} is not the product of its Linear's input and output gradients "
                        "(is the parameter also used outside that module?)"
                    )
    return [torch.stack(parts, 1).cpu() for parts in per_layer]


# The factorised fit keeps the float64 input Gram matrices of its layers (N x N each, a by-product of S) when they
# take at most this much together; self-influence then reuses those of layers whose input no mask changes.
INPUT_GRAMS_BYTES = 2**30
# A target set of at most m / this many columns is solved with a float32 Cholesky factor of S and float64 iterative
# refinement (a few products with S) instead of the float64 factor, which costs about twice the float32 one.
REFINED_SOLVE_RATIO = 32
REFINEMENT_STEPS = 20  # at most; a float32 factor that does not contract the error by half per step is abandoned

FactorPair = tuple[torch.Tensor, torch.Tensor]  # per layer: output gradients (n, c, out) and inputs (n, in')


def _block_rows(na: int, ca: int, nb: int, cb: int, lower: bool) -> int:
    """Examples of the left side per block of :func:`_factor_kernel`: float64 temporaries within
    :data:`BLOCK_BYTES`, and at least :data:`TRIANGLE_BLOCKS` blocks for a lower triangle."""
    step = max(1, BLOCK_BYTES // (8 * 2 * ca * nb * cb))
    return max(1, min(step, -(-na // TRIANGLE_BLOCKS))) if lower else step


def _factor_kernel(left: Sequence[FactorPair], right: Sequence[FactorPair], lower: bool = False,
                   input_grams: Optional[Sequence[Optional[torch.Tensor]]] = None,
                   keep_grams: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """Inner products of factorised gradients, float64 ``(na ca, nb cb)`` (row ``(i, j)`` is ``i * ca + j``).

    Each side holds, per layer, output gradients ``(n, c, out)`` and inputs ``(n, in')``, float64: its gradient
    ``(i, j)`` is ``sum_l delta_{l,i,j} a_{l,i}^T``, so ``<g_a, g_b> = sum_l (delta_a . delta_b) (a_a . a_b)``. Rows
    of ``left`` are taken in blocks whose temporaries fit :data:`BLOCK_BYTES`. ``lower=True`` (``left`` is
    ``right``) fills only the row blocks' parts on and left of the diagonal (the rest is left unset; see
    :func:`mirror_lower`): what a Cholesky factorisation reads, for about half the products.

    ``input_grams``: per layer, None or the known Gram matrix ``(na, nb)`` of the two sides' inputs (not
    recomputed). ``keep_grams``: per layer, None or an ``(na, nb)`` float64 matrix that receives the inputs' Gram
    matrix (its computed blocks).
    """
    na, ca = left[0][0].shape[:2]
    nb, cb = right[0][0].shape[:2]
    out = torch.empty(na * ca, nb * cb, dtype=torch.float64)  # every block is written by its first layer
    step = _block_rows(na, ca, nb, cb, lower)
    flat = [(delta.reshape(-1, delta.shape[2]), x) for delta, x in right]
    known = list(input_grams) if input_grams is not None else [None] * len(left)
    kept = list(keep_grams) if keep_grams is not None else [None] * len(left)
    for start in range(0, na, step):
        stop = min(start + step, na)
        width = stop if lower else nb  # examples of the right side this block pairs with
        block = out[start * ca : stop * ca, : width * cb].view(stop - start, ca, width, cb)
        for layer, ((delta, x), (other_delta, other_x), gram, keep) in enumerate(zip(left, flat, known, kept)):
            inputs = gram[start:stop, :width] if gram is not None else x[start:stop] @ other_x[:width].T
            if keep is not None:
                keep[start:stop, :width] = inputs
            products = delta[start:stop].reshape(-1, delta.shape[2]) @ other_delta[: width * cb].T
            products = products.view(stop - start, ca, width, cb)
            if layer == 0:
                torch.mul(products, inputs[:, None, :, None], out=block)
            else:
                block.addcmul_(products, inputs[:, None, :, None])
    return out


@dataclass
class FactorisedFit:
    """A fit on tracked Linear layers kept as factors: per layer, the output gradients of the ``C - 1`` kept classes
    ``(N, C-1, out)`` and the inputs ``(N, in')`` (a column of ones when the bias is tracked), float32; and
    ``S = lambda I + U U^T``, float64 ``(m, m)``, ``m = N (C - 1)``, with its Cholesky factors once formed.

    A training gradient is a combination of ``U``'s rows: ``g_z = U^T c_z`` with ``c_z = sqrt(N) R_z^-1 b_z`` on
    ``z``'s ``C - 1`` rows (zero elsewhere; ``R_z R_z^T = A_z``, ``g_z = G'_z^T b_z``). Woodbury then gives
    ``(G + lambda I)^-1 g_z = U^T S^-1 c_z``, so ``score(z, t) = c_z^T (S^-1 U g_t)_z / N``: a target set costs its
    kernel with the training factors (``U g_t``) and one solve; self-influence reads ``S^-1``, formed once.

    The fit keeps ``S`` (and saves it) and factorises it on first use: in float32 with float64 iterative
    refinement for a small target set (the float32 factor costs half as much; the refined solution agrees with the
    float64 one to float64 rounding; a factor that does not contract the error is abandoned for the float64 one),
    in float64 for a large set and self-influence. Which solve a target set gets depends only on ``S`` and the
    set's size, so a fit and its saved copy give identical scores. A version-2 folder holds only the float64
    factor, which then serves every target set.
    """

    example_ids: torch.Tensor  # (N,) int64
    labels: torch.Tensor  # (N,) int64
    probabilities: torch.Tensor  # (N, C) float64
    classes: torch.Tensor  # (N, C-1) int64
    layers: list[TrackedLayer]
    deltas: list[torch.Tensor]  # per layer (N, C-1, out) float32: d CE(pseudo-label) / d raw layer output
    inputs: list[torch.Tensor]  # per layer (N, in') float32: the layer input as the layer saw it
    factor: torch.Tensor  # lower Cholesky factor of S, float64 (m, m); empty until formed from S
    damping: float
    trace: float
    system: Optional[torch.Tensor] = None  # S, float64 (m, m) (None in a version-2 folder's fit)
    solver: str = "woodbury"
    method: str = "factorised"

    def __post_init__(self) -> None:
        self._order = torch.argsort(self.example_ids)
        self._sorted = self.example_ids[self._order]
        self.roots = curvature_roots(self.probabilities, self.classes)  # R R^T = A
        self.coefficients = label_coefficients(self.probabilities, self.classes, self.labels)
        # c_z: g_z = U^T c_z, float64 (N, C-1)
        self.row_weights = math.sqrt(self.num_examples) * torch.linalg.solve_triangular(
            self.roots, self.coefficients[:, :, None], upper=False)[:, :, 0]
        self._rows: Optional[list[FactorPair]] = None  # U's factors, float64
        self._factor32: Optional[torch.Tensor] = None  # float32 Cholesky factor of S (small target sets)
        self._inverse: Optional[torch.Tensor] = None  # S^-1, float64 (m, m), formed on the first self-influence call
        self._input_grams: list[Optional[torch.Tensor]] = []  # per layer: the inputs' Gram matrix (N, N), if kept
        self._grams_mirrored = False

    @property
    def num_examples(self) -> int:
        return len(self.example_ids)

    def rows_of(self, example_ids: torch.Tensor) -> torch.Tensor:
        return rows_of_ids(self._sorted, self._order, example_ids)

    def curvature_factors(self) -> list[FactorPair]:
        """The factors of ``U``'s rows ``R_z^T G'_z / sqrt(N)``, per layer: output gradients
        ``R_z^T delta_z / sqrt(N)`` ``(N, C-1, out)`` and inputs ``(N, in')``, float64; built once."""
        if self._rows is None:
            scale = 1.0 / math.sqrt(self.num_examples)
            self._rows = [(torch.einsum("njk,njo->nko", self.roots, delta.double()).mul_(scale), x.double())
                          for delta, x in zip(self.deltas, self.inputs)]
        return self._rows

    def build_system(self) -> None:
        """``S = lambda I + U U^T`` from the lower triangle of ``U U^T`` (then mirrored), keeping the layers' input
        Gram matrices when they fit :data:`INPUT_GRAMS_BYTES`."""
        rows = self.curvature_factors()
        n, c = self.classes.shape
        keep = 8 * n * n * len(rows) <= INPUT_GRAMS_BYTES
        self._input_grams = [torch.empty(n, n, dtype=torch.float64) if keep else None for _ in rows]
        system = _factor_kernel(rows, rows, lower=True, keep_grams=self._input_grams)
        system.diagonal().add_(self.damping)
        self.system = mirror_lower(system, c * _block_rows(n, c, n, c, True))

    def float64_factor(self) -> torch.Tensor:
        """The float64 Cholesky factor of ``S``, formed on first use."""
        if self.factor.numel() == 0:
            self.factor = torch.linalg.cholesky(self.system)
        return self.factor

    def solve(self, projected: torch.Tensor) -> torch.Tensor:
        """``S^-1 x`` for the columns of ``projected`` ``(m, T)``, float64: one solve per target set, so a few
        targets cost ``O(m^2)`` beyond the factorisation."""
        if self.system is not None and projected.shape[1] * REFINED_SOLVE_RATIO <= projected.shape[0]:
            solved = self._refined_solve(projected)
            if solved is not None:
                return solved
        return torch.cholesky_solve(projected, self.float64_factor())

    def _refined_solve(self, projected: torch.Tensor) -> Optional[torch.Tensor]:
        """``S^-1 x`` from the float32 factor with float64 residuals; None when float32 cannot factorise ``S`` or
        the refinement does not converge (``S`` too ill-conditioned for float32)."""
        if self._factor32 is None:
            factor, info = torch.linalg.cholesky_ex(self.system.float())
            if int(info) != 0:
                return None
            self._factor32 = factor
        solved = torch.cholesky_solve(projected.float(), self._factor32).double()
        previous = math.inf
        for _ in range(REFINEMENT_STEPS):
            residual = torch.addmm(projected, self.system, solved, alpha=-1.0)
            update = torch.cholesky_solve(residual.float(), self._factor32).double()
            solved += update
            change = float(update.abs().max())
            size = float(solved.abs().max())
            if change <= 4 * torch.finfo(torch.float64).eps * size:
                return solved
            if change > 0.5 * previous:  # no longer contracting: float64 rounding reached, or no convergence
                return solved if change <= 1e-12 * size else None
            previous = change
        return None

    def inverse(self) -> torch.Tensor:
        """``S^-1``, float64 ``(m, m)``: formed once from the float64 factor, on the first self-influence call (each
        training row is then its own target; one inverse costs a third of a solve against all N)."""
        if self._inverse is None:
            self._inverse = torch.cholesky_inverse(self.float64_factor())
        return self._inverse

    def input_grams(self, rows: torch.Tensor, inputs: Sequence[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        """Per layer, the kept Gram matrix of the training inputs against ``inputs`` ``(T, in')`` (float32, the
        inputs of training rows ``rows`` as some forward saw them), ``(N, T)``, when those are the inputs the fit saw
        (no mask changes them); else None, and a layer whose inputs differ drops its Gram matrix."""
        if not self._grams_mirrored:
            n, c = self.classes.shape
            step = _block_rows(n, c, n, c, True)
            self._input_grams = [None if g is None else mirror_lower(g, step) for g in self._input_grams]
            self._grams_mirrored = True
        out: list[Optional[torch.Tensor]] = []
        for i, gram in enumerate(self._input_grams):
            if gram is not None and not torch.equal(self.inputs[i][rows], inputs[i]):
                self._input_grams[i] = gram = None
            out.append(None if gram is None else gram[:, rows])
        return out + [None] * (len(self.inputs) - len(out))

    def curvature_products(self, deltas: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor],
                           input_grams: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
        """``U g_t`` of the gradients with, per layer, output gradients ``(T, 1, out)`` and inputs ``(T, in')``,
        float64 ``(m, T)`` (``input_grams``: see :func:`_factor_kernel`)."""
        targets = [(d.double(), x.double()) for d, x in zip(deltas, inputs)]
        return _factor_kernel(self.curvature_factors(), targets, input_grams=input_grams)

    def influence(self, solved: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Scores of training ``rows`` against a target set, ``c_z^T (S^-1 U g_t)_z / N``, float64 ``(n, T)``, from
        ``solved = S^-1 U g_t`` ``(m, T)``."""
        n, c = self.classes.shape
        solved = solved.view(n, c, -1)[rows]  # (n_rows, C-1, T)
        return torch.einsum("nj,njt->nt", self.row_weights[rows], solved) / n

    def self_influence(self, projected: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Score of each training row ``rows[i]`` against target ``i``, float64 ``(n,)``, from ``projected = U g_t``
        ``(m, n)``: row ``z``'s rows of ``S^-1`` against its target's column."""
        n, c = self.classes.shape
        own = self.inverse().view(n, c, -1)[rows]  # (n_rows, C-1, m)
        per_class = torch.einsum("njm,mn->nj", own, projected)
        return (self.row_weights[rows] * per_class).sum(1) / n

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"example_ids": self.example_ids, "labels": self.labels, "probabilities": self.probabilities,
               "classes": self.classes}
        if self.system is not None:
            out["system"] = self.system
        else:
            out["factor"] = self.factor
        for i, (delta, x) in enumerate(zip(self.deltas, self.inputs)):
            out[f"deltas.{i}"], out[f"inputs.{i}"] = delta, x
        return out
