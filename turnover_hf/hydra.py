"""HYDRA (Chen et al., 2021): influence from hypergradients tracked along the whole training trajectory.

The second estimator of turnover-hf, beside turn-over dropout. While an ordinary ``transformers.Trainer`` trains,
:class:`HydraTracker` keeps, for every training example ``i`` and a subset of parameters ``w`` (default: the
parameters with ``requires_grad``, e.g. adapters and head), the hypergradient

    h_i = d w_T / d delta_i,

where ``delta_i`` scales example ``i``'s term in every training loss it enters: the step loss is
``sum_k a_k (1 + delta_k) loss_k(w)`` with ``a_k`` the weight the Trainer gives example ``k`` (``1 / B`` for a mean
over an effective batch of ``B``). ``delta_i = -1`` removes the example, so the first-order change of a target's
loss when ``i`` is left out is

    score(i, j) = -grad_w loss_j(w_T) . h_i  ~=  loss_j(trained without i) - loss_j(trained with i).

This is the paper's contribution ``C(i, j) = -(1/N) grad loss_j(w_T) . nabla_{T,i}`` (Eq. 8-9): with weights
``1/N + eps_i`` and mini-batches of ``B``, the paper's ``nabla_{T,i} = d w_T / d eps_i`` equals ``N h_i``, so the
``1/N`` cancels. Positive scores mean the example helped the target (lowered its loss), as in turn-over scores.

The recurrence follows the optimizer actually used, step by step (Algorithm 1, Eq. 10-12), with the Hessian term
dropped (the paper's fast approximation) unless ``hessian=True``:

* ``torch.optim.SGD`` (momentum ``mu``, dampening ``tau``, Nesterov, weight decay ``lam``), exactly:
  ``dd_i = lam h_i + c_i [+ H h_i]``, ``m_i <- mu m_i + (1 - tau) dd_i`` (first step: ``m_i = dd_i``),
  ``h_i <- h_i - lr (m_i or dd_i + mu m_i)``, where ``c_i = s a_i g_i`` is example ``i``'s share of this step's
  gradient (zero when it is not in the step) and ``s`` the gradient-clipping factor of the step.
* ``torch.optim.Adam`` / ``AdamW``: an approximation, documented here. The update is treated as preconditioned SGD
  with momentum whose preconditioner ``1 / (sqrt(v_hat_t) + eps)`` is held fixed (its dependence on ``delta_i``
  through ``g^2`` is ignored): ``m_i <- beta1 m_i + (1 - beta1)(c_i [+ H h_i] + lam_coupled h_i)``,
  ``h_i <- (1 - lr lam_decoupled) h_i - lr / (1 - beta1^t) * m_i / (sqrt(v_t / (1 - beta2^t)) + eps)``.

The clipping factor ``s`` is likewise held fixed. Both choices leave the tracked quantity linear in the
per-example gradients, which is what makes N of them affordable.

Per-example gradients are taken in eval mode (without dropout) with ``turnover_hf.per_example_loss``; the weights
``a_i`` are read off each micro-batch's actual gradient, so gradient accumulation and the Trainer's loss scaling are
followed as they are.

Cost. Per optimizer step, the per-example gradients of the step's examples (``torch.func`` ``vmap(grad)``, or a
forward and backward per example for models whose forward ``vmap`` cannot trace, which includes the Hugging Face
transformers) and an update of their rows only: examples outside the step change through one linear map shared by
all of them (momentum and weight decay), kept as a per-coordinate 2x2 matrix and applied to the whole table only
when it becomes ill-conditioned (never for plain SGD; every ~44 steps for momentum 0.9). Memory is ``N x |w|``
float32 (twice that while training with momentum or Adam), in memory or memory-mapped from disk. ``save_model``
and every Trainer checkpoint write the table to ``<folder>/hydra``, where ``InfluencePipeline(estimator="hydra")``
looks for it.

Lean mode (``hydra_mode="lean"``, SGD family only) for large N: training runs plainly; then, for one target set,
:meth:`HydraTrainingMixin.hydra_lean_scores` takes the target gradients ``G`` (Q x D) at ``w_T``, replays the same
run from the same start (weights, optimizer, scheduler, random states) and projects every per-example gradient
onto ``G`` before it enters the recurrence. The SGD map of a step is the same for all coordinates of a parameter
group, so the projections follow it exactly (:class:`ProjectedHypergradients`): memory ``N x Q`` per group (twice
with momentum) instead of ``N x |w|``, for one more training run with per-example gradients. The replayed final
weights must equal the trained ones bit for bit, or the scores are refused. Adam's per-coordinate preconditioner
does not commute with the projection and is refused.

Example:
    >>> trainer = HydraTrainer(model=model, args=args, train_dataset=add_example_ids(train), processing_class=tok)
    >>> trainer.train()
    >>> trainer.save_model("out/model")                       # weights + out/model/hydra (no pickle)
    >>> scorer = HydraScorer(model, "out/model/hydra")
    >>> scorer.scores(targets, labels, example_ids)           # (n_ids, n_targets), positive = helped
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call, grad, vjp, vmap
from transformers import Trainer, TrainerCallback

from .data import BATCH_KEY, InstanceIdCollator, check_id_column
from .errors import ConfigMismatchError, ExampleIdError, MissingExampleIdsError, TurnoverError
from .files import atomic_path, atomic_write_text
from .scoring import IGNORE_INDEX, _eval_mode, check_ids_known, model_inputs, per_example_loss
from .store import fingerprint
from .targets import is_causal_lm
from .trainer import TurnoverTrainer, default_collator

logger = logging.getLogger(__name__)

FORMAT = "turnover-hf/hydra"
FORMAT_VERSION = 1
META_NAME = "hydra.json"
IDS_NAME = "hydra_example_ids.safetensors"
TABLE_SAFETENSORS = "hydra_hypergradients.safetensors"
TABLE_NPY = "hydra_hypergradients.npy"
NORMALISATION = (
    "h_i = d w_T / d delta_i, example i's loss weighted a_i (1 + delta_i) in every step it enters; "
    "score(i, j) = -grad loss_j(w_T) . h_i = paper's C(i, j) (Chen et al. 2021, Eq. 8)"
)
ROW_CHUNK = 4096  # rows per pass when a whole table is rewritten (bounded temporary memory)
HYDRA_DIR = "hydra"  # beside a saved model: where save_model writes and InfluencePipeline reads the hypergradients
HYDRA_MODES = ("full", "lean")

LabelsLike = torch.Tensor
PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------------------------------------------
# Parameters and per-example gradients
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    """One tracked parameter: its name in ``model.named_parameters()``, shape and columns in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _specs_for(model: nn.Module, names: Optional[Sequence[str]]) -> list[ParamSpec]:
    named = dict(model.named_parameters())
    if names is None:
        names = [n for n, p in named.items() if p.requires_grad]
        if not names:
            raise TurnoverError("the model has no parameter with requires_grad; pass parameters=[...] to track.")
    else:
        missing = [n for n in names if n not in named]
        if missing:
            raise TurnoverError(f"parameters {missing[:5]} are not in the model (see model.named_parameters()).")
        order = {n: k for k, n in enumerate(named)}
        names = sorted(dict.fromkeys(names), key=order.__getitem__)
    specs, offset = [], 0
    for name in names:
        shape = tuple(named[name].shape)
        specs.append(ParamSpec(name, shape, offset))
        offset += math.prod(shape)
    return specs


def _labels_in(batch: Mapping[str, Any]) -> torch.Tensor:
    for key in ("labels", "label"):
        if key in batch and batch[key] is not None:
            return torch.as_tensor(batch[key])
    raise TurnoverError("HYDRA needs labels in every training batch (a 'labels' or 'label' entry).")


def _logits(output: Any) -> torch.Tensor:
    """The logits of a forward's output: a transformers ``ModelOutput``, a tuple, or a plain logits tensor."""
    if isinstance(output, torch.Tensor):
        return output
    return output.logits if hasattr(output, "logits") else output[0]


def _target_gradients(grads: PerExampleGrads, targets: Mapping[str, torch.Tensor], labels: torch.Tensor,
                      batch_size: int) -> torch.Tensor:
    """Gradient of each target's loss (eval mode, the model as it is), float32 ``(n_targets, D)``."""
    device = next(grads.model.parameters()).device
    inputs = model_inputs(targets, device)
    labels = torch.as_tensor(labels).to(device)
    out = []
    for start in range(0, len(labels), batch_size):
        sl = slice(start, start + batch_size)
        out.append(grads({k: v[sl] for k, v in inputs.items()}, labels[sl]))
    return torch.cat(out)


class _NotBatchable(Exception):
    """A forward in which the tracked Linear layers' per-row gradients cannot be read off one batched pass."""


def _tracked_linears(model: nn.Module, specs: Sequence[ParamSpec]
                     ) -> tuple[dict[str, tuple[Optional[ParamSpec], Optional[ParamSpec]]], Optional[str]]:
    """``{module name: (weight spec or None, bias spec or None)}`` when every tracked parameter is the weight or bias
    of a ``torch.nn.Linear`` (exactly that class, each parameter held by that one module); else ``{}`` and the
    reason, naming a parameter."""
    modules = dict(model.named_modules())
    holders: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    named = dict(model.named_parameters())
    layers: dict[str, list[Optional[ParamSpec]]] = {}
    for spec in specs:
        owner, _, leaf = spec.name.rpartition(".")
        module = modules.get(owner)
        if type(module) is not nn.Linear or leaf not in ("weight", "bias"):
            return {}, (f"{spec.name!r} is not the weight or bias of a torch.nn.Linear (its module is "
                        f"{type(module).__name__})")
        if holders.get(id(named[spec.name]), 0) != 1:
            return {}, f"{spec.name!r} is shared by several modules"
        layers.setdefault(owner, [None, None])[0 if leaf == "weight" else 1] = spec
    return {name: (w, b) for name, (w, b) in layers.items()}, None


class PerExampleGrads:
    """Flattened gradients of ``per_example_loss`` of each row w.r.t. the tracked parameters, ``(B, D)`` float32.

    Three ways, the first that applies (chosen on the first call and kept):

    - **Linear layers, one batched pass**: when every tracked parameter is the weight or bias of a
      ``torch.nn.Linear`` (heads, bottleneck adapters, LoRA's A and B), one forward and one backward of the summed
      loss give each layer's inputs ``x`` and output gradients ``dy`` per row, and row ``b``'s weight gradient is
      ``sum_t dy[b, t] x[b, t]^T`` over its positions (tokens). Rows run together, each under its own masks
      (``batch_context``). The first call checks that the rows' gradients sum to the batch gradient and that the
      first row's equals that row run alone (rows must not interact, as in any model run in eval mode).
    - ``vmap(grad)`` over rows (one traced forward for the batch), for rows without masks.
    - Otherwise each row runs its own forward and ``torch.autograd.grad`` (under ``row_context(k)``): models whose
      forward has data-dependent control flow (e.g. attention-mask shortcuts in BERT) cannot be vmapped.

    Runs in eval mode: gradients are those of the model without dropout.

    Example:
        >>> grads = PerExampleGrads(model, _specs_for(model, None))
        >>> grads(model_inputs(batch, "cpu"), batch["labels"]).shape     # (B, D)
    """

    def __init__(self, model: nn.Module, specs: Sequence[ParamSpec]) -> None:
        self.model = model
        self.specs = list(specs)
        self.vmap_ok: Optional[bool] = None
        self.linears, _ = _tracked_linears(model, self.specs)
        self.batched_ok: Optional[bool] = None if self.linears else False
        self.shift = is_causal_lm(model)  # a causal LM's logits at position t predict token t + 1

    def params(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        return {s.name: named[s.name].detach() for s in self.specs}

    def flat(self, grads: Mapping[str, torch.Tensor], rows: int) -> torch.Tensor:
        return torch.cat([grads[s.name].reshape(rows, -1) for s in self.specs], 1).float()

    def _loss_sum(self, params: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        logits = _logits(functional_call(self.model, params, args=(), kwargs=inputs))
        return per_example_loss(logits, labels, shift=self.shift).sum()

    def __call__(
        self,
        inputs: dict[str, torch.Tensor],
        labels: torch.Tensor,
        row_context: Optional[Callable[[int], ContextManager]] = None,
        batch_context: Optional[ContextManager] = None,
    ) -> torch.Tensor:
        """Per-row gradients; ``row_context(k)`` is the context row ``k`` runs under alone (e.g. its masks), and
        ``batch_context`` the same for all rows at once (required with ``row_context`` for the batched pass)."""
        batched = self.pseudo_label_gradients(inputs, lambda _: labels.unsqueeze(1), row_context, batch_context)
        if batched is not None:
            return batched[1][:, 0]
        params = self.params()
        n = len(labels)
        with _eval_mode(self.model):
            if row_context is None and self.vmap_ok is not False:
                def one(p, x, y):
                    return self._loss_sum(p, {k: v.unsqueeze(0) for k, v in x.items()}, y.unsqueeze(0))

                try:
                    out = self.flat(vmap(grad(one), in_dims=(None, 0, 0))(params, inputs, labels), n)
                    self.vmap_ok = True
                    return out
                except (RuntimeError, NotImplementedError) as err:
                    if self.vmap_ok:
                        raise
                    self.vmap_ok = False
                    logger.info("per-example gradients: vmap cannot trace this model (%s); one grad per row.", str(err)[:120])
            return self._one_row_at_a_time(inputs, labels, row_context, range(n))

    def _one_row_at_a_time(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
                           row_context: Optional[Callable[[int], ContextManager]], rows: Sequence[int]) -> torch.Tensor:
        """The gradients of ``rows``, each from its own forward and backward (under ``row_context(k)``)."""
        out = []
        with _tracked_requiring_grad(self.model, self.specs) as tensors, torch.enable_grad():
            for k in rows:
                with row_context(k) if row_context is not None else contextlib.nullcontext():
                    logits = _logits(self.model(**{key: v[k : k + 1] for key, v in inputs.items()}))
                    loss = per_example_loss(logits, labels[k : k + 1], shift=self.shift).sum()
                    g = torch.autograd.grad(loss, tensors, allow_unused=True)
                out.append(self.flat({s.name: torch.zeros_like(t) if gi is None else gi
                                      for s, t, gi in zip(self.specs, tensors, g)}, 1))
        return torch.cat(out) if out else torch.zeros(0, self.specs[-1].offset + self.specs[-1].numel)

    def pseudo_label_gradients(
        self,
        inputs: dict[str, torch.Tensor],
        labels_of: Callable[[torch.Tensor], torch.Tensor],
        row_context: Optional[Callable[[int], ContextManager]] = None,
        batch_context: Optional[ContextManager] = None,
    ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The logits of one forward and, for each column ``k`` of ``labels_of(logits)`` ``(B, K)``, every row's
        gradient of its loss against that column's label: ``(logits, (B, K, D))`` from one forward and K backward
        passes. None when the tracked parameters are not Linear layers read in one batched pass (then use
        :meth:`__call__` once per label set).

        Example:
            >>> logits, grads = per_example_grads.pseudo_label_gradients(inputs, lambda z: z.argsort(-1)[:, :-1])
        """
        if self.batched_ok is False or (row_context is not None and batch_context is None):
            return None
        with _eval_mode(self.model):
            try:
                return self._batched_linear(inputs, labels_of, batch_context or contextlib.nullcontext(), row_context)
            except _NotBatchable as err:
                if self.batched_ok:
                    raise TurnoverError(f"per-example gradients of the tracked Linear layers: {err}") from None
                self.batched_ok = False
                logger.info("per-example gradients: %s; computing them row by row instead.", err)
                return None

    def _batched_linear(self, inputs: dict[str, torch.Tensor], labels_of: Callable[[torch.Tensor], torch.Tensor],
                        context: ContextManager, row_context: Optional[Callable[[int], ContextManager]]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward of the batch, then one backward per column of ``labels_of(logits)`` ``(B, K, ...)``; each
        row's gradient from the tracked Linears' inputs and output gradients (recorded by :func:`_linear_calls`):
        ``(logits, (B, K, D))``. The first call checks that the rows add up to the batch
        gradient (no use of a tracked weight escaped the hooks) and that the first row equals that row run alone
        (rows do not interact)."""
        check = self.batched_ok is None
        columns: list[torch.Tensor] = []
        with _tracked_requiring_grad(self.model, self.specs) as tensors, torch.enable_grad(), \
                _linear_calls(self.model, list(self.linears)) as calls, context:
            logits = _logits(self.model(**inputs))
            labels = labels_of(logits.detach())
            n = logits.shape[0]
            seen = [(name, x, out) for name, kept in calls.items() for x, out in kept]
            for name, x, out in seen:
                if not isinstance(x, torch.Tensor) or x.shape[0] != n or out.shape[0] != n:
                    raise _NotBatchable(f"the Linear {name!r} sees an input that is not split by rows of the batch")
            outputs = [out for _, _, out in seen]
            for k in range(labels.shape[1]):
                loss = per_example_loss(logits, labels[:, k], shift=self.shift).sum()
                last = k == labels.shape[1] - 1
                found = torch.autograd.grad(loss, outputs + (list(tensors) if check and k == 0 else []),
                                            allow_unused=True, retain_graph=not last)
                columns.append(self._rows_from(seen, found[: len(seen)], n))
                if check and k == 0:
                    whole = found[len(seen):]
        if check:
            first = columns[0]
            total = torch.cat([(torch.zeros(s.numel, device=first.device) if g is None else g.reshape(-1).float())
                               for s, g in zip(self.specs, whole)])
            gap = float((first.sum(0) - total).abs().max())
            if gap > 1e-4 * max(float(total.abs().max()), 1e-12):
                raise _NotBatchable(f"the rows' gradients do not add up to the batch gradient (gap {gap:.2e})")
            alone = self._one_row_at_a_time(inputs, labels[:, 0], row_context, [0])[0]
            gap = float((first[0] - alone).abs().max())
            if gap > 1e-4 * max(float(alone.abs().max()), 1e-12):
                raise _NotBatchable(f"a row's gradient in the batch differs from the row alone (gap {gap:.2e}): rows interact")
            self.batched_ok = True
        return logits.detach(), torch.stack(columns, 1)

    def _rows_from(self, seen: Sequence[tuple[str, torch.Tensor, torch.Tensor]], output_grads: Sequence[Optional[torch.Tensor]],
                   n: int) -> torch.Tensor:
        """``(n, D)``: each row's gradient from every tracked Linear call's input and output gradient (summed over
        positions and over calls)."""
        per_row: dict[str, torch.Tensor] = {}
        for (name, x, _), dy in zip(seen, output_grads):
            if dy is None:
                continue
            weight, bias = self.linears[name]
            x, dy = x.detach().reshape(n, -1, x.shape[-1]), dy.reshape(n, -1, dy.shape[-1])
            if weight is not None:
                g = torch.einsum("bto,bti->boi", dy, x.to(dy.dtype))
                per_row[weight.name] = per_row[weight.name] + g if weight.name in per_row else g
            if bias is not None:
                g = dy.sum(1)
                per_row[bias.name] = per_row[bias.name] + g if bias.name in per_row else g
        named = dict(self.model.named_parameters())
        return self.flat({s.name: per_row.get(s.name, torch.zeros((n, *s.shape), dtype=named[s.name].dtype,
                                                                  device=named[s.name].device))
                          for s in self.specs}, n)


@contextlib.contextmanager
def _linear_calls(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, list[tuple[Any, torch.Tensor]]]]:
    """``{name: [(input, output), ...]}``: every call of the named modules inside the block. The hooks run before
    any output-mask hook (``prepend``), so an output mask enters a gradient through the chain rule and an input mask
    (a pre-hook) is in the recorded input. An output that does not require grad (nothing upstream is differentiated)
    is replaced by a leaf that does, so gradients with respect to it can be asked for."""
    modules = dict(model.named_modules())
    calls: dict[str, list[tuple[Any, torch.Tensor]]] = {name: [] for name in names}

    def keeper(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> Optional[torch.Tensor]:
            x = args[0] if args else kwargs.get("input")
            replaced = None
            if isinstance(output, torch.Tensor) and not output.requires_grad and torch.is_grad_enabled():
                output = replaced = output.detach().requires_grad_()
            calls[name].append((x, output))
            return replaced

        return hook

    handles = [modules[name].register_forward_hook(keeper(name), prepend=True, with_kwargs=True) for name in names]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _tracked_requiring_grad(model: nn.Module, specs: Sequence[ParamSpec]) -> Iterator[list[torch.Tensor]]:
    """The tracked parameters, each requiring grad inside the block (a tracked subset may include frozen ones)."""
    named = dict(model.named_parameters())
    tensors = [named[s.name] for s in specs]
    flags = [t.requires_grad for t in tensors]
    try:
        for t in tensors:
            t.requires_grad_(True)
        yield tensors
    finally:
        for t, flag in zip(tensors, flags):
            t.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------------------------
# The N x D table
# ---------------------------------------------------------------------------------------------------------------
def _mix(P: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``out[k] = sum_j P[k, j] * X[j]`` per coordinate: P (K, K, D), X (K, ..., D). Elementwise, because a batched
    matmul over D tiny matrices is far slower."""
    shape = (-1,) + (1,) * (X.dim() - 2) + (P.shape[-1],)
    return torch.stack([sum(P[k, j].reshape(shape[1:]) * X[j] for j in range(P.shape[1])) for k in range(P.shape[0])])


def _inverse(P: torch.Tensor) -> torch.Tensor:
    """Inverse of each of the D matrices in a (K, K, D) stack, K in {1, 2}."""
    if P.shape[0] == 1:
        return 1.0 / P
    a, b, c, d = P[0, 0], P[0, 1], P[1, 0], P[1, 1]
    det = a * d - b * c
    return torch.stack([torch.stack([d, -b]), torch.stack([-c, a])]) / det


def _rows_of(sorted_ids: torch.Tensor, order: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
    """Row of each id in a table whose ids sorted are ``sorted_ids = ids[order]``; unknown ids raise."""
    ids = torch.as_tensor(example_ids).to(torch.int64).cpu().reshape(-1)
    pos = torch.searchsorted(sorted_ids, ids).clamp(max=max(len(sorted_ids) - 1, 0))
    known = sorted_ids[pos] == ids if len(sorted_ids) else torch.zeros_like(ids, dtype=torch.bool)
    if not bool(known.all()):
        unknown = ids[~known]
        raise ExampleIdError(
            f"{len(unknown)} example id(s) are not in the tracked training set (e.g. {unknown[:5].tolist()}); use "
            "ids from the id column of the dataset the model was trained on."
        )
    return order[pos]


class Hypergradients:
    """The hypergradient table: one float32 row of ``D`` values per training example, with lazy shared updates.

    Rows are stored as ``S`` and the true values are ``X = P S`` per coordinate, where ``P`` is a (K, K, D) stack
    of small matrices (K = 2 when momentum is tracked: state ``(h, m)``; else K = 1). A step whose linear map
    ``A`` (momentum, weight decay, learning rate) is the same for every row only updates ``P <- A P``; the rows of
    the step's examples receive their gradient term as ``S += P^-1 b c``. When ``P`` mixes the two state components
    badly (balanced condition number above ``rebase_condition``, see :meth:`_condition`) the table is rewritten as
    ``S <- P S``, ``P <- I``, which keeps float32 rows accurate to about ``rebase_condition`` ulps.

    With ``storage_dir`` the arrays are ``.npy`` memory maps in that folder (tables larger than RAM); otherwise
    numpy arrays in memory.

    Example:
        >>> table = Hypergradients(torch.arange(100), dim=4096, storage_dir="runs/hydra")
        >>> table.read(table.rows_of(torch.tensor([3, 7]))).shape          # (2, 4096)
    """

    def __init__(
        self,
        example_ids: torch.Tensor,
        dim: int,
        *,
        storage_dir: Optional[PathLike] = None,
        rebase_condition: float = 100.0,
        dtype: Any = np.float32,
        _arrays: Optional[list[np.ndarray]] = None,
        _seen: Optional[np.ndarray] = None,
    ) -> None:
        ids = check_ids_known(torch.as_tensor(example_ids), None).cpu()
        self.example_ids = ids
        self._order = torch.argsort(ids)
        self._sorted = ids[self._order]
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self.storage_dir = os.fspath(storage_dir) if storage_dir is not None else None
        self.rebase_condition = float(rebase_condition)
        self.arrays: list[np.ndarray] = _arrays if _arrays is not None else [self._new_array(TABLE_NPY)]
        self.P = torch.ones(1, 1, self.dim, dtype=torch.float64)
        self.seen = _seen if _seen is not None else np.zeros(len(ids), dtype=np.int64)

    # -- layout ---------------------------------------------------------------------------------------------
    def _new_array(self, name: str) -> np.ndarray:
        shape = (len(self.example_ids), self.dim)
        if self.storage_dir is None:
            return np.zeros(shape, dtype=self.dtype)
        if os.path.isfile(os.path.join(self.storage_dir, META_NAME)):
            raise TurnoverError(
                f"{self.storage_dir!r} holds a saved HYDRA result; it is kept as it is. Choose another storage_dir."
            )
        os.makedirs(self.storage_dir, exist_ok=True)
        # open_memmap writes a real .npy header, so the file loads with np.load(mmap_mode="r") later.
        return np.lib.format.open_memmap(os.path.join(self.storage_dir, name), mode="w+", dtype=self.dtype, shape=shape)

    @property
    def K(self) -> int:
        return self.P.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def ensure_momentum(self) -> None:
        """Add the momentum half of the state (zeros) the first time an optimizer with momentum is tracked."""
        if self.K == 2:
            return
        self.arrays.append(self._new_array("hydra_momentum.npy"))
        P = torch.zeros(2, 2, self.dim, dtype=torch.float64)
        P[0, 0], P[1, 1] = self.P[0, 0], 1.0
        self.P = P

    def rows_of(self, example_ids: torch.Tensor) -> torch.Tensor:
        """Row index of each id; unknown ids raise :class:`ExampleIdError`."""
        return _rows_of(self._sorted, self._order, example_ids)

    # -- reading and writing --------------------------------------------------------------------------------
    def read_state(self, rows: torch.Tensor) -> torch.Tensor:
        """True state ``X = P S`` of these rows, float64 ``(K, n, D)``."""
        idx = rows.numpy()
        return _mix(self.P, torch.stack([torch.from_numpy(np.asarray(a[idx])).double() for a in self.arrays]))

    def _state_block(self, start: int, stop: int) -> torch.Tensor:
        """True state of the contiguous rows ``start:stop`` (slices, not fancy indexing: no copy of the index)."""
        return _mix(self.P, torch.stack([torch.from_numpy(np.asarray(a[start:stop])).double() for a in self.arrays]))

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        """Hypergradients ``h`` of these rows, float32 ``(n, D)``."""
        if self.K == 1 and bool((self.P == 1).all()):
            return torch.from_numpy(np.asarray(self.arrays[0][rows.numpy()])).float()
        return self.read_state(rows)[0].float()

    def _add(self, k: int, rows: torch.Tensor, values: torch.Tensor) -> None:
        # Rows may repeat within a step (an example in two micro-batches): sum duplicates before the fancy "+=".
        unique, inverse = torch.unique(rows, return_inverse=True)
        summed = torch.zeros(len(unique), values.shape[1], dtype=torch.float64).index_add_(0, inverse, values)
        idx = unique.numpy()
        # numpy casts to the array's dtype on assignment (float32 tables; float64 for the lean projections)
        self.arrays[k][idx] = (torch.from_numpy(np.asarray(self.arrays[k][idx])).double() + summed).numpy()

    def rebase(self) -> None:
        """Rewrite the table as its true values (``S <- P S``, ``P <- I``), chunk by chunk."""
        if bool((self.P == torch.eye(self.K, dtype=torch.float64)[..., None]).all()):
            return
        n = len(self.example_ids)
        for start in range(0, n, ROW_CHUNK):
            stop = min(start + ROW_CHUNK, n)
            X = self._state_block(start, stop)
            for k, array in enumerate(self.arrays):
                array[start:stop] = X[k].numpy()
        self.P = torch.eye(self.K, dtype=torch.float64)[..., None].repeat(1, 1, self.dim)

    # -- updates --------------------------------------------------------------------------------------------
    def apply(self, A: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, C: torch.Tensor) -> None:
        """One step for every row: ``x <- A x`` (shared map), plus ``b * c`` on the rows of the step's examples.

        ``A`` is (K, K, D), ``b`` (K, D), ``C`` (len(rows), D): the gradient terms of the step's examples.
        """
        P = _mix(A, self.P)  # A @ P per coordinate
        Q = _mix(_inverse(P), b)
        self.P = P
        if len(rows):
            C = C.double()
            for k in range(self.K):
                self._add(k, rows, C * Q[k])
        if self._condition() > self.rebase_condition:
            self.rebase()

    def apply_dense(self, A: torch.Tensor, b: torch.Tensor, C_all: torch.Tensor) -> None:
        """``x <- A x + b * c`` with a term ``c`` for every row (the exact mode's Hessian term), ``C_all`` (N, D)."""
        self.rebase()
        n = len(self.example_ids)
        for start in range(0, n, ROW_CHUNK):
            stop = min(start + ROW_CHUNK, n)
            new = _mix(A, self._state_block(start, stop)) + b[:, None, :] * C_all[start:stop].double()[None]
            for k, array in enumerate(self.arrays):
                array[start:stop] = new[k].numpy()

    def _condition(self) -> float:
        """How much float32 accuracy the lazy form can lose, worst coordinate (1 = none).

        Rows hold sums of terms ``P_j^-1 b c`` read back through ``P``; accuracy is lost to cancellation only when
        ``P`` mixes the two state components badly. Storage precision does not depend on the units of ``h`` and
        ``m`` (Adam's ``lr / sqrt(v)`` can be 1e4), so the measure is the condition number after balancing the
        diagonal scales: ``(p^2 + r^2 + 2 |q s|) / (2 |det|)`` for ``P = [[p, q], [s, r]]`` (1 for the identity,
        ``beta^-t`` after ``t`` steps of a momentum ``beta``). A scalar (K = 1) never cancels; there only the
        float32 range matters.
        """
        if self.K == 1:
            mag = self.P.abs()[0, 0]
            return 1.0 if float(torch.maximum(mag, 1.0 / mag).max()) < 1e30 else math.inf
        p, q, s_, r = self.P[0, 0], self.P[0, 1], self.P[1, 0], self.P[1, 1]
        det = (p * r - q * s_).abs()
        balanced = (p * p + r * r + 2 * (q * s_).abs()) / (2 * det)
        scale = torch.maximum(self.P.abs().amax((0, 1)), _inverse(self.P).abs().amax((0, 1)))
        return float(torch.where(scale < 1e30, balanced, torch.full_like(balanced, math.inf)).max())

    # -- files ----------------------------------------------------------------------------------------------
    def save_arrays(self, folder: PathLike) -> str:
        """Write the true hypergradients (after a rebase) and the ids to ``folder``; return the table's file name."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        self.rebase()
        table = self.arrays[0]
        with atomic_path(os.path.join(folder, IDS_NAME)) as tmp:
            save_file({"example_ids": self.example_ids.contiguous(), "seen": torch.from_numpy(self.seen.copy())}, tmp)
        if isinstance(table, np.memmap):
            table.flush()
            target = os.path.join(folder, TABLE_NPY)
            if os.path.abspath(target) != os.path.abspath(table.filename):
                with atomic_path(target) as tmp:
                    shutil.copyfile(table.filename, tmp)
            return TABLE_NPY
        with atomic_path(os.path.join(folder, TABLE_SAFETENSORS)) as tmp:
            save_file({"hypergradients": torch.from_numpy(table)}, tmp)
        return TABLE_SAFETENSORS

    @classmethod
    def load_arrays(cls, folder: PathLike, table_name: str, dim: int, mmap: bool = True) -> "Hypergradients":
        folder = os.fspath(folder)
        ids = load_file(os.path.join(folder, IDS_NAME))
        path = os.path.join(folder, table_name)
        if table_name.endswith(".npy"):
            table = np.load(path, mmap_mode="r" if mmap else None)
        else:
            table = load_file(path)["hypergradients"].numpy()
        if table.shape != (len(ids["example_ids"]), dim):
            raise ConfigMismatchError(f"{path!r} has shape {table.shape}, expected {(len(ids['example_ids']), dim)}.")
        return cls(ids["example_ids"], dim, _arrays=[table], _seen=ids["seen"].numpy().copy())


class ProjectedHypergradients:
    """Lean storage: the projections ``G_q . h_i`` onto ``Q`` fixed target gradients instead of ``h_i`` itself.

    With SGD (momentum, dampening, Nesterov, weight decay, any learning-rate schedule, clipping) a step's
    recurrence is one linear map per optimizer parameter group, the same for every coordinate of the group, plus
    the example's gradient term. Projecting onto the part ``G_q|g`` of a target gradient that lies in group ``g``
    therefore commutes with the step: ``(G_q|g . h_i, G_q|g . m_i)`` follows the group's map with the term
    ``G_q|g . c_i`` in place of ``c_i``. Each group keeps one such table of ``N x Q`` float64 values (twice that with
    momentum): a :class:`Hypergradients` with ``D = Q``, whose lazy shared map keeps each step's work on its own
    rows. ``G_q . h_i`` is the sum over the groups.

    Adam's per-coordinate preconditioner does not commute with the projection, nor does a step that moves the
    coordinates of one group by different maps (a parameter without gradient while it carries state): the first is
    refused before training, the second when it happens.

    Example:
        >>> table = ProjectedHypergradients(torch.arange(100), target_grads)      # target_grads: (Q, D)
        >>> table.read(table.rows_of(torch.tensor([3, 7]))).shape                  # (2, Q): G_q . h_i
    """

    def __init__(self, example_ids: torch.Tensor, targets: torch.Tensor, *, rebase_condition: float = 100.0) -> None:
        ids = check_ids_known(torch.as_tensor(example_ids), None).cpu()
        self.example_ids = ids
        self._order = torch.argsort(ids)
        self._sorted = ids[self._order]
        self.targets = targets.detach().double().cpu()  # (Q, D)
        self.dim = self.targets.shape[1]
        self.rebase_condition = float(rebase_condition)
        self.seen = np.zeros(len(ids), dtype=np.int64)
        self.groups: Optional[list[tuple[torch.Tensor, Hypergradients]]] = None
        self.momentum = False
        self.active = torch.ones(self.dim, dtype=torch.bool)  # columns whose parameter has a gradient this step
        self._touched = torch.zeros(self.dim, dtype=torch.bool)  # columns that may hold state already

    @property
    def K(self) -> int:
        return 2 if self.momentum else 1

    @property
    def nbytes(self) -> int:
        return sum(table.nbytes for _, table in self.groups or [])

    def rows_of(self, example_ids: torch.Tensor) -> torch.Tensor:
        return _rows_of(self._sorted, self._order, example_ids)

    def ensure_momentum(self) -> None:
        self.momentum = True
        for _, table in self.groups or []:
            table.ensure_momentum()

    def set_groups(self, columns: Sequence[torch.Tensor]) -> None:
        """The tracked columns of each optimizer parameter group (fixed for the run)."""
        q = self.targets.shape[0]
        self.groups = [(cols, Hypergradients(self.example_ids, q, rebase_condition=self.rebase_condition,
                                             dtype=np.float64)) for cols in columns]
        if self.momentum:
            self.ensure_momentum()

    @staticmethod
    def _uniform(values: torch.Tensor, group: int) -> torch.Tensor:
        if not bool((values == values[..., :1]).all()):
            raise TurnoverError(
                f"lean HYDRA: one optimizer step moved the parameters of parameter group {group} by different maps "
                "(e.g. a parameter received no gradient while the others did, after it had been trained); the "
                "projections need one map per group. Use hydra_mode='full'."
            )
        return values[..., 0]

    def apply(self, A: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, C: torch.Tensor) -> None:
        """One step (same arguments as :meth:`Hypergradients.apply`, with the full ``D`` columns)."""
        if self.groups is None:
            raise TurnoverError("lean HYDRA: set_groups(...) must be called before the first step.")
        q, K = self.targets.shape[0], self.K
        C = C.double()
        for g, (cols, table) in enumerate(self.groups):
            held = cols[self._touched[cols]]  # state may be nonzero here: the map must be the group's one
            fed = cols[self.active[cols]]  # these receive this step's gradient term
            if not len(held) and not len(fed):
                continue
            Ag = self._uniform(A[:, :, held], g) if len(held) else torch.eye(K, dtype=torch.float64)
            bg = self._uniform(b[:, fed], g) if len(fed) else torch.zeros(K, dtype=torch.float64)
            proj = C[:, fed] @ self.targets[:, fed].T if len(fed) else torch.zeros(len(rows), q, dtype=torch.float64)
            table.apply(Ag[..., None].expand(K, K, q), bg[:, None].expand(K, q), rows, proj)
        self._touched |= self.active

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        """``G_q . h_i`` of these rows, float64 ``(n, Q)``."""
        out = torch.zeros(len(rows), self.targets.shape[0], dtype=torch.float64)
        for _, table in self.groups or []:
            out += table.read_state(rows)[0]
        return out


# ---------------------------------------------------------------------------------------------------------------
# The tracker
# ---------------------------------------------------------------------------------------------------------------
def _unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    for _ in range(4):  # accelerate's AcceleratedOptimizer (and similar) keep the real one in .optimizer
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def _as_float(value: Any) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


class HydraTracker:
    """Tracks ``h_i = d w_T / d delta_i`` for every training example while a model trains (module docstring).

    Per optimizer step, call :meth:`observe` once per micro-batch (after its backward, with the gradient that
    backward added, so the example weights ``a_i`` are read off the training itself), then :meth:`before_step`
    after gradient clipping and before ``optimizer.step()``, then :meth:`after_step`. :class:`HydraTrainer` does
    all of this; a hand-written loop can too.

    Args:
        model: the model being trained.
        example_ids: the ids of all training examples (one row each).
        parameters: names of the parameters to track (default: those with ``requires_grad``).
        hessian: include the Hessian-vector term (exact hypergradients; small models only: every step touches
            every row and runs N Hessian-vector products).
        storage_dir: keep the table as ``.npy`` memory maps in this folder instead of in memory.
        mask_context: for models patched with turn-over dropout: ``ids -> context manager`` under which the
            examples with these ids were trained (each example's gradient is then taken under its own mask).
        rebase_condition: see :class:`Hypergradients`.

    Example:
        >>> tracker = HydraTracker(model, train["example_id"])
        >>> for batch in loader:                          # InstanceIdCollator batches, a mean loss
        ...     optimizer.zero_grad()
        ...     model(**{k: v for k, v in batch.items() if k != "example_ids"}).loss.backward()
        ...     tracker.observe(model, batch, batch["example_ids"], observed_grad=tracker.current_grad())
        ...     tracker.before_step(model, optimizer); optimizer.step(); tracker.after_step(optimizer)
        >>> tracker.save("out/hydra")
    """

    #: Relative mismatch between the training gradient and the weighted per-example gradients that is tolerated
    #: before warning (float32 accumulation noise is ~1e-6; dropout or a different loss give far more).
    RESIDUAL_TOLERANCE = 1e-3

    def __init__(
        self,
        model: nn.Module,
        example_ids: Union[torch.Tensor, Sequence[int]],
        *,
        parameters: Optional[Sequence[str]] = None,
        hessian: bool = False,
        storage_dir: Optional[PathLike] = None,
        id_column: str = "example_id",
        mask_context: Optional[Callable[[torch.Tensor], ContextManager]] = None,
        rebase_condition: float = 100.0,
    ) -> None:
        self.model = model
        self.specs = _specs_for(model, parameters)
        self.dim = self.specs[-1].offset + self.specs[-1].numel
        self.hessian = bool(hessian)
        self.id_column = id_column
        self.mask_context = mask_context
        ids = torch.as_tensor(list(example_ids) if not isinstance(example_ids, torch.Tensor) else example_ids)
        self.table = self._make_table(ids, storage_dir, rebase_condition)
        self.grads = PerExampleGrads(model, self.specs)
        self.steps = 0
        self.optimizer_name: Optional[str] = None
        self.max_residual = 0.0
        self._warned: set[str] = set()
        self._checked_dropout = False
        self._reset_step()

    # -- helpers --------------------------------------------------------------------------------------------
    def _make_table(self, ids: torch.Tensor, storage_dir: Optional[PathLike], rebase_condition: float) -> Any:
        return Hypergradients(ids, self.dim, storage_dir=storage_dir, rebase_condition=rebase_condition)

    def _reset_step(self) -> None:
        self._rows: list[torch.Tensor] = []
        self._terms: list[torch.Tensor] = []
        self._step_batches: list[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._grad_sum: Optional[torch.Tensor] = None
        self._clip = 1.0
        self._first_momentum: dict[str, bool] = {}
        self._had_grad: dict[str, bool] = {}
        self._hv: Optional[torch.Tensor] = None

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def _params(self) -> list[nn.Parameter]:
        named = dict(self.model.named_parameters())
        return [named[s.name] for s in self.specs]

    def current_grad(self) -> torch.Tensor:
        """The tracked parameters' ``.grad`` flattened, float32 ``(D,)`` (zeros where there is none)."""
        parts = [
            (p.grad.detach().reshape(-1).float() if p.grad is not None else torch.zeros(p.numel(), device=p.device))
            for p in self._params()
        ]
        return torch.cat(parts)

    @property
    def example_ids(self) -> torch.Tensor:
        return self.table.example_ids

    def hypergradients(self, example_ids: Union[torch.Tensor, Sequence[int]]) -> torch.Tensor:
        """``h_i = d w_T / d delta_i`` of these ids, float32 ``(n, D)`` (columns follow :attr:`specs`)."""
        return self.table.read(self.table.rows_of(torch.as_tensor(example_ids)))

    # -- the three calls of a step ---------------------------------------------------------------------------
    def observe(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        example_ids: torch.Tensor,
        *,
        observed_grad: Optional[torch.Tensor] = None,
        accumulation_steps: int = 1,
        num_items: Optional[int] = None,
    ) -> None:
        """Record the per-example gradients of one micro-batch (at the weights before this optimizer step).

        ``observed_grad`` is what this micro-batch's backward added to the tracked parameters' ``.grad``. The loss
        is assumed to weight example ``i`` as ``a_i = f * u_i`` with ``u_i = 1`` (one value per example) or the
        number of labelled tokens (token-level labels, a mean over tokens); ``f`` is fitted to ``observed_grad`` so
        every Trainer convention (mean per micro-batch divided by the accumulation steps, or a sum over the
        accumulation group's items) is followed as it is. When the fit does not explain ``observed_grad`` (dropout
        makes the training gradient noisy; another loss) or there is no ``observed_grad``, the convention is used:
        ``f = 1 / num_items`` if given (a loss summed over the accumulation group's items), else
        ``1 / (sum(u) * accumulation_steps)`` (a mean per micro-batch, divided by the accumulation steps).
        """
        if not self._checked_dropout:
            self._checked_dropout = True
            if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
                logger.info("HYDRA: the model trains with dropout; per-example gradients are taken without it.")
        example_ids = torch.as_tensor(example_ids).reshape(-1).to(torch.int64).cpu()
        rows = self.table.rows_of(example_ids)
        device = next(model.parameters()).device
        x = model_inputs(inputs, device)
        labels = _labels_in(inputs).to(device)
        if len(labels) != len(example_ids):
            raise ExampleIdError(f"a batch has {len(labels)} rows but {len(example_ids)} example ids.")
        row_context = batch_context = None
        if self.mask_context is not None:
            def row_context(k: int) -> ContextManager:
                return self.mask_context(example_ids[k : k + 1])

            batch_context = self.mask_context(example_ids)
        G = self.grads(x, labels, row_context, batch_context)  # (B, D)
        if labels.dim() == 2 and not labels.is_floating_point():  # token labels: each row weighs its counted tokens
            counted = labels[:, 1:] if self.grads.shift else labels
            u = (counted != IGNORE_INDEX).sum(-1).float()
        else:
            u = torch.ones(len(labels), device=G.device)
        Gm = u @ G
        f = 1.0 / num_items if num_items else 1.0 / (float(u.sum()) * max(1, int(accumulation_steps)))
        if observed_grad is not None:
            observed = observed_grad.to(G.device).float().reshape(-1)
            den, size = float(Gm @ Gm), float(observed.norm())
            fitted = float(observed @ Gm) / den if den > 0 else f
            residual = float((observed - fitted * Gm).norm()) / size if size > 0 else 0.0
            self.max_residual = max(self.max_residual, residual)
            if residual <= self.RESIDUAL_TOLERANCE:
                f = fitted
            else:
                self._warn_once(
                    "residual",
                    "HYDRA: the training gradient differs from the weighted per-example gradients by %.2g (relative): "
                    "the training loss is not a weighted mean of turnover_hf.per_example_loss computed without dropout "
                    "(dropout, label smoothing, class weights or mixed precision). Example weights "
                    "follow the Trainer's convention; hypergradients are approximate.",
                    residual,
                )
            self._grad_sum = observed if self._grad_sum is None else self._grad_sum + observed
        a = f * u
        self._rows.append(rows)
        self._terms.append((a[:, None] * G).cpu())
        if self.hessian:
            self._step_batches.append((x, labels, a.detach(), example_ids))

    def before_step(self, model: nn.Module, optimizer: Any) -> None:
        """After clipping, before ``optimizer.step()``: read the clip factor and the optimizer state to come."""
        optimizer = _unwrap_optimizer(optimizer)
        if self._grad_sum is not None:
            now = self.current_grad()
            den = float(self._grad_sum @ self._grad_sum)
            # Clipping scales every gradient by one factor; reading it off the gradient also catches any rescaling.
            self._clip = float(now @ self._grad_sum) / den if den > 0 else 1.0
        for spec, p in zip(self.specs, self._params()):
            state = optimizer.state.get(p, {})
            self._first_momentum[spec.name] = state.get("momentum_buffer") is None
            self._had_grad[spec.name] = p.grad is not None
        if self.hessian:
            self._hv = self._hessian_products()

    def after_step(self, optimizer: Any) -> None:
        """After ``optimizer.step()``: advance every row's hypergradient by this step's recurrence."""
        optimizer = _unwrap_optimizer(optimizer)
        if not self._had_grad:  # before_step was not called: no clipping, current .grad is what was used
            for spec, p in zip(self.specs, self._params()):
                self._first_momentum[spec.name] = self.steps == 0
                self._had_grad[spec.name] = p.grad is not None
        A, b = self._coefficients(optimizer)
        rows = torch.cat(self._rows) if self._rows else torch.zeros(0, dtype=torch.int64)
        C = torch.cat(self._terms) * self._clip if self._terms else torch.zeros(0, self.dim)
        if self.hessian:
            if self._hv is None:
                raise TurnoverError("exact HYDRA (hessian=True) needs before_step(model, optimizer) before optimizer.step().")
            C_all = self._hv.cpu().double() * self._clip
            C_all.index_add_(0, rows, C.double())
            self.table.apply_dense(A, b, C_all)
        else:
            self.table.apply(A, b, rows, C)
        np.add.at(self.table.seen, rows.numpy(), 1)
        self.steps += 1
        self._reset_step()

    # -- optimizer recurrences -------------------------------------------------------------------------------
    def _coefficients(self, optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's per-coordinate map: ``x <- A x + b c`` for the state ``x = (h, m)`` of each row."""
        where = {id(p): (spec, p) for spec, p in zip(self.specs, self._params())}
        is_adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
        if not (is_adam or isinstance(optimizer, torch.optim.SGD)):
            raise TurnoverError(
                f"HYDRA tracking supports torch.optim.SGD, Adam and AdamW; this run uses {type(optimizer).__name__}. "
                "Pass optim='sgd' or 'adamw_torch' in TrainingArguments, or optimizers=(torch.optim.SGD(...), None)."
            )
        self.optimizer_name = type(optimizer).__name__
        groups = [(g, [where[id(p)] for p in g["params"] if id(p) in where]) for g in optimizer.param_groups]
        if any(g.get("maximize", False) for g, specs in groups if specs):
            raise TurnoverError("HYDRA tracking does not support maximize=True optimizers.")
        if is_adam or any(g.get("momentum", 0) for g, specs in groups if specs):
            self.table.ensure_momentum()
        K, D = self.table.K, self.dim
        A = torch.eye(K, dtype=torch.float64)[..., None].repeat(1, 1, D)  # untouched coordinates: identity, no term
        b = torch.zeros(K, D, dtype=torch.float64)
        for group, specs in groups:
            lr, lam = _as_float(group["lr"]), float(group.get("weight_decay", 0.0))
            for spec, p in specs:
                if not self._had_grad.get(spec.name, True):
                    continue  # the optimizer skips a parameter without .grad: identity
                sl = slice(spec.offset, spec.offset + spec.numel)
                if is_adam:
                    self._adam(optimizer.state[p], optimizer, group, sl, lr, lam, A, b)
                else:
                    self._sgd(group, spec, sl, lr, lam, A, b)
        return A, b

    def _sgd(self, group, spec, sl, lr, lam, A, b) -> None:
        mu, tau, nesterov = float(group.get("momentum", 0.0)), float(group.get("dampening", 0.0)), bool(group.get("nesterov"))
        if mu == 0:
            A[0, 0, sl], b[0, sl] = 1 - lr * lam, -lr
            return
        if self._first_momentum.get(spec.name, False):
            # First step: buffer = d_p (no dampening); the state of these coordinates is still zero, so A is moot.
            b[0, sl], b[1, sl] = -lr * (1 + mu if nesterov else 1), 1.0
            return
        step = (1 + mu * (1 - tau)) if nesterov else (1 - tau)
        A[0, 0, sl] = 1 - lr * lam * step
        A[0, 1, sl] = -lr * (mu * mu if nesterov else mu)
        A[1, 0, sl] = (1 - tau) * lam
        A[1, 1, sl] = mu
        b[0, sl], b[1, sl] = -lr * step, 1 - tau

    def _adam(self, state, optimizer, group, sl, lr, lam, A, b) -> None:
        beta1, beta2 = (float(x) for x in group["betas"])
        t = _as_float(state["step"])
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        decoupled = bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))
        lam_c, lam_d = (0.0, lam) if decoupled else (lam, 0.0)
        # The preconditioner after this step's v update, held fixed (the documented approximation).
        denom = (v.detach().double().cpu().reshape(-1) / (1 - beta2**t)).sqrt() + float(group["eps"])
        k = lr / (1 - beta1**t) / denom
        A[0, 0, sl] = 1 - lr * lam_d - k * (1 - beta1) * lam_c
        A[0, 1, sl] = -k * beta1
        A[1, 0, sl] = (1 - beta1) * lam_c
        A[1, 1, sl] = beta1
        b[0, sl], b[1, sl] = -k * (1 - beta1), 1 - beta1

    # -- exact mode -----------------------------------------------------------------------------------------
    def _hessian_products(self) -> torch.Tensor:
        """``H h_i`` for every row, with ``H`` the Hessian of this step's weighted training loss (tracked block)."""
        params = self.grads.params()
        batches = self._step_batches

        def step_loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
            total = 0.0
            for x, labels, a, ids in batches:
                ctx = self.mask_context(ids) if self.mask_context is not None else contextlib.nullcontext()
                with ctx:
                    logits = _logits(functional_call(self.model, p, args=(), kwargs=x))
                total = total + (a * per_example_loss(logits, labels, shift=self.grads.shift)).sum()
            return total

        def unflatten(vec: torch.Tensor) -> dict[str, torch.Tensor]:
            return {s.name: vec[s.offset : s.offset + s.numel].reshape(s.shape).to(params[s.name]) for s in self.specs}

        with _eval_mode(self.model):
            _, hvp = vjp(grad(step_loss), params)  # the Hessian is symmetric: its vjp is the Hessian-vector product
            n = len(self.table.example_ids)
            out = torch.empty(n, self.dim)
            for start in range(0, n, ROW_CHUNK):
                H = self.table.read(torch.arange(start, min(start + ROW_CHUNK, n)))
                for r in range(len(H)):
                    out[start + r] = self.grads.flat(hvp(unflatten(H[r]))[0], 1)[0].cpu()
        return out

    # -- files ----------------------------------------------------------------------------------------------
    def save(self, folder: PathLike) -> None:
        """Write the hypergradients (safetensors in memory, ``.npy`` for a disk table) and ``hydra.json``.

        The metadata records the tracked parameters and a fingerprint of their final values, which
        :class:`HydraScorer` checks against the model it scores with. Files are written atomically, the JSON last.
        """
        table_name = self.table.save_arrays(folder)
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "normalisation": NORMALISATION,
            "parameters": [{"name": s.name, "shape": list(s.shape)} for s in self.specs],
            "dim": self.dim,
            "num_examples": len(self.table.example_ids),
            "id_column": self.id_column,
            "table": table_name,
            "hessian": self.hessian,
            "optimizer": self.optimizer_name,
            "steps": self.steps,
            "max_residual": self.max_residual,
            "weights_fingerprint": _weights_fingerprint(self.model, self.specs),
        }
        atomic_write_text(os.path.join(os.fspath(folder), META_NAME), json.dumps(meta, indent=2) + "\n")


def _check_seen(table: Any, example_ids: torch.Tensor, rows: torch.Tensor) -> None:
    unseen = example_ids[torch.from_numpy(table.seen[rows.numpy()] == 0)]
    if len(unseen):
        raise ExampleIdError(
            f"{len(unseen)} example id(s) never entered a tracked training step (e.g. {unseen[:5].tolist()}): "
            "HYDRA has nothing to say about them (did training stop before the end of the epoch?)."
        )


def _check_lean_optimizer(optimizer: Any) -> None:
    """Lean HYDRA projects before the recurrence, which is exact for SGD only."""
    optimizer = _unwrap_optimizer(optimizer)
    if isinstance(optimizer, torch.optim.SGD):
        return
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise TurnoverError(
            f"lean HYDRA cannot follow {type(optimizer).__name__}: its per-coordinate preconditioner 1 / sqrt(v) does "
            "not commute with projecting onto the target gradients. Use hydra_mode='full' (Adam tracked with its "
            "documented approximation), or train with SGD / momentum: "
            "optimizer_cls_and_kwargs=(torch.optim.SGD, {'momentum': 0.9}) or optim='sgd'."
        )
    raise TurnoverError(
        f"lean HYDRA follows torch.optim.SGD (with or without momentum); this run uses {type(optimizer).__name__}. "
        "Pass optimizer_cls_and_kwargs=(torch.optim.SGD, {...}) or optim='sgd'."
    )


class _LeanTracker(HydraTracker):
    """A :class:`HydraTracker` whose table is a :class:`ProjectedHypergradients` onto fixed target gradients."""

    def __init__(self, model: nn.Module, example_ids: torch.Tensor, targets: torch.Tensor, **kwargs: Any) -> None:
        self._targets = targets
        super().__init__(model, example_ids, **kwargs)
        if targets.shape[1] != self.dim:
            raise ConfigMismatchError(f"target gradients have {targets.shape[1]} columns, the tracked parameters {self.dim}.")

    def _make_table(self, ids: torch.Tensor, storage_dir: Optional[PathLike], rebase_condition: float) -> Any:
        return ProjectedHypergradients(ids, self._targets, rebase_condition=rebase_condition)

    def _coefficients(self, optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, torch.Tensor]:
        _check_lean_optimizer(optimizer)
        table: ProjectedHypergradients = self.table
        if table.groups is None:
            where = {id(p): spec for spec, p in zip(self.specs, self._params())}
            columns = []
            for group in optimizer.param_groups:
                specs = [where[id(p)] for p in group["params"] if id(p) in where]
                if specs:
                    columns.append(torch.cat([torch.arange(s.offset, s.offset + s.numel) for s in specs]))
            table.set_groups(columns)
        active = torch.zeros(self.dim, dtype=torch.bool)
        for spec in self.specs:
            if self._had_grad.get(spec.name, True):
                active[spec.offset : spec.offset + spec.numel] = True
        table.active = active
        return super()._coefficients(optimizer)

    def save(self, folder: PathLike) -> None:
        raise TurnoverError("lean HYDRA keeps projections onto one target set, not hypergradients: nothing to save.")


def _read_meta(folder: PathLike, name: str, fmt: str, version: int, what: str) -> dict[str, Any]:
    """The JSON metadata ``name`` of a saved result in ``folder``, checked to be ``fmt`` version ``version``."""
    path = os.path.join(os.fspath(folder), name)
    if not os.path.isfile(path):
        raise TurnoverError(f"{os.fspath(folder)!r} holds no {what} ({name} is missing).")
    with open(path, encoding="utf-8") as handle:
        meta = json.load(handle)
    if meta.get("format") != fmt or meta.get("version") != version:
        raise ConfigMismatchError(f"{path!r} is not a {fmt} v{version} file.")
    return meta


def _weights_fingerprint(model: nn.Module, specs: Sequence[ParamSpec]) -> str:
    named = dict(model.named_parameters())
    return fingerprint({s.name: named[s.name].detach() for s in specs})


@dataclass
class SavedHypergradients:
    """A saved HYDRA result: the table, the tracked parameters, and the metadata of ``hydra.json``."""

    table: Hypergradients
    specs: list[ParamSpec]
    meta: dict[str, Any]

    @classmethod
    def load(cls, folder: PathLike, mmap: bool = True) -> "SavedHypergradients":
        """Read a folder written by :meth:`HydraTracker.save` (``.npy`` tables are memory-mapped)."""
        meta = _read_meta(folder, META_NAME, FORMAT, FORMAT_VERSION, "HYDRA result")
        specs, offset = [], 0
        for p in meta["parameters"]:
            specs.append(ParamSpec(p["name"], tuple(p["shape"]), offset))
            offset += specs[-1].numel
        table = Hypergradients.load_arrays(folder, meta["table"], meta["dim"], mmap=mmap)
        return cls(table, specs, meta)


# ---------------------------------------------------------------------------------------------------------------
# Trainer integration
# ---------------------------------------------------------------------------------------------------------------
class HydraCallback(TrainerCallback):
    """Forwards the Trainer's optimizer events to a :class:`HydraTracker` (the batches come from the trainer).

    ``on_pre_optimizer_step`` runs after gradient clipping and ``on_optimizer_step`` before the scheduler moves
    the learning rate, so the tracker sees the clipped gradient and the learning rate the step used. With no
    tracker (the first run of lean mode) it only refuses a resumed run.

    Example:
        >>> trainer.add_callback(HydraCallback(tracker))     # HydraTrainer adds it itself
    """

    def __init__(self, tracker: Optional[HydraTracker]) -> None:
        self.tracker = tracker

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # A second train() on the same trainer starts at step 0 and simply continues the trajectory; a resumed
        # checkpoint starts at its step, whose earlier trajectory this tracker never saw.
        steps = self.tracker.steps if self.tracker is not None else 0
        if state.global_step > 0 and state.global_step != steps:
            raise TurnoverError(
                f"HYDRA tracking starts at optimizer step {state.global_step} but has tracked {steps}: resuming from a "
                "checkpoint is not supported (the tracker's own state, e.g. the momentum of every example's "
                "hypergradient, is not restored). Train from the start."
            )

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        if self.tracker is not None:
            self.tracker.before_step(model, optimizer)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if self.tracker is not None:
            self.tracker.after_step(optimizer)


class _LeanRunControl(TrainerCallback):
    """Lean mode: refuse an optimizer it cannot follow before training; keep a replay quiet (no checkpoints or
    evaluations: the first run made them, and the replay must not overwrite them)."""

    def __init__(self, trainer: HydraTrainingMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if self.trainer.hydra_mode == "lean" or self.trainer._hydra_replaying:
            _check_lean_optimizer(optimizer)

    def _quiet(self, control: Any) -> None:
        if self.trainer._hydra_replaying:
            control.should_save = False
            control.should_evaluate = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._quiet(control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._quiet(control)


def _trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of what training can change: the parameters with ``requires_grad`` and the buffers."""
    out = {f"parameter {n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out.update({f"buffer {n}": b.detach().clone() for n, b in model.named_buffers()})
    return out


def _tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**{f"parameter {n}": p for n, p in model.named_parameters()},
            **{f"buffer {n}": b for n, b in model.named_buffers()}}


def _load_trained_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    tensors = _tensors_of(model)
    with torch.no_grad():
        for key, value in state.items():
            tensors[key].copy_(value)
    for p in model.parameters():
        p.grad = None


def _state_differences(model: nn.Module, expected: Mapping[str, torch.Tensor]) -> list[str]:
    """The tensors of ``model`` that are not bit for bit ``expected``, with their largest difference."""
    tensors = _tensors_of(model)
    out = []
    for key, value in expected.items():
        now = tensors.get(key)
        if now is None or now.shape != value.shape:
            out.append(f"{key} (missing or reshaped)")
        elif not torch.equal(now.detach(), value):
            out.append(f"{key} (max |difference| {float((now.detach().double() - value.double()).abs().max()):.3g})")
    return out


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _RunStart:
    """What ``Trainer.train()`` starts from, kept so lean mode can replay the same run: the trainable weights and
    buffers, the random states, and the optimizer / scheduler the trainer held (None: the Trainer created them)."""

    weights: dict[str, torch.Tensor]
    rng: dict[str, Any]
    optimizer: Any
    optimizer_state: Optional[dict[str, Any]]
    scheduler: Any
    scheduler_state: Optional[dict[str, Any]]
    created_scheduler: bool
    ignore_keys_for_eval: Optional[list[str]]

    @classmethod
    def capture(cls, trainer: Any, ignore_keys_for_eval: Optional[list[str]]) -> _RunStart:
        optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
        return cls(
            weights=_trained_state(trainer.model),
            rng=_rng_state(),
            optimizer=optimizer,
            optimizer_state=copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None,
            scheduler=scheduler,
            scheduler_state=copy.deepcopy(scheduler.state_dict()) if hasattr(scheduler, "state_dict") else None,
            created_scheduler=bool(getattr(trainer, "_created_lr_scheduler", False)),
            ignore_keys_for_eval=ignore_keys_for_eval,
        )

    def restore(self, trainer: Any) -> None:
        _load_trained_state(trainer.model, self.weights)
        trainer.optimizer = self.optimizer  # the Trainer wraps it again (or creates a fresh one from None)
        if self.optimizer is not None and self.optimizer_state is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))
        trainer.lr_scheduler = self.scheduler
        trainer._created_lr_scheduler = self.created_scheduler
        if self.scheduler is not None and self.scheduler_state is not None:
            self.scheduler.load_state_dict(copy.deepcopy(self.scheduler_state))
        _set_rng_state(self.rng)


def _ignored_optim_args(args: Any, model: nn.Module) -> list[str]:
    """Keys of ``args.optim_args`` that transformers does not pass to the optimizer it builds (e.g. all of them for
    ``optim="sgd"`` in transformers 4.57, whose SGD gets the learning rate only)."""
    if not getattr(args, "optim_args", None):
        return []
    try:
        parsed = [item.split("=")[0] for item in args.optim_args.replace(" ", "").split(",") if item]
        _, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    except (ImportError, ValueError, TypeError, RuntimeError):  # e.g. optimizers needing extra packages
        return []
    return [key for key in parsed if key not in kwargs]


class HydraTrainingMixin:
    """Adds HYDRA to a ``Trainer`` subclass: each micro-batch's per-example gradients go to ``self.hydra``.

    Needs batches with ``example_ids`` (an :class:`~turnover_hf.data.InstanceIdCollator`). Single process only.
    Full mode tracks the hypergradient table while training; lean mode trains plainly and computes the scores of
    one target set per :meth:`hydra_lean_scores` call by replaying the run. ``save_model`` (and every Trainer
    checkpoint) also writes the hypergradients to ``<output_dir>/hydra``, where ``InfluencePipeline`` reads them.
    """

    hydra: Optional[HydraTracker]
    hydra_mode: str
    _hydra_keeps_ids = False  # TurnoverTrainer pops the ids itself

    def _setup_hydra(self, model: Optional[nn.Module], train_dataset: Any, id_column: str, *, hessian: bool,
                     storage_dir: Optional[PathLike], parameters: Optional[Sequence[str]],
                     mask_context: Optional[Callable[[torch.Tensor], ContextManager]], mode: str) -> None:
        args = self.args  # type: ignore[attr-defined]
        if mode not in HYDRA_MODES:
            raise TurnoverError(f"hydra_mode must be one of {HYDRA_MODES}, got {mode!r}.")
        if model is None:
            raise TurnoverError(
                "HYDRA trainers need model=...: model_init re-creates the model at every train(), which the tracker "
                "cannot follow."
            )
        if train_dataset is None:
            raise TurnoverError("HYDRA tracking needs train_dataset (with its id column) when the trainer is built.")
        ids = check_id_column(train_dataset, id_column)
        if args.world_size > 1:
            raise TurnoverError("HYDRA tracking runs in a single process (each process would see part of each step).")
        if args.load_best_model_at_end:
            raise TurnoverError(
                "HYDRA's hypergradients belong to the weights training ends with; load_best_model_at_end would put "
                "an earlier checkpoint's weights in the model. Leave it off: every checkpoint holds its own "
                "hypergradients in <checkpoint>/hydra."
            )
        if mode == "lean" and (hessian or storage_dir is not None):
            raise TurnoverError("hessian=True and hydra_storage_dir belong to hydra_mode='full': lean mode keeps no table.")
        self.hydra_mode = mode
        self._hydra_ids = ids
        self._hydra_specs = _specs_for(model, parameters)
        self._hydra_mask_context = mask_context
        self.hydra = (HydraTracker(model, ids, parameters=parameters, hessian=hessian, storage_dir=storage_dir,
                                   mask_context=mask_context, id_column=id_column) if mode == "full" else None)
        self._hydra_tracker = self.hydra  # the tracker training steps feed (None: plain training)
        self._hydra_callback = HydraCallback(self.hydra)
        self.add_callback(self._hydra_callback)  # type: ignore[attr-defined]
        self.add_callback(_LeanRunControl(self))  # type: ignore[attr-defined]
        self._hydra_train_calls = 0
        self._hydra_start: Optional[_RunStart] = None
        self._hydra_end: Optional[dict[str, torch.Tensor]] = None
        self._hydra_replaying = False
        self.hydra_lean: Optional[HydraTracker] = None  # the last replay's tracker (its table: the projections)
        ignored = (_ignored_optim_args(args, model)
                   if self.optimizer is None and getattr(self, "optimizer_cls_and_kwargs", None) is None else [])  # type: ignore[attr-defined]
        if ignored:
            logger.warning(
                "TrainingArguments(optim=%r) ignores optim_args %s in this transformers version: the optimizer is "
                "built without them (optim='sgd': no momentum, dampening or Nesterov). Pass them to the trainer as "
                "optimizer_cls_and_kwargs=(torch.optim.SGD, {'momentum': 0.9, ...}) instead.",
                str(getattr(args.optim, "value", args.optim)), ignored,
            )

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        example_ids = inputs.get(BATCH_KEY)
        if example_ids is None:
            raise MissingExampleIdsError(
                "a training batch has no example ids: HYDRA needs the dataset's id column "
                "(turnover_hf.add_example_ids(dataset)) and an InstanceIdCollator."
            )
        tracker = self._hydra_tracker
        kept = dict(inputs)  # the parent may pop keys from (and move) the dict it gets
        if not self._hydra_keeps_ids:
            inputs = {k: v for k, v in inputs.items() if k != BATCH_KEY}
        if tracker is None:  # lean mode's first run: plain training, replayed by hydra_lean_scores
            return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        before = tracker.current_grad()
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        # Trainer's own convention, used when the fit to the observed gradient is unreliable (see observe).
        summed = self.model_accepts_loss_kwargs and num_items_in_batch is not None and self.compute_loss_func is None  # type: ignore[attr-defined]
        tracker.observe(
            model, kept, example_ids, observed_grad=tracker.current_grad() - before,
            accumulation_steps=getattr(self, "current_gradient_accumulation_steps", 1),
            num_items=int(num_items_in_batch) if summed else None,
        )
        return loss

    def train(self, resume_from_checkpoint: Any = None, trial: Any = None, ignore_keys_for_eval: Optional[list[str]] = None,
              **kwargs: Any) -> Any:
        self._hydra_train_calls += 1
        first = self._hydra_train_calls == 1
        self._hydra_start = _RunStart.capture(self, ignore_keys_for_eval) if first else None
        self._hydra_end = None
        output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)  # type: ignore[misc]
        if first:
            self._hydra_end = _trained_state(self.model)  # type: ignore[attr-defined]
        return output

    def _save(self, output_dir: Optional[str] = None, state_dict: Any = None) -> None:
        super()._save(output_dir, state_dict)  # type: ignore[misc]
        if self.hydra is not None and self.hydra.steps > 0 and not self._hydra_replaying:
            folder = output_dir if output_dir is not None else self.args.output_dir  # type: ignore[attr-defined]
            self.hydra.save(os.path.join(folder, HYDRA_DIR))

    def _hydra_targets(self, targets: Union[Mapping[str, Any], Dataset], labels: Optional[torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        if isinstance(targets, Dataset):
            if self.args.remove_unused_columns:  # type: ignore[attr-defined]
                targets = self._remove_unused_columns(targets, description="HYDRA targets")  # type: ignore[attr-defined]
            batch = self.data_collator([targets[i] for i in range(len(targets))])  # type: ignore[attr-defined]
        else:
            batch = dict(targets)
        labels = torch.as_tensor(labels) if labels is not None else _labels_in(batch)
        return batch, labels

    def hydra_lean_scores(
        self,
        targets: Union[Mapping[str, Any], Dataset],
        labels: Optional[torch.Tensor] = None,
        *,
        example_ids: Optional[Union[torch.Tensor, Sequence[int]]] = None,
        summed: bool = False,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """HYDRA scores of every training example for one target set, by replaying the finished ``train()`` once.

        Lean mode (``hydra_mode="lean"``; allowed after a full-mode run too): the target gradients are taken at
        the trained weights, the training is run again from the same start (weights, optimizer, scheduler and
        random states restored; no checkpoints or evaluations) and every example's per-example gradient is
        projected onto them before it enters the SGD recurrence. Memory: ``N x Q`` values per optimizer parameter
        group (twice with momentum) instead of ``N x D``; cost: one more training run with per-example gradients.
        The replay must reproduce the run bit for bit: its final weights are compared with the trained ones and a
        difference is an error (the model is then set back to its trained weights).

        Args:
            targets: a batch of model inputs (with ``labels`` unless given) or a ``datasets.Dataset`` of them.
            labels: the targets' labels, if not in ``targets``.
            example_ids: training ids to return (default: the training set's, in its order).
            summed: one column for the sum of the targets' losses (e.g. a validation set) instead of one per target.
            batch_size: targets per gradient batch.

        Returns:
            float32 ``(n_ids, n_targets)`` (``(n_ids, 1)`` with ``summed``), the same scores as
            :meth:`HydraScorer.scores` on the full table: positive = the example helped the target.

        Example:
            >>> trainer = HydraTrainer(model=model, args=args, train_dataset=train, hydra_mode="lean")  # SGD
            >>> trainer.train()                                    # plain training: no table, no per-example work
            >>> scores = trainer.hydra_lean_scores(valid)          # one replay: (len(train), len(valid))
        """
        start, end = self._hydra_start, self._hydra_end
        if self._hydra_train_calls != 1 or start is None or end is None:
            raise TurnoverError(
                "hydra_lean_scores replays one finished train() call, and this trainer ran train() "
                f"{self._hydra_train_calls} time(s){' (the last did not finish)' if end is None else ''}: build the "
                "trainer again and call train() once."
            )
        model: nn.Module = self.model  # type: ignore[attr-defined]
        changed = _state_differences(model, end)
        if changed:
            raise TurnoverError(
                f"the model changed since train() ended ({changed[0]}): lean HYDRA takes the target gradients at the "
                "final weights of the run it replays."
            )
        batch, labels = self._hydra_targets(targets, labels)
        G = _target_gradients(PerExampleGrads(model, self._hydra_specs), batch, labels, max(1, int(batch_size))).cpu()
        if summed:
            G = G.double().sum(0, keepdim=True)
        tracker = _LeanTracker(model, self._hydra_ids, G, parameters=[s.name for s in self._hydra_specs],
                               id_column=self.id_column, mask_context=self._hydra_mask_context)  # type: ignore[attr-defined]
        start.restore(self)
        self._hydra_replaying = True
        self._hydra_tracker = self._hydra_callback.tracker = tracker
        try:
            super().train(ignore_keys_for_eval=start.ignore_keys_for_eval)  # type: ignore[misc]
        except BaseException:
            _load_trained_state(model, end)
            raise
        finally:
            self._hydra_replaying = False
            self._hydra_tracker = self._hydra_callback.tracker = self.hydra
        changed = _state_differences(model, end)
        if changed:
            _load_trained_state(model, end)
            raise TurnoverError(
                f"lean HYDRA: the replay did not reproduce the training run ({len(changed)} tensor(s) differ, e.g. "
                f"{changed[0]}), so its projections would not belong to the trained model. The replay restores the "
                "initial weights, optimizer, scheduler and the torch / numpy / Python random states; anything else "
                "that changes between two runs breaks it: another seed, data order or dataset, masks, a collator or "
                "callback with its own random generator, nondeterministic kernels (TrainingArguments("
                "full_determinism=True) on GPUs). Make the run deterministic or use hydra_mode='full', which needs no "
                "replay. The model was set back to its trained weights."
            )
        self.hydra_lean = tracker
        ids = self._hydra_ids if example_ids is None else torch.as_tensor(example_ids)
        ids = check_ids_known(torch.as_tensor(ids).cpu(), self._hydra_ids)
        rows = tracker.table.rows_of(ids)
        _check_seen(tracker.table, ids, rows)
        return (-tracker.table.read(rows)).float()


class HydraTrainer(HydraTrainingMixin, Trainer):
    """A ``transformers.Trainer`` that tracks HYDRA hypergradients of every training example while it trains.

    Differences from ``Trainer``: the training set needs an id column (``turnover_hf.add_example_ids``); the
    collator is wrapped in :class:`InstanceIdCollator` and the id column survives ``remove_unused_columns``; each
    training step also computes the per-example gradients of its examples; ``self.hydra`` holds the result and
    ``save_model`` writes it to ``<output_dir>/hydra`` beside the weights (so does every checkpoint).

    Args (besides ``Trainer``'s): ``hydra_mode`` (``"full"``: the ``N x D`` table while training; ``"lean"``:
    plain training, then :meth:`hydra_lean_scores` per target set, SGD only), ``hessian`` (exact mode),
    ``hydra_storage_dir`` (memory-mapped table), ``hydra_parameters`` (names to track; default:
    ``requires_grad``), ``id_column``.

    Example:
        >>> trainer = HydraTrainer(model=model, args=TrainingArguments("out", max_grad_norm=1.0),
        ...                        train_dataset=add_example_ids(train), processing_class=tokenizer)
        >>> trainer.train(); trainer.save_model("out/model")      # out/model/hydra: InfluencePipeline(estimator="hydra")
    """

    def __init__(self, model: Optional[nn.Module] = None, args: Any = None, data_collator: Any = None, *pos: Any,
                 hessian: bool = False, hydra_storage_dir: Optional[PathLike] = None,
                 hydra_parameters: Optional[Sequence[str]] = None, hydra_mode: str = "full",
                 id_column: str = "example_id", **kwargs: Any) -> None:
        self.id_column = id_column
        train_dataset = kwargs.get("train_dataset", pos[0] if pos else None)
        if data_collator is None:
            data_collator = default_collator(model, kwargs.get("processing_class") or kwargs.get("tokenizer"))
        super().__init__(model, args, InstanceIdCollator(data_collator, id_column), *pos, **kwargs)
        self._setup_hydra(model, train_dataset, id_column, hessian=hessian, storage_dir=hydra_storage_dir,
                          parameters=hydra_parameters, mask_context=None, mode=hydra_mode)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.id_column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.id_column]

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Optional[list[str]] = None):
        inputs = {k: v for k, v in inputs.items() if k != BATCH_KEY}
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)


class HydraTurnoverTrainer(HydraTrainingMixin, TurnoverTrainer):
    """:class:`~turnover_hf.trainer.TurnoverTrainer` plus HYDRA tracking: one run, both estimators.

    Each example's gradient is taken under its own turn-over mask (as it was trained), so ``h_i`` is the effect of
    down-weighting example ``i`` in this masked training; scores use the full network at the end, like turn-over
    scores. Per-example gradients run one example at a time here. ``hydra_mode`` as in :class:`HydraTrainer`.

    Example:
        >>> trainer = HydraTurnoverTrainer(model=patched, args=args, train_dataset=train, processing_class=tok)
        >>> trainer.train(); trainer.save_model("out/model")     # weights, turn-over config and out/model/hydra
    """

    _hydra_keeps_ids = True

    def __init__(self, model: Optional[nn.Module] = None, args: Any = None, data_collator: Any = None, *pos: Any,
                 hessian: bool = False, hydra_storage_dir: Optional[PathLike] = None,
                 hydra_parameters: Optional[Sequence[str]] = None, hydra_mode: str = "full", **kwargs: Any) -> None:
        from .context import instance_masks

        super().__init__(model, args, data_collator, *pos, **kwargs)
        train_dataset = kwargs.get("train_dataset", pos[0] if pos else None)
        self._setup_hydra(model, train_dataset, self.id_column, hessian=hessian, storage_dir=hydra_storage_dir,
                          parameters=hydra_parameters, mode=hydra_mode,
                          mask_context=lambda ids: instance_masks(model, ids, mode="train"))


# ---------------------------------------------------------------------------------------------------------------
class HydraScorer:
    """HYDRA scores of (training id, target) pairs, with :class:`~turnover_hf.scoring.TurnoverScorer`'s interface.

    ``scores[i, j] = -grad_w loss_j(w_T) . h_i``, the paper's ``C(i, j)`` (Eq. 8; see the module docstring for
    the normalisation): the first-order change of target ``j``'s loss when training example ``i`` is left out.
    Positive = the example helped the target (lowered its loss). Target gradients are taken in eval mode on the
    model as it is (the full network of a patched model), at the weights the training ended with; with
    ``strict=True`` a model whose tracked parameters differ from those final weights is refused.

    Args:
        model: the trained model.
        hypergradients: a :class:`HydraTracker` (right after training) or a folder written by
            :meth:`HydraTracker.save`.
        batch_size: targets per gradient batch; training ids are scored in blocks of ``4 * batch_size`` rows.
        strict: check the model's weights against the fingerprint saved with the hypergradients.

    Example:
        >>> scorer = HydraScorer(model, "out/hydra")
        >>> scorer.scores(targets, targets["labels"], example_ids=torch.arange(100))   # (100, n_targets)
    """

    path = "hydra"

    def __init__(self, model: nn.Module, hypergradients: Union[HydraTracker, SavedHypergradients, PathLike], *,
                 batch_size: int = 64, strict: bool = True) -> None:
        if isinstance(hypergradients, HydraTracker):
            table, specs = hypergradients.table, hypergradients.specs
            expected = None  # the tracker's own model: nothing to compare with
        else:
            saved = hypergradients if isinstance(hypergradients, SavedHypergradients) else SavedHypergradients.load(hypergradients)
            table, specs, expected = saved.table, saved.specs, saved.meta.get("weights_fingerprint")
        named = dict(model.named_parameters())
        bad = [s.name for s in specs if s.name not in named or tuple(named[s.name].shape) != s.shape]
        if bad:
            raise ConfigMismatchError(
                f"the model lacks the tracked parameters {bad[:5]} (or their shapes differ): score with the model "
                "whose training was tracked."
            )
        if strict and expected is not None and _weights_fingerprint(model, specs) != expected:
            raise ConfigMismatchError(
                "the model's tracked parameters differ from the weights the tracked training ended with; HYDRA "
                "scores need that final model (pass strict=False to score another one anyway)."
            )
        self.model = model
        self.table = table
        self.specs = specs
        self.batch_size = max(1, int(batch_size))
        self.device = next(model.parameters()).device
        self.grads = PerExampleGrads(model, specs)

    @property
    def known_ids(self) -> torch.Tensor:
        return self.table.example_ids

    def _rows(self, example_ids: torch.Tensor) -> torch.Tensor:
        example_ids = check_ids_known(torch.as_tensor(example_ids).cpu(), self.table.example_ids)
        rows = self.table.rows_of(example_ids)
        _check_seen(self.table, example_ids, rows)
        return rows

    def target_grads(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Gradient of each target's loss at the model's weights, float32 ``(n_targets, D)``."""
        return _target_gradients(self.grads, targets, labels, self.batch_size)

    def scores(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        """HYDRA influence of each id on each target, float32 ``(n_ids, n_targets)`` on the CPU."""
        rows = self._rows(example_ids)
        G = self.target_grads(targets, labels).cpu()  # (T, D)
        out = torch.empty(len(rows), len(G), dtype=torch.float32)
        block = 4 * self.batch_size
        for start in range(0, len(rows), block):
            H = self.table.read(rows[start : start + block])  # (n, D), from memory or the memory map
            out[start : start + len(H)] = -(H.double() @ G.double().T).float()
        return out

    def self_scores(self, batch: Mapping[str, torch.Tensor], labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        """Self-influence ``-grad loss_i(w_T) . h_i`` of each training row (with its id), float32 ``(n,)``."""
        rows = self._rows(example_ids)
        G = self.target_grads(batch, labels).cpu()
        H = self.table.read(rows)
        return -(H.double() * G.double()).sum(1).float()
