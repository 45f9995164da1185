"""The head setting: a ``Linear(384, W) -> ReLU -> Linear(W, 2)`` head over frozen all-MiniLM-L6-v2 sentence
embeddings of Rotten Tomatoes, each training example under its own turn-over mask on the ``W`` hidden units.

Scores come from a closed form (logits are linear in the mask, so one GEMM per mask set), checked against the
library's patched head (``turnover_hf.patch_model`` + ``instance_masks``) on every model a row scores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import turnover_hf as th
from turnover_hf.evaluation import (
    HeadRecipe,
    MarginFactors,
    TrainedHead,
    TurnoverHead,
    margin_factors,
    patched_classifier,
    train_head,
)
from turnover_hf.masks import scale_of

from .core import QUICK_SIZES, CommonSettings, Setting, Training, register_setting
from .data import CACHE_DIR, corpus, load_cache, save_cache, with_flipped_labels
from .peers import library_batches

FEATURES_FILE = "minilm_mean_pooled.safetensors"


# -- frozen features ----------------------------------------------------------------------------------------------
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
    rows, fingerprint = corpus()
    path = cache_dir / FEATURES_FILE
    cached = load_cache(path, fingerprint)
    if cached is not None:
        return dict(zip(cached["example_id"].tolist(), cached["features"]))
    if needed is not None:
        chosen = [(i, t) for i, t, _ in rows if i in needed]
        return dict(zip([i for i, _ in chosen], embed_texts([t for _, t in chosen])))
    features = embed_texts([t for _, t, _ in rows])
    ids = torch.tensor([i for i, _, _ in rows], dtype=torch.int64)
    tensors = {"example_id": ids, "features": features.contiguous()}
    save_cache(path, tensors, fingerprint, model="all-MiniLM-L6-v2", pooling="mean", normalized="l2")
    return dict(zip(ids.tolist(), features))


# -- data ---------------------------------------------------------------------------------------------------------
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



# -- what the peers see -------------------------------------------------------------------------------------------
def head_factors(head: TurnoverHead, features: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None) -> MarginFactors:
    """Margin-gradient factors of every row on all head parameters, under ``masks`` (None = the full network)."""
    layers = [*head.hidden_linears(), head.out]
    return margin_factors(
        lambda rows: head(features[rows], None if masks is None else masks[rows]), len(labels), layers, labels
    )


def head_rows(features: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor) -> torch.utils.data.Dataset:
    """``(features, masks, label)`` rows: ``TurnoverHead(features, masks)`` gives the logits (Captum, Kronfluence)."""
    return torch.utils.data.TensorDataset(features, masks, labels.long())


# -- the setting --------------------------------------------------------------------------------------------------
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


QUICK = Settings(**QUICK_SIZES, channels=(16,), wide_widths=(1024,), damping_factors=(0.1, 1.0, 10.0))


def accuracy(head: TurnoverHead, split: Split) -> float:
    with torch.no_grad():
        return float((head(split.features).argmax(-1) == split.labels).float().mean())



@register_setting
class HeadSetting(Setting):
    """Rows (a)-(g) on a head over frozen features; every model retrains in well under a second."""

    name = "head"
    title = "# Fidelity of turn-over influence (head over frozen MiniLM features)\n\n"
    settings_class = Settings
    quick = QUICK
    data_label = "features"
    row_groups = ("b", "c", "d", "e", "f", "g", "loss")
    gap_key = "closed_form_gap_vs_patched_model"
    references = (("full", "L(flip) - L(full)"), ("mirror", "L(full) - L(mask)"))

    def __init__(self, data: FidelityData, settings: Settings) -> None:
        self.data = data
        self.settings = replace(settings, in_features=int(data.train.features.shape[1]))
        self.recipe = self.base = self.settings.recipe()
        self.flipped, self.targets, self.train_ids = data.flipped, data.targets, data.train.ids
        self.one_target = Split(data.targets.features[:1], data.targets.labels[:1], data.targets.ids[:1])
        self.noisy_train = Split(data.train.features, data.noisy_labels, data.train.ids)
        self.grad_dot_label = f"(g) gradient dot product (final model, W={self.settings.width})"

    @classmethod
    def load(cls, settings: Settings, full_cache: bool) -> HeadSetting:
        data = load_data(
            settings.n_train, settings.n_targets, settings.n_test, settings.noise, settings.data_seed,
            full_cache=full_cache,
        )
        return cls(data, settings)

    @staticmethod
    def describe(results: dict[str, Any]) -> str:
        s = results["settings"]
        return (
            f"Head {s['in_features']} -> W -> 2 on frozen MiniLM embeddings, {s['epochs']} epochs of Adam (lr "
            f"{s['lr']:g}, batch {s['batch_size']}). "
        )

    def label(self, variant: HeadRecipe) -> str:
        return f"W={variant.width}"

    def wider(self) -> list[tuple[HeadRecipe, str]]:
        # K channels of W units (row (f)) are a reparametrised layer of K * W units
        return [(self.settings.recipe(width=w), f"(c) turn-over, wider layer W={w}") for w in self.settings.wide_widths]

    def channel_rows(self) -> list[tuple[HeadRecipe, str, str]]:
        rows = []
        for k in self.settings.channels:
            name = f"(f) {k} masked channels x W={self.settings.width}"
            multi = self.settings.recipe(channels=k)
            rows += [
                (multi, f"{name}, all channels flipped", "mask"),
                (multi, f"{name}, one channel flipped at a time, mean", "channel"),
            ]
        return rows

    def train(self, variant: HeadRecipe, seed: int, how: Training) -> TrainedHead:
        train = self.data.train
        features, labels, ids = train.features, self.data.noisy_labels if how.noisy else train.labels, train.ids
        if how.rows is not None:
            rows = torch.as_tensor(how.rows)
            features, labels, ids = features[rows], labels[rows], ids[rows]
        return train_head(
            features, labels, ids, variant.replace(masking="dropout") if how.plain else variant, init_seed=seed,
            mask_seed=seed, checkpoint_epochs=how.checkpoint_epochs,
            exclude=None if how.exclude is None else torch.as_tensor(np.asarray(how.exclude)),
        )

    def scores(self, variant: HeadRecipe, model: TrainedHead, part: Split, how: str = "mask") -> torch.Tensor:
        """``how``: a reference of :func:`turnover_scores`, or ``"channel"`` (:func:`channel_flip_scores`)."""
        if how == "channel":
            return channel_flip_scores(model, self.train_ids, part)
        return turnover_scores(model, self.train_ids, part, how)

    def self_scores(self, variant: HeadRecipe, model: TrainedHead, how: str = "mask") -> torch.Tensor:
        if how == "channel":
            return self_channel_flips(model, self.noisy_train, self.data.noisy_labels)
        return self_turnover(model, self.noisy_train, self.data.noisy_labels, how)

    def check(self, variant: HeadRecipe, model: TrainedHead) -> float:
        return check_closed_form(model, self.data.train, self.targets)

    def accuracy(self, variant: HeadRecipe, model: TrainedHead) -> float:
        return accuracy(model.head, self.data.test)

    def target_losses(self, model: TrainedHead) -> np.ndarray:
        return model.head.losses(self.targets.features, self.targets.labels).numpy()

    def training_losses(self, model: TrainedHead) -> torch.Tensor:
        with torch.no_grad():
            return model.head.losses(self.data.train.features, self.data.noisy_labels)

    def mask_bits(self, model: TrainedHead) -> np.ndarray:
        return (model.masks(self.train_ids).flatten(1) > 0).double().numpy()  # (N, K * W) keep bits

    def ensemble_extra(self, models: Sequence[TrainedHead]) -> dict[str, Any]:
        test = self.data.test
        with torch.no_grad():
            votes = torch.stack([torch.softmax(m.head(test.features), -1) for m in models]).mean(0)
        return {"ensemble_prediction_accuracy": float((votes.argmax(-1) == test.labels).float().mean())}

    def peer_hooks(self, model_a: TrainedHead) -> dict[str, Any]:
        train, noisy = self.data.train, self.data.noisy_labels

        def head_at(model: TrainedHead, checkpoint: Any) -> TurnoverHead:
            return model.head if checkpoint is None else model.head_at(checkpoint)

        ones = (self.base.channels, self.base.width)  # targets run on the full network: masks of ones
        return {
            "train_factors": lambda m, c, is_noisy, masked: head_factors(
                head_at(m, c), train.features, noisy if is_noisy else train.labels,
                m.masks(train.ids) if masked else None,
            ),
            "target_factors": lambda m, c, part: head_factors(head_at(m, c), part.features, part.labels, None),
            "module": lambda m: contextlib.nullcontext(m.head),
            "train_rows": lambda m, is_noisy: head_rows(
                train.features, m.masks(train.ids), noisy if is_noisy else train.labels
            ),
            "target_rows": lambda part: head_rows(part.features, torch.ones(len(part), *ones), part.labels),
            "captum_layers": ["hidden", "out"],
            "captum_layers_label": "all head layers",
            "final_layer": "out",
            "kronfluence_tracked": None,
            "library_model": lambda m: contextlib.nullcontext(patched_classifier(m.head, m.mask_seed).eval()),
            "library_batches": lambda m, is_noisy: library_batches(
                {"features": train.features}, noisy if is_noisy else train.labels, train.ids
            ),
            "library_targets": lambda part: {"features": part.features, "labels": part.labels},
        }
