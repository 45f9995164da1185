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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import TurnoverConfig
from ..masks import mask_for, scale_of
from ..patcher import patch_model

HEAD_PREFIX = "head."
MASKINGS: tuple[str, ...] = ("turnover", "dropout", "none")


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
    # "turnover": each example under its own instance mask; "dropout": ordinary dropout at the same p on the same
    # units (a fresh random mask per row and step); "none": no masks at all.
    masking: str = "turnover"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.width < 1 or self.channels < 1 or self.num_labels < 2:
            raise ValueError(f"HeadRecipe needs width >= 1, channels >= 1 and num_labels >= 2, got {self}.")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"HeadRecipe needs epochs >= 1, batch_size >= 1 and lr > 0, got {self}.")
        if self.masking not in MASKINGS:
            raise ValueError(f"HeadRecipe.masking must be one of {MASKINGS}, got {self.masking!r}.")
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
    masks = head_masks(example_ids, recipe, mask_seed) if recipe.masking == "turnover" else None
    dropout = torch.Generator().manual_seed(mask_seed) if recipe.masking == "dropout" else None
    scale = scale_of(recipe.p)
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
            if masks is not None:
                batch_masks = masks[rows]
            elif dropout is not None:
                shape = (len(rows), recipe.channels, recipe.width)
                batch_masks = (torch.rand(shape, generator=dropout) >= recipe.p).float() * scale
            else:
                batch_masks = None
            logits = head(features[rows], batch_masks)
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

    def losses(rows: np.ndarray, seed: int) -> np.ndarray:
        rows = torch.as_tensor(rows)
        trained = train_head(features[rows], labels[rows], example_ids[rows], recipe, init_seed=seed, mask_seed=seed)
        return trained.head.losses(target_features, target_labels).numpy()

    return subset_losses(losses, subsets, seeds=seeds)


def subset_losses(
    train_and_measure: Callable[[np.ndarray, int], np.ndarray], subsets: np.ndarray, *, seeds: Sequence[int]
) -> np.ndarray:
    """``(S, T)`` target losses of one model per subset, for any model family.

    ``train_and_measure(rows, seed)`` trains a model on the row positions ``rows`` with ``seed`` (weights, batch
    order and masks) and returns the ``(T,)`` target losses of its deployed (full) network.

    Example:
        >>> losses = subset_losses(lambda rows, seed: my_losses(rows, seed), subsets, seeds=range(10_000, 10_050))
    """
    seeds = list(seeds)
    if len(seeds) != len(subsets):
        raise ValueError(f"need one seed per subset: {len(subsets)} subsets, {len(seeds)} seeds.")
    rows = [train_and_measure(np.flatnonzero(subset), seed) for subset, seed in zip(subsets, seeds)]
    return np.stack(rows).astype(np.float64) if rows else np.empty((0, 0))


def loo_effects(
    train_and_measure: Callable[[int | None, int], np.ndarray], removed: Sequence[int], *, seeds: Sequence[int]
) -> np.ndarray:
    """Actual leave-one-out effects ``L(without z) - L(with z)`` per retrain seed, ``(n_seeds, len(removed), T)``.

    ``train_and_measure(row, seed)`` trains on every row but the position ``row`` (all rows for None) with
    ``seed`` and returns the ``(T,)`` target losses of the deployed network. Each seed's reference model and its
    leave-one-out models share the seed, so only the removal differs; positive entries mean z helped the target.
    Average over seeds (``.mean(0)``) for the expected effect; use seeds the scored model never used.

    Example:
        >>> effects = loo_effects(losses_without, removed=[3, 17, 40], seeds=[30_000, 30_001])
        >>> loo_correlation(scores[[3, 17, 40]], effects.mean(0))
    """
    out = []
    for seed in seeds:
        reference = np.asarray(train_and_measure(None, seed), dtype=np.float64)
        out.append([np.asarray(train_and_measure(int(row), seed), dtype=np.float64) - reference for row in removed])
    return np.asarray(out, dtype=np.float64)


class Cleansing:
    """Data cleansing as in Kobayashi et al. (2020, Table 2), with a random-removal control.

    Remove the examples a method finds most harmful (most negative mean influence on a validation set, see
    :func:`turnover_hf.evaluation.metrics.most_harmful`), retrain with several seeds, and compare test accuracy
    with removing nothing and with removing as many random examples (one random draw per seed). The same seeds
    serve every condition, so differences are paired. Baselines are computed once and shared by every method.

    ``evaluate(keep, seed)`` retrains on the rows where the boolean ``keep`` ``(n,)`` is True and returns the test
    accuracy of the deployed model.

    Example:
        >>> cleansing = Cleansing(evaluate, n=2000, seeds=range(30_000, 30_005))
        >>> cleansing.gain(most_harmful(scores, 0.01))["gain_vs_random"]      # accuracy points / 100
    """

    def __init__(
        self,
        evaluate: Callable[[np.ndarray, int], float],
        n: int,
        seeds: Sequence[int],
        *,
        fraction: float = 0.01,
        random_seed: int = 0,
    ) -> None:
        if not seeds:
            raise ValueError("Cleansing needs at least one retrain seed.")
        self.evaluate, self.n, self.seeds, self.fraction = evaluate, int(n), list(seeds), fraction
        rng = np.random.default_rng(random_seed)
        count = max(1, round(fraction * self.n))
        self.random_removals = [rng.permutation(self.n)[:count] for _ in self.seeds]
        self._baseline: dict[str, list[float]] | None = None

    def _accuracy(self, removed: np.ndarray, seed: int) -> float:
        keep = np.ones(self.n, dtype=bool)
        keep[np.asarray(removed, dtype=np.int64)] = False
        return float(self.evaluate(keep, seed))

    def baseline(self) -> dict[str, list[float]]:
        """Test accuracy per seed with nothing removed and with random removal (computed once)."""
        if self._baseline is None:
            self._baseline = {
                "none": [self._accuracy(np.empty(0, dtype=np.int64), s) for s in self.seeds],
                "random": [self._accuracy(r, s) for r, s in zip(self.random_removals, self.seeds)],
            }
        return self._baseline

    def gain(self, removed: Sequence[int]) -> dict[str, float | list[float]]:
        """Mean accuracy gains of removing ``removed`` (row positions) over random removal and over no removal."""
        base = self.baseline()
        cleansed = [self._accuracy(np.asarray(removed), s) for s in self.seeds]
        return {
            "gain_vs_random": float(np.mean(np.subtract(cleansed, base["random"]))),
            "gain_vs_none": float(np.mean(np.subtract(cleansed, base["none"]))),
            "accuracy_cleansed": cleansed,
            "accuracy_random": list(base["random"]),
            "accuracy_none": list(base["none"]),
        }


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
