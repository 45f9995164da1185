"""The CLI's files and flags: bad data files, flags and outputs are refused up front in one line naming the file or
flag and the fix; train resumes when asked; one run per output folder; a correct run prints no library noise."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings

import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file, save_file

import turnover_hf as th
from turnover_hf import cli
from turnover_hf.cli.tables import load_table
from turnover_hf.store import LOCK, claim_folder

from conftest import text_task, tiny_bert, word_tokenizer
from test_cli import in_process as run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["absent", "present"]
TRAIN_ARGS = ("--reduction_factor", "2", "--per_device_train_batch_size", "8", "--use_cpu", "--report_to", "none",
              "--sanity_examples", "0")


def one_error(capsys):
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error:" in line]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A base model, CSV data, and a model trained by `turnover-hf train` (2 epochs, a checkpoint each)."""
    root = tmp_path_factory.mktemp("cli_inputs")
    word_tokenizer(root / "base").save_pretrained(root / "base")
    tiny_bert().save_pretrained(root / "base")
    data = text_task(24, 0).remove_columns("example_id")
    data.map(lambda r: {"sentiment": NAMES[r["label"]]}, remove_columns=["label"]).to_csv(root / "train.csv", index=False)
    assert run(root, "train", "--model", "base", "--train_file", "train.csv", "--label_column", "sentiment",
               "--output_dir", "out", "--num_train_epochs", "2", "--save_strategy", "epoch", *TRAIN_ARGS) == 0
    return root


# -- data files ----------------------------------------------------------------------------------------------------
BAD_FILES = {
    "empty.csv": (b"", "is empty; give a file with a header row"),
    "blank.csv": (b"\n \n", "holds only blank lines"),
    "header.csv": (b"text,sentiment\n", "has no rows \\(only a header"),
    "nolabel.csv": (b"text,sentiment\nw5 w6,absent\nw7 w8,\nw9,present\n",
                    "row 2 \\(line 3 of the file\\) has no 'sentiment'; fill that cell or remove the row"),
    "notext.csv": (b"text,sentiment\nw5 w6,absent\n,present\n", "row 2 \\(line 3 of the file\\) has no 'text'"),
    "latin1.csv": ("text,sentiment\nw5 caf\u00e9,absent\n".encode("latin-1"),
                   "is not UTF-8 \\(byte 0xe9 at offset 21, line 2\\); save it as UTF-8"),
    "utf16.csv": ("text,sentiment\nw5,absent\n".encode("utf-16"), "is UTF-16 .*save it as UTF-8"),
    "data.xlsx": (b"PK\x03\x04", "unknown format '.xlsx'; use .csv"),
    "noext": (b"text\nw5\n", "unknown format '\\(no extension\\)'"),
    "fake.parquet": (b"text,sentiment\nw5,absent\n", "is not a Parquet file"),
    "broken.json": (b'[{"text": "w5", "sentiment": "absent"}, {"text": ', "could not be read as JSON"),
    "emptylist.json": (b"[]", "has no rows"),
    "numbers.json": (b'[{"text": 5, "sentiment": "absent"}, {"text": 6, "sentiment": "present"}]',
                     "the 'text' column holds int values, not text"),
    "nolabels.jsonl": (b'{"text": "w5", "sentiment": "absent"}\n{"text": "w6", "sentiment": null}\n',
                       "row 2 has no 'sentiment'"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_bad_data_file_is_refused_in_one_line_naming_file_row_and_fix(tmp_path, capsys, name):
    content, message = BAD_FILES[name]
    (tmp_path / name).write_bytes(content)
    code = run(tmp_path, "train", "--model", "nowhere", "--train_file", name, "--label_column", "sentiment",
               "--output_dir", "out")  # the model is never loaded: the file is checked first
    line = one_error(capsys)
    assert code == 1 and name in line
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists()


def test_a_missing_data_file_and_a_missing_text_column_name_the_fix(tmp_path, capsys):
    assert run(tmp_path, "train", "--model", "x", "--train_file", "gone.csv", "--output_dir", "out") == 1
    assert "--train_file 'gone.csv': no such file or folder" in one_error(capsys)
    (tmp_path / "t.csv").write_text("review,label\nw5,1\n", encoding="utf-8")
    assert run(tmp_path, "train", "--model", "x", "--train_file", "t.csv", "--output_dir", "out") == 1
    assert "has no 'text' column (columns: ['review', 'label']); name it with --text_column" in one_error(capsys)


def test_a_spreadsheet_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    (tmp_path / "bom.csv").write_bytes("\ufefftext,label\nw5 w6,1\n".encode("utf-8"))
    data = load_table(str(tmp_path / "bom.csv"), "--train_file")
    assert data.column_names == ["text", "label"] and data[0] == {"text": "w5 w6", "label": 1}


def test_csv_text_is_read_as_written(tmp_path):
    (tmp_path / "t.csv").write_text("text,label\nNA,1\n007,0\nnull,1\n1e5,0\n", encoding="utf-8")
    data = load_table(str(tmp_path / "t.csv"), "--train_file", text_column="text")
    assert data["text"] == ["NA", "007", "null", "1e5"] and data["label"] == [1, 0, 1, 0]


def test_blank_lines_of_a_targets_txt_are_no_targets(tmp_path):
    (tmp_path / "t.txt").write_text("w5 w6\n\n  \nw7\n\n", encoding="utf-8")
    assert load_table(str(tmp_path / "t.txt"), "--targets")["text"] == ["w5 w6", "w7"]


def test_parquet_and_jsonl_files_are_read(tmp_path):
    frame = text_task(5).remove_columns("example_id").to_pandas()
    frame.to_parquet(tmp_path / "t.parquet")
    frame.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    for name in ("t.parquet", "t.jsonl"):
        assert load_table(str(tmp_path / name), "--train_file").to_pandas().equals(frame)


# -- flags ---------------------------------------------------------------------------------------------------------
def test_explain_refuses_text_with_targets_and_label_without_text(root, capsys):
    (root / "targets.csv").write_text("text\nw5 w6\n", encoding="utf-8")
    assert run(root, "explain", "--model", "out/model", "--text", "w5", "--targets", "targets.csv") == 1
    assert "give --text or --targets, not both" in one_error(capsys)
    assert run(root, "explain", "--model", "out/model", "--targets", "targets.csv", "--label", "present") == 1
    assert "--label is the label of the --text targets" in one_error(capsys)


def test_explain_with_targets_with_and_without_labels_keeps_each_given_label(root, capsys):
    (root / "mixed.csv").write_text("text,label\nw5 w6,present\nw7 w8,absent\n", encoding="utf-8")
    assert run(root, "explain", "--model", "out/model", "--targets", "mixed.csv", "--output", "mixed.json") == 0
    written = json.loads((root / "mixed.json").read_text())
    assert [(r["label"], r["label_source"]) for r in written] == [(1, "given"), (0, "given")]


OUTPUTS = [  # command, flag value, expected message; --model is no model: the output is checked before it
    (("self-influence", "--output", "scores.parquet"), "--output 'scores.parquet': unsupported extension '.parquet'"),
    (("explain", "--text", "w5", "--output", "out.csv"), "--output 'out.csv': unsupported extension '.csv'; give a file ending in .json"),
    (("report", "--output", "report.pdf"), "unsupported extension '.pdf'; give a file ending in .html or .htm"),
    (("self-influence", "--output", "full"), "--output 'full': unsupported extension '\\(none\\)'"),
    (("self-influence", "--output", "full.csv"), "--output 'full.csv' is a folder"),
    (("self-influence", "--output", "kept.csv"), "--output 'kept.csv' exists; choose another path or pass --overwrite"),
    (("self-influence", "--output", "kept.csv/x.csv"), "'.*kept.csv' is a file, so nothing can be written under it"),
    (("cleanse", "--output", "ids.txt", "--kept_dataset", "full"), "--kept_dataset 'full' is not empty"),
    (("cleanse", "--output", "ids.txt", "--kept_dataset", "kept.csv"), "--kept_dataset 'kept.csv' is a file"),
    (("label-issues", "--output", "issues.csv", "--relabelled_dataset", "kept.csv/d"), "is a file, so nothing"),
    (("cleanse", "--output", "ids.txt", "--count", "-1"), "--count must be 0 or more, got -1"),
    (("self-influence", "--output", "/proc/self/new/x.csv"), "is not writable"),
    (("explain", "--text", "w5", "--top_k", "0"), "--top_k must be 1 or more, got 0"),
    (("report", "--output", "r.html", "--max_targets", "0"), "--max_targets must be 1 or more, got 0"),
    (("report", "--output", "r.html", "--trainer_state", "gone.json"), "--trainer_state 'gone.json': no such file"),
    (("label-issues", "--output", "i.csv", "--num_issues", "-2"), "--num_issues must be 0 or more, got -2"),
]


@pytest.mark.parametrize("args, message", OUTPUTS)
def test_outputs_are_checked_before_any_computation(tmp_path, capsys, args, message):
    if args[-1].startswith("/proc/") and not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc")
    (tmp_path / "full.csv").mkdir()
    (tmp_path / "full" / "a").mkdir(parents=True)
    (tmp_path / "kept.csv").write_text("keep me", encoding="utf-8")
    assert run(tmp_path, args[0], "--model", "no-model-here", *args[1:]) == 1
    line = one_error(capsys)
    assert re.search(message, line), line
    assert (tmp_path / "kept.csv").read_text(encoding="utf-8") == "keep me"


# -- train: resume, reruns, the recorded training set --------------------------------------------------------------
def _weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def test_resume_from_checkpoint_continues_the_run_and_gives_its_weights(root, tmp_path, capsys):
    for name in ("resumed", "ignored"):
        shutil.copytree(root / "out", tmp_path / name)
        for gone in ("checkpoint-6", "model", "train"):  # interrupted after its first epoch
            shutil.rmtree(tmp_path / name / gone)
    shutil.copy(root / "train.csv", tmp_path)
    shutil.copytree(root / "base", tmp_path / "base")
    args = ("train", "--model", "base", "--train_file", "train.csv", "--label_column", "sentiment",
            "--num_train_epochs", "2", "--save_strategy", "epoch", *TRAIN_ARGS)
    assert run(tmp_path, *args, "--output_dir", "resumed", "--resume_from_checkpoint") == 0
    full = _weights(root / "out" / "model")
    resumed = _weights(tmp_path / "resumed" / "model")
    assert all(torch.equal(full[k], resumed[k]) for k in full)  # the interrupted run, finished
    # the checkpoint is what it continues from: change it, and the result changes
    path = tmp_path / "ignored" / "checkpoint-3" / "model.safetensors"
    state = load_file(path)
    state = {k: (v + 0.5 if "classifier" in k else v) for k, v in state.items()}
    save_file(state, path, metadata={"format": "pt"})
    assert run(tmp_path, *args, "--output_dir", "ignored", "--resume_from_checkpoint", "ignored/checkpoint-3") == 0
    moved = _weights(tmp_path / "ignored" / "model")
    assert not torch.equal(moved["classifier.weight"], full["classifier.weight"])


def test_a_rerun_over_checkpoints_says_what_to_do(root, tmp_path, capsys):
    shutil.copytree(root / "out", tmp_path / "out")
    shutil.copy(root / "train.csv", tmp_path)
    shutil.copytree(root / "base", tmp_path / "base")
    for gone in ("model", "train"):
        shutil.rmtree(tmp_path / "out" / gone)
    args = ("train", "--model", "base", "--train_file", "train.csv", "--label_column", "sentiment", "--output_dir",
            "out", "--num_train_epochs", "1", *TRAIN_ARGS)
    assert run(tmp_path, *args) == 1
    assert ("holds the checkpoints of an earlier run (last: checkpoint-6); pass --resume_from_checkpoint to continue "
            "it, or --overwrite_output_dir") in one_error(capsys)
    assert run(tmp_path, *args, "--resume_from_checkpoint", "base") == 1
    assert "--resume_from_checkpoint 'base' is not a Trainer checkpoint" in one_error(capsys)
    assert run(tmp_path, *args, "--save_strategy", "no", "--overwrite_output_dir") == 0
    assert not [d for d in os.listdir(tmp_path / "out") if d.startswith("checkpoint-")]  # no stale checkpoints left
    assert run(tmp_path, *args, "--resume_from_checkpoint", "--overwrite_output_dir") == 1
    assert "holds no checkpoint-* folder to resume from" in one_error(capsys)
    assert run(tmp_path, *args, "--output_dir", "train.csv") == 1
    assert "--output_dir 'train.csv' is a file" in one_error(capsys)


def test_the_trained_model_names_its_training_data(root):
    pipe = th.InfluencePipeline(str(root / "out" / "model"), estimator="turnover")  # no train_dataset
    saved = load_from_disk(root / "out" / "train")
    assert pipe.train_dataset["text"] == saved["text"] and pipe.train_dataset["example_id"] == saved["example_id"]


# -- one run per output folder ---------------------------------------------------------------------------------------
HOLDER = """
import sys, time
from turnover_hf.store import claim_folder
with claim_folder(sys.argv[1]):
    print("claimed", flush=True)
    time.sleep(60)
"""


def test_a_second_process_scoring_into_a_held_folder_is_told_who_holds_it(root, tmp_path):
    pipe = th.InfluencePipeline(str(root / "out" / "model"), estimator="turnover")
    folder = tmp_path / "scores"
    env = {**os.environ, "PYTHONPATH": REPO}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(th.TurnoverError, match=f"output_dir '{folder}' is in use by process {holder.pid}"):
            pipe.scores("w5 w6", output_dir=str(folder))
        assert not (folder / "scores.safetensors").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing its claim: the next run takes it over and computes the right result
    assert (folder / LOCK).exists()
    assert torch.equal(pipe.scores("w5 w6", output_dir=str(folder)), pipe.scores("w5 w6"))
    assert sorted(os.listdir(folder)) == ["manifest.json", "scores.safetensors"]


def test_a_claim_is_released_and_an_unreadable_young_claim_is_respected(tmp_path):
    with claim_folder(tmp_path / "a"):
        with pytest.raises(th.TurnoverError, match="is in use by process"):
            with claim_folder(tmp_path / "a"):
                pass
    with claim_folder(tmp_path / "a"):  # released on exit
        pass
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / LOCK).write_text("")  # being written by a starting process
    with pytest.raises(th.TurnoverError, match="in use by another process \\(starting now\\)"):
        with claim_folder(tmp_path / "b"):
            pass
    old = time.time() - 3600
    os.utime(tmp_path / "b" / LOCK, (old, old))  # ... or left empty by one that crashed long ago
    with claim_folder(tmp_path / "b"):
        pass


# -- a correct run is quiet ------------------------------------------------------------------------------------------
def test_a_correct_train_and_explain_print_no_warnings(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONWARNINGS": ""}
    env.pop(cli.TRACEBACK_ENV, None)
    word_tokenizer(tmp_path / "base").save_pretrained(tmp_path / "base")
    tiny_bert().save_pretrained(tmp_path / "base")
    text_task(16).remove_columns("example_id").to_csv(tmp_path / "train.csv", index=False)
    runs = [("train", "--model", "base", "--train_file", "train.csv", "--output_dir", "out", "--num_train_epochs",
             "1", "--save_strategy", "no", *TRAIN_ARGS),
            ("explain", "--model", "out/model", "--text", "w5 w6")]
    for args in runs:
        done = subprocess.run([sys.executable, "-m", "turnover_hf", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        noise = [line for line in done.stderr.splitlines() if line.strip() and not re.search(r"\d+%\|", line)
                 and "checked against the training set on its labels only" not in line]  # (the identity check's)
        assert noise == [], noise


def test_the_silencing_is_scoped_to_the_command_and_the_import_changes_no_filter(tmp_path):
    from datasets.utils.logging import is_progress_bar_enabled

    before, bars = list(warnings.filters), is_progress_bar_enabled()
    assert cli.main(["explain", "--model", str(tmp_path)]) == 1
    assert warnings.filters == before and is_progress_bar_enabled() == bars
    code = ("import warnings; n = len(warnings.filters); import turnover_hf; "
            "assert len(warnings.filters) == n, warnings.filters[:3]")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": REPO}, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
