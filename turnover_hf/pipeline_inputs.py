"""How :class:`~turnover_hf.InfluencePipeline` turns what it is given into model inputs: the training set (checked
against the rows the models were trained on, then tokenized once), targets of any accepted type (normalised by
:func:`~turnover_hf.targets.normalize_targets`, tokenized, collated and labelled) and example ids. A mixin of the
pipeline, which supplies the models, the tokenizer, the collator and the estimator.

Example:
    >>> batch, labels, sources = pipe.prepare_targets(["a gripping film", {"text": "dull", "label": 0}])
    >>> sources
    ['predicted', 'given']
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from datasets import Dataset
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .checkpoint import load_influence_ready, model_class_of, resolve_checkpoint
from .config import CONFIG_NAME
from .data import check_ids_known, prompt_completion_features
from .errors import ConfigMismatchError, ExampleIdError, TurnoverError
from .estimators import AUTO, Estimator, get_estimator
from .estimators.ensemble import ensemble_members, is_ensemble_folder
from .masks import check_example_ids
from .patcher import is_patched
from .targets import normalize_targets
from .training_set import training_set_of, verify_training_set
from .validation import check_input_lengths, check_labels, check_token_ids, model_max_length

logger = logging.getLogger(__name__)

# Causal LMs also take (prompt, completion) tuples: only the completion's tokens count.
TargetsLike = Union[str, tuple[str, str], Sequence[Union[str, tuple[str, str]]], Mapping[str, Any], Sequence[Mapping[str, Any]], Dataset]


def _load_model(path: str, needs_masks: bool) -> nn.Module:
    """An influence-ready checkpoint (with its masks) when there is one or the estimator needs masks; otherwise
    any safetensors checkpoint of a transformers model."""
    if needs_masks or os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return load_influence_ready(path)
    return model_class_of(path).from_pretrained(path, use_safetensors=True)


def _members(model: Any) -> tuple[list[Any], Optional[str]]:
    """The models (or paths) behind ``model``: one model or path, a list of them, or an ensemble folder."""
    if isinstance(model, (list, tuple)):
        if not model:
            raise TurnoverError("InfluencePipeline got an empty list of models.")
        return list(model), None
    if isinstance(model, (str, os.PathLike)):
        path = resolve_checkpoint(model)  # a local folder, or the snapshot of a Hub repository
        if is_ensemble_folder(path):  # its members, each checked against the ensemble's record
            return ensemble_members(path), path
        return [path], path
    return [model], None


def load_models(model: Any, tokenizer: Optional[PreTrainedTokenizerBase], estimator: str
                 ) -> tuple[list[nn.Module], Optional[str], Optional[PreTrainedTokenizerBase]]:
    """The models behind ``model`` (loaded when given as paths: one model or path, a list of them, or an ensemble
    folder), the checkpoint folder, and the tokenizer (the checkpoint's when none is given). An unknown estimator name is refused before anything is loaded."""
    models, path = _members(model)
    needs_masks = estimator != AUTO and get_estimator(estimator).needs_masks
    for k, member in enumerate(models):
        if isinstance(member, (str, os.PathLike)):
            member_path = os.fspath(member)
            models[k] = _load_model(member_path, needs_masks)
            if tokenizer is None and os.path.isfile(os.path.join(member_path, "tokenizer_config.json")):
                tokenizer = AutoTokenizer.from_pretrained(member_path)
    return models, path, tokenizer


class PipelineInputs:
    """Training set, targets and ids as model inputs (see the module docstring)."""

    def _tokenize(self, texts: list[str]) -> dict[str, list]:
        if self.tokenizer is None:
            raise TurnoverError("text needs a tokenizer: pass tokenizer=... to InfluencePipeline.")
        return self.tokenizer(texts, truncation=True, max_length=self.max_length)

    def _verify_training_set(self, train_dataset: Dataset, expected: Optional[int]) -> Dataset:
        """Refuse a training set that is not (a subset of) the rows the models were trained on, compared on what
        they trained on: its ids first, then its rows tokenized as the pipeline scores them, beside their texts.
        Returns ``train_dataset`` with its model inputs."""
        fits = type(self.scorer).prepare is not Estimator.prepare  # it fits on the whole training set first
        if verify_training_set(self.models, train_dataset, require_all=fits, ids_only=True):  # before tokenizing
            tokenized = self._with_inputs(train_dataset)
            verify_training_set(self.models, tokenized, require_all=fits)
            return tokenized
        if any(_unrecorded(m) for m in self.models):
            logger.warning(
                "the model records no training set (it was not trained with TurnoverTrainer), so train_dataset "
                "cannot be checked: rows edited or reassigned since training would be explained as if the model had "
                "trained on them. Train with turnover_hf.TurnoverTrainer, or record the data the model was trained "
                "on with turnover_hf.attach_training_set(model, train)."
            )
        if expected is not None and expected != len(train_dataset):
            raise ConfigMismatchError(
                f"the model was trained on {expected} examples but train_dataset has {len(train_dataset)} rows. Pass "
                "the full training set (with the same id column) and choose ids to score with example_ids=..."
            )
        return self._with_inputs(train_dataset)

    def _with_inputs(self, dataset: Dataset) -> Dataset:
        """``dataset`` with model inputs beside its other columns (tokenizing ``text_column`` if there are no
        ``input_ids``)."""
        if "input_ids" not in dataset.column_names:
            if self.text_column not in dataset.column_names:
                raise TurnoverError(
                    f"the dataset has neither input_ids nor a {self.text_column!r} column (columns: "
                    f"{dataset.column_names}); pass text_column=... or tokenized data."
                )
            dataset = dataset.map(lambda rows: self._tokenize(rows[self.text_column]), batched=True)
        return dataset

    def _model_features(self, dataset: Dataset) -> Dataset:
        """``dataset`` with model inputs (tokenizing ``text_column`` if there are no ``input_ids``) and ``labels``."""
        dataset = self._with_inputs(dataset)
        if "label" in dataset.column_names and "labels" not in dataset.column_names and not self.causal_lm:
            dataset = dataset.rename_column("label", "labels")  # (a language model's labels are its tokens)
        keep = {"input_ids", "attention_mask", "token_type_ids", "labels", self.id_column}
        return dataset.remove_columns([c for c in dataset.column_names if c not in keep])

    def _target_rows(self, targets: Union[Dataset, list]) -> list[dict[str, Any]]:
        """Model-input rows of targets already in the pipeline's form (see :func:`~turnover_hf.targets.normalize_targets`)."""
        if isinstance(targets, Dataset):
            return [dict(row) for row in self._model_features(targets)]
        rows: list[dict[str, Any]] = []
        for target in targets:
            if self.causal_lm and (isinstance(target, str) or _is_prompt_completion(target)):
                if self.tokenizer is None:
                    raise TurnoverError("text needs a tokenizer: pass tokenizer=... to InfluencePipeline.")
                prompt, completion = (target, None) if isinstance(target, str) else target
                rows.append(prompt_completion_features(self.tokenizer, prompt, completion, self.max_length))
            elif isinstance(target, str):
                rows.append({k: v[0] for k, v in self._tokenize([target]).items()})
            else:
                row = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in target.items()}
                if "input_ids" not in row:
                    row |= {k: v[0] for k, v in self._tokenize([row.pop(self.text_column)]).items()}
                rows.append(row)
        return rows

    def _prepare(self, targets: TargetsLike) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[str], bool]:
        """:meth:`prepare_targets` and whether ``targets`` was a single target (one text, dict or tuple)."""
        label2id = getattr(getattr(self.model, "config", None), "label2id", None)
        normalized, single = normalize_targets(targets, text_column=self.text_column, id_column=self.id_column,
                                               causal_lm=self.causal_lm, label2id=label2id)
        rows = self._target_rows(normalized)
        for row in rows:
            if "label" in row and "labels" not in row:
                row["labels"] = row.pop("label")
        if self.causal_lm:  # labels are token ids (-100 where a token does not count), padded by the collator
            batch = self.collator(rows)
            return batch, batch.pop("labels"), ["given"] * len(rows), single
        keep = self._input_names()
        try:
            batch = self.collator([{k: v for k, v in row.items() if k in keep} for row in rows])
        except (ValueError, TypeError, RuntimeError) as err:
            raise TurnoverError(f"targets could not be collated into model inputs ({' '.join(str(err).split())[:300]}).") from None
        check_input_lengths(batch, model_max_length(self.model, self.tokenizer))
        check_token_ids(batch, getattr(getattr(self.model, "config", None), "vocab_size", None))
        given = [row.get("labels") for row in rows]
        if all(label is not None for label in given):
            labels = torch.as_tensor(given, dtype=torch.long)
            check_labels(labels, getattr(getattr(self.model, "config", None), "num_labels", None))
            return batch, labels, ["given"] * len(rows), single
        predicted = self.scorer.predict(batch).cpu()
        if any(label is not None for label in given):  # each target keeps the label it was given
            labels = torch.as_tensor([p if g is None else g for g, p in zip(given, predicted.tolist())], dtype=torch.long)
            check_labels(labels, getattr(getattr(self.model, "config", None), "num_labels", None))
            return batch, labels, ["predicted" if g is None else "given" for g in given], single
        return batch, predicted, ["predicted"] * len(rows), single

    def _input_names(self) -> set[str]:
        """The keys a target row may pass to the model: its forward arguments (other keys are dropped)."""
        forward = getattr(self.model, "forward", None)
        try:
            names = set(inspect.signature(forward).parameters)
        except (TypeError, ValueError):
            names = set()
        return (names - {"labels", "kwargs", "args"}) | {"input_ids", "attention_mask", "token_type_ids"}

    def prepare_targets(self, targets: TargetsLike) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[str]]:
        """Collated target inputs, their labels, and where each label came from ("given" or "predicted").

        Targets: a str, a dict, a list of str or dicts, a dict of lists, a ``datasets.Dataset`` or a
        ``pandas.DataFrame`` (see :func:`~turnover_hf.targets.normalize_targets`); anything else is refused.
        """
        return self._prepare(targets)[:3]

    def _ids(self, example_ids: Optional[Sequence[int]]) -> torch.Tensor:
        if example_ids is None:
            return self.train_ids.clone()
        shape = getattr(example_ids, "shape", None)  # tensors and numpy arrays
        if isinstance(example_ids, (str, bytes, Mapping, set, frozenset)) or not hasattr(example_ids, "__len__") \
                or (shape is not None and len(shape) != 1):
            shown = f" of shape {tuple(shape)}" if shape is not None else ""
            raise ExampleIdError(
                f"example_ids must be a list (or 1-D tensor / array) of training ids, got {type(example_ids).__name__}"
                f"{shown}; for one id, pass [id], or None for the whole training set."
            )
        if shape is None:
            example_ids = list(example_ids)  # any sequence: a range, a Dataset column, a pandas Series' values
        if len(example_ids) == 0:
            raise TurnoverError("example_ids is empty; give at least one training id, or None for the whole training set.")
        try:
            example_ids = check_example_ids(example_ids)
        except ValueError as err:
            raise ExampleIdError(str(err)) from None
        return check_ids_known(example_ids, self.train_ids)


def _unrecorded(model: Any) -> bool:
    """A patched model that records no training set and was not loaded from a checkpoint folder (loading one
    without a record warns already); an unpatched model never records one."""
    if not is_patched(model):
        return False
    loaded_from = getattr(model, "name_or_path", "") or ""
    return training_set_of(model) is None and not os.path.isfile(os.path.join(loaded_from, CONFIG_NAME))


def _is_prompt_completion(target: Any) -> bool:
    return isinstance(target, tuple) and len(target) == 2 and all(isinstance(x, str) for x in target)
