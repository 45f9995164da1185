"""Mask sites, i.e. which modules carry masks: default presets (heads, ``adapters`` bottlenecks, LoRA of ``adapters``
and PEFT) and the modules a user names in ``target_modules``.

Also the structural coverage rules used by the leakage report: which trainable parameters a set of masks keeps
away from the flipped sub-network.

LoRA of both libraries is one kind of site, side ``"rank"``: the mask sits on the rank units (A's outputs = B's
inputs), which covers every entry of A and B. For the ``adapters`` library the site is its ``LoRA`` module (raw
factors); for PEFT it is the ``lora_A.<adapter>`` Linear of a LoRA layer, whose output units are the rank units.
Names are read on the transformers model inside a PEFT ``PeftModel`` (:func:`inner_model`), so a site is called
``transformer.h.0.attn.c_attn.lora_A.default`` whether or not the model is wrapped.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import TurnoverConfig
from .errors import NoTargetMatchedError

LINEAR_TYPES = (nn.Linear, Conv1D)
_BOTTLENECK = re.compile(r".*\.adapters\.[^.]+\.adapter_(down|up)")
_PEFT_A = re.compile(r"(.+)\.lora_A\.([^.]+)")
# PEFT's frozen originals and LoRA factors are not heads, whatever their position in the model.
_NOT_A_HEAD = re.compile(r"(.*\.)?(original_module|lora_A|lora_B|base_layer)(\..*)?")


@dataclass(frozen=True)
class MaskSite:
    """A masked module: its qualified name (also the mask's layer key), which units are masked and how many."""

    name: str
    side: str  # "output": output units; "input": input features; "rank": LoRA rank units
    units: int
    channels: int = 1  # > 1: parallel masked copies of an input-masked nn.Linear (see the module docstring)

    def as_dict(self) -> dict[str, Any]:
        # "channels" only when used, so configs written before channels existed compare equal.
        spec: dict[str, Any] = {"side": self.side, "units": self.units}
        if self.channels > 1:
            spec["channels"] = self.channels
        return spec


def is_adapters_lora(module: nn.Module) -> bool:
    """True for the ``adapters`` library's plain LoRA module (raw ``lora_A``/``lora_B`` factors)."""
    return type(module).__name__ == "LoRA" and type(module).__module__.startswith("adapters.")


def _is_peft(module: nn.Module) -> bool:
    return type(module).__module__.startswith("peft.")


def inner_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT ``PeftModel`` (masks are named and heads found there); else ``model``.

    Example:
        >>> inner_model(get_peft_model(gpt2, LoraConfig(...))) is gpt2
        True
    """
    if _is_peft(model) and callable(getattr(type(model), "get_base_model", None)):
        return model.get_base_model()
    return model


def _is_peft_lora_layer(module: nn.Module) -> bool:
    return _is_peft(module) and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)


def _active_adapters_of(module: nn.Module) -> list[str]:
    active = getattr(module, "active_adapters", None)
    if active is None:
        return []
    return [active] if isinstance(active, str) else list(active)


def _check_peft_lora(name: str, layer: nn.Module, adapter: str) -> None:
    """Refuse PEFT LoRA layers whose rank units are not the only way A and B reach the output."""
    if getattr(layer, "merged", False):
        raise NoTargetMatchedError(
            f"the PEFT LoRA layer {name!r} is merged into its base weights, so no mask can reach its rank units; "
            "call model.unmerge_adapter() before patching."
        )
    variant = getattr(layer, "lora_variant", {}) or {}
    if adapter in variant:
        raise NoTargetMatchedError(
            f"the PEFT LoRA layer {name!r} uses the variant {type(variant[adapter]).__name__} (e.g. DoRA), whose "
            "weight norm mixes every rank unit for every example; turn-over masks support plain LoRA "
            "(use_dora=False)."
        )


def _rank_sites(name: str, module: nn.Module) -> list[str]:
    """The rank sites of a LoRA module: the module itself (``adapters``) or its active ``lora_A.<adapter>`` (PEFT)."""
    if is_adapters_lora(module):
        return [name]
    if _is_peft_lora_layer(module):
        sites = []
        for adapter in _active_adapters_of(module):
            if adapter in module.lora_A:
                _check_peft_lora(name, module, adapter)
                sites.append(f"{name}.lora_A.{adapter}")
        return sites
    return []


def _peft_lora_of(modules: dict[str, nn.Module], name: str) -> Optional[tuple[nn.Module, str, str]]:
    """(LoRA layer, adapter, name of B) if ``name`` is PEFT's ``<layer>.lora_A.<adapter>``; else None."""
    match = _PEFT_A.fullmatch(name)
    if match is None:
        return None
    layer = modules.get(match.group(1))
    if layer is None or not _is_peft_lora_layer(layer):
        return None
    return layer, match.group(2), f"{match.group(1)}.lora_B.{match.group(2)}"


def _units_of_linear(module: nn.Module, side: str) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features if side == "output" else module.in_features
    # transformers' Conv1D stores its weight as (in_features, out_features).
    return module.weight.shape[1] if side == "output" else module.weight.shape[0]


def _last_linear(module: nn.Sequential) -> Optional[nn.Module]:
    """The last Linear-like child of a Sequential if only parameter-free (elementwise) modules follow it."""
    for child in reversed(list(module.children())):
        if isinstance(child, LINEAR_TYPES):
            return child
        if any(True for _ in child.parameters()):
            return None
    return None


def units_of(module: nn.Module, side: str) -> Optional[int]:
    """How many units a mask on ``side`` of ``module`` covers, or None if that module kind is not supported."""
    if side == "rank":
        if is_adapters_lora(module):
            return int(module.lora_A.shape[0])
        return module.out_features if isinstance(module, nn.Linear) else None  # PEFT's lora_A
    if isinstance(module, LINEAR_TYPES):
        return _units_of_linear(module, side)
    if isinstance(module, nn.Sequential) and side == "output":
        last = _last_linear(module)
        return _units_of_linear(last, side) if last is not None else None
    if isinstance(module, nn.Sequential) and side == "input":
        first = next(iter(module.children()), None)
        return _units_of_linear(first, side) if isinstance(first, LINEAR_TYPES) else None
    return None


def _name_matches(name: str, patterns: Union[list[str], str, None]) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def head_linears(model: nn.Module) -> list[str]:
    """Linear-like modules outside the base model (the task head), in registration order.

    In a PEFT model the head of ``modules_to_save`` counts through its trainable copy of the active adapter
    (``score.modules_to_save.default``); the frozen original and LoRA factors never do.
    """
    model = inner_model(model)
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix or not hasattr(model, prefix) or getattr(model, prefix) is model:
        return []
    inactive = [
        f"{name}.modules_to_save.{adapter}."
        for name, module in model.named_modules() if _is_peft(module) and isinstance(getattr(module, "modules_to_save", None), nn.ModuleDict)
        for adapter in module.modules_to_save if adapter not in _active_adapters_of(module)
    ]
    return [
        name for name, module in model.named_modules()
        if name and not (name == prefix or name.startswith(prefix + ".")) and isinstance(module, LINEAR_TYPES)
        and not _NOT_A_HEAD.fullmatch(name) and not any((name + ".").startswith(p) for p in inactive)
    ]


def _default_sites(model: nn.Module) -> list[tuple[str, str]]:
    sites: list[tuple[str, str]] = []
    heads = head_linears(model)
    if any(_is_peft(module) for module in model.modules()):
        # A PEFT model trains only its adapters and modules_to_save: a frozen head is not worth masking.
        heads = [name for name in heads if ".modules_to_save." in name]
    # A head with hidden layers (RoBERTa, DistilBERT) masks the hidden layers' outputs: the final projection's
    # inputs are then masked already. A one-layer head masks the features entering it.
    if len(heads) == 1:
        sites.append((heads[0], "input"))
    else:
        sites.extend((name, "output") for name in heads[:-1])
    for name, module in model.named_modules():
        if _BOTTLENECK.fullmatch(name):
            sites.append((name, "output"))
        sites.extend((site, "rank") for site in _rank_sites(name, module))
    return sites


def resolve_sites(model: nn.Module, config: TurnoverConfig) -> list[MaskSite]:
    """The masked modules of ``model`` under ``config`` (its recorded ``mask_sites`` if it has them)."""
    model = inner_model(model)
    modules = dict(model.named_modules())
    if config.mask_sites is not None:
        sites = []
        for name, spec in config.mask_sites.items():
            if name not in modules:
                raise NoTargetMatchedError(
                    f"the turn-over config masks module {name!r}, which {type(model).__name__} does not have; load the "
                    "checkpoint into the same architecture (and the same adapters) it was trained with."
                )
            peft_lora = _peft_lora_of(modules, name) if spec["side"] == "rank" else None
            if peft_lora is not None:
                _check_peft_lora(name, peft_lora[0], peft_lora[1])
            sites.append(MaskSite(name, spec["side"], int(spec["units"]), int(spec.get("channels", 1))))
        return sites

    if config.target_modules is None and not config.target_module_types:
        chosen = _default_sites(model)
    else:
        chosen = []
        for name, module in modules.items():
            if not name:
                continue
            by_name = _name_matches(name, config.target_modules)
            by_type = type(module).__name__ in (config.target_module_types or ())
            if not (by_name or by_type):
                continue
            rank = _rank_sites(name, module)
            if rank:
                chosen.extend((site, "rank") for site in rank if site not in dict(chosen))
            elif _peft_lora_of(modules, name) is not None:
                if name not in dict(chosen):
                    chosen.append((name, "rank"))
            else:
                chosen.append((name, "input" if _name_matches(name, config.mask_inputs_of) else "output"))
    if config.mask_inputs_of is not None:
        chosen = [(n, "input" if _name_matches(n, config.mask_inputs_of) and s != "rank" else s) for n, s in chosen]
    chosen = [(n, s) for n, s in chosen if not _name_matches(n, config.exclude_modules)]

    sites, unsupported = [], []
    for name, side in chosen:
        units = units_of(modules[name], side)
        if units is None:
            unsupported.append(f"{name} ({type(modules[name]).__name__})")
        else:
            sites.append(MaskSite(name, side, units))
    if unsupported:
        raise NoTargetMatchedError(
            f"cannot mask these modules: {unsupported}. Turn-over masks go on Linear / Conv1D layers, Sequentials "
            "ending in one, and the LoRA modules of the adapters library and of PEFT; narrow target_modules to those."
        )
    if not sites:
        available = [n for n, m in modules.items() if isinstance(m, LINEAR_TYPES)]
        shown = ", ".join(available[-12:]) + (" ..." if len(available) > 12 else "")
        raise NoTargetMatchedError(
            f"no module matched target_modules={config.target_modules!r}, target_module_types="
            f"{config.target_module_types!r} in {type(model).__name__}. Linear modules it has (last 12): {shown}"
        )
    return _with_channels(modules, sites, config.channels) if config.channels > 1 else sites


def _with_channels(modules: dict[str, nn.Module], sites: list[MaskSite], channels: int) -> list[MaskSite]:
    """``channels`` on every input-masked ``nn.Linear`` site; refuse when none can carry them."""
    if any(_is_peft(module) for module in modules.values()):
        raise NoTargetMatchedError(
            f"channels={channels} is not supported on PEFT models (PEFT saves only its own adapter weights, not the "
            "extra mask channels); use channels=1 there, or an ensemble of mask seeds."
        )
    out = []
    for site in sites:
        if site.side == "input" and isinstance(modules[site.name], Conv1D):
            raise NoTargetMatchedError(
                f"channels={channels}: {site.name!r} is a Conv1D; mask channels are implemented for nn.Linear inputs "
                "only. Use channels=1, or exclude that module."
            )
        if site.side == "input" and isinstance(modules[site.name], nn.Linear):
            site = dataclasses.replace(site, channels=channels)
        out.append(site)
    if all(site.channels == 1 for site in out):
        listed = ", ".join(f"{s.name} ({s.side})" for s in sites)
        raise NoTargetMatchedError(
            f"channels={channels} applies to Linear modules whose inputs are masked (a one-layer classification head "
            f"by default), but no masked site is one: {listed}. Mask a Linear's inputs with "
            "TurnoverConfig(mask_inputs_of=[...]), or use channels=1."
        )
    return out


def covered_parameters(model: nn.Module, sites: list[MaskSite]) -> set[str]:
    """Names of parameters whose every entry is kept from the flipped sub-network by ``sites``' masks."""
    model = inner_model(model)
    modules = dict(model.named_modules())
    covered: set[str] = set()
    output_units = {s.name for s in sites if s.side == "output"}

    def add(module_name: str, module: nn.Module, names: tuple[str, ...]) -> None:
        for pname in names:
            if getattr(module, pname, None) is not None:
                covered.add(f"{module_name}.{pname}" if module_name else pname)

    for site in sites:
        module = modules[site.name]
        if site.side == "rank":
            peft_lora = _peft_lora_of(modules, site.name)
            if peft_lora is None:
                add(site.name, module, ("lora_A", "lora_B"))
            else:  # PEFT: every row of A; B only reads the rank units, but its bias (lora_bias=True) is shared
                add(site.name, module, ("weight", "bias"))
                add(peft_lora[2], modules[peft_lora[2]], ("weight",))
        elif site.side == "input":
            # the biases are shared by every example: they leak
            add(site.name, module, ("weight", "turnover_channel_weight"))
        elif isinstance(module, LINEAR_TYPES):
            add(site.name, module, ("weight", "bias"))
        elif isinstance(module, nn.Sequential):
            last = _last_linear(module)
            for child_name, child in module.named_children():
                if child is last:
                    add(f"{site.name}.{child_name}", child, ("weight", "bias"))
    # The final projection of a multi-layer head reads only masked hidden units: its weight is covered.
    heads = head_linears(model)
    if len(heads) > 1 and heads[-2] in output_units:
        add(heads[-1], modules[heads[-1]], ("weight",))
    return covered
