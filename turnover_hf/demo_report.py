"""What the demo (:mod:`turnover_hf.demo`) shows of a run: the Markdown and HTML reports, the figures, and the
summary it prints.

Example:
    >>> results = demo.run(settings, "runs/demo")
    >>> print_summary(results, "runs/demo")
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from typing import Any

import torch

from . import plots
from .assets import LABEL_NAMES
from .config import TurnoverConfig
from .errors import TurnoverError
from .estimators import get_estimator
from .report import write_report

RELOAD_CHECK_ROWS = 64  # validation reviews on which the reloaded checkpoint must predict as the trained model


def shorten(text: str, width: int = 100) -> str:
    """``text`` on one line, cut to ``width`` characters with an ellipsis."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


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
        *_audit_lines(results.get("audit")),
        "## Time (seconds)",
        "",
        "| phase | seconds |",
        "|---|---|",
        *(f"| {phase} | {seconds:.1f} |" for phase, seconds in timing.items()),
        "",
    ]
    return "\n".join(lines)


def _audit_lines(audited: Any) -> list[str]:
    """The Markdown section of the run's data audit (nothing when the run made none)."""
    if not audited:
        return []
    lines = ["## Data audit", "", "`pipe.audit(validation, test)` (docs/guides/audit.md):", "",
             "| kind | rows |", "|---|---|", *(f"| {kind} | {count} |" for kind, count in audited["counts"].items()), ""]
    for kind, rows in audited["top"].items():
        lines += [f"- {kind} #{row['example_id']}: {row['reason']}".replace("|", "\\|") for row in rows[:3]]
    if audited.get("notes"):
        lines += ["", audited["notes"]]
    return [*lines, ""]


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
    results: dict[str, Any], config: TurnoverConfig, suspects: list[dict[str, Any]], figures: dict[str, Any],
    captions: dict[str, str], output_dir: str, audit: Any = None,
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
        estimator=results["estimator"], audit=audit,
    )


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
    audited = results.get("audit")
    if audited:
        counts = ", ".join(f"{count} {kind.replace('_', ' ')}" for kind, count in audited["counts"].items())
        print(f"\ndata audit (pipe.audit(validation, test); docs/guides/audit.md): {counts}")
        for kind in ("leakage", "duplicate", "outlier", "data_value"):
            for entry in audited["top"].get(kind, [])[:2]:
                print(f"  {kind}: #{entry['example_id']} {shorten(entry['reason'], 110)}")
    issues = results["label_issues"]
    print(f"\nsuspected label errors (pipe.label_issues(), method {issues['method']!r}, the best in "
          f"benchmarks/label_errors.py): {issues['flagged']} flagged; most suspicious (-> suggested label):")
    for entry in issues["top"]:
        print_review(f"    -> {entry['suggested']}  ", entry)
    print(f"\ntotal {sum(results['seconds'].values()):.0f} s")
    print(f"report with plots: {os.path.abspath(os.path.join(output_dir, 'report.html'))}")
    print(f"same in Markdown:  {os.path.join(output_dir, 'report.md')}")
