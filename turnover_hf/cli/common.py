"""What every command shares: the program's name, the folders ``train`` writes, the help layout."""

from __future__ import annotations

import argparse
import textwrap

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
    "report_to", "resume_from_checkpoint",
)

WORKFLOW = f"""\
A typical session:
  {PROG} train --model path/to/model --train_file train.csv --validation_file valid.csv --output_dir out
  {PROG} explain --model out/model --text "a gripping, beautifully shot film"
  {PROG} label-issues --model out/model --output out/label_issues.csv
  {PROG} audit --model out/model --test test.csv --output out/issues.csv --html out/audit.html
  {PROG} self-influence --model out/model --output out/self_influence.csv
  {PROG} cleanse --model out/model --validation out/validation --output out/remove.txt
  {PROG} report --model out/model --output out/report.html

`train` writes out/model (the influence-ready checkpoint with its tokenizer), out/train (the training set with its
example ids) and out/validation; the other commands find out/train next to the model by themselves.
Data files: CSV, TSV, JSON/JSONL, Parquet, or a folder written by datasets' save_to_disk, with a text column and
(for training) a label column. Options accept --snake_case and --kebab-case spellings.
Errors are one line; set {TRACEBACK_ENV}=1 to see the full traceback."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help (not for required options or None), description and epilog kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def paragraphs(*texts: str, width: int = 100) -> str:
    return "\n\n".join(textwrap.fill(text, width) for text in texts)
