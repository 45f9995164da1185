"""Peak resident memory of the exact influence function's steps under a memory budget: the fit, self-influence of
every training example and one target set of 10, each measured as the process's high-water mark of resident
memory (Linux ``VmHWM``, reset before each step through ``/proc/self/clear_refs``) above the resident memory after
the model and data were built. Model: the tests' tiny BERT (2 classes, every parameter tracked: D = 17,900),
N random 8-token sequences, the materialised fit (``factorised=False``).

Run from the repository root (Linux; ``OMP_NUM_THREADS=1``):

    PYTHONPATH=. python benchmarks/influence_peak.py --examples 1200 --max_memory_gb 0.45

Prints one JSON line: the fit's own estimate (``fit_memory_gb``) and each step's peak, in GB (2^30 bytes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from conftest import VOCAB, tiny_bert  # noqa: E402

from turnover_hf.estimators.influence import InfluenceFunctionScorer  # noqa: E402

GB = 2**30


def status_gb(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) * 1024 / GB for line in status if line.startswith(key + ":"))


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1200)
    parser.add_argument("--max_memory_gb", type=float, default=0.45)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = args.examples
    model = tiny_bert()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(5, VOCAB, (n, 8), generator=g), torch.randint(0, 2, (n,), generator=g)
    batches = [{"input_ids": x[s:s + 64], "attention_mask": torch.ones_like(x[s:s + 64]), "labels": y[s:s + 64],
                "example_ids": torch.arange(s, min(s + 64, n))} for s in range(0, n, 64)]
    scorer = InfluenceFunctionScorer(model, factorised=False, show_progress=False, max_memory_gb=args.max_memory_gb)
    base, peaks = status_gb("VmRSS"), {}
    reset_peak()
    scorer.fit(batches)
    peaks["fit"] = status_gb("VmHWM") - base
    reset_peak()
    scorer.self_scores_many([(b, b["labels"], b["example_ids"]) for b in batches])
    peaks["self_influence"] = status_gb("VmHWM") - base
    reset_peak()
    scorer.scores({"input_ids": x[:10], "attention_mask": torch.ones_like(x[:10])}, y[:10], torch.arange(n))
    peaks["scores"] = status_gb("VmHWM") - base
    print(json.dumps({"examples": n, "parameters": scorer.num_parameters, "max_memory_gb": args.max_memory_gb,
                      "estimate_gb": scorer.fit_memory_gb(n, 2), "peak_gb": peaks}))


if __name__ == "__main__":
    main()
