"""Example ids from dataset rows to batches: a stable id column and a collator that carries ``example_ids``.

Example:
    >>> train = add_example_ids(train)                      # adds "example_id" = row index
    >>> collator = InstanceIdCollator(DataCollatorWithPadding(tokenizer))
    >>> batch = collator([train[0], train[1]])              # batch["example_ids"] == tensor([0, 1])

Causal language models: :class:`CausalLMCollator` pads token sequences and their ``labels`` (-100 on padding and on
tokens that do not count); :func:`prompt_completion_features` tokenizes a prompt + completion pair so that only
the completion counts.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from datasets import Dataset
from torch import nn
from transformers import DataCollatorWithPadding, default_data_collator

from .errors import ExampleIdError, MissingExampleIdsError, TurnoverError
from .losses import IGNORE_INDEX, is_causal_lm
from .masks import check_example_ids

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
    values = dataset.with_format(None)[column]
    try:
        ids = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError):
        bad = next((v for v in values if not isinstance(v, int) or isinstance(v, bool)), None)
        raise ExampleIdError(
            f"column {column!r} must hold one non-negative integer per row; it holds {bad!r} (e.g. strings or missing "
            f"values). Replace it: dataset.remove_columns({column!r}) then turnover_hf.add_example_ids(dataset)."
        ) from None
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


def check_ids_known(example_ids: torch.Tensor, known_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """Validate ``example_ids`` (1-D, unique, non-negative, and in ``known_ids`` if given); return them as int64."""
    try:
        example_ids = check_example_ids(torch.as_tensor(example_ids))
    except ValueError as err:
        raise ExampleIdError(str(err)) from None
    if len(torch.unique(example_ids)) != len(example_ids):
        raise ExampleIdError("example_ids has duplicates; score each training example once.")
    if known_ids is not None:
        unknown = example_ids[~torch.isin(example_ids, known_ids.to(example_ids.device))]
        if len(unknown):
            raise ExampleIdError(
                f"{len(unknown)} example id(s) are not in the training set (e.g. {unknown[:5].tolist()}); use ids "
                "from its id column."
            )
    return example_ids



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


def prompt_completion_features(
    tokenizer: Any, prompt: str, completion: Optional[str] = None, max_length: Optional[int] = None
) -> dict[str, list[int]]:
    """Token ids, attention mask and ``labels`` of one language-model example: ``prompt`` + ``completion``, with
    -100 on the prompt's tokens so that only the completion counts. Without a completion, every token counts.

    The two parts are tokenized separately (special tokens such as BOS go with the prompt) and joined, so the
    completion's tokens are exactly the ones it gets on its own. ``max_length`` keeps the last tokens of the
    prompt; a completion that does not fit is an error.

    Example:
        >>> row = prompt_completion_features(tokenizer, "The film was", " a triumph")
        >>> row["labels"]       # [-100, -100, -100, 257, 15499]
    """

    if completion is None:
        ids = list(tokenizer(prompt)["input_ids"])
        if max_length is not None:
            ids = ids[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}
    head = list(tokenizer(prompt)["input_ids"])
    tail = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if not tail:
        raise TurnoverError(f"the completion {completion!r} has no tokens; give a non-empty completion.")
    if max_length is not None and len(head) + len(tail) > max_length:
        if len(tail) >= max_length:
            raise TurnoverError(
                f"the completion has {len(tail)} tokens, more than max_length={max_length} leaves room for; raise "
                "max_length or shorten the completion."
            )
        head = head[len(head) + len(tail) - max_length :]
    ids = head + tail
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(head) + tail}


class CausalLMCollator:
    """Collate causal-LM rows: right-pad ``input_ids`` (with the pad id), ``attention_mask`` (0) and ``labels``
    (-100); rows without ``labels`` count every token (labels = their input ids).

    Right padding keeps every real token at its position, so a sequence's loss does not depend on what it is
    batched with. The pad id only fills masked positions: a tokenizer without a pad token uses its EOS (or 0).

    Example:
        >>> collator = CausalLMCollator(tokenizer)
        >>> batch = collator([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
        >>> batch["labels"]     # tensor([[5, 6, 7], [8, -100, -100]])
    """

    def __init__(self, tokenizer: Any = None, pad_token_id: Optional[int] = None) -> None:
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad_token_id or 0)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:

        if not features or any("input_ids" not in f for f in features):
            raise TurnoverError("CausalLMCollator needs rows with input_ids (tokenize the text first).")
        ids = [list(torch.as_tensor(f["input_ids"]).tolist()) for f in features]
        width = max(len(row) for row in ids)
        batch = {
            "input_ids": torch.full((len(ids), width), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros(len(ids), width, dtype=torch.long),
            "labels": torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long),
        }
        for r, (row, feature) in enumerate(zip(ids, features)):
            n = len(row)
            batch["input_ids"][r, :n] = torch.tensor(row, dtype=torch.long)
            given = feature.get("attention_mask")
            batch["attention_mask"][r, :n] = torch.as_tensor(given, dtype=torch.long) if given is not None else 1
            labels = feature.get("labels")
            labels = row if labels is None else torch.as_tensor(labels).tolist()
            if not isinstance(labels, list):
                raise TurnoverError(
                    f"a language-model row has one label ({labels!r}) instead of one per token; drop the dataset's "
                    "classification label column, or give labels = token ids with -100 where a token does not count."
                )
            if len(labels) != n:
                raise TurnoverError(f"a row has {n} input_ids but {len(labels)} labels; give one label per token.")
            batch["labels"][r, :n] = torch.tensor(labels, dtype=torch.long)
        for key in {k for f in features for k in f} - {"input_ids", "attention_mask", "labels"}:
            values = [f.get(key) for f in features]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                batch[key] = torch.tensor(values)
        return batch


def default_collator(model: "nn.Module", tokenizer: Any = None) -> Any:
    """The collator a trainer uses when given none: causal-LM rows for a causal LM, padding with a tokenizer, else
    transformers' default."""
    if is_causal_lm(model):
        return CausalLMCollator(tokenizer)
    if tokenizer is not None and hasattr(tokenizer, "pad"):
        return DataCollatorWithPadding(tokenizer)
    return default_data_collator


def rows_of_ids(sorted_ids: torch.Tensor, order: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
    """Row of each id in a table whose ids sorted are ``sorted_ids = ids[order]``; unknown ids raise."""
    ids = torch.as_tensor(example_ids).to(torch.int64).cpu().reshape(-1)
    pos = torch.searchsorted(sorted_ids, ids).clamp(max=max(len(sorted_ids) - 1, 0))
    known = sorted_ids[pos] == ids if len(sorted_ids) else torch.zeros_like(ids, dtype=torch.bool)
    if not bool(known.all()):
        unknown = ids[~known]
        raise ExampleIdError(
            f"{len(unknown)} example id(s) are not in the tracked training set (e.g. {unknown[:5].tolist()}); use "
            "ids from the id column of the dataset the model was trained on."
        )
    return order[pos]
