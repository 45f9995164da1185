"""The one place a mask touches activations: hooks on targeted modules and the masked LoRA forward.

Hooks and an in-place class swap (for the ``adapters`` library's LoRA) keep every parameter where it was, so a
patched model's ``state_dict`` keys are those of the unpatched model: influence-ready checkpoints are ordinary
Hugging Face weights plus ``turnover_config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .context import MaskState
from .errors import ConfigMismatchError, ExampleIdError


@dataclass(frozen=True)
class MaskSite:
    """A masked module: its qualified name (also the mask's layer key), which units are masked and how many."""

    name: str
    side: str  # "output": output units; "input": input features; "rank": LoRA rank units
    units: int

    def as_dict(self) -> dict[str, Any]:
        return {"side": self.side, "units": self.units}


def apply_mask(site: MaskSite, state: MaskState, x: torch.Tensor, module_training: bool) -> torch.Tensor:
    """``x`` times the batch's masks for ``site``, broadcast over every dimension between batch and units."""
    if x.shape[-1] != site.units:
        raise ConfigMismatchError(
            f"mask of {site.name!r} covers {site.units} units but the layer gave {x.shape[-1]}; the model does not "
            "match the turn-over config it was patched with (masks wider or narrower than the layer)."
        )
    mask = state.mask(site.name, site.units, x, module_training)
    if mask is None:
        return x
    rows = mask.shape[0]
    if x.shape[0] != rows and not (state.broadcast_batch and x.shape[0] == 1):
        raise ExampleIdError(
            f"{site.name!r} got a batch of {x.shape[0]} rows but {rows} example_ids; pass one id per row."
        )
    return x * mask.view(rows, *([1] * (x.dim() - 2)), site.units)


class OutputMaskHook:
    """Forward hook: masks a module's output units."""

    def __init__(self, site: MaskSite, state: MaskState) -> None:
        self.site, self.state = site, state

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return apply_mask(self.site, self.state, output, module.training)


class InputMaskHook:
    """Forward pre-hook: masks a module's input features."""

    def __init__(self, site: MaskSite, state: MaskState) -> None:
        self.site, self.state = site, state

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (apply_mask(self.site, self.state, args[0], module.training), *args[1:])


def is_adapters_lora(module: nn.Module) -> bool:
    """True for the ``adapters`` library's plain LoRA module (raw ``lora_A``/``lora_B`` factors)."""
    return type(module).__name__ == "LoRA" and type(module).__module__.startswith("adapters.")


def _masked_lora_forward(self: nn.Module, hidden_states: Optional[torch.Tensor], layer_input: torch.Tensor):
    # The adapters library's LoRA.forward with the mask on the rank units (A's outputs = B's inputs),
    # which covers every entry of A and B.
    if hidden_states is None:
        hidden_states = layer_input
    rank = self.lora_dropout(hidden_states) @ torch.t(self.lora_A)
    rank = apply_mask(self.turnover_site, self.turnover_state, rank, self.training)
    hidden_states = rank @ torch.t(self.lora_B)
    if self.use_gating:
        gate = torch.sigmoid(self.gate(layer_input))
        gate = torch.mean(gate, dim=1).unsqueeze(-1)
        hidden_states = hidden_states * gate
    else:
        gate = None
        hidden_states = hidden_states * self.scaling
    return hidden_states, gate


_MASKED_CLASSES: dict[type, type] = {}


def masked_lora_class(cls: type) -> type:
    """A subclass of the LoRA class whose forward masks the rank units (cached, so isinstance checks hold)."""
    if cls not in _MASKED_CLASSES:
        _MASKED_CLASSES[cls] = type(f"TurnoverMasked{cls.__name__}", (cls,), {"forward": _masked_lora_forward})
    return _MASKED_CLASSES[cls]
