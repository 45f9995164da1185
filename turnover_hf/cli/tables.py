"""Data files in and results out: tables with standard columns and class names, rows written atomically."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from ..errors import TurnoverError
from ..files import atomic_path, atomic_write_text
from .checks import check_data_file, check_rows
from .common import TABLE_EXTENSIONS


# -- data --------------------------------------------------------------------------------------------------------
def load_table(path: str, what: str, split: Optional[str] = None, text_column: Optional[str] = None) -> Any:
    """A datasets.Dataset from a data file or a save_to_disk folder (a CSV's ``text_column`` read as written: "NA",
    "007" and "1e5" stay text)."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    if os.path.isdir(path):
        data = load_from_disk(path)
        if isinstance(data, DatasetDict):
            if split not in data:
                raise TurnoverError(f"{what} {path!r} holds the splits {list(data)}; choose one with --split.")
            data = data[split]
        return data
    check_data_file(path, what, tuple(TABLE_EXTENSIONS))
    extension = os.path.splitext(path)[1].lower()
    builder = TABLE_EXTENSIONS[extension]
    kwargs: dict[str, Any] = {"delimiter": "\t"} if extension == ".tsv" else {}
    if builder == "csv":
        kwargs["encoding"] = "utf-8-sig"  # a spreadsheet's byte-order mark is not part of the first column's name
        kwargs["keep_default_na"] = False  # "NA", "null", "nan" are words; an empty cell is missing (check_rows)
        if text_column is not None:
            kwargs["converters"] = {text_column: str}
    try:
        data = load_dataset(builder, data_files=path, split="train", **kwargs)
    except Exception as err:  # noqa: BLE001 - datasets wraps the parser's error; the user needs the file and the fix
        cause = err.__cause__ or err.__context__ or err
        if "corresponds to no data" in str(err):  # datasets' words for a file that parsed to nothing
            raise TurnoverError(f"{what} {path!r} has no rows (only a header, or an empty list); add at least one example.") from None
        raise TurnoverError(
            f"{what} {path!r} could not be read as {extension[1:].upper()} ({type(cause).__name__}: "
            f"{' '.join(str(cause).split())[:200]}); check that every line is valid {extension[1:].upper()} with "
            "the same columns."
        ) from None
    if builder == "text":  # one target a line: a blank line is no target
        data = data.filter(lambda row: bool(row["text"].strip()))
    check_rows(data, path, what)
    return data


def standard_columns(data: Any, text_column: str, label_column: str, what: str, need_label: bool,
                     path: str = "") -> Any:
    """``data`` with its text in ``text`` and its label (if any) in ``label``, every cell of both filled."""
    if text_column not in data.column_names:
        raise TurnoverError(
            f"{what} has no {text_column!r} column (columns: {data.column_names}); name it with --text_column."
        )
    check_rows(data, path, what, (text_column,), (label_column,))
    for old, new in ((text_column, "text"), (label_column, "label")):
        if old != new and old in data.column_names:
            if new in data.column_names:
                raise TurnoverError(f"{what} has both {old!r} and {new!r} columns; rename one of them.")
            data = data.rename_column(old, new)
    if need_label and "label" not in data.column_names:
        raise TurnoverError(
            f"{what} has no {label_column!r} column (columns: {data.column_names}); name it with --label_column."
        )
    return data


def class_names(train: Any) -> list[str]:
    """Label names of the training set: ClassLabel names, sorted string labels, or 0..max for integers."""
    from datasets import ClassLabel

    feature = train.features["label"]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    dtype = getattr(feature, "dtype", None)
    values = train["label"]
    if dtype in ("string", "large_string"):
        return sorted(set(values))
    if dtype is not None and dtype.startswith(("int", "uint")):
        if min(values) < 0:
            raise TurnoverError("integer labels must be non-negative class indices (0, 1, ...).")
        return [str(i) for i in range(max(values) + 1)]
    raise TurnoverError(
        f"the label column has type {dtype}: the CLI trains classifiers, so give class names or integer classes."
    )


def encode_labels(data: Any, names: list[str], what: str) -> Any:
    """``data`` with its labels as a ClassLabel over ``names`` (strings are looked up, integers checked)."""
    from datasets import ClassLabel

    feature = data.features["label"]
    if isinstance(feature, ClassLabel):
        if list(feature.names) != names:
            raise TurnoverError(f"{what} has the classes {feature.names}, the training set {names}.")
        return data
    values = data["label"]
    if getattr(feature, "dtype", None) in ("string", "large_string"):
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise TurnoverError(f"{what} has labels the training set lacks: {unknown[:5]} (known: {names}).")
        index = {name: i for i, name in enumerate(names)}
        data = data.map(lambda row: {"label": index[row["label"]]}, remove_columns=["label"])
    elif any(not 0 <= int(v) < len(names) for v in values):
        raise TurnoverError(f"{what} has integer labels outside 0..{len(names) - 1}.")
    return data.cast_column("label", ClassLabel(names=names))


def next_to_model(model: str, name: str) -> Optional[str]:
    path = os.path.join(os.path.dirname(os.path.abspath(model.rstrip("/\\"))), name)
    return path if os.path.exists(path) else None


def refuse_existing(path: str, overwrite: bool, option: str = "--overwrite") -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
        raise TurnoverError(f"{path!r} exists; choose another path or pass {option} to replace it.")


def write_rows(path: str, rows: Any, overwrite: bool, ids_only: bool = False) -> None:
    """Write a Dataset to .csv/.tsv/.json/.jsonl (or its ids to .txt), atomically."""
    refuse_existing(path, overwrite)
    extension = os.path.splitext(path)[1].lower()
    if extension == ".txt" and ids_only:
        atomic_write_text(path, "".join(f"{i}\n" for i in rows["example_id"]))
    elif extension == ".json":
        atomic_write_text(path, json.dumps(rows.to_list(), indent=1, ensure_ascii=False) + "\n")
    elif extension in (".csv", ".tsv", ".jsonl"):
        with atomic_path(path) as tmp:
            if extension == ".jsonl":
                rows.to_json(tmp, lines=True, force_ascii=False)
            else:
                rows.to_csv(tmp, index=False, sep="\t" if extension == ".tsv" else ",")
    else:
        allowed = ".txt, .csv, .tsv, .json or .jsonl" if ids_only else ".csv, .tsv, .json or .jsonl"
        raise TurnoverError(f"cannot write {path!r}: give a file ending in {allowed}.")


def shown(rows: Any, score: str, names: dict[int, str]) -> Any:
    """What a person reads: id, score, label name and text first, no model inputs."""
    rows = rows.remove_columns([c for c in ("input_ids", "attention_mask", "token_type_ids") if c in rows.column_names])
    if "label" in rows.column_names and names:
        rows = rows.map(lambda row: {"label_name": names.get(row["label"], str(row["label"]))})
    first = [c for c in ("example_id", score, "label", "label_name", "text") if c in rows.column_names]
    return rows.select_columns(first + [c for c in rows.column_names if c not in first])
