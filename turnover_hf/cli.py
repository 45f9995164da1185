"""``turnover-hf``: train an influence-ready classifier and ask it which training examples made it say what it says.

Example:
    $ turnover-hf train --model path/to/model --train_file reviews.csv --validation_file valid.csv --output_dir out
    $ turnover-hf explain --model out/model --text "a gripping, beautifully shot film"
    $ turnover-hf report --model out/model --output out/report.html
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

from .errors import TurnoverError
from .estimators import describe_estimators, estimator_names, options_classes
from .files import atomic_path, atomic_write_text
from .version import __version__

PROG = "turnover-hf"
TRACEBACK_ENV = "TURNOVER_HF_TRACEBACK"
MODEL_FOLDER, TRAIN_FOLDER, VALIDATION_FOLDER, STATE_FILE = "model", "train", "validation", "trainer_state.json"
TABLE_EXTENSIONS = {
    ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text",
}
# TrainingArguments shown by `turnover-hf train --help`; --help_all lists the other ~100.
COMMON_TRAINING_ARGUMENTS = (
    "output_dir", "overwrite_output_dir", "num_train_epochs", "max_steps", "learning_rate",
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "warmup_ratio",
    "weight_decay", "eval_strategy", "eval_steps", "logging_steps", "save_strategy", "seed", "use_cpu", "bf16",
    "report_to",
)

WORKFLOW = f"""\
A typical session:
  {PROG} train --model path/to/model --train_file train.csv --validation_file valid.csv --output_dir out
  {PROG} explain --model out/model --text "a gripping, beautifully shot film"
  {PROG} label-issues --model out/model --output out/label_issues.csv
  {PROG} self-influence --model out/model --output out/self_influence.csv
  {PROG} cleanse --model out/model --validation out/validation --output out/remove.txt
  {PROG} report --model out/model --output out/report.html

`train` writes out/model (the influence-ready checkpoint with its tokenizer), out/train (the training set with its
example ids) and out/validation; the other commands find out/train next to the model by themselves.
Data files: CSV, TSV, JSON/JSONL, Parquet, or a folder written by datasets' save_to_disk, with a text column and
(for training) a label column. Options accept --snake_case and --kebab-case spellings.
Errors are one line; set {TRACEBACK_ENV}=1 to see the full traceback."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help (not for required options or None), description and epilog kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def _paragraphs(*texts: str, width: int = 100) -> str:
    return "\n\n".join(textwrap.fill(text, width) for text in texts)


# -- arguments ---------------------------------------------------------------------------------------------------
@dataclass
class TrainOptions:
    """What `turnover-hf train` trains on and how it patches the model (TrainingArguments covers the rest)."""

    model: str = field(metadata={"help": "Model folder (or Hub id) of a pretrained transformer with its tokenizer."})
    train_file: str = field(
        metadata={"help": "Training data: a CSV/TSV/JSON/JSONL/Parquet file or a save_to_disk folder."}
    )
    validation_file: Optional[str] = field(
        default=None,
        metadata={"help": "Held-out data (same formats): evaluated each epoch, with the flip-sanity losses."},
    )
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    label_column: str = field(default="label", metadata={"help": "Column holding the label (names or integers)."})
    split: str = field(default="train", metadata={"help": "Split to use when a save_to_disk folder holds several."})
    max_length: int = field(default=128, metadata={"help": "Truncate texts to this many tokens."})
    adapter: Literal["seq_bn", "lora", "none"] = field(
        default="seq_bn",
        metadata={"help": "Train a bottleneck adapter (seq_bn), a LoRA adapter, or only the head (none); the "
                          "pretrained weights stay frozen. Needs the `adapters` package unless none."},
    )
    reduction_factor: int = field(default=8, metadata={"help": "seq_bn adapter width = hidden size / this."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (--adapter lora)."})
    p: float = field(default=0.5, metadata={"help": "Drop ratio of every example's turn-over mask."})
    mask_seed: int = field(
        default=0, metadata={"help": "Seed of the masks (with an example id it fixes every mask bit)."}
    )
    channels: int = field(
        default=1,
        metadata={"help": "Mask channels on an input-masked head (BERT-style one-layer classifiers): this many "
                          "masked copies of the classifier in one model, outputs averaged (less noisy scores at "
                          "almost no cost)."},
    )
    num_members: int = field(
        default=1,
        metadata={"help": "Train this many models with mask seeds mask_seed, mask_seed+1, ... whose scores are "
                          "averaged: one model's rankings are close to noise, an ensemble's are reproducible."},
    )
    sanity_examples: int = field(
        default=256, metadata={"help": "Training examples whose seen/flipped losses are logged at each evaluation."}
    )
    help_all: bool = field(default=False, metadata={"help": "Show every transformers TrainingArguments option."})


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
    max_length: int = field(default=128, metadata={"help": "Truncate texts to this many tokens."})
    device: Optional[str] = field(
        default=None, metadata={"help": "Where to run the model, e.g. cpu or cuda:0 (default: where it loads)."}
    )
    estimator: str = field(
        default="auto",
        metadata={"help": "auto: the most faithful estimator the model allows (the influence function for a "
                          "classifier, turnover for an ensemble or a language model)."},
    )
    # the options dataclasses of the registered estimators, parsed from their own flags (e.g. --projection_dim)
    estimator_options: list = field(default_factory=list, init=False)


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
class LabelIssuesOptions:
    output: str = field(metadata={"help": "Where to write the ranking, most suspicious first: .csv, .json or .jsonl."})
    method: Optional[str] = field(
        default=None,
        metadata={"help": "How to score each label (see turnover_hf.label_issues.METHODS). Default: loss_classnorm, "
                          "the final model's training loss minus its class's mean, the best overall in "
                          "benchmarks/label_errors.py (above the flipped-mask statistics and self-influence everywhere, "
                          "above the plain loss in 4 of 6 settings and within 0.012 AUC of 5-fold cleanlab or ahead, "
                          "at 1/5 of its training cost)."},
    )
    num_issues: Optional[int] = field(
        default=None,
        metadata={"help": "Flag this many as issues. Default: cleanlab's confident-learning count if cleanlab is "
                          "installed (pip install turnover-hf[cleanlab]), else the examples whose predicted label "
                          "differs from the given one."},
    )
    top: int = field(default=10, metadata={"help": "How many of the most suspicious to print."})
    kept_dataset: Optional[str] = field(
        default=None, metadata={"help": "Also save the training set without the flagged examples here (save_to_disk)."}
    )
    relabelled_dataset: Optional[str] = field(
        default=None,
        metadata={"help": "Also save the training set with the flagged examples relabelled to the suggested label."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace the outputs if they exist."})


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
    trainer_state: Optional[str] = field(
        default=None,
        metadata={"help": f"trainer_state.json with the flip-sanity losses. Default: {STATE_FILE} next to the model."},
    )
    title: str = field(default="turnover-hf report", metadata={"help": "Title of the page."})
    overwrite: bool = field(default=False, metadata={"help": "Replace --output if it exists."})


# -- data --------------------------------------------------------------------------------------------------------
def _load_table(path: str, what: str, split: Optional[str] = None) -> Any:
    """A datasets.Dataset from a data file or a save_to_disk folder."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    if os.path.isdir(path):
        data = load_from_disk(path)
        if isinstance(data, DatasetDict):
            if split not in data:
                raise TurnoverError(f"{what} {path!r} holds the splits {list(data)}; choose one with --split.")
            data = data[split]
        return data
    if not os.path.isfile(path):
        raise TurnoverError(f"{what}: no file or folder {path!r}.")
    extension = os.path.splitext(path)[1].lower()
    builder = TABLE_EXTENSIONS.get(extension)
    if builder is None:
        raise TurnoverError(
            f"{what} {path!r}: unknown format {extension!r}; use {', '.join(TABLE_EXTENSIONS)} or a save_to_disk "
            "folder."
        )
    kwargs = {"delimiter": "\t"} if extension == ".tsv" else {}
    return load_dataset(builder, data_files=path, split="train", **kwargs)


def _standard_columns(data: Any, text_column: str, label_column: str, what: str, need_label: bool) -> Any:
    """``data`` with its text in ``text`` and its label (if any) in ``label``."""
    if text_column not in data.column_names:
        raise TurnoverError(
            f"{what} has no {text_column!r} column (columns: {data.column_names}); name it with --text_column."
        )
    for old, new in ((text_column, "text"), (label_column, "label")):
        if old != new and old in data.column_names:
            if new in data.column_names:
                raise TurnoverError(f"{what} has both {old!r} and {new!r} columns; rename one of them.")
            data = data.rename_column(old, new)
    if need_label and "label" not in data.column_names:
        raise TurnoverError(
            f"{what} has no {label_column!r} column (columns: {data.column_names}); name it with --label_column."
        )
    return data


def _class_names(train: Any) -> list[str]:
    """Label names of the training set: ClassLabel names, sorted string labels, or 0..max for integers."""
    from datasets import ClassLabel

    feature = train.features["label"]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    dtype = getattr(feature, "dtype", None)
    values = train["label"]
    if dtype in ("string", "large_string"):
        return sorted(set(values))
    if dtype is not None and dtype.startswith(("int", "uint")):
        if min(values) < 0:
            raise TurnoverError("integer labels must be non-negative class indices (0, 1, ...).")
        return [str(i) for i in range(max(values) + 1)]
    raise TurnoverError(
        f"the label column has type {dtype}: the CLI trains classifiers, so give class names or integer classes."
    )


def _encode_labels(data: Any, names: list[str], what: str) -> Any:
    """``data`` with its labels as a ClassLabel over ``names`` (strings are looked up, integers checked)."""
    from datasets import ClassLabel

    feature = data.features["label"]
    if isinstance(feature, ClassLabel):
        if list(feature.names) != names:
            raise TurnoverError(f"{what} has the classes {feature.names}, the training set {names}.")
        return data
    values = data["label"]
    if getattr(feature, "dtype", None) in ("string", "large_string"):
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise TurnoverError(f"{what} has labels the training set lacks: {unknown[:5]} (known: {names}).")
        index = {name: i for i, name in enumerate(names)}
        data = data.map(lambda row: {"label": index[row["label"]]}, remove_columns=["label"])
    elif any(not 0 <= int(v) < len(names) for v in values):
        raise TurnoverError(f"{what} has integer labels outside 0..{len(names) - 1}.")
    return data.cast_column("label", ClassLabel(names=names))


def _next_to_model(model: str, name: str) -> Optional[str]:
    path = os.path.join(os.path.dirname(os.path.abspath(model.rstrip("/\\"))), name)
    return path if os.path.exists(path) else None


def _refuse_existing(path: str, overwrite: bool, option: str = "--overwrite") -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
        raise TurnoverError(f"{path!r} exists; choose another path or pass {option} to replace it.")


def _write_rows(path: str, rows: Any, overwrite: bool, ids_only: bool = False) -> None:
    """Write a Dataset to .csv/.tsv/.json/.jsonl (or its ids to .txt), atomically."""
    _refuse_existing(path, overwrite)
    extension = os.path.splitext(path)[1].lower()
    if extension == ".txt" and ids_only:
        atomic_write_text(path, "".join(f"{i}\n" for i in rows["example_id"]))
    elif extension == ".json":
        atomic_write_text(path, json.dumps(rows.to_list(), indent=1, ensure_ascii=False) + "\n")
    elif extension in (".csv", ".tsv", ".jsonl"):
        with atomic_path(path) as tmp:
            if extension == ".jsonl":
                rows.to_json(tmp, lines=True, force_ascii=False)
            else:
                rows.to_csv(tmp, index=False, sep="\t" if extension == ".tsv" else ",")
    else:
        allowed = ".txt, .csv, .tsv, .json or .jsonl" if ids_only else ".csv, .tsv, .json or .jsonl"
        raise TurnoverError(f"cannot write {path!r}: give a file ending in {allowed}.")


def _shown(rows: Any, score: str, names: dict[int, str]) -> Any:
    """What a person reads: id, score, label name and text first, no model inputs."""
    rows = rows.remove_columns([c for c in ("input_ids", "attention_mask", "token_type_ids") if c in rows.column_names])
    if "label" in rows.column_names and names:
        rows = rows.map(lambda row: {"label_name": names.get(row["label"], str(row["label"]))})
    first = [c for c in ("example_id", score, "label", "label_name", "text") if c in rows.column_names]
    return rows.select_columns(first + [c for c in rows.column_names if c not in first])


# -- train -------------------------------------------------------------------------------------------------------
def _base_model(options: TrainOptions, names: list[str]) -> Any:
    """The pretrained model with a fresh head for ``names`` and the chosen adapter (not yet patched)."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "some weights are newly initialized": the head, as intended
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            options.model, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)}, ignore_mismatched_sizes=True,
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    if options.adapter != "none":
        try:
            import adapters
        except ImportError:
            raise TurnoverError(
                "--adapter needs the `adapters` package: pip install adapters (or --adapter none)."
            ) from None
        adapters.init(model)
        config = (adapters.SeqBnConfig(reduction_factor=options.reduction_factor) if options.adapter == "seq_bn"
                  else adapters.LoRAConfig(r=options.lora_r, alpha=2 * options.lora_r))
        model.add_adapter("task", config=config)
        model.train_adapter("task")
    return model


def _accuracy(prediction: Any) -> dict[str, float]:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def run_train(options: TrainOptions, training_args: Any) -> dict[str, Any]:
    """Patch, train and save; returns where everything went."""
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from .callbacks import FlipSanityCallback
    from .config import TurnoverConfig
    from .data import add_example_ids
    from .patcher import patch_model
    from .trainer import TurnoverTrainer

    if options.num_members < 1:
        raise TurnoverError(f"--num_members must be at least 1, got {options.num_members}.")
    out = training_args.output_dir
    folders = {name: os.path.join(out, name) for name in (MODEL_FOLDER, TRAIN_FOLDER, VALIDATION_FOLDER)}
    for folder in folders.values():
        _refuse_existing(folder, training_args.overwrite_output_dir, "--overwrite_output_dir")
    config = TurnoverConfig(p=options.p, seed=options.mask_seed, channels=options.channels)  # validates them first

    train = _standard_columns(_load_table(options.train_file, "--train_file", options.split), options.text_column,
                              options.label_column, "the training data", need_label=True)
    names = _class_names(train)
    if len(names) < 2:
        raise TurnoverError(f"the training data has a single class {names}; a classifier needs at least two.")
    train = add_example_ids(_encode_labels(train, names, "the training data"))
    valid = None
    if options.validation_file:
        valid = _standard_columns(_load_table(options.validation_file, "--validation_file", "validation"),
                                  options.text_column, options.label_column, "the validation data", need_label=True)
        valid = _encode_labels(valid, names, "the validation data")

    tokenizer = AutoTokenizer.from_pretrained(options.model)
    if tokenizer.pad_token is None:  # GPT-style tokenizers: pad with the end-of-text token
        tokenizer.pad_token = tokenizer.eos_token

    def tokenize(data: Any) -> Any:
        return data.map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=options.max_length),
                        batched=True, remove_columns=["text"], desc="tokenize")

    train_tokens = tokenize(train)
    valid_tokens = None
    if valid is not None:
        valid_tokens = tokenize(valid.select_columns(["text", "label"]))
    collator = DataCollatorWithPadding(tokenizer)

    def model_init() -> Any:
        model = _base_model(options, names)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    trainer_kwargs: dict[str, Any] = dict(
        data_collator=collator, processing_class=tokenizer, eval_dataset=valid_tokens,
        compute_metrics=_accuracy if valid_tokens is not None else None,
    )
    metrics: dict[str, Any] = {}
    if options.num_members == 1:
        callbacks = []
        if valid_tokens is not None and options.sanity_examples > 0:
            sample = train_tokens.select(range(min(options.sanity_examples, len(train_tokens))))
            callbacks.append(FlipSanityCallback(sample, collator))
        model = patch_model(model_init(), config, freeze_leaking=True)
        trainer = TurnoverTrainer(model=model, args=training_args, train_dataset=train_tokens, callbacks=callbacks,
                                  **trainer_kwargs)
        trainer.train()
        model.save_pretrained(folders[MODEL_FOLDER])
        tokenizer.save_pretrained(folders[MODEL_FOLDER])
        trainer.save_state()  # trainer_state.json: the log history with the flip-sanity losses, for `report`
        evaluations = [r for r in trainer.state.log_history if "eval_accuracy" in r]
        if evaluations:
            metrics = {k: evaluations[-1][k] for k in ("eval_loss", "eval_accuracy")}
    else:
        from .estimators.ensemble import train_ensemble

        args = copy.copy(training_args)
        args.output_dir = folders[MODEL_FOLDER]  # members go to out/model/member-k, which the pipeline loads
        train_ensemble(model_init, config, args, train_tokens, num_members=options.num_members, freeze_leaking=True,
                       **trainer_kwargs)
    train.save_to_disk(folders[TRAIN_FOLDER])
    if valid is not None:
        valid.save_to_disk(folders[VALIDATION_FOLDER])
    return {**{k: v for k, v in folders.items() if k != VALIDATION_FOLDER or valid is not None}, "metrics": metrics,
            "classes": names}


def _train_parser(show_all: bool) -> Any:
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(
        (TrainOptions, TrainingArguments), prog=f"{PROG} train", formatter_class=_HelpFormatter,
        description=_paragraphs(
            "Fine-tune a pretrained transformer as an influence-ready text classifier: every training example gets "
            "its own turn-over dropout mask (on the adapter and the classifier head), so that later a forward pass "
            "with the flipped mask shows the model without that example.",
            "Our options come first; the rest are transformers' TrainingArguments (the common ones are shown; "
            "--help_all lists all). Defaults changed here: --learning_rate 1e-3 (adapters and heads learn fast), "
            "--report_to none, and --eval_strategy epoch when there is validation data.",
        ),
        epilog=(
            "Examples:\n"
            f"  {PROG} train --model path/to/all-MiniLM-L6-v2 --train_file train.csv --output_dir out\n"
            f"  {PROG} train --model bert-base-uncased --train_file reviews.jsonl --text_column review \\\n"
            "      --label_column stars --validation_file valid.jsonl --num_train_epochs 3 --output_dir out\n"
            f"  {PROG} train --model roberta-base --train_file data/ --num_members 8 --output_dir out  # ensemble\n\n"
            "Writes out/model (checkpoint + tokenizer + turnover_config.json), out/train (the training set with its\n"
            "example_id column), out/validation and out/trainer_state.json."
        ),
    )
    parser.set_defaults(learning_rate=1e-3, report_to="none")
    for action in parser._actions:
        if action.dest == "output_dir":
            action.help = ("Required. Gets model/ (checkpoint + tokenizer), train/ and validation/ (the data with "
                           "example ids), trainer_state.json and the Trainer's checkpoints.")
    if not show_all:
        shown = set(COMMON_TRAINING_ARGUMENTS) | {f.name for f in dataclasses.fields(TrainOptions)}
        for action in parser._actions:
            if action.dest not in shown and action.dest != "help":
                action.help = argparse.SUPPRESS
    return parser


def _command_train(argv: list[str]) -> int:
    show_all = any(a in ("--help_all", "--help-all") for a in argv)
    parser = _train_parser(show_all)
    if show_all:
        parser.print_help()
        return 0
    given = lambda *names: any(a.split("=")[0] in names for a in argv)  # noqa: E731
    if not given("-h", "--help") and not given("--output_dir", "--output-dir"):
        raise TurnoverError("give --output_dir: the folder that will hold the model, the data and the logs.")
    if given("--validation_file", "--validation-file") and not given("--eval_strategy", "--eval-strategy"):
        argv = [*argv, "--eval_strategy", "epoch"]  # evaluate (and log the flip-sanity losses) every epoch
    options, training_args = parser.parse_args_into_dataclasses(argv)
    written = run_train(options, training_args)
    print(f"influence-ready model: {written[MODEL_FOLDER]}")
    print(f"training set with example ids: {written[TRAIN_FOLDER]}")
    for key, value in written["metrics"].items():
        print(f"{key.replace('eval_', 'validation ')}: {value:.4f}")
    model = written[MODEL_FOLDER]
    print(f"\nnext:\n  {PROG} explain --model {model} --text \"...\"\n  {PROG} report --model {model} "
          f"--output {os.path.join(training_args.output_dir, 'report.html')}")
    return 0


# -- scoring commands --------------------------------------------------------------------------------------------
def _pipeline(options: ScoringOptions) -> Any:
    from datasets import load_from_disk

    from .pipeline import InfluencePipeline

    if not os.path.isdir(options.model):
        raise TurnoverError(f"--model {options.model!r} is not a folder; give the folder `turnover-hf train` wrote.")
    train_path = options.train or _next_to_model(options.model, TRAIN_FOLDER)
    if train_path is None:
        raise TurnoverError(
            f"no training set: pass --train (the save_to_disk folder of the training set with its example_id column); "
            f"`turnover-hf train` writes it to {TRAIN_FOLDER}/ next to the model."
        )
    if not os.path.isdir(train_path):
        raise TurnoverError(f"--train {train_path!r} is not a save_to_disk folder.")
    train = _standard_columns(load_from_disk(train_path), options.text_column, options.label_column,
                              f"the training set {train_path!r}", need_label=False)
    # a fit is kept next to the model and reused by the next command (with the same options)
    estimator_options: dict[str, Any] = {"save_fit": True}
    given = [chosen for chosen in options.estimator_options if chosen != type(chosen)()]
    if len(given) > 1:
        raise TurnoverError(f"options of several estimators were given ({[type(g).__name__ for g in given]}); "
                            "give those of the one --estimator names.")
    if given:
        estimator_options["options"] = given[0]
    pipe = InfluencePipeline(options.model, train_dataset=train, batch_size=options.batch_size,
                             max_length=options.max_length, device=options.device, estimator=options.estimator,
                             **estimator_options)
    if pipe.tokenizer is None:
        raise TurnoverError(f"{options.model!r} has no tokenizer; save it there with tokenizer.save_pretrained(...).")
    return pipe


def _label_names(pipe: Any) -> dict[int, str]:
    return {int(k): str(v) for k, v in (getattr(pipe.model.config, "id2label", None) or {}).items()}


def _label_id(label: str, pipe: Any) -> int:
    label2id = {str(k): int(v) for k, v in (getattr(pipe.model.config, "label2id", None) or {}).items()}
    if label in label2id:
        return label2id[label]
    if label.lstrip("-").isdigit() and 0 <= int(label) < pipe.model.config.num_labels:
        return int(label)
    raise TurnoverError(f"unknown --label {label!r}; the model's labels are {list(label2id) or 'integers'}.")


def _targets(path: str, options: ScoringOptions, pipe: Any, limit: Optional[int] = None) -> Any:
    """Targets from a file or folder: ``text`` and, where present, ``label`` as the model's class index."""
    data = _load_table(path, "targets", "validation")
    data = _standard_columns(data, options.text_column, options.label_column, f"the targets {path!r}", need_label=False)
    if limit is not None and len(data) > limit:
        data = data.select(range(limit))
    if "label" in data.column_names:
        names = [_label_names(pipe)[i] for i in range(pipe.model.config.num_labels)]
        data = _encode_labels(data, names, f"the targets {path!r}")
    return data.select_columns([c for c in ("text", "label") if c in data.column_names])


def _print_row(row: dict[str, Any], names: dict[int, str], score_key: str = "score", width: int = 100) -> None:
    text = " ".join(str(row.get("text", "")).split())
    text = text if len(text) <= width else text[: width - 1] + "…"
    label = names.get(row.get("label"), row.get("label"))
    print(f"    {row[score_key]:+.4f}  [{label}] #{row['example_id']}  {text}")


def _command_explain(options: ScoringOptions, explain: ExplainOptions) -> int:
    if not explain.text and not explain.targets:
        raise TurnoverError("nothing to explain: give --text \"...\" (one or more) or --targets FILE.")
    if explain.output:
        _refuse_existing(explain.output, explain.overwrite)
    pipe = _pipeline(options)
    if explain.targets:
        data = _targets(explain.targets, options, pipe)
        targets = [dict(row) for row in data]
    else:
        targets = [{"text": t} for t in explain.text]
        if explain.label is not None:
            label = _label_id(explain.label, pipe)
            targets = [{**t, "label": label} for t in targets]
    results = pipe([dict(t) for t in targets], top_k=explain.top_k)
    names = _label_names(pipe)
    for target, result in zip(targets, results):
        result["text"] = target["text"]
        print(f"\n{target['text']!r}")
        print(f"  label {names.get(result['label'], result['label'])} ({result['label_source']})")
        for title, key in (("helped most (proponents)", "proponents"), ("hurt most (opponents)", "opponents")):
            print(f"  {title}:")
            for row in result[key]:
                _print_row(row, names)
    if explain.output:
        atomic_write_text(explain.output, json.dumps(results, indent=1, ensure_ascii=False) + "\n")
        print(f"\nwrote {explain.output}")
    return 0


def _command_self_influence(options: ScoringOptions, chosen: SelfInfluenceOptions) -> int:
    _refuse_existing(chosen.output, chosen.overwrite)
    pipe = _pipeline(options)
    names = _label_names(pipe)
    scores = _shown(pipe.self_influence(), "self_influence", names).sort("self_influence", reverse=True)
    _write_rows(chosen.output, scores, chosen.overwrite)
    print(f"self-influence of {len(scores)} training examples, highest first (memorised, possibly mislabelled):")
    for row in scores.select(range(min(chosen.top, len(scores)))):
        _print_row(row, names, "self_influence")
    print(f"wrote {chosen.output}")
    return 0


def _command_label_issues(options: ScoringOptions, chosen: LabelIssuesOptions) -> int:
    for path in (chosen.output, chosen.kept_dataset, chosen.relabelled_dataset):
        if path:
            _refuse_existing(path, chosen.overwrite)
    pipe = _pipeline(options)
    ranked = pipe.label_issues(chosen.method, num_issues=chosen.num_issues)
    _write_rows(chosen.output, ranked, chosen.overwrite)
    flagged = ranked.filter(lambda row: row["is_issue"])
    print(f"{len(ranked)} training labels ranked by {ranked[0]['method']!r}; {len(flagged)} flagged as issues. "
          "Most suspicious (given -> suggested):")
    for row in ranked.select(range(min(chosen.top, len(ranked)))):
        text = " ".join(str(row.get("text", "")).split())[:80]
        print(f"    {row['score']:+.4f}  #{row['example_id']}  {row.get('given_label_name', row['given_label'])} -> "
              f"{row.get('suggested_label_name', row['suggested_label'])}  {text}")
    print(f"wrote {chosen.output}")
    suggested = dict(zip(flagged["example_id"], flagged["suggested_label"]))
    label = options.label_column if options.label_column in pipe.train_dataset.column_names else "label"
    if chosen.kept_dataset:
        kept = pipe.train_dataset.filter(lambda row: row["example_id"] not in suggested)
        kept.save_to_disk(chosen.kept_dataset)
        print(f"kept {len(kept)} training examples in {chosen.kept_dataset}")
    if chosen.relabelled_dataset:
        fixed = pipe.train_dataset.map(lambda row: {label: suggested.get(row["example_id"], row[label])})
        fixed.save_to_disk(chosen.relabelled_dataset)
        print(f"relabelled {len(suggested)} examples in {chosen.relabelled_dataset}")
    return 0


def _command_cleanse(options: ScoringOptions, chosen: CleanseOptions) -> int:
    _refuse_existing(chosen.output, chosen.overwrite)
    if chosen.kept_dataset:
        _refuse_existing(chosen.kept_dataset, chosen.overwrite)
    if not 0 < chosen.fraction <= 1:
        raise TurnoverError(f"--fraction must be in (0, 1], got {chosen.fraction}.")
    validation = chosen.validation or _next_to_model(options.model, VALIDATION_FOLDER)
    if validation is None:
        raise TurnoverError("give --validation: labelled held-out data whose loss the removal should lower.")
    pipe = _pipeline(options)
    targets = _targets(validation, options, pipe)
    if "label" not in targets.column_names:
        raise TurnoverError(f"the validation data {validation!r} needs labels (column {options.label_column!r}).")
    names = _label_names(pipe)
    influence = _shown(pipe.mean_influence(targets), "mean_influence", names).sort("mean_influence")
    limit = chosen.count if chosen.count is not None else int(chosen.fraction * len(influence))
    harmful = influence.filter(lambda row: row["mean_influence"] < 0)
    removed = harmful.select(range(min(max(limit, 0), len(harmful))))
    _write_rows(chosen.output, removed, chosen.overwrite, ids_only=True)
    print(f"mean influence of {len(influence)} training examples on {len(targets)} validation targets; "
          f"{len(harmful)} hurt them on average. Removing the {len(removed)} most harmful:")
    for row in removed.select(range(min(10, len(removed)))):
        _print_row(row, names, "mean_influence")
    print(f"wrote {len(removed)} ids to {chosen.output}")
    if chosen.kept_dataset:
        gone = set(removed["example_id"])
        kept = pipe.train_dataset.filter(lambda row: row["example_id"] not in gone)
        kept.save_to_disk(chosen.kept_dataset)
        print(f"kept {len(kept)} training examples in {chosen.kept_dataset}: retrain with "
              f"{PROG} train --train_file {chosen.kept_dataset} ...")
    return 0


def _command_report(options: ScoringOptions, chosen: ReportOptions) -> int:
    from . import plots, report
    from .losses import predicted_labels

    _refuse_existing(chosen.output, chosen.overwrite)
    pipe = _pipeline(options)
    names = _label_names(pipe)
    self_influence = _shown(pipe.self_influence(), "self_influence", {})
    figures: dict[str, Any] = {"Self-influence": plots.self_influence_histogram(self_influence)}
    captions = {"Self-influence": "Influence of each training example on itself (paper App. E); the right tail "
                                  "holds memorised and often mislabelled examples."}
    state_path = chosen.trainer_state or _next_to_model(options.model, STATE_FILE)
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
    targets_path = chosen.targets or _next_to_model(options.model, VALIDATION_FOLDER)
    if targets_path is not None:
        targets = _targets(targets_path, options, pipe, limit=chosen.max_targets)
        sizes["targets"] = len(targets)  # scored (at most --max_targets)
        batch, labels, sources = pipe.prepare_targets(targets)
        predicted = predicted_labels(pipe.model, batch).cpu()
        order = list(range(len(targets)))
        if sources[0] == "given":
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
    config = getattr(pipe.model, "turnover_config", None) if len(getattr(pipe, "models", [pipe.model])) == 1 else None
    path = report.write_report(
        chosen.output, overwrite=chosen.overwrite, title=chosen.title, config=config,
        model=os.path.abspath(options.model), dataset_sizes=sizes, metrics=metrics, explanations=explanations,
        suspects=self_influence, figures=figures, captions=captions, label_names=names, top_k=chosen.top_k,
        max_suspects=chosen.suspects, estimator=pipe.estimator,
    )
    print(f"wrote the report to {path}")
    return 0


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
        (ScoringOptions, ExplainOptions), _command_explain,
    ),
    "self-influence": _Command(
        "score every training example on itself (for wrong labels, label-issues measured better)",
        "The influence of each training example on its own prediction, written highest first. High values are "
        "examples the model had to memorise, unlike the rest of the data: often mislabelled "
        "(Kobayashi et al. 2020, App. E). To find wrong labels, label-issues ranked them better in "
        "benchmarks/label_errors.py.",
        f"  {PROG} self-influence --model out/model --output out/self_influence.csv --top 20",
        (ScoringOptions, SelfInfluenceOptions), _command_self_influence,
    ),
    "label-issues": _Command(
        "rank the training labels most likely to be wrong (and fix them)",
        "Every training example scored by how suspicious its label is, most suspicious first, with the label the "
        "model suggests instead. The default scoring (loss_classnorm) measured best in benchmarks/label_errors.py on "
        "Rotten Tomatoes and a 3-class corpus with 10 %, 20 % and class-conditional noise: AUC 0.66-0.79, above the "
        "plain training loss in 4 of 6 settings (far above it under class-conditional noise) and within 0.012 of "
        "5-fold cleanlab or ahead, at one training instead of five; self-influence ranked wrong labels worse. "
        "--kept_dataset / --relabelled_dataset write the training set without / with fixed flagged labels.",
        f"  {PROG} label-issues --model out/model --output out/label_issues.csv --top 20\n"
        f"  {PROG} label-issues --model out/model --output out/issues.csv --kept_dataset out/cleaned",
        (ScoringOptions, LabelIssuesOptions), _command_label_issues,
    ),
    "cleanse": _Command(
        "find training examples that hurt a validation set",
        "Mean influence of every training example over a labelled validation set; the most harmful (most "
        "negative) are written out for removal before retraining (Kobayashi et al. 2020, Table 2).",
        f"  {PROG} cleanse --model out/model --validation valid.csv --output out/remove.txt --fraction 0.02\n"
        f"  {PROG} cleanse --model out/model --output out/remove.csv --count 50 --kept_dataset out/cleansed",
        (ScoringOptions, CleanseOptions), _command_cleanse,
    ),
    "report": _Command(
        "write a self-contained HTML report with plots",
        "One HTML page (plots embedded, no external files) with the model's configuration, explained "
        "predictions (misclassified targets first), the suspected mislabelled training examples, a "
        "self-influence histogram, the influence heatmap by class and the training-time flip-sanity curves.",
        f"  {PROG} report --model out/model --output out/report.html\n"
        f"  {PROG} report --model out/model --targets test.csv --explain 5 --output test_report.html",
        (ScoringOptions, ReportOptions), _command_report,
    ),
}
TRAIN_HELP = "fine-tune a model with turn-over dropout (influence-ready)"


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_paragraphs("Influence-ready Hugging Face classifiers with turn-over dropout: train once, then "
                                "ask which training examples made the model say what it says."),
        epilog=WORKFLOW,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", help=f"{PROG} COMMAND --help: its options")
    commands.add_parser("train", help=TRAIN_HELP, add_help=False)
    for name, command in COMMANDS.items():
        commands.add_parser(name, help=command.help, add_help=False)
    return parser


def _command_parser(name: str) -> Any:
    from transformers import HfArgumentParser

    command = COMMANDS[name]
    extra = tuple(options_classes()) if ScoringOptions in command.options else ()
    parser = HfArgumentParser(
        (*command.options, *extra), prog=f"{PROG} {name}", description=_paragraphs(command.description),
        formatter_class=_HelpFormatter,
        epilog="Examples:\n" + command.examples,
    )
    for action in parser._actions:  # the registered estimators, as they are when the command runs
        if action.dest == "estimator":
            action.choices = estimator_names()
            action.help = f"{action.help} {describe_estimators()}"
    return parser


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
        if name == "train":
            return _command_train(rest)
        values = _command_parser(name).parse_args_into_dataclasses(rest)
        extra = [v for v in values if type(v) in options_classes()]
        values = [v for v in values if type(v) not in options_classes()]
        for value in values:
            if isinstance(value, ScoringOptions):
                value.estimator_options = extra
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
