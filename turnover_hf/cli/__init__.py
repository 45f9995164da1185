"""``turnover-hf``: train an influence-ready classifier and ask it which training examples made it say what it says.

Example:
    $ turnover-hf train --model path/to/model --train_file reviews.csv --validation_file valid.csv --output_dir out
    $ turnover-hf explain --model out/model --text "a gripping, beautifully shot film"
    $ turnover-hf report --model out/model --output out/report.html
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import typing
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..errors import TurnoverError
from ..estimators import describe_estimators, estimator_names, options_classes
from ..version import __version__
from .common import PROG, TRACEBACK_ENV, WORKFLOW, HelpFormatter, paragraphs
from .scoring import (
    CleanseOptions,
    ExplainOptions,
    ReportOptions,
    ScoringOptions,
    SelfInfluenceOptions,
    command_cleanse,
    command_explain,
    command_report,
    command_self_influence,
)
from .train import command_train, train_parser
from . import labels
from . import audit  # noqa: I001  (its own line: the audit command)


# -- entry point -------------------------------------------------------------------------------------------------
@dataclass
class _Command:
    help: str
    description: str
    examples: str
    options: tuple[type, ...]
    run: Callable[..., int]


COMMANDS: dict[str, _Command] = {
    "explain": _Command(
        "which training examples helped and hurt given predictions",
        "For each target text, the training examples that lowered its loss most (proponents) and raised it most "
        "(opponents), with their influence score, label and text. Without --label the model's own prediction is "
        "explained. The default estimator (auto) is the influence function for a classifier (fitted once, kept "
        "next to the model) and turn-over dropout for an ensemble; --estimator turnover uses forward passes only.",
        f"  {PROG} explain --model out/model --text \"a gripping film\" \"a dull, lifeless plot\"\n"
        f"  {PROG} explain --model out/model --targets questions.txt --top_k 10 --output out/explained.json\n"
        f"  {PROG} explain --model out/model --text \"a gripping film\" --estimator turnover   # forward passes only",
        (ScoringOptions, ExplainOptions), command_explain,
    ),
    "label-issues": _Command(
        labels.HELP, labels.DESCRIPTION, labels.EXAMPLES, (ScoringOptions, labels.LabelIssuesOptions),
        labels.command_label_issues,
    ),
    "audit": _Command(audit.HELP, audit.DESCRIPTION, audit.EXAMPLES, (ScoringOptions, audit.AuditOptions), audit.command_audit),
    "self-influence": _Command(
        "score every training example on itself (for wrong labels, label-issues measured better)",
        "The influence of each training example on its own prediction, written highest first. High values are "
        "examples the model had to memorise, unlike the rest of the data: often mislabelled "
        "(Kobayashi et al. 2020, App. E). To find wrong labels, label-issues ranked them better in "
        "benchmarks/label_errors.py.",
        f"  {PROG} self-influence --model out/model --output out/self_influence.csv --top 20",
        (ScoringOptions, SelfInfluenceOptions), command_self_influence,
    ),
    "cleanse": _Command(
        "find training examples that hurt a validation set",
        "Mean influence of every training example over a labelled validation set; the most harmful (most "
        "negative) are written out for removal before retraining (Kobayashi et al. 2020, Table 2).",
        f"  {PROG} cleanse --model out/model --validation valid.csv --output out/remove.txt --fraction 0.02\n"
        f"  {PROG} cleanse --model out/model --output out/remove.csv --count 50 --kept_dataset out/cleansed",
        (ScoringOptions, CleanseOptions), command_cleanse,
    ),
    "report": _Command(
        "write a self-contained HTML report with plots",
        "One HTML page (plots embedded, no external files) with the model's configuration, explained "
        "predictions (misclassified targets first), the suspected mislabelled training examples, a "
        "self-influence histogram, the influence heatmap by class and the training-time flip-sanity curves.",
        f"  {PROG} report --model out/model --output out/report.html\n"
        f"  {PROG} report --model out/model --targets test.csv --explain 5 --output test_report.html",
        (ScoringOptions, ReportOptions), command_report,
    ),
}
TRAIN_HELP = "fine-tune a model with turn-over dropout (influence-ready)"


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=paragraphs("Influence-ready Hugging Face classifiers with turn-over dropout: train once, then "
                                "ask which training examples made the model say what it says."),
        epilog=WORKFLOW,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", help=f"{PROG} COMMAND --help: its options")
    commands.add_parser("train", help=TRAIN_HELP, add_help=False)
    for name, command in COMMANDS.items():
        commands.add_parser(name, help=command.help, add_help=False)
    return parser


def estimator_flags() -> type:
    """One dataclass holding every registered estimator's options as flags, each name once (estimators share
    ``--damping_factor``, ``--max_memory_gb``, ...); every default is None (not given), so the flags a user gave
    become the chosen estimator's options and the rest keep that estimator's own defaults. Deprecated field names
    get no flag; a shared flag's help gives each estimator's default."""
    owners: dict[str, list[str]] = {}
    fields: dict[str, tuple[Any, dataclasses.Field]] = {}
    for options_class in options_classes():
        hints = typing.get_type_hints(options_class)
        for f in dataclasses.fields(options_class):
            if "deprecated" in f.metadata:
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            owners.setdefault(f.name, []).append(f"{options_class.__name__} default {default!r}")
            fields.setdefault(f.name, (hints[f.name], f))
    made = []
    for name, (kind, f) in fields.items():
        if typing.get_origin(kind) is typing.Union:  # Optional[X] -> X: None already means "not given"
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        help_text = f"{f.metadata.get('help', '')} ({'; '.join(owners[name])})"
        made.append((name, Optional[kind], dataclasses.field(default=None, metadata={"help": help_text})))
    return dataclasses.make_dataclass("EstimatorFlags", made)


def _command_parser(name: str) -> Any:
    from transformers import HfArgumentParser

    command = COMMANDS[name]
    extra = (estimator_flags(),) if ScoringOptions in command.options else ()
    parser = HfArgumentParser(
        (*command.options, *extra), prog=f"{PROG} {name}", description=paragraphs(command.description),
        formatter_class=HelpFormatter,
        epilog="Examples:\n" + command.examples,
    )
    for action in parser._actions:  # the registered estimators, as they are when the command runs
        if action.dest == "estimator":
            action.choices = estimator_names()
            action.help = f"{action.help} {describe_estimators()}"
    return parser


def parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's full parser, as ``main`` builds them (the docs' CLI page uses them).

    Example:
        >>> top, commands = parsers()
        >>> sorted(commands)
        ['cleanse', 'explain', 'label-issues', 'report', 'self-influence', 'train']
    """
    top = _top_parser()
    names = [name for action in top._actions if isinstance(action, argparse._SubParsersAction) for name in action.choices]
    return top, {name: train_parser(False) if name == "train" else _command_parser(name) for name in names}


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """While a command runs: no deprecation warnings of other libraries (for their developers, not for a user of the
    command) and no progress bars of ``datasets`` (loading and mapping a table takes a moment); restored after."""
    from datasets.utils import logging as datasets_logging

    bars = datasets_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        for category in (FutureWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category)
            warnings.filterwarnings("default", category=category, module=r"turnover_hf\b")  # ours still show
        datasets_logging.disable_progress_bar()
        try:
            yield
        finally:
            if bars:
                datasets_logging.enable_progress_bar()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``turnover-hf`` command; returns the exit code.

    Example:
        >>> main(["explain", "--model", "out/model", "--text", "a gripping film"])
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    top = _top_parser()
    if not argv or argv[0] not in ("train", *COMMANDS):
        top.parse_args(argv or ["--help"])  # prints help / version / the error, and exits
        return 2
    name, rest = argv[0], argv[1:]
    try:
        with quiet_libraries():
            if name == "train":
                return command_train(rest)
            values = _command_parser(name).parse_args_into_dataclasses(rest)
            flags = [v for v in values if type(v).__name__ == "EstimatorFlags"]
            values = [v for v in values if type(v).__name__ != "EstimatorFlags"]
            for value in values:
                if isinstance(value, ScoringOptions) and flags:
                    value.estimator_options = {k: v for k, v in dataclasses.asdict(flags[0]).items() if v is not None}
            return COMMANDS[name].run(*values)
    except KeyboardInterrupt:
        print(f"{PROG} {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one line for the user; the traceback on request
        if os.environ.get(TRACEBACK_ENV):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        if not isinstance(err, TurnoverError):
            message = f"{type(err).__name__}: {message} (set {TRACEBACK_ENV}=1 for the traceback)"
        print(f"{PROG} {name}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
