"""Which training set a model was trained on: recorded at training time, verified whenever scores name rows.

A turn-over checkpoint's masks are keyed by example id, so scores are only meaningful against the very rows that
carried those ids in training. :func:`record_training_set` hashes every training row (its id, its inputs and its
label; streaming, in Arrow batches) into a :class:`TrainingSet`: a small JSON summary kept in the checkpoint's
``turnover_config.json`` plus one 8-byte hash per row and column in ``training_set.safetensors``.
:meth:`TrainingSet.verify` then accepts the training set or any subset of its rows, and refuses another set of
the same size, rows whose ids were reassigned (e.g. after a shuffle) or ids that were never trained on, naming what
differs. A checkpoint can also name where its training data lives (:class:`DatasetSource`), so that
``InfluencePipeline("user/model")`` loads it by itself.

Example:
    >>> record = record_training_set(train, id_column="example_id")
    >>> record.verify(train.select(range(10)))           # a subset of the training rows: fine
    >>> record.verify(train.shuffle(seed=0).remove_columns("example_id").add_column("example_id", ...))  # refused
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Union

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import nn

from .context import patched_root, state_of
from .data import add_example_ids
from .errors import ConfigMismatchError, NotPatchedError, TurnoverError
from .files import atomic_path

logger = logging.getLogger(__name__)

TRAINING_SET_NAME = "training_set.safetensors"
# Columns derived from the inputs (or bookkeeping): not part of a row's identity.
DERIVED_COLUMNS = frozenset({"attention_mask", "token_type_ids", "position_ids", "special_tokens_mask", "length"})
# Columns a tokenizer derives from the texts: equal texts with other tokens mean another tokenizer or max_length.
INPUT_COLUMNS = frozenset({"input_ids"})
_BATCH = 4096
_MASK63 = (1 << 63) - 1


def canonical_column(name: str) -> str:
    """``label`` and ``labels`` are one column (the pipeline and collators rename one into the other)."""
    return "labels" if name == "label" else name


def _flat(array: pa.Array) -> tuple[bytes, np.ndarray, bytes]:
    """A column chunk as (type tag, row offsets into the payload, payload bytes); numbers widened to 64 bits so that
    int32 and int64 (or float32 and float64) copies of the same data hash alike."""
    kind = array.type
    if pa.types.is_dictionary(kind):
        array, kind = array.dictionary_decode(), array.type.value_type
    if pa.types.is_boolean(kind) or pa.types.is_integer(kind):
        values = np.asarray(array.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
        return b"i", np.arange(len(values) + 1, dtype=np.int64) * 8, values.tobytes()
    if pa.types.is_floating(kind):
        values = np.asarray(array.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        return b"f", np.arange(len(values) + 1, dtype=np.int64) * 8, values.tobytes()
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        encoded = [b"" if v is None else (v.encode("utf-8") if isinstance(v, str) else v) for v in array.to_pylist()]
        lengths = np.fromiter((len(v) for v in encoded), dtype=np.int64, count=len(encoded))
        return b"s", np.concatenate([[0], np.cumsum(lengths)]), b"".join(encoded)
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
        pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type) or pa.types.is_boolean(kind.value_type)
    ) and array.null_count == 0:
        offsets = np.asarray(array.offsets, dtype=np.int64)
        tag, _, payload = _flat(array.flatten())
        return b"l" + tag, (offsets - offsets[0]) * 8, payload
    # anything else (nested structures, nulls): one canonical text per row
    encoded = [json.dumps(v, sort_keys=True, default=str).encode() for v in array.to_pylist()]
    lengths = np.fromiter((len(v) for v in encoded), dtype=np.int64, count=len(encoded))
    return b"j", np.concatenate([[0], np.cumsum(lengths)]), b"".join(encoded)


def _hash_rows(array: Union[pa.Array, pa.ChunkedArray]) -> np.ndarray:
    """One int64 hash per row (blake2b of the row's canonical bytes, 63 bits)."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks() if array.num_chunks != 1 else array.chunk(0)
    tag, offsets, payload = _flat(array)
    view = memoryview(payload)
    out = np.empty(len(offsets) - 1, dtype=np.int64)
    for row in range(len(out)):
        digest = hashlib.blake2b(view[offsets[row] : offsets[row + 1]], digest_size=8, person=tag.ljust(2, b"_")).digest()
        out[row] = int.from_bytes(digest, "little") & _MASK63
    return out


def content_columns(dataset: Dataset, id_column: str) -> list[str]:
    """The columns that make a training row what it is: inputs, texts, labels and any other data, but not the id
    column nor masks derived from the inputs."""
    return [c for c in dataset.column_names if c != id_column and c not in DERIVED_COLUMNS]


def _row_hashes(dataset: Dataset, columns: list[str], id_column: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(ids, {canonical column: per-row hash}) of ``dataset``, computed in Arrow batches."""
    ids: list[np.ndarray] = []
    hashes: dict[str, list[np.ndarray]] = {canonical_column(c): [] for c in columns}
    table = dataset.with_format("arrow")
    for start in range(0, len(dataset), _BATCH):
        batch = table[start : start + _BATCH]
        ids.append(np.asarray(batch.column(id_column).cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64))
        for column in columns:
            hashes[canonical_column(column)].append(_hash_rows(batch.column(column)))
    join = lambda parts: torch.from_numpy(np.concatenate(parts) if parts else np.empty(0, dtype=np.int64))
    return join(ids), {c: join(parts) for c, parts in hashes.items()}


def _digest(ids: torch.Tensor, hashes: dict[str, torch.Tensor]) -> str:
    """One sha256 over the rows in id order: equal for the same rows whatever their order in the dataset."""
    order = torch.argsort(ids)
    digest = hashlib.sha256(ids[order].numpy().tobytes())
    for column in sorted(hashes):
        digest.update(column.encode())
        digest.update(hashes[column][order].numpy().tobytes())
    return digest.hexdigest()



def _row_keys(hashes: dict[str, torch.Tensor], columns: list[str]) -> torch.Tensor:
    """One int64 key per row over ``columns``' hashes (rows equal in every column share a key)."""
    key = np.zeros(len(next(iter(hashes.values()))), dtype=np.int64)
    with np.errstate(over="ignore"):
        for column in columns:
            key = key * np.int64(1_000_003) ^ hashes[column].numpy()
    return torch.from_numpy(key)

@dataclass
class DatasetSource:
    """Where a model's training data can be loaded from: a ``datasets`` repository (Hub id or local folder, read with
    ``datasets.load_dataset``) or a folder written by ``save_to_disk`` (read with ``datasets.load_from_disk``).

    Example:
        >>> source = DatasetSource("rotten_tomatoes", split="train", revision="aa2c0b4")
        >>> train = source.load()                      # then add_example_ids if the data has no id column
    """

    path: str = field(metadata={"help": "Hub dataset id, or a local folder (load_dataset) or save_to_disk folder."})
    split: Optional[str] = field(default="train", metadata={"help": "Split to load."})
    name: Optional[str] = field(default=None, metadata={"help": "Dataset configuration name (load_dataset's name)."})
    revision: Optional[str] = field(default=None, metadata={"help": "Git revision of a Hub dataset."})
    from_disk: bool = field(default=False, metadata={"help": "True: a save_to_disk folder (load_from_disk)."})
    add_ids: bool = field(
        default=False,
        metadata={"help": "True: the data has no id column; ids are the row index in the loaded order (add_example_ids)."},
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load(self, id_column: str = "example_id", **load_kwargs: Any) -> Dataset:
        """The training set, with its id column."""
        if self.from_disk:
            loaded = datasets.load_from_disk(self.path, **load_kwargs)
            if isinstance(loaded, datasets.DatasetDict):
                if self.split not in loaded:
                    raise TurnoverError(f"{self.path!r} has splits {list(loaded)}, not the recorded split {self.split!r}.")
                loaded = loaded[self.split]
        else:
            loaded = datasets.load_dataset(self.path, self.name, split=self.split, revision=self.revision, **load_kwargs)
        return add_example_ids(loaded, column=id_column) if self.add_ids else loaded


def _detect_source(dataset: Dataset) -> Optional[DatasetSource]:
    """A ``save_to_disk`` folder all of ``dataset``'s rows come from unchanged (its Arrow files, no transform)."""
    files = [f.get("filename") for f in dataset.cache_files]
    if not files or any(f is None for f in files):
        return None
    folders = {os.path.dirname(os.path.abspath(f)) for f in files}
    if len(folders) != 1:
        return None
    folder = folders.pop()
    if not (os.path.isfile(os.path.join(folder, "state.json")) and os.path.isfile(os.path.join(folder, "dataset_info.json"))):
        return None
    if dataset._indices is not None:  # a select / shuffle / filter view of the saved rows
        return None
    try:  # a map (tokenizing) keeps the rows; anything that changed their number is not this folder's data
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as handle:
            saved = [os.path.join(folder, f["filename"]) for f in json.load(handle)["_data_files"]]
        rows = sum(pa.ipc.open_stream(pa.memory_map(f)).read_all().num_rows for f in saved)
    except (OSError, ValueError, KeyError, pa.ArrowInvalid):
        return None
    if rows != len(dataset):
        return None
    parent = os.path.dirname(folder)
    if os.path.isfile(os.path.join(parent, "dataset_dict.json")):
        return DatasetSource(parent, split=os.path.basename(folder), from_disk=True)
    return DatasetSource(folder, split=None, from_disk=True)


@dataclass
class TrainingSet:
    """The identity of a training set: its ids and one hash per (row, content column), plus where it came from.

    ``summary()`` (size, fingerprint, columns, source) goes into ``turnover_config.json``; the per-row hashes into
    ``training_set.safetensors`` beside it.
    """

    id_column: str
    example_ids: torch.Tensor
    hashes: dict[str, torch.Tensor]
    source: Optional[DatasetSource] = None
    fingerprint: str = ""
    longest_input: Optional[int] = None  # tokens in the longest input_ids row (how long training's inputs were)

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = _digest(self.example_ids, self.hashes)

    @property
    def num_examples(self) -> int:
        return len(self.example_ids)

    def summary(self) -> dict[str, Any]:
        """What ``turnover_config.json`` keeps (JSON)."""
        return {
            "num_examples": self.num_examples,
            "fingerprint": self.fingerprint,
            "id_column": self.id_column,
            "columns": sorted(self.hashes),
            "source": None if self.source is None else self.source.to_dict(),
            **({} if self.longest_input is None else {"longest_input": self.longest_input}),
        }

    # -- files ------------------------------------------------------------------------------------------------
    def save(self, folder: Union[str, os.PathLike]) -> None:
        """Write ``training_set.safetensors`` (ids and per-row hashes) into ``folder``, atomically."""
        tensors = {"example_ids": self.example_ids.contiguous()}
        tensors.update({f"hash.{c}": h.contiguous() for c, h in self.hashes.items()})
        with atomic_path(os.path.join(os.fspath(folder), TRAINING_SET_NAME)) as tmp:
            save_file(tensors, tmp, metadata={"fingerprint": self.fingerprint, "id_column": self.id_column})

    @classmethod
    def load(cls, folder: Union[str, os.PathLike], summary: dict[str, Any]) -> "TrainingSet":
        """The record of a checkpoint folder, checked against the summary in its ``turnover_config.json``."""
        path = os.path.join(os.fspath(folder), TRAINING_SET_NAME)
        if not os.path.isfile(path):
            raise ConfigMismatchError(
                f"{os.fspath(folder)!r} records a training-set fingerprint in its turnover_config.json but has no "
                f"{TRAINING_SET_NAME}; the checkpoint is incomplete. Copy that file along with the checkpoint, or "
                "save the model again with model.save_pretrained(folder)."
            )
        tensors = load_file(path)
        hashes = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("hash.")}
        source = summary.get("source")
        record = cls(summary.get("id_column", "example_id"), tensors["example_ids"], hashes,
                     DatasetSource(**source) if source else None, longest_input=summary.get("longest_input"))
        if record.fingerprint != summary.get("fingerprint"):
            raise ConfigMismatchError(
                f"{path} does not match the training-set fingerprint in turnover_config.json (another model's file?). "
                "Save the model again with model.save_pretrained(folder)."
            )
        return record

    # -- verification -----------------------------------------------------------------------------------------
    def verify(self, dataset: Dataset, *, require_all: bool = False, what: str = "train_dataset") -> None:
        """Refuse ``dataset`` unless each of its rows is the training row with the same id (a subset is fine;
        ``require_all`` also asks for every training row). Names what differs: size, ids or contents.

        Example:
            >>> record.verify(train)              # silent if train is (a subset of) the training set
        """
        self._check_id_column(dataset, what)
        given = {canonical_column(c): c for c in content_columns(dataset, self.id_column)}
        common = sorted(set(given) & set(self.hashes))
        if not common:
            raise ConfigMismatchError(
                f"{what} shares no data column with the training set the model was trained on (recorded: "
                f"{sorted(self.hashes)}; given: {sorted(given)}), so its rows cannot be checked. Pass the training "
                "set with those columns."
            )
        ids, hashes = _row_hashes(dataset, [given[c] for c in common], self.id_column)
        trained, position = self._positions(ids, what)
        rows = trained.indices[position]
        differs = {c: hashes[c] != self.hashes[c][rows] for c in common}
        if any(bool(d.any()) for d in differs.values()):
            raise ConfigMismatchError(self._mismatch(what, ids, hashes, differs))
        self._check_size(len(ids), require_all, what)
        unchecked = sorted(set(self.hashes) - set(common))
        if unchecked and common == ["labels"]:
            logger.warning("%s was checked against the training set on its labels only (recorded columns %s absent).",
                           what, unchecked)

    def verify_ids(self, dataset: Dataset, *, require_all: bool = False, what: str = "train_dataset") -> None:
        """The first, cheap part of :meth:`verify`: every id of ``dataset`` was trained on (and, with
        ``require_all``, every trained id is there), read from the id column alone.

        Example:
            >>> record.verify_ids(train)            # before tokenizing train for the full check
        """
        self._check_id_column(dataset, what)
        ids, _ = _row_hashes(dataset, [], self.id_column)
        self._positions(ids, what)
        self._check_size(len(ids), require_all, what)

    def _check_id_column(self, dataset: Dataset, what: str) -> None:
        if self.id_column not in dataset.column_names:
            raise ConfigMismatchError(
                f"{what} has no {self.id_column!r} column, the id column the model was trained with (columns: "
                f"{dataset.column_names}). Pass the training set with its ids."
            )

    def _positions(self, ids: torch.Tensor, what: str) -> tuple[Any, torch.Tensor]:
        """(the trained ids sorted, the position of each of ``ids`` among them); refuses ids never trained on."""
        trained = torch.sort(self.example_ids)
        position = torch.searchsorted(trained.values, ids).clamp(max=max(len(trained.values) - 1, 0))
        known = trained.values[position] == ids if len(trained.values) else torch.zeros_like(ids, dtype=torch.bool)
        if not bool(known.all()):
            unknown = ids[~known]
            raise ConfigMismatchError(
                f"{what} has {len(unknown)} of {len(ids)} rows whose ids the model never trained on (e.g. "
                f"{unknown[:5].tolist()}; it was trained on {self.num_examples} examples, fingerprint "
                f"{self.fingerprint[:12]}). Pass the training set (or a subset of its rows) with the ids it had in "
                "training."
            )
        return trained, position

    def _check_size(self, size: int, require_all: bool, what: str) -> None:
        if require_all and size != self.num_examples:
            raise ConfigMismatchError(
                f"the model was trained on {self.num_examples} examples but {what} has {size} of them, and this "
                "estimator fits on the whole training set first. Pass the whole training set; choose the ids to score "
                "with example_ids=..."
            )

    def _mismatch(self, what: str, ids: torch.Tensor, hashes: dict[str, torch.Tensor],
                  differs: dict[str, torch.Tensor]) -> str:
        """The refusal of rows that differ from the training rows of the same ids: which columns, the first ids,
        and the likely cause (ids reassigned, texts tokenized another way, or rows edited) with its fix."""
        detail = "; ".join(
            f"column {c!r} differs in {int(d.sum())} rows (e.g. ids {torch.sort(ids[d]).values[:5].tolist()})"
            for c, d in differs.items() if bool(d.any())
        )
        head = f"{what} is not the data the model was trained on: {detail}."
        bad = torch.zeros_like(ids, dtype=torch.bool)
        for d in differs.values():
            bad |= d
        columns = sorted(differs)
        if bool(torch.isin(_row_keys(hashes, columns)[bad], _row_keys(self.hashes, columns)).float().mean() >= 0.5):
            return (
                f"{head} These rows are training rows under other ids (were ids reassigned after a shuffle or "
                "split?). Pass the training set with the ids it had in training: add ids once with add_example_ids "
                "before shuffling or splitting, and keep them."
            )
        changed = {c for c, d in differs.items() if bool(d.any())}
        texts = [c for c in columns if c not in INPUT_COLUMNS and c != "labels"]
        if changed <= INPUT_COLUMNS and texts:
            return (
                f"{head} Their {texts} match the training rows, so the texts are the training texts but they are "
                "not tokenized as in training. Pass the tokenizer and max_length used in training to "
                "InfluencePipeline (tokenizer=..., max_length=...), or the training set as it was tokenized for "
                "training (with its input_ids)."
            )
        tokens = " (or tokenized with another tokenizer or max_length than in training)" if changed & INPUT_COLUMNS else ""
        return (
            f"{head} These rows were edited or replaced since training{tokens}; the model would be explained with "
            "rows it never trained on. Pass the training set exactly as it was in training (restore these rows from "
            "its source), or train again on the edited data."
        )


def record_training_set(dataset: Dataset, id_column: str = "example_id", *,
                        source: Optional[DatasetSource] = None) -> TrainingSet:
    """Hash every row of ``dataset`` (ids, inputs, labels) into a :class:`TrainingSet`; ``source`` names where the
    data can be loaded from (detected for a dataset read unchanged with ``load_from_disk``).

    Example:
        >>> record = record_training_set(train)
        >>> record.summary()["num_examples"]
        8530
    """
    columns = content_columns(dataset, id_column)
    if not columns:
        raise TurnoverError(
            f"the training set has only its id column {id_column!r}; it needs the inputs (and labels) to be recorded."
        )
    ids, hashes = _row_hashes(dataset, columns, id_column)
    if source is not None and not isinstance(source, DatasetSource):
        source = DatasetSource(**source) if isinstance(source, dict) else DatasetSource(os.fspath(source))
    longest = None
    if "input_ids" in dataset.column_names and len(dataset):
        lengths = pa.compute.list_value_length(dataset.data.column("input_ids"))
        longest = int(pa.compute.max(lengths).as_py() or 0)
    return TrainingSet(id_column, ids, hashes, source if source is not None else _detect_source(dataset),
                       longest_input=longest)


TRAINING_SET_ATTRIBUTE = "turnover_training_set"  # on the patched model (context.patched_root)


def training_set_of(model: nn.Module) -> Optional[TrainingSet]:
    """The record of the training set a patched model was trained on (None: nothing recorded, or not patched).

    Example:
        >>> training_set_of(model).summary()["num_examples"]
        8530
    """
    try:
        root = patched_root(model)
    except NotPatchedError:
        return None
    return getattr(root, TRAINING_SET_ATTRIBUTE, None)


def keep_training_record(model: nn.Module, record: Optional[TrainingSet]) -> None:
    """Keep ``record`` on the patched ``model`` (a loaded checkpoint brings it; :func:`attach_training_set` makes
    it)."""
    setattr(patched_root(model), TRAINING_SET_ATTRIBUTE, record)


def attach_training_set(model: Any, dataset: Dataset, *,
                        source: Optional[Union[DatasetSource, dict[str, Any], str]] = None) -> TrainingSet:
    """Record ``dataset`` as the training set of a patched ``model`` trained without :class:`TurnoverTrainer`
    (what that trainer does by itself), so that the pipeline checks the rows it is given and the checkpoint carries
    the record. Pass the dataset exactly as the model trained on it (its ids, inputs and labels).

    Example:
        >>> my_training_loop(model, train)                  # a patched model trained by your own loop
        >>> attach_training_set(model, train)               # InfluencePipeline(model, ...) now checks train_dataset
    """
    state = state_of(model)
    record = record_training_set(dataset, state.config.id_column, source=source)
    keep_training_record(model, record)
    state.config.training_set = record.summary()
    state.config.num_train_examples = record.num_examples
    return record


def _recorded(models: Iterable[Any]) -> list[TrainingSet]:
    found = []
    for model in models:
        record = training_set_of(model)
        if record is not None and all(r.fingerprint != record.fingerprint for r in found):
            found.append(record)
    return found


def verify_training_set(models: Iterable[Any], dataset: Dataset, *, require_all: bool = False,
                        ids_only: bool = False) -> bool:
    """Check ``dataset`` against the training set recorded on each model (see :meth:`TrainingSet.verify`; with
    ``ids_only``, its cheap first part :meth:`TrainingSet.verify_ids`); False if no model records one (checkpoints
    saved before the record existed).

    Example:
        >>> verify_training_set([model], train)       # True, or ConfigMismatchError naming what differs
    """
    records = _recorded(models)
    for record in records:
        (record.verify_ids if ids_only else record.verify)(dataset, require_all=require_all)
    return bool(records)


def load_recorded_training_set(models: Iterable[Any]) -> Dataset:
    """The training set the models name as their source (``datasets.load_dataset`` / ``load_from_disk``); refuses
    when they name none.

    Example:
        >>> train = load_recorded_training_set([model])
    """
    records = _recorded(models)
    sources = {_json_key(r.source) for r in records if r.source is not None}
    if not records or len(sources) != 1 or len(records) != 1:
        reason = ("it records no training set" if not records else
                  "its training set names no source it can be loaded from" if not sources else
                  "its members were trained on different data")
        raise TurnoverError(
            f"InfluencePipeline needs train_dataset (the training set with its id column): the model was given none "
            f"and {reason}. Pass train_dataset=...; to make a checkpoint self-sufficient, train it with "
            "TurnoverTrainer(..., train_dataset_source=DatasetSource(path, split=...)) or on a load_from_disk dataset."
        )
    record = records[0]
    try:
        dataset = record.source.load(record.id_column)
    except Exception as err:  # noqa: BLE001 - any loader failure gets the same advice
        raise TurnoverError(
            f"could not load the training set the checkpoint names ({record.source.to_dict()}): {type(err).__name__}: "
            f"{err}. Pass train_dataset=... yourself."
        ) from err
    logger.info("loaded the recorded training set %s (%d rows).", record.source.path, len(dataset))
    return dataset


def _json_key(value: Any) -> str:
    return json.dumps(value.to_dict() if hasattr(value, "to_dict") else value, sort_keys=True)
