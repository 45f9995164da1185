"""TrainerCallbacks that watch turn-over training.

``FlipSanityCallback`` logs the sanity signal of Kobayashi et al. (2020, Fig. 2) at each evaluation: the loss of a
fixed sample of training examples under their own masks (seen: it falls like a training loss), under their
flipped masks (unseen: it should track the held-out loss), and the held-out loss itself.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from datasets import Dataset
from transformers import TrainerCallback, default_data_collator

from .context import instance_masks, state_of
from .data import BATCH_KEY, InstanceIdCollator, check_id_column
from .losses import eval_mode, is_causal_lm, model_inputs, per_example_loss


class FlipSanityCallback(TrainerCallback):
    """Log ``train_sample_loss_mask``, ``train_sample_loss_flip`` and the held-out ``eval_loss`` at each evaluation.

    The values go into the evaluation metrics, ``state.log_history`` and ``self.history``.

    Example:
        >>> sanity = FlipSanityCallback(train.select(range(256)), DataCollatorWithPadding(tokenizer))
        >>> trainer = TurnoverTrainer(..., callbacks=[sanity]); trainer.train()
        >>> sanity.history[-1]    # {'step': 200, 'train_sample_loss_mask': 0.21, 'train_sample_loss_flip': 0.44, ...}
    """

    def __init__(self, sample: Dataset, data_collator: Optional[Callable] = None, batch_size: int = 64) -> None:
        self.sample = sample
        self.data_collator = data_collator or default_data_collator
        self.batch_size = batch_size
        self.history: list[dict[str, float]] = []

    def sample_losses(self, model: torch.nn.Module) -> dict[str, float]:
        """Mean loss of the sample under each example's mask and under its flipped mask."""
        id_column = state_of(model).config.id_column
        check_id_column(self.sample, id_column)
        collate = InstanceIdCollator(self.data_collator, id_column)
        device = next(model.parameters()).device
        sums = {"train": 0.0, "flip": 0.0}
        shift = is_causal_lm(model)  # a causal LM's logits at position t predict token t + 1
        with eval_mode(model), torch.no_grad():
            for start in range(0, len(self.sample), self.batch_size):
                rows = self.sample.select(range(start, min(start + self.batch_size, len(self.sample))))
                batch = collate([rows[i] for i in range(len(rows))])
                inputs = model_inputs(batch, device)
                for mode in sums:
                    with instance_masks(model, batch[BATCH_KEY], mode=mode):
                        logits = model(**inputs).logits
                    sums[mode] += float(per_example_loss(logits, batch["labels"].to(device), shift=shift).sum())
        n = max(len(self.sample), 1)
        return {"train_sample_loss_mask": sums["train"] / n, "train_sample_loss_flip": sums["flip"] / n}

    def on_evaluate(self, args: Any, state: Any, control: Any, model: Any = None, metrics: Any = None, **kwargs: Any) -> None:
        if model is None:
            return
        record = {"step": state.global_step, **self.sample_losses(model)}
        if metrics is not None:
            if "eval_loss" in metrics:
                record["eval_loss"] = metrics["eval_loss"]
            metrics.update({f"eval_{k}": v for k, v in record.items() if k.startswith("train_sample")})
        self.history.append(record)
        state.log_history.append(dict(record))
