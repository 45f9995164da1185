"""Training dynamics of a turn-over model: every example's logits under its mask and its flipped mask, per epoch.

The Trainer already computes each example's logits under its own mask m(z) (the loss it trains on). One extra
no-grad forward per batch gives the logits under the flipped mask m~(z): the sub-network that never trained on z,
so these are out-of-sample predictions for the whole training set from one training run. :class:`DynamicsRecorder`
collects both, epoch by epoch; :class:`TrainingDynamicsCallback` attaches one to a
:class:`~turnover_hf.TurnoverTrainer`, which hands it each training batch's logits and saves the result with every
checkpoint (``training_dynamics.safetensors`` + ``training_dynamics.json``, written atomically).
:func:`turnover_hf.label_issues.rank_label_issues` turns them into a ranking of suspicious labels.

Memory and disk: ``2 * E * N * C`` float32 values (E epochs, N examples, C classes), e.g. 2000 x 5 x 2 x 2 = 160 KB.

Example:
    >>> dynamics = TrainingDynamicsCallback()
    >>> trainer = TurnoverTrainer(model=model, args=args, train_dataset=train, callbacks=[dynamics])
    >>> trainer.train(); trainer.save_model("out")      # out/training_dynamics.safetensors
    >>> TrainingDynamics.load("out").flip_loss().mean(0)  # (N,) mean out-of-sample loss over epochs
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from .context import instance_masks
from .data import BATCH_KEY
from .errors import TurnoverError
from .files import atomic_path, atomic_write_text
from .prefix import PrefixReplay

DYNAMICS_WEIGHTS = "training_dynamics.safetensors"
DYNAMICS_CONFIG = "training_dynamics.json"
FORMAT_VERSION = 1


def _margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logit of the given label minus the largest other logit (negative: the model prefers another class)."""
    given = logits.gather(-1, labels.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, labels.expand(logits.shape[:-1]).unsqueeze(-1), float("-inf"))
    return given - others.max(-1).values


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every (epoch, example) cell; NaN where the example was not seen that epoch."""
    log_probs = F.log_softmax(logits, dim=-1)
    return -log_probs.gather(-1, labels.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)


@dataclass
class TrainingDynamics:
    """Per-epoch logits of every training example under its mask and its flipped mask.

    ``mask_logits`` and ``flip_logits`` are ``(E, N, C)`` float32, NaN where an example was not seen in an epoch
    (a fractional last epoch); row ``n`` is example ``example_ids[n]`` with label ``labels[n]`` (ids ascending).
    The masked logits are those of the training forward (before that step's update); the flipped ones come from a
    no-grad forward of the same batch at the same weights.

    Example:
        >>> dyn = TrainingDynamics.load("out")
        >>> dyn.flip_loss().nanmean(0)      # mean out-of-sample loss per example
    """

    example_ids: torch.Tensor
    labels: torch.Tensor
    mask_logits: torch.Tensor
    flip_logits: torch.Tensor

    def __post_init__(self) -> None:
        e, n, _ = self.mask_logits.shape
        if self.flip_logits.shape != self.mask_logits.shape or len(self.example_ids) != n or len(self.labels) != n:
            raise TurnoverError(
                f"training dynamics of inconsistent shapes: {n} ids, {len(self.labels)} labels, mask logits "
                f"{tuple(self.mask_logits.shape)}, flip logits {tuple(self.flip_logits.shape)}."
            )

    @property
    def num_epochs(self) -> int:
        return int(self.mask_logits.shape[0])

    def mask_loss(self) -> torch.Tensor:
        """``(E, N)`` loss of each example under its own mask (the loss it trained on)."""
        return _loss(self.mask_logits, self.labels.long())

    def flip_loss(self) -> torch.Tensor:
        """``(E, N)`` loss of each example under its flipped mask (a sub-network that never trained on it)."""
        return _loss(self.flip_logits, self.labels.long())

    def mask_margin(self) -> torch.Tensor:
        """``(E, N)`` logit margin of the given label under each example's mask (area under the margin: its mean)."""
        return _margin(self.mask_logits, self.labels.long())

    def flip_margin(self) -> torch.Tensor:
        """``(E, N)`` logit margin of the given label under each example's flipped mask."""
        return _margin(self.flip_logits, self.labels.long())

    def flip_probabilities(self, epochs: Optional[slice] = None) -> torch.Tensor:
        """``(N, C)`` out-of-sample class probabilities: the flipped sub-networks' softmax, averaged over ``epochs``
        (default: the last epoch in which each example was seen)."""
        probs = F.softmax(self.flip_logits, dim=-1)
        if epochs is not None:
            return probs[epochs].nanmean(0)
        seen = ~torch.isnan(probs[..., 0])  # (E, N)
        last = (seen * torch.arange(1, self.num_epochs + 1)[:, None]).argmax(0)
        return probs[last, torch.arange(probs.shape[1])]

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``training_dynamics.safetensors`` and ``training_dynamics.json`` into ``folder`` (atomically)."""
        from safetensors.torch import save_file

        tensors = {
            "example_ids": self.example_ids.to(torch.int64).contiguous(),
            "labels": self.labels.to(torch.int64).contiguous(),
            "mask_logits": self.mask_logits.float().contiguous(),
            "flip_logits": self.flip_logits.float().contiguous(),
        }
        with atomic_path(os.path.join(folder, DYNAMICS_WEIGHTS)) as tmp:
            save_file(tensors, tmp)
        info = {"format_version": FORMAT_VERSION, "epochs": self.num_epochs, "num_examples": len(self.example_ids),
                "num_labels": int(self.mask_logits.shape[-1])}
        atomic_write_text(os.path.join(folder, DYNAMICS_CONFIG), json.dumps(info, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | os.PathLike) -> TrainingDynamics:
        """Read what :meth:`save` wrote; a clear error if the folder has no recorded dynamics."""
        from safetensors.torch import load_file

        path = os.path.join(folder, DYNAMICS_WEIGHTS)
        if not os.path.exists(path):
            raise TurnoverError(
                f"{os.fspath(folder)!r} has no {DYNAMICS_WEIGHTS}: train with "
                "TurnoverTrainer(..., callbacks=[turnover_hf.TrainingDynamicsCallback()]) to record it."
            )
        t = load_file(path)
        return cls(t["example_ids"], t["labels"], t["mask_logits"], t["flip_logits"])

    @classmethod
    def exists(cls, folder: str | os.PathLike) -> bool:
        return os.path.exists(os.path.join(folder, DYNAMICS_WEIGHTS))


def keep_prefix_outputs(replay: Any) -> list[Any]:
    """Forward hooks that keep (detached) what the mask-free lower modules of a
    :class:`~turnover_hf.prefix.PrefixReplay` output in every forward, so that a following forward
    under other masks can replay them instead of recomputing; returns the hook handles (``.remove()`` them)."""

    def keeper(name: str) -> Any:
        def keep(module: nn.Module, args: tuple, output: Any) -> None:
            detached = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in output) \
                if isinstance(output, tuple) else output.detach() if isinstance(output, torch.Tensor) else output
            replay._outputs[name] = detached

        return keep

    return [module.register_forward_hook(keeper(name)) for name, module in replay.modules]


class DynamicsRecorder:
    """Collects ``(example_ids, labels, mask_logits, flip_logits)`` of training batches, epoch by epoch.

    Example:
        >>> recorder = DynamicsRecorder()
        >>> recorder.start_epoch(); recorder.record(ids, labels, logits, flip_logits)
        >>> recorder.dynamics().flip_loss().shape      # (1, len(ids))
    """

    def __init__(self) -> None:
        self._epochs: list[list[tuple[torch.Tensor, ...]]] = []

    def start_epoch(self) -> None:
        """Begin a new epoch (records before the first call go into epoch 0)."""
        self._epochs.append([])

    def record(
        self, example_ids: torch.Tensor, labels: torch.Tensor, mask_logits: torch.Tensor, flip_logits: torch.Tensor
    ) -> None:
        """Keep one batch (detached, float32, on CPU). ``*_logits`` are ``(B, C)``."""
        if not self._epochs:
            self.start_epoch()
        if mask_logits.dim() != 2 or flip_logits.shape != mask_logits.shape:
            raise TurnoverError(
                f"training dynamics record (B, C) classifier logits; got {tuple(mask_logits.shape)} and "
                f"{tuple(flip_logits.shape)} (token-level models are not supported)."
            )
        self._epochs[-1].append(tuple(
            t.detach().to("cpu", torch.float32 if t.is_floating_point() else torch.int64)
            for t in (example_ids, labels, mask_logits, flip_logits)
        ))

    def __len__(self) -> int:
        return sum(len(chunk[0]) for epoch in self._epochs for chunk in epoch)

    def dynamics(self) -> TrainingDynamics:
        """Everything recorded so far as :class:`TrainingDynamics` (empty epochs are dropped)."""
        epochs = [e for e in self._epochs if e]
        if not epochs:
            raise TurnoverError("no training batch was recorded: the recorder saw no training step.")
        ids = torch.cat([c[0] for e in epochs for c in e])
        labels = torch.cat([c[1] for e in epochs for c in e])
        unique, inverse = torch.unique(ids, return_inverse=True)
        given = torch.full((len(unique),), -1, dtype=torch.int64)
        given[inverse] = labels
        classes = epochs[0][0][2].shape[-1]
        out = torch.full((2, len(epochs), len(unique), classes), float("nan"))
        start = 0
        for e, epoch in enumerate(epochs):
            for chunk in epoch:
                rows = inverse[start : start + len(chunk[0])]
                out[0, e, rows], out[1, e, rows] = chunk[2], chunk[3]
                start += len(chunk[0])
        return TrainingDynamics(unique, given, out[0], out[1])


@torch.no_grad()
def flipped_logits(model: nn.Module, inputs: dict[str, torch.Tensor], example_ids: torch.Tensor) -> torch.Tensor:
    """Logits of a batch under each row's flipped mask (eval mode, no grad): ``inputs`` are the model's inputs."""
    was_training = model.training
    model.eval()
    try:
        with instance_masks(model, example_ids, mode="flip"):
            return model(**inputs).logits
    finally:
        model.train(was_training)


class TrainingDynamicsCallback(TrainerCallback):
    """Record every example's logits under its mask and its flipped mask at every epoch of a TurnoverTrainer run.

    The trainer hands each training batch's logits to :attr:`recorder` (its own forward, plus one no-grad forward
    under the flipped masks) and writes :class:`TrainingDynamics` into every checkpoint and ``save_model`` folder.
    The extra forward reuses the training forward's outputs of the mask-free layers below the lowest mask (as
    turn-over scoring does), so it costs the layers from the lowest mask up; without active dropout in those lower
    layers the replay is exact, with it the whole network runs again. Without this callback nothing is recorded
    and nothing changes.

    Example:
        >>> callback = TrainingDynamicsCallback()
        >>> TurnoverTrainer(model=model, args=args, train_dataset=train, callbacks=[callback]).train()
        >>> callback.dynamics().flip_loss().shape    # (epochs, N)
    """

    def __init__(self) -> None:
        self.recorder = DynamicsRecorder()
        self._logits: Optional[torch.Tensor] = None
        self._replay: Any = None
        self._handles: list[Any] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._replay = PrefixReplay.for_model(model) if model is not None else None
        if self._replay is None:
            return
        lower = [m for _, module in self._replay.modules for m in module.modules()]
        if any(isinstance(m, nn.Dropout) and m.p > 0 for m in lower):
            self._replay = None  # in training mode those layers' outputs are not what an eval forward computes
            return
        self._handles = keep_prefix_outputs(self._replay)


    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._replay = [], None

    def dynamics(self) -> TrainingDynamics:
        """What was recorded so far (see :class:`TrainingDynamics`)."""
        return self.recorder.dynamics()

    def keep_logits(self, outputs: Any) -> None:
        """Called by the trainer with the outputs of a training forward (under the examples' masks)."""
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        self._logits = logits.detach()

    def record_step(self, model: nn.Module, inputs: dict[str, Any], example_ids: torch.Tensor) -> None:
        """Called by the trainer after a training step's backward, before the optimizer step: record the kept
        logits and the same batch's logits under the flipped masks."""
        mask_logits, self._logits = self._logits, None
        labels = inputs.get("labels")
        if mask_logits is None or labels is None:
            return
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", BATCH_KEY)}
        ids = example_ids.to(mask_logits.device)
        if self._replay is not None and len(self._replay._outputs) == len(self._replay.modules):
            with self._replay.replaying(torch.arange(len(ids), device=ids.device)):
                flip = flipped_logits(model, model_inputs, ids)
        else:
            flip = flipped_logits(model, model_inputs, ids)
        self.recorder.record(example_ids, labels, mask_logits, flip)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.recorder.start_epoch()


def dynamics_callback(callbacks: Any) -> Optional[TrainingDynamicsCallback]:
    """The :class:`TrainingDynamicsCallback` among a trainer's callbacks, if any."""
    for callback in getattr(callbacks, "callbacks", callbacks) or ():
        if isinstance(callback, TrainingDynamicsCallback):
            return callback
    return None
