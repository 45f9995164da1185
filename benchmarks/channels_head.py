"""Mask channels on a one-layer head, measured directly: ``TurnoverConfig(channels=K)`` as the library patches it.

The fidelity benchmark's head setting masks a hidden layer and averages channels with its own code; the library
puts channels on input-masked ``nn.Linear`` layers (a BERT-style ``classifier``). This script measures the
library's version: frozen all-MiniLM-L6-v2 features of Rotten Tomatoes (the fidelity benchmark's cache), a linear
classifier 384 -> 2 patched with ``turnover_hf.patch_model`` (input masks, biases frozen by ``freeze_leaking``),
trained with each example under its own masks (Adam, 10 epochs, batch 64), scored with the library's closed form
(``turnover_hf.prefix.head_logits``). For each K, in the same run:

* seed agreement: per-target Spearman between two models with different mask and init seeds;
* LDS (``--subsets S``, off by default: with channels every retraining hashes K x 384 mask bits per example and
  step, so a 64-channel ground truth takes hours on a CPU): the same recipe retrained on S random half-size
  subsets, twice each, with seeds no scored model used;
* accuracy on the test split; seconds to train one model and to score all N against all targets.

Run from the repository root (after ``benchmarks/fidelity.py`` has cached the features once):

    PYTHONPATH=. python benchmarks/channels_head.py            # K = 1, 4, 16, 64; about 3 minutes on 1 thread

It prints a Markdown table and writes ``benchmarks/results/channels_head.{json,md}``. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import turnover_hf as th
from turnover_hf.evaluation import lds, random_subsets, seed_agreement
from turnover_hf.files import atomic_write_text
from turnover_hf.masks import mask_for, scale_of
from turnover_hf.prefix import head_logits

RESULTS = Path(__file__).resolve().parent / "results"


class LinearHead(nn.Module):
    """Features -> ``classifier`` (one Linear), the shape of a BERT-style head on a frozen encoder."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.classifier = nn.Linear(384, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)


def patched(channels: int, init_seed: int, mask_seed: int) -> nn.Module:
    config = th.TurnoverConfig(seed=mask_seed, channels=channels, target_modules=["classifier"],
                               mask_inputs_of=["classifier"])
    return th.patch_model(LinearHead(init_seed), config, freeze_leaking=True)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor, seed: int, epochs: int = 10) -> float:
    """Adam on every example under its own masks; returns seconds."""
    started = time.perf_counter()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(y), generator=generator).split(64):
            with th.instance_masks(model, ids[rows], mode="train"):
                loss = F.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return time.perf_counter() - started


@torch.no_grad()
def scores(model: nn.Module, ids: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Turn-over influence ``L(t | flipped) - L(t | own masks)`` of every id on every target, ``(N, T)``."""
    config, site = model.turnover_config, model.turnover_state.sites[0]
    scale = scale_of(config.p)
    out = torch.empty(len(ids), len(labels))
    for start in range(0, len(ids), 256):
        masks = mask_for(ids[start : start + 256], site.name, site.channels * site.units, **config.mask_kwargs)
        both = head_logits(model.classifier, features, torch.cat([masks, scale - masks]))  # (2n, T, C)
        losses = F.cross_entropy(both.reshape(-1, 2), labels.repeat(len(both)), reduction="none").view(2, -1, len(labels))
        out[start : start + len(masks)] = losses[1] - losses[0]
    return out


@torch.no_grad()
def target_losses(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    return F.cross_entropy(model(features), labels, reduction="none").numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--subsets", type=int, default=0, help="ground-truth subsets for LDS (0: no LDS)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import fidelity  # the benchmark next to this file: its data split and feature cache

    data = fidelity.load_data(2000, 200, None, 0.0, 0, full_cache=True)
    x, y, ids = data.train.features, data.train.labels, data.train.ids
    tx, ty = data.targets.features, data.targets.labels
    subsets = random_subsets(len(y), args.subsets, seed=7) if args.subsets else []
    rows = []
    started = time.perf_counter()
    for k in args.channels:
        a, b = patched(k, 0, 0), patched(k, 1, 1)
        seconds = train(a, x, y, ids, seed=0)
        train(b, x, y, ids, seed=1)
        score_started = time.perf_counter()
        scores_a = scores(a, ids, tx, ty)
        score_seconds = time.perf_counter() - score_started
        scores_b = scores(b, ids, tx, ty)
        truth = []
        for s, subset in enumerate(subsets):
            for repeat in range(2):
                seed = 10000 + 2 * s + repeat
                model = patched(k, seed, seed)
                chosen = torch.as_tensor(np.flatnonzero(subset))
                train(model, x[chosen], y[chosen], ids[chosen], seed=seed)
                truth.append((s, target_losses(model, tx, ty)))
        actual = [np.mean([t for s2, t in truth if s2 == s], axis=0) for s in range(len(subsets))]
        with torch.no_grad():
            accuracy = float((a(data.test.features).argmax(1) == data.test.labels).float().mean())
        rows.append({
            "channels": k, "lds": lds(scores_a.numpy(), subsets, np.stack(actual)) if actual else None,
            "agreement": seed_agreement(scores_a.numpy(), scores_b.numpy())["per_target"],
            "accuracy": accuracy, "train_seconds": seconds, "score_seconds": score_seconds,
        })
        print(f"K={k}: {rows[-1]}", flush=True)
    lines = [
        "# Mask channels on a one-layer head (library `TurnoverConfig(channels=K)`, N = 2000, 200 targets, "
        f"{args.subsets} LDS subsets x 2 retrainings, {args.threads} thread(s))",
        "",
        "| channels K | LDS | seed agreement | test acc. | train s (one model) | score s (all N x 200 targets) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['channels']} | {'-' if r['lds'] is None else format(r['lds'], '.3f')} | {r['agreement']:.3f} | {r['accuracy']:.3f} | "
              f"{r['train_seconds']:.2f} | {r['score_seconds']:.2f} |" for r in rows]
    lines += ["", f"- Whole run: {time.perf_counter() - started:.0f} s wall-clock; ratios between rows come from one run."]
    table = "\n".join(lines) + "\n"
    print(table)
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / "channels_head.json", json.dumps({"rows": rows, "subsets": args.subsets}, indent=2) + "\n")
    atomic_write_text(RESULTS / "channels_head.md", table)


if __name__ == "__main__":
    main()
