"""Time of the influence estimator on a head: factorised vs. materialised fits, curvature rows kept vs. rebuilt.

``turnover_hf.InfluenceFunctionScorer`` keeps one of two fits (the scores are the same):

* factorised (``method == "factorised"``, automatic when every tracked parameter belongs to an ``nn.Linear`` that
  sees one row per example): per layer the inputs and output gradients of every training example, ``N x N``
  kernels, Woodbury's ``N (C - 1)``-space system, factorised at the first scoring (so the fit column holds less
  and the scoring columns more of the work than for the materialised fit, which factorises while fitting);
* materialised (``factorised=False``): ``N (C - 1)`` per-example gradients of ``D`` floats, solved in float64 with
  a float64 copy of them kept when it takes at most ``turnover_hf.estimators.influence.materialised.ROWS_CACHE_BYTES`` and otherwise
  converted block by block from the float32 gradients at every target set.

This script builds a head the size of the fidelity benchmark's (384 -> 128 -> 2 on random features, N training
examples, D = 49,538 trainable parameters) and times, in the same run, for each of three settings (factorised;
materialised with the rows kept; materialised with them rebuilt, the budget set to 0): the fit, the scores of all
N against one set of targets, and the pipeline-style self-influence of every training example in batches of 64.
End to end is their sum within a repeat. Medians over repeats; the settings rotate so drift favours none (the
rebuilt setting reuses the latest materialised fit). The largest score differences between the settings are
reported. Times are printed, never asserted.

Run from the repository root:

    PYTHONPATH=. python benchmarks/influence_scoring.py            # N = 2,000: about 15 minutes on 1 thread
    PYTHONPATH=. python benchmarks/influence_scoring.py --quick    # N = 400

It prints a Markdown table and writes it to ``benchmarks/results/influence_scoring.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from turnover_hf.estimators.influence import materialised
from turnover_hf.files import atomic_write_text
from turnover_hf.estimators.influence import InfluenceFunctionScorer

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = ("factorised", "materialised", "rebuilt")
PARTS = ("fit", "targets", "self", "end_to_end")


class Head(nn.Module):
    """Features -> 128 tanh units -> 2 logits (the fidelity benchmark's head shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(384, 128), nn.Linear(128, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(features)))


def _timed(run) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def _gap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Largest absolute difference, and the same relative to the largest |score| of ``b``."""
    diff = float((a - b).abs().max())
    return diff, diff / float(b.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 400 training examples")
    parser.add_argument("--targets", type=int, default=64, help="targets per set")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = 400 if args.quick else 2000
    torch.manual_seed(0)
    model = Head().eval()
    x, y = torch.randn(n, 384), torch.randint(0, 2, (n,))
    batches = [{"features": x[s : s + 256], "labels": y[s : s + 256], "example_ids": torch.arange(s, min(s + 256, n))}
               for s in range(0, n, 256)]
    self_batches = [{"features": x[s : s + 64], "labels": y[s : s + 64], "example_ids": torch.arange(s, min(s + 64, n))}
                    for s in range(0, n, 64)]  # as the pipeline's self-influence calls it
    targets = {"features": torch.randn(args.targets, 384)}
    target_labels = torch.randint(0, 2, (args.targets,))
    budget = materialised.ROWS_CACHE_BYTES
    times = {name: {part: [] for part in PARTS} for name in SETTINGS}
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    materialised: Optional[InfluenceFunctionScorer] = None
    num_parameters = 0
    for repeat in range(args.repeats):
        order = SETTINGS if repeat % 2 == 0 else SETTINGS[::-1]
        for name in order:
            materialised.ROWS_CACHE_BYTES = 0 if name == "rebuilt" else budget
            if name == "rebuilt":
                if materialised is None:
                    continue
                scorer, fit_seconds = materialised, None
                scorer.factors._gradients64 = None
                scorer._preconditioned = None
            else:
                if name == "materialised":
                    materialised = None  # free the previous fit first
                scorer = InfluenceFunctionScorer(model, batches, solver="woodbury", factorised=name == "factorised",
                                                 show_progress=False)
                fit_seconds, _ = _timed(scorer.fit)
                if scorer.method != name:
                    raise RuntimeError(f"asked for a {name} fit, got {scorer.method}")
                if name == "materialised":
                    materialised = scorer
                times[name]["fit"].append(fit_seconds)
            num_parameters = scorer.num_parameters
            target_seconds, scores = _timed(lambda: scorer.scores(targets, target_labels, torch.arange(n)))
            self_seconds, own = _timed(lambda: torch.cat([scorer.self_scores(b, b["labels"], b["example_ids"])
                                                          for b in self_batches]))
            times[name]["targets"].append(target_seconds)
            times[name]["self"].append(self_seconds)
            if fit_seconds is not None:
                times[name]["end_to_end"].append(fit_seconds + target_seconds + self_seconds)
            outputs[name] = (scores, own)
        materialised.ROWS_CACHE_BYTES = budget
    gaps = {
        f"{a} vs {b}": {part: _gap(outputs[a][k], outputs[b][k]) for k, part in enumerate(("scores", "self"))}
        for a, b in (("factorised", "materialised"), ("rebuilt", "materialised"))
    }
    median = {name: {part: statistics.median(values) for part, values in parts.items() if values}
              for name, parts in times.items()}
    rows = [
        ("fit (one pass over the training set; the materialised fit also factorises)", "fit"),
        ("scores of all N against one target set", "targets"),
        ("self-influence of all N (batches of 64)", "self"),
        ("end to end (fit + one target set + self-influence)", "end_to_end"),
    ]
    lines = [
        f"# Influence estimator on a head: factorised vs. materialised fit (N = {n}, D = {num_parameters}, "
        f"{args.targets} targets, {args.threads} thread(s))",
        "",
        "| work | factorised s | materialised s | materialised / factorised | materialised, rows rebuilt s |",
        "|---|---:|---:|---:|---:|",
    ]
    for title, part in rows:
        fact, mat = median["factorised"][part], median["materialised"][part]
        rebuilt = median["rebuilt"].get(part)
        lines.append(f"| {title} | {fact:.2f} | {mat:.2f} | {mat / fact:.1f}x | "
                     f"{'(shares the fit)' if rebuilt is None else f'{rebuilt:.2f}'} |")
    fm, rm = gaps["factorised vs materialised"], gaps["rebuilt vs materialised"]
    lines += [
        "",
        f"- Largest score difference, factorised vs. materialised: {fm['scores'][0]:.1e} on the target set "
        f"({fm['scores'][1]:.1e} of the largest |score|), {fm['self'][0]:.1e} on self-influence "
        f"({fm['self'][1]:.1e}). Rows kept vs. rebuilt: {max(rm['scores'][0], rm['self'][0]):.1e}.",
        f"- Medians of {args.repeats} repeats, settings rotating; the materialised fit keeps its float64 curvature "
        "rows (they fit `ROWS_CACHE_BYTES`); the rebuilt column reuses the latest materialised fit.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    stem = RESULTS / ("influence_scoring_quick" if args.quick else "influence_scoring")
    atomic_write_text(stem.with_suffix(".md"), table)
    atomic_write_text(stem.with_suffix(".json"), json.dumps({"n": n, "num_parameters": num_parameters,
                                                             "targets": args.targets, "threads": args.threads,
                                                             "times": times, "median": median,
                                                             "max_abs_difference": gaps}, indent=2) + "\n")


if __name__ == "__main__":
    main()
