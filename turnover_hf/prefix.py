"""Prefix reuse: compute the part of the network below the first mask once per target, replay it for every mask.

Everything below the first masked module does not depend on the example's mask. A :class:`PrefixReplay` finds
the modules that run entirely below the masks (the whole base model when only the head is masked, otherwise the
transformer layers under the lowest masked layer), records their outputs in one pass over the targets (full
network), and then, for a batch of (target, mask) rows, makes those modules return the recorded outputs of each
row's target instead of computing them. Everything above runs as usual, so the loss of each row is the loss of
the real model under that row's mask.

Example:
    >>> replay = PrefixReplay.for_model(model)
    >>> with replay.recorded(model_inputs_of_targets):        # one pass: T targets
    ...     with replay.replaying(row_target):                # masked pass: rows pick their target
    ...         logits = model(**rows_inputs).logits
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .context import instance_masks, state_of
from .layers import channel_stack
from .sites import head_linears, inner_model


def _layer_list(base: nn.Module) -> tuple[str, Optional[nn.ModuleList]]:
    """The transformer's stack of layers: the ModuleList of the base model holding the most parameters."""
    best, best_size = ("", None), 0
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    return best


def _select_rows(obj: Any, index: torch.Tensor) -> Any:
    """``obj`` (a tensor, tuple, list, dict or ModelOutput of tensors) with batch rows picked by ``index``."""
    if isinstance(obj, torch.Tensor):
        return obj.index_select(0, index.to(obj.device)) if obj.dim() > 0 else obj
    if dataclasses.is_dataclass(obj) and isinstance(obj, dict):  # transformers' ModelOutput
        return type(obj)(**{k: _select_rows(v, index) for k, v in obj.items()})
    if isinstance(obj, dict):
        return {k: _select_rows(v, index) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_select_rows(v, index) for v in obj)
    return obj


class PrefixReplay:
    """Record the outputs of mask-free lower modules once per target and replay them per (target, mask) row."""

    def __init__(self, modules: list[tuple[str, nn.Module]]) -> None:
        self.modules = modules
        self._outputs: dict[str, Any] = {}

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.modules]

    @classmethod
    def for_model(cls, model: nn.Module) -> Optional["PrefixReplay"]:
        """The replay for a patched model, or None when the lowest mask sits in the first layer (nothing to reuse)."""
        sites = [s.name for s in state_of(model).sites]
        model = inner_model(model)  # a PEFT model's masks are named in the transformers model inside it
        prefix = getattr(model, "base_model_prefix", "") or ""
        base = getattr(model, prefix, None) if prefix else None
        if base is None or base is model:
            return None
        in_base = [s for s in sites if s == prefix or s.startswith(prefix + ".")]
        if not in_base:
            return cls([(prefix, base)])  # masks only in the head: the whole base model is the prefix
        layers_name, layers = _layer_list(base)
        if layers is None:
            return None
        layers_path = f"{prefix}.{layers_name}"
        first_masked = len(layers)
        for site in in_base:
            if not site.startswith(layers_path + "."):
                return None  # a mask below the layer stack (e.g. embeddings): no prefix to reuse
            first_masked = min(first_masked, int(site[len(layers_path) + 1 :].split(".")[0]))
        if first_masked == 0:
            return None
        return cls([(f"{layers_path}.{i}", layers[i]) for i in range(first_masked)])

    @contextlib.contextmanager
    def recorded(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> Iterator[None]:
        """Run the targets once through the full network, keeping the prefix modules' outputs while open."""

        def keep(name: str):
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                self._outputs[name] = output

            return hook

        handles = [module.register_forward_hook(keep(name)) for name, module in self.modules]
        try:
            with torch.no_grad(), instance_masks(model, mode="off"):
                model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        try:
            yield
        finally:
            self._outputs = {}

    @contextlib.contextmanager
    def replaying(self, row_target: torch.Tensor) -> Iterator[None]:
        """Make the prefix modules return the recorded output of each row's target (rows = ``row_target``)."""
        saved = []
        for name, module in self.modules:
            output = _select_rows(self._outputs[name], row_target)
            saved.append((module, module.__dict__.get("forward")))
            module.forward = lambda *args, _out=output, **kwargs: _out
        try:
            yield
        finally:
            for module, original in saved:
                if original is None:
                    del module.forward
                else:
                    module.forward = original


def closed_form_head(model: nn.Module) -> Optional[str]:
    """The name of the head's single Linear when it is the only masked module, on its input features; else None.

    Then loss(target | m) for every mask m comes from one matrix product (see :func:`head_logits`).
    """
    sites = state_of(model).sites
    heads = head_linears(model)
    if len(sites) == 1 and sites[0].side == "input" and len(heads) == 1 and sites[0].name == heads[0]:
        module = dict(inner_model(model).named_modules())[heads[0]]
        return heads[0] if isinstance(module, nn.Linear) else None
    return None


def head_features(model: nn.Module, head_name: str, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The features entering the head (unmasked) and the model's logits, from one full-network pass."""
    head = dict(inner_model(model).named_modules())[head_name]
    seen: dict[str, torch.Tensor] = {}
    handle = head.register_forward_pre_hook(lambda module, args: seen.__setitem__("x", args[0]))
    try:
        with torch.no_grad(), instance_masks(model, mode="off"):
            logits = model(**inputs).logits
    finally:
        handle.remove()
    return seen["x"], logits


def head_logits(head: nn.Linear, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Logits of every (mask, target) pair, shape (N, T, C): ``(masks[n] * features[t]) @ W.T + b`` as one GEMM.

    A head with ``K`` mask channels takes masks of ``K x d`` units: ``(1/K) sum_c (m_c * f) @ W_c.T + b_c``."""
    weight, bias = channel_stack(head)  # (K, C, d), (K, C)
    k, classes, width = weight.shape
    # (T, K, d, C) -> rows (channel, feature), columns (target, class)
    per_target = features[:, None, :, None] * weight.transpose(1, 2)[None]
    logits = masks @ per_target.permute(1, 2, 0, 3).reshape(k * width, -1) / k  # (N, T*C)
    logits = logits.view(masks.shape[0], features.shape[0], classes)
    return logits + bias.mean(0) if bias is not None else logits
