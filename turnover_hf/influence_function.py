"""The influence-function estimator: damped Gauss-Newton influence of every training example, for classifiers.

The third estimator of turnover-hf, beside turn-over dropout and HYDRA. For the trained weights ``w``, the tracked
parameters (default: those with ``requires_grad``; ``D`` of them) and ``N`` training examples:

    score(z, t) = g_t^T (G + lambda I)^-1 g_z / N       (> 0: z lowers the target's loss, a proponent)

* ``g_z``: the gradient of example ``z``'s loss under the loss it was trained with: on a model patched with
  turn-over dropout, under its own instance mask (``turnover_hf.instance_masks(model, ids, mode="train")``); on
  an unpatched model, the plain forward. Eval mode (no dropout) in both cases.
* ``g_t``: the gradient of the target's loss in eval mode on the full network.
* ``G = (1/N) sum_z J_z^T (diag(p_z) - p_z p_z^T) J_z``: the Gauss-Newton matrix of softmax cross-entropy, with
  ``J_z`` the Jacobian of ``z``'s logits (under its mask) and ``p_z`` its predicted probabilities. Equivalently
  ``G = (1/N) sum_z sum_c p_{z,c} g_{z,c} g_{z,c}^T`` with ``g_{z,c}`` the gradient of ``z``'s cross-entropy
  against class ``c`` (a per-example gradient with a pseudo-label).
* ``lambda = damping_factor x trace(G) / D``: a multiple of the mean eigenvalue of ``G`` (default 0.1, the value
  ``benchmarks/fidelity.py`` fixed in advance; the same definition as
  :func:`turnover_hf.evaluation.peers.gauss_newton_influence`, so the two agree).

``-score(z, t)`` is the first-order change of the target's loss when ``z`` is removed from the training set and
the model is re-fitted, for a loss whose curvature is ``G + lambda I`` (Koh and Liang, 2017, with the Gauss-Newton
matrix in place of the Hessian, as in Kronfluence).

How it is computed. The ``C`` class gradients of an example satisfy ``sum_c p_{z,c} g_{z,c} = 0`` (the gradient of
the expected cross-entropy under the model's own prediction vanishes), so ``C - 1`` of them carry ``G``: the
predicted class is left out and the others are recombined into ``C - 1`` rows ``u_{z,k}`` with
``G = sum_{z,k} u_{z,k} u_{z,k}^T`` (one row per example for a binary classifier); ``g_z`` itself is a combination
of the same class gradients. In the materialised fit (``method == "materialised"``) they are the package's
per-example gradients (:class:`~turnover_hf.hydra.PerExampleGrads`) with pseudo-labels, so fitting costs
``N (C - 1)`` per-example gradients of ``D`` floats each. The damped system is
solved once, in float64, in the smaller of two spaces: Woodbury's identity in the ``N (C - 1)``-space
(``solver="woodbury"``, a Cholesky factor of ``lambda I + U U^T``) or directly in parameter space
(``solver="direct"``, a Cholesky factor of ``G + lambda I``). Scoring a target set costs one gradient per target
and one solve, then a matrix product per chunk of training ids.

Factorised fit (``method == "factorised"``). When every tracked parameter is the weight or bias of a module of type
exactly ``torch.nn.Linear`` that sees one row per example (``(B, in)`` or ``(B, 1, in)``: a head on pooled
features), a per-example gradient is, per layer, the outer product ``delta a^T``: ``delta`` the loss gradient at the
layer's raw output (taken by a forward hook that runs before any output-mask hook, so the mask enters through the
chain rule), ``a`` its input as the layer saw it (after any input mask), with a 1 appended when the bias is
tracked. Two gradients then have the inner product ``sum_layers (delta_1 . delta_2) (a_1 . a_2)``. The fit keeps
``delta`` of the ``C - 1`` kept classes and ``a`` of every example and builds ``S = lambda I + U U^T`` from
the lower triangle of ``N x N`` kernels (``N^2 sum(in + out) / 2`` operations instead of ``N^2 sum(in x out)``),
factorised on first use (in float32 with float64 iterative refinement for a small target set, in float64
otherwise; both to float64 accuracy). Each training gradient is a combination of its own rows of
``U``, ``g_z = U^T c_z``, so by Woodbury ``(G + lambda I)^-1 g_z = U^T S^-1 c_z`` and

    score(z, t) = c_z^T (S^-1 U g_t)_z / N

(``(.)_z``: the ``C - 1`` entries of ``z``'s rows). A target set costs one forward and backward per target batch,
its kernel with the training factors (``U g_t``) and one Cholesky solve (``O(N^2)`` per target: a one-target
explanation never pays an ``O(N^3)`` step beyond the factorisation); self-influence reads the rows of ``S^-1``,
formed once from the factor on the first self-influence call (a third of the cost of solving for all N), and
reuses the fit's input Gram matrices of the layers whose inputs no mask changes.

The numbers are those of the materialised fit (to float32 rounding; on a 384 -> 128 -> 2 head with N = 2,000, one
thread: fit, one 64-target set and self-influence of all N in 2.6 s instead of 112 s, scores within 2e-7 of the
largest, ``benchmarks/results/influence_scoring.md``). The choice is made at fit time: forward hooks
check every batch, and the first batch's summed parameter gradient is compared with the factorised one. A tracked
Linear that sees several rows per example (token sequences) or runs twice, a weight also used outside its Linear,
any other tracked parameter (LayerNorm, embeddings, Conv1D, Linear subclasses), a projection or ``solver="direct"``
mean per-example gradients (``method == "materialised"``), as does ``solver="auto"`` with ``N (C - 1) > D`` when
``N`` is known (parameter space is then smaller). ``factorised=True`` raises instead of falling back;
``factorised=False`` never factorises.

Scale. The materialised fit keeps ``N x (C - 1) x D`` float32 gradients; the factorised one keeps
``N x (sum(in') + (C - 1) sum(out))`` float32 factors (and a float64 copy), float64 ``N (C - 1)``-square
matrices (``S``, its factors as they are needed, ``S^-1`` once self-influence is asked for) and, when they take at
most :data:`INPUT_GRAMS_BYTES` together, the layers' ``N x N`` input Gram matrices. When the fit's size exceeds
``max_memory_gb`` the scorer refuses and asks for ``projection_dim=d`` (or, factorised, ``factorised=False``); with
a projection every gradient is sketched with a fixed, seeded CountSketch (each parameter coordinate hashed to one
of ``d`` buckets with a random sign, from the package's integer hash of ``(projection_seed, parameter name,
index)``: ``O(D)`` memory, identical on every device). The sketch preserves inner products in expectation (variance ``~ |a|^2 |b|^2 / d``), so scores approach the exact ones
as ``d`` grows past the rank of the gradients; it is an approximation (``benchmarks/results/fidelity*.md`` measures
how close it stays). ``lambda`` is computed from the exact gradients in both modes.

Scope: classifiers (logits ``(B, C)``, integer labels ``(B,)``). Causal language models are refused: use turn-over
ensembles or HYDRA there.

Example:
    >>> scorer = InfluenceFunctionScorer(model, train_dataset, data_collator=DataCollatorWithPadding(tokenizer))
    >>> scorer.scores(targets, targets["labels"], example_ids=torch.arange(100))   # fits once, then (100, T)
    >>> scorer.save("out/influence"); InfluenceFunctionScorer.load(model, "out/influence")
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import default_data_collator

from .config import MASK_FIELDS
from .context import instance_masks, state_of
from .data import BATCH_KEY, InstanceIdCollator, check_id_column
from .errors import ConfigMismatchError, MissingExampleIdsError, StaleFitError, TurnoverError
from .files import atomic_path, atomic_write_text
from .hydra import (
    ParamSpec, PerExampleGrads, _linear_calls, _logits, _read_meta, _rows_of, _specs_for, _target_gradients,
    _tracked_linears,
)
from .masks import _example_hash, _fmix32, _layer_base
from .patcher import is_patched
from .scoring import _eval_mode, check_ids_known, model_inputs
from .store import fingerprint
from .targets import is_causal_lm

FORMAT = "turnover-hf/influence-function"
FORMAT_VERSION = 3  # 2: adds "method" (and the factorised layout); 3: a factorised fit keeps S ("system"), not
# its Cholesky factor. Version-2 folders (factorised: the factor) and version-1 folders (materialised) still load.
META_NAME = "influence.json"
FACTORS_NAME = "influence_factors.safetensors"
INFLUENCE_DIR = "influence"  # beside a saved model: where InfluencePipeline looks for fitted factors
SOLVERS = ("auto", "woodbury", "direct")
BLOCK_BYTES = 128 * 2**20  # float64 working blocks of the solve (bounded temporary memory)
# The float64 curvature rows U are rebuilt from the float32 gradients at every preconditioning unless they are kept;
# they are kept when at most this large (rebuilding costs more than the products with them).
ROWS_CACHE_BYTES = 2**30
# Materialised self-influence reads every stored gradient once per group of rows; a group holds at most this much
# of its own gradients (float32 target and training gradients, and both side by side).
SELF_INFLUENCE_GROUP_BYTES = 2**29
_SIGN_SALT = 0x5BD1E995
METHODS = ("factorised", "materialised")

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
TrainData = Union[Dataset, Iterable[Mapping[str, Any]]]


# ---------------------------------------------------------------------------------------------------------------
# CountSketch
# ---------------------------------------------------------------------------------------------------------------
class CountSketch:
    """A fixed random projection of ``D`` parameter coordinates to ``dim``: coordinate ``i`` goes to one bucket with
    a random sign, both from the integer hash of ``(seed, parameter name, index)``.

    ``O(D)`` memory (a bucket and a sign per coordinate), generated on the CPU with integer ops, so the sketch is
    the same on every device and in every process; applied with ``index_add_``. ``E[<S a, S b>] = <a, b>``.

    Example:
        >>> sketch = CountSketch(_specs_for(model, None), dim=4096, seed=0)
        >>> sketch(grads).shape                                  # (B, D) -> (B, 4096)
    """

    def __init__(self, specs: Sequence[ParamSpec], dim: int, seed: int = 0) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise TurnoverError(f"projection_dim must be a positive integer (e.g. 4096), got {dim!r}.")
        self.dim = dim
        self.seed = int(seed)
        buckets, signs = [], []
        for spec in specs:
            hashed = _example_hash(_layer_base(self.seed, spec.name), torch.arange(spec.numel, dtype=torch.int64))
            buckets.append(hashed % dim)
            signs.append(1.0 - 2.0 * (_fmix32(hashed ^ _SIGN_SALT) & 1).float())
        self.buckets = torch.cat(buckets)
        self.signs = torch.cat(signs)
        self._on: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """Sketch the rows of ``flat`` ``(B, D)`` to ``(B, dim)`` (same device and dtype)."""
        key = (flat.device, flat.dtype)
        if key not in self._on:
            self._on[key] = (self.buckets.to(flat.device), self.signs.to(flat.device, flat.dtype))
        buckets, signs = self._on[key]
        return flat.new_zeros(flat.shape[0], self.dim).index_add_(1, buckets, flat * signs)


# ---------------------------------------------------------------------------------------------------------------
# The fitted state
# ---------------------------------------------------------------------------------------------------------------
def _curvature_blocks(probs: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Per example, ``A = diag(p') + p' p'^T / p_top`` over the ``C - 1`` kept classes, float64 ``(N, C-1, C-1)``.

    With ``G'`` the kept classes' gradients, ``sum_c p_c g_c g_c^T = G'^T A G'`` because the predicted class's
    gradient is ``g_top = -(1 / p_top) sum_k p'_k g'_k``.
    """
    tiny = torch.finfo(torch.float64).tiny  # a probability that underflowed must not make A singular
    kept = probs.gather(1, classes).clamp_min(tiny)
    top = probs.max(1, keepdim=True).values  # >= 1 / C: dividing by it is safe
    return torch.diag_embed(kept) + kept[:, :, None] * kept[:, None, :] / top[:, :, None]


def _kept_classes(probs: torch.Tensor) -> torch.Tensor:
    """The pseudo-labels whose gradients carry ``G``: every class but the predicted one, int64 ``(N, C-1)``."""
    n, c = probs.shape
    everything = torch.arange(c).expand(n, c)
    return everything[everything != probs.argmax(1, keepdim=True)].view(n, c - 1)


def _label_coefficients(probs: torch.Tensor, classes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``b`` with ``g_{z,y} = b^T G'_z``: the label's own row, or ``-p' / p_top`` when the label is the predicted
    class (the one left out), float64 ``(N, C-1)``."""
    kept = probs.gather(1, classes)
    top = probs.max(1, keepdim=True).values
    own = (classes == labels[:, None]).double()
    return torch.where(own.sum(1, keepdim=True) > 0, own, -kept / top)


@dataclass
class _Factors:
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
        self.roots = torch.linalg.cholesky(_curvature_blocks(self.probabilities, self.classes))  # R R^T = A
        self.coefficients = _label_coefficients(self.probabilities, self.classes, self.labels)
        self._gradients64: Optional[torch.Tensor] = None  # the stored gradients as float64, if they fit ROWS_CACHE_BYTES

    @property
    def num_examples(self) -> int:
        return len(self.example_ids)

    @property
    def width(self) -> int:
        return self.class_gradients.shape[2]

    def rows_of(self, example_ids: torch.Tensor) -> torch.Tensor:
        return _rows_of(self._sorted, self._order, example_ids)

    def columns(self) -> Iterator[slice]:
        """Column blocks of the stored gradients whose float64 copy ``(N (C-1), block)`` fits in :data:`BLOCK_BYTES`."""
        rows = self.class_gradients.shape[0] * self.class_gradients.shape[1]
        step = max(1, BLOCK_BYTES // (8 * max(rows, 1)))
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

    def _flat64(self, columns: slice) -> torch.Tensor:
        """Columns of the stored gradients as float64 ``(N (C-1), len)``: from a float64 copy kept once when it fits
        :data:`ROWS_CACHE_BYTES`, else converted block by block."""
        n, c, width = self.class_gradients.shape
        if 8 * n * c * width <= ROWS_CACHE_BYTES:
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
        for columns in self.columns():
            out.addmm_(self._flat64(columns), x[columns].double())
        return torch.einsum("nce,nct->net", self.roots, out.view(n, c, -1)).reshape(n * c, -1) / math.sqrt(n)

    def transposed_products(self, y: torch.Tensor) -> torch.Tensor:
        """``U^T y`` for ``y`` float64 ``(m, T)``: float64 ``(D', T)``."""
        n, c, width = self.class_gradients.shape
        mixed = torch.einsum("nce,net->nct", self.roots, y.view(n, c, -1)).reshape(n * c, -1) / math.sqrt(n)
        out = torch.empty(y.shape[1], width, dtype=torch.float64)
        for columns in self.columns():
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
        gram = _mirror_lower(gram, step)
        gram = torch.einsum("nce,ncmd,mdf->nemf", self.roots, gram.view(n, c, n, c), self.roots)
        return gram.reshape(n * c, n * c) / n

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "example_ids": self.example_ids, "labels": self.labels, "probabilities": self.probabilities,
            "classes": self.classes, "class_gradients": self.class_gradients, "factor": self.factor,
        }


def _solve_system(factors: _Factors) -> torch.Tensor:
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


def _precondition(factors: _Factors, target_grads: torch.Tensor) -> torch.Tensor:
    """``(G + lambda I)^-1 g_t`` for every target, float64 ``(D', T)``."""
    g = target_grads.double().T  # (D', T)
    if factors.solver == "direct":
        return torch.cholesky_solve(g, factors.factor)
    solved = torch.cholesky_solve(factors.products(g), factors.factor)
    return (g - factors.transposed_products(solved)) / factors.damping


def _materialised_self_influence(factors: _Factors, target_grads: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``g_t(z)^T (G + lambda I)^-1 g_z / N`` of training rows ``rows`` whose target gradients are ``target_grads``
    ``(n, D')``, float64 ``(n,)``. In the Woodbury form ``(g_t . g_z - (U g_t)^T S^-1 (U g_z)) / lambda``: one
    pass over the stored gradients for both sides, never a ``(D', n)`` float64 matrix."""
    train = factors.train_gradients(rows, torch.float32)
    if factors.solver == "direct":
        v = _precondition(factors, target_grads)
        return (train.double() * v.T).sum(1) / factors.num_examples
    n = len(rows)
    projected = factors.products(torch.cat([target_grads.float(), train]).T)
    solved = torch.cholesky_solve(projected[:, n:], factors.factor)
    dots = torch.zeros(n, dtype=torch.float64)
    for columns in factors.columns():
        dots += (target_grads[:, columns].double() * train[:, columns].double()).sum(1)
    return (dots - (projected[:, :n] * solved).sum(0)) / (factors.damping * factors.num_examples)


# ---------------------------------------------------------------------------------------------------------------
# The factorised fit: tracked nn.Linear layers that see one row per example
# ---------------------------------------------------------------------------------------------------------------
class _NotFactorisable(Exception):
    """A batch in which a tracked Linear does not see one row per example (the reason is the message)."""


@dataclass
class _Layer:
    """A tracked ``nn.Linear``: its module name and which of its parameters are tracked."""

    name: str
    weight: bool = False
    bias: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "weight": self.weight, "bias": self.bias}


def _linear_layers(model: nn.Module, specs: Sequence[ParamSpec]) -> tuple[list[_Layer], Optional[str]]:
    """The tracked Linear layers, or ``[]`` and the reason (naming a parameter) the factorised path does not apply."""
    layers, reason = _tracked_linears(model, specs)
    return [_Layer(name, weight is not None, bias is not None) for name, (weight, bias) in layers.items()], reason


def _one_row_each(tensor: Any, n: int) -> Optional[torch.Tensor]:
    """``(n, features)`` from ``(n, features)`` or ``(n, 1, features)``; None for anything else."""
    if not isinstance(tensor, torch.Tensor):
        return None
    if tensor.dim() == 2 and tensor.shape[0] == n:
        return tensor
    if tensor.dim() == 3 and tensor.shape[0] == n and tensor.shape[1] == 1:
        return tensor[:, 0]
    return None


# Rows per block of a symmetric kernel: the lower triangle is built block row by block row, so about half of the
# products of a full Gram matrix are skipped (at least this many block rows, fewer rows if memory asks).
TRIANGLE_BLOCKS = 16
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


def _mirror_lower(matrix: torch.Tensor, step: int) -> torch.Tensor:
    """Copy the blocks below the diagonal blocks (row blocks of ``step``) to the upper side, in place: the full
    symmetric matrix of a kernel built with ``lower=True``."""
    for start in range(step, matrix.shape[0], step):
        stop = min(start + step, matrix.shape[0])
        matrix[:start, start:stop] = matrix[start:stop, :start].T
    return matrix


def _factor_kernel(left: Sequence[FactorPair], right: Sequence[FactorPair], lower: bool = False,
                   input_grams: Optional[Sequence[Optional[torch.Tensor]]] = None,
                   keep_grams: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """Inner products of factorised gradients, float64 ``(na ca, nb cb)`` (row ``(i, j)`` is ``i * ca + j``).

    Each side holds, per layer, output gradients ``(n, c, out)`` and inputs ``(n, in')``, float64: its gradient
    ``(i, j)`` is ``sum_l delta_{l,i,j} a_{l,i}^T``, so ``<g_a, g_b> = sum_l (delta_a . delta_b) (a_a . a_b)``. Rows
    of ``left`` are taken in blocks whose temporaries fit :data:`BLOCK_BYTES`. ``lower=True`` (``left`` is
    ``right``) fills only the row blocks' parts on and left of the diagonal (the rest is left unset; see
    :func:`_mirror_lower`): what a Cholesky factorisation reads, for about half the products.

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
class _FactorisedFit:
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
    layers: list[_Layer]
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
        self.roots = torch.linalg.cholesky(_curvature_blocks(self.probabilities, self.classes))  # R R^T = A
        self.coefficients = _label_coefficients(self.probabilities, self.classes, self.labels)
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
        return _rows_of(self._sorted, self._order, example_ids)

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
        self.system = _mirror_lower(system, c * _block_rows(n, c, n, c, True))

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
            self._input_grams = [None if g is None else _mirror_lower(g, step) for g in self._input_grams]
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


# ---------------------------------------------------------------------------------------------------------------
# The scorer
# ---------------------------------------------------------------------------------------------------------------
def _check_classifier_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise TurnoverError(
            f"the influence estimator covers classifiers with logits of shape (batch, classes >= 2); this model gave "
            f"{tuple(logits.shape)}. For language models use turn-over ensembles or HYDRA (estimator='turnover' or "
            "'hydra')."
        )


def _class_labels(batch: Mapping[str, Any]) -> torch.Tensor:
    for key in ("labels", "label"):
        if key in batch and batch[key] is not None:
            labels = torch.as_tensor(batch[key])
            if labels.dim() != 1 or labels.is_floating_point():
                raise TurnoverError(
                    f"the influence estimator needs one integer class label per training example, got {key!r} of "
                    f"shape {tuple(labels.shape)} and dtype {labels.dtype}."
                )
            return labels.long()
    raise TurnoverError("every training batch needs its labels (a 'labels' or 'label' entry) to fit influence functions.")


class InfluenceFunctionScorer:
    """Damped Gauss-Newton influence of (training id, target) pairs, with ``TurnoverScorer``'s interface.

    ``scores[i, j] = g_j^T (G + lambda I)^-1 g_i / N`` (see the module docstring): positive = training example ``i``
    lowers target ``j``'s loss. The fit (one pass over the training set, then one factorisation) runs once, on the
    first call or in :meth:`fit`, with a progress bar; it belongs to the weights the model has then. When every
    tracked parameter belongs to a ``torch.nn.Linear`` that sees one row per example (a head on pooled features),
    the fit is factorised (``method == "factorised"``: layer inputs and output gradients, ``N x N`` kernels, the
    same scores); otherwise it keeps ``N (C - 1)`` per-example gradients (``"materialised"``). :meth:`save` /
    :meth:`load` keep it (safetensors + JSON; loading refuses other weights).

    Args:
        model: a trained classifier (patched with turn-over dropout or not).
        train_data: the training set it was trained on: a ``datasets.Dataset`` with model inputs, labels and the
            id column (collated with ``data_collator``), or an iterable of collated batches with ``example_ids``.
        data_collator: collates dataset rows (wrapped in :class:`~turnover_hf.data.InstanceIdCollator`).
        parameters: names of the parameters to differentiate (default: those with ``requires_grad``).
        damping_factor: ``lambda = damping_factor x trace(G) / D``.
        projection_dim: sketch every gradient to this many coordinates with a CountSketch (None: exact).
        projection_seed: seed of the sketch.
        max_memory_gb: largest fit kept without a projection (a factorised fit counts its own, smaller size);
            beyond it the scorer asks for ``projection_dim``. Materialised scoring also keeps a float64 copy of the
            stored gradients when it takes at most :data:`ROWS_CACHE_BYTES` (1 GiB), which halves the time of every
            target set after the first (``benchmarks/influence_scoring.py``).
        solver: ``"auto"`` (the smaller space), ``"woodbury"`` (``N (C-1)``-space) or ``"direct"`` (parameters;
            materialised only).
        factorised: ``None`` (automatic: factorised when the model allows it, no projection, ``solver`` is not
            ``"direct"``, and, for ``solver="auto"`` with a known N, ``N (C - 1) <= D`` and its size fits
            ``max_memory_gb``), ``True`` (required: an ineligible model raises) or ``False`` (per-example
            gradients).
        batch_size: examples per gradient batch.
        id_column: the dataset's id column (default: the turn-over config's, else ``"example_id"``).
        show_progress: a tqdm bar while fitting.

    Example:
        >>> scorer = InfluenceFunctionScorer(model, train, data_collator=collator, projection_dim=4096)
        >>> scorer.fit().save("out/influence")
        >>> scorer.scores(targets, targets["labels"], example_ids=torch.arange(100))   # (100, n_targets)
    """

    path = "influence"

    def __init__(
        self,
        model: nn.Module,
        train_data: Optional[TrainData] = None,
        *,
        data_collator: Optional[Callable] = None,
        parameters: Optional[Sequence[str]] = None,
        damping_factor: float = 0.1,
        projection_dim: Optional[int] = None,
        projection_seed: int = 0,
        max_memory_gb: float = 4.0,
        solver: str = "auto",
        factorised: Optional[bool] = None,
        batch_size: int = 64,
        id_column: Optional[str] = None,
        show_progress: bool = True,
    ) -> None:
        if is_causal_lm(model):
            raise TurnoverError(
                f"the influence estimator covers classifiers, and {type(model).__name__} is a causal language model. "
                "Use an ensemble of turn-over models (turnover_hf.train_ensemble, estimator='turnover') or HYDRA "
                "(estimator='hydra') for language models."
            )
        if solver not in SOLVERS:
            raise TurnoverError(f"solver must be one of {SOLVERS}, got {solver!r}.")
        if not float(damping_factor) > 0:
            raise TurnoverError(f"damping_factor must be positive (0.1 is the default), got {damping_factor!r}.")
        if factorised not in (None, True, False):
            raise TurnoverError(f"factorised must be None (automatic), True or False, got {factorised!r}.")
        self.model = model
        self.specs = _specs_for(model, parameters)
        self.num_parameters = self.specs[-1].offset + self.specs[-1].numel
        self.grads = PerExampleGrads(model, self.specs)
        self.device = next(model.parameters()).device
        self.patched = is_patched(model)
        self.id_column = id_column or (state_of(model).config.id_column if self.patched else "example_id")
        self.damping_factor = float(damping_factor)
        self.sketch = CountSketch(self.specs, projection_dim, projection_seed) if projection_dim is not None else None
        self.projection_seed = int(projection_seed)
        self.max_memory_gb = float(max_memory_gb)
        self.solver = solver
        self.factorised = factorised
        self._layers, self._ineligible = _linear_layers(model, self.specs)
        if factorised:
            reason = self._ineligible or ("it sketches gradients (projection_dim)" if self.sketch is not None else None)
            reason = reason or ("solver='direct' works in parameter space" if solver == "direct" else None)
            if reason:
                raise TurnoverError(
                    "factorised=True needs every tracked parameter to be the weight or bias of a torch.nn.Linear "
                    f"that sees one row per example, no projection and solver 'auto' or 'woodbury'; here {reason}. "
                    "Pass factorised=None (automatic) or False (per-example gradients)."
                )
        self.batch_size = max(1, int(batch_size))
        self.train_data = train_data
        self.data_collator = data_collator
        self.show_progress = show_progress
        self.factors: Optional[Union[_Factors, _FactorisedFit]] = None
        # the last target set's (G + lambda I)^-1 g_t (materialised) or its kernels with the training factors
        self._preconditioned: Optional[tuple[str, Any]] = None

    # -- fitting ----------------------------------------------------------------------------------------------
    @property
    def projection_dim(self) -> Optional[int]:
        return self.sketch.dim if self.sketch is not None else None

    @property
    def width(self) -> int:
        """Coordinates of every stored gradient: ``D``, or the sketch's dimension."""
        return self.sketch.dim if self.sketch is not None else self.num_parameters

    @property
    def method(self) -> Optional[str]:
        """How the fit is kept: ``"factorised"`` (layer inputs and output gradients) or ``"materialised"``
        (per-example gradients); None before fitting."""
        return None if self.factors is None else self.factors.method

    def _batches(self, data: TrainData) -> tuple[Iterable[Mapping[str, Any]], Optional[int], Optional[int]]:
        """Collated training batches, the number of examples (if known) and the number of batches (if known)."""
        if isinstance(data, Dataset):
            check_id_column(data, self.id_column)
            collate = InstanceIdCollator(self.data_collator or default_data_collator, self.id_column)
            starts = range(0, len(data), self.batch_size)
            rows = (collate([data[i] for i in range(s, min(s + self.batch_size, len(data)))]) for s in starts)
            return rows, len(data), len(starts)
        if isinstance(data, Sequence):
            return data, sum(len(torch.as_tensor(b[BATCH_KEY])) for b in data if b.get(BATCH_KEY) is not None), len(data)
        return data, None, None

    def _training_masks(self, example_ids: torch.Tensor) -> ContextManager:
        """The context each training example was trained under: its own mask, or nothing for a plain model."""
        return instance_masks(self.model, example_ids, mode="train") if self.patched else contextlib.nullcontext()

    def fit_memory_gb(self, num_examples: int, num_classes: int) -> float:
        """About how many GB fitting on ``num_examples`` examples of a ``num_classes``-way task keeps (the
        factorised size when the model qualifies for it and it is smaller); compare with ``max_memory_gb``.

        Example:
            >>> scorer = InfluenceFunctionScorer(model)
            >>> scorer.fit_memory_gb(len(train), model.config.num_labels) <= scorer.max_memory_gb
            True
        """
        kept = max(1, int(num_classes) - 1)
        needed = self._materialised_gb(num_examples, kept)
        if self._factorisable() and (self.solver != "auto" or num_examples * kept <= self.num_parameters):
            modules = dict(self.model.named_modules())
            per_example = sum(modules[layer.name].in_features * layer.weight + layer.bias
                              + kept * modules[layer.name].out_features for layer in self._layers)
            needed = min(needed, self._factorised_gb(num_examples, kept, per_example))
        return needed

    def _materialised_gb(self, examples: int, kept_classes: int) -> float:
        rows = examples * kept_classes
        side = min(rows, self.width) if self.solver == "auto" else (rows if self.solver == "woodbury" else self.width)
        return (rows * self.width * 4 + side * side * 8) / 2**30

    def _check_budget(self, examples: int, kept_classes: int) -> None:
        rows = examples * kept_classes
        side = min(rows, self.width) if self.solver == "auto" else (rows if self.solver == "woodbury" else self.width)
        needed = self._materialised_gb(examples, kept_classes)
        if needed > self.max_memory_gb:
            what = f"{examples} examples x {kept_classes} class gradient(s) x {self.width} coordinates"
            raise TurnoverError(
                f"fitting the influence function needs about {needed:.1f} GB ({what} as float32, plus a "
                f"{side} x {side} factor), above max_memory_gb={self.max_memory_gb:g}. Pass projection_dim=4096 (a "
                "CountSketch of every gradient: an approximation whose error shrinks as it grows), select fewer "
                "parameters=[...], or raise max_memory_gb."
            )

    @staticmethod
    def _factorised_gb(examples: int, kept_classes: int, per_example: int) -> float:
        """Memory budgeted for a factorised fit: float32 factors, three float64 ``m x m`` and two ``m x N`` matrices
        (the budget of the fit that kept ``U G`` and ``S^-1 U G``; the fit now keeps ``S``, its float32 and float64
        factors and ``S^-1`` instead, and the input Gram matrices within :data:`INPUT_GRAMS_BYTES`)."""
        rows = examples * kept_classes
        return (examples * per_example * 4 + (3 * rows * rows + 2 * rows * examples) * 8) / 2**30

    def _check_factorised_budget(self, examples: int, kept_classes: int, per_example: int) -> None:
        needed = self._factorised_gb(examples, kept_classes, per_example)
        if needed > self.max_memory_gb:
            rows = examples * kept_classes
            raise TurnoverError(
                f"fitting the influence function (factorised) needs about {needed:.1f} GB ({examples} examples x "
                f"{per_example} layer inputs and output gradients as float32, plus {rows} x {rows} float64 kernels), "
                f"above max_memory_gb={self.max_memory_gb:g}. Pass factorised=False (per-example gradients, solved "
                "in parameter space when that is smaller), projection_dim=4096 (a CountSketch: an approximation), or "
                "raise max_memory_gb."
            )

    def fit(self, train_data: Optional[TrainData] = None) -> "InfluenceFunctionScorer":
        """One pass over the training set (gradients under the training masks), then the factor.

        Factorised when the model allows it (see the class docstring); a batch that breaks the factorisation
        (a tracked Linear that sees several rows per example, or runs twice) sends an automatic fit back to
        per-example gradients (re-reading the data) or, with ``factorised=True`` or one-pass data, raises.

        Example:
            >>> scorer = InfluenceFunctionScorer(model, projection_dim=4096).fit(train_batches)
        """
        data = train_data if train_data is not None else self.train_data
        if data is None:
            raise TurnoverError(
                "the influence function is fitted on the training set: pass train_data=... (a datasets.Dataset with "
                f"model inputs, labels and the {self.id_column!r} column, or collated batches with example_ids)."
            )
        factors: Optional[Union[_Factors, _FactorisedFit]] = None
        if self._factorisable():
            try:
                factors = self._fit_factorised(data)
            except _NotFactorisable as err:
                if self.factorised or not isinstance(data, (Dataset, Sequence)):
                    raise TurnoverError(
                        f"the factorised influence fit does not apply to this model: {err}. Fit with "
                        "factorised=False (per-example gradients)."
                    ) from None
                logger.info("influence function: %s; fitting with per-example gradients instead.", err)
        if factors is None:
            factors = self._fit_materialised(data)
        self.factors = factors
        self._preconditioned = None
        self._fit_identity = self._identity()
        return self._attached()

    def _identity(self) -> dict[str, Optional[str]]:
        """What the fit belongs to: these weights, and the training set recorded on the model (if any)."""
        record = state_of(self.model).training_set if self.patched else None
        return {"weights_fingerprint": self._weights_fingerprint(),
                "training_set_fingerprint": None if record is None else record.fingerprint}

    def _factorisable(self) -> bool:
        return (self.factorised is not False and self._ineligible is None and self.sketch is None
                and self.solver != "direct")

    def _training_batches(self, data: TrainData) -> Iterator[tuple[Mapping[str, Any], torch.Tensor, torch.Tensor, Optional[int]]]:
        """``(batch, example ids, labels, N if known)`` of every training batch, with a progress bar."""
        batches, expected, total = self._batches(data)
        for batch in tqdm(batches, total=total, desc="influence function: training gradients", unit="batch",
                          disable=not self.show_progress):
            if batch.get(BATCH_KEY) is None:
                raise MissingExampleIdsError(
                    "a training batch has no example_ids: fit on a dataset with its id column "
                    "(turnover_hf.add_example_ids) or on batches collated by turnover_hf.InstanceIdCollator."
                )
            yield batch, torch.as_tensor(batch[BATCH_KEY]).to(torch.int64).cpu(), _class_labels(batch), expected

    def _fit_materialised(self, data: TrainData) -> _Factors:
        """Per-example gradients of every kept class (``N (C - 1) x D'``), then the factor."""
        ids, labels, probs, classes, grads = [], [], [], [], []
        trace, seen = 0.0, 0
        for batch, batch_ids, batch_labels, expected in self._training_batches(data):
            inputs = model_inputs(batch, self.device)
            probabilities: list[torch.Tensor] = []  # under the training masks, from the forward that serves the grads

            def kept_of(logits: torch.Tensor) -> torch.Tensor:
                _check_classifier_logits(logits)
                probabilities.append(torch.softmax(logits.double(), -1).cpu())
                if seen == 0:
                    self._check_budget(expected or len(logits), logits.shape[1] - 1)
                return _kept_classes(probabilities[-1]).to(logits.device)

            def row_context(k: int, ids: torch.Tensor = batch_ids) -> ContextManager:
                return instance_masks(self.model, ids[k : k + 1], mode="train")

            # one forward and a backward per kept class when the tracked Linears allow it; else a forward for the
            # probabilities, then every (example, kept class) as a row of its own
            both = self.grads.pseudo_label_gradients(inputs, kept_of, row_context if self.patched else None,
                                                     self._training_masks(batch_ids) if self.patched else None)
            if both is not None:
                g = both[1]
            else:
                with torch.no_grad(), _eval_mode(self.model), self._training_masks(batch_ids):
                    pseudo_labels = kept_of(_logits(self.model(**inputs)))
                per = pseudo_labels.shape[1]
                repeated = {k: v.repeat_interleave(per, 0) for k, v in inputs.items()}
                masks = self._training_masks(batch_ids.repeat_interleave(per)) if self.patched else None
                g = self.grads(repeated, pseudo_labels.reshape(-1),
                               (lambda k: row_context(k // per)) if self.patched else None, masks)
            p = probabilities[-1]
            kept = _kept_classes(p)
            n, c = p.shape
            seen += n
            self._check_budget(seen, c - 1)
            g = g.view(n, c - 1, -1)
            gram = torch.einsum("ncd,ned->nce", g.double(), g.double()).cpu()
            trace += float((_curvature_blocks(p, kept) * gram).sum())
            if self.sketch is not None:
                g = self.sketch(g.reshape(n * (c - 1), -1)).view(n, c - 1, -1)
            ids.append(batch_ids)
            labels.append(batch_labels.cpu())
            probs.append(p)
            classes.append(kept)
            grads.append(g.float().cpu())
        if not ids:
            raise TurnoverError("the training data is empty: nothing to fit the influence function on.")
        example_ids = check_ids_known(torch.cat(ids), None)
        n = len(example_ids)
        trace /= n
        rows = n * (grads[0].shape[1])
        solver = self.solver if self.solver != "auto" else ("woodbury" if rows <= self.width else "direct")
        factors = _Factors(example_ids, torch.cat(labels), torch.cat(probs), torch.cat(classes), torch.cat(grads),
                           torch.empty(0), solver, self.damping_factor * trace / self.num_parameters, trace)
        self._check_damping(factors.damping)
        factors.factor = _solve_system(factors)
        return factors

    @staticmethod
    def _check_damping(damping: float) -> None:
        if not damping > 0:
            raise TurnoverError(
                "the Gauss-Newton matrix is zero (every training gradient vanished): nothing to invert. Check that "
                "the tracked parameters are the ones training changed."
            )

    def _linear_forward(self, inputs: Mapping[str, torch.Tensor], context: ContextManager
                        ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Logits (with their graph), each tracked Linear's raw output and its input rows ``(B, in)``, from one
        forward in eval mode under ``context`` (calls recorded by :func:`~turnover_hf.hydra._linear_calls`)."""
        names = [layer.name for layer in self._layers]
        with torch.enable_grad(), _eval_mode(self.model), _linear_calls(self.model, names) as recorded, context:
            logits = _logits(self.model(**inputs))
        calls = [recorded[name] for name in names]
        _check_classifier_logits(logits)
        n = logits.shape[0]
        outputs, rows = [], []
        for layer, seen in zip(self._layers, calls):
            if len(seen) != 1:
                raise _NotFactorisable(f"the Linear {layer.name!r} ran {len(seen)} time(s) in one forward (not once)")
            x, out = seen[0]
            x_rows, out_rows = _one_row_each(x, n), _one_row_each(out, n)
            if x_rows is None or out_rows is None:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise _NotFactorisable(
                    f"the Linear {layer.name!r} sees an input of shape {shape} for a batch of {n}: the factorised "
                    "gradients need one row per example (batch, features)"
                )
            outputs.append(out)
            rows.append(x_rows.detach())
        return logits, outputs, rows

    def _layer_inputs(self, rows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each layer's ``a``: its input rows if the weight is tracked, then a column of ones if the bias is, float32."""
        out = []
        for layer, x in zip(self._layers, rows):
            parts = [x.float()] if layer.weight else []
            if layer.bias:
                parts.append(torch.ones(len(x), 1, dtype=torch.float32, device=x.device))
            out.append(torch.cat(parts, 1).cpu())
        return out

    def _output_gradients(self, logits: torch.Tensor, outputs: Sequence[torch.Tensor], rows: Sequence[torch.Tensor],
                          classes: torch.Tensor, check: bool) -> list[torch.Tensor]:
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
                per_layer[i].append(_one_row_each(torch.zeros_like(out) if g is None else g, n).detach().float())
        if check:
            named = dict(self.model.named_parameters())
            tracked = [(i, leaf, f"{layer.name}.{leaf}") for i, layer in enumerate(self._layers)
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
                        raise _NotFactorisable(
                            f"the gradient of {name!r} is not the product of its Linear's input and output gradients "
                            "(is the parameter also used outside that module?)"
                        )
        return [torch.stack(parts, 1).cpu() for parts in per_layer]

    def _fit_factorised(self, data: TrainData) -> Optional[_FactorisedFit]:
        """Layer inputs and output gradients of every kept class, then the class kernel and the factor of ``S``.

        Returns None when an automatic fit is better kept materialised (decided on the first batch, with N known)."""
        ids, labels, probs, classes = [], [], [], []
        deltas: list[list[torch.Tensor]] = [[] for _ in self._layers]
        inputs: list[list[torch.Tensor]] = [[] for _ in self._layers]
        trace, seen = 0.0, 0
        for batch, batch_ids, batch_labels, expected in self._training_batches(data):
            logits, outputs, rows = self._linear_forward(model_inputs(batch, self.device), self._training_masks(batch_ids))
            p = torch.softmax(logits.detach().double(), -1).cpu()
            n, c = p.shape
            a = self._layer_inputs(rows)
            per_example = sum(x.shape[1] for x in a) + (c - 1) * sum(out.shape[-1] for out in outputs)
            first = seen == 0
            if first and self.factorised is None and expected is not None:
                smaller = self.solver != "auto" or expected * (c - 1) <= self.num_parameters
                if not smaller or self._factorised_gb(expected, c - 1, per_example) > self.max_memory_gb:
                    return None
            if first:
                self._check_factorised_budget(expected or n, c - 1, per_example)
            seen += n
            self._check_factorised_budget(seen, c - 1, per_example)
            kept = _kept_classes(p)
            d = self._output_gradients(logits, outputs, rows, kept, check=first)
            del logits, outputs
            gram = sum(torch.einsum("njo,nko->njk", dl.double(), dl.double()) * (xl.double() ** 2).sum(1)[:, None, None]
                       for dl, xl in zip(d, a))
            trace += float((_curvature_blocks(p, kept) * gram).sum())
            ids.append(batch_ids)
            labels.append(batch_labels.cpu())
            probs.append(p)
            classes.append(kept)
            for i in range(len(self._layers)):
                deltas[i].append(d[i])
                inputs[i].append(a[i])
        if not ids:
            raise TurnoverError("the training data is empty: nothing to fit the influence function on.")
        example_ids = check_ids_known(torch.cat(ids), None)
        trace /= len(example_ids)
        damping = self.damping_factor * trace / self.num_parameters
        self._check_damping(damping)
        fit = _FactorisedFit(example_ids, torch.cat(labels), torch.cat(probs), torch.cat(classes), list(self._layers),
                             [torch.cat(x) for x in deltas], [torch.cat(x) for x in inputs], torch.empty(0), damping, trace)
        fit.build_system()
        return fit

    def _fitted(self) -> Union[_Factors, _FactorisedFit]:
        if self.factors is None:
            self.fit()
        return self.factors

    # -- scoring ----------------------------------------------------------------------------------------------
    @property
    def known_ids(self) -> torch.Tensor:
        """The ids of the training examples the influence function was fitted on."""
        return self._fitted().example_ids

    def target_grads(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Gradient of each target's loss (eval mode, full network), sketched if projecting, float32 ``(T, D')``."""
        labels = _target_labels(labels)
        g = _target_gradients(self.grads, targets, labels, self.batch_size)
        return (self.sketch(g) if self.sketch is not None else g).cpu()

    def _target_factors(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer, the targets' output gradients ``(T, 1, out)`` and inputs ``(T, in')`` (eval, full network)."""
        labels = _target_labels(labels)
        inputs = model_inputs(targets, self.device)
        deltas: list[list[torch.Tensor]] = [[] for _ in self._layers]
        rows: list[list[torch.Tensor]] = [[] for _ in self._layers]
        for start in range(0, len(labels), self.batch_size):
            part = slice(start, start + self.batch_size)
            try:
                logits, outputs, x = self._linear_forward({k: v[part] for k, v in inputs.items()}, contextlib.nullcontext())
            except _NotFactorisable as err:
                raise TurnoverError(
                    f"these targets cannot be scored with the factorised fit: {err}. Fit with factorised=False."
                ) from None
            d = self._output_gradients(logits, outputs, x, labels[part, None], check=False)
            for i, (dl, al) in enumerate(zip(d, self._layer_inputs(x))):
                deltas[i].append(dl)
                rows[i].append(al)
        return [torch.cat(x) for x in deltas], [torch.cat(x) for x in rows]

    def _projected(self, factors: _FactorisedFit, targets: Mapping[str, torch.Tensor], labels: torch.Tensor,
                   rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``U g_t`` of the targets, float64 ``(m, T)``; ``rows``: the training rows the targets are (self-influence),
        whose kept input Gram matrices serve the layers no mask changes."""
        deltas, inputs = self._target_factors(targets, labels)
        grams = factors.input_grams(rows, inputs) if rows is not None else None
        return factors.curvature_products(deltas, inputs, grams)

    def preconditioned(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """``(G + lambda I)^-1 g_t`` of every target, float64 ``(D', T)``; the last target set's is kept
        (materialised fits only)."""
        factors = self._fitted()
        if factors.method == "factorised":
            raise TurnoverError("a factorised fit never forms parameter-space vectors; use scores(...), or fit with "
                                "factorised=False for preconditioned(...).")
        return self._per_target_set(targets, labels, lambda: _precondition(factors, self.target_grads(targets, labels)))

    def _per_target_set(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor, build: Callable[[], Any]) -> Any:
        """``build()`` for this target set, kept until another set comes (chunks of ids share one target set)."""
        key = fingerprint({k: v for k, v in targets.items() if isinstance(v, torch.Tensor)}, torch.as_tensor(labels))
        if self._preconditioned is None or self._preconditioned[0] != key:
            self._preconditioned = (key, build())
        return self._preconditioned[1]

    def _rows(self, example_ids: torch.Tensor) -> torch.Tensor:
        factors = self._fitted()
        return factors.rows_of(check_ids_known(torch.as_tensor(example_ids).cpu(), factors.example_ids))

    def scores(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        """Influence of each id on each target, float32 ``(n_ids, n_targets)`` on the CPU (positive = helped)."""
        rows = self._rows(example_ids)
        factors = self._fitted()
        if factors.method == "factorised":
            solved = self._per_target_set(targets, labels,
                                          lambda: factors.solve(self._projected(factors, targets, labels)))
            return factors.influence(solved, rows).float()
        v = self.preconditioned(targets, labels)
        return (factors.train_gradients(rows) @ v / factors.num_examples).float()

    def self_scores(self, batch: Mapping[str, torch.Tensor], labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        """Self-influence ``g_z(full network)^T (G + lambda I)^-1 g_z / N`` of each training row, float32 ``(n,)``."""
        rows = self._rows(example_ids)
        factors = self._fitted()
        if factors.method == "factorised":
            return factors.self_influence(self._projected(factors, batch, labels, rows), rows).float()
        return _materialised_self_influence(factors, self.target_grads(batch, labels), rows).float()

    def self_scores_many(self, batches: Sequence[tuple[Mapping[str, torch.Tensor], torch.Tensor, torch.Tensor]]
                         ) -> torch.Tensor:
        """:meth:`self_scores` of several ``(batch, labels, example_ids)`` at once, float32 ``(sum n,)``: gradients
        are taken batch by batch and a materialised fit's stored gradients are read once for all of them (that
        pass, not the rows, is what a call costs there).

        Example:
            >>> scorer.self_scores_many([(b, b["labels"], b["example_ids"]) for b in batches])
        """
        factors = self._fitted()
        if factors.method == "factorised" or not batches:
            return torch.cat([self.self_scores(*item) for item in batches]) if batches else torch.zeros(0)
        out, grads, rows, held = [], [], [], 0
        for k, (batch, labels, ids) in enumerate(batches):
            grads.append(self.target_grads(batch, labels))
            rows.append(self._rows(ids))
            held += len(rows[-1])
            if k == len(batches) - 1 or 12 * held * factors.width > SELF_INFLUENCE_GROUP_BYTES:
                out.append(_materialised_self_influence(factors, torch.cat(grads), torch.cat(rows)).float())
                grads, rows, held = [], [], 0
        return torch.cat(out)

    # -- files ------------------------------------------------------------------------------------------------
    def _turnover_config(self) -> Optional[dict[str, Any]]:
        if not self.patched:
            return None
        config = state_of(self.model).config.to_dict()
        return {name: config[name] for name in MASK_FIELDS}  # what decides the training masks

    def _weights_fingerprint(self) -> str:
        return fingerprint({n: p.detach() for n, p in self.model.named_parameters()})

    def save(self, folder: PathLike) -> None:
        """Write the fit to ``folder`` (``influence_factors.safetensors`` + ``influence.json``, atomically, the JSON
        last); fits first if needed.

        Example:
            >>> scorer.save("out/model/influence")     # InfluencePipeline("out/model", ..., estimator="influence")
        """
        factors = self._fitted()
        identity = getattr(self, "_fit_identity", None) or self._identity()
        if identity["weights_fingerprint"] != self._weights_fingerprint():
            raise StaleFitError(
                "the model's weights changed since this influence function was fitted (further training?); saving it "
                "would label an old fit with the new weights. Fit again: scorer.fit(train_data), then save."
            )
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        with atomic_path(os.path.join(folder, FACTORS_NAME)) as tmp:
            save_file({k: v.contiguous() for k, v in factors.tensors().items()}, tmp)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "score": "g_t^T (G + lambda I)^-1 g_z / N, G the Gauss-Newton matrix of the training loss",
            "method": factors.method,
            "parameters": [{"name": s.name, "shape": list(s.shape)} for s in self.specs],
            "num_parameters": self.num_parameters,
            "projection_dim": self.projection_dim,
            "projection_seed": self.projection_seed,
            "damping_factor": self.damping_factor,
            "damping": factors.damping,
            "trace": factors.trace,
            "solver": factors.solver,
            "num_examples": factors.num_examples,
            "num_classes": int(factors.probabilities.shape[1]),
            "id_column": self.id_column,
            "turnover_config": self._turnover_config(),
            **identity,
        }
        if factors.method == "factorised":
            meta["layers"] = [layer.as_dict() for layer in factors.layers]
        atomic_write_text(os.path.join(folder, META_NAME), json.dumps(meta, indent=2) + "\n")

    @staticmethod
    def read_meta(folder: PathLike) -> dict[str, Any]:
        """The metadata of a saved fit (``influence.json``), checked to be this format (version 3; 2: a factorised
        fit saved with its Cholesky factor; 1: a materialised fit written before ``method`` existed)."""
        try:
            return _read_meta(folder, META_NAME, FORMAT, FORMAT_VERSION, "fitted influence function")
        except ConfigMismatchError as err:
            for version in (2, 1):
                try:
                    meta = _read_meta(folder, META_NAME, FORMAT, version, "fitted influence function")
                except ConfigMismatchError:
                    continue
                return meta if version == 2 else {**meta, "method": "materialised"}
            raise err from None

    @classmethod
    def load(cls, model: nn.Module, folder: PathLike, **kwargs: Any) -> "InfluenceFunctionScorer":
        """A scorer with the fit saved in ``folder``; refuses a model whose weights (or masks) differ from the fit's.

        ``kwargs`` are runtime options (``batch_size``, ``show_progress``, ``train_data``, ``data_collator``); a
        ``factorised`` that contradicts the saved fit's method is refused.

        Example:
            >>> scorer = InfluenceFunctionScorer.load(model, "out/influence")
        """
        meta = cls.read_meta(folder)
        method = meta["method"]
        if method not in METHODS:
            raise ConfigMismatchError(f"{os.fspath(folder)!r} holds an influence fit of unknown method {method!r}.")
        factorised = method == "factorised"
        wanted = kwargs.pop("factorised", None)
        if wanted is not None and bool(wanted) != factorised:
            raise ConfigMismatchError(
                f"{os.fspath(folder)!r} holds a {method} influence fit, and factorised={wanted} asks for the other "
                "method. Drop factorised=..., or fit again in another folder."
            )
        names = [p["name"] for p in meta["parameters"]]
        named = dict(model.named_parameters())
        bad = [p["name"] for p in meta["parameters"] if p["name"] not in named or list(named[p["name"]].shape) != p["shape"]]
        if bad:
            raise ConfigMismatchError(
                f"the model lacks the parameters {bad[:5]} of the saved influence function (or their shapes differ): "
                "load it with the model it was fitted on."
            )
        scorer = cls(model, parameters=names, damping_factor=meta["damping_factor"], projection_dim=meta["projection_dim"],
                     projection_seed=meta["projection_seed"], solver=meta["solver"], id_column=meta["id_column"],
                     max_memory_gb=math.inf, **kwargs)
        if scorer._turnover_config() != meta.get("turnover_config"):
            raise ConfigMismatchError(
                f"the influence function in {os.fspath(folder)!r} was fitted on a model with turn-over config "
                f"{meta.get('turnover_config')}, this one has {scorer._turnover_config()}: the training gradients "
                "depend on the masks. Fit again with this model."
            )
        if scorer._weights_fingerprint() != meta["weights_fingerprint"]:
            raise StaleFitError(
                f"the model's weights differ from those the influence function in {os.fspath(folder)!r} was fitted "
                "on; its factors would belong to another model. Fit again: InfluenceFunctionScorer(model, "
                "train_data).fit().save(folder) (in another folder)."
            )
        record = state_of(model).training_set if scorer.patched else None
        fitted_on = meta.get("training_set_fingerprint")
        if record is not None and fitted_on is not None and fitted_on != record.fingerprint:
            raise StaleFitError(
                f"the influence function in {os.fspath(folder)!r} was fitted on another training set (fingerprint "
                f"{fitted_on[:12]}) than the model was trained on ({record.fingerprint[:12]}). Fit again on the "
                "model's training set."
            )
        scorer._fit_identity = {"weights_fingerprint": meta["weights_fingerprint"], "training_set_fingerprint": fitted_on}
        tensors = load_file(os.path.join(os.fspath(folder), FACTORS_NAME))
        if factorised:
            scorer.factors = scorer._loaded_factorised(meta, tensors)
            return scorer._attached()
        scorer.factors = _Factors(
            tensors["example_ids"], tensors["labels"], tensors["probabilities"], tensors["classes"],
            tensors["class_gradients"], tensors["factor"], meta["solver"], float(meta["damping"]), float(meta["trace"]),
        )
        if scorer.factors.width != scorer.width:
            raise ConfigMismatchError(
                f"{FACTORS_NAME} holds gradients of {scorer.factors.width} coordinates, the metadata says {scorer.width}."
            )
        return scorer._attached()

    def _attached(self) -> "InfluenceFunctionScorer":
        """This fit, recorded on the patched model so that its save_pretrained / push_to_hub carry it."""
        if self.patched:
            state_of(self.model).influence = self
        return self

    def _loaded_factorised(self, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> _FactorisedFit:
        """The factorised fit of a saved folder, checked against this model's tracked Linear layers."""
        layers = [_Layer(**layer) for layer in meta.get("layers", [])]
        if layers != self._layers:
            here = self._ineligible or f"it tracks {[x.as_dict() for x in self._layers]}"
            raise ConfigMismatchError(
                f"the saved factorised influence fit covers the Linear layers {[x.as_dict() for x in layers]}; in this "
                f"model {here}. Fit again with this model."
            )
        modules = dict(self.model.named_modules())
        deltas = [tensors[f"deltas.{i}"] for i in range(len(layers))]
        inputs = [tensors[f"inputs.{i}"] for i in range(len(layers))]
        n = len(tensors["example_ids"])
        for layer, delta, x in zip(layers, deltas, inputs):
            module = modules[layer.name]
            width = (module.in_features if layer.weight else 0) + int(layer.bias)
            if delta.shape[0] != n or x.shape != (n, width) or delta.shape[2] != module.out_features:
                raise ConfigMismatchError(
                    f"{FACTORS_NAME} holds factors of shapes {tuple(delta.shape)} and {tuple(x.shape)} for "
                    f"{layer.name!r}, which does not match the layer or the {n} examples."
                )
        # version 3 keeps S; a version-2 folder holds its factor instead
        return _FactorisedFit(tensors["example_ids"], tensors["labels"], tensors["probabilities"], tensors["classes"],
                              layers, deltas, inputs, tensors.get("factor", torch.empty(0)), float(meta["damping"]),
                              float(meta["trace"]), system=tensors.get("system"))


def _target_labels(labels: torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.is_floating_point():
        raise TurnoverError(f"targets need one integer class label each, got labels of shape {tuple(labels.shape)}.")
    return labels
