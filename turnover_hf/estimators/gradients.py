"""Per-example gradients of a chosen parameter subset, shared by every gradient-based estimator (HYDRA, the influence
function): parameter specs, target gradients, and batched per-example gradients of tracked ``nn.Linear`` layers."""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..data import BATCH_KEY
from ..errors import MissingExampleIdsError, TurnoverError
from ..losses import eval_mode, find_labels, is_causal_lm, logits_of, model_inputs, per_example_loss

logger = logging.getLogger(__name__)


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


def param_specs(model: nn.Module, names: Optional[Sequence[str]]) -> list[ParamSpec]:
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


def labels_in(batch: Mapping[str, Any]) -> torch.Tensor:
    labels = find_labels(batch)
    if labels is None:
        raise TurnoverError("HYDRA needs labels in every training batch (a 'labels' or 'label' entry).")
    return labels


def target_gradients(grads: PerExampleGrads, targets: Mapping[str, torch.Tensor], labels: torch.Tensor,
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


class NotBatchable(Exception):
    """A forward in which the tracked Linear layers' per-row gradients cannot be read off one batched pass."""


def tracked_linears(model: nn.Module, specs: Sequence[ParamSpec], types: tuple[type, ...] = (nn.Linear,)
                     ) -> tuple[dict[str, tuple[Optional[ParamSpec], Optional[ParamSpec]]], Optional[str]]:
    """``{module name: (weight spec or None, bias spec or None)}`` when every tracked parameter is the weight or bias
    of a module of exactly one of ``types`` (``torch.nn.Linear`` by default), each parameter held by that one
    module; else ``{}`` and the reason, naming a parameter."""
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
        if type(module) not in types or leaf not in ("weight", "bias"):
            kinds = " or ".join("torch.nn.Linear" if t is nn.Linear else t.__name__ for t in types)
            return {}, (f"{spec.name!r} is not the weight or bias of a {kinds} (its module is "
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
        >>> grads = PerExampleGrads(model, param_specs(model, None))
        >>> grads(model_inputs(batch, "cpu"), batch["labels"]).shape     # (B, D)
    """

    def __init__(self, model: nn.Module, specs: Sequence[ParamSpec]) -> None:
        self.model = model
        self.specs = list(specs)
        self.vmap_ok: Optional[bool] = None
        self.linears, _ = tracked_linears(model, self.specs)
        self.batched_ok: Optional[bool] = None if self.linears else False
        self.shift = is_causal_lm(model)  # a causal LM's logits at position t predict token t + 1

    def params(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        return {s.name: named[s.name].detach() for s in self.specs}

    def flat(self, grads: Mapping[str, torch.Tensor], rows: int) -> torch.Tensor:
        return torch.cat([grads[s.name].reshape(rows, -1) for s in self.specs], 1).float()

    def _loss_sum(self, params: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        logits = logits_of(functional_call(self.model, params, args=(), kwargs=inputs))
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
        with eval_mode(self.model):
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
        with tracked_requiring_grad(self.model, self.specs) as tensors, torch.enable_grad():
            for k in rows:
                with row_context(k) if row_context is not None else contextlib.nullcontext():
                    logits = logits_of(self.model(**{key: v[k : k + 1] for key, v in inputs.items()}))
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
        with eval_mode(self.model):
            try:
                return self._batched_linear(inputs, labels_of, batch_context or contextlib.nullcontext(), row_context)
            except NotBatchable as err:
                if self.batched_ok:
                    raise TurnoverError(f"per-example gradients of the tracked Linear layers: {err}") from None
                self.batched_ok = False
                logger.info("per-example gradients: %s; computing them row by row instead.", err)
                return None

    def _batched_linear(self, inputs: dict[str, torch.Tensor], labels_of: Callable[[torch.Tensor], torch.Tensor],
                        context: ContextManager, row_context: Optional[Callable[[int], ContextManager]]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward of the batch, then one backward per column of ``labels_of(logits)`` ``(B, K, ...)``; each
        row's gradient from the tracked Linears' inputs and output gradients (recorded by :func:`linear_calls`):
        ``(logits, (B, K, D))``. The first call checks that the rows add up to the batch
        gradient (no use of a tracked weight escaped the hooks) and that the first row equals that row run alone
        (rows do not interact)."""
        check = self.batched_ok is None
        columns: list[torch.Tensor] = []
        with tracked_requiring_grad(self.model, self.specs) as tensors, torch.enable_grad(), \
                linear_calls(self.model, list(self.linears)) as calls, context:
            logits = logits_of(self.model(**inputs))
            labels = labels_of(logits.detach())
            n = logits.shape[0]
            seen = [(name, x, out) for name, kept in calls.items() for x, out in kept]
            for name, x, out in seen:
                if not isinstance(x, torch.Tensor) or x.shape[0] != n or out.shape[0] != n:
                    raise NotBatchable(f"the Linear {name!r} sees an input that is not split by rows of the batch")
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
                raise NotBatchable(f"the rows' gradients do not add up to the batch gradient (gap {gap:.2e})")
            alone = self._one_row_at_a_time(inputs, labels[:, 0], row_context, [0])[0]
            gap = float((first[0] - alone).abs().max())
            if gap > 1e-4 * max(float(alone.abs().max()), 1e-12):
                raise NotBatchable(f"a row's gradient in the batch differs from the row alone (gap {gap:.2e}): rows interact")
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
def linear_calls(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, list[tuple[Any, torch.Tensor]]]]:
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
def tracked_requiring_grad(model: nn.Module, specs: Sequence[ParamSpec]) -> Iterator[list[torch.Tensor]]:
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


def batch_ids(batch: Mapping[str, Any]) -> torch.Tensor:
    """A training batch's example ids (int64, CPU), or the error that says how to get them."""
    if batch.get(BATCH_KEY) is None:
        raise MissingExampleIdsError(
            "a training batch has no example_ids: fit on a dataset with its id column "
            "(turnover_hf.add_example_ids) or on batches collated by turnover_hf.InstanceIdCollator."
        )
    return torch.as_tensor(batch[BATCH_KEY]).to(torch.int64).cpu()
