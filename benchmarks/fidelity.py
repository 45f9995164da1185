"""Fidelity of turn-over influence on a head over frozen features: retraining ground truth, variants and peers.

Setting: all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised; computed once and cached in
``benchmarks/results/cache``) of Rotten Tomatoes snippets (``turnover_hf.assets.rotten_tomatoes``); a head
``Linear(384, W) -> ReLU -> Linear(W, 2)`` trained for 10 epochs with Adam (lr 1e-3, batch 64), each training
example under its own turn-over mask on the ``W`` hidden units. Masks are the library's
(``turnover_hf.masks.mask_for`` keyed by example id and the layer key ``"head.hidden"``); the run checks that the
patched head (``turnover_hf.patch_model``) gives the same scores as the closed form used here.

Measured for every method, in one table:

* LDS: Spearman, per validation target, between the loss predicted for a model trained on a random half of the
  training set (``const - sum of the included examples' scores``) and the loss of a head actually retrained on
  that half (turn-over recipe, weights / order / mask seeds no scored model used), averaged over targets.
  ``LDS 2-seed GT`` uses the mean loss of two such retrainings per subset (less ground-truth noise).
* seed agreement: per-target Spearman between the scores of two independent runs of the method (other init
  and mask seeds), averaged over targets.
* mislabel AUC and recall@10 %: 10 % of the training labels flipped, methods rerun on that data, examples ranked
  by self-influence (high = suspicious, see ``--low-is-suspicious``) or training loss.
* accuracy of the deployed full network on the test split; seconds to train the models a method needs; seconds
  for the self-influence of all N training examples and for one target against all N (from a trained model).

Methods: (a) single-model turn-over; (b) seed ensembles of K models; (c) wider masked layers; (d) residuals of a
per-target least-squares fit of the scores on the examples' centred mask bits; (e) the full network as the
reference instead of the example's own mask (``L(flip) - L(full)``) and its mirror (``L(full) - L(mask)``);
(f) K parallel masked channels in one model (layer keys ``head.hidden.{k}``, channel outputs averaged before the
output layer), scored by flipping all channels at once or one channel at a time (averaged); (g) peers computed
exactly on the same head: gradient dot product, TracIn over checkpoints, a damped Gauss-Newton influence
function (exact, through the N x N kernel of per-example gradients), Kronfluence's EK-FAC influence when
``kronfluence`` is installed (optional), and the training loss for mislabels.

Run from the repository root:

    PYTHONPATH=. python benchmarks/fidelity.py            # default: N=2000, 200 targets, 50 subsets (~10-15 min)
    PYTHONPATH=. python benchmarks/fidelity.py --quick    # smoke run: N=200, 20 targets, 10 subsets (< 1 min)

The first default run embeds the corpus (about 3 minutes on 2 cores) and caches it; the quick run embeds only
its own rows when there is no cache.

It prints a Markdown table and writes ``benchmarks/results/fidelity{,_quick}.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.nn.functional as F

import turnover_hf as th
from turnover_hf.evaluation import (
    HeadRecipe,
    TrainedHead,
    TurnoverHead,
    explained_variance,
    lds,
    linear_residuals,
    mislabel_detection,
    patched_classifier,
    random_subsets,
    seed_agreement,
    spearman_columns,
    subset_target_losses,
    train_head,
)
from turnover_hf.files import atomic_path, atomic_write_text
from turnover_hf.masks import scale_of

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CACHE_DIR = RESULTS_DIR / "cache"
FEATURES_FILE = "minilm_mean_pooled.safetensors"
GROUND_TRUTH_SEED = 10_000  # retraining seeds start here; scored models use seeds below it
REPLICATE_SEED = 20_000


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
@dataclass
class GradientFactors:
    """What the per-example gradient of the logit margin ``z0 - z1`` of a binary head is built from.

    For ``logits = V @ mean_k(m_k * relu(W1_k x + b1_k)) + c`` the margin gradient ``j`` has the blocks
    ``(hbar, -hbar)`` for ``V``, ``(1, -1)`` for ``c``, ``delta`` for ``b1`` and ``delta x^T`` for ``W1``, so
    ``j_a . j_b = 2 hbar_a.hbar_b + 2 + (delta_a.delta_b)(1 + x_a.x_b)``. The loss gradient is ``(p0 - y0) j``.
    """

    hbar: torch.Tensor  # (B, W)
    delta: torch.Tensor  # (B, K*W)
    x: torch.Tensor  # (B, d)
    residual: torch.Tensor  # (B,) p0 - y0: the loss gradient is residual * j
    curvature: torch.Tensor  # (B,) p0 * p1: the Gauss-Newton weight of the margin


@torch.no_grad()
def gradient_factors(
    head: TurnoverHead, features: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None
) -> GradientFactors:
    """Margin-gradient factors of each row under ``masks`` ``(B, K, W)`` (None = the full network)."""
    if head.recipe.num_labels != 2:
        raise ValueError("the gradient kernel here is written for binary heads.")
    pre = torch.stack([layer(features) for layer in head.hidden_linears()], dim=1)  # (B, K, W)
    keep = torch.ones_like(pre) if masks is None else masks
    hidden = F.relu(pre) * keep
    hbar = hidden.mean(dim=1)
    margin_weight = (head.out.weight[0] - head.out.weight[1]) / pre.shape[1]  # d margin / d hidden[k, u]
    delta = (margin_weight * keep * (pre > 0)).flatten(1)
    probs = torch.softmax(head.out(hbar), dim=-1)
    residual = probs[:, 0] - (labels == 0).to(probs.dtype)
    return GradientFactors(hbar, delta, features, residual, probs[:, 0] * probs[:, 1])


def margin_kernel(a: GradientFactors, b: GradientFactors) -> torch.Tensor:
    """``(len(a), len(b))`` inner products of margin gradients over all head parameters, float64."""
    hbar = a.hbar.double() @ b.hbar.double().T
    delta = a.delta.double() @ b.delta.double().T
    xx = a.x.double() @ b.x.double().T
    return 2.0 * hbar + 2.0 + delta * (1.0 + xx)


def paired_margin_kernel(a: GradientFactors, b: GradientFactors) -> torch.Tensor:
    """The diagonal of :func:`margin_kernel` for row-aligned ``a`` and ``b``: ``j_a[i] . j_b[i]``, ``(B,)``."""
    hbar = (a.hbar.double() * b.hbar.double()).sum(1)
    delta = (a.delta.double() * b.delta.double()).sum(1)
    xx = (a.x.double() * b.x.double()).sum(1)
    return 2.0 * hbar + 2.0 + delta * (1.0 + xx)


def _train_and_target_factors(
    head: TurnoverHead, trained: TrainedHead, train: Split, labels: torch.Tensor, targets: Split
) -> tuple[GradientFactors, GradientFactors]:
    # Training examples enter the objective under their own masks; targets are predicted by the full network.
    return (
        gradient_factors(head, train.features, labels, trained.masks(train.ids)),
        gradient_factors(head, targets.features, targets.labels, None),
    )


def gradient_dot_scores(
    head: TurnoverHead, trained: TrainedHead, train: Split, labels: torch.Tensor, targets: Split
) -> torch.Tensor:
    """``grad L(target) . grad L(z)``, ``(N, T)``: the first-order drop of the target loss from a step on z."""
    tr, tg = _train_and_target_factors(head, trained, train, labels, targets)
    return (tr.residual.double()[:, None] * margin_kernel(tr, tg) * tg.residual.double()[None, :]).float()


def gradient_dot_self(head: TurnoverHead, trained: TrainedHead, train: Split, labels: torch.Tensor) -> torch.Tensor:
    """Self-influence version: each example's masked training gradient against its full-network loss gradient."""
    tr = gradient_factors(head, train.features, labels, trained.masks(train.ids))
    full = gradient_factors(head, train.features, labels, None)
    return (tr.residual.double() * full.residual.double() * paired_margin_kernel(tr, full)).float()


def tracin_scores(trained: TrainedHead, train: Split, labels: torch.Tensor, targets: Split) -> torch.Tensor:
    """TracInCP: gradient dot products summed over the training checkpoints, each weighted by its learning rate."""
    total = None
    for checkpoint in trained.checkpoints:
        part = checkpoint.lr * gradient_dot_scores(trained.head_at(checkpoint), trained, train, labels, targets)
        total = part if total is None else total + part
    return total


def tracin_self(trained: TrainedHead, train: Split, labels: torch.Tensor) -> torch.Tensor:
    return sum(c.lr * gradient_dot_self(trained.head_at(c), trained, train, labels) for c in trained.checkpoints)


def damping_of(tr: GradientFactors, n_params: int, factor: float) -> float:
    """Damping ``factor * trace(G) / n_params``: a multiple of the mean eigenvalue of the Gauss-Newton matrix G."""
    return float(factor * (tr.curvature.double() * paired_margin_kernel(tr, tr)).mean() / n_params)


def influence_function_scores(
    head: TurnoverHead,
    trained: TrainedHead,
    train: Split,
    labels: torch.Tensor,
    targets: Split | None,
    damping_factor: float,
) -> torch.Tensor:
    """Exact damped Gauss-Newton influence ``grad L(t)^T (G + lambda I)^-1 grad L(z) / N`` on all head parameters.

    ``G = (1/N) sum_z p0 p1 j_z j_z^T`` over the training examples (under their masks). With ``U`` the rows
    ``sqrt(p0 p1 / N) j_z``, Woodbury gives ``(G + lambda I)^-1 = (I - U^T (lambda I + U U^T)^-1 U) / lambda``,
    so everything comes from the N x N kernel of margin gradients. ``targets=None`` returns self-influence ``(N,)``.
    """
    tr = gradient_factors(head, train.features, labels, trained.masks(train.ids))
    n = len(labels)
    n_params = sum(p.numel() for p in head.parameters())
    damping = damping_of(tr, n_params, damping_factor)
    k_train = margin_kernel(tr, tr)
    weight = (tr.curvature.double() / n).sqrt()
    system = damping * torch.eye(n, dtype=torch.float64) + weight[:, None] * k_train * weight[None, :]
    if targets is None:
        full = gradient_factors(head, train.features, labels, None)
        cross = margin_kernel(tr, full)  # rows: training gradients, columns: the same examples as targets
        target_residual = full.residual.double()
    else:
        tg = gradient_factors(head, targets.features, targets.labels, None)
        cross = margin_kernel(tr, tg)
        target_residual = tg.residual.double()
    solved = torch.linalg.solve(system, weight[:, None] * cross)  # (lambda I + U U^T)^-1 U j_t
    inner = (cross - k_train @ (weight[:, None] * solved)) / damping
    scores = tr.residual.double()[:, None] * inner * target_residual[None, :] / n
    return (scores.diagonal() if targets is None else scores).float()


# -- optional peer: Kronfluence's EK-FAC influence on the same head ---------------------------------------------------
def kronfluence_version() -> str | None:
    """Kronfluence's version, or None if it does not import.

    It is optional: ``pip install --no-deps kronfluence einops einconv opt-einsum`` adds it without touching torch.
    """
    try:
        from kronfluence.version import __version__
    except ImportError:
        return None
    return str(__version__)


def kronfluence_available() -> bool:
    return kronfluence_version() is not None


class _MaskedRows(torch.utils.data.Dataset):
    """(features, label, masks) rows: training rows carry their instance masks, targets masks of ones (full net)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor) -> None:
        self.features, self.labels, self.masks = features, labels, masks

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.features[index], self.labels[index], self.masks[index]


def kronfluence_scores(trained: TrainedHead, train: Split, labels: torch.Tensor, targets: Split | None) -> torch.Tensor:
    """EK-FAC influence from Kronfluence on the head's Linear layers, ``(N, T)`` or self-influence ``(N,)``.

    The training loss is the masked one the head was trained on; targets are measured on the full network.
    Damping is Kronfluence's heuristic, 0.1 x the mean eigenvalue (the rule of the exact Gauss-Newton row).
    Positive scores mean the example lowers the target loss, as everywhere in this benchmark.
    """
    import copy
    import logging
    import tempfile
    import warnings

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class HeadTask(Task):
        def compute_train_loss(self, batch, model, sample: bool = False) -> torch.Tensor:
            features, targets_, masks = batch
            logits = model(features, masks)
            if sample:
                with torch.no_grad():
                    targets_ = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, targets_, reduction="sum")

        def compute_measurement(self, batch, model) -> torch.Tensor:
            features, targets_, masks = batch
            return F.cross_entropy(model(features, masks), targets_, reduction="sum")

    # Kronfluence warns about torch's deprecated GradScaler spelling on every call; nothing to act on here.
    warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")
    recipe = trained.recipe
    train_rows = _MaskedRows(train.features, labels, trained.masks(train.ids))
    task = HeadTask()
    model = prepare_model(copy.deepcopy(trained.head).eval(), task)
    with tempfile.TemporaryDirectory() as folder:
        analyzer = Analyzer(
            "fidelity", model, task, cpu=True, disable_tqdm=True, output_dir=folder, log_level=logging.WARNING
        )
        analyzer.fit_all_factors(
            "ekfac",
            dataset=train_rows,
            per_device_batch_size=256,
            factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
        score_args = ScoreArguments(damping_factor=None)
        if targets is None:
            analyzer.compute_self_scores(
                "self",
                "ekfac",
                train_dataset=train_rows,
                per_device_train_batch_size=256,
                score_args=score_args,
                overwrite_output_dir=True,
            )
            return analyzer.load_self_scores("self")["all_modules"].float()
        ones = torch.ones(len(targets), recipe.channels, recipe.width)
        analyzer.compute_pairwise_scores(
            "pairs",
            "ekfac",
            query_dataset=_MaskedRows(targets.features, targets.labels, ones),
            train_dataset=train_rows,
            per_device_query_batch_size=64,
            per_device_train_batch_size=256,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        return analyzer.load_pairwise_scores("pairs")["all_modules"].T.float()


# -- experiment -----------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Sizes and recipes of one benchmark run."""

    n_train: int = 2000
    in_features: int = 384
    n_targets: int = 200
    n_test: int | None = None
    n_subsets: int = 50
    noise: float = 0.10
    data_seed: int = 0
    width: int = 128
    wide_widths: tuple[int, ...] = (1024, 4096)
    ensembles: tuple[int, ...] = (4, 16, 64)
    channels: tuple[int, ...] = (16, 32)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    tracin_checkpoints: int = 4
    damping_factors: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
    damping_factor: float = 0.1
    low_is_suspicious: bool = False

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
)


@dataclass
class Row:
    """One method's line of the results table (None = not applicable)."""

    method: str
    lds: float | None = None
    lds_2seed: float | None = None
    agreement: float | None = None
    agreement_overall: float | None = None
    mislabel_auc: float | None = None
    recall_at_10: float | None = None
    accuracy: float | None = None
    train_seconds: float | None = None
    self_seconds: float | None = None
    target_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and its wall-clock seconds."""
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


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


def accuracy(head: TurnoverHead, split: Split) -> float:
    with torch.no_grad():
        return float((head(split.features).argmax(-1) == split.labels).float().mean())


def run_fidelity(data: FidelityData, settings: Settings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train everything, score everything, and return the rows plus diagnostics as a JSON-ready dict."""
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

    # Ground truth: heads retrained on random halves with seeds no scored model uses, twice per subset.
    log(f"ground truth: {settings.n_subsets} subsets x 2 retrainings ...")
    subsets = random_subsets(len(train), settings.n_subsets, seed=settings.data_seed + 7)
    gt_args = (train.features, train.labels, train.ids, subsets, targets.features, targets.labels, base)
    gt, gt_seconds = timed(
        lambda: subset_target_losses(*gt_args, seeds=range(GROUND_TRUTH_SEED, GROUND_TRUTH_SEED + len(subsets)))
    )
    gt_rep = subset_target_losses(*gt_args, seeds=range(REPLICATE_SEED, REPLICATE_SEED + len(subsets)))
    gt_mean = (gt + gt_rep) / 2
    reliability = float(np.nanmean(spearman_columns(gt, gt_rep)))
    log(f"  done in {gt_seconds:.0f}s per set; ground-truth split-half reliability {reliability:.3f}")

    def fidelity(row: Row, score_a: torch.Tensor, score_b: torch.Tensor) -> Row:
        """LDS of run A's scores; agreement of runs A and B (other init and mask seeds)."""
        row.lds = lds(score_a, subsets, gt)
        row.lds_2seed = lds(score_a, subsets, gt_mean)
        agreement = seed_agreement(score_a, score_b)
        row.agreement, row.agreement_overall = agreement["per_target"], agreement["overall"]
        return row

    def mislabels(row: Row, suspicion: torch.Tensor, low_is_suspicious: bool | None = None) -> Row:
        low = settings.low_is_suspicious if low_is_suspicious is None else low_is_suspicious
        found = mislabel_detection(suspicion, data.flipped, low_is_suspicious=low)
        row.mislabel_auc, row.recall_at_10 = found["auc"], found["recall@10%"]
        row.extra["mislabel"] = found
        return row

    def on_model_a(row: Row) -> None:
        """Rows that score model (a) share its accuracy and training time."""
        row.accuracy, row.train_seconds = row_a.accuracy, row_a.train_seconds

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
    row.extra["closed_form_gap_vs_patched_model"] = gap
    # The direction of self-influence for mislabels, both ways, so the choice is visible.
    row.extra["mislabel_low_is_suspicious"] = mislabel_detection(self_a, data.flipped, low_is_suspicious=True)
    row.extra["mislabel_high_is_suspicious"] = mislabel_detection(self_a, data.flipped, low_is_suspicious=False)
    rows.append(mislabels(row, self_a))

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
        row.accuracy = float(np.mean([accuracy(m.head, data.test) for m in first]))
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
        rows.append(mislabels(row, self_ens))

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
        rows.append(mislabels(row, self_wide))

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
    row.extra["lds_of_fitted_part"] = lds(scores_a.double().numpy() - res_a, subsets, gt)
    self_res, row.self_seconds = timed(lambda: linear_residuals(self_a, bits(noisy_a))[:, 0])
    row.self_seconds += row_a.self_seconds
    _, row.target_seconds = timed(linear_residuals, scores_a[:, :1], bits(model_a))
    row.target_seconds += row_a.target_seconds
    on_model_a(row)
    rows.append(mislabels(row, torch.from_numpy(self_res)))

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
        rows.append(mislabels(row, self_e))

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
            rows.append(mislabels(row, self_f))

    # (g) peers on the same head as (a).
    log("(g) peers: gradient dot, TracIn, Gauss-Newton influence ...")
    row = fidelity(
        Row(f"(g) gradient dot product (final model, W={settings.width})"),
        gradient_dot_scores(model_a.head, model_a, train, train.labels, targets),
        gradient_dot_scores(model_b.head, model_b, train, train.labels, targets),
    )
    self_g, row.self_seconds = timed(gradient_dot_self, noisy_a.head, noisy_a, noisy_train, noisy)
    _, row.target_seconds = timed(gradient_dot_scores, model_a.head, model_a, train, train.labels, one_target)
    on_model_a(row)
    rows.append(mislabels(row, self_g))

    row = fidelity(
        Row(f"(g) TracInCP, {len(ckpt_epochs)} checkpoints (epochs {', '.join(map(str, ckpt_epochs))})"),
        tracin_scores(model_a, train, train.labels, targets),
        tracin_scores(model_b, train, train.labels, targets),
    )
    self_t, row.self_seconds = timed(tracin_self, noisy_a, noisy_train, noisy)
    _, row.target_seconds = timed(tracin_scores, model_a, train, train.labels, one_target)
    on_model_a(row)
    rows.append(mislabels(row, self_t))

    factor = settings.damping_factor
    by_factor = {
        f: influence_function_scores(model_a.head, model_a, train, train.labels, targets, f)
        for f in sorted(set(settings.damping_factors) | {factor})
    }
    row = fidelity(
        Row(f"(g) Gauss-Newton influence, damping {factor:g} x mean eigenvalue"),
        by_factor[factor],
        influence_function_scores(model_b.head, model_b, train, train.labels, targets, factor),
    )
    self_if, row.self_seconds = timed(
        influence_function_scores, noisy_a.head, noisy_a, noisy_train, noisy, None, factor
    )
    _, row.target_seconds = timed(
        influence_function_scores, model_a.head, model_a, train, train.labels, one_target, factor
    )
    on_model_a(row)
    row.extra["lds_by_damping_factor"] = {str(f): lds(scores, subsets, gt) for f, scores in by_factor.items()}
    rows.append(mislabels(row, self_if))

    if kronfluence_available():
        log("(g) Kronfluence EK-FAC ...")
        row = fidelity(
            Row("(g) Kronfluence EK-FAC influence, damping 0.1 x mean eigenvalue"),
            kronfluence_scores(model_a, train, train.labels, targets),
            kronfluence_scores(model_b, train, train.labels, targets),
        )
        self_k, row.self_seconds = timed(kronfluence_scores, noisy_a, noisy_train, noisy, None)
        _, row.target_seconds = timed(kronfluence_scores, model_a, train, train.labels, one_target)
        on_model_a(row)
        rows.append(mislabels(row, self_k))
    else:
        log("(g) Kronfluence is not installed: its row is skipped.")

    row = Row("(g) training loss (mislabels only)")
    with torch.no_grad():
        loss_noisy, row.self_seconds = timed(noisy_a.head.losses, train.features, noisy)
    row.accuracy = row_a.accuracy
    rows.append(mislabels(row, loss_noisy, low_is_suspicious=False))

    return {
        "settings": asdict(settings),
        "ground_truth": {
            "subsets": len(subsets),
            "subset_size": int(subsets[0].sum()),
            "recipe": asdict(base),
            "seeds": f"{GROUND_TRUTH_SEED}+s and {REPLICATE_SEED}+s (weights, batch order and masks)",
            "split_half_reliability": reliability,
            "seconds_per_set": gt_seconds,
        },
        "tracin_checkpoint_epochs": ckpt_epochs,
        "kronfluence": kronfluence_version(),
        "rows": [asdict(r) for r in rows],
        "seconds_total": time.perf_counter() - started,
    }


# -- report ---------------------------------------------------------------------------------------------------------
COLUMNS = (
    ("method", "method"),
    ("lds", "LDS"),
    ("lds_2seed", "LDS 2-seed GT"),
    ("agreement", "seed agreement"),
    ("mislabel_auc", "mislabel AUC"),
    ("recall_at_10", "recall@10%"),
    ("accuracy", "test acc."),
    ("train_seconds", "train s"),
    ("self_seconds", "self-infl. s (all N)"),
    ("target_seconds", "1 target s (all N)"),
)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if key == "method":
        return str(value)
    if key.endswith("seconds"):
        return f"{value:.3f}" if value < 10 else f"{value:.0f}"
    return f"{value:.3f}"


def markdown(results: dict[str, Any]) -> str:
    s, gt = results["settings"], results["ground_truth"]
    lines = [
        (
            f"N={s['n_train']} training examples, {s['n_targets']} validation targets, {gt['subsets']} half-size "
            f"subsets (ground-truth split-half reliability {gt['split_half_reliability']:.3f}); head "
            f"{s['in_features']} -> W -> 2, {s['epochs']} epochs of Adam (lr {s['lr']:g}, batch {s['batch_size']}); {s['noise']:.0%} labels flipped "
            f"for mislabel detection ({'low' if s['low_is_suspicious'] else 'high'} self-influence = suspicious; "
            "high loss for the training-loss row)."
        ),
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "|".join("---" if key == "method" else "---:" for key, _ in COLUMNS) + "|",
    ]
    for row in results["rows"]:
        lines.append("| " + " | ".join(_cell(key, row[key]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def notes(results: dict[str, Any]) -> list[str]:
    """Diagnostics that back the reading of the table, as Markdown bullet points."""
    gt, first = results["ground_truth"], results["rows"][0]
    out = [
        (
            f"- Ground truth: {gt['subsets']} random subsets of {gt['subset_size']} examples, each retrained twice "
            f"(seeds {gt['seeds']}). Split-half reliability (per-target Spearman between the two retrainings, mean): "
            f"{gt['split_half_reliability']:.3f}, so even an exact predictor of the expected loss would score well "
            "below 1 against one retraining."
        ),
        (
            f"- Closed-form turn-over scores vs. the patched head (`turnover_hf.patch_model` + `instance_masks`, one "
            f"forward per row): max gap {first['extra']['closed_form_gap_vs_patched_model']:.1e}."
        ),
        (
            "- Mislabel direction, single model: AUC "
            f"{first['extra']['mislabel_high_is_suspicious']['auc']:.3f} ranking high self-influence first, "
            f"{first['extra']['mislabel_low_is_suspicious']['auc']:.3f} ranking low self-influence first."
        ),
    ]
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
        if "ensemble_prediction_accuracy" in extra:
            out.append(
                f"- {row['method']}: accuracy of the averaged ensemble prediction "
                f"{extra['ensemble_prediction_accuracy']:.3f} (the table shows the mean member)."
            )
    if results.get("kronfluence") is None:
        out.append(
            "- Kronfluence is not installed, so its row is missing (`pip install --no-deps kronfluence einops "
            "einconv opt-einsum` adds it without replacing torch). Captum was not tried: its TracInCP would "
            "repeat the in-house TracIn row."
        )
    else:
        out.append(
            f"- Kronfluence {results['kronfluence']} (EK-FAC factors fitted on the masked training loss with "
            "sampled labels; targets measured on the full network). Captum was not tried: its TracInCP "
            "would repeat the in-house TracIn row."
        )
    env = results.get("environment", {})
    out.append(
        f"- Whole run: {results['seconds_total']:.0f} s on {env.get('threads', '?')} torch thread(s) of a shared "
        f"{env.get('cpu_count', '?')}-core machine; times are wall-clock and noisy. Train s = training of "
        "all the models one score matrix needs (K for an ensemble)."
    )
    return out


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: N=200, 20 targets, 10 subsets (< 3 min)")
    parser.add_argument("--subsets", type=int, help="number of ground-truth subsets (default 50)")
    parser.add_argument("--epochs", type=int, help="training epochs of every head (default 10)")
    parser.add_argument("--ensembles", type=int, nargs="+", help="seed-ensemble sizes (default 4 16 64)")
    parser.add_argument("--channels", type=int, nargs="+", help="masked-channel counts (default 16 32)")
    parser.add_argument(
        "--low-is-suspicious",
        action="store_true",
        help="rank low turn-over/gradient self-influence as suspicious (default: high)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run best on one)")
    parser.add_argument("--output", type=Path, help="results stem (default benchmarks/results/fidelity[_quick])")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    settings = QUICK if args.quick else Settings()
    changes = {
        k: v
        for k, v in (
            ("n_subsets", args.subsets),
            ("epochs", args.epochs),
            ("ensembles", tuple(args.ensembles) if args.ensembles else None),
            ("channels", tuple(args.channels) if args.channels else None),
        )
        if v is not None
    }
    if args.low_is_suspicious:
        changes["low_is_suspicious"] = True
    settings = replace(settings, **changes)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    data = load_data(
        settings.n_train,
        settings.n_targets,
        settings.n_test,
        settings.noise,
        settings.data_seed,
        full_cache=not args.quick,
    )
    log(f"features ready in {time.perf_counter() - started:.0f}s")
    results = run_fidelity(data, settings, log)
    results["environment"] = environment()
    table = markdown(results) + "\n" + "\n".join(notes(results)) + "\n"
    print(table)
    stem = args.output or RESULTS_DIR / ("fidelity_quick" if args.quick else "fidelity")
    atomic_write_text(f"{stem}.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(f"{stem}.md", "# Fidelity of turn-over influence (head over frozen MiniLM features)\n\n" + table)
    return results


if __name__ == "__main__":
    main()
