"""Fidelity of turn-over influence against retraining ground truth and peers, in two settings on real offline data.

``--setting head`` (default): all-MiniLM-L6-v2 sentence embeddings (mean pooling, L2-normalised; computed once and
cached in ``benchmarks/results/cache``) of Rotten Tomatoes snippets (``turnover_hf.assets.rotten_tomatoes``); a
head ``Linear(384, W) -> ReLU -> Linear(W, 2)`` trained for 10 epochs with Adam (lr 1e-3, batch 64), each training
example under its own turn-over mask on the ``W`` hidden units. Masks are the library's
(``turnover_hf.masks.mask_for`` keyed by example id and the layer key ``"head.hidden"``); the run checks that the
patched head (``turnover_hf.patch_model``) gives the same scores as the closed form used here.

``--setting adapters``: all-MiniLM-L6-v2 as ``BertForSequenceClassification`` with a bottleneck adapter (the
``adapters`` library's ``SeqBnConfig``, as ``turnover_hf.demo`` sets it up, 384 -> 48 -> 384) in its top layer,
patched with ``turnover_hf.patch_model`` (masks on the adapter's 48 hidden units, its 384 outputs and the
classifier's inputs; leaking parameters frozen). Everything below the adapter is frozen and mask-free, so its
output is computed once and cached (``turnover_hf.evaluation.cached``); the adapter, the layer's LayerNorm, the
pooler and the classifier then run with the model's own modules, exactly (checked against
``turnover_hf.TurnoverScorer`` on the full model), and retraining a model takes about a second.

``--setting lm``: a causal LM. A 2-layer GPT-2 (BPE tokenizer trained here) trained plainly on Rotten Tomatoes
snippets, then PEFT LoRA on ``c_attn`` of every layer, patched with turn-over dropout and fine-tuned with
``turnover_hf.TurnoverTrainer`` on other snippets; targets are held-out snippets (summed token cross-entropy). Its
rows are fewer (turn-over single model and seed ensemble, the library's projected influence function, Kronfluence's
EK-FAC on the LoRA Linears) and so are its columns (LDS, seed agreement, top-10 repetition, seconds); it is written
in ``fidelity_runner/lm.py`` (table: ``lm_report.py``), apart from the classifier skeleton below.

Measured for every method of the classifier settings, in one table:

* LDS: Spearman, per validation target, between the loss predicted for a model trained on a random half of the
  training set (``const - sum of the included examples' scores``) and the loss of a model actually retrained on
  that half (the same recipe, with weights / order / mask seeds no scored model used), averaged over targets.
* LOO correlation: Pearson correlation, over (left-out example, target) pairs, between the scores and the actual
  loss change when one example of a random sample is left out, averaged over several retrain seeds no scored
  model used (each seed's reference model and its leave-one-out models share the seed).
* seed agreement: per-target Spearman between the scores of two independent runs of the method (other init
  and mask seeds), averaged over targets.
* mislabel AUC and recall@10 %: 10 % of the training labels flipped, methods rerun on that data, examples ranked
  by self-influence (high = suspicious, see ``--low-is-suspicious``) or training loss.
* cleansing gain: remove the 1 % of training examples with the most negative mean influence on the validation
  targets, retrain with ordinary dropout (Kobayashi et al. 2020, Table 2), and subtract the test accuracy of
  removing as many random examples; points, mean over retrain seeds (the same seeds for both).
* accuracy cost of masks: test accuracy of the same recipe trained with ordinary dropout at the same p on the
  same units and seeds, minus that of the turn-over model(s) a row scores (points; positive = masks cost).
* seconds: training all the models a method needs; self-influence of all N training examples and one target
  against all N, each from trained models (including any setup such as fitting factors or loading
  checkpoints); end to end = training + setup + both scorings.

Methods: (a) single-model turn-over; (b) seed ensembles of K models; (c) wider masked layers; (d) residuals of a
per-target least-squares fit of the scores on the examples' centred mask bits; (e) the full network as the
reference instead of the example's own mask; (f) K parallel masked channels in one model; (g) peers on the same
model: gradient dot product, TracIn over checkpoints (in-house and Captum's ``TracInCP`` / ``TracInCPFast`` over
Trainer-style checkpoints), an exact damped Gauss-Newton influence function (in-house, and the library's
``turnover_hf.InfluenceFunctionScorer`` on the patched model, exact and with CountSketch projections), Kronfluence's
EK-FAC, and the training loss for mislabels. The adapter setting runs (a), (b), (c), (f) (the library's
``TurnoverConfig(channels=K)`` on the classifier) and (g). Captum and Kronfluence rows appear
when the packages are installed (``pip install turnover-hf[bench]``).

Run from the repository root:

    PYTHONPATH=. python benchmarks/fidelity.py                     # head setting, default size (~6 CPU minutes)
    PYTHONPATH=. python benchmarks/fidelity.py --setting adapters  # adapter setting, default size (~25 CPU minutes)
    PYTHONPATH=. python benchmarks/fidelity.py --setting lm        # causal-LM setting, default size (~13 CPU minutes)
    PYTHONPATH=. python benchmarks/fidelity.py --quick [--setting adapters]   # smoke runs (about a minute)
    PYTHONPATH=. python benchmarks/fidelity.py --setting adapters --rows g loss   # only the peers, library estimators, loss
    PYTHONPATH=. python benchmarks/fidelity.py --render benchmarks/results/fidelity.json   # rewrite the Markdown

The first run of a setting embeds / caches the corpus (a few minutes on 2 cores); quick runs compute only their
own rows when there is no cache. Everything runs on one torch thread, so on a shared machine the wall-clock time
grows with the load; each results file records both. Results:
``benchmarks/results/fidelity{,_adapters,_lm}{,_quick}.{json,md}``.

The runner lives beside this script in ``benchmarks/fidelity_runner/``: the skeleton of rows (a)-(g), metrics,
results and Markdown are written once (``rows.py``, ``core.py``, ``peers.py``, ``report.py``); each setting
(``head.py``, ``adapter.py``) says only what differs: its data, model, training recipe and scoring. The
causal-LM setting (``lm.py``, ``lm_report.py``) has its own rows and table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

# The runner package sits beside this script; put its folder on the path also when this file is loaded by path.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from fidelity_runner import RESULTS_DIR, SETTINGS, environment, markdown, notes, render, run
from fidelity_runner.adapter import AdapterData, AdapterSetting, AdapterSettings
from fidelity_runner.data import with_flipped_labels
from fidelity_runner.head import (
    FidelityData,
    HeadSetting,
    Settings,
    Split,
    channel_flip_scores,
    check_closed_form,
    head_factors,
    self_turnover,
    turnover_scores,
)
from fidelity_runner.lm import LMSettings, run_lm, settings_for
from fidelity_runner.lm_report import render as render_lm
from fidelity_runner.peers import captum_available

from turnover_hf.files import atomic_write_text

# What tests/test_evaluation.py reaches through this script, beside main().
__all__ = [
    "AdapterData",
    "AdapterSettings",
    "FidelityData",
    "LMSettings",
    "Settings",
    "Split",
    "captum_available",
    "channel_flip_scores",
    "check_closed_form",
    "head_factors",
    "main",
    "markdown",
    "notes",
    "render_lm",
    "run_adapter_fidelity",
    "run_fidelity",
    "run_lm",
    "self_turnover",
    "turnover_scores",
    "with_flipped_labels",
]


def run_fidelity(data: FidelityData, settings: Settings, log: Callable[[str], None] = print,
                 groups: Sequence[str] | None = None) -> dict[str, Any]:
    """Head setting on given data: train everything, score every row (or row (a) and ``groups``), return the
    JSON-ready results."""
    return run(HeadSetting(data, settings), log, groups)


def run_adapter_fidelity(
    data: AdapterData, settings: AdapterSettings, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Adapter setting on given (cached) data: train everything, score every row, return the JSON-ready results."""
    return run(AdapterSetting(data, settings), log)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=(*SETTINGS, "lm"), default="head", help="which model is trained")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: N=200, 20 targets, 10 subsets (lm: N=40, 6 targets, 6 subsets)"
    )
    parser.add_argument("--subsets", type=int, help="number of ground-truth subsets (default 50)")
    parser.add_argument("--epochs", type=int, help="training epochs of every model")
    parser.add_argument("--ensembles", type=int, nargs="+", help="seed-ensemble sizes")
    parser.add_argument(
        "--channels", type=int, nargs="+",
        help="masked-channel counts (head setting: hidden-layer channels; adapters: classifier channels)",
    )
    parser.add_argument("--loo", type=int, help="examples left out one at a time (default 40)")
    parser.add_argument("--cleansing-seeds", type=int, help="retrain seeds of the cleansing test (default 5)")
    parser.add_argument(
        "--low-is-suspicious",
        action="store_true",
        help="rank low turn-over/gradient self-influence as suspicious (default: high)",
    )
    parser.add_argument(
        "--rows", nargs="+",
        help="row groups to run after the single model (a) (default: all of the setting's; e.g. 'g loss': the peers, "
             "the library estimators and the training loss, minutes instead of an hour); the same rows, same numbers",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run best on one)")
    parser.add_argument("--output", type=Path, help="results stem (default benchmarks/results/fidelity[_adapters][_quick])")
    parser.add_argument("--render", type=Path, help="only rewrite the Markdown of an existing results JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.render is not None:
        results = json.loads(args.render.read_text(encoding="utf-8"))
        table, page = (render_lm if results.get("setting") == "lm" else render)(results)
        atomic_write_text(args.render.with_suffix(".md"), page)
        print(table)
        return results

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    if args.setting == "lm":
        return lm_main(args, log)
    setting_class = SETTINGS[args.setting]
    settings = setting_class.quick if args.quick else setting_class.settings_class()
    changes = {
        k: v
        for k, v in (
            ("n_subsets", args.subsets),
            ("epochs", args.epochs),
            ("ensembles", tuple(args.ensembles) if args.ensembles else None),
            ("channels", tuple(args.channels) if args.channels else None),
            ("n_loo", args.loo),
            ("cleansing_seeds", args.cleansing_seeds),
        )
        if v is not None
    }
    if args.low_is_suspicious:
        changes["low_is_suspicious"] = True
    settings = replace(settings, **changes)
    started = time.perf_counter()
    setting = setting_class.load(settings, full_cache=not args.quick)
    log(f"{setting_class.data_label} ready in {time.perf_counter() - started:.0f}s")
    results = run(setting, log, args.rows)
    results["seconds_data"] = time.perf_counter() - started - results["seconds_total"]
    results["environment"] = environment()
    results["cpu_seconds_process"] = time.process_time()  # on one thread: the wall time an idle machine would take
    table, page = render(results)
    print(table)
    name = "fidelity" + ("" if args.setting == "head" else f"_{args.setting}") + ("_quick" if args.quick else "")
    stem = args.output or RESULTS_DIR / name
    atomic_write_text(f"{stem}.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(f"{stem}.md", page)
    return results


def lm_main(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """``--setting lm``: the causal-LM setting (``fidelity_runner/lm.py``) at the parsed sizes (``--subsets``,
    ``--epochs``, the first of ``--ensembles``), results written to ``fidelity_lm[_quick].{json,md}``."""
    settings = settings_for(args.quick, args.subsets, args.epochs, args.ensembles[0] if args.ensembles else None)
    results = run_lm(settings, log)
    results["environment"] = environment()
    results["cpu_seconds_process"] = time.process_time()
    table, page = render_lm(results)
    print(table)
    stem = args.output or RESULTS_DIR / ("fidelity_lm" + ("_quick" if args.quick else ""))
    atomic_write_text(f"{stem}.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(f"{stem}.md", page)
    return results


if __name__ == "__main__":
    main()
