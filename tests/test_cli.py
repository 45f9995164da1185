"""The `turnover-hf` command end to end (subprocesses on a tiny random BERT and CSV files), its help and its errors."""

import csv
import json
import os
import subprocess
import sys

import pytest
from datasets import load_from_disk

import turnover_hf as th
from turnover_hf import cli

from conftest import text_task, tiny_bert, word_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["absent", "present"]


def turnover_hf(*args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env.pop(cli.TRACEBACK_ENV, None)
    return subprocess.run([sys.executable, "-m", "turnover_hf", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`turnover-hf train` on a CSV with named labels and renamed columns, run once for the module."""
    root = tmp_path_factory.mktemp("cli")
    word_tokenizer(root / "base").save_pretrained(root / "base")
    tiny_bert().save_pretrained(root / "base")
    for name, n, seed in (("train", 40, 0), ("valid", 12, 1)):
        data = text_task(n, seed).remove_columns("example_id")
        data = data.map(lambda r: {"sentiment": NAMES[r["label"]]}, remove_columns=["label"])
        data.rename_column("text", "review").to_csv(root / f"{name}.csv", index=False)
    done = turnover_hf(
        "train", "--model", "base", "--train_file", "train.csv", "--validation_file", "valid.csv",
        "--text_column", "review", "--label-column", "sentiment", "--reduction_factor", "2", "--mask_seed", "4",
        "--output_dir", "out", "--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--use_cpu",
        "--save_strategy", "no", "--sanity_examples", "8", cwd=root,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root, done


@pytest.fixture(scope="module")
def pipe(trained):
    root, _ = trained
    return th.InfluencePipeline(str(root / "out" / "model"), train_dataset=load_from_disk(root / "out" / "train"))


def test_train_writes_model_data_and_sanity_log(trained):
    root, done = trained
    out = root / "out"
    config = th.TurnoverConfig.from_pretrained(out / "model")
    assert (config.seed, config.num_train_examples, config.active_adapters) == (4, 40, ["task"])
    train = load_from_disk(out / "train")
    assert train.features["label"].names == NAMES  # string labels became classes, in sorted order
    assert sorted(train.column_names) == ["example_id", "label", "text"]
    assert train["example_id"] == list(range(40))
    assert load_from_disk(out / "validation").num_rows == 12
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert sum("train_sample_loss_flip" in r for r in history) == 2  # --eval_strategy epoch came by default
    assert f"influence-ready model: {os.path.join('out', 'model')}" in done.stdout
    assert "validation accuracy:" in done.stdout


def test_explain_prints_and_writes_the_pipeline_result(trained, pipe):
    root, _ = trained
    texts = ["w5 w7 w9 w11", "w8 w9 w10 w12"]
    done = turnover_hf("explain", "--model", "out/model", "--text", *texts, "--label", "present", "--top_k", "3",
                       "--output", "explained.json", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    written = json.loads((root / "explained.json").read_text())
    expected = pipe([{"text": t, "label": 1} for t in texts], top_k=3)
    for result, wanted, text in zip(written, expected, texts):
        assert (result["text"], result["label"], result["label_source"]) == (text, 1, "given")
        for key in ("proponents", "opponents"):
            assert [r["example_id"] for r in result[key]] == [r["example_id"] for r in wanted[key]]
            assert [r["score"] for r in result[key]] == pytest.approx([r["score"] for r in wanted[key]], abs=1e-6)
    top = written[0]["proponents"][0]
    assert f"{top['score']:+.4f}  [{NAMES[top['label']]}] #{top['example_id']}" in done.stdout


def in_process(root, *args):
    """The command in this process (each subprocess pays ~6 s of imports; these are the same code path)."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return cli.main([str(a) for a in args])
    finally:
        os.chdir(cwd)


def test_self_influence_writes_every_example_highest_first(trained, pipe, capsys):
    root, _ = trained
    assert in_process(root, "self-influence", "--model", "out/model", "--output", "si.csv", "--top", "2") == 0
    assert "wrote si.csv" in capsys.readouterr().out
    with open(root / "si.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:5] == ["example_id", "self_influence", "label", "label_name", "text"]
    values = [float(r["self_influence"]) for r in rows]
    assert values == sorted(values, reverse=True) and len(rows) == 40
    scores = pipe.self_influence()
    expected = dict(zip(scores["example_id"], scores["self_influence"]))
    for row in rows:
        assert float(row["self_influence"]) == pytest.approx(expected[int(row["example_id"])], abs=1e-6)
        assert row["label_name"] == NAMES[int(row["label"])]


def test_cleanse_lists_the_most_harmful_and_keeps_the_rest(trained, pipe):
    root, _ = trained
    assert in_process(root, "cleanse", "--model", "out/model", "--output", "remove.txt", "--count", "4",
                      "--kept_dataset", "kept") == 0
    removed = [int(line) for line in (root / "remove.txt").read_text().split()]
    validation = load_from_disk(root / "out" / "validation")
    harmful = pipe.mean_influence(validation).sort("mean_influence")
    expected = [i for i, v in zip(harmful["example_id"], harmful["mean_influence"]) if v < 0][:4]
    assert removed == expected and len(removed) == 4
    kept = load_from_disk(root / "kept")
    assert sorted(kept["example_id"]) == sorted(set(range(40)) - set(removed))


def test_report_writes_a_page_with_three_plots(trained):
    root, _ = trained
    done = turnover_hf("report", "--model", "out/model", "--output", "report.html", "--explain", "2", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    page = (root / "report.html").read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == 3  # self-influence, flip sanity, influence by class
    assert page.count("<h3>Target ") == 2
    assert "Suspected mislabelled" in page and "target accuracy" in page
    # the default estimator for a classifier is the influence function; the page says what its scores mean
    assert "Gauss-Newton" in page and "One model:" not in page
    done = turnover_hf("report", "--model", "out/model", "--output", "turnover.html", "--explain", "1",
                       "--estimator", "turnover", cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    page = (root / "turnover.html").read_text(encoding="utf-8")
    assert "One model:" in page and "flipped mask" in page  # a single turn-over model's scores carry the caveat


def test_errors_are_one_line_with_a_nonzero_exit(trained, capsys):
    root, _ = trained
    assert in_process(root, "explain", "--model", "nowhere", "--text", "w5") == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "turnover-hf explain: error: --model 'nowhere' is not a folder; give the folder `turnover-hf train` wrote."
    ]
    (root / "mine.csv").write_text("keep me", encoding="utf-8")
    assert in_process(root, "self-influence", "--model", "out/model", "--output", "mine.csv") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert (root / "mine.csv").read_text(encoding="utf-8") == "keep me"
    # A failure inside a library call (here: a training set of another size) is one line too.
    other = load_from_disk(root / "out" / "train").select(range(30))
    other.save_to_disk(root / "short")
    capsys.readouterr()  # datasets' progress bars
    assert in_process(root, "self-influence", "--model", "out/model", "--train", "short", "--output", "x.csv") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on 40 examples" in err[0]


def test_in_process_errors_name_the_fix(tmp_path, capsys):
    assert cli.main(["explain", "--model", str(tmp_path)]) == 1
    assert "give --text" in capsys.readouterr().err
    assert cli.main(["train", "--model", "x", "--train_file", "x.csv"]) == 1
    assert "give --output_dir" in capsys.readouterr().err
    (tmp_path / "data.xlsx").write_text("")
    code = cli.main(["train", "--model", "x", "--train_file", str(tmp_path / "data.xlsx"), "--output_dir",
                     str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "unknown format '.xlsx'" in err and len(err.strip().splitlines()) == 1


def test_help_explains_the_workflow(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    top = capsys.readouterr().out
    for command in ("train", "explain", "self-influence", "cleanse", "report", "A typical session"):
        assert command in top
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    short = capsys.readouterr().out
    assert "--num_train_epochs" in short and "--mask_seed" in short and "Examples:" in short
    assert "--adafactor" not in short  # the long tail of TrainingArguments only with --help_all
    assert cli.main(["train", "--help_all"]) == 0
    assert "--adafactor" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frobnicate"])
    assert exit_info.value.code == 2


def test_the_console_script_points_at_main():
    import importlib

    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as handle:
        target = tomllib.load(handle)["project"]["scripts"]["turnover-hf"]
    module, name = target.split(":")
    assert getattr(importlib.import_module(module), name) is cli.main


def test_train_an_ensemble_and_explain_with_it(trained, capsys):
    root, _ = trained
    assert in_process(root, "train", "--model", "base", "--train_file", "train.csv", "--text_column", "review",
                      "--label_column", "sentiment", "--reduction_factor", "2", "--mask_seed", "7",
                      "--num_members", "2", "--output_dir", "ens", "--max_steps", "2", "--use_cpu",
                      "--save_strategy", "no", "--disable_tqdm", "true") == 0
    seeds = [th.TurnoverConfig.from_pretrained(root / "ens" / "model" / f"member-{k}").seed for k in range(2)]
    assert seeds == [7, 8]
    capsys.readouterr()
    assert in_process(root, "explain", "--model", "ens/model", "--text", "w5 w6", "--output", "ens.json") == 0
    result = json.loads((root / "ens.json").read_text())[0]
    assert result["members"] == 2 and len(result["proponents"]) == 5


def test_the_influence_estimator_fits_once_and_is_reused(trained, capsys):
    root, _ = trained
    model = root / "out" / "model"
    train = load_from_disk(root / "out" / "train")
    texts = ["w5 w7 w9 w11", "w8 w9 w10 w12"]
    assert in_process(root, "explain", "--model", "out/model", "--text", *texts, "--label", "present",
                      "--estimator", "influence", "--top_k", "3", "--output", "influence.json") == 0
    assert (model / "influence" / "influence.json").is_file()  # the fit is kept for the next command
    written = json.loads((root / "influence.json").read_text())
    expected = th.InfluencePipeline(str(model), train_dataset=train, estimator="influence")(
        [{"text": t, "label": 1} for t in texts], top_k=3
    )
    assert in_process(root, "explain", "--model", "out/model", "--text", *texts, "--label", "present",
                      "--estimator", "turnover", "--top_k", "3", "--output", "turnover.json") == 0
    turnover = json.loads((root / "turnover.json").read_text())
    for result, wanted in zip(written, expected):
        assert [r["example_id"] for r in result["proponents"]] == [r["example_id"] for r in wanted["proponents"]]
        assert [r["score"] for r in result["proponents"]] == pytest.approx([r["score"] for r in wanted["proponents"]],
                                                                           rel=1e-4, abs=1e-7)
    assert [r["score"] for r in written[0]["proponents"]] != [r["score"] for r in turnover[0]["proponents"]]  # another estimator
    capsys.readouterr()
    assert in_process(root, "explain", "--model", "out/model", "--text", texts[0], "--estimator", "influence",
                      "--sketch_dim", "64") == 1  # a fit with other options is not silently reused
    assert "remove that folder" in capsys.readouterr().err
    assert in_process(root, "report", "--model", "out/model", "--estimator", "influence",
                      "--output", "influence_report.html") == 0
    page = (root / "influence_report.html").read_text()
    assert "Gauss-Newton influence function" in page and "One model:" not in page


def test_train_with_mask_channels_and_explain_from_the_saved_model(trained, capsys):
    root, _ = trained
    assert in_process(root, "train", "--model", "base", "--train_file", "train.csv", "--text_column", "review",
                      "--label_column", "sentiment", "--reduction_factor", "2", "--channels", "3",
                      "--output_dir", "chan", "--max_steps", "2", "--use_cpu", "--save_strategy", "no",
                      "--disable_tqdm", "true") == 0
    config = th.TurnoverConfig.from_pretrained(root / "chan" / "model")
    assert config.mask_sites["classifier"]["channels"] == 3
    capsys.readouterr()
    assert in_process(root, "explain", "--model", "chan/model", "--text", "w5 w6", "--output", "chan.json") == 0
    assert len(json.loads((root / "chan.json").read_text())[0]["proponents"]) == 5
    assert in_process(root, "train", "--model", "base", "--train_file", "train.csv", "--text_column", "review",
                      "--label_column", "sentiment", "--channels", "0", "--output_dir", "chan0", "--use_cpu") == 1
    assert "channels must be an integer" in capsys.readouterr().err


def test_the_training_set_is_checked_on_its_texts_and_a_correct_run_says_nothing_of_it(trained, capsys, caplog):
    import logging

    root, _ = trained
    config = json.loads((root / "out" / "model" / th.CONFIG_NAME).read_text())
    assert config["training_set"]["columns"] == ["input_ids", "labels", "text"]  # the trainer saw the texts too
    capsys.readouterr()
    with caplog.at_level(logging.INFO):
        assert in_process(root, "self-influence", "--model", "out/model", "--output", "checked.csv") == 0
    notes = capsys.readouterr().err + caplog.text
    assert "labels only" not in notes and "training set" not in notes and "train_dataset" not in notes
    edited = load_from_disk(root / "out" / "train").map(lambda r: {"text": "w9 w9" if r["example_id"] == 7 else r["text"]})
    edited.save_to_disk(root / "edited")
    capsys.readouterr()
    assert in_process(root, "self-influence", "--model", "out/model", "--train", "edited", "--output", "x.csv") == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Map")]
    assert len(err) == 1 and "column 'text' differs in 1 rows (e.g. ids [7])" in err[0] and "edited" in err[0]
    assert not (root / "x.csv").exists()
