"""The fidelity benchmark's runner (``benchmarks/fidelity.py`` is its command line).

``core.py``: settings, seeds, rows, ground truths, the model pool and the :class:`Setting` protocol with its registry;
``data.py``: the corpus, its fingerprint, on-disk caches and flipped labels;
``rows.py``: the skeleton of rows (a)-(g), written once for every setting; ``peers.py``: row (g)'s peers;
``report.py``: the Markdown table and notes; ``head.py`` / ``adapter.py``: the two settings (what differs: data,
model building, training recipe, scoring); ``lm.py`` / ``lm_report.py``: the causal-LM setting (GPT-2 + PEFT
LoRA) and its table, with rows of its own (``fidelity.py --setting lm``). A new setting is a registered
:class:`Setting` subclass in a new module imported below; a new method is a registered row group
(``rows.row_group``) named in the settings that run it.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from . import adapter, head  # noqa: F401  (importing registers the settings)
from .core import SETTINGS, Row, Setting, register_setting
from .data import RESULTS_DIR
from .report import environment, markdown, notes, render
from .rows import ROW_GROUPS, Run, row_group, run

__all__ = [
    "RESULTS_DIR",
    "ROW_GROUPS",
    "SETTINGS",
    "Row",
    "Run",
    "Setting",
    "environment",
    "markdown",
    "notes",
    "register_setting",
    "render",
    "row_group",
    "run",
]
