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
import html
import json
import os
import re
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
from .errors import TurnoverError
from .estimators import estimator_names, get_estimator
from .files import atomic_write_text
from .losses import model_inputs
from . import plots
from .report import write_report

ADAPTER_NAME = "rt"
NUM_LAYERS = 6  # all-MiniLM-L6-v2
RELOAD_CHECK_ROWS = 64  # validation reviews on which the reloaded checkpoint must predict as the trained model


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


def shorten(text: str, width: int = 100) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


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


def print_review(prefix: str, item: dict[str, Any]) -> None:
    """One line per review: score (if any), label, id and the shortened text."""
    score = f"{item['score']:+.4f}  " if "score" in item else ""
    print(f"{prefix}{score}[{item['label']}] #{item['example_id']} {shorten(item['text'])}")


def render_report(results: dict[str, Any]) -> str:
    """The Markdown report of one demo run."""
    s, timing, si = results["settings"], results["seconds"], results["self_influence"]

    def item(entry: dict[str, Any]) -> str:
        score = f"{entry['score']:+.4f} " if "score" in entry else ""
        text = shorten(entry["text"], 140).replace("|", "\\|")
        return f"| {score.strip() or '–'} | {entry['label']} | {entry['example_id']} | {text} |"

    table_head = "| score | label | id | review |\n|---|---|---|---|"
    lines = [
        "# turnover-hf demo: MiniLM + turn-over dropout on Rotten Tomatoes",
        "",
        f"Scores: `InfluencePipeline(estimator={s['estimator']!r})` scored with **{results['estimator']}**.",
        "",
        (f"all-MiniLM-L6-v2 with a bottleneck adapter (reduction factor {s['reduction_factor']}) in its top "
         f"{s['adapter_layers']} layers, instance masks (p = 0.5, seed {s['seed']}) on the adapters and the "
         f"classifier; trained on {s['n_train']} reviews for {s['epochs']:g} epoch(s), max length {s['max_length']}, "
         f"batch {s['batch_size']}, learning rate {s['learning_rate']:g}; CPU, {torch.get_num_threads()} thread(s)."),
        "",
        "## Accuracy",
        "",
        "| split | reviews | accuracy |",
        "|---|---|---|",
        *(f"| {split} | {n} | {acc:.4f} |" for split, (n, acc) in results["accuracy"].items()),
        "",
        (f"Reloaded with `load_influence_ready`: largest logit difference to the trained model on "
         f"{min(RELOAD_CHECK_ROWS, results['accuracy']['validation'][0])} validation reviews: "
         f"{results['reload_max_logit_diff']:.2e}."),
        "",
        "## Flip sanity (Kobayashi et al. 2020, Fig. 2)",
        "",
        (f"Loss of {s['sanity_examples']} training reviews under their own masks (seen) and flipped masks (unseen), "
         "against the validation loss of the full network. The unseen loss should track the validation loss."),
        "",
        "| step | seen (mask) | unseen (flip) | validation |",
        "|---|---|---|---|",
        *(
            f"| {h['step']} | {h['train_sample_loss_mask']:.4f} | {h['train_sample_loss_flip']:.4f} | "
            f"{h.get('eval_loss', float('nan')):.4f} |"
            for h in results["flip_sanity"]
        ),
        "",
        "## Why did it get these wrong?",
        "",
        ("The model's most confident validation errors. Influence of a training review on the true label's loss: "
         "positive = it helped the right answer (proponent), negative = it pushed towards the wrong one (opponent). "
         f"{get_estimator(results['estimator']).worth} The mean over each label shows whether the scores carry signal."),
    ]
    if not results["errors"]:
        lines += ["", "No validation review was misclassified."]
    for error in results["errors"]:
        lines += [
            "",
            f"### #{error['example_id']}: {error['label']}, predicted {error['predicted']} ({error['confidence']:.2f})",
            "",
            f"> {shorten(error['text'], 400)}",
            "",
            (f"Mean influence of the training reviews labelled {error['label']}: {error['mean_same_label']:+.4f}; "
             f"of the others: {error['mean_other_label']:+.4f}."),
            "",
            "Proponents:",
            "",
            table_head,
            *(item(p) for p in error["proponents"]),
            "",
            "Opponents:",
            "",
            table_head,
            *(item(o) for o in error["opponents"]),
        ]
    lines += [
        "",
        "## Self-influence",
        "",
        (f"Influence of each training review on itself: mean {si['mean']:+.4f}, median {si['median']:+.4f}, "
         f"positive for {si['fraction_positive']:.1%} of {s['n_train']} reviews (the paper's App. E finds it positive "
         "on average: training on an example helps the model on that example)."),
        "",
        "Highest: reviews the model had to memorise, unlike the rest of the data. Possibly mislabelled or odd.",
        "",
        table_head,
        *(item(x) for x in si["highest"]),
        "",
        get_estimator(results["estimator"]).low_self_influence,
        "",
        table_head,
        *(item(x) for x in si["lowest"]),
        "",
        "## Time (seconds)",
        "",
        "| phase | seconds |",
        "|---|---|",
        *(f"| {phase} | {seconds:.1f} |" for phase, seconds in timing.items()),
        "",
    ]
    return "\n".join(lines)


def balanced_rows(labels: Sequence[int], count: int) -> list[int]:
    """The first ``count`` row indices with as many of each label as possible (in row order within a label)."""
    classes = sorted(set(labels))
    per_class = {c: [i for i, y in enumerate(labels) if y == c] for c in classes}
    chosen: list[int] = []
    for k in range(len(labels)):
        for c in classes:
            if len(chosen) < count and k < len(per_class[c]):
                chosen.append(per_class[c][k])
    return sorted(chosen)


def demo_figures(
    self_scores: torch.Tensor,
    log_history: list[dict[str, Any]],
    class_scores: torch.Tensor,
    train_labels: Sequence[int],
    target_labels: Sequence[int],
    output_dir: str,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The demo's plots (also saved as PNGs in ``output_dir/plots``) and their captions; none without matplotlib."""
    try:

        folder = os.path.join(output_dir, "plots")
        figures = {
            "Self-influence": plots.self_influence_histogram(
                self_scores, path=os.path.join(folder, "self_influence.png")
            ),
            "Flip sanity": plots.flip_sanity_curves(log_history, path=os.path.join(folder, "flip_sanity.png")),
            "Influence by class": plots.class_influence_heatmap(
                class_scores, train_labels, target_labels, label_names=LABEL_NAMES,
                path=os.path.join(folder, "influence_by_class.png"),
            ),
        }
    except TurnoverError as err:  # matplotlib missing: the report is written without plots
        print(f"no plots: {err}")
        return {}, {}
    captions = {
        "Self-influence": ("Influence of every training review on itself (paper App. E). Most help themselves; the "
                           "right tail holds memorised, often mislabelled reviews."),
        "Flip sanity": ("Loss of training reviews under their own masks (seen) and flipped masks (unseen) at each "
                        "evaluation, with the validation loss (paper Fig. 2): the unseen loss should track it."),
        "Influence by class": (f"Mean influence of {len(train_labels)} training reviews, by class, on "
                               f"{len(target_labels)} validation reviews (half of each class), by class; a positive "
                               "diagonal means each class helps itself."),
    }
    return figures, captions


def write_html_report(
    results: dict[str, Any], config: th.TurnoverConfig, suspects: list[dict[str, Any]], figures: dict[str, Any],
    captions: dict[str, str], output_dir: str,
) -> str:
    """``report.html``: the run's settings, metrics, explained errors, suspects and plots on one page."""

    s, si = results["settings"], results["self_influence"]
    metrics = {f"{split} accuracy": acc for split, (_, acc) in results["accuracy"].items()}
    metrics |= {
        "mean self-influence": si["mean"], "self-influence > 0": f"{si['fraction_positive']:.1%}",
        "reload max logit diff": results["reload_max_logit_diff"], "time (s)": round(sum(results["seconds"].values())),
    }
    summary = (
        f"all-MiniLM-L6-v2 with a bottleneck adapter (reduction factor {s['reduction_factor']}) in its top "
        f"{s['adapter_layers']} layers and turn-over dropout (p = {config.p:g}, seed {config.seed}) on the adapters "
        f"and the classifier, fine-tuned on {s['n_train']} Rotten Tomatoes reviews for {s['epochs']:g} epoch(s) "
        f"on the CPU. The explained predictions are the model's most confident validation errors."
    )
    return write_report(
        os.path.join(output_dir, "report.html"), overwrite=True,  # the demo's own output folder
        title="turnover-hf demo: MiniLM + turn-over dropout on Rotten Tomatoes", summary=summary, config=config,
        model="all-MiniLM-L6-v2 + adapter", metrics=metrics,
        dataset_sizes={"training reviews": s["n_train"], "validation reviews": results["accuracy"]["validation"][0]},
        explanations=[{**error, "members": 1} for error in results["errors"]], suspects=suspects,
        figures=figures, captions=captions, top_k=s["top_k"], max_suspects=s["report_suspects"],
        estimator=results["estimator"],
    )


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
    write_html_report(results, reloaded.turnover_config, suspects, figures, captions, output_dir)
    atomic_write_text(os.path.join(output_dir, "results.json"), json.dumps(results, indent=2) + "\n")
    atomic_write_text(os.path.join(output_dir, "report.md"), render_report(results))
    return results


def print_summary(results: dict[str, Any], output_dir: str) -> None:
    """What the report says, in short, on stdout."""
    for split, (n, acc) in results["accuracy"].items():
        print(f"{split} accuracy: {acc:.4f} ({n} reviews)")
    print(f"reload: largest logit difference {results['reload_max_logit_diff']:.2e}")
    for error in results["errors"]:
        print(f"\nmisclassified (predicted {error['predicted']}, {error['confidence']:.2f}):")
        print_review("  ", error)
        print(f"  mean influence of {error['label']} training reviews {error['mean_same_label']:+.4f}, "
              f"of the others {error['mean_other_label']:+.4f}")
        for key in ("proponents", "opponents"):
            print(f"  {key}:")
            for entry in error[key]:
                print_review("    ", entry)
    caveat = get_estimator(results["estimator"]).one_model_caveat
    if results["errors"] and caveat:
        print(f"\n  (one model: {html.unescape(re.sub('<[^>]+>', '', caveat))} The class means above carry the signal;\n"
              "   see docs/method/quality.md: what each estimator is worth)")
    print(f"\nscores by InfluencePipeline(estimator={results['settings']['estimator']!r}): {results['estimator']}")
    si = results["self_influence"]
    print(
        f"\nself-influence: mean {si['mean']:+.4f}, median {si['median']:+.4f}, "
        f"positive for {si['fraction_positive']:.1%}"
    )
    for title, key in (("highest (memorised)", "highest"), ("lowest", "lowest")):
        print(f"  {title}:")
        for entry in si[key]:
            print_review("    ", entry)
    issues = results["label_issues"]
    print(f"\nsuspected label errors (pipe.label_issues(), method {issues['method']!r}, the best in "
          f"benchmarks/label_errors.py): {issues['flagged']} flagged; most suspicious (-> suggested label):")
    for entry in issues["top"]:
        print_review(f"    -> {entry['suggested']}  ", entry)
    print(f"\ntotal {sum(results['seconds'].values()):.0f} s")
    print(f"report with plots: {os.path.abspath(os.path.join(output_dir, 'report.html'))}")
    print(f"same in Markdown:  {os.path.join(output_dir, 'report.md')}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``python -m turnover_hf.demo``; returns the results it wrote."""
    settings, output_dir = parse_args(argv)
    results = run(settings, output_dir)
    print_summary(results, output_dir)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
