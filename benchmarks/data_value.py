"""Data value: does removing the training examples with the most negative mean influence on a validation set (the
audit's ``data_value`` rows) beat removing as many random examples, once the model is retrained?

Setting: ``benchmarks/label_errors.py``'s model and cached retraining (all-MiniLM-L6-v2 + a bottleneck adapter in its
top layer, turn-over masks, 5 epochs of Adam; the frozen layers computed once), Rotten Tomatoes with 2,000 training
reviews, with clean labels and with 20 % uniform noise. The 973 test reviews are split in two: even positions are
the validation set the influence is measured on, odd positions the held-out set the retrained models are scored on.
Data value: the library's influence function (``turnover_hf.InfluenceFunctionScorer``, the pipeline's default
estimator for a classifier, damping 0.1 x the mean eigenvalue) of the scored model (seed 0), averaged over the
validation reviews; the 5 % most negative are removed. Retrained on 10 seeds: as they are, without those, without as
many random ones (a new draw per seed); mean and paired standard error of the held-out accuracy.

Run from the repository root (a few minutes on one thread, plus caching the texts the first time):

    PYTHONPATH=. python benchmarks/data_value.py

Results: ``benchmarks/results/data_value.{json,md}``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import label_errors as le  # noqa: E402  (the model, the cached data and retraining of the label-error benchmark)
from fidelity_runner.peers import library_batches  # noqa: E402

import turnover_hf as th  # noqa: E402
from turnover_hf.files import atomic_write_text  # noqa: E402

FRACTION = 0.05
SEEDS = tuple(range(200, 210))
NOISES = ("clean", "uniform20")


def mean_influence(top, trained, train_data, labels, validation) -> torch.Tensor:
    """Each training row's influence function score averaged over the validation rows (positive = helped)."""
    batches = library_batches({"hidden": train_data.hidden, "residual": train_data.residual}, labels,
                              train_data.example_ids)
    with trained.active(top) as module:
        scorer = th.InfluenceFunctionScorer(module, batches, damping_factor=0.1, show_progress=False).fit()
        targets = {"hidden": validation.hidden, "residual": validation.residual}
        return scorer.scores(targets, validation.labels.long(), train_data.example_ids).mean(1)


def run(noise: str, top, train_data, validation, held_out, log) -> dict:
    if noise == "clean":
        labels, flipped = train_data.labels.clone(), np.zeros(len(train_data), dtype=bool)
    else:
        labels, flipped = le.noisy_labels(train_data.labels, noise, 2, seed=1)
    started = time.perf_counter()
    trained, _ = le.train(top, train_data, labels, le.SCORED_SEED)
    value = mean_influence(top, trained, train_data, labels, validation)
    seconds = time.perf_counter() - started
    count = int(FRACTION * len(labels))
    harmful = np.argsort(value.numpy(), kind="stable")[:count]
    keep = np.ones(len(labels), dtype=bool)
    keep[harmful] = False
    rng = np.random.default_rng(7)
    accuracy: dict[str, list[float]] = {"as is": [], "harmful removed": [], "random removed": []}
    for seed in SEEDS:
        keep_random = np.ones(len(labels), dtype=bool)
        keep_random[rng.permutation(len(labels))[:count]] = False
        for name, kept in (("as is", None), ("harmful removed", keep), ("random removed", keep_random)):
            accuracy[name].append(le.accuracy(top, le.train(top, train_data, labels, seed, keep=kept)[0], held_out))
    out = {name: le.mean_sem(values) for name, values in accuracy.items()}
    out["harmful minus random"] = le.mean_sem(list(np.subtract(accuracy["harmful removed"], accuracy["random removed"])))
    out["harmful minus as is"] = le.mean_sem(list(np.subtract(accuracy["harmful removed"], accuracy["as is"])))
    result = {"noise": noise, "removed": count, "negative": int((value < 0).sum()),
              "flipped_among_removed": int(flipped[harmful].sum()), "flipped": int(flipped.sum()),
              "scoring_seconds": seconds, "accuracy": out, "per_seed": accuracy}
    diff = out["harmful minus random"]
    log(f"{noise}: harmful removed - random removed = {diff[0]:+.4f} ± {diff[1]:.4f} (s.e., {len(SEEDS)} seeds); "
        f"flipped among the removed {result['flipped_among_removed']} of {count}")
    return result


def render(results: dict) -> str:
    lines = ["# Data value: removing the most harmful 5 % vs. as many random examples", "",
             "Command: `PYTHONPATH=. python benchmarks/data_value.py`. Rotten Tomatoes, 2,000 training reviews, "
             "influence on 487 validation reviews, held-out accuracy on the other 486 test reviews, "
             f"{len(SEEDS)} retraining seeds (mean ± paired standard error).", "",
             "| labels | as is | harmful removed | random removed | harmful - random | flipped among removed |",
             "|---|---|---|---|---|---|"]
    for r in results["settings"]:
        a = r["accuracy"]
        fmt = lambda k: f"{a[k][0]:.4f} ± {a[k][1]:.4f}"  # noqa: E731
        flipped = f"{r['flipped_among_removed']} of {r['removed']} ({r['flipped']} flipped in all)" if r["flipped"] else ""
        lines.append(f"| {r['noise']} | {fmt('as is')} | {fmt('harmful removed')} | {fmt('random removed')} | "
                     f"{fmt('harmful minus random')} | {flipped} |")
    lines += ["", f"Total {results['seconds']:.0f} s on one thread.", ""]
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(1)
    started = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)  # noqa: E731
    top, train_data, test, _ = le.load("rotten_tomatoes", log, quick=False)
    validation = test.select(np.arange(0, len(test), 2))
    held_out = test.select(np.arange(1, len(test), 2))
    results = {"settings": [run(noise, top, train_data, validation, held_out, log) for noise in NOISES]}
    results["seconds"] = time.perf_counter() - started
    le.RESULTS.mkdir(exist_ok=True)
    atomic_write_text(le.RESULTS / "data_value.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(le.RESULTS / "data_value.md", render(results))
    print(render(results))


if __name__ == "__main__":
    main()
