"""Fidelity of turn-over influence against retraining ground truth and peers, in two settings on real offline data.

``--setting head`` (default): all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised; computed once and
cached in ``benchmarks/results/cache``) of Rotten Tomatoes snippets (``turnover_hf.assets.rotten_tomatoes``); a
head ``Linear(384, W) -> ReLU -> Linear(W, 2)`` trained for 10 epochs with Adam (lr 1e-3, batch 64), each training
example under its own turn-over mask on the ``W`` hidden units. Masks are the library's
(``turnover_hf.masks.mask_for`` keyed by example id and the layer key ``"head.hidden"``); the run checks that the
patched head (``turnover_hf.patch_model``) gives the same scores as the closed form used here.

``--setting adapters``: all-MiniLM-L6-v2 as ``BertForSequenceClassification`` with a bottleneck adapter (the
``adapters`` library's ``SeqBnConfig``, as ``turnover_hf.demo`` sets it up, 384 -> 48 -> 384) in its top layer,
patched with ``turnover_hf.patch_model`` (masks on the adapter's 48 hidden units, its 384 outputs and the
classifier's inputs; leaking parameters frozen). Everything below the adapter is frozen and mask-free, so its
output is computed once and cached (``turnover_hf.evaluation.cached``); the adapter, the layer's LayerNorm, the
pooler and the classifier then run with the model's own modules, exactly (checked against
``turnover_hf.TurnoverScorer`` on the full model), and retraining a model takes about a second.

Measured for every method, in one table:

* LDS: Spearman, per validation target, between the loss predicted for a model trained on a random half of the
  training set (``const - sum of the included examples' scores``) and the loss of a model actually retrained on
  that half (the same recipe, with weights / order / mask seeds no scored model used), averaged over targets.
* LOO correlation: Pearson correlation, over (left-out example, target) pairs, between the scores and the actual
  loss change when one example of a random sample is left out, averaged over several retrain seeds no scored
  model used (each seed's reference model and its leave-one-out models share the seed).
* seed agreement: per-target Spearman between the scores of two independent runs of the method (other init
  and mask seeds), averaged over targets.
* mislabel AUC and recall@10 %: 10 % of the training labels flipped, methods rerun on that data, examples ranked
  by self-influence (high = suspicious, see ``--low-is-suspicious``) or training loss.
* cleansing gain: remove the 1 % of training examples with the most negative mean influence on the validation
  targets, retrain with ordinary dropout (Kobayashi et al. 2020, Table 2), and subtract the test accuracy of
  removing as many random examples; points, mean over retrain seeds (the same seeds for both).
* accuracy cost of masks: test accuracy of the same recipe trained with ordinary dropout at the same p on the
  same units and seeds, minus that of the turn-over model(s) a row scores (points; positive = masks cost).
* seconds: training all the models a method needs; self-influence of all N training examples and one target
  against all N, each from trained models (including any setup such as fitting factors or loading
  checkpoints); end to end = training + setup + both scorings.

Methods: (a) single-model turn-over; (b) seed ensembles of K models; (c) wider masked layers; (d) residuals of a
per-target least-squares fit of the scores on the examples' centred mask bits; (e) the full network as the
reference instead of the example's own mask; (f) K parallel masked channels in one model; (g) peers on the same
model: gradient dot product, TracIn over checkpoints (in-house and Captum's ``TracInCP`` / ``TracInCPFast`` over
Trainer-style checkpoints), an exact damped Gauss-Newton influence function (in-house, and the library's
``turnover_hf.InfluenceFunctionScorer`` on the patched model, exact and with CountSketch projections), Kronfluence's
EK-FAC, and the training loss for mislabels. The adapter setting runs (a), (b), (c), (f) (the library's
``TurnoverConfig(channels=K)`` on the classifier) and (g). Captum and Kronfluence rows appear
when the packages are installed (``pip install turnover-hf[bench]``).

Run from the repository root:

    PYTHONPATH=. python benchmarks/fidelity.py                     # head setting, default size (~6 CPU minutes)
    PYTHONPATH=. python benchmarks/fidelity.py --setting adapters  # adapter setting, default size (~25 CPU minutes)
    PYTHONPATH=. python benchmarks/fidelity.py --quick [--setting adapters]   # smoke runs (about a minute)
    PYTHONPATH=. python benchmarks/fidelity.py --render benchmarks/results/fidelity.json   # rewrite the Markdown

The first run of a setting embeds / caches the corpus (a few minutes on 2 cores); quick runs compute only their
own rows when there is no cache. Everything runs on one torch thread, so on a shared machine the wall-clock time
grows with the load; each results file records both. Results:
``benchmarks/results/fidelity{,_adapters}{,_quick}.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

Variant = int | tuple[int, int]  # adapter setting: a reduction factor, or (reduction factor, classifier channels)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import turnover_hf as th
from turnover_hf.evaluation import (
    Cleansing,
    HeadRecipe,
    TrainedHead,
    TurnoverHead,
    explained_variance,
    lds,
    linear_residuals,
    loo_correlation,
    loo_effects,
    mislabel_detection,
    most_harmful,
    patched_classifier,
    random_subsets,
    seed_agreement,
    spearman_columns,
    subset_losses,
    train_head,
)
from turnover_hf.evaluation.cached import (
    TopInputs,
    TopModel,
    TopRecipe,
    TrainedTop,
    cache_top_inputs,
    top_accuracy,
    top_losses,
    top_self_scores,
    top_turnover_scores,
    train_top,
)
from turnover_hf.evaluation.peers import (
    KronfluenceEKFAC,
    MarginFactors,
    captum_tracin,
    captum_version,
    gauss_newton_influence,
    gradient_dot,
    kronfluence_version,
    margin_factors,
    save_trainer_checkpoint,
)
from turnover_hf.files import atomic_path, atomic_write_text
from turnover_hf.masks import scale_of

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CACHE_DIR = RESULTS_DIR / "cache"
FEATURES_FILE = "minilm_mean_pooled.safetensors"
# Seeds: scored models use seeds below 10,000; every ground truth draws from its own range above.
GROUND_TRUTH_SEED = 10_000
REPLICATE_SEED = 20_000
LOO_SEED = 30_000
CLEANSING_SEED = 40_000

# -- frozen features ------------------------------------------------------------------------------------------------
def _texts_fingerprint(example_ids: Sequence[int], texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for example_id, text in zip(example_ids, texts):
        digest.update(f"{example_id}\t{text}\n".encode())
    return digest.hexdigest()


@torch.no_grad()
def embed_texts(texts: Sequence[str], batch_size: int = 64, max_length: int = 128) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings (its own recipe: mean pooling over tokens, then L2 normalisation)."""
    from transformers import AutoModel, AutoTokenizer

    path = th.assets.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    out = torch.empty(len(texts), model.config.hidden_size)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths batch with little padding
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        hidden = model(**batch).last_hidden_state
        weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        out[rows] = F.normalize(pooled, dim=-1)
    return out


def corpus_features(needed: set[int] | None = None, cache_dir: Path = CACHE_DIR) -> dict[int, torch.Tensor]:
    """Embeddings of Rotten Tomatoes reviews by example id, from the cache when it matches the corpus.

    Without a valid cache, ``needed=None`` embeds the whole corpus and writes the cache (about 3 minutes on
    2 cores); a set of ids embeds only those and leaves the cache alone (the quick run).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    data = th.assets.rotten_tomatoes()
    pairs = sorted((int(i), t) for split in data.values() for i, t in zip(split["example_id"], split["text"]))
    fingerprint = _texts_fingerprint([i for i, _ in pairs], [t for _, t in pairs])
    path = cache_dir / FEATURES_FILE
    if path.exists():
        with safe_open(str(path), framework="pt") as handle:
            valid = (handle.metadata() or {}).get("texts_sha256") == fingerprint
        if valid:
            cached = load_file(str(path))
            return dict(zip(cached["example_id"].tolist(), cached["features"]))
    if needed is not None:
        chosen = [(i, t) for i, t in pairs if i in needed]
        return dict(zip([i for i, _ in chosen], embed_texts([t for _, t in chosen])))
    features = embed_texts([t for _, t in pairs])
    tensors = {"example_id": torch.tensor([i for i, _ in pairs], dtype=torch.int64), "features": features.contiguous()}
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(
            tensors,
            tmp,
            metadata={"texts_sha256": fingerprint, "model": "all-MiniLM-L6-v2", "pooling": "mean", "normalized": "l2"},
        )
    return dict(zip(tensors["example_id"].tolist(), features))


# -- data -----------------------------------------------------------------------------------------------------------
@dataclass
class Split:
    """Features, labels and example ids of one split, row-aligned."""

    features: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FidelityData:
    """Training set (clean and with flipped labels), validation targets and a test split for accuracy."""

    train: Split
    noisy_labels: torch.Tensor
    flipped: np.ndarray
    targets: Split
    test: Split


def with_flipped_labels(
    labels: torch.Tensor, fraction: float, seed: int, num_labels: int = 2
) -> tuple[torch.Tensor, np.ndarray]:
    """``labels`` with a random ``fraction`` of rows moved to another class, and the boolean mask of those rows."""
    rng = np.random.default_rng(seed)
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[rng.permutation(len(labels))[: round(fraction * len(labels))]] = True
    shift = torch.as_tensor(rng.integers(1, num_labels, size=len(labels)))
    noisy = torch.where(torch.as_tensor(flipped), (labels + shift) % num_labels, labels)
    return noisy, flipped


def load_data(
    n_train: int, n_targets: int, n_test: int | None, noise: float, seed: int, full_cache: bool
) -> FidelityData:
    """Rotten Tomatoes features: ``n_train`` training rows, ``n_targets`` validation targets, test rows."""
    data = th.assets.rotten_tomatoes(seed=seed, n_train=n_train, n_validation=n_targets, n_test=n_test)
    needed = None if full_cache else {int(i) for split in data.values() for i in split["example_id"]}
    by_id = corpus_features(needed)

    def split(name: str) -> Split:
        ids = [int(i) for i in data[name]["example_id"]]
        return Split(torch.stack([by_id[i] for i in ids]), torch.tensor(data[name]["label"]), torch.tensor(ids))

    train = split("train")
    noisy, flipped = with_flipped_labels(train.labels, noise, seed + 1)
    return FidelityData(train, noisy, flipped, split("validation"), split("test"))


# -- turn-over scores on the head (closed form, exact) --------------------------------------------------------------
def _mask_readout(head: TurnoverHead, features: torch.Tensor) -> torch.Tensor:
    """``(K * W, T * C)``: logits of target ``t`` under mask ``m`` are ``m.flatten() @ this[:, t] + out.bias``."""
    acts = head.activations(features)  # (T, K, W)
    channels = acts.shape[1]
    weight = head.out.weight.T  # (W, C)
    per_unit = acts.unsqueeze(-1) * weight / channels  # (T, K, W, C)
    return per_unit.permute(1, 2, 0, 3).reshape(-1, features.shape[0] * weight.shape[1])


def _cross_entropy_grid(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits ``(N, T, C)`` against target labels ``(T,)``, shape ``(N, T)``."""
    picked = logits.gather(-1, labels.view(1, -1, 1).expand(len(logits), -1, 1)).squeeze(-1)
    return torch.logsumexp(logits, dim=-1) - picked


class MaskGrid:
    """Losses of fixed targets under many masks of one head: logits are linear in the mask, so one GEMM each."""

    def __init__(self, head: TurnoverHead, targets: Split) -> None:
        self.head, self.labels = head, targets.labels
        self.readout = _mask_readout(head, targets.features)

    def logits(self, masks: torch.Tensor) -> torch.Tensor:
        """Flat logits ``(N, T * C)`` without the output bias, for masks ``(N, K, W)``."""
        return masks.flatten(1) @ self.readout

    def losses(self, flat_logits: torch.Tensor) -> torch.Tensor:
        """``(N, T)`` losses from :meth:`logits` (possibly shifted by other mask terms)."""
        return _cross_entropy_grid(
            flat_logits.view(len(flat_logits), len(self.labels), -1) + self.head.out.bias, self.labels
        )


@torch.no_grad()
def turnover_scores(trained: TrainedHead, ids: torch.Tensor, targets: Split, reference: str = "mask") -> torch.Tensor:
    """Turn-over influence ``(N, T)`` of training ids on targets; positive = the example lowers the target loss.

    ``reference`` picks what the flipped sub-network is compared with: ``"mask"`` (the paper,
    ``L(flip) - L(mask)``), ``"full"`` (``L(flip) - L(full)``, paper footnote 4) or ``"mirror"``
    (``L(full) - L(mask)``).
    """
    if reference not in ("mask", "full", "mirror"):
        raise ValueError(f"unknown reference {reference!r}.")
    grid, masks = MaskGrid(trained.head, targets), trained.masks(ids)
    full = trained.head.losses(targets.features, targets.labels).unsqueeze(0)
    flip_loss = grid.losses(grid.logits(scale_of(trained.recipe.p) - masks)) if reference != "mirror" else full
    mask_loss = grid.losses(grid.logits(masks)) if reference != "full" else full
    return flip_loss - mask_loss


@torch.no_grad()
def channel_flip_scores(trained: TrainedHead, ids: torch.Tensor, targets: Split) -> torch.Tensor:
    """Mean over channels of ``L(channel k flipped, others kept) - L(own masks)``: one mask sample per channel."""
    grid, masks = MaskGrid(trained.head, targets), trained.masks(ids)
    channels, width = masks.shape[1:]
    per_channel = grid.readout.view(channels, width, -1)
    base = grid.logits(masks)
    base_losses = grid.losses(base)
    delta = scale_of(trained.recipe.p) - 2 * masks  # flipped minus kept, per channel
    total = torch.zeros_like(base_losses)
    for k in range(channels):
        total += grid.losses(base + delta[:, k] @ per_channel[k]) - base_losses
    return total / channels


@torch.no_grad()
def self_turnover(trained: TrainedHead, train: Split, labels: torch.Tensor, reference: str = "mask") -> torch.Tensor:
    """Self-influence of every training example (row r scored on itself under its own masks), ``(N,)``."""
    head, masks = trained.head, trained.masks(train.ids)
    acts = head.activations(train.features)

    def loss(row_masks: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(head.readout(acts, row_masks), labels, reduction="none")

    flipped = scale_of(trained.recipe.p) - masks
    if reference == "mask":
        return loss(flipped) - loss(masks)
    if reference == "full":
        return loss(flipped) - loss(None)
    if reference == "mirror":
        return loss(None) - loss(masks)
    raise ValueError(f"unknown reference {reference!r}.")


@torch.no_grad()
def self_channel_flips(trained: TrainedHead, train: Split, labels: torch.Tensor) -> torch.Tensor:
    """Self-influence with one channel flipped at a time, averaged over channels, ``(N,)``."""
    head, masks = trained.head, trained.masks(train.ids)
    acts = head.activations(train.features)
    base = F.cross_entropy(head.readout(acts, masks), labels, reduction="none")
    total = torch.zeros_like(base)
    for k in range(masks.shape[1]):
        one = masks.clone()
        one[:, k] = scale_of(trained.recipe.p) - one[:, k]
        total += F.cross_entropy(head.readout(acts, one), labels, reduction="none") - base
    return total / masks.shape[1]


def check_closed_form(trained: TrainedHead, train: Split, targets: Split, n_ids: int = 4, n_targets: int = 3) -> float:
    """Largest gap between :func:`turnover_scores` and the batched definition on the patched head.

    The reference patches a copy of the head with ``turnover_hf.patch_model`` and runs one forward per
    (id, target, mask-or-flip) row inside ``turnover_hf.instance_masks``: the library's own masks.
    """
    ids, part = (
        train.ids[:n_ids],
        Split(targets.features[:n_targets], targets.labels[:n_targets], targets.ids[:n_targets]),
    )
    fast = turnover_scores(trained, ids, part)
    model = patched_classifier(trained.head, trained.mask_seed).eval()
    rows = torch.arange(n_ids * n_targets * 2)
    row_target, row_id, row_flip = rows // (2 * n_ids), (rows // 2) % n_ids, (rows % 2).bool()
    with torch.no_grad(), th.instance_masks(model, ids[row_id], flipped=row_flip):
        losses = F.cross_entropy(model(part.features[row_target]), part.labels[row_target], reduction="none")
    reference = (losses[1::2] - losses[0::2]).view(n_targets, n_ids).T
    return float((fast - reference).abs().max())


# -- peers on the same head: gradients through the N x N kernel -----------------------------------------------------


# -- peers on the same head: exact gradient methods (turnover_hf.evaluation.peers) ----------------------------------
def head_factors(head: TurnoverHead, features: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None) -> MarginFactors:
    """Margin-gradient factors of every row on all head parameters, under ``masks`` (None = the full network)."""
    layers = [*head.hidden_linears(), head.out]
    return margin_factors(
        lambda rows: head(features[rows], None if masks is None else masks[rows]), len(labels), layers, labels
    )


def head_rows(features: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> torch.utils.data.Dataset:
    """``(features, masks, label)`` rows: ``TurnoverHead(features, masks)`` gives the logits (Captum, Kronfluence)."""
    return torch.utils.data.TensorDataset(features, masks, labels.long())


def library_batches(
    inputs: dict[str, torch.Tensor], labels: torch.Tensor, ids: torch.Tensor, batch_size: int = 256
) -> list[dict[str, torch.Tensor]]:
    """Collated training batches (model inputs, labels, example_ids) for the library's estimators."""
    return [
        {**{k: v[s : s + batch_size] for k, v in inputs.items()}, "labels": labels[s : s + batch_size].long(),
         "example_ids": ids[s : s + batch_size]}
        for s in range(0, len(labels), batch_size)
    ]


def write_checkpoints(checkpoints: Sequence[Any], folder: str, steps_per_epoch: int) -> list[str]:
    """Trainer-style checkpoint folders (``checkpoint-{step}``) of in-memory snapshots, for Captum."""
    return [
        save_trainer_checkpoint(
            folder, c.state_dict, step=steps_per_epoch * c.epoch, epoch=c.epoch, learning_rate=c.lr
        )
        for c in checkpoints
    ]


def captum_available() -> bool:
    return captum_version() is not None


def kronfluence_available() -> bool:
    return kronfluence_version() is not None


# -- rows and how they are judged (shared by both settings) ---------------------------------------------------------
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

    def fidelity(self, row: Row, score_a: torch.Tensor, score_b: torch.Tensor) -> Row:
        """LDS, LOO correlation and cleansing gain of run A's scores; agreement of runs A and B."""
        row.lds = lds(score_a, self.subsets, self.gt)
        row.lds_2seed = lds(score_a, self.subsets, self.gt_mean)
        loo = loo_correlation(np.asarray(score_a)[self.loo_rows], self.loo_actual.mean(0))
        row.loo_corr = loo["pearson"]
        row.extra["loo"] = loo
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


def build_judge(
    n_train: int,
    subsets: np.ndarray,
    subset_losses_fn: Callable[[np.ndarray, int], np.ndarray],
    loo_fn: Callable[[int | None, int], np.ndarray],
    cleansing_fn: Callable[[np.ndarray, int], float] | None,
    settings: Any,
    flipped: np.ndarray,
    log: Callable[[str], None],
) -> Judge:
    """Retrain for every ground truth: subsets (twice), leave-one-out on a sample, cleansing baselines."""
    seconds: dict[str, float] = {}
    log(f"ground truth: {len(subsets)} subsets x 2 retrainings ...")
    gt, seconds["subsets_per_set"] = timed(
        lambda: subset_losses(subset_losses_fn, subsets, seeds=range(GROUND_TRUTH_SEED, GROUND_TRUTH_SEED + len(subsets)))
    )
    gt_rep = subset_losses(subset_losses_fn, subsets, seeds=range(REPLICATE_SEED, REPLICATE_SEED + len(subsets)))
    rng = np.random.default_rng(settings.data_seed + 11)
    loo_rows = np.sort(rng.permutation(n_train)[: settings.n_loo])
    log(f"leave-one-out: {len(loo_rows)} examples x {settings.loo_seeds} seeds ...")
    loo_actual, seconds["leave_one_out"] = timed(
        lambda: loo_effects(loo_fn, loo_rows, seeds=range(LOO_SEED, LOO_SEED + settings.loo_seeds))
    )
    cleansing = None
    if cleansing_fn is not None and settings.cleansing_seeds > 0:
        cleansing = Cleansing(
            cleansing_fn,
            n_train,
            seeds=list(range(CLEANSING_SEED, CLEANSING_SEED + settings.cleansing_seeds)),
            fraction=settings.cleansing_fraction,
            random_seed=settings.data_seed + 13,
        )
        _, seconds["cleansing_baselines"] = timed(cleansing.baseline)
    judge = Judge(
        subsets, gt, (gt + gt_rep) / 2, loo_rows, loo_actual, cleansing, settings.cleansing_fraction, flipped,
        settings.low_is_suspicious, seconds,
    )
    summary = judge.summary()
    log(
        f"  split-half reliability {summary['split_half_reliability']:.3f}, LOO seed-to-seed "
        f"{summary.get('loo_seed_to_seed_pearson', float('nan')):.3f}"
    )
    return judge


# -- peers shared by both settings ----------------------------------------------------------------------------------
@dataclass
class PeerSetup:
    """How a setting exposes its models to the peer rows: runs A and B (clean) and run A on flipped labels.

    ``train_factors(model, checkpoint, noisy, masked)``: margin-gradient factors of the training set (flipped labels
    if ``noisy``; under the examples' masks if ``masked``) at the final weights or a checkpoint's.
    ``target_factors(model, checkpoint, part)``: the same for targets, on the full network. ``module(model)``: a
    context giving the ``nn.Module`` that Captum and Kronfluence see (final weights, this model's mask seed);
    ``train_rows(model, noisy)`` / ``target_rows(part)``: their datasets of ``(*inputs, label)`` tuples.
    """

    judge: Judge
    template: Row  # accuracy, accuracy cost and training time of run A, shared by every peer row
    a: Any
    b: Any
    noisy: Any
    targets: Any
    one_target: Any
    train_factors: Callable[[Any, Any, bool, bool], MarginFactors]
    target_factors: Callable[[Any, Any, Any], MarginFactors]
    module: Callable[[Any], Any]
    train_rows: Callable[[Any, bool], torch.utils.data.Dataset]
    target_rows: Callable[[Any], torch.utils.data.Dataset]
    captum_layers: list[str]
    captum_layers_label: str
    final_layer: str
    kronfluence_tracked: list[str] | None
    steps_per_epoch: int
    library_model: Callable[[Any], Any]  # a context giving the patched nn.Module the library's estimators score
    library_batches: Callable[[Any, bool], list[dict[str, torch.Tensor]]]  # its training batches (with example_ids)
    library_targets: Callable[[Any], dict[str, torch.Tensor]]  # the model inputs and labels of a target split
    train_ids: torch.Tensor

    def row(self, method: str) -> Row:
        return replace(self.template, method=method, extra={})

    def scored(
        self,
        method: str,
        score: Callable[[Any, Any], torch.Tensor],
        self_score: Callable[[Any], torch.Tensor],
    ) -> Row:
        """A row from ``score(model, part)`` (``(N, T)``) and ``self_score(noisy model)`` (``(N,)``), timed."""
        row = self.judge.fidelity(self.row(method), score(self.a, self.targets), score(self.b, self.targets))
        suspicion, row.self_seconds = timed(self_score, self.noisy)
        _, row.target_seconds = timed(score, self.a, self.one_target)
        return self.judge.mislabels(row, suspicion)


def gradient_peer_rows(
    p: PeerSetup, grad_dot_label: str, damping_factor: float, damping_factors: Sequence[float]
) -> list[Row]:
    """Gradient dot product, TracIn over the in-memory checkpoints, exact Gauss-Newton influence (in-house)."""

    def dot(model: Any, part: Any, checkpoint: Any = None) -> torch.Tensor:
        return gradient_dot(p.train_factors(model, checkpoint, False, True), p.target_factors(model, checkpoint, part))

    def dot_self(model: Any, checkpoint: Any = None) -> torch.Tensor:
        # each example's masked training gradient against its own full-network loss gradient
        masked, full = p.train_factors(model, checkpoint, True, True), p.train_factors(model, checkpoint, True, False)
        return gradient_dot(masked, full, paired=True)

    def influence(model: Any, part: Any, factor: float = damping_factor) -> torch.Tensor:
        return gauss_newton_influence(p.train_factors(model, None, False, True), p.target_factors(model, None, part), factor)

    def influence_self(model: Any) -> torch.Tensor:
        masked, full = p.train_factors(model, None, True, True), p.train_factors(model, None, True, False)
        return gauss_newton_influence(masked, full, damping_factor, paired=True)

    epochs = ", ".join(str(c.epoch) for c in p.a.checkpoints)
    rows = [
        p.scored(grad_dot_label, dot, dot_self),
        p.scored(
            f"(g) TracInCP in-house, {len(p.a.checkpoints)} checkpoints (epochs {epochs})",
            lambda m, part: sum(c.lr * dot(m, part, c) for c in m.checkpoints),
            lambda m: sum(c.lr * dot_self(m, c) for c in m.checkpoints),
        ),
        p.scored(f"(g) Gauss-Newton influence, damping {damping_factor:g} x mean eigenvalue", influence, influence_self),
    ]
    sweep = sorted(set(damping_factors) | {damping_factor})
    rows[-1].extra["lds_by_damping_factor"] = {
        str(f): lds(influence(p.a, p.targets, f), p.judge.subsets, p.judge.gt) for f in sweep
    }
    return rows


def library_influence_rows(p: PeerSetup, damping_factor: float, projections: Sequence[int]) -> list[Row]:
    """``turnover_hf.InfluenceFunctionScorer`` on the patched model: exact, then with each CountSketch projection.

    A fit per model (clean runs A and B, and the flipped labels for self-influence) is the setup, counted in both
    timing columns and once end to end (as for Kronfluence). Each row records its largest difference from the
    in-house factorised Gauss-Newton influence (the same definition) and, when sketched, its per-target Pearson
    correlation with the exact library scores.
    """
    in_house = gauss_newton_influence(
        p.train_factors(p.a, None, False, True), p.target_factors(p.a, None, p.targets), damping_factor
    )
    rows, exact = [], None
    for dim in (None, *projections):
        fit_seconds: dict[int, float] = {}
        kept: dict[int, torch.Tensor] = {}

        def fitted(module: Any, model: Any, noisy: bool, dim: int | None = dim) -> th.InfluenceFunctionScorer:
            scorer = th.InfluenceFunctionScorer(module, p.library_batches(model, noisy), damping_factor=damping_factor,
                                                projection_dim=dim, show_progress=False)
            return scorer.fit()

        def score(model: Any, part: Any) -> torch.Tensor:
            with p.library_model(model) as module:
                scorer, fit_seconds[id(model)] = timed(fitted, module, model, False)
                target = p.library_targets(part)
                scores = scorer.scores({k: v for k, v in target.items() if k != "labels"}, target["labels"], p.train_ids)
            if part is p.targets:
                kept[id(model)] = scores
            return scores

        def self_score(model: Any) -> torch.Tensor:
            with p.library_model(model) as module:
                scorer = fitted(module, model, True)
                return torch.cat([scorer.self_scores(b, b["labels"], b["example_ids"]) for b in p.library_batches(model, True)])

        what = "exact" if dim is None else f"CountSketch d={dim}"
        row = p.scored(f"(g) Gauss-Newton influence, library InfluenceFunctionScorer ({what})", score, self_score)
        row.setup_seconds = fit_seconds[id(p.a)]
        scores_a = kept[id(p.a)]
        row.extra["fit_seconds"] = fit_seconds[id(p.a)]
        row.extra["max_abs_difference_vs_in_house"] = float((scores_a - in_house).abs().max())
        row.extra["max_abs_in_house"] = float(in_house.abs().max())
        if dim is None:
            exact = scores_a
        elif exact is not None:
            centred = [x - x.mean(0) for x in (scores_a.double(), exact.double())]
            pearson = (centred[0] * centred[1]).sum(0) / (centred[0].norm(dim=0) * centred[1].norm(dim=0))
            row.extra["pearson_vs_exact_library_per_target_mean"] = float(pearson.mean())
        rows.append(row)
    return rows


def captum_peer_rows(p: PeerSetup) -> list[Row]:
    """Captum's TracInCP (trainable layers) and TracInCPFast (last layer) over Trainer-style checkpoint folders."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths, write_seconds = {}, 0.0
        for name, model in (("a", p.a), ("b", p.b), ("noisy", p.noisy)):
            paths[id(model)], seconds = timed(
                write_checkpoints, model.checkpoints, os.path.join(folder, name), p.steps_per_epoch
            )
            write_seconds = seconds if model is p.a else write_seconds
        for label, kwargs in (
            (f"TracInCP ({p.captum_layers_label})", {"layers": p.captum_layers}),
            (f"TracInCPFast ({p.final_layer})", {"final_layer": p.final_layer}),
        ):

            def score(model: Any, part: Any, kw: dict = kwargs) -> torch.Tensor:
                with p.module(model) as module:
                    return captum_tracin(module, p.train_rows(model, False), paths[id(model)], p.target_rows(part), **kw)

            def self_score(model: Any, kw: dict = kwargs) -> torch.Tensor:
                with p.module(model) as module:
                    return captum_tracin(module, p.train_rows(model, True), paths[id(model)], None, **kw)

            row = p.scored(f"(g) Captum {label}, {len(p.a.checkpoints)} Trainer checkpoints", score, self_score)
            row.train_seconds = (row.train_seconds or 0.0) + write_seconds  # a Trainer writes them while training
            rows.append(row)
    return rows


def kronfluence_peer_row(p: PeerSetup) -> Row:
    """Kronfluence's EK-FAC influence: factors fitted once per model (the setup), then pairwise or self scores.

    Kronfluence calls ``gc.collect()`` several times per fit and scoring; in this process, which holds hundreds of
    trained models, each call would cost far more than in a user's process. The objects alive before Kronfluence
    starts are therefore frozen out of the collector (``gc.freeze``) while it runs.
    """
    _, gc_before = timed(gc.collect)
    gc.freeze()
    try:
        row = _kronfluence_row(p)
    finally:
        gc.unfreeze()
    row.extra["one_gc_collect_seconds_unfrozen"] = gc_before
    return row


def _kronfluence_row(p: PeerSetup) -> Row:
    _, gc_seconds = timed(gc.collect)

    def fit(model: Any, noisy: bool) -> KronfluenceEKFAC:
        with p.module(model) as module:
            return KronfluenceEKFAC(module, p.train_rows(model, noisy), tracked=p.kronfluence_tracked)

    fitted_a, setup = timed(fit, p.a, False)
    fitted_b = fit(p.b, False)
    row = p.judge.fidelity(
        p.row("(g) Kronfluence EK-FAC influence, damping 0.1 x mean eigenvalue"),
        fitted_a.scores(p.target_rows(p.targets)),
        fitted_b.scores(p.target_rows(p.targets)),
    )
    suspicion, row.self_seconds = timed(lambda: fit(p.noisy, True).self_scores())
    _, scoring = timed(fitted_a.scores, p.target_rows(p.one_target))
    row.setup_seconds, row.target_seconds = setup, setup + scoring
    row.extra["one_gc_collect_seconds"] = gc_seconds
    for fitted in (fitted_a, fitted_b):
        fitted.close()
    return p.judge.mislabels(row, suspicion)


def peer_rows(p: PeerSetup, settings: Any, grad_dot_label: str, log: Callable[[str], None]) -> list[Row]:
    """Every peer row of a setting: in-house gradient methods, then Captum and Kronfluence when installed."""
    log("(g) peers: gradient dot, TracIn, Gauss-Newton influence ...")
    rows = gradient_peer_rows(p, grad_dot_label, settings.damping_factor, settings.damping_factors)
    log("(g) library InfluenceFunctionScorer (exact and CountSketch) ...")
    rows.extend(library_influence_rows(p, settings.damping_factor, settings.influence_projections))
    if "captum" in settings.peers and captum_available():
        log("(g) Captum TracInCP / TracInCPFast over Trainer-style checkpoints ...")
        rows[2:2] = captum_peer_rows(p)  # beside the in-house TracIn row
    else:
        log("(g) Captum is not installed (or not selected): its rows are skipped.")
    if "kronfluence" in settings.peers and kronfluence_available():
        log("(g) Kronfluence EK-FAC ...")
        rows.append(kronfluence_peer_row(p))
    else:
        log("(g) Kronfluence is not installed (or not selected): its row is skipped.")
    return [row.finish() for row in rows]


def results_dict(
    setting: str, settings: Any, judge: Judge, recipe: Any, ckpt_epochs: list[int], rows: list[Row], started: float
) -> dict[str, Any]:
    """The JSON-ready results of one run."""
    return {
        "setting": setting,
        "settings": asdict(settings),
        "ground_truth": {
            **judge.summary(),
            "recipe": asdict(recipe),
            "seeds": (
                f"subsets {GROUND_TRUTH_SEED}+s and {REPLICATE_SEED}+s, leave-one-out {LOO_SEED}+s, cleansing "
                f"{CLEANSING_SEED}+s (weights, batch order and masks); scored models use seeds below {GROUND_TRUTH_SEED}"
            ),
        },
        "tracin_checkpoint_epochs": ckpt_epochs,
        "kronfluence": kronfluence_version(),
        "captum": captum_version(),
        "rows": [asdict(r) for r in rows],
        "seconds_total": time.perf_counter() - started,
    }


# -- head setting ---------------------------------------------------------------------------------------------------
@dataclass
class CommonSettings:
    """What both settings share: data sizes, ground truths, peers."""

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


@dataclass
class Settings(CommonSettings):
    """Sizes and recipes of one run of the head setting."""

    in_features: int = 384
    width: int = 128
    wide_widths: tuple[int, ...] = (1024, 4096)
    ensembles: tuple[int, ...] = (4, 16, 64)
    channels: tuple[int, ...] = (16, 32)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3

    def recipe(self, **changes: Any) -> HeadRecipe:
        """The head recipe of this run, with ``changes`` (e.g. another width or channel count)."""
        base = HeadRecipe(
            in_features=self.in_features, width=self.width, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr
        )
        return base.replace(**changes)


QUICK = Settings(
    n_train=200,
    n_targets=20,
    n_test=200,
    n_subsets=10,
    ensembles=(4,),
    channels=(16,),
    wide_widths=(1024,),
    damping_factors=(0.1, 1.0, 10.0),
    n_loo=10,
    loo_seeds=2,
    cleansing_seeds=2,
)


class ModelPool:
    """Trains heads on demand and keeps them: one per (recipe, label set, seed)."""

    def __init__(self, data: FidelityData) -> None:
        self.data = data
        self._models: dict[tuple[HeadRecipe, bool, int], TrainedHead] = {}

    def get(
        self, recipe: HeadRecipe, seed: int, *, noisy: bool = False, checkpoint_epochs: Sequence[int] = ()
    ) -> TrainedHead:
        key = (recipe, noisy, seed)
        if key not in self._models:
            labels = self.data.noisy_labels if noisy else self.data.train.labels
            self._models[key] = train_head(
                self.data.train.features,
                labels,
                self.data.train.ids,
                recipe,
                init_seed=seed,
                mask_seed=seed,
                checkpoint_epochs=checkpoint_epochs,
            )
        return self._models[key]

    def many(self, recipe: HeadRecipe, seeds: Sequence[int], *, noisy: bool = False) -> list[TrainedHead]:
        return [self.get(recipe, s, noisy=noisy) for s in seeds]

    def accuracy_cost(self, recipe: HeadRecipe, seeds: Sequence[int], masked_accuracy: float) -> float:
        """Points of test accuracy the masks cost: the same recipe and seeds with ordinary dropout, minus masked."""
        dropout = recipe.replace(masking="dropout")
        plain = float(np.mean([accuracy(self.get(dropout, s).head, self.data.test) for s in seeds]))
        return 100.0 * (plain - masked_accuracy)


def accuracy(head: TurnoverHead, split: Split) -> float:
    with torch.no_grad():
        return float((head(split.features).argmax(-1) == split.labels).float().mean())


def head_judge(data: FidelityData, settings: Settings, log: Callable[[str], None]) -> Judge:
    """Ground truths of the head setting: the turn-over recipe for LDS and LOO, ordinary dropout for cleansing."""
    train, targets, base = data.train, data.targets, settings.recipe()
    subsets = random_subsets(len(train), settings.n_subsets, seed=settings.data_seed + 7)

    def subset_fn(rows: np.ndarray, seed: int) -> np.ndarray:
        rows = torch.as_tensor(rows)
        trained = train_head(train.features[rows], train.labels[rows], train.ids[rows], base, init_seed=seed, mask_seed=seed)
        return trained.head.losses(targets.features, targets.labels).numpy()

    def loo_fn(row: int | None, seed: int) -> np.ndarray:
        exclude = None if row is None else torch.tensor([row])
        trained = train_head(
            train.features, train.labels, train.ids, base, init_seed=seed, mask_seed=seed, exclude=exclude
        )
        return trained.head.losses(targets.features, targets.labels).numpy()

    plain = base.replace(masking="dropout")  # the paper retrains without turn-over dropout after cleansing

    def cleansing_fn(keep: np.ndarray, seed: int) -> float:
        # exclude: the batch order is drawn for all N rows, so the kept examples meet the same batches in every
        # condition and the comparison is paired (as for leave-one-out)
        exclude = torch.as_tensor(np.flatnonzero(~keep))
        trained = train_head(
            train.features, train.labels, train.ids, plain, init_seed=seed, mask_seed=seed, exclude=exclude
        )
        return accuracy(trained.head, data.test)

    return build_judge(len(train), subsets, subset_fn, loo_fn, cleansing_fn, settings, data.flipped, log)


def run_fidelity(data: FidelityData, settings: Settings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Head setting: train everything, score everything, and return the rows plus diagnostics as a JSON-ready dict."""
    started = time.perf_counter()
    settings = replace(settings, in_features=int(data.train.features.shape[1]))
    train, targets, noisy = data.train, data.targets, data.noisy_labels
    noisy_train = Split(train.features, noisy, train.ids)
    base = settings.recipe()
    pool = ModelPool(data)
    ckpt_epochs = sorted(
        {
            max(1, round(settings.epochs * (i + 1) / settings.tracin_checkpoints))
            for i in range(settings.tracin_checkpoints)
        }
    )
    judge = head_judge(data, settings, log)
    fidelity, mislabels = judge.fidelity, judge.mislabels

    def on_model_a(row: Row) -> None:
        """Rows that score model (a) share its accuracy, its accuracy cost and its training time."""
        row.accuracy, row.accuracy_cost, row.train_seconds = row_a.accuracy, row_a.accuracy_cost, row_a.train_seconds

    rows: list[Row] = []
    one_target = Split(targets.features[:1], targets.labels[:1], targets.ids[:1])

    # (a) single model, and the check that the closed form is the library's definition.
    log("(a) single-model turn-over ...")
    model_a, model_b = (
        pool.get(base, 0, checkpoint_epochs=ckpt_epochs),
        pool.get(base, 1, checkpoint_epochs=ckpt_epochs),
    )
    gap = check_closed_form(model_a, train, targets)
    if gap > 1e-4:
        raise RuntimeError(f"closed-form turn-over scores disagree with the patched head by {gap:.3g}.")
    noisy_a = pool.get(base, 0, noisy=True, checkpoint_epochs=ckpt_epochs)
    scores_a, scores_b = turnover_scores(model_a, train.ids, targets), turnover_scores(model_b, train.ids, targets)
    row_a = row = fidelity(Row(f"(a) turn-over, single model, W={settings.width}"), scores_a, scores_b)
    self_a, row.self_seconds = timed(self_turnover, noisy_a, noisy_train, noisy)
    _, row.target_seconds = timed(turnover_scores, model_a, train.ids, one_target)
    row.accuracy, row.train_seconds = accuracy(model_a.head, data.test), model_a.seconds
    row.accuracy_cost = pool.accuracy_cost(base, [0], row.accuracy)
    row.extra["closed_form_gap_vs_patched_model"] = gap
    # The direction of self-influence for mislabels, both ways, so the choice is visible.
    row.extra["mislabel_low_is_suspicious"] = mislabel_detection(self_a, data.flipped, low_is_suspicious=True)
    row.extra["mislabel_high_is_suspicious"] = mislabel_detection(self_a, data.flipped, low_is_suspicious=False)
    rows.append(mislabels(row, self_a).finish())

    # (b) seed ensembles: two disjoint ensembles of K models for agreement; mislabels from one ensemble.
    def ensemble_scores(models: list[TrainedHead], part: Split) -> torch.Tensor:
        return torch.stack([turnover_scores(m, train.ids, part) for m in models]).mean(0)

    def ensemble_self(models: list[TrainedHead]) -> torch.Tensor:
        return torch.stack([self_turnover(m, noisy_train, noisy) for m in models]).mean(0)

    for k in settings.ensembles:
        log(f"(b) ensemble of {k} ...")
        first, second = pool.many(base, range(k)), pool.many(base, range(k, 2 * k))
        row = fidelity(
            Row(f"(b) turn-over, seed ensemble K={k}"),
            ensemble_scores(first, targets),
            ensemble_scores(second, targets),
        )
        self_ens, row.self_seconds = timed(ensemble_self, pool.many(base, range(k), noisy=True))
        _, row.target_seconds = timed(ensemble_scores, first, one_target)
        members = [accuracy(m.head, data.test) for m in first]
        row.accuracy = float(np.mean(members))
        row.accuracy_cost = pool.accuracy_cost(base, range(k), row.accuracy)
        row.extra["accuracy_cost_sem"] = paired_sem(
            [accuracy(pool.get(base.replace(masking="dropout"), s).head, data.test) for s in range(k)], members
        )
        row.train_seconds = float(sum(m.seconds for m in first))
        with torch.no_grad():
            row.extra["ensemble_prediction_accuracy"] = float(
                (
                    torch.stack([torch.softmax(m.head(data.test.features), -1) for m in first]).mean(0).argmax(-1)
                    == data.test.labels
                )
                .float()
                .mean()
            )
        rows.append(mislabels(row, self_ens).finish())

    # (c) wider masked layers (K channels of W units, below, are a reparametrised layer of K * W units).
    for width in settings.wide_widths:
        log(f"(c) W={width} ...")
        wide = settings.recipe(width=width)
        wide_a, wide_b, wide_noisy = pool.get(wide, 0), pool.get(wide, 1), pool.get(wide, 0, noisy=True)
        row = fidelity(
            Row(f"(c) turn-over, wider layer W={width}"),
            turnover_scores(wide_a, train.ids, targets),
            turnover_scores(wide_b, train.ids, targets),
        )
        self_wide, row.self_seconds = timed(self_turnover, wide_noisy, noisy_train, noisy)
        _, row.target_seconds = timed(turnover_scores, wide_a, train.ids, one_target)
        row.accuracy, row.train_seconds = accuracy(wide_a.head, data.test), wide_a.seconds
        row.accuracy_cost = pool.accuracy_cost(wide, [0], row.accuracy)
        rows.append(mislabels(row, self_wide).finish())

    # (d) residuals after regressing each target's scores on the examples' centred mask bits.
    log("(d) mask-bit regression ...")

    def bits(trained: TrainedHead) -> np.ndarray:
        return (trained.masks(train.ids).flatten(1) > 0).double().numpy()  # (N, K * W) keep bits

    res_a, res_b = linear_residuals(scores_a, bits(model_a)), linear_residuals(scores_b, bits(model_b))
    row = fidelity(
        Row(f"(d) turn-over W={settings.width}, mask-bit regression residuals"),
        torch.from_numpy(res_a),
        torch.from_numpy(res_b),
    )
    row.extra["r2_per_target_mean"] = float(np.nanmean(explained_variance(scores_a, res_a)))
    row.extra["lds_of_fitted_part"] = lds(scores_a.double().numpy() - res_a, judge.subsets, judge.gt)
    self_res, row.self_seconds = timed(lambda: linear_residuals(self_a, bits(noisy_a))[:, 0])
    row.self_seconds += row_a.self_seconds
    _, row.target_seconds = timed(linear_residuals, scores_a[:, :1], bits(model_a))
    row.target_seconds += row_a.target_seconds
    on_model_a(row)
    rows.append(mislabels(row, torch.from_numpy(self_res)).finish())

    # (e) the full network as the reference, and the mirror image.
    for reference, label in (("full", "L(flip) - L(full)"), ("mirror", "L(full) - L(mask)")):
        log(f"(e) {label} ...")
        row = fidelity(
            Row(f"(e) turn-over W={settings.width}, {label}"),
            turnover_scores(model_a, train.ids, targets, reference),
            turnover_scores(model_b, train.ids, targets, reference),
        )
        self_e, row.self_seconds = timed(self_turnover, noisy_a, noisy_train, noisy, reference)
        _, row.target_seconds = timed(turnover_scores, model_a, train.ids, one_target, reference)
        on_model_a(row)
        rows.append(mislabels(row, self_e).finish())

    # (f) K parallel masked channels in one model.
    for k in settings.channels:
        multi = settings.recipe(channels=k)
        log(f"(f) {k} channels of W={settings.width} ...")
        multi_a, multi_b, multi_noisy = pool.get(multi, 0), pool.get(multi, 1), pool.get(multi, 0, noisy=True)
        gap = check_closed_form(multi_a, train, targets)
        if gap > 1e-4:
            raise RuntimeError(
                f"closed-form scores of the {k}-channel head disagree with the patched head by {gap:.3g}."
            )
        for how, score_fn, self_fn in (
            (
                "all channels flipped",
                lambda m, t: turnover_scores(m, train.ids, t),
                lambda m: self_turnover(m, noisy_train, noisy),
            ),
            (
                "one channel flipped at a time, mean",
                lambda m, t: channel_flip_scores(m, train.ids, t),
                lambda m: self_channel_flips(m, noisy_train, noisy),
            ),
        ):
            row = fidelity(
                Row(f"(f) {k} masked channels x W={settings.width}, {how}"),
                score_fn(multi_a, targets),
                score_fn(multi_b, targets),
            )
            self_f, row.self_seconds = timed(self_fn, multi_noisy)
            _, row.target_seconds = timed(score_fn, multi_a, one_target)
            row.accuracy, row.train_seconds = accuracy(multi_a.head, data.test), multi_a.seconds
            row.accuracy_cost = pool.accuracy_cost(multi, [0], row.accuracy)
            rows.append(mislabels(row, self_f).finish())

    # (g) peers on the same head as (a).
    def head_at(model: TrainedHead, checkpoint: Any) -> TurnoverHead:
        return model.head if checkpoint is None else model.head_at(checkpoint)

    ones = (base.channels, base.width)  # targets run on the full network: masks of ones
    peers = PeerSetup(
        judge,
        Row("", accuracy=row_a.accuracy, accuracy_cost=row_a.accuracy_cost, train_seconds=row_a.train_seconds),
        model_a,
        model_b,
        noisy_a,
        targets,
        one_target,
        train_factors=lambda m, c, is_noisy, masked: head_factors(
            head_at(m, c), train.features, noisy if is_noisy else train.labels, m.masks(train.ids) if masked else None
        ),
        target_factors=lambda m, c, part: head_factors(head_at(m, c), part.features, part.labels, None),
        module=lambda m: contextlib.nullcontext(m.head),
        train_rows=lambda m, is_noisy: head_rows(train.features, m.masks(train.ids), noisy if is_noisy else train.labels),
        target_rows=lambda part: head_rows(part.features, torch.ones(len(part), *ones), part.labels),
        captum_layers=["hidden", "out"],
        captum_layers_label="all head layers",
        final_layer="out",
        kronfluence_tracked=None,
        steps_per_epoch=-(-len(train) // settings.batch_size),
        library_model=lambda m: contextlib.nullcontext(patched_classifier(m.head, m.mask_seed).eval()),
        library_batches=lambda m, is_noisy: library_batches(
            {"features": train.features}, noisy if is_noisy else train.labels, train.ids
        ),
        library_targets=lambda part: {"features": part.features, "labels": part.labels},
        train_ids=train.ids,
    )
    rows.extend(peer_rows(peers, settings, f"(g) gradient dot product (final model, W={settings.width})", log))

    row = Row("(g) training loss (mislabels only)")
    with torch.no_grad():
        loss_noisy, row.self_seconds = timed(noisy_a.head.losses, train.features, noisy)
    row.accuracy, row.train_seconds = row_a.accuracy, row_a.train_seconds
    rows.append(mislabels(row, loss_noisy, low_is_suspicious=False))

    return results_dict("head", settings, judge, base, ckpt_epochs, rows, started)


# -- adapter setting ------------------------------------------------------------------------------------------------
ADAPTER_NAME = "rt"
TOP_CACHE_FILE = "minilm_top_layer_inputs_len{max_length}.safetensors"


@dataclass
class AdapterSettings(CommonSettings):
    """Sizes and recipes of one run of the adapter setting (bottleneck adapter in MiniLM's top layer)."""

    n_targets: int = 100
    max_length: int = 64
    reduction_factor: int = 8  # 384 / 8 = 48 bottleneck units, the demo's adapter
    wide_reduction_factors: tuple[int, ...] = (1,)  # 384 bottleneck units
    ensembles: tuple[int, ...] = (4, 16, 32, 64)
    channels: tuple[int, ...] = (16, 64)  # mask channels of the classifier (TurnoverConfig(channels=K))
    epochs: int = 5
    batch_size: int = 32
    lr: float = 3e-3
    library_timing: bool = True  # also time turnover_hf.TurnoverScorer on the full model (single model)

    def recipe(self, **changes: Any) -> TopRecipe:
        return replace(TopRecipe(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr), **changes)


QUICK_ADAPTERS = AdapterSettings(
    n_train=200,
    n_targets=20,
    n_test=200,
    n_subsets=10,
    ensembles=(4,),
    wide_reduction_factors=(1,),
    channels=(4,),
    n_loo=10,
    loo_seeds=2,
    cleansing_seeds=2,
)


@dataclass
class AdapterData:
    """Cached cut inputs of every split, and how to get a patched model (and its top) for an adapter size."""

    train: TopInputs
    noisy_labels: torch.Tensor
    flipped: np.ndarray
    targets: TopInputs
    test: TopInputs
    # (reduction factor, classifier mask channels) -> patched full model (adapter in the top layer)
    build_model: Callable[[int, int], nn.Module]
    train_batches: list[dict[str, torch.Tensor]] = field(default_factory=list)  # tokenized, for library timing
    target_batch: dict[str, torch.Tensor] | None = None  # tokenized first targets, for the exactness check
    _models: dict[tuple[int, int], tuple[nn.Module, TopModel]] = field(default_factory=dict)

    def model_and_top(self, variant: Variant) -> tuple[nn.Module, TopModel]:
        """The model of a variant: a reduction factor, or (reduction factor, classifier mask channels)."""
        key = variant if isinstance(variant, tuple) else (variant, 1)
        if key not in self._models:
            model = self.build_model(*key)
            self._models[key] = (model, TopModel(model))
        return self._models[key]


def build_adapter_model(reduction_factor: int, channels: int = 1, seed: int = 0) -> nn.Module:
    """all-MiniLM-L6-v2 with a fresh 2-way head and a bottleneck adapter in its top layer, patched (demo recipe;
    ``channels`` > 1: that many mask channels on the classifier)."""
    import adapters
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized: classifier" is expected
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        th.assets.minilm_path(), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    adapters.init(model)
    layers = model.config.num_hidden_layers
    model.add_adapter(
        ADAPTER_NAME,
        config=adapters.SeqBnConfig(reduction_factor=reduction_factor, leave_out=list(range(layers - 1))),
    )
    model.train_adapter(ADAPTER_NAME)
    return th.patch_model(model, th.TurnoverConfig(seed=0, channels=channels), freeze_leaking=True).eval()


def _top_cache(model: nn.Module, rows: list[tuple[int, str, int]], tokenizer: Any, max_length: int, batch_size: int = 64) -> TopInputs:
    """Cut inputs of (example_id, text, label) rows, computed in length-sorted batches and returned in row order."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][1]))

    def batches():
        for start in range(0, len(order), batch_size):
            chosen = [rows[i] for i in order[start : start + batch_size]]
            batch = dict(
                tokenizer([t for _, t, _ in chosen], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            )
            batch["labels"] = torch.tensor([y for _, _, y in chosen])
            batch["example_ids"] = torch.tensor([i for i, _, _ in chosen])
            yield batch

    cache = cache_top_inputs(model, batches())
    inverse = torch.empty(len(order), dtype=torch.int64)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return cache.select(inverse)


def load_adapter_data(settings: AdapterSettings, full_cache: bool, cache_dir: Path = CACHE_DIR) -> AdapterData:
    """Rotten Tomatoes through frozen MiniLM up to the top layer's adapter, cached on disk for the whole corpus."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    data = th.assets.rotten_tomatoes(
        seed=settings.data_seed, n_train=settings.n_train, n_validation=settings.n_targets, n_test=settings.n_test
    )
    tokenizer = AutoTokenizer.from_pretrained(th.assets.minilm_path())
    model = build_adapter_model(settings.reduction_factor)
    everything = th.assets.rotten_tomatoes()
    corpus = sorted(
        (int(i), t, int(y)) for split in everything.values() for i, t, y in zip(split["example_id"], split["text"], split["label"])
    )
    fingerprint = _texts_fingerprint([i for i, _, _ in corpus], [t for _, t, _ in corpus])
    path = cache_dir / TOP_CACHE_FILE.format(max_length=settings.max_length)
    by_id: dict[int, int] | None = None
    cache: TopInputs | None = None
    if path.exists():
        with safe_open(str(path), framework="pt") as handle:
            valid = (handle.metadata() or {}).get("texts_sha256") == fingerprint
        if valid:
            stored = load_file(str(path))
            cache = TopInputs(stored["hidden"], stored["residual"], stored["labels"], stored["example_ids"])
    if cache is None:
        needed = {int(i) for split in data.values() for i in split["example_id"]}
        rows = corpus if full_cache else [r for r in corpus if r[0] in needed]
        cache = _top_cache(model, rows, tokenizer, settings.max_length)
        if full_cache:
            cache_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file(
                    {
                        "hidden": cache.hidden.contiguous(),
                        "residual": cache.residual.contiguous(),
                        "labels": cache.labels,
                        "example_ids": cache.example_ids,
                    },
                    tmp,
                    metadata={"texts_sha256": fingerprint, "model": "all-MiniLM-L6-v2", "cut": "top layer output adapter"},
                )
    by_id = {int(i): r for r, i in enumerate(cache.example_ids.tolist())}

    def split(name: str) -> TopInputs:
        return cache.select([by_id[int(i)] for i in data[name]["example_id"]])

    train = split("train")
    noisy, flipped = with_flipped_labels(train.labels, settings.noise, settings.data_seed + 1)

    def tokenized(name: str, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        part = data[name].select(list(rows))
        batch = dict(
            tokenizer(list(part["text"]), padding=True, truncation=True, max_length=settings.max_length, return_tensors="pt")
        )
        batch["labels"] = torch.tensor(list(part["label"]))
        batch["example_ids"] = torch.tensor(list(part["example_id"]))
        return batch

    order = sorted(range(len(data["train"])), key=lambda i: len(data["train"][i]["text"]))
    train_batches = [tokenized("train", order[s : s + 64]) for s in range(0, len(order), 64)]
    out = AdapterData(
        train, noisy, flipped, split("validation"), split("test"), build_adapter_model, train_batches,
        tokenized("validation", range(min(3, len(data["validation"])))),
    )
    out._models[(settings.reduction_factor, 1)] = (model, TopModel(model))
    return out


class TopPool:
    """Trains adapters + heads on the cached cut on demand and keeps them, one per (size, recipe, labels, seed)."""

    def __init__(self, data: AdapterData) -> None:
        self.data = data
        self._models: dict[tuple[Variant, TopRecipe, bool, int], TrainedTop] = {}

    def get(
        self, reduction: Variant, recipe: TopRecipe, seed: int, *, noisy: bool = False, checkpoint_epochs: Sequence[int] = ()
    ) -> TrainedTop:
        key = (reduction, recipe, noisy, seed)
        if key not in self._models:
            top = self.data.model_and_top(reduction)[1]
            train = self.data.train.with_labels(self.data.noisy_labels) if noisy else self.data.train
            self._models[key] = train_top(
                top, train, recipe, init_seed=seed, mask_seed=seed, checkpoint_epochs=checkpoint_epochs
            )
        return self._models[key]

    def many(self, reduction: Variant, recipe: TopRecipe, seeds: Sequence[int], *, noisy: bool = False) -> list[TrainedTop]:
        return [self.get(reduction, recipe, s, noisy=noisy) for s in seeds]

    def accuracy(self, reduction: Variant, trained: TrainedTop) -> float:
        return top_accuracy(self.data.model_and_top(reduction)[1], trained, self.data.test)

    def accuracy_cost(self, reduction: Variant, recipe: TopRecipe, seeds: Sequence[int], masked_accuracy: float) -> float:
        dropout = replace(recipe, masking="dropout")
        plain = float(np.mean([self.accuracy(reduction, self.get(reduction, dropout, s)) for s in seeds]))
        return 100.0 * (plain - masked_accuracy)


def adapter_units(top: TopModel) -> int:
    """Bottleneck width of the top layer's adapter."""
    return next(m.out_features for name, m in top.named_modules() if name.endswith("adapter_down.0"))


def top_layer_names(top: TopModel) -> list[str]:
    """Names of the Linear modules holding the trainable parameters (adapter down / up, classifier)."""
    return sorted({name.rpartition(".")[0] for name in top.trainable()})


def top_factors(top: TopModel, part: TopInputs, masked: bool) -> MarginFactors:
    """Margin-gradient factors of every row on the trainable parameters (own masks, or the full network)."""
    modules = dict(top.named_modules())
    layers = [modules[name] for name in top_layer_names(top)]

    def forward(rows: torch.Tensor) -> torch.Tensor:
        ids = part.example_ids[rows] if masked else None
        return top(part.hidden[rows], part.residual[rows], ids)

    return margin_factors(forward, len(part), layers, part.labels.long())


def top_rows(part: TopInputs, masked: bool) -> torch.utils.data.Dataset:
    """``(hidden, residual, example_ids, label)`` rows; ids of -1 run the full network (targets)."""
    ids = part.example_ids if masked else torch.full((len(part),), -1, dtype=torch.int64)
    return torch.utils.data.TensorDataset(part.hidden, part.residual, ids, part.labels.long())


def adapter_judge(data: AdapterData, settings: AdapterSettings, log: Callable[[str], None]) -> Judge:
    """Ground truths of the adapter setting, retrained on the cached cut with unseen seeds."""
    train, targets = data.train, data.targets
    top = data.model_and_top(settings.reduction_factor)[1]
    base, plain = settings.recipe(), settings.recipe(masking="dropout")
    subsets = random_subsets(len(train), settings.n_subsets, seed=settings.data_seed + 7)

    def subset_fn(rows: np.ndarray, seed: int) -> np.ndarray:
        trained = train_top(top, train.select(rows), base, init_seed=seed, mask_seed=seed)
        return top_losses(top, trained, targets).numpy()

    def loo_fn(row: int | None, seed: int) -> np.ndarray:
        exclude = None if row is None else [row]
        trained = train_top(top, train, base, init_seed=seed, mask_seed=seed, exclude=exclude)
        return top_losses(top, trained, targets).numpy()

    def cleansing_fn(keep: np.ndarray, seed: int) -> float:
        exclude = np.flatnonzero(~keep).tolist()  # paired: the kept rows meet the same batches in every condition
        trained = train_top(top, train, plain, init_seed=seed, mask_seed=seed, exclude=exclude)
        return top_accuracy(top, trained, data.test)

    return build_judge(len(train), subsets, subset_fn, loo_fn, cleansing_fn, settings, data.flipped, log)


def check_top_exact(data: AdapterData, reduction: Variant, trained: TrainedTop, n_ids: int = 4) -> float:
    """Largest gap between the cached top's scores and ``turnover_hf.TurnoverScorer`` (batched) on the full model."""
    if data.target_batch is None:
        return float("nan")
    model, top = data.model_and_top(reduction)
    batch = data.target_batch
    n_targets = len(batch["labels"])
    ids = data.train.example_ids[:n_ids]
    fast = top_turnover_scores(top, trained, ids, data.targets.select(range(n_targets)))
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "example_ids")}
    with trained.active(top):
        reference = th.TurnoverScorer(model, fast=False).scores(inputs, batch["labels"], ids)
    return float((fast - reference).abs().max())


def library_times(data: AdapterData, reduction: int, trained: TrainedTop) -> dict[str, Any]:
    """Seconds of ``turnover_hf.TurnoverScorer`` on the full model: one target vs all N, self-influence of all N."""
    model, top = data.model_and_top(reduction)
    batch = data.target_batch
    inputs = {k: v[:1] for k, v in batch.items() if k not in ("labels", "example_ids")}
    out: dict[str, Any] = {}
    with trained.active(top):
        scorer = th.TurnoverScorer(model, batch_size=256)
        _, out["one_target_seconds"] = timed(scorer.scores, inputs, batch["labels"][:1], data.train.example_ids)
        out["path"] = scorer.path

        def self_all() -> None:
            for part in data.train_batches:
                scorer.self_scores(part, part["labels"], part["example_ids"])

        _, out["self_influence_seconds"] = timed(self_all)
    return out


def run_adapter_fidelity(
    data: AdapterData, settings: AdapterSettings, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Adapter setting: train on the cached cut, score every method, return rows and diagnostics (JSON-ready)."""
    started = time.perf_counter()
    train, targets = data.train, data.targets
    noisy_train = train.with_labels(data.noisy_labels)
    rf = settings.reduction_factor
    model, top = data.model_and_top(rf)
    base = settings.recipe()
    units = adapter_units(top)
    pool = TopPool(data)
    ckpt_epochs = sorted(
        {max(1, round(settings.epochs * (i + 1) / settings.tracin_checkpoints)) for i in range(settings.tracin_checkpoints)}
    )
    judge = adapter_judge(data, settings, log)
    fidelity, mislabels = judge.fidelity, judge.mislabels
    one_target = targets.select([0])
    rows: list[Row] = []

    def on_model_a(row: Row) -> None:
        row.accuracy, row.accuracy_cost, row.train_seconds = row_a.accuracy, row_a.accuracy_cost, row_a.train_seconds

    log("(a) single-model turn-over ...")
    model_a = pool.get(rf, base, 0, checkpoint_epochs=ckpt_epochs)
    model_b = pool.get(rf, base, 1, checkpoint_epochs=ckpt_epochs)
    noisy_a = pool.get(rf, base, 0, noisy=True, checkpoint_epochs=ckpt_epochs)
    gap = check_top_exact(data, rf, model_a)
    if gap > 1e-4:
        raise RuntimeError(f"cached top-layer scores disagree with TurnoverScorer on the full model by {gap:.3g}.")
    scores_a = top_turnover_scores(top, model_a, train.example_ids, targets)
    scores_b = top_turnover_scores(top, model_b, train.example_ids, targets)
    row_a = row = fidelity(Row(f"(a) turn-over, single model, adapter {units} units"), scores_a, scores_b)
    self_a, row.self_seconds = timed(top_self_scores, top, noisy_a, noisy_train)
    _, row.target_seconds = timed(top_turnover_scores, top, model_a, train.example_ids, one_target)
    row.accuracy, row.train_seconds = pool.accuracy(rf, model_a), model_a.seconds
    row.accuracy_cost = pool.accuracy_cost(rf, base, [0], row.accuracy)
    row.extra["cached_top_gap_vs_turnover_scorer"] = gap
    row.extra["mislabel_low_is_suspicious"] = mislabel_detection(self_a, data.flipped, low_is_suspicious=True)
    row.extra["mislabel_high_is_suspicious"] = mislabel_detection(self_a, data.flipped, low_is_suspicious=False)
    if settings.library_timing and data.train_batches:
        log("    timing turnover_hf.TurnoverScorer on the full model ...")
        row.extra["library_turnover_scorer"] = library_times(data, rf, model_a)
    rows.append(mislabels(row, self_a).finish())

    # per member seed: ensembles of several sizes share members, and (a) and (b) are members 0 and 1
    target_scores: dict[int, torch.Tensor] = {0: scores_a, 1: scores_b}

    def member_scores(model: TrainedTop, part: TopInputs) -> torch.Tensor:
        if part is not targets:
            return top_turnover_scores(top, model, train.example_ids, part)
        if model.init_seed not in target_scores:
            target_scores[model.init_seed] = top_turnover_scores(top, model, train.example_ids, part)
        return target_scores[model.init_seed]

    def ensemble_scores(models: list[TrainedTop], part: TopInputs) -> torch.Tensor:
        return torch.stack([member_scores(m, part) for m in models]).mean(0)

    for k in settings.ensembles:
        log(f"(b) ensemble of {k} ...")
        first, second = pool.many(rf, base, range(k)), pool.many(rf, base, range(k, 2 * k))
        row = fidelity(
            Row(f"(b) turn-over, seed ensemble K={k}"), ensemble_scores(first, targets), ensemble_scores(second, targets)
        )
        noisy_models = pool.many(rf, base, range(k), noisy=True)
        self_ens, row.self_seconds = timed(
            lambda models=noisy_models: torch.stack([top_self_scores(top, m, noisy_train) for m in models]).mean(0)
        )
        _, row.target_seconds = timed(ensemble_scores, first, one_target)
        members = [pool.accuracy(rf, m) for m in first]
        row.accuracy = float(np.mean(members))
        row.accuracy_cost = pool.accuracy_cost(rf, base, range(k), row.accuracy)
        plain = replace(base, masking="dropout")
        row.extra["accuracy_cost_sem"] = paired_sem([pool.accuracy(rf, pool.get(rf, plain, s)) for s in range(k)], members)
        row.train_seconds = float(sum(m.seconds for m in first))
        rows.append(mislabels(row, self_ens).finish())

    def one_model_row(variant: Variant, name: str) -> Row:
        """A single turn-over model of another variant (wider adapter, classifier channels), scored like (a)."""
        variant_top = data.model_and_top(variant)[1]
        v_a, v_b, v_noisy = pool.get(variant, base, 0), pool.get(variant, base, 1), pool.get(variant, base, 0, noisy=True)
        row = fidelity(
            Row(name),
            top_turnover_scores(variant_top, v_a, train.example_ids, targets),
            top_turnover_scores(variant_top, v_b, train.example_ids, targets),
        )
        self_v, row.self_seconds = timed(top_self_scores, variant_top, v_noisy, noisy_train)
        _, row.target_seconds = timed(top_turnover_scores, variant_top, v_a, train.example_ids, one_target)
        row.accuracy, row.train_seconds = pool.accuracy(variant, v_a), v_a.seconds
        row.accuracy_cost = pool.accuracy_cost(variant, base, [0], row.accuracy)
        gap = check_top_exact(data, variant, v_a)
        if gap > 1e-4:
            raise RuntimeError(f"cached top-layer scores of {name!r} disagree with TurnoverScorer by {gap:.3g}.")
        row.extra["cached_top_gap_vs_turnover_scorer"] = gap
        return mislabels(row, self_v).finish()

    for wide_rf in settings.wide_reduction_factors:
        wide_units = adapter_units(data.model_and_top(wide_rf)[1])
        log(f"(c) adapter of {wide_units} units ...")
        rows.append(one_model_row(wide_rf, f"(c) turn-over, wider adapter {wide_units} units"))

    # (f) mask channels on the classifier (the library's TurnoverConfig(channels=K)), adapter masks as in (a).
    for k in settings.channels:
        log(f"(f) classifier with {k} mask channels ...")
        rows.append(one_model_row((rf, k), f"(f) turn-over, {k} mask channels on the classifier, adapter {units} units"))

    # (g) peers on the same adapter and head as (a).
    def factors(model: TrainedTop, checkpoint: Any, part: TopInputs, masked: bool) -> MarginFactors:
        with model.active(top, None if checkpoint is None else checkpoint.state_dict):
            return top_factors(top, part, masked)

    peers = PeerSetup(
        judge,
        Row("", accuracy=row_a.accuracy, accuracy_cost=row_a.accuracy_cost, train_seconds=row_a.train_seconds),
        model_a,
        model_b,
        noisy_a,
        targets,
        one_target,
        train_factors=lambda m, c, is_noisy, masked: factors(m, c, noisy_train if is_noisy else train, masked),
        target_factors=lambda m, c, part: factors(m, c, part, False),
        module=lambda m: m.active(top),
        train_rows=lambda m, is_noisy: top_rows(noisy_train if is_noisy else train, True),
        target_rows=lambda part: top_rows(part, False),
        captum_layers=top_layer_names(top),
        captum_layers_label="adapter + classifier",
        final_layer="classifier",
        kronfluence_tracked=top_layer_names(top),
        steps_per_epoch=-(-len(train) // settings.batch_size),
        library_model=lambda m: m.active(top),
        library_batches=lambda m, is_noisy: library_batches(
            {"hidden": train.hidden, "residual": train.residual}, data.noisy_labels if is_noisy else train.labels,
            train.example_ids,
        ),
        library_targets=lambda part: {"hidden": part.hidden, "residual": part.residual, "labels": part.labels},
        train_ids=train.example_ids,
    )
    rows.extend(peer_rows(peers, settings, "(g) gradient dot product (final model)", log))

    row = Row("(g) training loss (mislabels only)")
    loss_noisy, row.self_seconds = timed(top_losses, top, noisy_a, noisy_train)
    row.accuracy, row.train_seconds = row_a.accuracy, row_a.train_seconds
    rows.append(mislabels(row, loss_noisy, low_is_suspicious=False))

    results = results_dict("adapters", settings, judge, base, ckpt_epochs, rows, started)
    results["model"] = {
        "adapter_units": units,
        "trainable_parameters": sum(p.numel() for p in top.trainable().values()),
        "mask_sites": dict(model.turnover_config.mask_sites),
    }
    return results


# -- report ---------------------------------------------------------------------------------------------------------
COLUMNS = (
    ("method", "method"),
    ("lds", "LDS"),
    ("loo_corr", "LOO corr."),
    ("agreement", "seed agreement"),
    ("mislabel_auc", "mislabel AUC"),
    ("recall_at_10", "recall@10%"),
    ("cleansing_gain", "cleansing gain (pt)"),
    ("accuracy_cost", "acc. cost of masks (pt)"),
    ("accuracy", "test acc."),
    ("train_seconds", "train s"),
    ("self_seconds", "self-infl. s (all N)"),
    ("target_seconds", "1 target s (all N)"),
    ("end_to_end_seconds", "end-to-end s"),
)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if key == "method":
        return str(value)
    if key.endswith("seconds"):
        return f"{value:.3f}" if value < 10 else f"{value:.0f}"
    if key in ("cleansing_gain", "accuracy_cost"):
        return f"{value:+.2f}"
    return f"{value:.3f}"


def _setting_line(results: dict[str, Any]) -> str:
    s, gt = results["settings"], results["ground_truth"]
    common = (
        f"N={s['n_train']} training examples, {s['n_targets']} validation targets, {gt['subsets']} half-size "
        f"subsets (ground-truth split-half reliability {gt['split_half_reliability']:.3f}); LOO on "
        f"{gt['loo_examples']} examples x {gt['loo_seeds']} retrain seeds; {s['noise']:.0%} labels flipped for "
        f"mislabel detection ({'low' if s['low_is_suspicious'] else 'high'} self-influence = suspicious; high "
        "loss for the training-loss row)."
    )
    if results.get("setting") == "adapters":
        m = results["model"]
        return (
            f"all-MiniLM-L6-v2 with a bottleneck adapter ({m['adapter_units']} units) in its top layer, turn-over "
            f"masks on {', '.join(m['mask_sites'])}; {m['trainable_parameters']} trainable parameters retrained on "
            f"cached lower layers, {s['epochs']} epochs of Adam (lr {s['lr']:g}, batch {s['batch_size']}). " + common
        )
    return (
        f"Head {s['in_features']} -> W -> 2 on frozen MiniLM embeddings, {s['epochs']} epochs of Adam (lr "
        f"{s['lr']:g}, batch {s['batch_size']}). " + common
    )


def markdown(results: dict[str, Any]) -> str:
    lines = [
        _setting_line(results),
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "|".join("---" if key == "method" else "---:" for key, _ in COLUMNS) + "|",
    ]
    for row in results["rows"]:
        lines.append("| " + " | ".join(_cell(key, row.get(key)) for key, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def notes(results: dict[str, Any]) -> list[str]:
    """Diagnostics that back the reading of the table, as Markdown bullet points."""
    gt, first = results["ground_truth"], results["rows"][0]
    out = [
        (
            f"- Ground truths ({gt['seeds']}). LDS: {gt['subsets']} random subsets of {gt['subset_size']} examples, "
            f"each retrained twice; split-half reliability (per-target Spearman between the two retrainings, mean) "
            f"{gt['split_half_reliability']:.3f}, so even an exact predictor of the expected loss scores well below 1."
        ),
    ]
    if "loo_seed_to_seed_pearson" in gt:
        r, k = gt["loo_seed_to_seed_pearson"], gt["loo_seeds"]
        out.append(
            f"- Leave-one-out: {gt['loo_examples']} random examples x the targets, mean over {k} retrain seeds. The "
            f"actual effects of two seeds correlate at Pearson {r:.3f}: one example's removal is mostly retraining "
            "noise (heavy-tailed: a few pairs carry most of the covariance), so the LOO column is small and noisy for "
            "every method; compare its rows with each other rather than with 1."
        )
    if "cleansing" in gt:
        c = gt["cleansing"]
        out.append(
            f"- Cleansing: {c['removed']} examples removed (1 %), {c['seeds']} retrain seeds with ordinary dropout; "
            f"test accuracy with nothing removed {np.mean(c['accuracy_none']):.4f}, with random removal "
            f"{np.mean(c['accuracy_random']):.4f}. The column is the gain over random removal in points; the paper's "
            "Table 2 reports +1.3 points over no cleansing under a domain shift (SST-2 -> electronics); here "
            "validation and test come from the same distribution."
        )
    if "closed_form_gap_vs_patched_model" in first["extra"]:
        out.append(
            f"- Closed-form turn-over scores vs. the patched head (`turnover_hf.patch_model` + `instance_masks`, one "
            f"forward per row): max gap {first['extra']['closed_form_gap_vs_patched_model']:.1e}."
        )
    if "cached_top_gap_vs_turnover_scorer" in first["extra"]:
        out.append(
            "- Cached top-layer scores vs. `turnover_hf.TurnoverScorer` (batched path) on the full patched MiniLM: "
            f"max gap {first['extra']['cached_top_gap_vs_turnover_scorer']:.1e}."
        )
    library = first["extra"].get("library_turnover_scorer")
    if library:
        out.append(
            f"- The same single model through the library's generic `TurnoverScorer` on the full MiniLM (tokens in, "
            f"`{library['path']}` path): one target vs all N {library['one_target_seconds']:.1f} s, self-influence of "
            f"all N {library['self_influence_seconds']:.1f} s. The table's turn-over times use the cached top "
            "(the same scores); every peer also runs on the cached top."
        )
    out.append(
        "- Mislabel direction, single model: AUC "
        f"{first['extra']['mislabel_high_is_suspicious']['auc']:.3f} ranking high self-influence first, "
        f"{first['extra']['mislabel_low_is_suspicious']['auc']:.3f} ranking low self-influence first."
    )
    for row in results["rows"]:
        extra = row["extra"]
        if "r2_per_target_mean" in extra:
            out.append(
                f"- Mask-bit regression: a per-target linear function of the {results['settings']['width']} mask "
                f"bits explains {extra['r2_per_target_mean']:.1%} of the score variance (mean over targets); the "
                f"fitted part alone has LDS {extra['lds_of_fitted_part']:.3f}, the residuals {row['lds']:.3f}."
            )
        if "lds_by_damping_factor" in extra:
            sweep = ", ".join(f"{k}: {v:.3f}" for k, v in extra["lds_by_damping_factor"].items())
            out.append(
                f"- Gauss-Newton influence, LDS by damping factor (x mean eigenvalue): {sweep}. The table uses "
                f"the factor fixed before the run ({results['settings']['damping_factor']:g})."
            )
        if "max_abs_difference_vs_in_house" in extra:
            sketch = extra.get("pearson_vs_exact_library_per_target_mean")
            out.append(
                f"- {row['method']}: fit {extra['fit_seconds']:.1f} s (the setup); largest difference from the "
                f"in-house Gauss-Newton scores {extra['max_abs_difference_vs_in_house']:.1e} (largest |score| "
                f"{extra['max_abs_in_house']:.1e})"
                + (f"; per-target Pearson with the exact library scores {sketch:.3f}." if sketch is not None else ".")
            )
        if extra.get("accuracy_cost_sem") is not None:
            out.append(
                f"- {row['method']}: accuracy cost of masks {row['accuracy_cost']:+.2f} ± "
                f"{extra['accuracy_cost_sem']:.2f} points (mean ± standard error of the per-seed paired differences)."
            )
        if "ensemble_prediction_accuracy" in extra:
            out.append(
                f"- {row['method']}: accuracy of the averaged ensemble prediction "
                f"{extra['ensemble_prediction_accuracy']:.3f} (the table shows the mean member)."
            )
    out.append(
        "- Accuracy cost of masks: the ordinary-dropout twin (same recipe, p, units and seeds) minus the turn-over "
        "model(s) a row scores, in points. Peers (g) score model (a), so they show its cost; run on an ordinary "
        "model they would cost nothing."
    )
    peers = []
    peers.append(
        f"Kronfluence {results['kronfluence']} (EK-FAC factors fitted on the masked training loss with sampled "
        "labels; targets on the full network; setup = fitting the factors, counted in both timing columns and "
        "once end to end)"
        if results.get("kronfluence")
        else "Kronfluence is not installed, so its row is missing (`pip install --no-deps kronfluence einops einconv opt-einsum`)"
    )
    peers.append(
        f"Captum {results['captum']} (TracInCP with per-sample gradients of the trainable layers, TracInCPFast on "
        "the last layer, both over Trainer-style checkpoint folders written with the learning rate; summed "
        "cross-entropy; Captum's self-influence is the masked training gradient against itself)"
        if results.get("captum")
        else "Captum is not installed, so its rows are missing (`pip install --no-deps captum`)"
    )
    out.append("- Peers: " + "; ".join(peers) + ".")
    for row in results["rows"]:
        extra = row["extra"]
        if "one_gc_collect_seconds" in extra:
            unfrozen = extra.get("one_gc_collect_seconds_unfrozen")
            frozen_text = (
                f" while it runs; the objects of the benchmark itself are frozen out of the collector (`gc.freeze`), "
                f"else each call would take {unfrozen:.2f} s here"
                if unfrozen is not None
                else " in this process"
            )
            out.append(
                "- Part of Kronfluence's fixed cost is its own memory release: about nine `gc.collect()` calls per "
                f"fit and scoring, {extra['one_gc_collect_seconds']:.2f} s each{frozen_text}."
            )
    env = results.get("environment", {})
    load = env.get("load_average")
    load_text = f" (load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f})" if load else ""
    cpu = results.get("cpu_seconds_process")
    cpu_text = f", {cpu:.0f} s of CPU time for the whole process (data included)" if cpu else ""
    out.append(
        f"- Whole run: {results['seconds_total']:.0f} s wall-clock on {env.get('threads', '?')} torch thread(s) of a "
        f"shared {env.get('cpu_count', '?')}-core machine{load_text}{cpu_text}; times are wall-clock and noisy. "
        "Train s = training of all the models one score matrix needs (K for an ensemble)."
    )
    return out


def environment() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average": list(load) if load else None,
    }


TITLES = {
    "head": "# Fidelity of turn-over influence (head over frozen MiniLM features)\n\n",
    "adapters": "# Fidelity of turn-over influence (bottleneck adapter in MiniLM's top layer)\n\n",
}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=("head", "adapters"), default="head", help="which model is trained")
    parser.add_argument("--quick", action="store_true", help="smoke run: N=200, 20 targets, 10 subsets")
    parser.add_argument("--subsets", type=int, help="number of ground-truth subsets (default 50)")
    parser.add_argument("--epochs", type=int, help="training epochs of every model")
    parser.add_argument("--ensembles", type=int, nargs="+", help="seed-ensemble sizes")
    parser.add_argument(
        "--channels", type=int, nargs="+",
        help="masked-channel counts (head setting: hidden-layer channels; adapters: classifier channels)",
    )
    parser.add_argument("--loo", type=int, help="examples left out one at a time (default 40)")
    parser.add_argument("--cleansing-seeds", type=int, help="retrain seeds of the cleansing test (default 5)")
    parser.add_argument(
        "--low-is-suspicious",
        action="store_true",
        help="rank low turn-over/gradient self-influence as suspicious (default: high)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run best on one)")
    parser.add_argument("--output", type=Path, help="results stem (default benchmarks/results/fidelity[_adapters][_quick])")
    parser.add_argument("--render", type=Path, help="only rewrite the Markdown of an existing results JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.render is not None:
        results = json.loads(args.render.read_text(encoding="utf-8"))
        table = markdown(results) + "\n" + "\n".join(notes(results)) + "\n"
        atomic_write_text(args.render.with_suffix(".md"), TITLES[results.get("setting", "head")] + table)
        print(table)
        return results

    head = args.setting == "head"
    settings: Any = (QUICK if args.quick else Settings()) if head else (QUICK_ADAPTERS if args.quick else AdapterSettings())
    changes = {
        k: v
        for k, v in (
            ("n_subsets", args.subsets),
            ("epochs", args.epochs),
            ("ensembles", tuple(args.ensembles) if args.ensembles else None),
            ("channels", tuple(args.channels) if args.channels else None),
            ("n_loo", args.loo),
            ("cleansing_seeds", args.cleansing_seeds),
        )
        if v is not None
    }
    if args.low_is_suspicious:
        changes["low_is_suspicious"] = True
    settings = replace(settings, **changes)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    if head:
        data = load_data(
            settings.n_train, settings.n_targets, settings.n_test, settings.noise, settings.data_seed,
            full_cache=not args.quick,
        )
        log(f"features ready in {time.perf_counter() - started:.0f}s")
        results = run_fidelity(data, settings, log)
    else:
        adapter_data = load_adapter_data(settings, full_cache=not args.quick)
        log(f"cached lower layers ready in {time.perf_counter() - started:.0f}s")
        results = run_adapter_fidelity(adapter_data, settings, log)
        results["seconds_data"] = time.perf_counter() - started - results["seconds_total"]
    results["environment"] = environment()
    results["cpu_seconds_process"] = time.process_time()  # on one thread: the wall time an idle machine would take
    table = markdown(results) + "\n" + "\n".join(notes(results)) + "\n"
    print(table)
    name = "fidelity" + ("" if head else "_adapters") + ("_quick" if args.quick else "")
    stem = args.output or RESULTS_DIR / name
    atomic_write_text(f"{stem}.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(f"{stem}.md", TITLES[args.setting] + table)
    return results


if __name__ == "__main__":
    main()
