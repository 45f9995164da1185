"""``TurnoverTrainer``: a ``transformers.Trainer`` that trains every example under its own mask.

Example:
    >>> trainer = TurnoverTrainer(model=patched, args=TrainingArguments("out"), train_dataset=add_example_ids(train),
    ...                           data_collator=DataCollatorWithPadding(tokenizer))
    >>> trainer.train()
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import Trainer

from .context import instance_masks, state_of
from .data import BATCH_KEY, InstanceIdCollator, check_id_column, default_collator
from .dynamics import dynamics_callback
from .errors import MissingExampleIdsError
from .fingerprints import weights_fingerprint
from .sites import inner_model
from .training_set import DatasetSource, attach_training_set


def _trainable_fingerprint(model: nn.Module) -> str:
    """The fingerprint of the trainable weights (float32 values, by their transformers names)."""
    inner = inner_model(model)
    return weights_fingerprint(inner, [n for n, p in inner.named_parameters() if p.requires_grad], float32=True)


def bind_trained_weights(model: nn.Module) -> None:
    """Record in the patched model's config that its current trainable weights are what masked training with its
    current mask fields produced (``TurnoverConfig.trained_weights``)."""
    config = state_of(model).config
    config.trained_weights = {"masks": config.masks_fingerprint(), "weights": _trainable_fingerprint(model)}


def trained_weights_problem(model: nn.Module) -> Optional[str]:
    """Why turn-over scores of ``model`` would be wrong: its mask fields or trainable weights differ from those
    masked training bound together (None when they agree, or nothing was bound: older checkpoints)."""
    config = state_of(model).config
    bound = config.trained_weights
    if not bound:
        return None
    if bound.get("masks") != config.masks_fingerprint():
        return ("its turn-over mask fields (p, seed, scheme, mask sites) differ from those its weights were trained "
                "with: turnover_config.json was edited after training. Restore the file as it was saved")
    if bound.get("weights") != _trainable_fingerprint(model):
        return ("its trainable weights differ from those turn-over training produced (trained further without "
                "masks, or loaded in another dtype), so every example may have trained its flipped sub-network. "
                "Train it with TurnoverTrainer again, or score it with an estimator that does not need the masks "
                "(estimator='influence' or 'projected')")
    return None


class ExampleIdTrainer(Trainer):
    """A ``transformers.Trainer`` whose batches carry example ids: the training set's id column is checked up front
    (present, integer, non-negative, unique) and survives ``remove_unused_columns``; the data collator is wrapped
    in :class:`InstanceIdCollator`; evaluation and prediction drop the ids. The base of :class:`TurnoverTrainer`
    and the HYDRA trainers.

    Example:
        >>> trainer = ExampleIdTrainer(model=model, args=args, train_dataset=add_example_ids(train), id_column="example_id")
        >>> batch = next(iter(trainer.get_train_dataloader()))    # batch["example_ids"]: the rows' ids
    """

    def __init__(self, model: Optional[nn.Module] = None, args: Any = None, data_collator: Any = None, *pos: Any,
                 id_column: str = "example_id", **kwargs: Any) -> None:
        self.id_column = id_column
        train_dataset = kwargs.get("train_dataset", pos[0] if pos else None)
        if train_dataset is not None:
            check_id_column(train_dataset, self.id_column)
        if data_collator is None:
            data_collator = default_collator(model, kwargs.get("processing_class") or kwargs.get("tokenizer"))
        super().__init__(model, args, InstanceIdCollator(data_collator, self.id_column), *pos, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.id_column not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, self.id_column]

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Optional[list[str]] = None):
        inputs = {k: v for k, v in inputs.items() if k != BATCH_KEY}  # evaluation uses the full network
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)


class TurnoverTrainer(ExampleIdTrainer):
    """Trainer for a model patched with turn-over dropout.

    Differences from ``Trainer``: the data collator is wrapped in :class:`InstanceIdCollator`; the id column
    survives ``remove_unused_columns``; each training step runs (forward and backward) inside
    :func:`instance_masks` with the batch's ids; evaluation and prediction use the full network. Everything else
    (evaluation, checkpoints and resume, gradient accumulation, mixed precision, logging, callbacks) is ``Trainer``'s.
    The training set's id column is checked up front (present, integer, non-negative, unique). A causal LM
    (PEFT-wrapped or not) gets :class:`~turnover_hf.data.CausalLMCollator` by default: every token of a sequence
    trains under that sequence's mask, and rows with ``labels`` (-100 on a prompt) train on their completion only.
    The training set's identity (ids and a hash of every row) is recorded for the checkpoint; a
    ``train_dataset_source`` (:class:`~turnover_hf.training_set.DatasetSource`, or a Hub id / folder) names where
    it can be loaded from, so that ``InfluencePipeline(checkpoint)`` needs no ``train_dataset``.

    Example:
        >>> trainer = TurnoverTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
        >>> trainer.train(); trainer.save_model("out")        # out/ is an influence-ready checkpoint
    """

    def __init__(self, model: Optional[nn.Module] = None, args: Any = None, data_collator: Any = None, *pos: Any,
                 train_dataset_source: Optional[Union[DatasetSource, dict[str, Any], str]] = None, **kwargs: Any) -> None:
        state = state_of(model)
        train_dataset = kwargs.get("train_dataset", pos[0] if pos else None)
        super().__init__(model, args, data_collator, *pos, id_column=state.config.id_column, **kwargs)
        if train_dataset is not None:
            # the checkpoint will name these rows (ids, inputs, texts, labels): the pipeline refuses any other set
            attach_training_set(model, train_dataset, source=train_dataset_source)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        example_ids = inputs.pop(BATCH_KEY, None)
        if example_ids is None:
            raise MissingExampleIdsError(
                f"a training batch has no example ids: the training dataset needs an {self.id_column!r} column "
                "(turnover_hf.add_example_ids(dataset)) and the collator must be an InstanceIdCollator."
            )
        # Forward and backward both run inside the context: gradient checkpointing recomputes the forward pass.
        with instance_masks(model, example_ids, mode="train"):
            loss = super().training_step(model, inputs, num_items_in_batch)
        recording = dynamics_callback(self.callback_handler)  # None unless a TrainingDynamicsCallback is attached
        if recording is not None:
            recording.record_step(model, self._prepare_inputs(inputs), example_ids)
        return loss

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None):
        example_ids = inputs.pop(BATCH_KEY, None)
        recording = dynamics_callback(self.callback_handler)
        if recording is not None and not return_outputs and model.training and state_of(model).mode == "train":
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            recording.keep_logits(outputs)  # the logits this step trains on, under each example's mask
            return loss
        if example_ids is not None and state_of(model).mode is None:
            with instance_masks(model, example_ids, mode="train"):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        output = super().train(*args, **kwargs)
        bind_trained_weights(self.model)
        return output

    def _save(self, output_dir: Optional[str] = None, state_dict: Any = None) -> None:
        bind_trained_weights(self.model)  # checkpoints during training and save_model: weights the masks trained
        super()._save(output_dir, state_dict)
        recording = dynamics_callback(self.callback_handler)
        if recording is not None and len(recording.recorder):
            recording.dynamics().save(output_dir or self.args.output_dir)  # beside the weights of every checkpoint
