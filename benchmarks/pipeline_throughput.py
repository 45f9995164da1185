"""Scoring throughput of turn-over influence vs. plain inference of the same model, in one run on one machine.

For three choices of where the masks sit (every layer + head, the top two layers + head, the head only) it prints:
pairs/s of the scorer; the bound = plain batched inference of the same model at 2 forwards per (id, target) pair;
their ratio; and the speed-up over the naive loop (one pair at a time, two forwards). For the head-only model it
also compares 100 targets against all training ids with one plain inference pass over the training set.

Run:  python benchmarks/pipeline_throughput.py            (about 5 minutes on 2 CPU cores)
      python benchmarks/pipeline_throughput.py --quick    (a smoke run)
Results go to benchmarks/results/pipeline_throughput.json as well.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable

import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

import turnover_hf as th
from turnover_hf.files import atomic_write_text


def minilm(num_layers: int) -> torch.nn.Module:
    """The real all-MiniLM-L6-v2 weights when installed, else a random model of the same shape."""
    try:
        from turnover_hf.assets import minilm_path

        return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
    except Exception:
        cfg = BertConfig(hidden_size=384, num_hidden_layers=num_layers, num_attention_heads=12, intermediate_size=1536,
                         num_labels=2)
        return BertForSequenceClassification(cfg).eval()


def with_adapters(model: torch.nn.Module, top_layers: int) -> torch.nn.Module:
    import adapters

    n = model.config.num_hidden_layers
    adapters.init(model)
    model.add_adapter("a", config=adapters.SeqBnConfig(reduction_factor=8, leave_out=list(range(n - top_layers))))
    model.set_active_adapters("a")
    return model


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def inputs(n: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (n, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (n,), generator=g)}


def plain_rows_per_second(model, seq_len: int, batch_size: int, repeats: int) -> float:
    batch = inputs(batch_size, seq_len, seed=7)
    feed = {k: v for k, v in batch.items() if k != "labels"}

    def run() -> None:
        with torch.no_grad(), th.instance_masks(model, mode="off"):
            model(**feed)

    return batch_size / timed(run, repeats)


def naive_seconds_per_pair(model, targets, ids, pairs: int) -> float:
    def run() -> None:
        with torch.no_grad():
            for n in range(pairs):
                one = {k: v[n % len(v) : n % len(v) + 1] for k, v in targets.items()}
                for mode in ("train", "flip"):
                    with th.instance_masks(model, ids[n % len(ids) : n % len(ids) + 1], mode=mode):
                        model(**one)

    return timed(run, 1) / pairs


def measure(name: str, model, n_ids: int, n_targets: int, args) -> dict:
    model = th.patch_model(model, th.TurnoverConfig(seed=0), warn_leaking=False).eval()
    targets = inputs(n_targets, args.seq_len, seed=1)
    ids = torch.arange(n_ids)
    scorer = th.TurnoverScorer(model, batch_size=args.batch_size)
    scorer.scores(targets, targets["labels"], ids[:4])  # first call verifies the fast path against the definition
    seconds = timed(lambda: scorer.scores(targets, targets["labels"], ids), args.repeats)
    pairs_per_s = n_ids * n_targets / seconds
    bound = plain_rows_per_second(model, args.seq_len, args.batch_size, args.repeats) / 2
    naive = 1 / naive_seconds_per_pair(model, targets, ids, args.naive_pairs)
    row = {"setting": name, "path": scorer.path, "ids": n_ids, "targets": n_targets, "pairs_per_s": pairs_per_s,
           "bound_pairs_per_s": bound, "ratio_to_bound": pairs_per_s / bound, "naive_pairs_per_s": naive,
           "speedup_over_naive": pairs_per_s / naive}
    if scorer.path == "closed_form":
        train = inputs(n_ids, args.seq_len, seed=2)
        feed = {k: v for k, v in train.items() if k != "labels"}

        def plain_pass() -> None:
            with torch.no_grad(), th.instance_masks(model, mode="off"):
                for s in range(0, n_ids, args.batch_size):
                    model(**{k: v[s : s + args.batch_size] for k, v in feed.items()})

        hundred = inputs(100, args.seq_len, seed=3)
        row["seconds_100_targets_all_ids"] = timed(lambda: scorer.scores(hundred, hundred["labels"], ids), 1)
        row["seconds_plain_pass_over_train"] = timed(plain_pass, 1)
    return row


def add_scoring_arguments(parser: argparse.ArgumentParser, repeats: int, naive_pairs: int) -> None:
    """The flags of both scoring-throughput benchmarks (this one and ``lm_throughput.py``)."""
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--naive-pairs", type=int, default=naive_pairs)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a smoke run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scoring_arguments(parser, repeats=2, naive_pairs=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    n_ids, n_targets, head_ids = (128, 2, 512) if args.quick else (512, 4, 2000)
    if args.quick:
        args.seq_len, args.naive_pairs, args.repeats = 32, 6, 1
    rows = [
        measure("masks in every layer + head", with_adapters(minilm(6), 6), n_ids, n_targets, args),
        measure("masks in top 2 layers + head", with_adapters(minilm(6), 2), n_ids, n_targets, args),
        measure("masks in the head only", minilm(6), head_ids, n_targets, args),
    ]
    full_bound = rows[0]["bound_pairs_per_s"]
    for row in rows:
        row["ratio_to_full_model_bound"] = row["pairs_per_s"] / full_bound
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seq_len {args.seq_len}, batch {args.batch_size}\n")
    print("| masks | path | pairs/s | bound pairs/s (plain inference, 2 fwd/pair) | ratio to own bound | ratio to full-model bound | naive pairs/s | speed-up over naive |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['path']} | {r['pairs_per_s']:.0f} | {r['bound_pairs_per_s']:.0f} | "
              f"{r['ratio_to_bound']:.2f} | {r['ratio_to_full_model_bound']:.2f} | {r['naive_pairs_per_s']:.1f} | "
              f"{r['speedup_over_naive']:.0f}x |")
    head = rows[-1]
    print(f"\nhead only: 100 targets x {head['ids']} ids took {head['seconds_100_targets_all_ids']:.2f} s; one plain "
          f"inference pass over the {head['ids']} training examples took {head['seconds_plain_pass_over_train']:.2f} s "
          f"(ratio {head['seconds_100_targets_all_ids'] / head['seconds_plain_pass_over_train']:.2f}).")
    out = os.path.join(os.path.dirname(__file__), "results", "pipeline_throughput" + ("_quick" if args.quick else "") + ".json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    atomic_write_text(out, json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
