"""The one place a mask touches activations: hooks on targeted modules, the masked LoRA forward and mask channels.

Hooks and an in-place class swap (for the ``adapters`` library's LoRA) keep every parameter where it was, so a
patched model's ``state_dict`` keys are those of the unpatched model: influence-ready checkpoints are ordinary
Hugging Face weights plus ``turnover_config.json``.

Mask channels (``TurnoverConfig(channels=K)``) are the one exception: an input-masked ``nn.Linear`` becomes ``K``
parallel copies of itself, each reading the features under its own mask of every example, outputs averaged:
``y = (1/K) sum_c W_c (m_c(z) * x) + b_c``. Copy 0 is the module's own ``weight``/``bias``; copies 1..K-1 are the
extra parameters ``turnover_channel_weight`` ``(K-1, out, in)`` and ``turnover_channel_bias`` ``(K-1, out)``, saved
with the weights. The masks of all channels are one mask of ``K x in`` units under the module's layer key (channel
``c`` is columns ``c*in .. (c+1)*in``), so channel 0 has exactly the single-channel mask. Every column of every
copy is kept from the flipped sub-network as before (the biases are shared by all examples, as without channels),
while the score averages ``K`` independent half-networks: the noise of the difference between two random
half-networks, which dominates a single model's scores, shrinks about like ``1/sqrt(K)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .context import MaskState
from .errors import ConfigMismatchError, ExampleIdError
from .sites import MaskSite


def _batch_mask(site: MaskSite, state: MaskState, x: torch.Tensor, module_training: bool) -> Optional[torch.Tensor]:
    """The open context's masks of ``site`` for the batch ``x``, ``(rows, channels * units)``; None = full network."""
    if x.shape[-1] != site.units:
        raise ConfigMismatchError(
            f"mask of {site.name!r} covers {site.units} units but the layer gave {x.shape[-1]}; the model does not "
            "match the turn-over config it was patched with (masks wider or narrower than the layer)."
        )
    mask = state.mask(site.name, site.channels * site.units, x, module_training)
    if mask is not None and x.shape[0] != mask.shape[0] and not (state.broadcast_batch and x.shape[0] == 1):
        raise ExampleIdError(
            f"{site.name!r} got a batch of {x.shape[0]} rows but {mask.shape[0]} example_ids; pass one id per row."
        )
    return mask


def apply_mask(site: MaskSite, state: MaskState, x: torch.Tensor, module_training: bool) -> torch.Tensor:
    """``x`` times the batch's masks for ``site``, broadcast over every dimension between batch and units."""
    mask = _batch_mask(site, state, x, module_training)
    if mask is None:
        return x
    return x * mask.view(mask.shape[0], *([1] * (x.dim() - 2)), site.units)


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


# -- mask channels ----------------------------------------------------------------------------------------------------
CHANNEL_WEIGHT = "turnover_channel_weight"
CHANNEL_BIAS = "turnover_channel_bias"
_CHANNEL_CLASSES: dict[type, type] = {}


def channel_stack(module: nn.Linear) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """All copies of a Linear: weights ``(K, out, in)`` and biases ``(K, out)`` (or None), copy 0 first; ``K = 1``
    for a Linear without mask channels."""
    extra = getattr(module, CHANNEL_WEIGHT, None)
    weight = module.weight.unsqueeze(0) if extra is None else torch.cat([module.weight.unsqueeze(0), extra])
    if module.bias is None:
        return weight, None
    bias = module.bias.unsqueeze(0)
    return weight, bias if extra is None else torch.cat([bias, getattr(module, CHANNEL_BIAS)])


def channel_logits(module: nn.Linear, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(1/K) sum_c W_c (m_c * x) + b_c`` for ``x`` ``(B or 1, ..., in)`` and masks ``(B, K * in)``.

    Each row's masks fold into one effective weight ``(1/K) sum_c m_c * W_c`` (``(B, out, in)``), so positions and
    targets that share a row (a sequence, or targets on the position axis) cost one product, never ``K`` copies
    of the input."""
    weight, bias = channel_stack(module)
    k, out_features, in_features = weight.shape
    rows = masks.shape[0]
    effective = torch.einsum("bki,koi->boi", masks.view(rows, k, in_features), weight) / k
    flat = x.reshape(x.shape[0], -1, in_features)  # (B or 1, positions, in)
    y = torch.matmul(flat, effective.transpose(1, 2)).reshape(rows, *x.shape[1:-1], out_features)
    return y if bias is None else y + bias.mean(0)


def _channel_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    mask = _batch_mask(self.turnover_site, self.turnover_state, x, self.training)
    if mask is None:  # the full network: the mean of the copies
        weight, bias = channel_stack(self)
        return nn.functional.linear(x, weight.mean(0), None if bias is None else bias.mean(0))
    return channel_logits(self, x, mask)


def masked_channel_class(cls: type) -> type:
    """A subclass of an ``nn.Linear`` class whose forward runs its mask channels (cached, like LoRA's)."""
    if cls not in _CHANNEL_CLASSES:
        _CHANNEL_CLASSES[cls] = type(f"TurnoverChannel{cls.__name__}", (cls,), {"forward": _channel_linear_forward})
    return _CHANNEL_CLASSES[cls]


def add_channels(module: nn.Linear, site: MaskSite, state: MaskState) -> None:
    """Give ``module`` its ``site.channels - 1`` extra copies (initialised to its own weights, so the full network
    is unchanged) and the channel forward."""
    extra = site.channels - 1
    with torch.no_grad():
        weight = nn.Parameter(module.weight.detach().unsqueeze(0).repeat(extra, 1, 1),
                              requires_grad=module.weight.requires_grad)
        module.register_parameter(CHANNEL_WEIGHT, weight)
        if module.bias is not None:
            bias = nn.Parameter(module.bias.detach().unsqueeze(0).repeat(extra, 1), requires_grad=module.bias.requires_grad)
            module.register_parameter(CHANNEL_BIAS, bias)
    module.turnover_site, module.turnover_state = site, state
    module.turnover_original_class = type(module)
    module.__class__ = masked_channel_class(type(module))


def fold_channels(module: nn.Linear) -> None:
    """Undo :func:`add_channels`: the module's weights become the mean of its copies (the same full network)."""
    weight, bias = channel_stack(module)
    with torch.no_grad():
        module.weight.copy_(weight.mean(0))
        if bias is not None:
            module.bias.copy_(bias.mean(0))
    for name in (CHANNEL_WEIGHT, CHANNEL_BIAS):
        if name in module._parameters:
            del module._parameters[name]
