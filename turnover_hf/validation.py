"""Checks of what users hand the pipeline (sizes, ids, targets, labels), each failing with a message that names the
problem and the fix instead of a traceback from deep inside torch or transformers.

Example:
    >>> positive_int("top_k", 0)
    Traceback (most recent call last):
    turnover_hf.errors.TurnoverError: top_k must be a positive integer, got 0.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .errors import TurnoverError


def positive_int(name: str, value: Any, hint: str = "") -> int:
    """``value`` if it is an integer >= 1; a :class:`TurnoverError` naming ``name`` otherwise.

    Example:
        >>> positive_int("chunk_size", 1024)
        1024
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TurnoverError(f"{name} must be a positive integer{hint}, got {value!r}.")
    return value


def model_max_length(model: nn.Module, tokenizer: Any = None) -> Optional[int]:
    """The longest input (in tokens) ``model`` accepts: its position table (less RoBERTa-style padding offsets) and
    the tokenizer's own limit, whichever is smaller; None if neither is known."""
    config = getattr(model, "config", None)
    limits = []
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "longformer"):
                value -= (getattr(config, "pad_token_id", 1) or 1) + 1  # positions start after the padding index
            limits.append(value)
            break
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000:
        limits.append(tokenizer_limit)
    return min(limits) if limits else None


def check_input_lengths(batch: dict[str, torch.Tensor], limit: Optional[int]) -> None:
    """Refuse targets given as token ids longer than the model accepts (text is truncated before this)."""
    ids = batch.get("input_ids")
    if limit is not None and isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] > limit:
        raise TurnoverError(
            f"targets have {ids.shape[1]} tokens but the model accepts at most {limit}; truncate them (or pass text, "
            "which the pipeline truncates to the model's limit)."
        )


def check_labels(labels: torch.Tensor, num_labels: Optional[int]) -> None:
    """Refuse class labels outside ``0 .. num_labels - 1`` (the loss would fail inside torch)."""
    if num_labels is None or labels.dim() != 1 or labels.numel() == 0:
        return
    if labels.is_floating_point() and num_labels > 1:
        raise TurnoverError(f"target labels must be class indices (integers), got {labels.tolist()[:5]}.")
    if not labels.is_floating_point():
        bad = labels[(labels < 0) | (labels >= num_labels)]
        if len(bad):
            raise TurnoverError(
                f"target labels {sorted(set(bad.tolist()))[:5]} are outside the model's {num_labels} classes "
                f"(0 .. {num_labels - 1}); give labels the model was trained with (see model.config.id2label)."
            )


def check_token_ids(batch: dict[str, torch.Tensor], vocab_size: Optional[int]) -> None:
    """Refuse target token ids outside the model's vocabulary (the embedding would fail inside torch).

    Example:
        >>> check_token_ids({"input_ids": torch.tensor([[2, 99]])}, 64)
        Traceback (most recent call last):
        turnover_hf.errors.TurnoverError: targets hold token ids [99] outside the model's vocabulary (0 .. 63); ...
    """
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.numel() == 0 or not isinstance(vocab_size, int):
        return
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if len(bad):
        raise TurnoverError(
            f"targets hold token ids {sorted(set(bad.tolist()))[:5]} outside the model's vocabulary (0 .. "
            f"{vocab_size - 1}); tokenize them with the model's tokenizer (or pass text)."
        )
