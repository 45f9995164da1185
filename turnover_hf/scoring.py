"""Turn-over influence scores: loss(target | flipped m(z)) - loss(target | m(z)), batched over (id, target) pairs.

Positive scores mean training example z helped the target (the sub-network that never saw z does worse).

Example:
    >>> targets = tokenizer(["a gripping film"], return_tensors="pt")
    >>> targets["labels"] = torch.tensor([1])
    >>> scores = influence(model, targets, example_ids=torch.arange(100))   # (100, 1)
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .context import instance_masks, state_of
from .errors import ExampleIdError
from .masks import check_example_ids

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of each row: cross-entropy for classification (mean over labelled tokens for token-level logits),
    squared error for single-output regression. Computed in float32 whatever the model's dtype."""
    logits = logits.float()
    if logits.dim() == 2 and logits.shape[-1] == 1 and labels.is_floating_point():
        return (logits.squeeze(-1) - labels.float()) ** 2
    if logits.dim() == 2:
        return F.cross_entropy(logits, labels.long(), reduction="none")
    if logits.dim() == 3:
        token_loss = F.cross_entropy(
            logits.transpose(1, 2), labels.long(), reduction="none", ignore_index=IGNORE_INDEX
        )  # (B, T)
        counted = (labels != IGNORE_INDEX).sum(-1).clamp(min=1)
        return token_loss.sum(-1) / counted
    raise ValueError(f"cannot compute a per-example loss from logits of shape {tuple(logits.shape)}.")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def model_inputs(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of ``batch`` that go to the model's forward (everything but labels and example ids), on device."""
    return {
        k: v.to(device) for k, v in batch.items()
        if isinstance(v, torch.Tensor) and k not in ("labels", "label", "example_ids", "example_id")
    }


def predicted_labels(model: nn.Module, targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The full network's own predictions for targets without labels (argmax; the logits for regression)."""
    device = next(model.parameters()).device
    with _eval_mode(model), torch.no_grad():
        logits = model(**model_inputs(targets, device)).logits
    if logits.dim() == 2 and logits.shape[-1] == 1:
        return logits.squeeze(-1).float()
    return logits.argmax(-1)


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


def _labels_of(model: nn.Module, targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
    for key in ("labels", "label"):
        if key in targets:
            return torch.as_tensor(targets[key])
    logger.info("targets carry no labels: scoring against the model's own predictions.")
    return predicted_labels(model, targets)


def influence(
    model: nn.Module,
    targets: Mapping[str, torch.Tensor],
    example_ids: Union[torch.Tensor, Sequence[int]],
    *,
    batch_size: int = 64,
    known_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Turn-over influence of each training id on each target, a float32 tensor of shape ``(n_ids, n_targets)``.

    ``targets`` is a collated batch (``input_ids``, ``attention_mask``, ... and ``labels``; without labels the
    model's own predictions are used). Every forward holds ``batch_size`` (id, target, mask-or-flip) rows.

    Example:
        >>> scores = influence(model, collator([valid[0], valid[1]]), example_ids=train["example_id"])
        >>> scores[:, 0].topk(5).indices                    # rows of the 5 strongest proponents of target 0
    """
    state_of(model)
    example_ids = check_ids_known(torch.as_tensor(example_ids), known_ids)
    labels = _labels_of(model, targets)
    device = next(model.parameters()).device
    inputs = model_inputs(targets, device)
    labels = labels.to(device)
    n_ids, n_targets = len(example_ids), len(labels)
    # Rows enumerate (target, id, flipped): pairs of rows hold both masks of one (id, target).
    total = n_targets * n_ids * 2
    losses = torch.empty(total, dtype=torch.float32, device=device)
    ids_dev = example_ids.to(device)
    with _eval_mode(model), torch.no_grad():
        for start in range(0, total, max(2, batch_size)):
            rows = torch.arange(start, min(start + max(2, batch_size), total), device=device)
            target_idx, rest = rows // (2 * n_ids), rows % (2 * n_ids)
            id_idx, flipped = rest // 2, (rest % 2).bool()
            batch = {k: v[target_idx] for k, v in inputs.items()}
            with instance_masks(model, ids_dev[id_idx], flipped=flipped):
                logits = model(**batch).logits
            losses[rows] = per_example_loss(logits, labels[target_idx])
    losses = losses.view(n_targets, n_ids, 2)
    return (losses[..., 1] - losses[..., 0]).T.contiguous().cpu()
