"""Inject turn-over dropout into a model, audit what still leaks into the flipped sub-network, and undo it."""

from __future__ import annotations

import copy
import logging
import types
from typing import Optional

from torch import nn

from .config import TurnoverConfig
from .context import MaskState, state_of
from .errors import ConfigMismatchError, NotPatchedError, TurnoverError
from .layers import InputMaskHook, OutputMaskHook, masked_lora_class
from .targets import covered_parameters, resolve_sites, units_of

logger = logging.getLogger(__name__)


def is_patched(model: nn.Module) -> bool:
    """True if ``model`` (or the model inside a wrapper) carries turn-over dropout."""
    try:
        state_of(model)
    except NotPatchedError:
        return False
    return True


def _active_adapter_names(model: nn.Module) -> Optional[list[str]]:
    active = getattr(model, "active_adapters", None)
    if active is None or not hasattr(model, "adapters_config"):
        return None
    flat = getattr(active, "flatten", None)
    return sorted(flat()) if callable(flat) else [str(active)]


def patch_model(
    model: nn.Module, config: Optional[TurnoverConfig] = None, *, freeze_leaking: bool = False, warn_leaking: bool = True
) -> nn.Module:
    """Give every example its own dropout mask in the targeted modules of ``model`` (in place; returns it).

    The patched model behaves as before in ``eval()`` mode outside any context (the full network). In training,
    batches must carry ``example_ids`` (``TurnoverTrainer`` does this). Trainable parameters that the masks do not
    cover are listed in a warning (see :func:`leakage_report`); ``freeze_leaking=True`` freezes them.

    Example:
        >>> model = AutoModelForSequenceClassification.from_pretrained("bert-base-uncased", num_labels=2)
        >>> model = patch_model(model, TurnoverConfig(p=0.5, seed=0))
        >>> model.turnover_config.mask_sites        # {'classifier': {'side': 'input', 'units': 768}}
    """
    if is_patched(model):
        raise TurnoverError("this model is patched already; call turnover_hf.unpatch_model(model) before patching again.")
    config = copy.deepcopy(config) if config is not None else TurnoverConfig()
    sites = resolve_sites(model, config)
    recorded = config.mask_sites
    resolved = {s.name: s.as_dict() for s in sites}
    modules = dict(model.named_modules())
    for site in sites:
        actual = units_of(modules[site.name], site.side)
        if actual is not None and actual != site.units:
            raise ConfigMismatchError(
                f"the turn-over config masks {site.units} units of {site.name!r} but that layer has {actual}: masks "
                "wider or narrower than the layer. Load the checkpoint into the model it was trained with."
            )
    config.mask_sites = resolved
    active = _active_adapter_names(model)
    if recorded is not None and config.active_adapters is not None and active != config.active_adapters:
        raise ConfigMismatchError(
            f"the checkpoint was patched with active adapters {config.active_adapters} but the model has {active}; "
            "activate the same adapters (model.set_active_adapters(...)) before patching."
        )
    config.active_adapters = active

    state = MaskState(config)
    handles = []
    for site in sites:
        module = modules[site.name]
        if site.side == "output":
            handles.append(module.register_forward_hook(OutputMaskHook(site, state)))
        elif site.side == "input":
            handles.append(module.register_forward_pre_hook(InputMaskHook(site, state)))
        else:
            module.turnover_site, module.turnover_state = site, state
            module.turnover_original_class = type(module)
            module.__class__ = masked_lora_class(type(module))
    state.handles = handles
    state.sites = sites
    model.turnover_state = state
    model.turnover_config = config
    if hasattr(type(model), "save_pretrained"):
        from .checkpoint import push_influence_ready, save_influence_ready

        # Instance attributes, so Trainer checkpoints (which call model.save_pretrained) and model.push_to_hub
        # write turnover_config.json and the model card too.
        model.save_pretrained = types.MethodType(save_influence_ready, model)
        model.push_to_hub = types.MethodType(push_influence_ready, model)

    leaking = leakage_report(model)
    if leaking and freeze_leaking:
        frozen = freeze_leaking_parameters(model)
        logger.info("turn-over dropout: froze %d parameter(s) no instance mask covers: %s", len(frozen),
                    ", ".join(frozen[:8]) + (" ..." if len(frozen) > 8 else ""))
    elif leaking and warn_leaking:
        logger.warning(
            "turn-over dropout: %d trainable parameter(s) are not covered by instance masks and learn from every "
            "example, so the flipped sub-network is not free of it: %s. Freeze them with "
            "patch_model(..., freeze_leaking=True) or turnover_hf.freeze_leaking_parameters(model).",
            len(leaking), ", ".join(leaking[:8]) + (" ..." if len(leaking) > 8 else ""),
        )
    return model


def leakage_report(model: nn.Module) -> list[str]:
    """Trainable parameters of a patched model that no instance mask covers (they leak z into the flipped network).

    Example:
        >>> leakage_report(model)
        ['classifier.bias']
    """
    state = state_of(model)
    target = _unwrap(model)
    covered = covered_parameters(target, state.sites)
    return [name for name, param in target.named_parameters() if param.requires_grad and name not in covered]


def freeze_leaking_parameters(model: nn.Module) -> list[str]:
    """Set ``requires_grad=False`` on every parameter :func:`leakage_report` lists; returns their names."""
    leaking = set(leakage_report(model))
    for name, param in _unwrap(model).named_parameters():
        if name in leaking:
            param.requires_grad_(False)
    return sorted(leaking)


def unpatch_model(model: nn.Module) -> nn.Module:
    """Remove turn-over dropout from a patched model (in place; returns it)."""
    state = state_of(model)
    target = _unwrap(model)
    for handle in state.handles:
        handle.remove()
    for module in target.modules():
        original = module.__dict__.pop("turnover_original_class", None)
        if original is not None:
            module.__class__ = original
            del module.turnover_site, module.turnover_state
    for attr in ("turnover_state", "turnover_config", "save_pretrained", "push_to_hub"):
        target.__dict__.pop(attr, None)
    return target


def _unwrap(model: nn.Module) -> nn.Module:
    while "turnover_state" not in model.__dict__:
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model
