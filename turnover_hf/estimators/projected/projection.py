"""Per-layer Kronecker projections of per-example gradients (LoGra-style): a tracked ``nn.Linear``'s per-example
gradient ``sum_t dy_t x_t^T`` is projected as ``sum_t (P_out dy_t) (P_in x_t)^T`` without ever being formed.

The sides are random signs (``design="sketch"`` / ``"kronecker"``) or, for ``design="eigen"``, the leading
eigenvectors of each layer's input and output-gradient second moments (the Kronecker-factored Gauss-Newton
eigenbasis, as in K-FAC / EK-FAC), of which :func:`eigen_projections` keeps the ``k`` Kronecker pairs with the
largest curvature across all layers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ...errors import TurnoverError
from ...masks import keyed_hash
from ..gradients import ParamSpec, tracked_linears
from .adapters_lora import lora_matrix_sizes


@dataclass
class LayerProjection:
    """One tracked Linear: its parameter names, its sides and their projections.

    ``inputs`` is ``(k_in, in')`` with ``in' = in + 1`` when the bias is tracked (a 1 is appended to the input;
    ``in' = 1`` when only the bias is), ``outputs`` is ``(k_out, out)``; ``None`` keeps a side whole (exact).
    Entries are random signs ``+-1 / sqrt(k)`` drawn from the integer hash of ``(seed, layer, side, index)``: the
    same on every device, process and library version, so ``E[P^T P] = I``.
    """

    name: str
    weight: Optional[str]
    bias: Optional[str]
    in_features: int                  # in' (with the appended 1 of a tracked bias)
    out_features: int
    inputs: Optional[torch.Tensor]    # (k_in, in') float32, or None: the input side is kept whole
    outputs: Optional[torch.Tensor]   # (k_out, out) float32, or None
    transposed: bool = False          # the weight is stored (in, out): transformers' Conv1D (GPT-2)

    @property
    def in_dim(self) -> int:
        return self.in_features if self.inputs is None else self.inputs.shape[0]

    @property
    def out_dim(self) -> int:
        return self.out_features if self.outputs is None else self.outputs.shape[0]

    @property
    def dim(self) -> int:
        """Coordinates of this layer in a projected gradient: ``k_out x k_in``."""
        return self.in_dim * self.out_dim

    def project_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, in) -> (B, T, k_in)``: the layer's inputs (with the bias's 1 appended when it is tracked)."""
        if self.weight is None:
            x = x.new_ones((*x.shape[:-1], 1))
        elif self.bias is not None:
            x = torch.cat([x, x.new_ones((*x.shape[:-1], 1))], -1)
        return x if self.inputs is None else x @ self.inputs.to(x.device, x.dtype).T

    def project_outputs(self, dy: torch.Tensor) -> torch.Tensor:
        """``(B, T, out) -> (B, T, k_out)``: the loss gradients at the layer's outputs."""
        return dy if self.outputs is None else dy @ self.outputs.to(dy.device, dy.dtype).T

    def project_gradient(self, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
        """A whole gradient of this layer (``(out, in)`` weight and ``(out,)`` bias) projected, ``(k_out * k_in,)``
        (used to check the batched projection against a row run alone)."""
        if weight is not None and self.transposed:
            weight = weight.T
        parts = ([] if weight is None else [weight]) + ([] if bias is None else [bias[:, None]])
        g = torch.cat(parts, 1).float()
        if self.outputs is not None:
            g = self.outputs.to(g.device) @ g
        if self.inputs is not None:
            g = g @ self.inputs.to(g.device).T
        return g.reshape(-1)


def random_signs(seed: int, key: str, rows: int, columns: int) -> torch.Tensor:
    """``(rows, columns)`` float32 entries ``+-1 / sqrt(rows)`` from the integer hash of ``(seed, key, index)``."""
    bits = keyed_hash(seed, key, torch.arange(rows * columns, dtype=torch.int64)) & 1
    return ((1.0 - 2.0 * bits.float()) / math.sqrt(rows)).view(rows, columns)


def side_rank(sizes: Sequence[tuple[int, int]], budget: int) -> int:
    """The largest ``r`` with ``sum_l min(in_l, r) x min(out_l, r) <= budget``: every side of every layer is cut to
    at most ``r`` coordinates (sides no longer than ``r`` stay whole), so small layers stay exact and leave their
    share of the budget to the large ones."""
    def total(r: int) -> int:
        return sum(min(i, r) * min(o, r) for i, o in sizes)

    low, high = 1, max(max(i, o) for i, o in sizes)
    if total(low) > budget:
        raise TurnoverError(
            f"projection_dim={budget} is smaller than one coordinate per tracked layer ({len(sizes)} layers); "
            "raise projection_dim or track fewer parameters."
        )
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if total(mid) <= budget else (low, mid - 1)
    return low


def projectable_layers(model: nn.Module, specs: Sequence[ParamSpec]
                       ) -> tuple[dict[str, tuple[Optional[ParamSpec], Optional[ParamSpec], bool]], Optional[str]]:
    """``{module: (weight spec, bias spec, transposed)}`` when every tracked parameter is the weight or bias of a
    ``torch.nn.Linear`` or a transformers ``Conv1D`` (transposed: GPT-2's ``(in, out)`` weights) or a LoRA matrix
    of the ``adapters`` library (keyed by its parameter name, see :mod:`.adapters_lora`); else ``{}`` and the
    reason, naming a parameter."""
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    is_lora = {s.name: lora_matrix_sizes(modules, s.name) is not None for s in specs}  # the adapters library's LoRA
    matrices, rest = [s for s in specs if is_lora[s.name]], [s for s in specs if not is_lora[s.name]]
    layers, reason = tracked_linears(model, rest, (nn.Linear, Conv1D)) if rest else ({}, None)
    if rest and not layers:
        return {}, reason
    found = {name: (w, b, type(modules[name]) is Conv1D) for name, (w, b) in layers.items()}
    return {**found, **{s.name: (s, None, False) for s in matrices}}, reason


def layer_sizes(module: nn.Module, transposed: bool) -> tuple[int, int]:
    """``(in, out)`` features of a Linear or a Conv1D."""
    if transposed:
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def layer_shapes(model: nn.Module, specs: Sequence[ParamSpec]
                 ) -> list[tuple[str, Optional[ParamSpec], Optional[ParamSpec], bool, int, int]]:
    """``(module, weight spec, bias spec, transposed, in', out)`` of every tracked Linear (or Conv1D), ``in'`` with
    the appended 1 of a tracked bias; refuses tracked parameters of other modules (naming one)."""
    layers, reason = projectable_layers(model, specs)
    if not layers:
        raise TurnoverError(
            f"the projected influence function projects the gradients of torch.nn.Linear (and Conv1D) layers, and "
            f"{reason}. Track only such layers with options parameters=[...] (e.g. the adapters' and the "
            "classifier's weights), or use estimator='influence'."
        )
    modules = dict(model.named_modules())
    out = []
    for name, (weight, bias, transposed) in layers.items():
        in_features, out_features = lora_matrix_sizes(modules, name) or layer_sizes(modules[name], transposed)
        in_features = (in_features if weight is not None else 0) + (1 if bias is not None else 0)
        out.append((name, weight, bias, transposed, in_features, out_features))
    return out


def layer_projections(model: nn.Module, specs: Sequence[ParamSpec], budget: int, seed: int,
                      side_dim: Optional[int] = None) -> list[LayerProjection]:
    """Random-sign projections of every tracked Linear (or Conv1D). With ``side_dim``, every side longer than
    ``side_dim`` is cut to ``side_dim`` coordinates (a CountSketch or a selection then takes the layers to
    ``budget``); without, every side is cut to the same length so that all layers together have at most
    ``budget`` coordinates (a pure Kronecker projection, LoGra's)."""
    shapes = layer_shapes(model, specs)
    rank = side_rank([(i, o) for *_, i, o in shapes], budget) if side_dim is None else int(side_dim)
    out = []
    for name, weight, bias, transposed, in_features, out_features in shapes:
        inputs = random_signs(seed, f"{name}:inputs", rank, in_features) if in_features > rank else None
        outputs = random_signs(seed, f"{name}:outputs", rank, out_features) if out_features > rank else None
        out.append(LayerProjection(name, None if weight is None else weight.name, None if bias is None else bias.name,
                                   in_features, out_features, inputs, outputs, transposed))
    return out


class CoordinateSelection:
    """Keeps the coordinates ``index`` of a row (``(B, n) -> (B, len(index))``): the eigen design's final step.

    Example:
        >>> CoordinateSelection(torch.tensor([0, 5, 7]))(torch.arange(10.0)[None])   # tensor([[0., 5., 7.]])
    """

    def __init__(self, index: torch.Tensor) -> None:
        self.index = index.to(torch.int64)
        self.dim = len(self.index)
        self._on: dict[torch.device, torch.Tensor] = {}

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.device not in self._on:
            self._on[rows.device] = self.index.to(rows.device)
        return rows.index_select(-1, self._on[rows.device])


def eigen_dim(shapes: Sequence[tuple[int, int]], budget: int, side_dim: int) -> int:
    """Coordinates of the eigen design: ``budget``, or fewer when all layers' sides (each cut to ``side_dim``)
    have fewer Kronecker pairs."""
    return min(budget, sum(min(i, side_dim) * min(o, side_dim) for i, o in shapes))


def eigen_side(moment: torch.Tensor, keep: int, reduction: Optional[torch.Tensor]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(projection (keep, side) float32, eigenvalues (keep,) float64)``: the ``keep`` leading eigenvectors of a
    side's second moment (taken after ``reduction`` when the side was first cut), largest first."""
    values, vectors = torch.linalg.eigh(moment.double())
    values, vectors = values.flip(0)[:keep].clamp_min(0.0), vectors.flip(1)[:, :keep]
    projection = vectors.T if reduction is None else vectors.T @ reduction.double()
    return projection.float().contiguous(), values


def eigen_projections(pre: Sequence[LayerProjection], moments: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      budget: int, side_dim: int) -> tuple[list[LayerProjection], torch.Tensor]:
    """The eigen design from each layer's side moments ``(E[x x^T] per position, E[dy dy^T] per example)``, taken
    on the sides of ``pre`` (whole, or first cut by random signs when very long): each side rotated into its
    leading ``side_dim`` eigenvectors, and the indices of the ``budget`` Kronecker pairs with the largest
    eigenvalue products ``lambda_out x lambda_in`` over all layers (the K-FAC estimate of the curvature along each
    pair), in increasing order."""
    layers, products = [], []
    for layer, (inputs, outputs) in zip(pre, moments):
        p_in, v_in = eigen_side(inputs, min(side_dim, layer.in_dim), layer.inputs)
        p_out, v_out = eigen_side(outputs, min(side_dim, layer.out_dim), layer.outputs)
        layers.append(LayerProjection(layer.name, layer.weight, layer.bias, layer.in_features, layer.out_features,
                                      p_in, p_out, layer.transposed))
        products.append((v_out[:, None] * v_in[None, :]).reshape(-1))
    curvature = torch.cat(products)
    keep = min(budget, len(curvature))
    order = torch.sort(curvature, descending=True, stable=True).indices[:keep]
    return layers, torch.sort(order).values
