"""Scoring time of the influence estimator: curvature rows kept once vs. rebuilt at every target set.

``turnover_hf.InfluenceFunctionScorer`` solves ``(G + lambda I)^-1 g_t`` through Woodbury's identity with the
float64 curvature rows ``U`` (``G = U^T U``). It keeps ``U`` when it takes at most
``influence_function.ROWS_CACHE_BYTES``; otherwise every target set rebuilds it block by block from the stored
float32 gradients. This script fits one scorer on a head the size of the fidelity benchmark's (384 -> 128 -> 2 on
random features, N training examples, D = 49,538 trainable parameters), then times, in the same run, the
preconditioning of a set of targets with the rows kept and with them rebuilt (the budget set to 0), and the
pipeline-style self-influence of every training example in batches of 64. Medians over repeats; the two settings
alternate so drift favours neither. Scores are checked equal. Times are printed, never asserted.

Run from the repository root:

    PYTHONPATH=. python benchmarks/influence_scoring.py            # N = 2,000: about 2 minutes on 1 thread
    PYTHONPATH=. python benchmarks/influence_scoring.py --quick    # N = 400

It prints a Markdown table and writes it to ``benchmarks/results/influence_scoring.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from turnover_hf import influence_function
from turnover_hf.influence_function import InfluenceFunctionScorer

RESULTS = Path(__file__).resolve().parent / "results"


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
    scorer = InfluenceFunctionScorer(model, batches, solver="woodbury", show_progress=False)
    fit_seconds, _ = _timed(scorer.fit)
    factors = scorer.factors
    budget = influence_function.ROWS_CACHE_BYTES
    times: dict[str, dict[str, list[float]]] = {"kept": {"targets": [], "self": []}, "rebuilt": {"targets": [], "self": []}}
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for repeat in range(args.repeats):
        order = ("kept", "rebuilt") if repeat % 2 == 0 else ("rebuilt", "kept")
        for name in order:
            influence_function.ROWS_CACHE_BYTES = budget if name == "kept" else 0
            factors._kept_rows = None
            scorer._preconditioned = None
            seconds, scores = _timed(lambda: scorer.scores(targets, target_labels, torch.arange(n)))
            times[name]["targets"].append(seconds)
            seconds, own = _timed(lambda: torch.cat([scorer.self_scores(b, b["labels"], b["example_ids"])
                                                     for b in self_batches]))
            times[name]["self"].append(seconds)
            outputs[name] = (scores, own)
    influence_function.ROWS_CACHE_BYTES = budget
    gap = max(float((outputs["kept"][k] - outputs["rebuilt"][k]).abs().max()) for k in (0, 1))
    median = {name: {part: statistics.median(values) for part, values in parts.items()} for name, parts in times.items()}
    rows = [
        ("scores of all N against one target set", "targets"),
        ("self-influence of all N (batches of 64)", "self"),
    ]
    lines = [
        f"# Influence estimator: curvature rows kept vs. rebuilt (N = {n}, D = {scorer.num_parameters}, "
        f"{args.targets} targets, {args.threads} thread(s))",
        "",
        "| work | rows kept s | rows rebuilt s | speed-up |",
        "|---|---:|---:|---:|",
    ]
    for title, part in rows:
        kept, rebuilt = median["kept"][part], median["rebuilt"][part]
        lines.append(f"| {title} | {kept:.2f} | {rebuilt:.2f} | {rebuilt / kept:.2f}x |")
    lines += ["", f"- Fit (once, shared by both): {fit_seconds:.1f} s. Largest score difference kept vs. rebuilt: "
                  f"{gap:.1e}. Medians of {args.repeats} repeats, settings alternating."]
    table = "\n".join(lines) + "\n"
    print(table)
    stem = RESULTS / ("influence_scoring_quick" if args.quick else "influence_scoring")
    stem.with_suffix(".md").write_text(table, encoding="utf-8")
    stem.with_suffix(".json").write_text(json.dumps({"n": n, "num_parameters": scorer.num_parameters,
                                                     "targets": args.targets, "threads": args.threads,
                                                     "fit_seconds": fit_seconds, "times": times, "median": median,
                                                     "max_abs_difference": gap}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
