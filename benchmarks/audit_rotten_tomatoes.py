"""The data audit on real data: the demo's model (MiniLM + bottleneck adapters, turn-over dropout) trained on Rotten
Tomatoes, then ``pipe.audit(validation, test)``: how many issues of each kind, the top rows, and the time of each kind.

The training labels get 10 % uniform noise (seeded), so the wrong-label and data-value rows can be checked against
the flipped rows; the splits are the shipped ones (``turnover_hf.assets.rotten_tomatoes``), so duplicates and leakage
are the corpus's own.

Run from the repository root (a few minutes on one thread):

    PYTHONPATH=. python benchmarks/audit_rotten_tomatoes.py [--n-train 1000] [--epochs 1]

Results: ``benchmarks/results/audit_rotten_tomatoes.{json,md}`` and ``audit_rotten_tomatoes.html`` (the report
section).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from transformers import DataCollatorWithPadding, TrainingArguments

import turnover_hf as th
from turnover_hf.audit import KINDS
from turnover_hf.demo import DemoSettings, build_model, tokenize
from turnover_hf.files import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
NOISE = 0.10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--epochs", type=float, default=1.0)
    args = parser.parse_args()
    settings = DemoSettings(n_train=args.n_train, epochs=args.epochs)
    raw = th.assets.rotten_tomatoes(seed=0, n_train=settings.n_train)
    rng = np.random.default_rng(0)
    flipped = set(rng.permutation(raw["train"]["example_id"])[: int(NOISE * len(raw["train"]))].tolist())
    raw["train"] = raw["train"].map(lambda r: {"label": 1 - r["label"] if r["example_id"] in flipped else r["label"]})
    model, tokenizer = build_model(settings)
    data = tokenize(raw, tokenizer, settings.max_length)
    start = time.perf_counter()
    training = TrainingArguments(output_dir="/tmp/turnover-audit-run", num_train_epochs=settings.epochs,
                                 per_device_train_batch_size=settings.batch_size, learning_rate=settings.learning_rate,
                                 warmup_ratio=0.1, group_by_length=True, save_strategy="no", seed=0, use_cpu=True,
                                 report_to=[], disable_tqdm=True)
    th.TurnoverTrainer(model=model, args=training, data_collator=DataCollatorWithPadding(tokenizer),
                       train_dataset=data["train"]).train()
    seconds = {"train": time.perf_counter() - start}
    pipe = th.InfluencePipeline(model, tokenizer, train_dataset=raw["train"], max_length=settings.max_length)
    parts = []
    for kind in KINDS:
        start = time.perf_counter()
        parts.append(pipe.audit(raw["validation"], raw["test"], kinds=[kind]))
        seconds[kind] = time.perf_counter() - start
    from datasets import concatenate_datasets

    issues = concatenate_datasets(parts)
    notes = [line for part in parts for line in part.info.description.splitlines()[1:]]
    issues.info.description = "\n".join([f"audit of {len(raw['train'])} training examples", *notes])
    counts = {kind: sum(1 for k in issues["kind"] if k == kind) for kind in KINDS}
    rows = issues.to_list()
    checks = {}
    for kind in ("wrong_label", "data_value"):
        ids = [r["example_id"] for r in rows if r["kind"] == kind]
        checks[kind] = {"listed": len(ids), "flipped_among_listed": sum(i in flipped for i in ids),
                        "base_rate": NOISE}
    results = {"n_train": len(raw["train"]), "validation": len(raw["validation"]), "test": len(raw["test"]),
               "epochs": settings.epochs, "estimator": pipe.estimator, "counts": counts, "seconds": seconds,
               "checks": checks, "notes": notes,
               "top": {kind: [r for r in rows if r["kind"] == kind][:5] for kind in KINDS}}
    RESULTS.mkdir(exist_ok=True)
    atomic_write_text(RESULTS / "audit_rotten_tomatoes.json", json.dumps(results, indent=1) + "\n")
    lines = ["# The data audit on Rotten Tomatoes", "",
             f"Command: `PYTHONPATH=. python benchmarks/audit_rotten_tomatoes.py --n-train {args.n_train} --epochs "
             f"{args.epochs:g}`. The demo's model, {len(raw['train'])} training reviews with {NOISE:.0%} of the labels "
             f"flipped, {len(raw['validation'])} validation and {len(raw['test'])} test reviews; data value by the "
             f"{pipe.estimator!r} estimator. One CPU thread.", "",
             "| kind | rows | seconds | flipped among the rows (10 % at random) |", "|---|---|---|---|"]
    for kind in KINDS:
        check = checks.get(kind)
        share = f"{check['flipped_among_listed']} of {check['listed']}" if check else ""
        lines.append(f"| {kind} | {counts[kind]} | {seconds[kind]:.1f} | {share} |")
    lines += ["", f"Training: {seconds['train']:.0f} s.", "", "Notes:", ""] + [f"- {n}" for n in notes] + [""]
    for kind in KINDS:
        top = results["top"][kind]
        if top:
            lines += [f"## {kind}", ""] + [f"- {r['score']:.3f} #{r['example_id']}: {r['reason']} {r['text'][:100]!r}"
                                           for r in top] + [""]
    atomic_write_text(RESULTS / "audit_rotten_tomatoes.md", "\n".join(lines))
    th.report.write_report(RESULTS / "audit_rotten_tomatoes.html", overwrite=True, title="Data audit: Rotten Tomatoes",
                           audit=issues, label_names=["rotten", "fresh"],
                           dataset_sizes={"training reviews": len(raw["train"])})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
