"""``turnover-hf train``: fine-tune a pretrained transformer as an influence-ready text classifier."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ..callbacks import FlipSanityCallback
from ..config import TurnoverConfig
from ..data import add_example_ids
from ..errors import TurnoverError
from ..estimators.ensemble import train_ensemble
from ..patcher import patch_model
from ..trainer import TurnoverTrainer
from ..training_set import DatasetSource
from .checks import check_writable
from .common import (
    COMMON_TRAINING_ARGUMENTS,
    MODEL_FOLDER,
    PROG,
    TRAIN_FOLDER,
    VALIDATION_FOLDER,
    HelpFormatter,
    paragraphs,
)
from .tables import class_names, encode_labels, load_table, refuse_existing, standard_columns


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


# -- train -------------------------------------------------------------------------------------------------------
def base_model(options: TrainOptions, names: list[str]) -> Any:
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
        # activating resets the adapters inside an empty forward context, and adapters warns that none is active yet
        quiet = logging.getLogger("adapters.model_mixin")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            model.train_adapter("task")
        finally:
            quiet.setLevel(level)
    return model


def accuracy(prediction: Any) -> dict[str, float]:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


RESUME_LAST = "last"


def resume_checkpoint(training_args: Any, num_members: int) -> Optional[str]:
    """The checkpoint ``--resume_from_checkpoint`` asks for (``last``: the newest in ``--output_dir``), checked; None
    for a fresh run, which is refused over an earlier run's checkpoints unless ``--overwrite_output_dir``
    (their checkpoints are then removed, so that no later resume mixes the two runs)."""
    from transformers.trainer_utils import get_last_checkpoint

    out = training_args.output_dir
    resume = training_args.resume_from_checkpoint
    last = get_last_checkpoint(out) if os.path.isdir(out) else None
    if resume is not None and num_members > 1:
        raise TurnoverError("--resume_from_checkpoint resumes one model; with --num_members > 1 train the ensemble again "
                            "(or train its members one by one with turnover_hf.train_ensemble).")
    if resume == RESUME_LAST:
        if last is None:
            raise TurnoverError(
                f"--resume_from_checkpoint: --output_dir {out!r} holds no checkpoint-* folder to resume from; give the "
                "checkpoint folder, or train without --resume_from_checkpoint."
            )
        return last
    if resume is not None:
        if not os.path.isfile(os.path.join(resume, "trainer_state.json")):
            raise TurnoverError(
                f"--resume_from_checkpoint {resume!r} is not a Trainer checkpoint (no trainer_state.json); give a "
                f"checkpoint-* folder the Trainer saved, or --resume_from_checkpoint alone for the last one in {out!r}."
            )
        return resume
    if last is not None:
        if not training_args.overwrite_output_dir:
            raise TurnoverError(
                f"--output_dir {out!r} holds the checkpoints of an earlier run (last: {os.path.basename(last)}); pass "
                "--resume_from_checkpoint to continue it, or --overwrite_output_dir to train from scratch (its "
                "checkpoints are then removed)."
            )
        for name in os.listdir(out):
            if re.fullmatch(r"checkpoint-\d+", name) and os.path.isdir(os.path.join(out, name)):
                shutil.rmtree(os.path.join(out, name))
    return None


def run_train(options: TrainOptions, training_args: Any) -> dict[str, Any]:
    """Patch, train and save; returns where everything went."""
    from transformers import AutoTokenizer, DataCollatorWithPadding


    if options.num_members < 1:
        raise TurnoverError(f"--num_members must be at least 1, got {options.num_members}.")
    out = training_args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise TurnoverError(f"--output_dir {out!r} is a file; give a folder.")
    check_writable(out, "--output_dir")
    folders = {name: os.path.join(out, name) for name in (MODEL_FOLDER, TRAIN_FOLDER, VALIDATION_FOLDER)}
    for folder in folders.values():
        refuse_existing(folder, training_args.overwrite_output_dir, "--overwrite_output_dir")
    config = TurnoverConfig(p=options.p, seed=options.mask_seed, channels=options.channels)  # validates them first

    train = standard_columns(load_table(options.train_file, "--train_file", options.split, options.text_column), options.text_column,
                              options.label_column, "the training data", need_label=True, path=options.train_file)
    names = class_names(train)
    if len(names) < 2:
        raise TurnoverError(f"the training data has a single class {names}; a classifier needs at least two.")
    train = add_example_ids(encode_labels(train, names, "the training data"))
    valid = None
    if options.validation_file:
        valid = standard_columns(load_table(options.validation_file, "--validation_file", "validation", options.text_column),
                                  options.text_column, options.label_column, "the validation data", need_label=True,
                                  path=options.validation_file)
        valid = encode_labels(valid, names, "the validation data")

    resume = resume_checkpoint(training_args, options.num_members)  # (after the data files passed their checks)
    tokenizer = AutoTokenizer.from_pretrained(options.model)
    if tokenizer.pad_token is None:  # GPT-style tokenizers: pad with the end-of-text token
        tokenizer.pad_token = tokenizer.eos_token

    def tokenize(data: Any, keep_text: bool = False) -> Any:
        return data.map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=options.max_length),
                        batched=True, remove_columns=[] if keep_text else ["text"], desc="tokenize")

    # the texts stay beside their tokens, so the model records (and the pipeline checks) both; the Trainer drops
    # them from its batches (remove_unused_columns)
    train_tokens = tokenize(train, keep_text=training_args.remove_unused_columns)
    tokenizer.model_max_length = options.max_length  # saved with the model: scoring truncates as training did
    valid_tokens = None
    if valid is not None:
        valid_tokens = tokenize(valid.select_columns(["text", "label"]))
    collator = DataCollatorWithPadding(tokenizer)

    def model_init() -> Any:
        model = base_model(options, names)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    trainer_kwargs: dict[str, Any] = dict(
        data_collator=collator, processing_class=tokenizer, eval_dataset=valid_tokens,
        compute_metrics=accuracy if valid_tokens is not None else None,
        # the checkpoint names the training set it is saved with, so InfluencePipeline(out/model) finds it alone
        train_dataset_source=DatasetSource(os.path.abspath(folders[TRAIN_FOLDER]), split=None, from_disk=True),
    )
    metrics: dict[str, Any] = {}
    if options.num_members == 1:
        callbacks = []
        if valid_tokens is not None and options.sanity_examples > 0:
            sample = train_tokens.select(range(min(options.sanity_examples, len(train_tokens)))).select_columns(
                [c for c in train_tokens.column_names if c != "text"])
            callbacks.append(FlipSanityCallback(sample, collator))
        model = patch_model(model_init(), config, freeze_leaking=True)
        trainer = TurnoverTrainer(model=model, args=training_args, train_dataset=train_tokens, callbacks=callbacks,
                                  **trainer_kwargs)
        trainer.train(resume_from_checkpoint=resume)
        model.save_pretrained(folders[MODEL_FOLDER])
        tokenizer.save_pretrained(folders[MODEL_FOLDER])
        trainer.save_state()  # trainer_state.json: the log history with the flip-sanity losses, for `report`
        evaluations = [r for r in trainer.state.log_history if "eval_accuracy" in r]
        if evaluations:
            metrics = {k: evaluations[-1][k] for k in ("eval_loss", "eval_accuracy")}
    else:

        args = copy.copy(training_args)
        args.output_dir = folders[MODEL_FOLDER]  # members go to out/model/member-k, which the pipeline loads
        train_ensemble(model_init, config, args, train_tokens, num_members=options.num_members, freeze_leaking=True,
                       **trainer_kwargs)
    train.save_to_disk(folders[TRAIN_FOLDER])
    if valid is not None:
        valid.save_to_disk(folders[VALIDATION_FOLDER])
    return {**{k: v for k, v in folders.items() if k != VALIDATION_FOLDER or valid is not None}, "metrics": metrics,
            "classes": names}


def train_parser(show_all: bool) -> Any:
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(
        (TrainOptions, TrainingArguments), prog=f"{PROG} train", formatter_class=HelpFormatter,
        description=paragraphs(
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
        if action.dest == "resume_from_checkpoint":
            action.help = ("Continue an interrupted run from this checkpoint-* folder; alone (no folder): from the last "
                           "checkpoint in --output_dir.")
        if action.dest == "output_dir":
            action.help = ("Required. Gets model/ (checkpoint + tokenizer), train/ and validation/ (the data with "
                           "example ids), trainer_state.json and the Trainer's checkpoints.")
    if not show_all:
        shown = set(COMMON_TRAINING_ARGUMENTS) | {f.name for f in dataclasses.fields(TrainOptions)}
        for action in parser._actions:
            if action.dest not in shown and action.dest != "help":
                action.help = argparse.SUPPRESS
    return parser


def command_train(argv: list[str]) -> int:
    show_all = any(a in ("--help_all", "--help-all") for a in argv)
    parser = train_parser(show_all)
    if show_all:
        parser.print_help()
        return 0
    given = lambda *names: any(a.split("=")[0] in names for a in argv)  # noqa: E731
    if not given("-h", "--help") and not given("--output_dir", "--output-dir"):
        raise TurnoverError("give --output_dir: the folder that will hold the model, the data and the logs.")
    for k, arg in enumerate(argv):  # --resume_from_checkpoint alone: the last checkpoint in --output_dir
        if arg in ("--resume_from_checkpoint", "--resume-from-checkpoint") and (
                k + 1 == len(argv) or argv[k + 1].startswith("--")):
            argv = [*argv[: k + 1], RESUME_LAST, *argv[k + 1 :]]
            break
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
