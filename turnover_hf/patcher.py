"""Inject turn-over dropout into a model, audit what still leaks into the flipped sub-network, and undo it."""

from __future__ import annotations

import copy
import logging
from typing import Optional

from torch import nn

from .config import TurnoverConfig
from .context import MaskState, state_of
from .errors import ConfigMismatchError, NotPatchedError, TurnoverError
from .layers import InputMaskHook, OutputMaskHook, add_channels, fold_channels, masked_lora_class
from .sites import covered_parameters, inner_model, is_adapters_lora, resolve_sites, units_of

logger = logging.getLogger(__name__)

# Mixins added to the class of every patched model (as ``adapters.init`` does), registered by higher layers so that
# the patcher never imports them: turnover_hf.checkpoint registers the one whose save_pretrained / push_to_hub write
# influence-ready folders.
_MODEL_MIXINS: list[type] = []
_SWAPPED: dict[type, type] = {}


def register_model_mixin(mixin: type) -> None:
    """Give every model patched from now on ``mixin`` as its first base class (same class name and module).

    Example:
        >>> register_model_mixin(InfluenceReadyMixin)   # done once by turnover_hf.checkpoint
    """
    if mixin not in _MODEL_MIXINS:
        _MODEL_MIXINS.append(mixin)
        _SWAPPED.clear()


def _swap_class(model: nn.Module) -> None:
    cls = type(model)
    if not _MODEL_MIXINS or not hasattr(cls, "save_pretrained"):
        return
    swapped = _SWAPPED.get(cls)
    if swapped is None:
        # The original name and module: transformers writes the class name into config.json ("architectures").
        swapped = type(cls.__name__, (*_MODEL_MIXINS, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _SWAPPED[cls] = swapped
    model.__dict__["turnover_unpatched_class"] = cls
    model.__class__ = swapped


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

    ``TurnoverConfig(channels=K)`` turns every input-masked ``nn.Linear`` (by default a one-layer head such as
    BERT's ``classifier``) into ``K`` masked copies whose outputs are averaged: ``K`` independent mask samples per
    example in one model, for scores less dominated by the half-network noise. The copies start equal to the
    layer, so the full network is unchanged; they are saved with the weights.

    A PEFT model (``peft.get_peft_model``) is patched as it is: masks go on the rank units of its LoRA layers and
    on heads in ``modules_to_save``, named as in the transformers model inside it; ``model.save_pretrained``
    then writes PEFT's adapter files plus ``turnover_config.json``.

    Example:
        >>> model = AutoModelForSequenceClassification.from_pretrained("bert-base-uncased", num_labels=2)
        >>> model = patch_model(model, TurnoverConfig(p=0.5, seed=0))
        >>> model.turnover_config.mask_sites        # {'classifier': {'side': 'input', 'units': 768}}
    """
    if not isinstance(model, nn.Module):
        raise TurnoverError(f"patch_model: model must be a torch.nn.Module (a transformers model), got {type(model).__name__}.")
    if is_patched(model):
        raise TurnoverError("this model is patched already; call turnover_hf.unpatch_model(model) before patching again.")
    for name, value in (("freeze_leaking", freeze_leaking), ("warn_leaking", warn_leaking)):
        if not isinstance(value, bool):
            raise TurnoverError(f"patch_model: {name} must be True or False, got {value!r}.")
    if config is not None and not isinstance(config, TurnoverConfig):
        raise TurnoverError(
            f"patch_model: config must be a TurnoverConfig (or None for the defaults), got {type(config).__name__}; "
            "build one with turnover_hf.TurnoverConfig(...)."
        )
    config = copy.deepcopy(config) if config is not None else TurnoverConfig()
    inner = inner_model(model)
    sites = resolve_sites(inner, config)
    recorded = config.mask_sites
    resolved = {s.name: s.as_dict() for s in sites}
    modules = dict(inner.named_modules())
    for site in sites:
        actual = units_of(modules[site.name], site.side)
        if actual is not None and actual != site.units:
            raise ConfigMismatchError(
                f"the turn-over config masks {site.units} units of {site.name!r} but that layer has {actual}: masks "
                "wider or narrower than the layer. Load the checkpoint into the model it was trained with."
            )
    config.mask_sites = resolved
    active = _active_adapter_names(inner)
    if recorded is not None and config.active_adapters is not None and active != config.active_adapters:
        raise ConfigMismatchError(
            f"the checkpoint was patched with active adapters {config.active_adapters} but the model has {active}; "
            "activate the same adapters (model.set_active_adapters(...)) before patching."
        )
    config.active_adapters = active

    state = MaskState(config, sites)
    handles = state.handles
    for site in sites:
        module = modules[site.name]
        if site.channels > 1:
            add_channels(module, site, state)
        elif site.side == "output":
            handles.append(module.register_forward_hook(OutputMaskHook(site, state)))
        elif site.side == "input":
            handles.append(module.register_forward_pre_hook(InputMaskHook(site, state)))
        elif not is_adapters_lora(module):
            handles.append(module.register_forward_hook(OutputMaskHook(site, state)))  # PEFT: lora_A's outputs
        else:
            module.turnover_site, module.turnover_state = site, state
            module.turnover_original_class = type(module)
            module.__class__ = masked_lora_class(type(module))
    # On the transformers model: a PeftModel reaches it through attribute forwarding.
    inner.turnover_state = state
    inner.turnover_config = config
    # Trainer checkpoints (which call model.save_pretrained) and model.push_to_hub then write influence-ready folders.
    _swap_class(model)

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
    """Remove turn-over dropout from a patched model (in place; returns it).

    Mask channels are folded into their module (its weights become the mean of the copies), so the unpatched
    model computes the patched model's full network."""
    state = state_of(model)
    target = _unwrap(model)
    for handle in state.handles:
        handle.remove()
    for module in target.modules():
        original = module.__dict__.pop("turnover_original_class", None)
        if original is not None and module.turnover_site.channels > 1:
            fold_channels(module)
        if original is not None:
            module.__class__ = original
            del module.turnover_site, module.turnover_state
    for holder in _wrappers(model):
        for attr in [a for a in holder.__dict__ if a.startswith("turnover_") and a != "turnover_unpatched_class"]:
            holder.__dict__.pop(attr)  # the mask state and what higher layers kept about the patched model
        original = holder.__dict__.pop("turnover_unpatched_class", None)
        if original is not None:
            holder.__class__ = original
    return model if inner_model(model) is target else target


def _wrappers(model: nn.Module) -> list[nn.Module]:
    """``model`` and the models inside it (DDP ``module``, compile's ``_orig_mod``, PEFT) down to the patched one."""
    chain = [model]
    while "turnover_state" not in model.__dict__:
        inner = inner_model(model)
        if inner is model:
            inner = model.__dict__.get("_modules", {}).get("module") or getattr(model, "_orig_mod", None)
        if inner is None:
            raise NotPatchedError(f"{type(chain[0]).__name__} carries no turn-over dropout.")
        model = inner
        chain.append(model)
    return chain


def _unwrap(model: nn.Module) -> nn.Module:
    """The model that holds the mask state and whose module names the masks use."""
    return _wrappers(model)[-1]
