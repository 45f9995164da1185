"""The adapter setting: all-MiniLM-L6-v2 as ``BertForSequenceClassification`` with a bottleneck adapter in its top
layer (the ``adapters`` library's ``SeqBnConfig``, as ``turnover_hf.demo`` sets it up), patched with
``turnover_hf.patch_model``.

Everything below the adapter is frozen and mask-free, so its output is computed once and cached
(``turnover_hf.evaluation.cached``); the adapter, the layer's LayerNorm, the pooler and the classifier then run with
the model's own modules, exactly (checked against ``turnover_hf.TurnoverScorer`` on the full model), and retraining
a model takes about a second.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import turnover_hf as th
from turnover_hf import evaluation as ev

from .core import QUICK_SIZES, CommonSettings, Setting, Training, register_setting, timed
from .data import CACHE_DIR, corpus, load_cache, save_cache, with_flipped_labels
from .peers import library_batches

Variant = int | tuple[int, int]  # adapter setting: a reduction factor, or (reduction factor, classifier channels)
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

    def recipe(self, **changes: Any) -> ev.TopRecipe:
        return replace(ev.TopRecipe(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr), **changes)


QUICK_ADAPTERS = AdapterSettings(**QUICK_SIZES, wide_reduction_factors=(1,), channels=(4,))


@dataclass
class AdapterData:
    """Cached cut inputs of every split, and how to get a patched model (and its top) for an adapter size."""

    train: ev.TopInputs
    noisy_labels: torch.Tensor
    flipped: np.ndarray
    targets: ev.TopInputs
    test: ev.TopInputs
    # (reduction factor, classifier mask channels) -> patched full model (adapter in the top layer)
    build_model: Callable[[int, int], nn.Module]
    train_batches: list[dict[str, torch.Tensor]] = field(default_factory=list)  # tokenized, for library timing
    target_batch: dict[str, torch.Tensor] | None = None  # tokenized first targets, for the exactness check
    _models: dict[tuple[int, int], tuple[nn.Module, ev.TopModel]] = field(default_factory=dict)

    def model_and_top(self, variant: Variant) -> tuple[nn.Module, ev.TopModel]:
        """The model of a variant: a reduction factor, or (reduction factor, classifier mask channels)."""
        key = variant if isinstance(variant, tuple) else (variant, 1)
        if key not in self._models:
            model = self.build_model(*key)
            self._models[key] = (model, ev.TopModel(model))
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


def _top_cache(model: nn.Module, rows: list[tuple[int, str, int]], tokenizer: Any, max_length: int, batch_size: int = 64) -> ev.TopInputs:
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

    cache = ev.cache_top_inputs(model, batches())
    inverse = torch.empty(len(order), dtype=torch.int64)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return cache.select(inverse)


def load_adapter_data(settings: AdapterSettings, full_cache: bool, cache_dir: Path = CACHE_DIR) -> AdapterData:
    """Rotten Tomatoes through frozen MiniLM up to the top layer's adapter, cached on disk for the whole corpus."""
    from transformers import AutoTokenizer

    data = th.assets.rotten_tomatoes(
        seed=settings.data_seed, n_train=settings.n_train, n_validation=settings.n_targets, n_test=settings.n_test
    )
    tokenizer = AutoTokenizer.from_pretrained(th.assets.minilm_path())
    model = build_adapter_model(settings.reduction_factor)
    everything, fingerprint = corpus()
    path = cache_dir / TOP_CACHE_FILE.format(max_length=settings.max_length)
    stored = load_cache(path, fingerprint)
    if stored is not None:
        cache = ev.TopInputs(stored["hidden"], stored["residual"], stored["labels"], stored["example_ids"])
    else:
        needed = {int(i) for split in data.values() for i in split["example_id"]}
        rows = everything if full_cache else [r for r in everything if r[0] in needed]
        cache = _top_cache(model, rows, tokenizer, settings.max_length)
        if full_cache:
            tensors = {
                "hidden": cache.hidden.contiguous(),
                "residual": cache.residual.contiguous(),
                "labels": cache.labels,
                "example_ids": cache.example_ids,
            }
            save_cache(path, tensors, fingerprint, model="all-MiniLM-L6-v2", cut="top layer output adapter")
    by_id = {int(i): r for r, i in enumerate(cache.example_ids.tolist())}

    def split(name: str) -> ev.TopInputs:
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
    out._models[(settings.reduction_factor, 1)] = (model, ev.TopModel(model))
    return out


def adapter_units(top: ev.TopModel) -> int:
    """Bottleneck width of the top layer's adapter."""
    return next(m.out_features for name, m in top.named_modules() if name.endswith("adapter_down.0"))


def top_layer_names(top: ev.TopModel) -> list[str]:
    """Names of the Linear modules holding the trainable parameters (adapter down / up, classifier)."""
    return sorted({name.rpartition(".")[0] for name in top.trainable()})


def top_factors(top: ev.TopModel, part: ev.TopInputs, masked: bool) -> ev.MarginFactors:
    """Margin-gradient factors of every row on the trainable parameters (own masks, or the full network)."""
    modules = dict(top.named_modules())
    layers = [modules[name] for name in top_layer_names(top)]

    def forward(rows: torch.Tensor) -> torch.Tensor:
        ids = part.example_ids[rows] if masked else None
        return top(part.hidden[rows], part.residual[rows], ids)

    return ev.margin_factors(forward, len(part), layers, part.labels.long())


def top_rows(part: ev.TopInputs, masked: bool) -> torch.utils.data.Dataset:
    """``(hidden, residual, example_ids, label)`` rows; ids of -1 run the full network (targets)."""
    ids = part.example_ids if masked else torch.full((len(part),), -1, dtype=torch.int64)
    return torch.utils.data.TensorDataset(part.hidden, part.residual, ids, part.labels.long())


def check_top_exact(data: AdapterData, reduction: Variant, trained: ev.TrainedTop, n_ids: int = 4) -> float:
    """Largest gap between the cached top's scores and ``turnover_hf.TurnoverScorer`` (batched) on the full model."""
    if data.target_batch is None:
        return float("nan")
    model, top = data.model_and_top(reduction)
    batch = data.target_batch
    n_targets = len(batch["labels"])
    ids = data.train.example_ids[:n_ids]
    fast = ev.top_turnover_scores(top, trained, ids, data.targets.select(range(n_targets)))
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "example_ids")}
    with trained.active(top):
        reference = th.TurnoverScorer(model, fast=False).scores(inputs, batch["labels"], ids)
    return float((fast - reference).abs().max())


def library_times(data: AdapterData, reduction: int, trained: ev.TrainedTop) -> dict[str, Any]:
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



@register_setting
class AdapterSetting(Setting):
    """Rows (a), (b), (c), (f) (the library's ``TurnoverConfig(channels=K)`` on the classifier) and (g) on an adapter.

    A variant is ``(reduction factor, classifier mask channels)``; each has its own patched model and cached top.
    """

    name = "adapters"
    title = "# Fidelity of turn-over influence (bottleneck adapter in MiniLM's top layer)\n\n"
    settings_class = AdapterSettings
    quick = QUICK_ADAPTERS
    data_label = "cached lower layers"
    gap_key = "cached_top_gap_vs_turnover_scorer"

    def __init__(self, data: AdapterData, settings: AdapterSettings) -> None:
        self.data, self.settings = data, settings
        self.recipe, self.base = settings.recipe(), (settings.reduction_factor, 1)
        self.flipped, self.targets, self.train_ids = data.flipped, data.targets, data.train.example_ids
        self.one_target = data.targets.select([0])
        self.noisy_train = data.train.with_labels(data.noisy_labels)

    @classmethod
    def load(cls, settings: AdapterSettings, full_cache: bool) -> AdapterSetting:
        return cls(load_adapter_data(settings, full_cache=full_cache), settings)

    @staticmethod
    def describe(results: dict[str, Any]) -> str:
        s, m = results["settings"], results["model"]
        return (
            f"all-MiniLM-L6-v2 with a bottleneck adapter ({m['adapter_units']} units) in its top layer, turn-over "
            f"masks on {', '.join(m['mask_sites'])}; {m['trainable_parameters']} trainable parameters retrained on "
            f"cached lower layers, {s['epochs']} epochs of Adam (lr {s['lr']:g}, batch {s['batch_size']}). "
        )

    def top(self, variant: Variant) -> ev.TopModel:
        return self.data.model_and_top(variant)[1]

    def label(self, variant: Variant) -> str:
        return f"adapter {adapter_units(self.top(variant))} units"

    def wider(self) -> list[tuple[Variant, str]]:
        variants = [(rf, 1) for rf in self.settings.wide_reduction_factors]
        return [(v, f"(c) turn-over, wider {self.label(v)}") for v in variants]

    def channel_rows(self) -> list[tuple[Variant, str, str]]:
        rf, name = self.settings.reduction_factor, self.label(self.base)
        label = "(f) turn-over, {k} mask channels on the classifier, " + name
        return [((rf, k), label.format(k=k), "mask") for k in self.settings.channels]

    def train(self, variant: Variant, seed: int, how: Training) -> ev.TrainedTop:
        train = self.noisy_train if how.noisy else self.data.train
        return ev.train_top(
            self.top(variant), train if how.rows is None else train.select(how.rows),
            replace(self.recipe, masking="dropout") if how.plain else self.recipe, init_seed=seed, mask_seed=seed,
            exclude=None if how.exclude is None else [int(i) for i in how.exclude],
            checkpoint_epochs=how.checkpoint_epochs,
        )

    def scores(self, variant: Variant, model: ev.TrainedTop, part: ev.TopInputs, how: str = "mask") -> torch.Tensor:
        return ev.top_turnover_scores(self.top(variant), model, self.train_ids, part)

    def self_scores(self, variant: Variant, model: ev.TrainedTop, how: str = "mask") -> torch.Tensor:
        return ev.top_self_scores(self.top(variant), model, self.noisy_train)

    def check(self, variant: Variant, model: ev.TrainedTop) -> float:
        return check_top_exact(self.data, variant, model)

    def accuracy(self, variant: Variant, model: ev.TrainedTop) -> float:
        return ev.top_accuracy(self.top(variant), model, self.data.test)

    def target_losses(self, model: ev.TrainedTop) -> np.ndarray:
        return ev.top_losses(self.top(self.base), model, self.targets).numpy()

    def training_losses(self, model: ev.TrainedTop) -> torch.Tensor:
        return ev.top_losses(self.top(self.base), model, self.noisy_train)

    def single_model_extra(self, model: ev.TrainedTop) -> dict[str, Any]:
        if not (self.settings.library_timing and self.data.train_batches):
            return {}
        return {"library_turnover_scorer": library_times(self.data, self.base, model)}

    def peer_hooks(self, model_a: ev.TrainedTop) -> dict[str, Any]:
        train, noisy_train, top = self.data.train, self.noisy_train, self.top(self.base)

        def factors(model: ev.TrainedTop, checkpoint: Any, part: ev.TopInputs, masked: bool) -> ev.MarginFactors:
            with model.active(top, None if checkpoint is None else checkpoint.state_dict):
                return top_factors(top, part, masked)

        return {
            "train_factors": lambda m, c, is_noisy, masked: factors(m, c, noisy_train if is_noisy else train, masked),
            "target_factors": lambda m, c, part: factors(m, c, part, False),
            "module": lambda m: m.active(top),
            "train_rows": lambda m, is_noisy: top_rows(noisy_train if is_noisy else train, True),
            "target_rows": lambda part: top_rows(part, False),
            "captum_layers": top_layer_names(top),
            "captum_layers_label": "adapter + classifier",
            "final_layer": "classifier",
            "kronfluence_tracked": top_layer_names(top),
            "library_model": lambda m: m.active(top),
            "library_batches": lambda m, is_noisy: library_batches(
                {"hidden": train.hidden, "residual": train.residual},
                self.data.noisy_labels if is_noisy else train.labels, train.example_ids,
            ),
            "library_targets": lambda part: {"hidden": part.hidden, "residual": part.residual, "labels": part.labels},
        }

    def results_extra(self) -> dict[str, Any]:
        model, top = self.data.model_and_top(self.base)
        return {
            "model": {
                "adapter_units": adapter_units(top),
                "trainable_parameters": sum(p.numel() for p in top.trainable().values()),
                "mask_sites": dict(model.turnover_config.mask_sites),
            }
        }
