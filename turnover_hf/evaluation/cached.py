"""Cheap retraining of a BERT-style classifier whose trainable part sits in its top layer: bottleneck adapter + head.

Everything below the top layer's output adapter is frozen and sees no mask, so it is computed once per example.
:func:`cache_top_inputs` runs the full network once and keeps, for the first token, the two inputs of the top
layer's adapter block: the feed-forward output (``output.dense``) and the attention output it is added to.
:class:`TopModel` runs what lies above that cut with the model's own modules (the ``adapters`` library's bottleneck
block with its turn-over masks, the layer's LayerNorm, the pooler and the classifier), so its logits equal the full
model's exactly, and retraining costs what a small MLP costs. Only the first token matters: the adapter block is
applied position by position and the pooler reads the first token.

Because every position above the cut is independent, :class:`TopModel` also accepts ``(B, P, d)`` inputs whose
``P`` positions are ``P`` different examples; :func:`top_turnover_scores` uses that to put all targets on the
position axis, so one row of masks (one training id) broadcasts over every target.

Example:
    >>> top = TopModel(patched_model)                     # adapter in the last layer, e.g. leave_out=[0, ..., 4]
    >>> cache = cache_top_inputs(patched_model, batches)  # collated batches with labels and example_ids
    >>> trained = train_top(top, cache, TopRecipe(), init_seed=0, mask_seed=0)
    >>> scores = top_turnover_scores(top, trained, cache.example_ids, targets_cache)   # (N, T)
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..context import instance_masks, state_of
from ..errors import TurnoverError
from ..masks import validate_seed
from .retrain import MASKINGS, Checkpoint, _epoch_orders

# Ids of ordinary-dropout masks are drawn from here: far above any dataset's row ids, so they are fresh masks.
_DROPOUT_ID_BASE = 2**40


@dataclass
class TopInputs:
    """The cut below the top layer's adapter, one row per example: what :class:`TopModel` needs, plus labels and ids."""

    hidden: torch.Tensor  # (n, d): the top layer's feed-forward output (the adapter block's input), first token
    residual: torch.Tensor  # (n, d): the attention output it is added to, first token
    labels: torch.Tensor  # (n,)
    example_ids: torch.Tensor  # (n,)

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, rows: torch.Tensor | np.ndarray | Sequence[int]) -> TopInputs:
        """The rows at positions ``rows``."""
        index = torch.as_tensor(np.asarray(rows), dtype=torch.int64)
        return TopInputs(self.hidden[index], self.residual[index], self.labels[index], self.example_ids[index])

    def with_labels(self, labels: torch.Tensor) -> TopInputs:
        """The same rows with other labels (e.g. some flipped)."""
        return dataclasses.replace(self, labels=torch.as_tensor(labels))


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """The top layer's output block, pooler, dropout and classifier of a BERT-style sequence classifier."""
    base = getattr(model, "base_model", None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    pooler = getattr(base, "pooler", None)
    classifier, dropout = getattr(model, "classifier", None), getattr(model, "dropout", None)
    if layers is None or pooler is None or classifier is None or dropout is None:
        raise TurnoverError(
            f"{type(model).__name__} is not a BERT-style sequence classifier (encoder.layer, pooler, dropout, "
            "classifier); the cached top-layer retraining supports BertForSequenceClassification-like models only."
        )
    output = layers[-1].output
    if not hasattr(output, "bottleneck_layer_forward"):
        raise TurnoverError(
            "the top layer has no bottleneck adapter block; call adapters.init(model) and add a sequential "
            "bottleneck adapter (e.g. adapters.SeqBnConfig(leave_out=[all but the last layer]))."
        )
    return output, pooler, dropout, classifier


def _check_cut(model: nn.Module, output: nn.Module, classifier: nn.Module) -> None:
    """Every trainable parameter and every mask must lie above the cut, or the cached inputs would be stale."""
    above = {id(p) for module in (output, classifier) for p in module.parameters()}
    below = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in above]
    if below:
        raise TurnoverError(
            f"trainable parameters below the top layer's adapter block ({below[:3]}...) would change the cached "
            "inputs; freeze them, or put the adapter in the last layer only (leave_out=[0, ..., L-2])."
        )
    modules = dict(model.named_modules())
    inside = {id(m) for block in (output, classifier) for m in block.modules()}
    outside = [s.name for s in state_of(model).sites if id(modules[s.name]) not in inside]
    if outside:
        raise TurnoverError(
            f"masked modules below the top layer's adapter block ({outside}) make the lower layers depend on the "
            "example; the cache cannot serve such a model."
        )


class TopModel(nn.Module):
    """The part of a patched BERT-style classifier above the cut, run from :class:`TopInputs`.

    ``forward(hidden, residual, example_ids=None)`` takes ``(B, d)`` rows (returns ``(B, C)`` logits) or
    ``(B, P, d)`` (returns ``(B, P, C)``: every position an independent example). With ``example_ids`` the rows
    run under their own instance masks (negative ids: the full network); without, under whatever
    :func:`turnover_hf.instance_masks` context is open on this module (none: the full network).

    Example:
        >>> top = TopModel(model)
        >>> torch.allclose(top(cache.hidden, cache.residual), model(**batch).logits)
        True
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        output, pooler, dropout, classifier = _parts(model)
        _check_cut(model, output, classifier)
        self.output, self.pooler, self.dropout, self.classifier = output, pooler, dropout, classifier
        self.turnover_state = state_of(model)
        self.initializer_range = float(getattr(model.config, "initializer_range", 0.02))
        self.eval()

    def trainable(self) -> dict[str, nn.Parameter]:
        """The trainable parameters by name (adapter and head)."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor, example_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        single = hidden.dim() == 2
        if single:
            hidden, residual = hidden[:, None], residual[:, None]
        with contextlib.ExitStack() as stack:
            if example_ids is not None:
                full = bool((example_ids < 0).all())
                stack.enter_context(
                    instance_masks(self, mode="off") if full else instance_masks(self, example_ids.to(torch.int64))
                )
            x = self.output.bottleneck_layer_forward(hidden, residual, self.output.LayerNorm)
            if single:  # the pooler and head then see (B, d) rows, as in the full model
                x = x[:, 0]
            return self.classifier(self.dropout(self.pooler.activation(self.pooler.dense(x))))


@torch.no_grad()
def cache_top_inputs(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> TopInputs:
    """Run the full network once over ``batches`` and keep the inputs of the top layer's adapter block.

    Each batch is a collated dict with the model's inputs, ``labels`` and ``example_ids`` (e.g. from
    :class:`turnover_hf.InstanceIdCollator`). Rows come back in the order of the batches.

    Example:
        >>> cache = cache_top_inputs(model, (collator(rows[i : i + 64]) for i in range(0, len(rows), 64)))
    """
    output, _, _, classifier = _parts(model)
    _check_cut(model, output, classifier)
    seen: dict[str, torch.Tensor] = {}

    def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        residual = args[1] if len(args) > 1 else kwargs["input_tensor"]
        seen["hidden"] = module.dropout(module.dense(hidden[:, 0]))
        seen["residual"] = residual[:, 0]

    parts: dict[str, list[torch.Tensor]] = {"hidden": [], "residual": [], "labels": [], "example_ids": []}
    device = next(model.parameters()).device
    handle = output.register_forward_pre_hook(keep, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = {
                k: v.to(device) for k, v in batch.items() if k not in ("labels", "label", "example_ids", "example_id")
            }
            with instance_masks(model, mode="off"):
                model(**inputs)
            parts["hidden"].append(seen["hidden"].float().cpu())
            parts["residual"].append(seen["residual"].float().cpu())
            parts["labels"].append(torch.as_tensor(batch["labels"]).cpu())
            parts["example_ids"].append(torch.as_tensor(batch["example_ids"]).cpu())
    finally:
        handle.remove()
        model.train(was_training)
    if not parts["hidden"]:
        raise ValueError("cache_top_inputs got no batches.")
    return TopInputs(*(torch.cat(parts[k]) for k in ("hidden", "residual", "labels", "example_ids")))


@contextlib.contextmanager
def using_mask_seed(top: nn.Module, seed: int) -> Iterator[None]:
    """Run ``top``'s turn-over masks with another mask seed inside the block (the config is restored after)."""
    config = state_of(top).config
    saved = config.seed
    config.seed = validate_seed(seed)
    try:
        yield
    finally:
        config.seed = saved


def init_trainable(top: TopModel, seed: int) -> None:
    """Fresh weights for the trainable parameters: normal(0, initializer_range) matrices, zero vectors.

    That is the ``adapters`` library's ``"bert"`` initialisation and transformers' initialisation of a new head.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(top.trainable().items()):
            if param.dim() > 1 and not name.endswith("bias"):  # mask-channel biases are (K-1, out): vectors too
                param.copy_(torch.randn(param.shape, generator=generator) * top.initializer_range)
            else:
                param.zero_()


@dataclass(frozen=True)
class TopRecipe:
    """How the adapter and head are (re)trained on cached inputs: Adam, shuffled batches, a masking scheme.

    ``masking``: ``"turnover"`` (each example under its own instance mask), ``"dropout"`` (ordinary dropout on the
    same units at the same p: a fresh mask per row and step) or ``"none"``.

    Example:
        >>> TopRecipe(epochs=5, lr=3e-3, masking="dropout")
    """

    epochs: int = 10
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    masking: str = "turnover"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"TopRecipe needs epochs >= 1, batch_size >= 1 and lr > 0, got {self}.")
        if self.masking not in MASKINGS:
            raise ValueError(f"TopRecipe.masking must be one of {MASKINGS}, got {self.masking!r}.")


@dataclass
class TrainedTop:
    """Trained adapter and head weights, the seeds that made them, snapshots and training time."""

    state: dict[str, torch.Tensor]
    recipe: TopRecipe
    init_seed: int
    mask_seed: int
    order_seed: int
    seconds: float
    checkpoints: list[Checkpoint] = field(default_factory=list)

    @contextlib.contextmanager
    def active(self, top: TopModel, state: Mapping[str, torch.Tensor] | None = None) -> Iterator[TopModel]:
        """``top`` with these weights (or a snapshot's ``state``) and this model's mask seed inside the block; the
        previous weights and seed come back after it."""
        saved = trainable_state(top)
        load_trainable(top, self.state if state is None else state)
        try:
            with using_mask_seed(top, self.mask_seed):
                yield top
        finally:
            load_trainable(top, saved)


def trainable_state(top: TopModel) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable parameters."""
    return {name: p.detach().clone() for name, p in top.trainable().items()}


def load_trainable(top: TopModel, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the trainable parameters (every one must be present)."""
    params = top.trainable()
    missing = sorted(set(params) - set(state))
    if missing:
        raise KeyError(f"the state lacks trainable parameters {missing}.")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])


def train_top(
    top: TopModel,
    data: TopInputs,
    recipe: TopRecipe,
    *,
    init_seed: int,
    mask_seed: int,
    order_seed: int | None = None,
    exclude: Sequence[int] | None = None,
    checkpoint_epochs: Sequence[int] = (),
) -> TrainedTop:
    """Train the adapter and head from fresh weights on cached inputs (the lower layers stay as cached).

    ``exclude`` drops row positions after the batch order is drawn for all rows, so the other examples meet the
    same batches (leave-one-out). Snapshots after ``checkpoint_epochs`` feed TracIn-style estimators.

    Example:
        >>> trained = train_top(top, cache, TopRecipe(), init_seed=3, mask_seed=3)
        >>> with trained.active(top):
        ...     logits = top(cache.hidden, cache.residual)
    """
    started = time.perf_counter()
    order_seed = init_seed if order_seed is None else order_seed
    init_trainable(top, init_seed)
    params = list(top.trainable().values())
    optimizer = torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    keep = torch.ones(len(data), dtype=torch.bool)
    if exclude is not None:
        keep[torch.as_tensor(list(exclude), dtype=torch.int64)] = False
    dropout = torch.Generator().manual_seed(mask_seed)
    wanted = {int(e) for e in checkpoint_epochs}
    checkpoints: list[Checkpoint] = []
    labels = data.labels.long()
    top.eval()  # masks come from the context; the model's own dropout stays off as in the benchmark recipes
    with using_mask_seed(top, mask_seed):
        for epoch, order in enumerate(_epoch_orders(len(data), recipe.epochs, order_seed), start=1):
            order = order[keep[order]]
            for start in range(0, len(order), recipe.batch_size):
                rows = order[start : start + recipe.batch_size]
                if recipe.masking == "turnover":
                    ids = data.example_ids[rows]
                elif recipe.masking == "dropout":
                    ids = _DROPOUT_ID_BASE + torch.randint(0, 2**40, (len(rows),), generator=dropout)
                else:
                    ids = torch.full((len(rows),), -1)
                logits = top(data.hidden[rows], data.residual[rows], ids)
                loss = F.cross_entropy(logits, labels[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if epoch in wanted:
                checkpoints.append(Checkpoint(epoch, trainable_state(top), recipe.lr))
    seconds = time.perf_counter() - started
    return TrainedTop(trainable_state(top), recipe, init_seed, mask_seed, order_seed, seconds, checkpoints)


@torch.no_grad()
def top_losses(top: TopModel, trained: TrainedTop, data: TopInputs) -> torch.Tensor:
    """Full-network cross-entropy of every row of ``data`` under ``trained``'s weights, ``(n,)``."""
    with trained.active(top):
        return F.cross_entropy(top(data.hidden, data.residual), data.labels.long(), reduction="none")


@torch.no_grad()
def top_accuracy(top: TopModel, trained: TrainedTop, data: TopInputs) -> float:
    """Accuracy of the full network (no masks) under ``trained``'s weights."""
    with trained.active(top):
        return float((top(data.hidden, data.residual).argmax(-1) == data.labels).float().mean())


@torch.no_grad()
def top_turnover_scores(
    top: TopModel, trained: TrainedTop, example_ids: torch.Tensor, targets: TopInputs, *, block: int = 64
) -> torch.Tensor:
    """Turn-over influence ``L(target | flip(m_z)) - L(target | m_z)`` of every id on every target, ``(N, T)``.

    Exact: the model's own modules and masks, with the ``T`` targets on the position axis so that one id's masks
    broadcast over all of them (``2 * block`` rows of ``T`` positions per forward).
    """
    example_ids = torch.as_tensor(example_ids, dtype=torch.int64)
    n, t = len(example_ids), len(targets)
    hidden, residual = targets.hidden[None], targets.residual[None]
    labels = targets.labels.long()
    scores = torch.empty(n, t)
    with trained.active(top):
        for start in range(0, n, block):
            ids = example_ids[start : start + block]
            b = len(ids)
            flipped = torch.arange(2 * b) >= b
            with instance_masks(top, ids.repeat(2), flipped=flipped):
                logits = top(hidden.expand(2 * b, -1, -1), residual.expand(2 * b, -1, -1))  # (2b, T, C)
            losses = F.cross_entropy(logits.reshape(2 * b * t, -1), labels.repeat(2 * b), reduction="none")
            losses = losses.view(2 * b, t)
            scores[start : start + b] = losses[b:] - losses[:b]
    return scores


@torch.no_grad()
def top_self_scores(top: TopModel, trained: TrainedTop, data: TopInputs, *, block: int = 1024) -> torch.Tensor:
    """Turn-over self-influence of every row of ``data`` (scored on itself, under its own id's masks), ``(n,)``."""
    out = torch.empty(len(data))
    with trained.active(top):
        for start in range(0, len(data), block):
            part = data.select(range(start, min(start + block, len(data))))
            b = len(part)
            flipped = torch.arange(2 * b) >= b
            with instance_masks(top, part.example_ids.repeat(2), flipped=flipped):
                logits = top(part.hidden.repeat(2, 1), part.residual.repeat(2, 1))
            losses = F.cross_entropy(logits, part.labels.long().repeat(2), reduction="none")
            out[start : start + b] = losses[b:] - losses[:b]
    return out
