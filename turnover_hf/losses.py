"""Losses and model inputs every estimator shares: per-example and per-token losses, counted tokens, the inputs a
forward takes, eval mode, a batch's labels and what kind of task a model solves.

Example:
    >>> logits = model(**model_inputs(batch, device)).logits
    >>> per_example_loss(logits, batch["labels"], shift=is_causal_lm(model))     # (B,) float32
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Literal, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .sites import inner_model

IGNORE_INDEX = -100  # label of a token that does not count (a prompt, padding), as in transformers
REDUCTIONS = ("mean", "sum", "none")
TaskKind = Literal["causal_lm", "classification"]


def task_kind(model: nn.Module) -> TaskKind:
    """``"causal_lm"`` for causal language models (``...ForCausalLM``, GPT-2's ``...LMHeadModel``), PEFT-wrapped or
    not: their logits at position t predict token t + 1, so losses shift labels by one; ``"classification"`` for
    every other model (sequence classifiers and single-output regressors).

    Example:
        >>> task_kind(AutoModelForCausalLM.from_config(config))
        'causal_lm'
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(inner_model(model)).__name__
    causal = name.endswith("ForCausalLM") or name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    return "causal_lm" if causal else "classification"


def is_causal_lm(model: nn.Module) -> bool:
    """``task_kind(model) == "causal_lm"``."""
    return task_kind(model) == "causal_lm"


def find_labels(batch: Mapping[str, Any]) -> Optional[torch.Tensor]:
    """The labels of a batch or row (its ``labels`` entry, else ``label``), or None when it has none."""
    for key in ("labels", "label"):
        if key in batch and batch[key] is not None:
            return torch.as_tensor(batch[key])
    return None


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a forward's output: a transformers ``ModelOutput``, a tuple, or a plain logits tensor."""
    if isinstance(output, torch.Tensor):
        return output
    return output.logits if hasattr(output, "logits") else output[0]


def per_token_loss(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = False) -> torch.Tensor:
    """Cross-entropy of every labelled token, float32 ``(B, T)`` aligned with ``labels`` (0 where not counted).

    ``shift=True`` is the causal-LM loss: the logits at position t predict the label at t + 1, so position 0 never
    counts. The logits may cover only the last k positions (transformers' ``logits_to_keep``); they are aligned
    with the last k labels.

    Example:
        >>> per_token_loss(model(**batch).logits, batch["labels"], shift=True).sum(-1)   # summed loss per sequence
    """
    if logits.dim() != 3 or labels.dim() != 2:
        raise ValueError(f"per-token losses need (B, T, V) logits and (B, T) labels, got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}.")
    labels = labels.to(logits.device).long()
    out = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    total, kept = labels.shape[1], logits.shape[1]
    if shift:
        start = total - kept + 1  # logits[:, j] sit at position total - kept + j and predict the next token
        if kept > 1:
            out[:, start:] = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, start:],
                                             reduction="none", ignore_index=IGNORE_INDEX)
    else:
        out[:, total - kept:] = F.cross_entropy(logits.float().transpose(1, 2), labels[:, total - kept:],
                                                reduction="none", ignore_index=IGNORE_INDEX)
    return out


def counted_tokens(labels: torch.Tensor, *, shift: bool = False) -> torch.Tensor:
    """How many tokens of each row count in its loss (labels other than -100, after the shift), at least 1."""
    counted = labels[:, 1:] if shift else labels
    return (counted != IGNORE_INDEX).sum(-1).clamp(min=1)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = False, reduction: str = "mean") -> torch.Tensor:
    """Loss of each row: cross-entropy for classification (for token-level logits the mean, or with
    ``reduction="sum"`` the sum, over labelled tokens; ``shift=True`` for causal LMs), squared error for
    single-output regression. Computed in float32 whatever the model's dtype.

    Example:
        >>> per_example_loss(lm(**batch).logits, batch["labels"], shift=True)    # (B,) mean next-token loss
    """
    if logits.dim() == 2 and logits.shape[-1] == 1 and labels.is_floating_point():
        return (logits.float().squeeze(-1) - labels.float()) ** 2
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels.long(), reduction="none")
    if logits.dim() == 3:
        total = per_token_loss(logits, labels, shift=shift).sum(-1)
        return total if reduction == "sum" else total / counted_tokens(labels.to(total.device), shift=shift)
    raise ValueError(f"cannot compute a per-example loss from logits of shape {tuple(logits.shape)}.")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the block (no dropout), then back in the mode it was in."""
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
    with eval_mode(model), torch.no_grad():
        logits = model(**model_inputs(targets, device)).logits
    if logits.dim() == 2 and logits.shape[-1] == 1:
        return logits.squeeze(-1).float()
    return logits.argmax(-1)
