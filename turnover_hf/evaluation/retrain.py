"""Cheap retraining of a small classification head on cached frozen features: the ground truth for fidelity.

A :class:`TurnoverHead` is ``Linear(d, W) -> ReLU -> [instance mask] -> Linear(W, C)``, optionally with ``K``
parallel masked hidden layers ("channels") whose masked outputs are averaged before the output layer. Masks are
exactly the library's: :func:`turnover_hf.masks.mask_for` with the layer keys ``"head.hidden"`` (one channel) or
``"head.hidden.{k}"``, which are the module names :func:`turnover_hf.patch_model` would use for the head of a
:class:`HeadClassifier` (see :func:`patched_classifier`). Masking the hidden Linear's output before or after the
ReLU is the same thing, since masks are non-negative.

Training runs on features computed once (e.g. mean-pooled sentence embeddings), so a model takes well under a
second on a CPU. That makes the expensive ground truths affordable:

* :func:`subset_target_losses`: retrain on many random subsets (with seeds the scored model never used) and
  record each target's loss, the input of :func:`turnover_hf.evaluation.metrics.lds`.
* :func:`leave_one_out`: retrain without one example at a time, with every seed, mask and the batch order of the
  remaining examples unchanged (the definition of Hara et al., 2019).

Example:
    >>> recipe = HeadRecipe(width=128)
    >>> trained = train_head(train_x, train_y, train_ids, recipe, init_seed=0, mask_seed=0)
    >>> trained.head.losses(valid_x, valid_y)            # full-network loss of each target
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import TurnoverConfig
from ..masks import mask_for, scale_of

HEAD_PREFIX = "head."


@dataclass(frozen=True)
class HeadRecipe:
    """Architecture and training recipe of a head; everything but the seeds that decides a trained model.

    Example:
        >>> HeadRecipe(width=1024, epochs=20)
    """

    in_features: int = 384
    width: int = 128
    channels: int = 1
    num_labels: int = 2
    p: float = 0.5
    turnover: bool = True  # False trains the same head without instance masks
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.width < 1 or self.channels < 1 or self.num_labels < 2:
            raise ValueError(f"HeadRecipe needs width >= 1, channels >= 1 and num_labels >= 2, got {self}.")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"HeadRecipe needs epochs >= 1, batch_size >= 1 and lr > 0, got {self}.")
        scale_of(self.p)  # validates the drop ratio

    @property
    def layer_keys(self) -> list[str]:
        """The mask layer keys of the hidden channels (module names under a :class:`HeadClassifier`)."""
        if self.channels == 1:
            return [f"{HEAD_PREFIX}hidden"]
        return [f"{HEAD_PREFIX}hidden.{k}" for k in range(self.channels)]

    def replace(self, **changes: object) -> HeadRecipe:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


class TurnoverHead(nn.Module):
    """``K`` masked hidden layers of ``W`` ReLU units, averaged, then a linear output layer.

    ``forward(features, masks)`` takes masks of shape ``(B, K, W)`` (see :func:`head_masks`) or None for the
    full network.

    Example:
        >>> head = TurnoverHead(HeadRecipe(width=16))
        >>> head(torch.randn(3, 384)).shape
        torch.Size([3, 2])
    """

    def __init__(self, recipe: HeadRecipe) -> None:
        super().__init__()
        self.recipe = recipe
        if recipe.channels == 1:
            self.hidden: nn.Module = nn.Linear(recipe.in_features, recipe.width)
        else:
            self.hidden = nn.ModuleList(nn.Linear(recipe.in_features, recipe.width) for _ in range(recipe.channels))
        self.out = nn.Linear(recipe.width, recipe.num_labels)

    def hidden_linears(self) -> list[nn.Module]:
        """The hidden Linear of each channel, in channel order."""
        # Tools that swap Linear modules for wrappers (e.g. Kronfluence) keep working: only ModuleList is special.
        return list(self.hidden) if isinstance(self.hidden, nn.ModuleList) else [self.hidden]

    def activations(self, features: torch.Tensor) -> torch.Tensor:
        """Unmasked hidden activations, ``(B, K, W)``."""
        return torch.stack([F.relu(layer(features)) for layer in self.hidden_linears()], dim=1)

    def readout(self, activations: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from (possibly masked) activations ``(B, K, W)``; masks broadcast against them."""
        if masks is not None:
            activations = activations * masks
        return self.out(activations.mean(dim=1))

    def forward(self, features: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        return self.readout(self.activations(features), masks)

    @torch.no_grad()
    def losses(self, features: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of each row under the full network (or under ``masks``), float32 ``(B,)``."""
        was_training = self.training
        self.eval()
        try:
            return F.cross_entropy(self(features, masks), labels, reduction="none")
        finally:
            self.train(was_training)


class HeadClassifier(nn.Module):
    """A wrapper whose ``head`` submodule makes the head's module names equal to its mask layer keys."""

    def __init__(self, head: TurnoverHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


def patched_classifier(head: TurnoverHead, mask_seed: int) -> HeadClassifier:
    """A copy of ``head``, wrapped and patched with :func:`turnover_hf.patch_model` (output masks on every hidden
    layer); ``head`` itself stays unpatched.

    Under ``turnover_hf.instance_masks(model, ids, mode=...)`` the wrapper applies the library's own masks, which
    is how tests and benchmarks check that :func:`head_masks` reproduces them bit for bit.
    """
    from ..patcher import patch_model

    recipe = head.recipe
    config = TurnoverConfig(p=recipe.p, seed=mask_seed, target_modules=list(recipe.layer_keys))
    return patch_model(HeadClassifier(copy.deepcopy(head)), config, warn_leaking=False)


def head_masks(example_ids: torch.Tensor, recipe: HeadRecipe, mask_seed: int, *, flipped: bool = False) -> torch.Tensor:
    """The instance masks (or flipped masks) of ``example_ids`` for every channel, float32 ``(B, K, W)``."""
    ids = torch.as_tensor(example_ids, dtype=torch.int64)
    return torch.stack(
        [mask_for(ids, key, recipe.width, p=recipe.p, seed=mask_seed, flipped=flipped) for key in recipe.layer_keys],
        dim=1,
    )


@dataclass
class Checkpoint:
    """A snapshot taken during training: after ``epoch`` epochs, with the learning rate in use then."""

    epoch: int
    state_dict: dict[str, torch.Tensor]
    lr: float


@dataclass
class TrainedHead:
    """A trained head, the seeds that made it, its snapshots and its training time."""

    head: TurnoverHead
    init_seed: int
    mask_seed: int
    order_seed: int
    seconds: float
    checkpoints: list[Checkpoint] = field(default_factory=list)

    @property
    def recipe(self) -> HeadRecipe:
        return self.head.recipe

    def masks(self, example_ids: torch.Tensor, *, flipped: bool = False) -> torch.Tensor:
        """This model's instance masks of ``example_ids``, ``(B, K, W)``."""
        return head_masks(example_ids, self.recipe, self.mask_seed, flipped=flipped)

    def head_at(self, checkpoint: Checkpoint) -> TurnoverHead:
        """A copy of the head with a snapshot's weights."""
        head = TurnoverHead(self.recipe)
        head.load_state_dict(checkpoint.state_dict)
        return head.eval()


def _epoch_orders(n: int, epochs: int, order_seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(order_seed)
    return [torch.randperm(n, generator=generator) for _ in range(epochs)]


def train_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    example_ids: torch.Tensor,
    recipe: HeadRecipe,
    *,
    init_seed: int,
    mask_seed: int,
    order_seed: int | None = None,
    checkpoint_epochs: Sequence[int] = (),
    exclude: torch.Tensor | None = None,
) -> TrainedHead:
    """Train a head with Adam on ``features`` ``(N, d)``, each example under its own instance mask.

    Args:
        features, labels, example_ids: the training set (row ``i`` is example ``example_ids[i]``).
        recipe: architecture and optimisation settings.
        init_seed: seeds the weights. mask_seed: the turn-over mask seed. order_seed: seeds the batch order of
            every epoch (default: ``init_seed``).
        checkpoint_epochs: epochs after which to keep a snapshot (for TracIn-style estimators).
        exclude: row positions to leave out. The batch order is drawn for all ``N`` rows and the excluded rows are
            then skipped, so the remaining examples meet the same batches (leave-one-out retraining).

    Example:
        >>> trained = train_head(x, y, ids, HeadRecipe(), init_seed=3, mask_seed=3)
    """
    started = time.perf_counter()
    order_seed = init_seed if order_seed is None else order_seed
    features = features.float()
    labels = labels.long()
    torch.manual_seed(init_seed)
    head = TurnoverHead(recipe)
    optimizer = torch.optim.Adam(head.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    masks = head_masks(example_ids, recipe, mask_seed) if recipe.turnover else None
    keep = torch.ones(len(features), dtype=torch.bool)
    if exclude is not None:
        keep[torch.as_tensor(exclude, dtype=torch.int64)] = False
    wanted = {int(e) for e in checkpoint_epochs}
    checkpoints: list[Checkpoint] = []
    head.train()
    for epoch, order in enumerate(_epoch_orders(len(features), recipe.epochs, order_seed), start=1):
        order = order[keep[order]]
        for start in range(0, len(order), recipe.batch_size):
            rows = order[start : start + recipe.batch_size]
            logits = head(features[rows], masks[rows] if masks is not None else None)
            loss = F.cross_entropy(logits, labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch in wanted:
            state = {k: v.detach().clone() for k, v in head.state_dict().items()}
            checkpoints.append(Checkpoint(epoch, state, recipe.lr))
    head.eval()
    return TrainedHead(head, init_seed, mask_seed, order_seed, time.perf_counter() - started, checkpoints)


def random_subsets(n: int, count: int, *, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """``count`` random subsets of ``round(fraction * n)`` rows each, as booleans ``(count, n)``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}.")
    size = round(fraction * n)
    rng = np.random.default_rng(seed)
    subsets = np.zeros((count, n), dtype=bool)
    for row in subsets:
        row[rng.permutation(n)[:size]] = True
    return subsets


def subset_target_losses(
    features: torch.Tensor,
    labels: torch.Tensor,
    example_ids: torch.Tensor,
    subsets: np.ndarray,
    target_features: torch.Tensor,
    target_labels: torch.Tensor,
    recipe: HeadRecipe,
    *,
    seeds: Sequence[int],
) -> np.ndarray:
    """Retrain one head per subset (row of ``subsets``) and return each target's full-network loss, ``(S, T)``.

    ``seeds[s]`` seeds subset ``s``'s weights, batch order and masks: choose seeds no scored model used, so that
    the ground truth shares no randomness with the scores it judges.

    Example:
        >>> subsets = random_subsets(len(x), 50, seed=1)
        >>> losses = subset_target_losses(x, y, ids, subsets, vx, vy, HeadRecipe(), seeds=range(10_000, 10_050))
    """
    seeds = list(seeds)
    if len(seeds) != len(subsets):
        raise ValueError(f"need one seed per subset: {len(subsets)} subsets, {len(seeds)} seeds.")
    out = np.empty((len(subsets), len(target_labels)), dtype=np.float64)
    for s, (subset, seed) in enumerate(zip(subsets, seeds)):
        rows = torch.as_tensor(np.flatnonzero(subset))
        trained = train_head(features[rows], labels[rows], example_ids[rows], recipe, init_seed=seed, mask_seed=seed)
        out[s] = trained.head.losses(target_features, target_labels).numpy()
    return out


def leave_one_out(
    features: torch.Tensor,
    labels: torch.Tensor,
    example_ids: torch.Tensor,
    removed: Sequence[int],
    target_features: torch.Tensor,
    target_labels: torch.Tensor,
    recipe: HeadRecipe,
    *,
    init_seed: int,
    mask_seed: int,
    order_seed: int | None = None,
) -> np.ndarray:
    """Actual influence ``L(model without z, target) - L(model, target)`` for each row position in ``removed``.

    Every retraining uses the reference model's seeds; the other examples keep their masks (they are keyed by
    example id) and meet the same batches. Returns ``(len(removed), T)``, positive where z helped the target.
    """
    reference = train_head(
        features, labels, example_ids, recipe, init_seed=init_seed, mask_seed=mask_seed, order_seed=order_seed
    ).head.losses(target_features, target_labels)
    out = np.empty((len(removed), len(target_labels)), dtype=np.float64)
    for i, row in enumerate(removed):
        without = train_head(
            features,
            labels,
            example_ids,
            recipe,
            init_seed=init_seed,
            mask_seed=mask_seed,
            order_seed=order_seed,
            exclude=torch.tensor([int(row)]),
        )
        out[i] = (without.head.losses(target_features, target_labels) - reference).numpy()
    return out
