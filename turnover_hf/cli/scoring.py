"""The scoring commands (``explain``, ``self-influence``, ``cleanse``, ``report``): their options and what they run."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .. import plots, report
from ..errors import TurnoverError
from ..files import atomic_write_text
from ..losses import predicted_labels
from ..pipeline import InfluencePipeline
from .checks import check_counts, check_output_file, check_output_folder
from .common import PROG, STATE_FILE, TRAIN_FOLDER, VALIDATION_FOLDER
from .tables import encode_labels, load_table, next_to_model, shown, standard_columns, write_rows

ROW_FORMATS = (".csv", ".tsv", ".json", ".jsonl")


@dataclass
class ScoringOptions:
    """Where the influence-ready model and its training set are, and how to run it."""

    model: str = field(metadata={"help": "Influence-ready model folder (as `train` writes it), or an ensemble folder."})
    train: Optional[str] = field(
        default=None,
        metadata={"help": "The training set with its example_id column (save_to_disk folder). Default: the "
                          f"{TRAIN_FOLDER!r} folder next to the model, as `turnover-hf train` writes it."},
    )
    text_column: str = field(default="text", metadata={"help": "Text column of the training set and target files."})
    label_column: str = field(default="label", metadata={"help": "Label column of the training set and target files."})
    batch_size: int = field(default=64, metadata={"help": "(training example, target) rows per forward pass."})
    max_length: Optional[int] = field(
        default=None,
        metadata={"help": "Truncate texts to this many tokens. Default: the length the model was trained with (its "
                          "tokenizer's model_max_length, which `turnover-hf train` sets)."},
    )
    device: Optional[str] = field(
        default=None, metadata={"help": "Where to run the model, e.g. cpu or cuda:0 (default: where it loads)."}
    )
    estimator: str = field(
        default="auto",
        metadata={"help": "auto: the most faithful estimator the model allows (the influence function for a "
                          "classifier while its exact fit fits --max_memory_gb, else its projected form, also for a "
                          "language model; turnover for an ensemble)."},
    )
    # the registered estimators' options the user gave as flags (e.g. --projection_dim 8192), by name
    estimator_options: dict = field(default_factory=dict, init=False)


@dataclass
class ExplainOptions:
    text: Optional[list[str]] = field(default=None, metadata={"help": "One or more texts to explain."})
    targets: Optional[str] = field(
        default=None,
        metadata={"help": "A file (or save_to_disk folder) of targets with a text column; .txt: one per line."},
    )
    label: Optional[str] = field(
        default=None,
        metadata={"help": "Label of the --text targets (name or number); default: the model's own prediction."},
    )
    top_k: int = field(default=5, metadata={"help": "Proponents and opponents shown per target."})
    output: Optional[str] = field(default=None, metadata={"help": "Also write the results to this JSON file."})
    overwrite: bool = field(default=False, metadata={"help": "Replace --output if it exists."})


@dataclass
class SelfInfluenceOptions:
    output: str = field(metadata={"help": "Where to write the scores, highest first: .csv, .json or .jsonl."})
    top: int = field(default=10, metadata={"help": "How many of the highest to print."})
    overwrite: bool = field(default=False, metadata={"help": "Replace --output if it exists."})


@dataclass
class CleanseOptions:
    output: str = field(
        metadata={"help": "Where to write the ids to remove: .txt (one id a line), .csv, .json or .jsonl."}
    )
    validation: Optional[str] = field(
        default=None,
        metadata={"help": "Labelled validation data (file or save_to_disk folder) the cleansed model should do better "
                          f"on. Default: the {VALIDATION_FOLDER!r} folder next to the model."},
    )
    fraction: float = field(default=0.05, metadata={"help": "Remove at most this fraction of the training set."})
    count: Optional[int] = field(default=None, metadata={"help": "Remove at most this many (instead of --fraction)."})
    kept_dataset: Optional[str] = field(
        default=None,
        metadata={"help": "Also save the training set without them here (save_to_disk), ready to retrain."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace the outputs if they exist."})


@dataclass
class ReportOptions:
    output: str = field(metadata={"help": "The HTML file to write (self-contained: plots embedded)."})
    targets: Optional[str] = field(
        default=None,
        metadata={"help": "Targets to explain and to aggregate by class (file or save_to_disk folder). Default: the "
                          f"{VALIDATION_FOLDER!r} folder next to the model, if any."},
    )
    max_targets: int = field(default=200, metadata={"help": "Score at most this many targets (the first ones)."})
    explain: int = field(default=3, metadata={"help": "Targets explained in the report; misclassified ones first."})
    top_k: int = field(default=5, metadata={"help": "Proponents and opponents per explained target."})
    suspects: int = field(default=10, metadata={"help": "Highest self-influence examples listed."})
    audit: bool = field(
        default=False,
        metadata={"help": "Also audit the training set (as `audit` does, against the targets as validation set) and "
                          "add the data-audit section."},
    )
    trainer_state: Optional[str] = field(
        default=None,
        metadata={"help": f"trainer_state.json with the flip-sanity losses. Default: {STATE_FILE} next to the model."},
    )
    title: str = field(default="turnover-hf report", metadata={"help": "Title of the page."})
    overwrite: bool = field(default=False, metadata={"help": "Replace --output if it exists."})


# -- scoring commands --------------------------------------------------------------------------------------------
def pipeline(options: ScoringOptions) -> Any:
    from datasets import load_from_disk


    if not os.path.isdir(options.model):
        raise TurnoverError(f"--model {options.model!r} is not a folder; give the folder `turnover-hf train` wrote.")
    train_path = options.train or next_to_model(options.model, TRAIN_FOLDER)
    if train_path is None:
        raise TurnoverError(
            f"no training set: pass --train (the save_to_disk folder of the training set with its example_id column); "
            f"`turnover-hf train` writes it to {TRAIN_FOLDER}/ next to the model."
        )
    if not os.path.isdir(train_path):
        raise TurnoverError(f"--train {train_path!r} is not a save_to_disk folder.")
    train = standard_columns(load_from_disk(train_path), options.text_column, options.label_column,
                              f"the training set {train_path!r}", need_label=False, path=train_path)
    # a fit is kept next to the model and reused by the next command (with the same options)
    estimator_options: dict[str, Any] = {"save_fit": True}
    if options.estimator_options:  # checked against the chosen estimator's options (unknown ones are named)
        estimator_options["options"] = dict(options.estimator_options)
    pipe = InfluencePipeline(options.model, train_dataset=train, batch_size=options.batch_size,
                             max_length=options.max_length, device=options.device, estimator=options.estimator,
                             **estimator_options)
    if pipe.tokenizer is None:
        raise TurnoverError(f"{options.model!r} has no tokenizer; save it there with tokenizer.save_pretrained(...).")
    return pipe


def print_estimator(pipe: Any) -> None:
    """Which estimator produced the scores (``auto`` may hand over while fitting) and what its scores are worth."""
    print(f"scored by the {pipe.estimator!r} estimator: {pipe.spec.description}")
    if pipe.spec.worth:
        print(f"  {pipe.spec.worth}")


def label_names(pipe: Any) -> dict[int, str]:
    return {int(k): str(v) for k, v in (getattr(pipe.model.config, "id2label", None) or {}).items()}


def label_id(label: str, pipe: Any) -> int:
    label2id = {str(k): int(v) for k, v in (getattr(pipe.model.config, "label2id", None) or {}).items()}
    if label in label2id:
        return label2id[label]
    if label.lstrip("-").isdigit() and 0 <= int(label) < pipe.model.config.num_labels:
        return int(label)
    raise TurnoverError(f"unknown --label {label!r}; the model's labels are {list(label2id) or 'integers'}.")


def read_targets(path: str, options: ScoringOptions, limit: Optional[int] = None) -> Any:
    """Targets from a file or folder, checked (rows, text, filled label cells) before any model is loaded."""
    data = load_table(path, "targets", "validation", options.text_column)
    data = standard_columns(data, options.text_column, options.label_column, f"the targets {path!r}", need_label=False,
                            path=path)
    if limit is not None and len(data) > limit:
        data = data.select(range(limit))
    return data.select_columns([c for c in ("text", "label") if c in data.column_names])


def encode_targets(data: Any, path: str, pipe: Any) -> Any:
    """``data`` with its labels (where present) as the model's class indices."""
    if "label" in data.column_names:
        names = [label_names(pipe)[i] for i in range(pipe.model.config.num_labels)]
        data = encode_labels(data, names, f"the targets {path!r}")
    return data


def print_row(row: dict[str, Any], names: dict[int, str], score_key: str = "score", width: int = 100) -> None:
    text = " ".join(str(row.get("text", "")).split())
    text = text if len(text) <= width else text[: width - 1] + "…"
    label = names.get(row.get("label"), row.get("label"))
    print(f"    {row[score_key]:+.4f}  [{label}] #{row['example_id']}  {text}")


def command_explain(options: ScoringOptions, explain: ExplainOptions) -> int:
    if explain.text and explain.targets:
        raise TurnoverError("give --text or --targets, not both: --text explains the texts given on the command line, "
                            "--targets the rows of a file.")
    if not explain.text and not explain.targets:
        raise TurnoverError("nothing to explain: give --text \"...\" (one or more) or --targets FILE.")
    if explain.label is not None and not explain.text:
        raise TurnoverError("--label is the label of the --text targets; a --targets file gives its labels in its "
                            f"{options.label_column!r} column (--label_column).")
    check_output_file(explain.output, "--output", (".json",), explain.overwrite)
    check_counts(top_k=(explain.top_k, 1))
    data = read_targets(explain.targets, options) if explain.targets else None
    pipe = pipeline(options)
    if data is not None:
        targets = [dict(row) for row in encode_targets(data, explain.targets, pipe)]
    else:
        targets = [{"text": t} for t in explain.text]
        if explain.label is not None:
            label = label_id(explain.label, pipe)
            targets = [{**t, "label": label} for t in targets]
    results = pipe([dict(t) for t in targets], top_k=explain.top_k)
    names = label_names(pipe)
    for target, result in zip(targets, results):
        result["text"] = target["text"]
        print(f"\n{target['text']!r}")
        print(f"  label {names.get(result['label'], result['label'])} ({result['label_source']})")
        for title, key in (("helped most (proponents)", "proponents"), ("hurt most (opponents)", "opponents")):
            print(f"  {title}:")
            for row in result[key]:
                print_row(row, names)
    print_estimator(pipe)
    if explain.output:
        atomic_write_text(explain.output, json.dumps(results, indent=1, ensure_ascii=False) + "\n")
        print(f"\nwrote {explain.output}")
    return 0


def command_self_influence(options: ScoringOptions, chosen: SelfInfluenceOptions) -> int:
    check_output_file(chosen.output, "--output", ROW_FORMATS, chosen.overwrite)
    check_counts(top=(chosen.top, 0))
    pipe = pipeline(options)
    names = label_names(pipe)
    scores = shown(pipe.self_influence(), "self_influence", names).sort("self_influence", reverse=True)
    write_rows(chosen.output, scores, chosen.overwrite)
    print(f"self-influence of {len(scores)} training examples, highest first (memorised, possibly mislabelled):")
    for row in scores.select(range(min(chosen.top, len(scores)))):
        print_row(row, names, "self_influence")
    print_estimator(pipe)
    print(f"wrote {chosen.output}")
    return 0


def command_cleanse(options: ScoringOptions, chosen: CleanseOptions) -> int:
    check_output_file(chosen.output, "--output", (".txt", *ROW_FORMATS), chosen.overwrite)
    check_output_folder(chosen.kept_dataset, "--kept_dataset", chosen.overwrite)
    if not 0 < chosen.fraction <= 1:
        raise TurnoverError(f"--fraction must be in (0, 1], got {chosen.fraction}.")
    check_counts(count=(chosen.count, 0))
    validation = chosen.validation or next_to_model(options.model, VALIDATION_FOLDER)
    if validation is None:
        raise TurnoverError("give --validation: labelled held-out data whose loss the removal should lower.")
    targets = read_targets(validation, options)
    if "label" not in targets.column_names:
        raise TurnoverError(f"the validation data {validation!r} needs labels (column {options.label_column!r}).")
    pipe = pipeline(options)
    targets = encode_targets(targets, validation, pipe)
    names = label_names(pipe)
    influence = shown(pipe.mean_influence(targets), "mean_influence", names).sort("mean_influence")
    limit = chosen.count if chosen.count is not None else int(chosen.fraction * len(influence))
    harmful = influence.filter(lambda row: row["mean_influence"] < 0)
    removed = harmful.select(range(min(max(limit, 0), len(harmful))))
    write_rows(chosen.output, removed, chosen.overwrite, ids_only=True)
    print(f"mean influence of {len(influence)} training examples on {len(targets)} validation targets; "
          f"{len(harmful)} hurt them on average. Removing the {len(removed)} most harmful:")
    for row in removed.select(range(min(10, len(removed)))):
        print_row(row, names, "mean_influence")
    print_estimator(pipe)
    print(f"wrote {len(removed)} ids to {chosen.output}")
    if chosen.kept_dataset:
        gone = set(removed["example_id"])
        kept = pipe.train_dataset.filter(lambda row: row["example_id"] not in gone)
        kept.save_to_disk(chosen.kept_dataset)
        print(f"kept {len(kept)} training examples in {chosen.kept_dataset}: retrain with "
              f"{PROG} train --train_file {chosen.kept_dataset} ...")
    return 0


def command_report(options: ScoringOptions, chosen: ReportOptions) -> int:

    check_output_file(chosen.output, "--output", (".html", ".htm"), chosen.overwrite)
    check_counts(top_k=(chosen.top_k, 1), max_targets=(chosen.max_targets, 1), explain=(chosen.explain, 0),
                 suspects=(chosen.suspects, 0))
    if chosen.trainer_state is not None and not os.path.isfile(chosen.trainer_state):
        raise TurnoverError(f"--trainer_state {chosen.trainer_state!r}: no such file; give the trainer_state.json "
                            "`turnover-hf train` wrote, or leave it out.")
    targets_path = chosen.targets or next_to_model(options.model, VALIDATION_FOLDER)
    targets = read_targets(targets_path, options, limit=chosen.max_targets) if targets_path is not None else None
    pipe = pipeline(options)
    names = label_names(pipe)
    self_influence = shown(pipe.self_influence(), "self_influence", {})
    figures: dict[str, Any] = {"Self-influence": plots.self_influence_histogram(self_influence)}
    captions = {"Self-influence": "Influence of each training example on itself (paper App. E); the right tail "
                                  "holds memorised and often mislabelled examples."}
    state_path = chosen.trainer_state or next_to_model(options.model, STATE_FILE)
    if state_path is not None:
        with open(state_path, encoding="utf-8") as handle:
            history = json.load(handle).get("log_history", [])
        if any("train_sample_loss_flip" in r for r in history):
            figures["Flip sanity"] = plots.flip_sanity_curves(history)
            captions["Flip sanity"] = ("Loss of training examples under their own and their flipped masks during "
                                       "training (paper Fig. 2): the flipped loss should track the held-out loss.")
    explanations: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {}
    sizes = {"training examples": len(pipe.train_dataset)}
    if targets is not None:
        targets = encode_targets(targets, targets_path, pipe)
        sizes["targets"] = len(targets)  # scored (at most --max_targets)
        batch, labels, sources = pipe.prepare_targets(targets)
        predicted = predicted_labels(pipe.model, batch).cpu()
        order = list(range(len(targets)))
        if all(source == "given" for source in sources):
            wrong = predicted != labels
            metrics["target accuracy"] = float((~wrong).float().mean())
            order = sorted(order, key=lambda i: not bool(wrong[i]))  # misclassified first, stable
            scores = pipe.scores(targets)
            figures["Influence by class"] = plots.class_influence_heatmap(
                scores, pipe.train_dataset, labels, label_names=names
            )
            captions["Influence by class"] = ("Mean influence of the training examples of each class on the targets "
                                              "of each class; a positive diagonal means classes help themselves.")
        chosen_rows = order[: chosen.explain]
        if chosen_rows:
            rows = targets.select(chosen_rows)
            results = pipe([dict(r) for r in rows], top_k=chosen.top_k)
            for row, position, result in zip(rows, chosen_rows, results):
                explanations.append({**result, "text": row["text"], "predicted": int(predicted[position])})
    audit = None
    if chosen.audit:  # every target row (not only --max_targets): leakage and data value are about the whole set
        held_out = encode_targets(read_targets(targets_path, options), targets_path, pipe) if targets_path else None
        audit = pipe.audit(held_out)
    config = getattr(pipe.model, "turnover_config", None) if len(getattr(pipe, "models", [pipe.model])) == 1 else None
    path = report.write_report(
        chosen.output, overwrite=chosen.overwrite, title=chosen.title, config=config,
        model=os.path.abspath(options.model), dataset_sizes=sizes, metrics=metrics, explanations=explanations,
        suspects=self_influence, figures=figures, captions=captions, label_names=names, top_k=chosen.top_k,
        max_suspects=chosen.suspects, estimator=pipe.estimator, audit=audit,
    )
    print(f"wrote the report to {path}")
    return 0
