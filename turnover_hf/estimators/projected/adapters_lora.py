"""The ``adapters`` library's LoRA matrices as Linear layers the projection can track.

A LoRA module of ``adapters`` (``adapters.methods.lora.LoRA``, called by a ``LoRALinear``) computes
``h = s (x A^T) B^T`` from its input ``x`` with bare parameters ``A`` (``r x in``) and ``B`` (``out x r``) and the
scaling ``s``. Each matrix is a Linear without bias: ``A`` maps ``x`` to ``u = x A^T``, ``B`` maps ``u`` to ``h / s``.
A forward hook on the LoRA module records ``x`` and ``h``; the output gradients follow from the one ``dL/dh``
autograd gives: ``dL/du = s (dL/dh) B`` for ``A`` and ``s dL/dh`` for ``B``. A patched model's LoRA masks the rank
units (``turnover_hf.layers``: ``h = s (m * u) B^T``), so there ``B``'s input is ``m * u`` and ``A``'s output
gradient is ``m * s (dL/dh) B``. A layer name here is the parameter's own name (``...loras.<adapter>.lora_A``),
never a module's.

Covered: additive LoRA without gating or DoRA, inside a ``LoRALinear`` (BERT, RoBERTa, Llama, ... attention and
feed-forward layers). Not covered (left to another estimator, with the other untracked parameters): gated LoRA,
DoRA, and GPT-2's merged ``c_attn`` (``LoRAMergedLinear``), which multiplies by ``B`` as a grouped convolution
without calling the LoRA module.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from ...layers import apply_mask, masked_lora_class

LEAVES = ("lora_A", "lora_B")
# one recorded call of a layer: (its input, the tensor autograd differentiates, how its gradient becomes the layer's
# output gradient; None: it already is)
Call = tuple[torch.Tensor, torch.Tensor, Optional[Callable[[torch.Tensor], torch.Tensor]]]


def _lora_classes() -> Optional[tuple[type, type]]:
    try:
        from adapters.methods.lora import LoRA, LoRALinear
    except ImportError:  # the adapters library is not installed: no model can hold its LoRA
        return None
    return LoRA, LoRALinear


def _rank_mask(module: nn.Module, rank: torch.Tensor) -> Optional[torch.Tensor]:
    """The multiplier a patched LoRA puts on its rank units for this batch (broadcast like ``rank``), or None."""
    site = getattr(module, "turnover_site", None)
    if site is None:
        return None
    return apply_mask(site, module.turnover_state, torch.ones_like(rank), module.training)


def lora_matrix_sizes(modules: Mapping[str, nn.Module], name: str) -> Optional[tuple[int, int]]:
    """``(in, out)`` of the parameter ``name`` when it is a covered ``adapters`` LoRA matrix, else ``None``.

    Example:
        >>> lora_matrix_sizes(dict(model.named_modules()), "bert.encoder.layer.0.attention.self.query.loras.lo.lora_A")
        (32, 4)
    """
    classes = _lora_classes()
    owner, _, leaf = name.rpartition(".")
    module = modules.get(owner)
    if (classes is None or leaf not in LEAVES or not isinstance(module, classes[0])
            or type(module).forward not in (classes[0].forward, masked_lora_class(classes[0]).forward)):
        return None
    layer = modules.get(owner.rsplit(".", 2)[0]) if owner.count(".") >= 2 else None  # <layer>.loras.<adapter>
    if (not isinstance(layer, classes[1]) or getattr(module, "use_gating", True) or getattr(module, "use_dora", True)
            or getattr(module, "composition_mode", None) != "add"):
        return None
    out_features, in_features = getattr(module, leaf).shape
    return in_features, out_features


def _masked(x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    return x if keep is None else x * keep.to(x.dtype)


@contextlib.contextmanager
def lora_calls(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, list[Call]]]:
    """``{matrix name: [(input, LoRA output, gradient map), ...]}``: every call of the LoRA modules owning the
    named matrices inside the block. The hooks run before any other forward hook of the module (``prepend``), so
    an output mask enters the gradient through the chain rule."""
    modules = dict(model.named_modules())
    calls: dict[str, list[Call]] = {name: [] for name in names}
    owners: dict[str, list[str]] = {}
    for name in names:
        owners.setdefault(name.rpartition(".")[0], []).append(name)

    def keeper(wanted: list[str]) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            layer_input = args[1] if len(args) > 1 else kwargs.get("layer_input")
            x = module.lora_dropout(layer_input if hidden is None else hidden).detach()  # the model is in eval mode
            h = output[0] if isinstance(output, tuple) else output
            scaling, b = module.scaling, module.lora_B.detach()
            rank = x @ module.lora_A.detach().t().to(x.dtype)
            keep = _rank_mask(module, rank)
            for name in wanted:
                if name.endswith(".lora_A"):
                    calls[name].append((x, h, lambda g: _masked((g * scaling) @ b.to(g.dtype), keep)))
                else:
                    calls[name].append((_masked(rank, keep), h, lambda g: g * scaling))

        return hook

    handles = [modules[owner].register_forward_hook(keeper(wanted), prepend=True, with_kwargs=True)
               for owner, wanted in owners.items()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()
