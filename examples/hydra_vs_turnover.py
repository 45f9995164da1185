"""Turn-over dropout vs. HYDRA on one checkpoint: how far do the two influence estimators agree?

One training run gives both estimators: ``turnover_hf.HydraTurnoverTrainer`` trains every review under its own
turn-over mask (Kobayashi et al., 2020) and tracks, at the same time, each review's HYDRA hypergradient
(Chen et al., 2021). This script

1. loads the real all-MiniLM-L6-v2 (``turnover_hf.assets.minilm_path()``) with a fresh 2-way head, adds a
   bottleneck adapter to the top 2 of its 6 layers only and patches it with turn-over dropout
   (``freeze_leaking=True``); the model's own dropout is switched off (``--model-dropout 0``) so the training
   gradient is exactly the weighted sum of the per-example gradients HYDRA tracks;
2. trains it on Rotten Tomatoes reviews (``turnover_hf.assets.rotten_tomatoes``, 64 tokens) with AdamW and
   reports the validation accuracy of the full network. HYDRA follows Adam with its documented approximation (the
   preconditioner held fixed); ``--optim sgd`` uses SGD with momentum 0.9, whose recurrence is exact up to the
   dropped Hessian term, but which trains this adapter far worse in the same number of steps (0.52 / 0.56
   validation accuracy at lr 0.1 / 0.3, against 0.65 for AdamW at 3e-3; 500 reviews, 3 epochs);
3. saves model, tokenizer and hypergradients (``trainer.save_model`` writes ``<output-dir>/model`` and the
   hypergradients in ``<output-dir>/model/hydra``);
4. opens the checkpoint twice, as ``InfluencePipeline(ckpt, train_dataset=train, estimator="turnover")`` and
   ``InfluencePipeline(ckpt, train_dataset=train, estimator="hydra")``, scores every training review against
   ``--n-targets`` validation reviews with each, and prints how well they agree: Spearman correlation per target
   (mean, range; also among the reviews of the target's label only, which removes the label signal both share)
   and over all (review, target) pairs, overlap of the top-10 proponents (with what chance gives), how
   target-specific each estimator's ranking is, correlation of self-influence, and the top-3 proponents of one
   target under each estimator;
5. writes the numbers to ``<output-dir>/results.json`` and both score matrices (rows: training reviews in
   ``example_id`` order; columns: targets) and self-influence vectors to ``<output-dir>/scores.safetensors``.

Run from the repository root (the default run takes a few minutes on 2 CPU cores; ``--quick`` well under a minute):

    PYTHONPATH=. python examples/hydra_vs_turnover.py
    PYTHONPATH=. python examples/hydra_vs_turnover.py --n-train 1000 --epochs 4 --output-dir runs/hvt_1000
    PYTHONPATH=. python examples/hydra_vs_turnover.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import numpy as np
import torch
from datasets import DatasetDict
from safetensors.torch import save_file
from torch import nn
from transformers import DataCollatorWithPadding, PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

import turnover_hf
from turnover_hf import demo
from turnover_hf.assets import LABEL_NAMES
from turnover_hf.evaluation import rankdata, spearman
from turnover_hf.files import atomic_path, atomic_write_text

TOP_K = 10  # proponents compared between the estimators
SHOWN = 3  # proponents printed for one target
ESTIMATORS = ("turnover", "hydra")


@dataclass
class Settings:
    """What the comparison trains on and how; ``--quick`` swaps in :data:`QUICK`."""

    n_train: int = 500
    n_targets: int = 20
    n_validation: int | None = None  # accuracy is measured on this many validation reviews (None: all 486)
    epochs: float = 3.0
    batch_size: int = 16
    optim: str = "adamw"  # "adamw" (approximate HYDRA recurrence) or "sgd" (momentum 0.9, exact recurrence)
    learning_rate: float | None = None  # None: 3e-3 for AdamW, 0.3 for SGD
    max_length: int = 64
    adapter_layers: int = 2
    reduction_factor: int = 8
    model_dropout: float = 0.0
    threads: int = 1  # torch threads: the many batch-of-one forwards of HYDRA run fastest on one
    seed: int = 0

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 0.3 if self.optim == "sgd" else 3e-3


QUICK = Settings(n_train=48, n_targets=4, n_validation=32, epochs=1.0, batch_size=16, max_length=32)


# ---------------------------------------------------------------------------------------------------------------
# Model, data, training
# ---------------------------------------------------------------------------------------------------------------
def build_model(settings: Settings) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """MiniLM, a fresh 2-way head, a bottleneck adapter in the top layers, patched with turn-over dropout: the demo's
    model (``turnover_hf.demo.build_model``), with MiniLM's own dropout at ``--model-dropout``."""
    model, tokenizer = demo.build_model(
        demo.DemoSettings(
            adapter_layers=settings.adapter_layers, reduction_factor=settings.reduction_factor, seed=settings.seed
        )
    )
    if settings.model_dropout:
        set_model_dropout(model, settings.model_dropout)
    return model, tokenizer


def set_model_dropout(model: PreTrainedModel, p: float) -> None:
    """Set MiniLM's own dropout to ``p``, as ``hidden_dropout_prob = attention_probs_dropout_prob = p`` at load time
    would have (the adapters' dropout stays as configured): the ``nn.Dropout`` modules, and the probability BERT's
    SDPA attention keeps as ``dropout_prob``."""
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = p
    for name, module in model.named_modules():
        if ".adapters." in f".{name}.":
            continue
        if isinstance(module, nn.Dropout):
            module.p = p
        if isinstance(getattr(module, "dropout_prob", None), float):
            module.dropout_prob = p


def train(settings: Settings, raw: DatasetDict, output_dir: str) -> tuple[str, dict[str, Any]]:
    """Train with ``HydraTurnoverTrainer``, save model + tokenizer + hypergradients; return the checkpoint folder."""
    model, tokenizer = build_model(settings)
    data = raw.map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=settings.max_length),
                   batched=True, remove_columns=["text"])
    # TrainingArguments(optim="sgd") ignores optim_args, so momentum goes in through optimizer_cls_and_kwargs.
    optimizer: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = (
        (torch.optim.SGD, {"lr": settings.lr, "momentum": 0.9}) if settings.optim == "sgd" else None
    )
    args = TrainingArguments(
        output_dir=os.path.join(output_dir, "trainer"),
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=128,
        learning_rate=settings.lr,
        warmup_ratio=0.1,
        group_by_length=True,  # batches of similar length: less padding, faster on CPU
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="epoch",
        seed=settings.seed,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        optim="adamw_torch",
    )
    trainer = turnover_hf.HydraTurnoverTrainer(
        model=model, args=args, data_collator=DataCollatorWithPadding(tokenizer), train_dataset=data["train"],
        eval_dataset=data["validation"], compute_metrics=demo.accuracy, optimizer_cls_and_kwargs=optimizer,
    )
    trainer.remove_callback(PrinterCallback)  # the summary below says what matters
    trainer.train()
    metrics = trainer.evaluate()
    ckpt = os.path.join(output_dir, "model")
    trainer.save_model(ckpt)  # weights, turn-over config and the hypergradients in ckpt/hydra
    tokenizer.save_pretrained(ckpt)
    info = {
        "validation_accuracy": metrics["eval_accuracy"],
        "validation_loss": metrics["eval_loss"],
        "validation_reviews": len(data["validation"]),
        "optimizer": trainer.hydra.optimizer_name,
        "optimizer_steps": trainer.hydra.steps,
        "tracked_parameters": trainer.hydra.dim,
        "max_residual": trainer.hydra.max_residual,
        "train_loss": next((h["train_loss"] for h in trainer.state.log_history if "train_loss" in h), None),
    }
    return ckpt, info


# ---------------------------------------------------------------------------------------------------------------
# Agreement measures
# ---------------------------------------------------------------------------------------------------------------
def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def compare(
    scores: dict[str, np.ndarray], self_influence: dict[str, np.ndarray], train_labels: np.ndarray,
    target_labels: np.ndarray,
) -> dict[str, Any]:
    """Agreement of two (n_train, n_targets) score matrices and two self-influence vectors."""
    t, h = scores["turnover"], scores["hydra"]
    n, k = t.shape[0], min(TOP_K, t.shape[0])
    per_target = [spearman(t[:, j], h[:, j]) for j in range(t.shape[1])]
    # Both estimators rank same-label reviews above the others; among the reviews of the target's label that shared
    # signal is gone and what is left is their agreement on which of those reviews matter.
    within_label = [spearman(t[train_labels == y, j], h[train_labels == y, j]) for j, y in enumerate(target_labels)]
    overlap = []
    same_label: dict[str, list[float]] = {name: [] for name in ESTIMATORS}
    for j in range(t.shape[1]):
        tops = {name: np.argsort(-scores[name][:, j], kind="mergesort")[:k] for name in ESTIMATORS}
        overlap.append(len(set(tops["turnover"].tolist()) & set(tops["hydra"].tolist())) / k)
        for name in ESTIMATORS:
            same_label[name].append(float((train_labels[tops[name]] == target_labels[j]).mean()))
    # How target-specific each estimator is: mean Spearman between the columns of two different targets with the
    # same label (1 = one ranking serves every target of that label), and how many distinct reviews fill the top-k
    # lists of all targets (k x n_targets if no two targets share one).
    same_pairs = np.equal.outer(target_labels, target_labels) & ~np.eye(len(target_labels), dtype=bool)
    within: dict[str, float] = {}
    distinct: dict[str, int] = {}
    for name in ESTIMATORS:
        corr = np.corrcoef(rankdata(scores[name], axis=0).T)  # (targets, targets)
        within[name] = float(np.asarray(corr)[same_pairs].mean()) if same_pairs.any() else float("nan")
        distinct[name] = len({int(i) for j in range(t.shape[1])
                              for i in np.argsort(-scores[name][:, j], kind="mergesort")[:k]})
    return {
        "spearman_per_target": per_target,
        "spearman_per_target_mean": float(np.mean(per_target)),
        "spearman_per_target_min": float(np.min(per_target)),
        "spearman_per_target_max": float(np.max(per_target)),
        "spearman_per_target_same_label_mean": float(np.nanmean(within_label)),
        "spearman_all_pairs": spearman(t.ravel(), h.ravel()),
        "pearson_all_pairs": pearson(t.ravel(), h.ravel()),
        "sign_agreement": float((np.sign(t) == np.sign(h)).mean()),
        "top_k": k,
        "top_k_overlap_per_target": overlap,
        "top_k_overlap_mean": float(np.mean(overlap)),
        "top_k_overlap_chance": k / n,  # expected overlap of two independent random top-k sets
        "top_k_same_label": {name: float(np.mean(v)) for name, v in same_label.items()},
        "same_label_base_rate": float(np.mean([(train_labels == y).mean() for y in target_labels])),
        "spearman_between_same_label_targets": within,
        "distinct_top_k_proponents": distinct,
        "self_influence_spearman": spearman(self_influence["turnover"], self_influence["hydra"]),
        "self_influence_pearson": pearson(self_influence["turnover"], self_influence["hydra"]),
        "self_influence_positive": {name: float((v > 0).mean()) for name, v in self_influence.items()},
    }


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------
def run(settings: Settings, output_dir: str) -> dict[str, Any]:
    """Train once, score with both estimators, compare; write ``results.json``; return the results."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] = now - clock
        clock = now

    raw = turnover_hf.assets.rotten_tomatoes(seed=settings.seed, n_train=settings.n_train,
                                             n_validation=settings.n_validation, n_test=1)
    ckpt, training = train(settings, raw, output_dir)
    lap("train + save")

    train_set, targets = raw["train"], raw["validation"].select(range(settings.n_targets))
    scores: dict[str, np.ndarray] = {}
    self_influence: dict[str, np.ndarray] = {}
    for name in ESTIMATORS:
        pipe = turnover_hf.InfluencePipeline(ckpt, train_dataset=train_set, estimator=name,
                                             max_length=settings.max_length)
        lap(f"{name}: load")
        scores[name] = pipe.scores(targets).numpy()
        lap(f"{name}: scores")
        self_influence[name] = np.asarray(pipe.self_influence()["self_influence"], dtype=np.float64)
        lap(f"{name}: self-influence")

    agreement = compare(scores, self_influence, np.asarray(train_set["label"]), np.asarray(targets["label"]))
    shown_target = 0  # the first validation review
    example = {
        "target": {"example_id": targets[shown_target]["example_id"], "text": targets[shown_target]["text"],
                   "label": LABEL_NAMES[targets[shown_target]["label"]]},
        **{name: [
            {"example_id": int(train_set[int(i)]["example_id"]), "score": float(scores[name][int(i), shown_target]),
             "label": LABEL_NAMES[train_set[int(i)]["label"]], "text": train_set[int(i)]["text"]}
            for i in np.argsort(-scores[name][:, shown_target], kind="mergesort")[:SHOWN]
        ] for name in ESTIMATORS},
    }
    results = {
        "settings": {**dataclasses.asdict(settings), "learning_rate": settings.lr},
        "training": training,
        "agreement": agreement,
        "score_scale": {name: {"mean_abs": float(np.abs(s).mean()), "std": float(s.std())}
                        for name, s in scores.items()},
        "example": example,
        "seconds": seconds,
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_text(os.path.join(output_dir, "results.json"), json.dumps(results, indent=2) + "\n")
    matrices = {f"scores_{name}": torch.from_numpy(scores[name]).contiguous() for name in ESTIMATORS}
    matrices |= {f"self_influence_{name}": torch.from_numpy(self_influence[name]).contiguous() for name in ESTIMATORS}
    matrices |= {"train_example_ids": torch.tensor(train_set["example_id"]),
                 "target_example_ids": torch.tensor(targets["example_id"])}
    with atomic_path(os.path.join(output_dir, "scores.safetensors")) as tmp:
        save_file(matrices, tmp)
    return results


def one_line(text: str, width: int) -> str:
    """``text`` on one line (reviews hold line breaks), cut to ``width`` characters."""
    return " ".join(text.split())[:width]


def print_report(results: dict[str, Any], output_dir: str) -> None:
    """The comparison as plain-text tables on stdout."""
    s, tr, ag = results["settings"], results["training"], results["agreement"]
    print(f"\n== turn-over dropout vs. HYDRA: all-MiniLM-L6-v2 + adapter in the top {s['adapter_layers']} layers, "
          f"{s['n_train']} Rotten Tomatoes reviews ==")
    print(f"training: {tr['optimizer']} lr {s['learning_rate']:g}, {s['epochs']:g} epoch(s), "
          f"{tr['optimizer_steps']} steps, batch {s['batch_size']}; train loss {tr['train_loss']:.4f}")
    print(f"validation accuracy (full network): {tr['validation_accuracy']:.4f} on {tr['validation_reviews']} reviews")
    print(f"HYDRA: {tr['tracked_parameters']} tracked parameters, max gradient residual {tr['max_residual']:.1e}")
    n_targets = len(ag["spearman_per_target"])
    print(f"\nagreement over {n_targets} validation targets x {s['n_train']} training reviews")
    rows = [
        ("Spearman per target: mean", f"{ag['spearman_per_target_mean']:+.3f}"),
        ("Spearman per target: min / max",
         f"{ag['spearman_per_target_min']:+.3f} / {ag['spearman_per_target_max']:+.3f}"),
        ("Spearman per target, only reviews of the target's label: mean",
         f"{ag['spearman_per_target_same_label_mean']:+.3f}"),
        ("Spearman over all pairs", f"{ag['spearman_all_pairs']:+.3f}"),
        ("Pearson over all pairs", f"{ag['pearson_all_pairs']:+.3f}"),
        ("same sign", f"{ag['sign_agreement']:.3f}"),
        (f"top-{ag['top_k']} proponent overlap (chance)",
         f"{ag['top_k_overlap_mean']:.3f} ({ag['top_k_overlap_chance']:.3f})"),
        (f"top-{ag['top_k']} proponents with the target's label: turn-over / HYDRA (base rate)",
         (f"{ag['top_k_same_label']['turnover']:.3f} / {ag['top_k_same_label']['hydra']:.3f} "
          f"({ag['same_label_base_rate']:.3f})")),
        ("Spearman between two same-label targets, one estimator: turn-over / HYDRA",
         (f"{ag['spearman_between_same_label_targets']['turnover']:+.3f} / "
          f"{ag['spearman_between_same_label_targets']['hydra']:+.3f}")),
        (f"distinct reviews in all top-{ag['top_k']} lists: turn-over / HYDRA (of {ag['top_k'] * n_targets})",
         f"{ag['distinct_top_k_proponents']['turnover']} / {ag['distinct_top_k_proponents']['hydra']}"),
        ("self-influence: Spearman / Pearson",
         f"{ag['self_influence_spearman']:+.3f} / {ag['self_influence_pearson']:+.3f}"),
        ("self-influence > 0: turn-over / HYDRA",
         f"{ag['self_influence_positive']['turnover']:.3f} / {ag['self_influence_positive']['hydra']:.3f}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print("  Spearman per target: " + " ".join(f"{v:+.2f}" for v in ag["spearman_per_target"]))

    ex = results["example"]
    print(f"\ntarget #{ex['target']['example_id']} [{ex['target']['label']}]: {one_line(ex['target']['text'], 110)}")
    for name in ESTIMATORS:
        print(f"  top-{SHOWN} proponents, {name}:")
        for row in ex[name]:
            print(f"    {row['score']:+.3e}  [{row['label']}] #{row['example_id']}: {one_line(row['text'], 90)}")
    print("\nwall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in results["seconds"].items())
          + f"; total {sum(results['seconds'].values()):.1f} s ({results['torch_threads']} torch thread(s))")
    print(f"results: {os.path.join(output_dir, 'results.json')}")


def parse_args(argv: Sequence[str] | None) -> tuple[Settings, str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, help=f"training reviews (default {Settings.n_train})")
    parser.add_argument("--n-targets", type=int, help=f"validation reviews scored (default {Settings.n_targets})")
    parser.add_argument("--epochs", type=float, help=f"training epochs (default {Settings.epochs:g})")
    parser.add_argument("--batch-size", type=int, help=f"training batch (default {Settings.batch_size})")
    parser.add_argument("--optim", choices=("adamw", "sgd"), help="adamw (default) or sgd with momentum 0.9")
    parser.add_argument("--lr", type=float, help="learning rate (default 3e-3 for adamw, 0.3 for sgd)")
    parser.add_argument("--model-dropout", type=float, help="MiniLM's own dropout while training (default 0)")
    parser.add_argument("--threads", type=int, help=f"torch threads (default {Settings.threads})")
    parser.add_argument("--seed", type=int, help="seed of masks, head and data order (default 0)")
    parser.add_argument("--output-dir", default="runs/hydra_vs_turnover")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, one epoch, 4 targets")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else Settings()
    chosen = {"n_train": args.n_train, "n_targets": args.n_targets, "epochs": args.epochs,
              "batch_size": args.batch_size, "optim": args.optim, "learning_rate": args.lr,
              "model_dropout": args.model_dropout, "threads": args.threads, "seed": args.seed}
    return dataclasses.replace(base, **{k: v for k, v in chosen.items() if v is not None}), args.output_dir


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    settings, output_dir = parse_args(argv)
    torch.set_num_threads(settings.threads)
    hf_logging.set_verbosity_error()  # the fresh-head notice of every load
    logging.getLogger("adapters").setLevel(logging.ERROR)  # "none are activated" while a checkpoint is restored
    datasets.disable_progress_bars()
    results = run(settings, output_dir)
    print_report(results, output_dir)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
