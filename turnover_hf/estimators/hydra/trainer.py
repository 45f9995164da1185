"""Trainer integration: a callback that feeds the tracker, ``HydraTrainer`` and ``HydraTurnoverTrainer``, and lean
mode's replay."""

from __future__ import annotations

import copy
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from transformers import Trainer, TrainerCallback

from ...context import instance_masks
from ...data import BATCH_KEY, check_id_column, check_ids_known
from ...errors import MissingExampleIdsError, TurnoverError
from ...files import PathLike
from ...trainer import ExampleIdTrainer, TurnoverTrainer
from ..gradients import PerExampleGrads, labels_in, param_specs, target_gradients
from .saved import HYDRA_DIR, HYDRA_MODES
from .tracker import HydraTracker, LeanTracker, check_lean_optimizer, check_seen

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------
# Trainer integration
# ---------------------------------------------------------------------------------------------------------------
class HydraCallback(TrainerCallback):
    """Forwards the Trainer's optimizer events to a :class:`HydraTracker` (the batches come from the trainer).

    ``on_pre_optimizer_step`` runs after gradient clipping and ``on_optimizer_step`` before the scheduler moves
    the learning rate, so the tracker sees the clipped gradient and the learning rate the step used. With no
    tracker (the first run of lean mode) it only refuses a resumed run.

    Example:
        >>> trainer.add_callback(HydraCallback(tracker))     # HydraTrainer adds it itself
    """

    def __init__(self, tracker: Optional[HydraTracker]) -> None:
        self.tracker = tracker

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # A second train() on the same trainer starts at step 0 and simply continues the trajectory; a resumed
        # checkpoint starts at its step, whose earlier trajectory this tracker never saw.
        steps = self.tracker.steps if self.tracker is not None else 0
        if state.global_step > 0 and state.global_step != steps:
            raise TurnoverError(
                f"HYDRA tracking starts at optimizer step {state.global_step} but has tracked {steps}: resuming from a "
                "checkpoint is not supported (the tracker's own state, e.g. the momentum of every example's "
                "hypergradient, is not restored). Train from the start."
            )

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        if self.tracker is not None:
            self.tracker.before_step(model, optimizer)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if self.tracker is not None:
            self.tracker.after_step(optimizer)


class _LeanRunControl(TrainerCallback):
    """Lean mode: refuse an optimizer it cannot follow before training; keep a replay quiet (no checkpoints or
    evaluations: the first run made them, and the replay must not overwrite them)."""

    def __init__(self, trainer: HydraTrainingMixin) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if self.trainer.hydra_mode == "lean" or self.trainer._hydra_replaying:
            check_lean_optimizer(optimizer)

    def _quiet(self, control: Any) -> None:
        if self.trainer._hydra_replaying:
            control.should_save = False
            control.should_evaluate = False

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._quiet(control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._quiet(control)


def _trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of what training can change: the parameters with ``requires_grad`` and the buffers."""
    out = {f"parameter {n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out.update({f"buffer {n}": b.detach().clone() for n, b in model.named_buffers()})
    return out


def _tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**{f"parameter {n}": p for n, p in model.named_parameters()},
            **{f"buffer {n}": b for n, b in model.named_buffers()}}


def _load_trained_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    tensors = _tensors_of(model)
    with torch.no_grad():
        for key, value in state.items():
            tensors[key].copy_(value)
    for p in model.parameters():
        p.grad = None


def _state_differences(model: nn.Module, expected: Mapping[str, torch.Tensor]) -> list[str]:
    """The tensors of ``model`` that are not bit for bit ``expected``, with their largest difference."""
    tensors = _tensors_of(model)
    out = []
    for key, value in expected.items():
        now = tensors.get(key)
        if now is None or now.shape != value.shape:
            out.append(f"{key} (missing or reshaped)")
        elif not torch.equal(now.detach(), value):
            out.append(f"{key} (max |difference| {float((now.detach().double() - value.double()).abs().max()):.3g})")
    return out


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _RunStart:
    """What ``Trainer.train()`` starts from, kept so lean mode can replay the same run: the trainable weights and
    buffers, the random states, and the optimizer / scheduler the trainer held (None: the Trainer created them)."""

    weights: dict[str, torch.Tensor]
    rng: dict[str, Any]
    optimizer: Any
    optimizer_state: Optional[dict[str, Any]]
    scheduler: Any
    scheduler_state: Optional[dict[str, Any]]
    created_scheduler: bool
    ignore_keys_for_eval: Optional[list[str]]

    @classmethod
    def capture(cls, trainer: Any, ignore_keys_for_eval: Optional[list[str]]) -> _RunStart:
        optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
        return cls(
            weights=_trained_state(trainer.model),
            rng=_rng_state(),
            optimizer=optimizer,
            optimizer_state=copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None,
            scheduler=scheduler,
            scheduler_state=copy.deepcopy(scheduler.state_dict()) if hasattr(scheduler, "state_dict") else None,
            created_scheduler=bool(getattr(trainer, "_created_lr_scheduler", False)),
            ignore_keys_for_eval=ignore_keys_for_eval,
        )

    def restore(self, trainer: Any) -> None:
        _load_trained_state(trainer.model, self.weights)
        trainer.optimizer = self.optimizer  # the Trainer wraps it again (or creates a fresh one from None)
        if self.optimizer is not None and self.optimizer_state is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))
        trainer.lr_scheduler = self.scheduler
        trainer._created_lr_scheduler = self.created_scheduler
        if self.scheduler is not None and self.scheduler_state is not None:
            self.scheduler.load_state_dict(copy.deepcopy(self.scheduler_state))
        _set_rng_state(self.rng)


def _ignored_optim_args(args: Any, model: nn.Module) -> list[str]:
    """Keys of ``args.optim_args`` that transformers does not pass to the optimizer it builds (e.g. all of them for
    ``optim="sgd"`` in transformers 4.57, whose SGD gets the learning rate only)."""
    if not getattr(args, "optim_args", None):
        return []
    try:
        parsed = [item.split("=")[0] for item in args.optim_args.replace(" ", "").split(",") if item]
        _, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    except (ImportError, ValueError, TypeError, RuntimeError):  # e.g. optimizers needing extra packages
        return []
    return [key for key in parsed if key not in kwargs]


class HydraTrainingMixin:
    """Adds HYDRA to a ``Trainer`` subclass: each micro-batch's per-example gradients go to ``self.hydra``.

    Needs batches with ``example_ids`` (an :class:`~turnover_hf.data.InstanceIdCollator`). Single process only.
    Full mode tracks the hypergradient table while training; lean mode trains plainly and computes the scores of
    one target set per :meth:`hydra_lean_scores` call by replaying the run. ``save_model`` (and every Trainer
    checkpoint) also writes the hypergradients to ``<output_dir>/hydra``, where ``InfluencePipeline`` reads them.
    """

    hydra: Optional[HydraTracker]
    hydra_mode: str
    _hydra_keeps_ids = False  # TurnoverTrainer pops the ids itself

    def _setup_hydra(self, model: Optional[nn.Module], train_dataset: Any, id_column: str, *, hessian: bool,
                     storage_dir: Optional[PathLike], parameters: Optional[Sequence[str]],
                     mask_context: Optional[Callable[[torch.Tensor], ContextManager]], mode: str) -> None:
        args = self.args  # type: ignore[attr-defined]
        if mode not in HYDRA_MODES:
            raise TurnoverError(f"hydra_mode must be one of {HYDRA_MODES}, got {mode!r}.")
        if model is None:
            raise TurnoverError(
                "HYDRA trainers need model=...: model_init re-creates the model at every train(), which the tracker "
                "cannot follow."
            )
        if train_dataset is None:
            raise TurnoverError("HYDRA tracking needs train_dataset (with its id column) when the trainer is built.")
        ids = check_id_column(train_dataset, id_column)
        if args.world_size > 1:
            raise TurnoverError("HYDRA tracking runs in a single process (each process would see part of each step).")
        if args.load_best_model_at_end:
            raise TurnoverError(
                "HYDRA's hypergradients belong to the weights training ends with; load_best_model_at_end would put "
                "an earlier checkpoint's weights in the model. Leave it off: every checkpoint holds its own "
                "hypergradients in <checkpoint>/hydra."
            )
        if mode == "lean" and (hessian or storage_dir is not None):
            raise TurnoverError("hessian=True and hydra_storage_dir belong to hydra_mode='full': lean mode keeps no table.")
        self.hydra_mode = mode
        self._hydra_ids = ids
        self._hydra_specs = param_specs(model, parameters)
        self._hydra_mask_context = mask_context
        self.hydra = (HydraTracker(model, ids, parameters=parameters, hessian=hessian, storage_dir=storage_dir,
                                   mask_context=mask_context, id_column=id_column) if mode == "full" else None)
        self._hydra_tracker = self.hydra  # the tracker training steps feed (None: plain training)
        self._hydra_callback = HydraCallback(self.hydra)
        self.add_callback(self._hydra_callback)  # type: ignore[attr-defined]
        self.add_callback(_LeanRunControl(self))  # type: ignore[attr-defined]
        self._hydra_train_calls = 0
        self._hydra_start: Optional[_RunStart] = None
        self._hydra_end: Optional[dict[str, torch.Tensor]] = None
        self._hydra_replaying = False
        self.hydra_lean: Optional[HydraTracker] = None  # the last replay's tracker (its table: the projections)
        ignored = (_ignored_optim_args(args, model)
                   if self.optimizer is None and getattr(self, "optimizer_cls_and_kwargs", None) is None else [])  # type: ignore[attr-defined]
        if ignored:
            logger.warning(
                "TrainingArguments(optim=%r) ignores optim_args %s in this transformers version: the optimizer is "
                "built without them (optim='sgd': no momentum, dampening or Nesterov). Pass them to the trainer as "
                "optimizer_cls_and_kwargs=(torch.optim.SGD, {'momentum': 0.9, ...}) instead.",
                str(getattr(args.optim, "value", args.optim)), ignored,
            )

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        example_ids = inputs.get(BATCH_KEY)
        if example_ids is None:
            raise MissingExampleIdsError(
                "a training batch has no example ids: HYDRA needs the dataset's id column "
                "(turnover_hf.add_example_ids(dataset)) and an InstanceIdCollator."
            )
        tracker = self._hydra_tracker
        kept = dict(inputs)  # the parent may pop keys from (and move) the dict it gets
        if not self._hydra_keeps_ids:
            inputs = {k: v for k, v in inputs.items() if k != BATCH_KEY}
        if tracker is None:  # lean mode's first run: plain training, replayed by hydra_lean_scores
            return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        before = tracker.current_grad()
        loss = super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]
        # Trainer's own convention, used when the fit to the observed gradient is unreliable (see observe).
        summed = self.model_accepts_loss_kwargs and num_items_in_batch is not None and self.compute_loss_func is None  # type: ignore[attr-defined]
        tracker.observe(
            model, kept, example_ids, observed_grad=tracker.current_grad() - before,
            accumulation_steps=getattr(self, "current_gradient_accumulation_steps", 1),
            num_items=int(num_items_in_batch) if summed else None,
        )
        return loss

    def train(self, resume_from_checkpoint: Any = None, trial: Any = None, ignore_keys_for_eval: Optional[list[str]] = None,
              **kwargs: Any) -> Any:
        self._hydra_train_calls += 1
        first = self._hydra_train_calls == 1
        self._hydra_start = _RunStart.capture(self, ignore_keys_for_eval) if first else None
        self._hydra_end = None
        output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)  # type: ignore[misc]
        if first:
            self._hydra_end = _trained_state(self.model)  # type: ignore[attr-defined]
        return output

    def _save(self, output_dir: Optional[str] = None, state_dict: Any = None) -> None:
        super()._save(output_dir, state_dict)  # type: ignore[misc]
        if self.hydra is not None and self.hydra.steps > 0 and not self._hydra_replaying:
            folder = output_dir if output_dir is not None else self.args.output_dir  # type: ignore[attr-defined]
            self.hydra.save(os.path.join(folder, HYDRA_DIR))

    def _hydra_targets(self, targets: Union[Mapping[str, Any], Dataset], labels: Optional[torch.Tensor]) -> tuple[dict[str, Any], torch.Tensor]:
        if isinstance(targets, Dataset):
            if self.args.remove_unused_columns:  # type: ignore[attr-defined]
                targets = self._remove_unused_columns(targets, description="HYDRA targets")  # type: ignore[attr-defined]
            batch = self.data_collator([targets[i] for i in range(len(targets))])  # type: ignore[attr-defined]
        else:
            batch = dict(targets)
        labels = torch.as_tensor(labels) if labels is not None else labels_in(batch)
        return batch, labels

    def hydra_lean_scores(
        self,
        targets: Union[Mapping[str, Any], Dataset],
        labels: Optional[torch.Tensor] = None,
        *,
        example_ids: Optional[Union[torch.Tensor, Sequence[int]]] = None,
        summed: bool = False,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """HYDRA scores of every training example for one target set, by replaying the finished ``train()`` once.

        Lean mode (``hydra_mode="lean"``; allowed after a full-mode run too): the target gradients are taken at
        the trained weights, the training is run again from the same start (weights, optimizer, scheduler and
        random states restored; no checkpoints or evaluations) and every example's per-example gradient is
        projected onto them before it enters the SGD recurrence. Memory: ``N x Q`` values per optimizer parameter
        group (twice with momentum) instead of ``N x D``; cost: one more training run with per-example gradients.
        The replay must reproduce the run bit for bit: its final weights are compared with the trained ones and a
        difference is an error (the model is then set back to its trained weights).

        Args:
            targets: a batch of model inputs (with ``labels`` unless given) or a ``datasets.Dataset`` of them.
            labels: the targets' labels, if not in ``targets``.
            example_ids: training ids to return (default: the training set's, in its order).
            summed: one column for the sum of the targets' losses (e.g. a validation set) instead of one per target.
            batch_size: targets per gradient batch.

        Returns:
            float32 ``(n_ids, n_targets)`` (``(n_ids, 1)`` with ``summed``), the same scores as
            :meth:`HydraScorer.scores` on the full table: positive = the example helped the target.

        Example:
            >>> trainer = HydraTrainer(model=model, args=args, train_dataset=train, hydra_mode="lean")  # SGD
            >>> trainer.train()                                    # plain training: no table, no per-example work
            >>> scores = trainer.hydra_lean_scores(valid)          # one replay: (len(train), len(valid))
        """
        start, end = self._hydra_start, self._hydra_end
        if self._hydra_train_calls != 1 or start is None or end is None:
            raise TurnoverError(
                "hydra_lean_scores replays one finished train() call, and this trainer ran train() "
                f"{self._hydra_train_calls} time(s){' (the last did not finish)' if end is None else ''}: build the "
                "trainer again and call train() once."
            )
        model: nn.Module = self.model  # type: ignore[attr-defined]
        changed = _state_differences(model, end)
        if changed:
            raise TurnoverError(
                f"the model changed since train() ended ({changed[0]}): lean HYDRA takes the target gradients at the "
                "final weights of the run it replays."
            )
        batch, labels = self._hydra_targets(targets, labels)
        G = target_gradients(PerExampleGrads(model, self._hydra_specs), batch, labels, max(1, int(batch_size))).cpu()
        if summed:
            G = G.double().sum(0, keepdim=True)
        tracker = LeanTracker(model, self._hydra_ids, G, parameters=[s.name for s in self._hydra_specs],
                               id_column=self.id_column, mask_context=self._hydra_mask_context)  # type: ignore[attr-defined]
        start.restore(self)
        self._hydra_replaying = True
        self._hydra_tracker = self._hydra_callback.tracker = tracker
        try:
            super().train(ignore_keys_for_eval=start.ignore_keys_for_eval)  # type: ignore[misc]
        except BaseException:
            _load_trained_state(model, end)
            raise
        finally:
            self._hydra_replaying = False
            self._hydra_tracker = self._hydra_callback.tracker = self.hydra
        changed = _state_differences(model, end)
        if changed:
            _load_trained_state(model, end)
            raise TurnoverError(
                f"lean HYDRA: the replay did not reproduce the training run ({len(changed)} tensor(s) differ, e.g. "
                f"{changed[0]}), so its projections would not belong to the trained model. The replay restores the "
                "initial weights, optimizer, scheduler and the torch / numpy / Python random states; anything else "
                "that changes between two runs breaks it: another seed, data order or dataset, masks, a collator or "
                "callback with its own random generator, nondeterministic kernels (TrainingArguments("
                "full_determinism=True) on GPUs). Make the run deterministic or use hydra_mode='full', which needs no "
                "replay. The model was set back to its trained weights."
            )
        self.hydra_lean = tracker
        ids = self._hydra_ids if example_ids is None else torch.as_tensor(example_ids)
        ids = check_ids_known(torch.as_tensor(ids).cpu(), self._hydra_ids)
        rows = tracker.table.rows_of(ids)
        check_seen(tracker.table, ids, rows)
        return (-tracker.table.read(rows)).float()


class HydraTrainer(HydraTrainingMixin, ExampleIdTrainer):
    """A ``transformers.Trainer`` that tracks HYDRA hypergradients of every training example while it trains.

    Differences from ``Trainer``: the training set needs an id column (``turnover_hf.add_example_ids``); the
    collator is wrapped in :class:`InstanceIdCollator` and the id column survives ``remove_unused_columns``; each
    training step also computes the per-example gradients of its examples; ``self.hydra`` holds the result and
    ``save_model`` writes it to ``<output_dir>/hydra`` beside the weights (so does every checkpoint).

    Args (besides ``Trainer``'s): ``hydra_mode`` (``"full"``: the ``N x D`` table while training; ``"lean"``:
    plain training, then :meth:`hydra_lean_scores` per target set, SGD only), ``hessian`` (exact mode),
    ``hydra_storage_dir`` (memory-mapped table), ``hydra_parameters`` (names to track; default:
    ``requires_grad``), ``id_column``.

    Example:
        >>> trainer = HydraTrainer(model=model, args=TrainingArguments("out", max_grad_norm=1.0),
        ...                        train_dataset=add_example_ids(train), processing_class=tokenizer)
        >>> trainer.train(); trainer.save_model("out/model")      # out/model/hydra: InfluencePipeline(estimator="hydra")
    """

    def __init__(self, model: Optional[nn.Module] = None, args: Any = None, data_collator: Any = None, *pos: Any,
                 hessian: bool = False, hydra_storage_dir: Optional[PathLike] = None,
                 hydra_parameters: Optional[Sequence[str]] = None, hydra_mode: str = "full",
                 id_column: str = "example_id", **kwargs: Any) -> None:
        super().__init__(model, args, data_collator, *pos, id_column=id_column, **kwargs)
        train_dataset = kwargs.get("train_dataset", pos[0] if pos else None)
        self._setup_hydra(model, train_dataset, id_column, hessian=hessian, storage_dir=hydra_storage_dir,
                          parameters=hydra_parameters, mask_context=None, mode=hydra_mode)


class HydraTurnoverTrainer(HydraTrainingMixin, TurnoverTrainer):
    """:class:`~turnover_hf.trainer.TurnoverTrainer` plus HYDRA tracking: one run, both estimators.

    Each example's gradient is taken under its own turn-over mask (as it was trained), so ``h_i`` is the effect of
    down-weighting example ``i`` in this masked training; scores use the full network at the end, like turn-over
    scores. Per-example gradients run one example at a time here. ``hydra_mode`` as in :class:`HydraTrainer`.

    Example:
        >>> trainer = HydraTurnoverTrainer(model=patched, args=args, train_dataset=train, processing_class=tok)
        >>> trainer.train(); trainer.save_model("out/model")     # weights, turn-over config and out/model/hydra
    """

    _hydra_keeps_ids = True

    def __init__(self, model: Optional[nn.Module] = None, args: Any = None, data_collator: Any = None, *pos: Any,
                 hessian: bool = False, hydra_storage_dir: Optional[PathLike] = None,
                 hydra_parameters: Optional[Sequence[str]] = None, hydra_mode: str = "full", **kwargs: Any) -> None:

        super().__init__(model, args, data_collator, *pos, **kwargs)
        train_dataset = kwargs.get("train_dataset", pos[0] if pos else None)
        self._setup_hydra(model, train_dataset, self.id_column, hessian=hessian, storage_dir=hydra_storage_dir,
                          parameters=hydra_parameters, mode=hydra_mode,
                          mask_context=lambda ids: instance_masks(model, ids, mode="train"))
