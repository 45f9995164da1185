"""Fine-tune MiniLM with turn-over dropout on Rotten Tomatoes (offline, CPU) and explain its predictions.

``bash run.sh demo`` runs ``python -m turnover_hf.demo``, which

1. loads all-MiniLM-L6-v2 (:func:`turnover_hf.assets.minilm_path`) with a bottleneck adapter (library ``adapters``)
   in its top layers and patches it with turn-over dropout (masks on the adapters and the classifier);
2. trains it on Rotten Tomatoes reviews (:func:`turnover_hf.assets.rotten_tomatoes`) with ``TurnoverTrainer``,
   logging the flip-sanity losses of Kobayashi et al. (2020, Fig. 2) at each epoch's evaluation;
3. saves it, reloads it with :func:`turnover_hf.load_influence_ready` and checks the reload predicts the same;
4. lists the strongest proponents and opponents among the training reviews of its most confident validation errors,
   scored by :class:`turnover_hf.InfluencePipeline` with its default estimator (``--estimator``; for this
   classifier the influence function, the most faithful in ``benchmarks/fidelity.py``; ``turnover`` scores with
   the model's own masks, forward passes only);
5. computes every training review's self-influence (the paper's App. E) and lists the extremes;
6. scores a sample of validation reviews against a sample of training reviews, for the influence-by-class heatmap;
7. writes ``report.html`` (self-contained, with the plots of :mod:`turnover_hf.plots`), ``report.md``,
   ``results.json`` and the plots as PNG files into ``--output-dir``.

The default settings take about 11 minutes on one thread of a shared 2-core machine (training, fitting the
influence function and the self-influence of every review take about a third each); ``--quick`` is a smoke run of
well under a minute.

Example:
    $ python -m turnover_hf.demo --quick --output-dir runs/quick
    $ python -m turnover_hf.demo --n-train 2000 --epochs 3
    $ xdg-open runs/demo/report.html
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, DatasetDict
from tqdm.auto import tqdm
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
    set_seed,
)

import turnover_hf as th

from .assets import LABEL_NAMES, minilm_path, rotten_tomatoes
from .audit import KINDS as AUDIT_KINDS
from .demo_report import RELOAD_CHECK_ROWS, balanced_rows, demo_figures, print_summary, render_report, write_html_report
from .estimators import estimator_names
from .files import atomic_write_text
from .losses import model_inputs

ADAPTER_NAME = "rt"
NUM_LAYERS = 6  # all-MiniLM-L6-v2


@dataclass
class DemoSettings:
    """What the demo trains on and how; ``--quick`` swaps in :data:`QUICK`."""

    n_train: int = 2000
    n_validation: int | None = None  # None: the whole split (486 reviews)
    n_test: int | None = None  # None: the whole split (973 reviews)
    epochs: float = 2.0
    max_length: int = 64
    batch_size: int = 32
    learning_rate: float = 3e-3
    adapter_layers: int = 3  # bottleneck adapters in the top layers only: backward stops below them
    reduction_factor: int = 8  # adapter width = 384 / reduction_factor
    sanity_examples: int = 200
    explained_errors: int = 3
    top_k: int = 3
    listed_self_influence: int = 5
    report_suspects: int = 10  # highest self-influence reviews listed in the HTML report
    heatmap_targets: int = 16  # validation reviews (half of each class) for the influence-by-class heatmap ...
    heatmap_train: int = 128  # ... scored against this many training reviews (a random sample: the split is shuffled)
    evaluations_per_epoch: int = 2  # points of the flip-sanity curves (Fig. 2) per epoch
    seed: int = 0
    estimator: str = "auto"  # InfluencePipeline's estimator for every score the demo shows


QUICK = DemoSettings(
    n_train=64, n_validation=32, n_test=32, epochs=1.0, max_length=32, batch_size=16, sanity_examples=16,
    explained_errors=1, heatmap_targets=8, heatmap_train=64, evaluations_per_epoch=1,
)


def build_model(settings: DemoSettings) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """MiniLM with a fresh 2-way head and a trainable bottleneck adapter, patched with turn-over dropout.

    Every trainable parameter the masks do not cover (the classifier's bias) is frozen, so the flipped sub-network
    of an example has learned nothing from it. Ordinary dropout is off: the pretrained layers are frozen, the
    instance masks already regularise what is trained, and on CPU it cost a quarter of the training time without
    improving validation accuracy.
    """
    import adapters

    path = minilm_path()
    set_seed(settings.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=2,
        id2label=dict(enumerate(LABEL_NAMES)),
        label2id={name: i for i, name in enumerate(LABEL_NAMES)},
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    adapters.init(model)
    leave_out = list(range(NUM_LAYERS - settings.adapter_layers))
    model.add_adapter(
        ADAPTER_NAME, config=adapters.SeqBnConfig(reduction_factor=settings.reduction_factor, leave_out=leave_out)
    )
    model.train_adapter(ADAPTER_NAME)
    model = th.patch_model(model, th.TurnoverConfig(seed=settings.seed), freeze_leaking=True)
    return model, AutoTokenizer.from_pretrained(path)


def tokenize(data: DatasetDict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> DatasetDict:
    """Token ids of every split; ``label`` and ``example_id`` are kept, ``text`` is dropped."""
    return data.map(
        lambda rows: tokenizer(rows["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
        desc="tokenize",
    )


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """``compute_metrics`` for the Trainer: the fraction of argmax predictions equal to the label."""
    logits, labels = prediction.predictions, prediction.label_ids
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def length_sorted_batches(
    rows: Sequence[dict[str, Any]], collator: Callable, batch_size: int, desc: str
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Collated batches of ``rows`` in order of token count (little padding), each with the row indices it holds."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        indices = order[start : start + batch_size]
        yield indices, collator([rows[i] for i in indices])


@torch.no_grad()
def predict(
    model: PreTrainedModel, rows: Sequence[dict[str, Any]], collator: Callable, batch_size: int = 128
) -> torch.Tensor:
    """Logits of the full network (no masks), one row per entry of ``rows``, in their order."""
    model.eval()
    logits = torch.empty(len(rows), model.config.num_labels)
    device = model.device
    for indices, batch in length_sorted_batches(rows, collator, batch_size, "predict"):
        logits[indices] = model(**model_inputs(batch, device)).logits.float().cpu()
    return logits


def review(raw: Dataset, row: int, **extra: Any) -> dict[str, Any]:
    """A review as the report shows it: id, label name, text, and any extra fields."""
    entry = raw[row]
    return {
        "example_id": int(entry["example_id"]), "label": LABEL_NAMES[entry["label"]], "text": entry["text"], **extra
    }


def explain_errors(
    pipe: th.InfluencePipeline,
    raw: DatasetDict,
    rows: dict[str, list[dict[str, Any]]],
    validation_logits: torch.Tensor,
    settings: DemoSettings,
) -> list[dict[str, Any]]:
    """Top proponents and opponents (influence on the true label's loss) of the most confident errors.

    Each explanation also holds the mean influence of the training reviews that share the target's label and of
    those that do not: the first should be the larger if the scores carry signal beyond their noise.
    """
    probabilities = validation_logits.softmax(-1)
    labels = torch.tensor(raw["validation"]["label"])
    wrong = (probabilities.argmax(-1) != labels).nonzero().flatten()
    confidence = probabilities[wrong].max(-1).values
    chosen = wrong[confidence.argsort(descending=True)][: settings.explained_errors].tolist()
    train_labels = torch.tensor(raw["train"]["label"])
    explanations = []
    matrix = pipe.scores([rows["validation"][row] for row in chosen]) if chosen else None  # (n_train, errors)
    for column, row in enumerate(chosen):
        scores = matrix[:, column]
        ranked = scores.argsort(descending=True).tolist()
        k = settings.top_k
        same_label = train_labels == labels[row]
        explanations.append(review(
            raw["validation"], row,
            predicted=LABEL_NAMES[int(probabilities[row].argmax())],
            confidence=float(probabilities[row].max()),
            mean_same_label=float(scores[same_label].mean()),
            mean_other_label=float(scores[~same_label].mean()),
            proponents=[review(raw["train"], i, score=float(scores[i])) for i in ranked[:k]],
            opponents=[review(raw["train"], i, score=float(scores[i])) for i in ranked[::-1][:k]],
        ))
    return explanations


def parse_args(argv: Sequence[str] | None = None) -> tuple[DemoSettings, str]:
    """Settings and output folder from the command line; unset options keep the (quick) defaults."""
    parser = argparse.ArgumentParser(prog="python -m turnover_hf.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, help=f"training reviews (default {DemoSettings.n_train}; at most 3404)")
    parser.add_argument("--epochs", type=float, help=f"training epochs (default {DemoSettings.epochs:g})")
    parser.add_argument("--seed", type=int, help="seed of the split, the masks and training (default 0)")
    parser.add_argument("--max-length", type=int, help=f"tokens per review (default {DemoSettings.max_length})")
    parser.add_argument("--adapter-layers", type=int, choices=range(1, NUM_LAYERS + 1),
                        help=f"top layers that get an adapter (default {DemoSettings.adapter_layers})")
    parser.add_argument(
        "--output-dir", default=os.path.join("runs", "demo"), help="where the model and report go (default runs/demo)"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (64 reviews, 1 epoch)")
    parser.add_argument("--estimator", choices=estimator_names(),
                        help="InfluencePipeline's estimator for every score shown (default auto: the influence "
                             "function for this classifier; turnover: the model's own masks, forward passes only)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else DemoSettings()
    chosen = {
        "n_train": args.n_train, "epochs": args.epochs, "seed": args.seed, "max_length": args.max_length,
        "adapter_layers": args.adapter_layers, "estimator": args.estimator,
    }
    return dataclasses.replace(settings, **{k: v for k, v in chosen.items() if v is not None}), args.output_dir


def run(settings: DemoSettings, output_dir: str) -> dict[str, Any]:
    """Train, save, reload and explain; write ``report.md`` and ``results.json``; return the results."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] = now - clock
        clock = now

    raw = rotten_tomatoes(
        seed=settings.seed, n_train=settings.n_train, n_validation=settings.n_validation, n_test=settings.n_test
    )
    model, tokenizer = build_model(settings)
    data = tokenize(raw, tokenizer, settings.max_length)
    collator = th.InstanceIdCollator(DataCollatorWithPadding(tokenizer))
    lap("load")

    sanity = th.FlipSanityCallback(
        data["train"].select(range(min(settings.sanity_examples, len(data["train"])))),
        DataCollatorWithPadding(tokenizer),
    )
    # Several evaluations per epoch give the flip-sanity curves (Fig. 2) more than one point per epoch.
    steps_per_epoch = -(-len(data["train"]) // settings.batch_size)
    every = max(1, -(-steps_per_epoch // settings.evaluations_per_epoch))
    schedule = (
        {"eval_strategy": "epoch", "logging_strategy": "epoch"} if settings.evaluations_per_epoch <= 1
        else {"eval_strategy": "steps", "eval_steps": every, "logging_strategy": "steps", "logging_steps": every}
    )
    args = TrainingArguments(
        output_dir=os.path.join(output_dir, "trainer"),
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=128,
        learning_rate=settings.learning_rate,
        warmup_ratio=0.1,
        group_by_length=True,  # batches of similar length: less padding, faster on CPU
        save_strategy="no",
        **schedule,
        seed=settings.seed,
        use_cpu=True,
        report_to=[],
    )
    trainer = th.TurnoverTrainer(
        model=model, args=args, data_collator=DataCollatorWithPadding(tokenizer),
        train_dataset=data["train"], eval_dataset=data["validation"], compute_metrics=accuracy, callbacks=[sanity],
    )
    trainer.train()
    lap("train")

    rows = {split: data[split].to_list() for split in data}
    logits = {split: predict(model, rows[split], collator) for split in ("validation", "test")}
    model_dir = os.path.join(output_dir, "model")
    model.save_pretrained(model_dir)
    reloaded = th.load_influence_ready(model_dir)
    checked = rows["validation"][:RELOAD_CHECK_ROWS]
    reload_diff = float((predict(reloaded, checked, collator) - predict(model, checked, collator)).abs().max())
    lap("evaluate, save, reload")

    labels = {split: torch.tensor(raw[split]["label"]) for split in ("validation", "test")}
    accuracies = {
        split: (len(labels[split]), float((logits[split].argmax(-1) == labels[split]).float().mean()))
        for split in labels
    }
    pipe = th.InfluencePipeline(
        reloaded, tokenizer, train_dataset=data["train"], batch_size=settings.batch_size, estimator=settings.estimator,
        max_length=settings.max_length,
    )
    errors = explain_errors(pipe, raw, rows, logits["validation"], settings)
    lap(f"influence ({pipe.estimator}, fit included)")

    scores = torch.tensor(pipe.self_influence()["self_influence"])
    ranked = scores.argsort(descending=True).tolist()
    n = settings.listed_self_influence
    lap("self-influence")

    # Suspected label errors as benchmarks/label_errors.py measured best (not self-influence; see docs/method/label-errors.md)
    issues = pipe.label_issues()
    row_of = {int(i): r for r, i in enumerate(raw["train"]["example_id"])}
    label_issues = {
        "method": issues[0]["method"],
        "flagged": int(sum(issues["is_issue"])),
        "top": [review(raw["train"], row_of[int(row["example_id"])], score=float(row["score"]),
                       suggested=row.get("suggested_label_name", row["suggested_label"]))
                for row in issues.select(range(min(n, len(issues))))],
    }
    lap("label issues")

    # One audit of the data (docs/guides/audit.md): wrong labels, duplicates, leakage into validation/test,
    # outliers and the training reviews most harmful to the validation set.
    audit = pipe.audit(validation=raw["validation"], test=raw["test"])
    audit_summary = {
        "counts": {kind: int(sum(k == kind for k in audit["kind"])) for kind in AUDIT_KINDS},
        "notes": audit.info.description or "",
        "top": {kind: [{"example_id": int(row["example_id"]), "reason": row["reason"]}
                       for row in audit.filter(lambda r, kind=kind: r["kind"] == kind).select_columns(
                           ["example_id", "reason"]).to_list()[:n]]
                for kind in AUDIT_KINDS},
    }
    lap("audit")

    heatmap_rows = [rows["validation"][i] for i in balanced_rows(raw["validation"]["label"], settings.heatmap_targets)]
    heatmap_train = min(settings.heatmap_train, len(raw["train"]))
    class_scores = pipe.scores(heatmap_rows, example_ids=raw["train"]["example_id"][:heatmap_train])
    lap("influence by class")

    results = {
        "settings": dataclasses.asdict(settings),
        "estimator": pipe.estimator,
        "accuracy": accuracies,
        "reload_max_logit_diff": reload_diff,
        "flip_sanity": sanity.history,
        "errors": errors,
        "label_issues": label_issues,
        "audit": audit_summary,
        "self_influence": {
            "mean": float(scores.mean()),
            "median": float(scores.median()),
            "fraction_positive": float((scores > 0).float().mean()),
            "highest": [review(raw["train"], i, score=float(scores[i])) for i in ranked[:n]],
            "lowest": [review(raw["train"], i, score=float(scores[i])) for i in ranked[::-1][:n]],
        },
        "seconds": seconds,
    }
    figures, captions = demo_figures(
        scores, trainer.state.log_history, class_scores, raw["train"]["label"][:heatmap_train],
        [row["label"] for row in heatmap_rows], output_dir,
    )
    suspects = [review(raw["train"], i, score=float(scores[i])) for i in ranked[: settings.report_suspects]]
    write_html_report(results, reloaded.turnover_config, suspects, figures, captions, output_dir, audit=audit)
    atomic_write_text(os.path.join(output_dir, "results.json"), json.dumps(results, indent=2) + "\n")
    atomic_write_text(os.path.join(output_dir, "report.md"), render_report(results))
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m turnover_hf.demo``; returns the results it wrote."""
    settings, output_dir = parse_args(argv)
    results = run(settings, output_dir)
    print_summary(results, output_dir)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
