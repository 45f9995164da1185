"""The ``audit`` command: wrong labels, duplicates, leakage, outliers and harmful examples of a training set."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from .. import report
from ..audit import KIND_TITLES, KINDS, audit_counts
from ..duplicates import DuplicateOptions
from ..errors import TurnoverError
from .common import PROG, VALIDATION_FOLDER
from .scoring import ScoringOptions, label_names, pipeline, print_estimator
from .tables import encode_labels, load_table, next_to_model, refuse_existing, standard_columns, write_rows


@dataclass
class AuditOptions:
    output: str = field(metadata={"help": "Where to write the issues (one row each, by kind): .csv, .json or .jsonl."})
    validation: Optional[str] = field(
        default=None,
        metadata={"help": "Labelled validation data (file or save_to_disk folder): checked for leakage, and the set "
                          f"whose loss data_value is about. Default: the {VALIDATION_FOLDER!r} folder next to the "
                          "model, if any."},
    )
    test: Optional[str] = field(default=None, metadata={"help": "Test data (file or folder) checked for leakage."})
    kinds: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Which kinds to look for (default all): wrong_label duplicate leakage outlier data_value."},
    )
    html: Optional[str] = field(default=None, metadata={"help": "Also write an HTML page with the audit section."})
    harmful_fraction: float = field(
        default=0.05, metadata={"help": "data_value: list at most this fraction of the training set (most harmful)."}
    )
    duplicate_threshold: float = field(
        default=0.4,
        metadata={"help": "Near duplicates: the share of character 5-grams two texts must have in common (Jaccard)."},
    )
    outlier_neighbours: int = field(
        default=10, metadata={"help": "Outliers: how many nearest neighbours the distance is averaged over."})
    top: int = field(default=3, metadata={"help": "How many rows of each kind to print."})
    overwrite: bool = field(default=False, metadata={"help": "Replace the outputs if they exist."})


HELP = "audit the training set: wrong labels, duplicates, leakage, outliers, harmful examples"
DESCRIPTION = (
    "One table of data issues, a row per issue with its kind, score, a one-sentence reason and the signal that "
    "found it: wrong labels (the label-issues ranking, with the suggested label), duplicates within the training "
    "set and leakage into the validation / test set (the same text after normalising case, spacing and "
    "punctuation, or a few words changed: character 5-gram similarity, measured in benchmarks/duplicates.py), "
    "outliers (far from every other example in the model's own representation) and the training examples most "
    "harmful to the validation set (negative mean influence). Kinds that need a validation or test set are skipped "
    "with a note when none is given."
)
EXAMPLES = (
    f"  {PROG} audit --model out/model --output out/issues.csv --test test.csv --html out/audit.html\n"
    f"  {PROG} audit --model out/model --output out/leaks.csv --test test.csv --kinds duplicate leakage"
)


def _held_out(path: Optional[str], options: ScoringOptions, pipe, what: str):
    """The validation or test rows: ``text``, ``label`` as the model's class index where present, ``example_id``."""
    if path is None:
        return None
    data = standard_columns(load_table(path, f"the {what} data", what), options.text_column, options.label_column,
                            f"the {what} data {path!r}", need_label=False)
    if "label" in data.column_names:
        names = [label_names(pipe)[i] for i in range(pipe.model.config.num_labels)]
        data = encode_labels(data, names, f"the {what} data {path!r}")
    return data.select_columns([c for c in ("text", "label", "example_id") if c in data.column_names])


def command_audit(options: ScoringOptions, chosen: AuditOptions) -> int:
    for path in (chosen.output, chosen.html):
        if path:
            refuse_existing(path, chosen.overwrite)
    unknown = sorted(set(chosen.kinds or ()) - set(KINDS))
    if unknown:
        raise TurnoverError(f"unknown --kinds {unknown}; choose from {' '.join(KINDS)}.")
    pipe = pipeline(options)
    validation_path = chosen.validation or next_to_model(options.model, VALIDATION_FOLDER)
    validation = _held_out(validation_path, options, pipe, "validation")
    test = _held_out(chosen.test, options, pipe, "test")
    issues = pipe.audit(validation, test, kinds=chosen.kinds, harmful_fraction=chosen.harmful_fraction,
                        duplicate_options=DuplicateOptions(threshold=chosen.duplicate_threshold),
                        outlier_neighbours=chosen.outlier_neighbours)
    write_rows(chosen.output, issues, chosen.overwrite)
    counts = audit_counts(issues)
    wanted = chosen.kinds or list(KINDS)
    print(", ".join(f"{counts[kind]} {kind}" for kind in wanted) + f" in {len(pipe.train_dataset)} training examples")
    for note in issues.info.description.splitlines()[1:]:
        print(f"  note: {note}")
    for kind in wanted:
        rows = issues.select([n for n, k in enumerate(issues["kind"]) if k == kind])
        if len(rows):
            print(f"{KIND_TITLES[kind]}:")
        for row in rows.select(range(min(chosen.top, len(rows)))):
            print(f"    {row['score']:.4f}  #{row['example_id']}  {row['reason']}")
    if "data_value" in wanted and validation is not None:
        print_estimator(pipe)
    print(f"wrote {chosen.output}")
    if chosen.html:
        report.write_report(chosen.html, overwrite=chosen.overwrite, title="turnover-hf data audit",
                            model=os.path.abspath(options.model),
                            dataset_sizes={"training examples": len(pipe.train_dataset)}, audit=issues,
                            label_names=label_names(pipe), estimator=pipe.estimator)
        print(f"wrote {chosen.html}")
    return 0
