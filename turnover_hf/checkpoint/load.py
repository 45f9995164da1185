"""Loading influence-ready checkpoints: the model re-patched with identical masks and its training-set record; the
estimators' saved states beside it are loaded by the pipeline (and carried by the next save while they belong to
the weights).

Example:
    >>> model = load_influence_ready("out")             # re-patched, bit-identical masks
    >>> model = load_influence_ready("me/my-influence-ready-model")

A patched PEFT model saves PEFT's own adapter files (``adapter_config.json``, ``adapter_model.safetensors``) plus
``turnover_config.json``; :func:`load_influence_ready` loads the base model named in the adapter config (or the
``base_model`` given), attaches the adapter with PEFT and re-patches it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Optional, Union

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ..config import CONFIG_NAME, TurnoverConfig
from ..errors import ConfigMismatchError
from ..layers import CHANNEL_BIAS, CHANNEL_WEIGHT
from ..patcher import patch_model
from ..sites import inner_model
from ..trainer import trained_weights_problem
from ..training_set import TrainingSet, keep_training_record
from .save import finish_interrupted_save, remember_checkpoint

logger = logging.getLogger(__name__)


def resolve_checkpoint(path: Union[str, os.PathLike], **hub_kwargs: Any) -> str:
    """The local folder of a checkpoint: ``path`` itself, or the snapshot of the Hub repository ``path`` names
    (safetensors, JSON, card and tokenizer files only: nothing that would be unpickled).

    Example:
        >>> resolve_checkpoint("me/my-influence-ready-model")    # ~/.cache/huggingface/hub/models--me--.../snapshots/...
    """
    if os.path.isdir(path):
        return os.fspath(path)
    text = os.fspath(path)
    if os.path.exists(text):
        raise ConfigMismatchError(f"{text!r} is a file; give the checkpoint's folder (or a Hub repository id).")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text):
        raise ConfigMismatchError(f"{text!r} does not exist: give the folder the model was saved to with save_pretrained.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.md", "*.txt", "*.model"], **hub_kwargs)
    except (HFValidationError, OSError, ValueError) as err:
        raise ConfigMismatchError(
            f"{text!r} is neither a local folder nor a Hub repository that could be downloaded ({type(err).__name__}: "
            f"{err}). Check the path (it does not exist here) or the repository id, and your network / HF_HUB_OFFLINE."
        ) from None


def _check_one_set_of_weights(folder: str) -> None:
    """Refuse a folder holding the weights of two saves (left by savers that did not clean up, e.g. turnover-hf
    before 0.1.1): transformers would silently pick one of them."""
    for kind in ("model", "pytorch_model"):
        ext = "safetensors" if kind == "model" else "bin"
        if os.path.isfile(os.path.join(folder, f"{kind}.{ext}")) and os.path.isfile(os.path.join(folder, f"{kind}.{ext}.index.json")):
            raise ConfigMismatchError(
                f"{folder!r} holds two sets of weights ({kind}.{ext} and the shards of {kind}.{ext}.index.json): a model "
                "was saved over another one without removing it, and nobody can tell which one turnover_config.json "
                "belongs to. Save the model you mean into a fresh folder with model.save_pretrained."
            )


def _read_safetensors(folder: str, names: Optional[set[str]] = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (only ``names`` if given), from ``model.safetensors`` or its shards."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ConfigMismatchError(
            f"{folder!r} has no safetensors weights; turnover-hf never unpickles downloaded files. Re-save the model "
            "with model.save_pretrained(folder) (safetensors is the default)."
        )
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        if names is None:
            tensors.update(load_file(os.path.join(folder, name)))
            continue
        with safe_open(os.path.join(folder, name), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys() if key in names})
    return tensors


def model_class_of(folder: str) -> type:
    """The transformers class named in a checkpoint's ``config.json`` (``architectures``)."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ConfigMismatchError(
            f"{folder!r} has no config.json: it is not a saved transformers model. Save the model there with "
            "model.save_pretrained(folder)."
        )
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        architectures = json.load(handle).get("architectures") or []
    for name in architectures:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ConfigMismatchError(
        f"cannot tell the model class of {folder!r} (architectures={architectures}); pass model_class=..."
    )


def _restore_adapters(model: nn.Module, folder: str, config: TurnoverConfig) -> None:
    import adapters

    adapters.init(model)  # re-creates the adapters recorded in config.json ("adapters" section)
    tensors = _read_safetensors(folder)
    own = model.state_dict()
    missing = [k for k in own if k not in tensors and (".adapters." in k or ".loras." in k)]
    if missing:
        raise ConfigMismatchError(f"the checkpoint lacks adapter weights {missing[:5]}; it was not saved by this model.")
    model.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=False)
    if config.active_adapters:
        from adapters.composition import Stack

        names = config.active_adapters
        adapters_logger = logging.getLogger("adapters.model_mixin")
        level = adapters_logger.level
        adapters_logger.setLevel(logging.ERROR)  # it warns "none are activated" while switching the setup
        try:
            model.set_active_adapters(names[0] if len(names) == 1 else Stack(*names))
        finally:
            adapters_logger.setLevel(level)


PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PEFT_ADAPTER_IN_SITE = re.compile(r".*\.(?:lora_A|modules_to_save)\.([^.]+)(?:\..*)?")


def _peft_adapters(folder: str, config: TurnoverConfig) -> list[tuple[str, str]]:
    """(adapter name, folder of its files) of a saved PEFT model, from the adapter names in the mask sites;
    empty if ``folder`` holds no PEFT adapter. PEFT saves the adapter ``default`` at the top, others in subfolders."""
    names = sorted({m.group(1) for m in map(_PEFT_ADAPTER_IN_SITE.fullmatch, config.mask_sites or {}) if m})
    found = [(n, folder if n == "default" else os.path.join(folder, n)) for n in names or ["default"]]
    found = [(n, d) for n, d in found if os.path.isfile(os.path.join(d, PEFT_CONFIG))]
    if not found and os.path.isfile(os.path.join(folder, PEFT_CONFIG)):
        raise ConfigMismatchError(
            f"{folder!r} holds a PEFT adapter but {CONFIG_NAME} names no PEFT adapter among its masked modules; "
            "it was not saved from a patched PEFT model."
        )
    return found


def _base_model(base: Union[nn.Module, str, os.PathLike, None], adapter_dir: str, model_class: Optional[type],
                hub_kwargs: dict[str, Any], from_pretrained_kwargs: dict[str, Any]) -> nn.Module:
    if isinstance(base, nn.Module):
        if type(base).__module__.startswith("peft.") or "turnover_state" in base.__dict__:
            raise ConfigMismatchError("base_model must be the plain transformers model, not a PEFT or patched one.")
        return base
    if base is None:
        with open(os.path.join(adapter_dir, PEFT_CONFIG), encoding="utf-8") as handle:
            base = json.load(handle).get("base_model_name_or_path")
        if not base:
            raise ConfigMismatchError(
                f"the PEFT adapter in {adapter_dir!r} records no base model; pass base_model=... (the model or its "
                "path) to load_influence_ready."
            )
    base_folder = resolve_checkpoint(base, **hub_kwargs)
    model_class = model_class or model_class_of(base_folder)
    from_pretrained_kwargs.setdefault("use_safetensors", True)  # never unpickle a downloaded checkpoint
    return model_class.from_pretrained(base_folder, **from_pretrained_kwargs)


def _load_peft(adapters: list[tuple[str, str]], base: nn.Module) -> nn.Module:
    from peft import PeftModel

    for name, folder in adapters:
        if not os.path.isfile(os.path.join(folder, PEFT_WEIGHTS)):
            raise ConfigMismatchError(
                f"{folder!r} has no {PEFT_WEIGHTS}; turnover-hf never unpickles saved files. Re-save the PEFT model "
                "with model.save_pretrained(folder) (safetensors is the default)."
            )
    (first, folder), rest = adapters[0], adapters[1:]
    model = PeftModel.from_pretrained(base, folder, adapter_name=first)
    for name, folder in rest:
        model.load_adapter(folder, adapter_name=name)
    if rest:
        model.base_model.set_adapter([name for name, _ in adapters])
    return model


def load_influence_ready(
    path: Union[str, os.PathLike],
    model_class: Optional[type] = None,
    *,
    config: Optional[TurnoverConfig] = None,
    base_model: Union[nn.Module, str, os.PathLike, None] = None,
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """Load an influence-ready checkpoint (a local folder or a Hub repo id), re-patched with the very same masks.

    ``config``, if given, must agree with the checkpoint's own ``turnover_config.json`` on everything that decides
    the masks; otherwise loading refuses. A saved PEFT model comes back as a ``PeftModel`` on ``base_model`` (a
    model, which gets the adapter in place, or a path; default: the base recorded in ``adapter_config.json``).

    Example:
        >>> model = load_influence_ready("out")
        >>> model.turnover_config.seed
        0
    """
    hub_kwargs = {k: from_pretrained_kwargs[k] for k in ("revision", "token", "cache_dir") if k in from_pretrained_kwargs}
    folder = resolve_checkpoint(path, **hub_kwargs)
    if os.path.isdir(path):
        finish_interrupted_save(folder)
    saved = TurnoverConfig.from_pretrained(folder)
    if config is not None:
        saved.check_same_masks(config)
    if saved.mask_sites is None:
        raise ConfigMismatchError(f"{CONFIG_NAME} in {folder!r} records no mask_sites; it was not written by patch_model.")
    if saved.trained_weights and saved.trained_weights.get("masks") != saved.masks_fingerprint():
        raise ConfigMismatchError(
            f"{CONFIG_NAME} in {folder!r} has other mask fields (p, seed, scheme, mask sites) than its weights were "
            "trained with: the file was edited after training, and every score would use other masks. Restore it "
            "as it was saved (or save the trained model again)."
        )
    _check_one_set_of_weights(folder)
    training_set = None if saved.training_set is None else TrainingSet.load(folder, saved.training_set)
    if training_set is None:
        logger.warning(
            "%s records no training-set fingerprint (saved before turnover-hf recorded one, or never trained with "
            "TurnoverTrainer): the training set given to the pipeline cannot be checked row by row.", folder,
        )
    adapters = _peft_adapters(folder, saved)
    if adapters:
        base = _base_model(base_model, adapters[0][1], model_class, hub_kwargs, dict(from_pretrained_kwargs))
        model = _load_peft(adapters, base).eval()
        model = _restore_trainable(patch_model(model, saved, warn_leaking=False), saved)
        return _loaded(model, training_set, folder)
    if base_model is not None:
        raise ConfigMismatchError(f"base_model is for PEFT adapters, but {folder!r} holds a whole model; leave it out.")
    model_class = model_class or model_class_of(folder)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # adapter weights load below; do not warn they were "not used"
    from_pretrained_kwargs.setdefault("use_safetensors", True)  # never unpickle a downloaded checkpoint
    try:
        model = model_class.from_pretrained(folder, **from_pretrained_kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if getattr(model.config, "adapters", None) and model.config.adapters.get("adapters"):
        _restore_adapters(model, folder, saved)
        # adapters creates its modules in float32: give them the dtype the model was loaded in
        model.to(model.get_input_embeddings().weight.dtype)
    model.eval()
    model = patch_model(model, saved, warn_leaking=False)
    _restore_channels(model, folder)
    model = _restore_trainable(model, saved)
    return _loaded(model, training_set, folder)


def _loaded(model: nn.Module, training_set: Optional[TrainingSet], folder: str) -> nn.Module:
    """``model`` with what its folder brings: the training-set record, and where it came from (its saved estimator
    states may be carried to the next save)."""
    keep_training_record(model, training_set)
    remember_checkpoint(model, folder)
    problem = trained_weights_problem(model)
    if problem is not None:
        logger.warning("%s: %s.", folder, problem)
    return model


def _restore_channels(model: nn.Module, folder: str) -> None:
    """Load the extra mask-channel copies (``from_pretrained`` skips them: the unpatched model has no such
    parameters) from the checkpoint's safetensors."""
    wanted = {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in (CHANNEL_WEIGHT, CHANNEL_BIAS)}
    if not wanted:
        return
    tensors = _read_safetensors(folder, wanted)
    missing = sorted(wanted - set(tensors))
    if missing:
        raise ConfigMismatchError(
            f"{CONFIG_NAME} in {folder!r} records mask channels but the weights lack {missing[:4]}; the checkpoint was "
            "not saved by the patched model (save it with model.save_pretrained(folder) after patch_model)."
        )
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:
        raise ConfigMismatchError(f"the mask channels in {folder!r} do not fit the model: {err}") from None


def _restore_trainable(model: nn.Module, config: TurnoverConfig) -> nn.Module:
    """``requires_grad`` as it was when the checkpoint was saved (``from_pretrained`` marks every parameter
    trainable), so gradient-based estimators and further training see what training updated."""
    if config.trainable_parameters is None:  # written before the field existed: leave from_pretrained's state
        return model
    trainable = set(config.trainable_parameters)
    named = dict(inner_model(model).named_parameters())
    missing = sorted(trainable - set(named))
    if missing:
        raise ConfigMismatchError(
            f"{CONFIG_NAME} lists trainable parameters the loaded model lacks: {missing[:5]}. Load the checkpoint into "
            "the architecture (and adapters) it was saved from."
        )
    for name, param in named.items():
        param.requires_grad_(name in trainable)
    return model
