"""The language-model examples end to end on the offline Rotten Tomatoes snippets (smoke-sized runs): a PEFT-LoRA
causal LM patched, trained, saved, reloaded and explained per token; App. A self-influence of a GPT-2 from scratch."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISSING = [p for p in ("scattertext", "pandas", "peft", "tokenizers") if importlib.util.find_spec(p) is None]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)}")]


def _run(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args], capture_output=True,
                          text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_peft_lora_causal_lm_example(tmp_path):
    out = _run("peft_lora_causal_lm.py", "--n-train", "100", "--n-base", "200", "--base-epochs", "1", "--epochs", "1",
               "--prompt", "The acting is", "--completion", " good, but dull.", "--top-k", "2",
               "--output-dir", str(tmp_path))
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors", "turnover_config.json", "tokenizer.json"} <= files
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tmp_path / "base")
    assert "identical masks, identical scores on 64 ids: True" in out
    assert "turn-over scoring path: prefix" in out  # LoRA only in the top layer: the lower layers run once per target
    assert "estimator: projected" in out  # the explanation comes from the estimator that measured best for an LM
    table = out.split("influence on each completion token")[1]
    assert "' good'" in table and "'.'" in table  # the completion's tokens head the columns
    assert table.count("#") == 4  # two proponents and two opponents, each with its snippet


def test_lm_self_influence_example(tmp_path):
    out = _run("lm_self_influence.py", "--n-train", "120", "--epochs", "1", "--top", "3", "--output-dir", str(tmp_path))
    assert "leaking parameters: []" in out
    summary = json.loads((tmp_path / "self_influence.json").read_text())
    assert summary["n_train"] == 120 and len(summary["highest"]) == len(summary["lowest"]) == 3
    assert min(r["self_influence"] for r in summary["highest"]) >= max(r["self_influence"] for r in summary["lowest"])
    assert all(r["text"] in out for r in summary["highest"] + summary["lowest"] if len(r["text"]) <= 110)
    assert (tmp_path / "model" / "turnover_config.json").is_file()
