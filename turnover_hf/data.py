"""Example ids from dataset rows to batches: a stable id column and a collator that carries ``example_ids``.

Example:
    >>> train = add_example_ids(train)                      # adds "example_id" = row index
    >>> collator = InstanceIdCollator(DataCollatorWithPadding(tokenizer))
    >>> batch = collator([train[0], train[1]])              # batch["example_ids"] == tensor([0, 1])
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from datasets import Dataset
from transformers import default_data_collator

from .errors import ExampleIdError, MissingExampleIdsError

BATCH_KEY = "example_ids"


def add_example_ids(dataset: Dataset, column: str = "example_id", start: int = 0) -> Dataset:
    """Return ``dataset`` with an int64 id column: the row index plus ``start`` (keeps a valid existing column).

    Add ids before shuffling or splitting, so each example keeps its id wherever it goes. An existing column is
    checked (integers, non-negative, unique) and kept as it is.

    Example:
        >>> ds = add_example_ids(Dataset.from_dict({"text": ["a", "b"]}))
        >>> ds["example_id"]
        [0, 1]
    """
    if column in dataset.column_names:
        check_id_column(dataset, column)
        return dataset
    return dataset.add_column(column, list(range(start, start + len(dataset))))


def check_id_column(dataset: Dataset, column: str = "example_id") -> torch.Tensor:
    """The id column of ``dataset`` as an int64 tensor, after checking it is present, integer, non-negative, unique."""
    if column not in dataset.column_names:
        raise MissingExampleIdsError(
            f"the dataset has no {column!r} column (columns: {dataset.column_names}). Add stable ids with "
            f"`dataset = turnover_hf.add_example_ids(dataset, column={column!r})` before shuffling or splitting."
        )
    ids = torch.as_tensor(dataset.with_format(None)[column])
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.dim() != 1:
        raise ExampleIdError(f"column {column!r} must hold one integer per row, got dtype {ids.dtype}.")
    ids = ids.to(torch.int64)
    if len(ids) and int(ids.min()) < 0:
        raise ExampleIdError(f"column {column!r} has negative ids; ids must be non-negative integers.")
    unique, counts = torch.unique(ids, return_counts=True)
    if len(unique) != len(ids):
        dupes = unique[counts > 1][:5].tolist()
        raise ExampleIdError(
            f"column {column!r} has duplicate ids (e.g. {dupes}); duplicated examples would share one mask. "
            "Give every row its own id, e.g. with add_example_ids on a dataset without that column."
        )
    return ids


class InstanceIdCollator:
    """Wrap any collator so every batch carries ``example_ids`` (int64, one per row) from the id column.

    Rows without the id column are collated as they are (e.g. evaluation data); ``TurnoverTrainer`` refuses a
    training batch without ids.

    Example:
        >>> collator = InstanceIdCollator(DataCollatorWithPadding(tokenizer))
        >>> trainer = TurnoverTrainer(model, args, train_dataset=train, data_collator=collator)
    """

    def __init__(self, collator: Optional[Callable[[list], dict]] = None, id_column: str = "example_id") -> None:
        if isinstance(collator, InstanceIdCollator):
            collator = collator.collator
        self.collator = collator or default_data_collator
        self.id_column = id_column

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        has_ids = [self.id_column in f for f in features]
        if any(has_ids) and not all(has_ids):
            raise MissingExampleIdsError(f"some rows of this batch lack {self.id_column!r}; every training row needs an id.")
        if not any(has_ids):
            return self.collator(list(features))
        ids = [int(f[self.id_column]) for f in features]
        batch = self.collator([{k: v for k, v in f.items() if k != self.id_column} for f in features])
        batch[BATCH_KEY] = torch.tensor(ids, dtype=torch.int64)
        return batch
