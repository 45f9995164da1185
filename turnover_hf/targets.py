"""Which modules carry masks: default presets (heads, ``adapters`` bottlenecks and LoRA) and user targets.

Also the structural coverage rules used by the leakage report: which trainable parameters a set of masks keeps
away from the flipped sub-network.
"""

from __future__ import annotations

import re
from typing import Optional, Union

from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import TurnoverConfig
from .errors import NoTargetMatchedError
from .layers import MaskSite, is_adapters_lora

LINEAR_TYPES = (nn.Linear, Conv1D)
_BOTTLENECK = re.compile(r".*\.adapters\.[^.]+\.adapter_(down|up)")


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
        return int(module.lora_A.shape[0]) if is_adapters_lora(module) else None
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
    """Linear-like modules outside the base model (the task head), in registration order."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix or not hasattr(model, prefix) or getattr(model, prefix) is model:
        return []
    return [
        name for name, module in model.named_modules()
        if name and not (name == prefix or name.startswith(prefix + ".")) and isinstance(module, LINEAR_TYPES)
    ]


def _default_sites(model: nn.Module) -> list[tuple[str, str]]:
    sites: list[tuple[str, str]] = []
    heads = head_linears(model)
    # A head with hidden layers (RoBERTa, DistilBERT) masks the hidden layers' outputs: the final projection's
    # inputs are then masked already. A one-layer head masks the features entering it.
    if len(heads) == 1:
        sites.append((heads[0], "input"))
    else:
        sites.extend((name, "output") for name in heads[:-1])
    for name, module in model.named_modules():
        if _BOTTLENECK.fullmatch(name):
            sites.append((name, "output"))
        elif is_adapters_lora(module):
            sites.append((name, "rank"))
    return sites


def resolve_sites(model: nn.Module, config: TurnoverConfig) -> list[MaskSite]:
    """The masked modules of ``model`` under ``config`` (its recorded ``mask_sites`` if it has them)."""
    modules = dict(model.named_modules())
    if config.mask_sites is not None:
        sites = []
        for name, spec in config.mask_sites.items():
            if name not in modules:
                raise NoTargetMatchedError(
                    f"the turn-over config masks module {name!r}, which {type(model).__name__} does not have; load the "
                    "checkpoint into the same architecture (and the same adapters) it was trained with."
                )
            sites.append(MaskSite(name, spec["side"], int(spec["units"])))
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
            if by_name or by_type:
                side = "rank" if is_adapters_lora(module) else "input" if _name_matches(name, config.mask_inputs_of) else "output"
                chosen.append((name, side))
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
            "ending in one, and the adapters library's LoRA modules; narrow target_modules to those."
        )
    if not sites:
        available = [n for n, m in modules.items() if isinstance(m, LINEAR_TYPES)]
        shown = ", ".join(available[-12:]) + (" ..." if len(available) > 12 else "")
        raise NoTargetMatchedError(
            f"no module matched target_modules={config.target_modules!r}, target_module_types="
            f"{config.target_module_types!r} in {type(model).__name__}. Linear modules it has (last 12): {shown}"
        )
    return sites


def covered_parameters(model: nn.Module, sites: list[MaskSite]) -> set[str]:
    """Names of parameters whose every entry is kept from the flipped sub-network by ``sites``' masks."""
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
            add(site.name, module, ("lora_A", "lora_B"))
        elif site.side == "input":
            add(site.name, module, ("weight",))  # the bias is shared by every example: it leaks
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
