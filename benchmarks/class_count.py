"""What a classifier's projected influence fit costs as the classes grow, and how closely sampled labels follow the
exact per-class curvature.

The projected fit (``estimator="projected"``) needs the Gauss-Newton matrix of the training loss. Over the classes
it is exact with one backward pass per class but one (``curvature_classes="exact"``: ``C - 1`` per example, in the
basis pass and in the fit pass), or estimated from ``label_samples`` labels drawn from the model's own prediction
(``"sampled"``: ``1 + label_samples`` backward passes in the fit pass, ``label_samples`` in the basis pass,
whatever ``C``). ``"auto"`` (the default) keeps the exact fit up to ``label_samples + 2`` classes.

The model: a BERT classifier from a config (``--hidden`` 128, ``--layers`` 4, 4 heads, vocabulary 512, sequences of
``--length`` 32 tokens), every Linear tracked (the projected estimator's default), ``projection_dim`` 4096, eigen
design, the defaults otherwise; no turn-over masks (the curvature is the same computation with them).

1. **Cost** at ``--classes`` (2, 5, 20, 100): ``--cost_examples`` (256) random sequences with random labels, a
   randomly initialised model per class count (costs do not depend on the weights). Per class count, the whole fit
   (basis pass + fit pass) with the exact and with the sampled curvature, timed in the same process one after the
   other, as CPU seconds of this process (``time.process_time``; one thread, so less sensitive to other load than
   wall time, which is also recorded), per example; and one plain gradient pass (forward and backward of the mean
   loss, batch by batch) as the unit.
2. **Fidelity** at ``--fidelity_classes`` (2, 5): a synthetic task (``--fidelity_examples`` (2,048) sequences whose
   label is the bucket of their first token, 15% of labels replaced by another class), the model trained on it
   for ``--epochs`` (3) epochs; then the exact fit and sampled fits (``--samples``: 1 and 4 draws) on the same
   model and data: Pearson and Spearman correlation of the sampled fit's scores (all training examples x 32
   held-out targets, flattened) and self-influence against the exact fit's, and the AUC of self-influence at
   finding the replaced labels for each. No retraining (LDS) here: the correlations are with the exact fit.

Run from the repository root (``OMP_NUM_THREADS=1``; about 10 minutes of CPU):

    PYTHONPATH=. python benchmarks/class_count.py
    PYTHONPATH=. python benchmarks/class_count.py --quick        # smoke run, ~1 minute

It prints Markdown tables and writes ``benchmarks/results/class_count{,_quick}.{json,md}`` (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from scipy.stats import pearsonr, spearmanr
from transformers import BertConfig, BertForSequenceClassification

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from turnover_hf import ProjectedInfluenceScorer  # noqa: E402
from turnover_hf.estimators.projected.sampled_labels import samples_classes  # noqa: E402
from turnover_hf.files import atomic_write_text  # noqa: E402

VOCAB = 512
RESULTS_DIR = REPO / "benchmarks" / "results"


def build_model(classes: int, hidden: int, layers: int, length: int, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=2 * hidden, max_position_embeddings=max(64, length), num_labels=classes,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def batches_of(input_ids: torch.Tensor, labels: torch.Tensor, batch_size: int, first_id: int = 0) -> list[dict]:
    ids = torch.arange(first_id, first_id + len(labels))
    return [{"input_ids": input_ids[s:s + batch_size], "attention_mask": torch.ones_like(input_ids[s:s + batch_size]),
             "labels": labels[s:s + batch_size], "example_ids": ids[s:s + batch_size]}
            for s in range(0, len(labels), batch_size)]


def timed(work) -> tuple[float, float, object]:
    cpu, wall = time.process_time(), time.perf_counter()
    out = work()
    return time.process_time() - cpu, time.perf_counter() - wall, out


def gradient_pass(model: torch.nn.Module, batches: list[dict]) -> None:
    for batch in batches:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
    model.zero_grad(set_to_none=True)


def timing_passes(fit: ProjectedInfluenceScorer) -> dict:
    """Wrap ``fit``'s per-batch work (the basis pass's moments, the fit pass's gradients and curvature rows) to sum
    its CPU seconds: the part of the fit that grows with N (the rest: eigendecompositions and one k x k
    factorisation, once per fit)."""
    spent = {"cpu": 0.0}
    for name in ("_basis_moments", "_training_rows"):
        inner = getattr(fit, name)

        def wrapped(*a, inner=inner, **k):
            start = time.process_time()
            try:
                return inner(*a, **k)
            finally:
                spent["cpu"] += time.process_time() - start

        setattr(fit, name, wrapped)
    return spent


def scorer(model: torch.nn.Module, form: str, samples: int, batch_size: int) -> ProjectedInfluenceScorer:
    return ProjectedInfluenceScorer(model, curvature_classes=form, label_samples=samples, batch_size=batch_size,
                                    show_progress=False)


def measure_cost(args: argparse.Namespace) -> list[dict]:
    rows = []
    for classes in args.classes:
        g = torch.Generator().manual_seed(classes)
        input_ids = torch.randint(5, VOCAB, (args.cost_examples, args.length), generator=g)
        labels = torch.randint(0, classes, (args.cost_examples,), generator=g)
        batches = batches_of(input_ids, labels, args.batch_size)
        model = build_model(classes, args.hidden, args.layers, args.length)
        unit_cpu, unit_wall, _ = timed(lambda: gradient_pass(model, batches))
        row = {"classes": classes, "examples": args.cost_examples, "gradient_pass_cpu_ms": 1e3 * unit_cpu / args.cost_examples,
               "gradient_pass_wall_ms": 1e3 * unit_wall / args.cost_examples}
        for form in ("exact", "sampled"):
            fit = scorer(model, form, 1, args.batch_size)
            passes = timing_passes(fit)
            cpu, wall, _ = timed(lambda: fit.fit(batches))
            row[f"{form}_cpu_ms"] = 1e3 * passes["cpu"] / args.cost_examples
            row[f"{form}_passes"] = passes["cpu"] / unit_cpu
            row[f"{form}_whole_fit_cpu_ms"] = 1e3 * cpu / args.cost_examples
            row[f"{form}_whole_fit_wall_ms"] = 1e3 * wall / args.cost_examples
        row["sampled_over_exact"] = row["sampled_cpu_ms"] / row["exact_cpu_ms"]
        row["auto"] = "sampled" if samples_classes("auto", classes, 1) else "exact"
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:  # against the smallest class count, sampled and auto
        row["sampled_vs_smallest"] = row["sampled_cpu_ms"] / rows[0]["sampled_cpu_ms"]
        row["exact_vs_smallest"] = row["exact_cpu_ms"] / rows[0]["exact_cpu_ms"]
        row["auto_vs_smallest"] = row[f"{row['auto']}_cpu_ms"] / rows[0][f"{rows[0]['auto']}_cpu_ms"]
    return rows


def train(model: torch.nn.Module, batches: list[dict], epochs: int) -> float:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for batch in batches:
            optimizer.zero_grad()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        right = sum(int((model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(1)
                         == b["labels"]).sum()) for b in batches)
    return right / sum(len(b["labels"]) for b in batches)


def auc(scores: torch.Tensor, positives: torch.Tensor) -> float:
    """Probability that a random positive outranks a random negative (ties count half)."""
    ranks = torch.from_numpy(__import__("scipy.stats", fromlist=["rankdata"]).rankdata(scores.numpy()))
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def measure_fidelity(args: argparse.Namespace) -> list[dict]:
    rows = []
    for classes in args.fidelity_classes:
        g = torch.Generator().manual_seed(100 + classes)
        n, t = args.fidelity_examples, args.targets
        input_ids = torch.randint(5, VOCAB, (n + t, args.length), generator=g)
        clean = (input_ids[:, 0] - 5) * classes // (VOCAB - 5)
        labels = clean.clone()
        flipped = torch.rand(n + t, generator=g) < 0.15
        flipped[n:] = False  # the targets keep their true labels
        labels[flipped] = (clean[flipped] + torch.randint(1, classes, (int(flipped.sum()),), generator=g)) % classes
        model = build_model(classes, args.hidden, args.layers, args.length, seed=1)
        batches = batches_of(input_ids[:n], labels[:n], args.batch_size)
        accuracy = train(model, batches, args.epochs)
        targets = {"input_ids": input_ids[n:], "attention_mask": torch.ones_like(input_ids[n:])}
        ids = torch.arange(n)

        def results(form: str, samples: int) -> tuple[torch.Tensor, torch.Tensor, float]:
            fit = scorer(model, form, samples, args.batch_size)
            cpu, _, _ = timed(lambda: fit.fit(batches))
            scores = fit.scores(targets, labels[n:], ids)
            own = torch.cat([fit.self_scores(b, b["labels"], b["example_ids"]) for b in batches])
            return scores.double(), own.double(), cpu / n

        exact_scores, exact_own, exact_cpu = results("exact", 1)
        for samples in args.samples:
            scores, own, cpu = results("sampled", samples)
            row = {"classes": classes, "label_samples": samples, "examples": n, "targets": t,
                   "train_accuracy": accuracy,
                   "scores_pearson": float(pearsonr(scores.flatten(), exact_scores.flatten())[0]),
                   "scores_spearman": float(spearmanr(scores.flatten(), exact_scores.flatten())[0]),
                   "self_pearson": float(pearsonr(own, exact_own)[0]),
                   "self_spearman": float(spearmanr(own, exact_own)[0]),
                   "mislabel_auc_exact": auc(exact_own, flipped[:n]), "mislabel_auc_sampled": auc(own, flipped[:n]),
                   "fit_cpu_ms_exact": 1e3 * exact_cpu, "fit_cpu_ms_sampled": 1e3 * cpu}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(cost: list[dict], fidelity: list[dict], args: argparse.Namespace) -> str:
    lines = [f"Cost per example of the projected fit's passes (basis + fit pass: gradients and curvature rows), CPU ms "
             f"(one thread), N = {args.cost_examples}, BERT {args.layers} x {args.hidden}, {args.length} tokens, "
             "label_samples = 1; in brackets, in plain gradient passes over the same examples", "",
             "| classes | gradient pass | exact | sampled | sampled / exact | exact vs C=min | sampled vs C=min "
             "| auto picks | auto vs C=min |", "|---|---|---|---|---|---|---|---|---|"]
    for r in cost:
        lines.append(f"| {r['classes']} | {r['gradient_pass_cpu_ms']:.1f} | {r['exact_cpu_ms']:.1f} "
                     f"({r['exact_passes']:.1f} passes) | {r['sampled_cpu_ms']:.1f} ({r['sampled_passes']:.1f} passes) "
                     f"| {r['sampled_over_exact']:.2f}x | {r['exact_vs_smallest']:.2f}x | {r['sampled_vs_smallest']:.2f}x "
                     f"| {r['auto']} | {r['auto_vs_smallest']:.2f}x |")
    lines += ["", f"Fidelity of sampled labels against the exact per-class fit (same model and data), N = "
                  f"{args.fidelity_examples}, 32 targets", "",
              "| classes | label_samples | train acc. | scores Pearson | scores Spearman | self-infl. Pearson "
              "| self-infl. Spearman | mislabel AUC exact | mislabel AUC sampled |", "|---|---|---|---|---|---|---|---|---|"]
    for r in fidelity:
        lines.append(f"| {r['classes']} | {r['label_samples']} | {r['train_accuracy']:.2f} | {r['scores_pearson']:.3f} "
                     f"| {r['scores_spearman']:.3f} | {r['self_pearson']:.3f} | {r['self_spearman']:.3f} "
                     f"| {r['mislabel_auc_exact']:.3f} | {r['mislabel_auc_sampled']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[2, 5, 20, 100])
    parser.add_argument("--fidelity_classes", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--cost_examples", type=int, default=256)
    parser.add_argument("--fidelity_examples", type=int, default=2048)
    parser.add_argument("--targets", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--skip", choices=["cost", "fidelity"], default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes")
    parser.add_argument("--output", help="results stem in benchmarks/results (default class_count[_quick])")
    args = parser.parse_args()
    if args.quick:
        args.classes, args.cost_examples, args.fidelity_examples = [2, 5, 20], 64, 128
        args.hidden, args.layers, args.length, args.epochs = 64, 2, 16, 2
    torch.set_num_threads(1)
    cost = [] if args.skip == "cost" else measure_cost(args)
    fidelity = [] if args.skip == "fidelity" else measure_fidelity(args)
    table = markdown(cost, fidelity, args)
    print(table)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = args.output or ("class_count_quick" if args.quick else "class_count")
    atomic_write_text(RESULTS_DIR / f"{stem}.json", json.dumps({"args": vars(args), "cost": cost, "fidelity": fidelity,
                                                                "load_average": os.getloadavg()}, indent=2) + "\n")
    atomic_write_text(RESULTS_DIR / f"{stem}.md", table)


if __name__ == "__main__":
    main()
