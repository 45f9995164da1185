"""What every fidelity setting shares: settings, seeds, rows, the retraining ground truths, the model pool, and the
:class:`Setting` protocol with its registry (``--setting`` choices come from it).

A setting (``head.py``, ``adapter.py``) says how its data are loaded, how a model of one variant is trained and
scored, and how the peers see it; the rows and the way they are judged are written once, in ``rows.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from turnover_hf.evaluation import (
    Cleansing,
    lds,
    loo_correlation,
    loo_effects,
    mislabel_detection,
    most_harmful,
    random_subsets,
    seed_agreement,
    spearman_columns,
    subset_losses,
)

# Seeds: scored models use seeds below 10,000; every ground truth draws from its own range above.
GROUND_TRUTH_SEED = 10_000
REPLICATE_SEED = 20_000
LOO_SEED = 30_000
CLEANSING_SEED = 40_000


# -- settings shared by every setting ----------------------------------------------------------------------------
@dataclass
class CommonSettings:
    """What every setting shares: data sizes, ground truths, peers (a setting's dataclass adds its recipe)."""

    n_train: int = 2000
    n_targets: int = 200
    n_test: int | None = None
    n_subsets: int = 50
    noise: float = 0.10
    data_seed: int = 0
    tracin_checkpoints: int = 4
    damping_factors: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
    damping_factor: float = 0.1
    n_loo: int = 40
    loo_seeds: int = 3
    cleansing_seeds: int = 5
    cleansing_fraction: float = 0.01
    low_is_suspicious: bool = False
    peers: tuple[str, ...] = ("captum", "kronfluence")  # optional peers to run when installed
    influence_projections: tuple[int, ...] = (1024, 4096)  # CountSketch sizes of the library influence rows
    # the library's projected influence rows: ProjectedInfluenceScorer options, plus "damping_rule": "absolute" for
    # the rejected rule (lambda = factor x trace / D, the exact fit's)
    projected_variants: tuple[dict[str, Any], ...] = (
        {"projection_dim": 4096}, {"projection_dim": 1024}, {"projection_dim": 4096, "basis_examples": 256},
        {"projection_dim": 4096, "design": "sketch"}, {"projection_dim": 4096, "design": "kronecker"},
        {"projection_dim": 4096, "normalise": "relative"},
    )


# What ``--quick`` shrinks in every setting (each setting's QUICK adds its own smaller variants).
QUICK_SIZES: dict[str, Any] = {
    "n_train": 200, "n_targets": 20, "n_test": 200, "n_subsets": 10, "ensembles": (4,), "n_loo": 10, "loo_seeds": 2,
    "cleansing_seeds": 2,
    "projected_variants": ({"projection_dim": 1024}, {"projection_dim": 1024, "design": "sketch"}),
}


def checkpoint_epochs(epochs: int, checkpoints: int) -> list[int]:
    """Epochs after which the TracIn checkpoints are kept: ``checkpoints`` evenly spread over training."""
    return sorted({max(1, round(epochs * (i + 1) / checkpoints)) for i in range(checkpoints)})


# -- rows and how they are judged ---------------------------------------------------------------------------------
@dataclass
class Row:
    """One method's line of the results table (None = not applicable)."""

    method: str
    lds: float | None = None
    lds_2seed: float | None = None
    loo_corr: float | None = None
    agreement: float | None = None
    agreement_overall: float | None = None
    mislabel_auc: float | None = None
    recall_at_10: float | None = None
    cleansing_gain: float | None = None
    accuracy: float | None = None
    accuracy_cost: float | None = None
    train_seconds: float | None = None
    setup_seconds: float = 0.0
    self_seconds: float | None = None
    target_seconds: float | None = None
    end_to_end_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def finish(self) -> Row:
        """Fill in the end-to-end time: training, the setup once, and both scorings."""
        if self.self_seconds is not None and self.target_seconds is not None:
            self.end_to_end_seconds = (
                (self.train_seconds or 0.0) + self.self_seconds + self.target_seconds - self.setup_seconds
            )
        return self


def paired_sem(plain: Sequence[float], masked: Sequence[float]) -> float | None:
    """Standard error (points) of the mean per-seed accuracy difference plain - masked; None for one seed."""
    diffs = 100.0 * (np.asarray(plain) - np.asarray(masked))
    return float(diffs.std(ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else None


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and its wall-clock seconds."""
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def top_k_repetition(scores: torch.Tensor, k: int) -> float:
    """Mean over pairs of targets of the fraction of their top-``k`` proponents (highest scores) they share."""
    scores = torch.as_tensor(scores)
    if scores.dim() != 2 or scores.shape[1] < 2:
        return float("nan")
    top = scores.topk(min(k, scores.shape[0]), dim=0).indices  # (k, T)
    hits = torch.zeros(scores.shape[1], scores.shape[0])
    hits[torch.arange(scores.shape[1])[:, None], top.T] = 1.0
    shared = hits @ hits.T / top.shape[0]  # (T, T)
    t = shared.shape[0]
    return float((shared.sum() - shared.diagonal().sum()) / (t * (t - 1)))


@dataclass
class Judge:
    """The retraining ground truths every row is judged against, computed once per run."""

    subsets: np.ndarray  # (S, N) half-size subsets
    gt: np.ndarray  # (S, T) target losses of models retrained on them
    gt_mean: np.ndarray  # (S, T) mean of two retrainings per subset
    loo_rows: np.ndarray  # (n,) row positions left out one at a time
    loo_actual: np.ndarray  # (seeds, n, T) actual loss changes
    cleansing: Cleansing | None
    cleansing_fraction: float
    flipped: np.ndarray
    low_is_suspicious: bool
    seconds: dict[str, float] = field(default_factory=dict)
    suspicions: dict[str, np.ndarray] = field(default_factory=dict)  # each judged row's mislabel suspicion (high = flagged)

    def fidelity(self, row: Row, score_a: torch.Tensor, score_b: torch.Tensor) -> Row:
        """LDS, LOO correlation and cleansing gain of run A's scores; agreement of runs A and B."""
        row.lds = lds(score_a, self.subsets, self.gt)
        row.lds_2seed = lds(score_a, self.subsets, self.gt_mean)
        loo = loo_correlation(np.asarray(score_a)[self.loo_rows], self.loo_actual.mean(0))
        row.loo_corr = loo["pearson"]
        row.extra["loo"] = loo
        row.extra["top10_repetition"] = top_k_repetition(score_a, 10)
        agreement = seed_agreement(score_a, score_b)
        row.agreement, row.agreement_overall = agreement["per_target"], agreement["overall"]
        if self.cleansing is not None:
            gain = self.cleansing.gain(most_harmful(score_a, self.cleansing_fraction))
            row.cleansing_gain = 100.0 * gain["gain_vs_random"]
            row.extra["cleansing"] = gain
        return row

    def mislabels(self, row: Row, suspicion: torch.Tensor, low_is_suspicious: bool | None = None) -> Row:
        low = self.low_is_suspicious if low_is_suspicious is None else low_is_suspicious
        found = mislabel_detection(suspicion, self.flipped, low_is_suspicious=low)
        values = np.asarray(suspicion, dtype=np.float64).ravel()
        self.suspicions[row.method] = -values if low else values
        row.mislabel_auc, row.recall_at_10 = found["auc"], found["recall@10%"]
        row.extra["mislabel"] = found
        return row

    def summary(self) -> dict[str, Any]:
        """What the ground truths are, and how reliable (split-half / seed-to-seed agreement)."""
        out: dict[str, Any] = {
            "subsets": len(self.subsets),
            "subset_size": int(self.subsets[0].sum()),
            "split_half_reliability": float(np.nanmean(spearman_columns(self.gt, 2 * self.gt_mean - self.gt))),
            "loo_examples": len(self.loo_rows),
            "loo_seeds": len(self.loo_actual),
            "seconds": self.seconds,
        }
        if len(self.loo_actual) > 1:
            out["loo_seed_to_seed_pearson"] = loo_correlation(self.loo_actual[0], self.loo_actual[1])["pearson"]
        if self.cleansing is not None:
            base = self.cleansing.baseline()
            out["cleansing"] = {
                "seeds": len(self.cleansing.seeds),
                "removed": max(1, round(self.cleansing_fraction * self.cleansing.n)),
                "accuracy_none": base["none"],
                "accuracy_random": base["random"],
            }
        return out


def ground_truth(setting: Setting, log: Callable[[str], None]) -> Judge:
    """Retrain for every ground truth: subsets (twice), leave-one-out on a sample, cleansing baselines.

    Every retraining uses the setting's base variant and recipe with seeds no scored model uses; cleansing retrains
    with ordinary dropout (Kobayashi et al. 2020 retrain without turn-over dropout after cleansing).
    """
    settings, base, n_train = setting.settings, setting.base, setting.n_train
    subsets = random_subsets(n_train, settings.n_subsets, seed=settings.data_seed + 7)

    def subset_fn(rows: np.ndarray, seed: int) -> np.ndarray:
        return setting.target_losses(setting.train(base, seed, Training(rows=rows)))

    def loo_fn(row: int | None, seed: int) -> np.ndarray:
        return setting.target_losses(setting.train(base, seed, Training(exclude=None if row is None else [row])))

    def cleansing_fn(keep: np.ndarray, seed: int) -> float:
        # exclude: the batch order is drawn for all N rows, so the kept examples meet the same batches in every
        # condition and the comparison is paired (as for leave-one-out)
        return setting.accuracy(base, setting.train(base, seed, Training(plain=True, exclude=np.flatnonzero(~keep))))

    seconds: dict[str, float] = {}
    log(f"ground truth: {len(subsets)} subsets x 2 retrainings ...")
    gt, seconds["subsets_per_set"] = timed(
        lambda: subset_losses(subset_fn, subsets, seeds=range(GROUND_TRUTH_SEED, GROUND_TRUTH_SEED + len(subsets)))
    )
    gt_rep = subset_losses(subset_fn, subsets, seeds=range(REPLICATE_SEED, REPLICATE_SEED + len(subsets)))
    rng = np.random.default_rng(settings.data_seed + 11)
    loo_rows = np.sort(rng.permutation(n_train)[: settings.n_loo])
    log(f"leave-one-out: {len(loo_rows)} examples x {settings.loo_seeds} seeds ...")
    loo_actual, seconds["leave_one_out"] = timed(
        lambda: loo_effects(loo_fn, loo_rows, seeds=range(LOO_SEED, LOO_SEED + settings.loo_seeds))
    )
    cleansing = None
    if settings.cleansing_seeds > 0:
        cleansing = Cleansing(
            cleansing_fn,
            n_train,
            seeds=list(range(CLEANSING_SEED, CLEANSING_SEED + settings.cleansing_seeds)),
            fraction=settings.cleansing_fraction,
            random_seed=settings.data_seed + 13,
        )
        _, seconds["cleansing_baselines"] = timed(cleansing.baseline)
    judge = Judge(
        subsets, gt, (gt + gt_rep) / 2, loo_rows, loo_actual, cleansing, settings.cleansing_fraction, setting.flipped,
        settings.low_is_suspicious, seconds,
    )
    summary = judge.summary()
    log(
        f"  split-half reliability {summary['split_half_reliability']:.3f}, LOO seed-to-seed "
        f"{summary.get('loo_seed_to_seed_pearson', float('nan')):.3f}"
    )
    return judge


# -- the setting protocol -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Training:
    """How :meth:`Setting.train` trains a model, beside its variant and seed."""

    noisy: bool = False  # on the flipped labels
    plain: bool = False  # ordinary dropout at the same p on the same units, instead of turn-over masks
    rows: np.ndarray | None = None  # on these training rows only (a ground-truth subset)
    exclude: Sequence[int] | None = None  # without these row positions; the batch order is still drawn for all rows
    checkpoint_epochs: Sequence[int] = ()  # keep snapshots after these epochs (TracIn-style peers)


Variant = Hashable  # what a setting varies between rows (head: a HeadRecipe; adapters: (reduction, channels))
Model = Any  # a trained model of a setting (TrainedHead, TrainedTop, ...)
Part = Any  # a split of a setting's data (the targets, one target, ...)


class Setting:
    """What differs between fidelity settings; the runner (``rows.py``) calls only these.

    A subclass is registered with :func:`register_setting` and gives: its settings dataclass and quick preset,
    how to load its data (:meth:`load`), the base variant and the variants of rows (c) and (f), how to train a model
    of a variant (:meth:`train`), score it (:meth:`scores`, :meth:`self_scores`), measure it (:meth:`accuracy`,
    :meth:`target_losses`, :meth:`training_losses`), check its scores against the library (:meth:`check`), and
    what the peers of row (g) see (:meth:`peer_hooks`). Optional capabilities (mask bits for row (d), references
    for row (e)) are used when :attr:`row_groups` names their rows.
    """

    name: ClassVar[str]
    title: ClassVar[str]  # the Markdown title of the results file
    settings_class: ClassVar[type[CommonSettings]]
    quick: ClassVar[CommonSettings]
    data_label: ClassVar[str] = "data"  # what the log says is ready after :meth:`load`
    row_groups: ClassVar[tuple[str, ...]] = ("b", "c", "f", "g", "loss")  # rows.py's ROW_GROUPS, run after row (a)
    gap_key: ClassVar[str]  # the ``extra`` key of a turn-over row's largest gap to the library's scores
    grad_dot_label: str = "(g) gradient dot product (final model)"
    references: tuple[tuple[str, str], ...] = ()  # row (e): (reference, label) scored instead of "mask"

    settings: CommonSettings
    recipe: Any  # the base training recipe (recorded in the results)
    base: Variant
    flipped: np.ndarray
    targets: Part
    one_target: Part
    train_ids: torch.Tensor

    @classmethod
    def load(cls, settings: CommonSettings, full_cache: bool) -> Setting:
        """The setting on its real data (``full_cache``: build the on-disk cache of the whole corpus)."""
        raise NotImplementedError

    @staticmethod
    def describe(results: dict[str, Any]) -> str:
        """The sentence before the table: the model and recipe of this setting (``common``: the shared sizes)."""
        raise NotImplementedError

    @property
    def n_train(self) -> int:
        return len(self.train_ids)

    def label(self, variant: Variant) -> str:
        """How row labels name the model of a variant (``"W=128"``, ``"adapter 48 units"``)."""
        raise NotImplementedError

    def wider(self) -> list[tuple[Variant, str]]:
        """Row (c): wider masked variants and their row labels."""
        return []

    def channel_rows(self) -> list[tuple[Variant, str, str]]:
        """Row (f): (variant with K mask channels, row label, how to score it)."""
        return []

    def train(self, variant: Variant, seed: int, how: Training) -> Model:
        """A model of ``variant`` trained with init / order / mask seed ``seed``, as ``how`` says."""
        raise NotImplementedError

    def scores(self, variant: Variant, model: Model, part: Part, how: str = "mask") -> torch.Tensor:
        """Turn-over influence ``(N, T)`` of every training example on the targets of ``part``."""
        raise NotImplementedError

    def self_scores(self, variant: Variant, model: Model, how: str = "mask") -> torch.Tensor:
        """Self-influence ``(N,)`` of every training example on the flipped labels (``model`` trained on them)."""
        raise NotImplementedError

    def check(self, variant: Variant, model: Model) -> float:
        """Largest gap between :meth:`scores` and the library's own scoring of the same model."""
        raise NotImplementedError

    def accuracy(self, variant: Variant, model: Model) -> float:
        """Test accuracy of the full network."""
        raise NotImplementedError

    def target_losses(self, model: Model) -> np.ndarray:
        """``(T,)`` full-network losses of the targets (a base-variant model): the ground truths' measurement."""
        raise NotImplementedError

    def training_losses(self, model: Model) -> torch.Tensor:
        """``(N,)`` losses of the training examples on their flipped labels (the training-loss row)."""
        raise NotImplementedError

    def mask_bits(self, model: Model) -> np.ndarray:
        """``(N, units)`` keep bits of every training example's masks (row (d))."""
        raise NotImplementedError

    def single_model_extra(self, model: Model) -> dict[str, Any]:
        """Diagnostics recorded on row (a) beside the shared ones."""
        return {}

    def ensemble_extra(self, models: Sequence[Model]) -> dict[str, Any]:
        """Diagnostics recorded on an ensemble row (b)."""
        return {}

    def peer_hooks(self, model_a: Model) -> dict[str, Any]:
        """The setting-specific fields of :class:`~fidelity_runner.peers.PeerSetup` (how the peers see a model)."""
        raise NotImplementedError

    def results_extra(self) -> dict[str, Any]:
        """Entries of the results JSON beside the shared ones (e.g. the model's description)."""
        return {}


SETTINGS: dict[str, type[Setting]] = {}


def register_setting(cls: type[Setting]) -> type[Setting]:
    """Class decorator: make a setting available as ``--setting <cls.name>``."""
    SETTINGS[cls.name] = cls
    return cls


class Pool:
    """Trains models on demand and keeps them: one per (variant, plain or masked, label set, seed)."""

    def __init__(self, setting: Setting) -> None:
        self.setting = setting
        self._models: dict[tuple[Variant, bool, bool, int], Model] = {}

    def get(
        self,
        variant: Variant,
        seed: int,
        *,
        noisy: bool = False,
        plain: bool = False,
        checkpoint_epochs: Sequence[int] = (),
    ) -> Model:
        key = (variant, plain, noisy, seed)
        if key not in self._models:
            how = Training(noisy=noisy, plain=plain, checkpoint_epochs=checkpoint_epochs)
            self._models[key] = self.setting.train(variant, seed, how)
        return self._models[key]

    def many(self, variant: Variant, seeds: Sequence[int], *, noisy: bool = False) -> list[Model]:
        return [self.get(variant, s, noisy=noisy) for s in seeds]

    def plain_accuracies(self, variant: Variant, seeds: Sequence[int]) -> list[float]:
        """Test accuracies of the ordinary-dropout twins (same recipe, p, units and seeds)."""
        return [self.setting.accuracy(variant, self.get(variant, s, plain=True)) for s in seeds]

    def accuracy_cost(self, variant: Variant, seeds: Sequence[int], masked_accuracy: float) -> float:
        """Points of test accuracy the masks cost: the same recipe and seeds with ordinary dropout, minus masked."""
        return 100.0 * (float(np.mean(self.plain_accuracies(variant, seeds))) - masked_accuracy)
