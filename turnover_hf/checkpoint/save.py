"""Writing influence-ready folders: weights (adapters included) + ``turnover_config.json`` + training-set record +
model card (+ the estimators' saved states), swapped into place as one checkpoint.

Example:
    >>> model = patch_model(model, TurnoverConfig(seed=0))
    >>> model.save_pretrained("out")                   # an influence-ready folder, replacing whatever model was there
    >>> model.push_to_hub("me/my-influence-ready-model")

A save writes the whole checkpoint into a staging folder beside the target first; only then are its files moved in,
the previous checkpoint's files that the new one does not have (other weight shards, an index, adapter files, any
registered estimator's state folder that does not belong to the new weights) removed, with a journal that lets the
next save or load finish an interrupted move. The folder therefore holds either the previous checkpoint untouched or
exactly the new one, never a mix.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from typing import Any, Mapping, Optional, Union

from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from ..config import CONFIG_NAME, TurnoverConfig
from ..context import patched_root, state_of
from ..errors import StaleFitError, TurnoverError
from ..estimators.registry import attach_fitted, fitted_of, saved_states
from ..files import atomic_write_text, umask
from ..sites import inner_model
from ..training_set import TRAINING_SET_NAME, training_set_of

logger = logging.getLogger(__name__)

CARD_START = "<!-- turnover-hf:start -->"
CARD_END = "<!-- turnover-hf:end -->"
CARD_TAGS = ("turnover-hf", "influence-ready", "turn-over-dropout")
LOADED_FROM = "turnover_checkpoint_dir"  # on a loaded model: the folder it came from (its states may be carried)
JOURNAL = ".turnover-save.json"  # present only while a finished staging folder is being moved in
# Files and folders that belong to one saved model; a save removes those of the previous model it does not rewrite.
_MODEL_FILE = re.compile(
    r"(?:model|pytorch_model|adapter_model|tf_model|flax_model)(?:-\d+-of-\d+)?\.(?:safetensors|bin|h5|msgpack)"
    r"(?:\.index\.json)?"
)
_MODEL_NAMES = {"config.json", "generation_config.json", "adapter_config.json", CONFIG_NAME, TRAINING_SET_NAME}


def remember_checkpoint(model: nn.Module, folder: str) -> None:
    """Record on a loaded patched model the folder it came from."""
    setattr(patched_root(model), LOADED_FROM, folder)


def _loaded_from(model: nn.Module) -> Optional[str]:
    return getattr(patched_root(model), LOADED_FROM, None)


def _card_section(config: TurnoverConfig, repo_or_path: str, states: list[tuple[str, str]]) -> str:
    sites = config.mask_sites or {}
    record = config.training_set or {}
    source = record.get("source")
    if source:
        data = (f"Training data: `{source['path']}` (split `{source.get('split')}`"
                f"{', revision ' + source['revision'] if source.get('revision') else ''}), {record['num_examples']} "
                f"rows, fingerprint `{record['fingerprint'][:16]}`; `InfluencePipeline` loads and verifies it.")
    elif record:
        data = (f"Training data: {record['num_examples']} rows with fingerprint `{record['fingerprint'][:16]}` "
                f"(columns {', '.join(record['columns'])}); pass them as `train_dataset`, they are verified row by row.")
    else:
        data = f"Training data: {config.num_train_examples or 'an unrecorded number of'} examples (not fingerprinted)."
    fit = (f"Included: the fitted state of the {', '.join(f'{name} estimator (`{folder}/`)' for name, folder in states)}, "
           "so explanations need no refit." if states else
           "No fitted estimator state is included; the pipeline fits one on first use.")
    return f"""{CARD_START}
## Influence-ready (turn-over dropout)

This checkpoint was fine-tuned with **turn-over dropout** (Kobayashi et al., 2020): every training example had its
own fixed dropout mask, so the sub-network under the flipped mask never learned from it. With the training data
(same `{config.id_column}` column) you can ask, for any prediction, which training examples helped or hurt it:

```python
import turnover_hf
pipe = turnover_hf.InfluencePipeline("{repo_or_path}"{"" if source else ", train_dataset=train"})  # verifies the data
pipe("a sentence to explain", top_k=3)          # proponents and opponents, with their training rows
model = turnover_hf.load_influence_ready("{repo_or_path}")   # or just the model, with the same masks as in training
```

Masks: p = {config.p}, seed = {config.seed}, scheme = `{config.scheme}`, on {len(sites)} module(s)
({", ".join(list(sites)[:4])}{" ..." if len(sites) > 4 else ""}).
{data}
{fit}
Written by turnover-hf {config.library_version}.
{CARD_END}
"""


def write_model_card(save_directory: str, config: TurnoverConfig, repo_or_path: Optional[str] = None,
                     previous: Optional[str] = None) -> None:
    """Add or refresh the turnover-hf section and tags of ``README.md`` in ``save_directory``, keeping everything
    else the user wrote (read from ``previous``, default the same file)."""
    path = os.path.join(save_directory, "README.md")
    previous = previous or path
    states = sorted((name, s.folder) for name, s in saved_states().items() if s.saved_in(save_directory))
    section = _card_section(config, repo_or_path or save_directory, states)
    if os.path.isfile(previous):
        card = ModelCard.load(previous)
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


def _is_model_entry(folder: str, name: str) -> bool:
    states = {state.folder for state in saved_states().values()}
    if name in _MODEL_NAMES or name in states or _MODEL_FILE.fullmatch(name):
        return True
    # a PEFT adapter other than "default" lives in its own subfolder
    return os.path.isfile(os.path.join(folder, name, "adapter_config.json"))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _move_in(staging: str, folder: str, names: list[str]) -> None:
    for name in names:
        source, target = os.path.join(staging, name), os.path.join(folder, name)
        if not os.path.lexists(source):
            continue  # moved already (a resumed commit)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(source, target)


def finish_interrupted_save(folder: Union[str, os.PathLike]) -> bool:
    """Complete a save that was interrupted while moving its finished files in (the journal says what is left);
    True if there was one. Saves and loads call this first, so a folder never stays half-replaced.

    Example:
        >>> finish_interrupted_save("out")       # False: nothing was interrupted
    """
    folder = os.fspath(folder)
    journal = os.path.join(folder, JOURNAL)
    if not os.path.isfile(journal):
        return False
    try:
        with open(journal, encoding="utf-8") as handle:
            plan = json.load(handle)
        staging = os.path.join(os.path.dirname(os.path.abspath(folder)), plan["staging"])
        names, stale = list(plan["move"]), list(plan["remove"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TurnoverError(
            f"{journal} records an interrupted save but cannot be read ({err}). Save the model into this folder "
            "again, or delete the folder."
        ) from None
    if os.path.isdir(staging):
        _move_in(staging, folder, names)
        shutil.rmtree(staging, ignore_errors=True)
    elif any(not os.path.lexists(os.path.join(folder, n)) for n in names):
        raise TurnoverError(
            f"{folder!r} holds a save interrupted while its files were moved in, and the staging folder {staging!r} "
            "with the rest is gone. Save the model into this folder again."
        )
    for name in stale:
        _remove(os.path.join(folder, name))
    os.remove(journal)
    return True


def _commit(staging: str, folder: str) -> None:
    """Swap the finished checkpoint in ``staging`` into ``folder``: journal, moves, removal of the previous model's
    leftovers, journal removed. Interrupted anywhere, :func:`finish_interrupted_save` completes it."""
    names = sorted(os.listdir(staging))
    for name in names:
        path = os.path.join(staging, name)
        if os.path.isfile(path):
            os.chmod(path, 0o666 & ~umask())  # some writers make private files; a checkpoint is shared
    stale = sorted(n for n in os.listdir(folder) if n not in names and _is_model_entry(folder, n))
    plan = {"staging": os.path.basename(staging), "move": names, "remove": stale}
    atomic_write_text(os.path.join(folder, JOURNAL), json.dumps(plan, indent=2) + "\n")
    finish_interrupted_save(folder)


def _clean_stale_staging(folder: str) -> None:
    """Remove staging folders of earlier saves into ``folder`` that never reached their commit (a crash while
    writing); a folder named by a journal is kept for :func:`finish_interrupted_save`."""
    parent, base = os.path.split(os.path.abspath(folder))
    prefix = f".{base}.turnover-save-"
    for name in os.listdir(parent):
        if name.startswith(prefix):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _save_states(model: nn.Module, staging: str, given: Optional[Mapping[str, Any]], target: str) -> None:
    """Write into ``staging`` every registered estimator state that belongs to ``model``'s weights: the fitted
    estimators it carries (or ``given``), else the state of the folder it was loaded from or of the ``target``
    folder itself that still fits its weights (a model loaded, then saved or pushed elsewhere, keeps it; saved again
    into its own folder, keeps it; trained further, does not)."""
    fitted = {**fitted_of(model), **(given or {})}
    folders = [f for f in (_loaded_from(model), target) if f is not None]
    for name, state in saved_states().items():
        if name in fitted:
            try:
                fitted[name].save(os.path.join(staging, state.folder))
                continue
            except StaleFitError as err:
                logger.warning("the checkpoint is saved without the %s estimator's state: %s", name, err)
                shutil.rmtree(os.path.join(staging, state.folder), ignore_errors=True)
                attach_fitted(model, name, None)
        carried = next((s for s in map(state.saved_in, folders) if s is not None and state.belongs_to(s, model)), None)
        if carried is not None:
            shutil.copytree(carried, os.path.join(staging, state.folder))


def save_influence_ready(
    model: nn.Module,
    save_directory: Union[str, os.PathLike],
    is_main_process: bool = True,
    push_to_hub: bool = False,
    *,
    fitted: Optional[Mapping[str, Any]] = None,
    influence: Any = None,
    **kwargs: Any,
) -> None:
    """``save_pretrained`` of a patched model: weights (adapters included) + ``turnover_config.json`` + the training
    set's record + model card (+ the estimator states that belong to these weights: see
    :class:`~turnover_hf.estimators.SavedState`; ``fitted``: fitted estimators to save with them, by registered
    name, beside those the model carries; ``influence=scorer`` is the deprecated spelling of
    ``fitted={"influence": scorer}``).

    The folder afterwards holds exactly this model's checkpoint: files the previous model there had and this one does
    not write (other weight shards and their index, adapter files, any estimator's state folder) are removed; files
    that are not part of a model (a README's text, tokenizer files, your own artefacts) are kept.

    Example:
        >>> save_influence_ready(model, "out")     # what model.save_pretrained("out") does on a patched model
    """
    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise TurnoverError(f"save_directory {save_directory!r} is a file; give a folder.")
    original = super(InfluenceReadyMixin, model).save_pretrained if isinstance(model, InfluenceReadyMixin) else None
    if original is None:
        raise TurnoverError(f"{type(model).__name__} is not patched; patch it with turnover_hf.patch_model first.")
    if not is_main_process:
        original(save_directory, is_main_process=False, **kwargs)
        return
    if influence is not None:
        warnings.warn("save_pretrained(influence=scorer) is deprecated; pass fitted={'influence': scorer}.",
                      DeprecationWarning, stacklevel=3)
        fitted = {**(fitted or {}), "influence": influence}
    hub_kwargs = {k: kwargs.pop(k) for k in ("commit_message", "repo_id", "token", "private", "create_pr", "revision") if k in kwargs}
    os.makedirs(save_directory, exist_ok=True)
    finish_interrupted_save(save_directory)
    _clean_stale_staging(save_directory)
    state = state_of(model)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(save_directory))}.turnover-save-",
                               dir=os.path.dirname(os.path.abspath(save_directory)))
    committed = False
    try:
        original(staging, is_main_process=True, **kwargs)
        saved = copy.deepcopy(state.config)  # the live config keeps deciding the masks, untouched
        saved.trainable_parameters = [n for n, p in inner_model(model).named_parameters() if p.requires_grad]
        record = training_set_of(model)
        if record is not None:
            record.save(staging)
            saved.training_set = record.summary()
        _save_states(model, staging, fitted, save_directory)
        saved.save_pretrained(staging)
        repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.abspath(save_directory))) if push_to_hub else None
        previous = os.path.join(save_directory, "README.md")  # the user's card, else the one the save wrote (PEFT)
        write_model_card(staging, saved, repo_id, previous=previous if os.path.isfile(previous) else None)
        _commit(staging, save_directory)
        committed = True
    finally:
        if committed or not os.path.isfile(os.path.join(save_directory, JOURNAL)):
            shutil.rmtree(staging, ignore_errors=True)
    if push_to_hub:
        token = hub_kwargs.pop("token", None)
        repo_id = model._create_repo(repo_id, private=hub_kwargs.pop("private", None), token=token)
        model._upload_modified_files(save_directory, repo_id, {}, token=token, **hub_kwargs)


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
    """``push_to_hub`` of a patched model: the influence-ready folder (with a fitted influence function if there is
    one), with the Hub's existing model card kept and the turnover-hf section added to it.

    Example:
        >>> model.push_to_hub("me/minilm-rotten-tomatoes-influence-ready")
    """
    from transformers.utils.hub import create_and_tag_model_card

    repo_id = model._create_repo(repo_id, private=private, token=token)
    card = create_and_tag_model_card(repo_id, list(CARD_TAGS), token=token)
    with tempfile.TemporaryDirectory() as work_dir:
        card.save(os.path.join(work_dir, "README.md"))
        files_timestamps = model._get_files_timestamps(work_dir)
        save_influence_ready(model, work_dir, max_shard_size=max_shard_size, **save_kwargs)
        write_model_card(work_dir, TurnoverConfig.from_pretrained(work_dir), repo_id)
        return model._upload_modified_files(
            work_dir, repo_id, files_timestamps, commit_message=commit_message, token=token,
            create_pr=create_pr, revision=revision,
        )


class InfluenceReadyMixin:
    """Mixed into the class of every patched model (see :func:`turnover_hf.patcher.register_model_mixin`):
    ``save_pretrained`` and ``push_to_hub`` write influence-ready folders, also when ``Trainer`` saves checkpoints."""

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args: Any, **kwargs: Any) -> None:
        if args:  # transformers' second positional parameter is is_main_process
            kwargs.setdefault("is_main_process", args[0])
        save_influence_ready(self, save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        return push_influence_ready(self, repo_id, **kwargs)
