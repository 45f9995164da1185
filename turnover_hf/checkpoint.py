"""Influence-ready checkpoints: HF weights + ``turnover_config.json`` + a model-card section; load with identical masks.

Example:
    >>> model.save_pretrained("out")                    # a patched model: weights, adapters, turnover_config.json
    >>> model = load_influence_ready("out")             # re-patched, bit-identical masks
    >>> model.push_to_hub("me/my-influence-ready-model")

A patched PEFT model saves PEFT's own adapter files (``adapter_config.json``, ``adapter_model.safetensors``) plus
``turnover_config.json``; :func:`load_influence_ready` loads the base model named in the adapter config (or the
``base_model`` given), attaches the adapter with PEFT and re-patches it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Optional, Union

import torch
import transformers
from huggingface_hub import ModelCard, ModelCardData
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from .config import CONFIG_NAME, TurnoverConfig
from .errors import ConfigMismatchError
from .files import atomic_write_text, umask
from .layers import CHANNEL_BIAS, CHANNEL_WEIGHT
from .patcher import patch_model
from .sites import inner_model

CARD_START = "<!-- turnover-hf:start -->"
CARD_END = "<!-- turnover-hf:end -->"
CARD_TAGS = ("turnover-hf", "influence-ready", "turn-over-dropout")


def _card_section(config: TurnoverConfig, repo_or_path: str) -> str:
    sites = config.mask_sites or {}
    return f"""{CARD_START}
## Influence-ready (turn-over dropout)

This checkpoint was fine-tuned with **turn-over dropout** (Kobayashi et al., 2020): every training example had its
own fixed dropout mask, so the sub-network under the flipped mask never learned from it. With the training data
(same `{config.id_column}` column) you can ask, for any prediction, which training examples helped or hurt it,
with forward passes only:

```python
import turnover_hf
model = turnover_hf.load_influence_ready("{repo_or_path}")   # same masks as in training
scores = turnover_hf.influence(model, target_inputs, example_ids=train_ids)  # (n_ids, n_targets)
```

Masks: p = {config.p}, seed = {config.seed}, scheme = `{config.scheme}`, on {len(sites)} module(s)
({", ".join(list(sites)[:4])}{" ..." if len(sites) > 4 else ""}); trained on {config.num_train_examples or "an unrecorded number of"} examples.
Written by turnover-hf {config.library_version}.
{CARD_END}
"""


def write_model_card(save_directory: str, config: TurnoverConfig, repo_or_path: Optional[str] = None) -> None:
    """Add or refresh the turnover-hf section and tags of ``README.md``, keeping everything else the user wrote."""
    path = os.path.join(save_directory, "README.md")
    section = _card_section(config, repo_or_path or save_directory)
    if os.path.isfile(path):
        card = ModelCard.load(path)
        text = card.text
        if CARD_START in text and CARD_END in text:
            head, rest = text.split(CARD_START, 1)
            text = head + section.strip() + rest.split(CARD_END, 1)[1]
        else:
            text = text.rstrip() + "\n\n" + section
        data = card.data
    else:
        text = "# Influence-ready model\n\n" + section
        data = ModelCardData(library_name="transformers")
    data.tags = sorted(set(data.tags or []) | set(CARD_TAGS))
    atomic_write_text(path, f"---\n{data.to_yaml()}\n---\n{text}")


def save_influence_ready(
    model: nn.Module,
    save_directory: Union[str, os.PathLike],
    is_main_process: bool = True,
    push_to_hub: bool = False,
    **kwargs: Any,
) -> None:
    """``save_pretrained`` of a patched model: weights (adapters included) + ``turnover_config.json`` + model card.

    Files are first written into a temporary folder beside ``save_directory`` and then moved in one by one, so an
    interrupted save never leaves a half-written file. Files of the folder that the save does not write (a README
    you wrote, other artefacts) are kept; the model card gains or refreshes only its turnover-hf section.
    """
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory!r} is a file; give a folder.")
    original = type(model).save_pretrained
    if not is_main_process:
        original(model, save_directory, is_main_process=False, **kwargs)
        return
    hub_kwargs = {k: kwargs.pop(k) for k in ("commit_message", "repo_id", "token", "private", "create_pr", "revision") if k in kwargs}
    os.makedirs(save_directory, exist_ok=True)
    parent = os.path.dirname(os.path.abspath(save_directory))
    staging = tempfile.mkdtemp(prefix=".turnover-save-", dir=parent)
    try:
        original(model, staging, is_main_process=True, **kwargs)
        for name in os.listdir(staging):
            source, target = os.path.join(staging, name), os.path.join(save_directory, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            if os.path.isfile(source):
                os.chmod(source, 0o666 & ~umask())  # some writers make private files; a checkpoint is shared
            os.replace(source, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    saved = copy.deepcopy(model.turnover_config)  # the live config keeps deciding the masks, untouched
    saved.trainable_parameters = [n for n, p in inner_model(model).named_parameters() if p.requires_grad]
    saved.save_pretrained(save_directory)
    repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.abspath(save_directory))) if push_to_hub else None
    write_model_card(save_directory, model.turnover_config, repo_id)
    if push_to_hub:
        _upload_folder(model, save_directory, repo_id, files_timestamps={}, **hub_kwargs)


def _upload_folder(model: nn.Module, folder: str, repo_id: str, files_timestamps: dict, **hub_kwargs: Any) -> Any:
    token = hub_kwargs.pop("token", None)
    repo_id = model._create_repo(repo_id, private=hub_kwargs.pop("private", None), token=token)
    return model._upload_modified_files(folder, repo_id, files_timestamps, token=token, **hub_kwargs)


def push_influence_ready(
    model: nn.Module,
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[Union[bool, str]] = None,
    max_shard_size: Union[int, str] = "5GB",
    create_pr: bool = False,
    revision: Optional[str] = None,
    **save_kwargs: Any,
) -> Any:
    """``push_to_hub`` of a patched model: the influence-ready folder, with the Hub's existing model card kept and
    the turnover-hf section added to it.

    Example:
        >>> model.push_to_hub("me/minilm-rotten-tomatoes-influence-ready")
    """
    from transformers.utils.hub import create_and_tag_model_card

    repo_id = model._create_repo(repo_id, private=private, token=token)
    card = create_and_tag_model_card(repo_id, list(CARD_TAGS), token=token)
    with tempfile.TemporaryDirectory() as work_dir:
        card.save(os.path.join(work_dir, "README.md"))
        files_timestamps = model._get_files_timestamps(work_dir)
        model.save_pretrained(work_dir, max_shard_size=max_shard_size, **save_kwargs)
        write_model_card(work_dir, model.turnover_config, repo_id)
        return model._upload_modified_files(
            work_dir, repo_id, files_timestamps, commit_message=commit_message, token=token,
            create_pr=create_pr, revision=revision,
        )


def _local_folder(path: Union[str, os.PathLike], hub_kwargs: dict[str, Any]) -> str:
    if os.path.isdir(path):
        return os.fspath(path)
    from huggingface_hub import snapshot_download

    return snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "*.md", "*.txt", "*.model"], **hub_kwargs)


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
    base_folder = _local_folder(base, hub_kwargs)
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
    folder = _local_folder(path, hub_kwargs)
    saved = TurnoverConfig.from_pretrained(folder)
    if config is not None:
        saved.check_same_masks(config)
    if saved.mask_sites is None:
        raise ConfigMismatchError(f"{CONFIG_NAME} in {folder!r} records no mask_sites; it was not written by patch_model.")
    adapters = _peft_adapters(folder, saved)
    if adapters:
        base = _base_model(base_model, adapters[0][1], model_class, hub_kwargs, dict(from_pretrained_kwargs))
        model = _load_peft(adapters, base).eval()
        return _restore_trainable(patch_model(model, saved, warn_leaking=False), saved)
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
    model.eval()
    model = patch_model(model, saved, warn_leaking=False)
    _restore_channels(model, folder)
    return _restore_trainable(model, saved)


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
