"""Time of the influence function's materialised fit on the demo's model: per-example gradients of every row of a
batch from one forward and backward (the tracked Linear layers' inputs and output gradients) vs. one forward and
backward per row, in the same run.

    python benchmarks/per_example_gradients.py                 # 256 reviews, batch 32, 2 repeats
    python benchmarks/per_example_gradients.py --n-train 512

all-MiniLM-L6-v2 with bottleneck adapters in its top 3 layers, patched with turn-over dropout
(``turnover_hf.demo.build_model``, untrained: the cost does not depend on the weights), fitted with
``InfluenceFunctionScorer`` on Rotten Tomatoes reviews; each row's gradient is taken under its own training mask.
Prints the fit time of each path (median over repeats, the paths alternating), their ratio and the largest
difference between the two fits' stored gradients. Times are printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import turnover_hf as th  # noqa: E402
from turnover_hf.assets import rotten_tomatoes  # noqa: E402
from turnover_hf.demo import DemoSettings, build_model, tokenize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import DataCollatorWithPadding

    settings = DemoSettings(n_train=args.n_train)
    data = rotten_tomatoes(seed=0, n_train=args.n_train, n_validation=16, n_test=16)
    model, tokenizer = build_model(settings)
    train = tokenize(data, tokenizer, settings.max_length)["train"]
    model.turnover_config.num_train_examples = len(train)
    model.eval()
    seconds: dict[str, list[float]] = {"one batched pass": [], "row by row": []}
    gradients: dict[str, torch.Tensor] = {}
    for repeat in range(args.repeats):
        for name in (list(seconds) if repeat % 2 == 0 else list(seconds)[::-1]):
            scorer = th.InfluenceFunctionScorer(model, train, data_collator=DataCollatorWithPadding(tokenizer),
                                                batch_size=args.batch_size, factorised=False, show_progress=False)
            if name == "row by row":
                scorer.grads.batched_ok = False
            start = time.perf_counter()
            scorer.fit()
            seconds[name].append(time.perf_counter() - start)
            if name == "one batched pass" and scorer.grads.batched_ok is not True:
                raise RuntimeError("the batched path did not run on this model")
            gradients[name] = scorer.factors.class_gradients
    a, b = gradients.values()
    gap = float((a - b).abs().max() / b.abs().max())
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"influence fit, N = {len(train)}, {scorer.num_parameters} trainable parameters, batch {args.batch_size}, "
          f"{args.threads} thread(s), median of {args.repeats}:")
    for name, value in medians.items():
        print(f"  {name:>16}: {value:7.1f} s")
    print(f"  ratio (row by row / batched): {medians['row by row'] / medians['one batched pass']:.2f}x")
    print(f"  largest gradient difference: {gap:.1e} of the largest gradient entry")


if __name__ == "__main__":
    main()
