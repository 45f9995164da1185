"""Targets of any familiar type, turned into the one form the pipeline scores: a ``datasets.Dataset`` or a list of
rows (text, a dict of model inputs / text with an optional label, or a causal LM's ``(prompt, completion)``).

Accepted: a str, a dict (one target), a list of str or of dicts, a dict of lists (one entry per target), a
``datasets.Dataset`` or a ``pandas.DataFrame`` (one target per row). Anything else, an empty input, a list mixing
types, a dict whose lists differ in length, a target without text or ``input_ids`` and a label that is not a class
is refused with a :class:`~turnover_hf.errors.TurnoverError` naming the argument, what it got and what it takes.

Example:
    >>> normalize_targets({"text": ["a triumph", "a bore"], "label": [1, 0]})
    ([{'text': 'a triumph', 'label': 1}, {'text': 'a bore', 'label': 0}], False)
    >>> normalize_targets("a triumph")
    (['a triumph'], True)
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
from datasets import Dataset

from .errors import TurnoverError

ACCEPTED = ("a str, a dict (text or input_ids, optional label), a list of str or of dicts, a dict of lists, "
            "a datasets.Dataset or a pandas.DataFrame")
LABEL_KEYS = ("labels", "label")
Rows = list[Union[str, tuple[str, str], dict[str, Any]]]


def _refuse(argument: str, what: str, value: Any = None, fix: str = "") -> TurnoverError:
    got = f" (got {type(value).__name__})" if value is not None else ""
    return TurnoverError(f"{argument}: {what}{got}; {fix or 'give ' + ACCEPTED}.")


def _is_dataframe(value: Any) -> bool:
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(value, pandas.DataFrame)


def _is_prompt_completion(value: Any) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(isinstance(x, str) for x in value)


def class_label(value: Any, where: str, argument: str, label2id: Optional[Mapping[str, int]] = None) -> Optional[int]:
    """A classifier target's label as a class index: an int (or an integral float, as pandas stores a column with
    gaps), or a class name from the model's ``label2id``; None if absent (None or NaN: the target is explained against
    the model's prediction and says so in ``label_source``). Anything else is refused."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalars
        value = value.item()
    if isinstance(value, bool):
        raise TurnoverError(f"{argument}: {where} has the label {value!r} (a bool); give a class index (int) or name.")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float):
        if math.isnan(value):  # pandas' missing value: no label, like a row without one
            return None
        if value.is_integer():
            return int(value)
        raise TurnoverError(f"{argument}: {where} has the label {value!r}; labels are class indices (0, 1, ...).")
    if isinstance(value, str):
        names = {str(k): int(v) for k, v in (label2id or {}).items()}
        if value in names:
            return names[value]
        raise TurnoverError(
            f"{argument}: {where} has the label {value!r}, which is none of the model's classes "
            f"{sorted(names, key=names.get) or '(the model names none)'}; give a class name or index."
        )
    raise TurnoverError(
        f"{argument}: {where} has a label of type {type(value).__name__}; give a class index (int) or a class name."
    )


def _check_token_row(row: dict[str, Any], key: str, where: str, argument: str) -> None:
    """``row[key]``: one non-empty sequence of integers (as long as ``input_ids``), turned into a list."""
    value = row[key]
    try:
        ids = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        ids = None
    if ids is None or ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point or ids.dtype == torch.bool \
            or ids.is_complex() or isinstance(value, (str, bytes)):
        raise TurnoverError(
            f"{argument}: {where} has {key} {repr(value)[:60]}; give one non-empty list of integer token ids per target."
        )
    if key != "input_ids" and len(ids) != len(row["input_ids"]):
        raise TurnoverError(
            f"{argument}: {where} has {len(ids)} {key} for {len(row['input_ids'])} input_ids; give one per token."
        )
    row[key] = ids.tolist()


def _check_row(row: Mapping[str, Any], where: str, argument: str, text_column: str, causal_lm: bool,
               label2id: Optional[Mapping[str, int]]) -> dict[str, Any]:
    """One dict target, checked: str keys, text (a str) or input_ids, and (for a classifier) a class label."""
    if not all(isinstance(key, str) for key in row):
        raise TurnoverError(f"{argument}: {where} has keys {list(row)[:5]}; keys must be column names (str).")
    row = dict(row)
    if "input_ids" in row:
        for key in ("input_ids", *[k for k in ("attention_mask", "token_type_ids") if k in row]):
            _check_token_row(row, key, where, argument)
    if "input_ids" not in row:
        if text_column not in row:
            raise TurnoverError(
                f"{argument}: {where} has neither input_ids nor a {text_column!r} key (keys: {list(row)}); "
                "pass text_column=... to InfluencePipeline, or give the text under that key."
            )
        text = row[text_column]
        if not isinstance(text, str):
            raise TurnoverError(
                f"{argument}: {where} has a {text_column!r} of type {type(text).__name__}, not text (str)."
            )
    if not causal_lm:
        for key in LABEL_KEYS:
            if key in row:
                row[key] = class_label(row[key], where, argument, label2id)
                if row[key] is None:
                    del row[key]
    return row


def _rows_of_dict(targets: Mapping[str, Any], argument: str, text_column: str) -> tuple[list[dict[str, Any]], bool]:
    """A dict target: one row (scalar text / one sequence of ids) or a dict of lists (one entry per target)."""
    if not targets:
        raise _refuse(argument, "an empty dict", fix=f"give {{{text_column!r}: ...}} or {{'input_ids': ...}}")
    if "input_ids" in targets:
        try:
            ids = torch.as_tensor(targets["input_ids"]) if not isinstance(targets["input_ids"], torch.Tensor) \
                else targets["input_ids"]
        except (TypeError, ValueError, RuntimeError):
            raise TurnoverError(
                f"{argument}: input_ids must be a list of token ids (one target) or a list of such lists of equal "
                "length (pad them, with an attention_mask) or a tensor."
            ) from None
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dim() not in (1, 2) or ids.numel() == 0:
            raise TurnoverError(
                f"{argument}: input_ids must hold integer token ids, as one sequence or a batch of sequences, got a "
                f"{ids.dim()}-dimensional {ids.dtype} tensor of shape {tuple(ids.shape)}."
            )
        if ids.dim() == 1:
            return [dict(targets)], True
        n = len(ids)
    else:
        text = targets.get(text_column)
        if isinstance(text, str) or text is None:
            return [dict(targets)], True
        if not isinstance(text, (Sequence, torch.Tensor)) or isinstance(text, (bytes, bytearray)):
            raise _refuse(argument, f"a dict whose {text_column!r} is neither text nor a list of texts", text)
        n = len(text)
    rows: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, values in targets.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, torch.Tensor)) \
                or (isinstance(values, torch.Tensor) and values.dim() == 0):
            raise TurnoverError(
                f"{argument}: a dict of lists needs a list for every key, but {key!r} holds a "
                f"{type(values).__name__}; give one value per target."
            )
        if len(values) != n:
            raise TurnoverError(
                f"{argument}: a dict of lists whose lists differ in length ({key!r} has {len(values)}, "
                f"{'input_ids' if 'input_ids' in targets else repr(text_column)} has {n}); give one value per target."
            )
        for row, value in zip(rows, values):
            row[key] = value.tolist() if isinstance(value, torch.Tensor) else value
    if not rows:
        raise _refuse(argument, "a dict of empty lists", fix="give at least one target")
    return rows, False


def _check_dataset(data: Dataset, argument: str, text_column: str, id_column: Optional[str], causal_lm: bool,
                   label2id: Optional[Mapping[str, int]]) -> Dataset:
    if len(data) == 0:
        raise _refuse(argument, "an empty Dataset", fix="give at least one target row")
    if "input_ids" in data.column_names:
        tokens = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in data.column_names]
        for i, row in enumerate(data.select_columns(tokens)):
            row = dict(row)
            for key in tokens:
                _check_token_row(row, key, f"row {i}", argument)
    else:
        if text_column not in data.column_names:
            raise TurnoverError(
                f"{argument}: the targets have neither input_ids nor a {text_column!r} column (columns: "
                f"{data.column_names}); pass text_column=... to InfluencePipeline, or rename the column."
            )
        for i, text in enumerate(data[text_column]):
            if not isinstance(text, str):
                raise TurnoverError(
                    f"{argument}: row {i} has a {text_column!r} of type {type(text).__name__}, not text (str); "
                    "fill or drop that row."
                )
    if id_column is not None and id_column in data.column_names:
        data = data.remove_columns(id_column)  # a target is no training example
    if not causal_lm:
        for key in LABEL_KEYS:
            if key in data.column_names:
                values = [class_label(v, f"row {i}", argument, label2id) for i, v in enumerate(data[key])]
                data = data.remove_columns(key)
                if any(v is not None for v in values):  # rows without one are scored against the prediction
                    data = data.add_column(key, values)
    return data


def normalize_targets(targets: Any, *, text_column: str = "text", id_column: Optional[str] = "example_id",
                      causal_lm: bool = False, label2id: Optional[Mapping[str, int]] = None,
                      argument: str = "targets") -> tuple[Union[Dataset, Rows], bool]:
    """``targets`` in the pipeline's form (a Dataset or a list of rows) and whether it was one target.

    Example:
        >>> rows, single = normalize_targets(pandas.DataFrame({"text": ["a triumph"], "label": [1]}))
        >>> single, len(rows)      # a one-row DataFrame is one target (not its column names)
        (False, 1)
    """
    if targets is None:
        raise TurnoverError(f"{argument} is None; give {ACCEPTED}.")
    if _is_dataframe(targets):
        if len(targets) == 0:
            raise _refuse(argument, "an empty DataFrame", fix="give at least one target row")
        if not all(isinstance(c, str) for c in targets.columns):
            raise TurnoverError(f"{argument}: the DataFrame's columns {list(targets.columns)[:5]} must be names (str).")
        try:
            targets = Dataset.from_pandas(targets, preserve_index=False)
        except (TypeError, ValueError) as err:  # pyarrow's ArrowInvalid / ArrowTypeError are ValueError / TypeError
            raise TurnoverError(
                f"{argument}: a DataFrame column holds values of mixed types ({' '.join(str(err).split())[:200]}); "
                "give each column one type."
            ) from None
    if isinstance(targets, Dataset):
        return _check_dataset(targets, argument, text_column, id_column, causal_lm, label2id), False
    if isinstance(targets, str):
        return [targets], True
    if causal_lm and _is_prompt_completion(targets):
        return [targets], True
    if isinstance(targets, Mapping):
        rows, single = _rows_of_dict(targets, argument, text_column)
    elif isinstance(targets, (list, tuple)):
        if not targets:
            raise _refuse(argument, "an empty list", fix="give at least one target")
        kinds = {"text" if isinstance(t, str) else "dict" if isinstance(t, Mapping)
                 else "prompt-completion" if causal_lm and _is_prompt_completion(t) else type(t).__name__
                 for t in targets}
        unknown = kinds - {"text", "dict", "prompt-completion"}
        if unknown:
            raise TurnoverError(
                f"{argument}: a list holding items of type {', '.join(sorted(unknown))}; a list of targets holds "
                f"str{', (prompt, completion) tuples' if causal_lm else ''} or dicts (accepted: {ACCEPTED})."
            )
        if len(kinds) > 1 and "dict" in kinds:
            raise TurnoverError(
                f"{argument}: a list mixing {' and '.join(sorted(kinds))} targets; give all as text or all as dicts."
            )
        rows, single = list(targets), False
    else:
        raise _refuse(argument, "an unsupported type", targets)
    if not causal_lm or any(isinstance(r, Mapping) for r in rows):
        rows = [_check_row(r, f"target {i}", argument, text_column, causal_lm, label2id) if isinstance(r, Mapping)
                else r for i, r in enumerate(rows)]
    if id_column is not None:
        rows = [{k: v for k, v in r.items() if k != id_column} if isinstance(r, dict) else r for r in rows]
    return rows, single
