"""Projected per-example gradients of tracked Linear layers from one batched forward: each call's inputs are
projected on the way forward and its output gradients on the way back, so a row's projected gradient costs
``O(T (in k_in + out k_out) + T k_in k_out)`` and the full ``out x in`` gradient is never formed."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Optional, Sequence, Union

import torch
from torch import nn

from ...errors import TurnoverError
from ...losses import eval_mode, logits_of
from ..gradients import ParamSpec, linear_calls, tracked_requiring_grad
from ..influence.sketch import CountSketch
from .adapters_lora import lora_calls
from .projection import CoordinateSelection, LayerProjection

# loss(logits, labels column) -> (B,) per-example losses
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ProjectedGradients:
    """``(B, K, k)`` projected gradients of every row's loss against each of ``K`` label columns: each layer's
    Kronecker projection, then (with ``reducer``) a CountSketch or a coordinate selection of them all to ``k``.

    Example:
        >>> grads = ProjectedGradients(model, specs, layer_projections(model, specs, 4096, seed=0))
        >>> logits, g = grads(inputs, lambda z: batch["labels"][:, None], loss)    # g: (B, 1, k)
    """

    def __init__(self, model: nn.Module, specs: Sequence[ParamSpec], layers: Sequence[LayerProjection],
                 reducer: Optional[Union[CountSketch, CoordinateSelection]] = None) -> None:
        self.model = model
        self.specs = list(specs)
        self.layers = list(layers)
        self.reducer = reducer  # applied to the layers' projected gradients, concatenated
        self.dim = reducer.dim if reducer is not None else sum(layer.dim for layer in self.layers)
        self.checked = False
        modules = dict(model.named_modules())  # a layer not named after a module is an adapters LoRA matrix
        self._linears = [layer.name for layer in self.layers if layer.name in modules]
        self._matrices = [layer.name for layer in self.layers if layer.name not in modules]

    def _columns(self, inputs: dict[str, torch.Tensor], labels_of: Callable[[torch.Tensor], torch.Tensor], loss: LossFn,
                 context: Optional[ContextManager], on_column: Callable[..., Any]) -> tuple[torch.Tensor, torch.Tensor, list]:
        """One forward of the batch under ``context``, then one backward per column of ``labels_of(logits)``
        ``(B, K, ...)``, each handed to ``on_column(calls, projected inputs, output gradients, B)``:
        ``(logits, labels, [what on_column returned, per column])``."""
        with eval_mode(self.model), tracked_requiring_grad(self.model, self.specs), torch.enable_grad(), \
                linear_calls(self.model, self._linears) as linear, lora_calls(self.model, self._matrices) as lora, \
                context or contextlib.nullcontext():
            logits = logits_of(self.model(**inputs))
            labels = labels_of(logits.detach())
            n = logits.shape[0]
            calls = {**{name: [(x, out, None) for x, out in found] for name, found in linear.items()}, **lora}
            seen, projected_inputs, maps = [], [], []
            for layer in self.layers:
                for x, out, to_output_gradient in calls[layer.name]:
                    if not isinstance(x, torch.Tensor) or x.shape[0] != n or out.shape[0] != n:
                        raise TurnoverError(
                            f"the Linear {layer.name!r} sees an input that is not split by rows of the batch; the "
                            "projected influence function needs one row per example in every tracked Linear."
                        )
                    seen.append((layer, out))
                    maps.append(to_output_gradient)
                    projected_inputs.append(layer.project_inputs(x.detach().reshape(n, -1, x.shape[-1]).float()))
            if not seen:
                raise TurnoverError("no tracked Linear layer ran in the forward: nothing to differentiate.")
            columns = []
            outputs = [out for _, out in seen]
            for k in range(labels.shape[1]):
                found = torch.autograd.grad(loss(logits, labels[:, k]).sum(), outputs, allow_unused=True,
                                            retain_graph=k < labels.shape[1] - 1)
                found = [g if g is None or to_output is None else to_output(g) for g, to_output in zip(found, maps)]
                columns.append(on_column(seen, projected_inputs, found, n))
        return logits.detach(), labels, columns

    def __call__(self, inputs: dict[str, torch.Tensor], labels_of: Callable[[torch.Tensor], torch.Tensor], loss: LossFn,
                 context: Optional[ContextManager] = None,
                 row_context: Optional[Callable[[int], ContextManager]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward of the batch under ``context`` and one backward per column of ``labels_of(logits)``
        ``(B, K, ...)``: ``(logits, (B, K, k) float32)``. The first call checks row 0 against that row run alone
        under ``row_context(0)`` (a whole gradient, projected): rows must not interact, and every use of a tracked
        weight must go through its Linear."""
        logits, labels, columns = self._columns(inputs, labels_of, loss, context, self._rows)
        rows = torch.stack(columns, 1)
        if not self.checked:
            self._check_first_row(inputs, labels[:1, 0], loss, rows[0, 0], row_context)
            self.checked = True
        if self.reducer is not None:
            rows = self.reducer(rows.reshape(-1, rows.shape[-1])).view(*rows.shape[:2], self.dim)
        return logits, rows

    def side_moments(self, inputs: dict[str, torch.Tensor], labels_of: Callable[[torch.Tensor], torch.Tensor],
                     loss: LossFn, mixing: Callable[[], torch.Tensor], context: Optional[ContextManager] = None
                     ) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Per layer, ``(sum of x x^T, sum of d d^T, positions)`` over the batch, on the projected sides: ``x`` the
        inputs at every position whose output gradient is not zero in some column, ``d = sum_k W[b, k, e] dy_k``
        the output gradients mixed by ``mixing()`` ``(B, K, E)`` (called after the backward; ``W W^T`` per row
        is the Gauss-Newton weight of the columns' logits), summed over ``e``. float64."""
        calls: list[tuple[str, torch.Tensor]] = []  # (layer, projected inputs) of every call, from the forward

        def sides(seen: Sequence[tuple[LayerProjection, torch.Tensor]], projected_inputs: Sequence[torch.Tensor],
                  output_grads: Sequence[Optional[torch.Tensor]], n: int) -> list[Optional[torch.Tensor]]:
            if not calls:
                calls.extend((layer.name, x) for (layer, _), x in zip(seen, projected_inputs))
            return [None if dy is None else layer.project_outputs(dy.reshape(n, -1, dy.shape[-1]).float())
                    for (layer, _), dy in zip(seen, output_grads)]

        _, _, columns = self._columns(inputs, labels_of, loss, context, sides)
        weights = mixing()
        sums = {layer.name: [0.0, 0.0, 0] for layer in self.layers}
        for call, (name, x) in enumerate(calls):
            grads = [column[call] for column in columns]
            if any(g is None for g in grads):
                continue
            dy = torch.stack(grads, 1)  # (B, K, T, out)
            counted = dy.ne(0).any(-1).any(1)  # (B, T): positions that reach the loss
            xs = x[counted].double()
            mixed = torch.einsum("bke,bkto->ebto", weights.to(dy.device, dy.dtype), dy).reshape(-1, dy.shape[-1]).double()
            total = sums[name]
            total[0] = total[0] + xs.T @ xs
            total[1] = total[1] + mixed.T @ mixed
            total[2] += int(counted.sum())
        return [tuple(sums[layer.name]) for layer in self.layers]

    def _rows(self, seen: Sequence[tuple[LayerProjection, torch.Tensor]], projected_inputs: Sequence[torch.Tensor],
              output_grads: Sequence[Optional[torch.Tensor]], n: int) -> torch.Tensor:
        """``(n, k)``: per layer, ``sum_t (P_out dy_t) (P_in x_t)^T`` over positions and calls, concatenated."""
        parts: dict[str, torch.Tensor] = {}
        for (layer, _), px, dy in zip(seen, projected_inputs, output_grads):
            if dy is None:
                continue
            pdy = layer.project_outputs(dy.reshape(n, -1, dy.shape[-1]).float())
            g = torch.einsum("bto,bti->boi", pdy, px).reshape(n, -1)
            parts[layer.name] = parts[layer.name] + g if layer.name in parts else g
        device = projected_inputs[0].device
        return torch.cat([parts.get(layer.name, torch.zeros(n, layer.dim, device=device)) for layer in self.layers], 1)

    def _check_first_row(self, inputs: dict[str, torch.Tensor], label: torch.Tensor, loss: LossFn, batched: torch.Tensor,
                         row_context: Optional[Callable[[int], ContextManager]]) -> None:
        """Row 0's whole gradient, from its own forward, projected, must equal its batched projected gradient."""
        named = dict(self.model.named_parameters())
        with eval_mode(self.model), tracked_requiring_grad(self.model, self.specs) as tensors, torch.enable_grad(), \
                (row_context(0) if row_context is not None else contextlib.nullcontext()):
            logits = logits_of(self.model(**{k: v[:1] for k, v in inputs.items()}))
            found = torch.autograd.grad(loss(logits, label).sum(), tensors, allow_unused=True)
        whole = {s.name: (torch.zeros_like(named[s.name]) if g is None else g) for s, g in zip(self.specs, found)}
        expected = torch.cat([layer.project_gradient(whole.get(layer.weight), whole.get(layer.bias))
                              for layer in self.layers]).to(batched.device)
        gap = float((expected - batched).abs().max())
        if gap > 1e-3 * max(float(expected.abs().max()), 1e-12):
            raise TurnoverError(
                f"a row's projected gradient in the batch differs from the row run alone (gap {gap:.2e}): rows of a "
                "batch interact, or a tracked weight is used outside its Linear. Use estimator='influence' with "
                "factorised=False for this model."
            )
