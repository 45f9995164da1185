"""The results table and its notes, in Markdown, for any setting (the setting describes its own model)."""

from __future__ import annotations

import os
import platform
from typing import Any

import numpy as np
import torch

from .core import SETTINGS, Setting

COLUMNS = (
    ("method", "method"),
    ("lds", "LDS"),
    ("loo_corr", "LOO corr."),
    ("agreement", "seed agreement"),
    ("mislabel_auc", "mislabel AUC"),
    ("recall_at_10", "recall@10%"),
    ("cleansing_gain", "cleansing gain (pt)"),
    ("accuracy_cost", "acc. cost of masks (pt)"),
    ("accuracy", "test acc."),
    ("train_seconds", "train s"),
    ("self_seconds", "self-infl. s (all N)"),
    ("target_seconds", "1 target s (all N)"),
    ("end_to_end_seconds", "end-to-end s"),
)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if key == "method":
        return str(value)
    if key.endswith("seconds"):
        return f"{value:.3f}" if value < 10 else f"{value:.0f}"
    if key in ("cleansing_gain", "accuracy_cost"):
        return f"{value:+.2f}"
    return f"{value:.3f}"


def _setting_line(results: dict[str, Any]) -> str:
    s, gt = results["settings"], results["ground_truth"]
    common = (
        f"N={s['n_train']} training examples, {s['n_targets']} validation targets, {gt['subsets']} half-size "
        f"subsets (ground-truth split-half reliability {gt['split_half_reliability']:.3f}); LOO on "
        f"{gt['loo_examples']} examples x {gt['loo_seeds']} retrain seeds; {s['noise']:.0%} labels flipped for "
        f"mislabel detection ({'low' if s['low_is_suspicious'] else 'high'} self-influence = suspicious; high "
        "loss for the training-loss row)."
    )
    return setting_of(results).describe(results) + common


def setting_of(results: dict[str, Any]) -> type[Setting]:
    """The setting class that wrote a results JSON (files without a ``setting`` entry are the head's)."""
    return SETTINGS[results.get("setting", "head")]


def render(results: dict[str, Any]) -> tuple[str, str]:
    """The table with its notes, and the whole Markdown file (the setting's title first)."""
    table = markdown(results) + "\n" + "\n".join(notes(results)) + "\n"
    return table, setting_of(results).title + table

def markdown(results: dict[str, Any]) -> str:
    lines = [
        _setting_line(results),
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "|".join("---" if key == "method" else "---:" for key, _ in COLUMNS) + "|",
    ]
    for row in results["rows"]:
        lines.append("| " + " | ".join(_cell(key, row.get(key)) for key, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def notes(results: dict[str, Any]) -> list[str]:
    """Diagnostics that back the reading of the table, as Markdown bullet points."""
    gt, first = results["ground_truth"], results["rows"][0]
    out = [
        (
            f"- Ground truths ({gt['seeds']}). LDS: {gt['subsets']} random subsets of {gt['subset_size']} examples, "
            f"each retrained twice; split-half reliability (per-target Spearman between the two retrainings, mean) "
            f"{gt['split_half_reliability']:.3f}, so even an exact predictor of the expected loss scores well below 1."
        ),
    ]
    if "loo_seed_to_seed_pearson" in gt:
        r, k = gt["loo_seed_to_seed_pearson"], gt["loo_seeds"]
        out.append(
            f"- Leave-one-out: {gt['loo_examples']} random examples x the targets, mean over {k} retrain seeds. The "
            f"actual effects of two seeds correlate at Pearson {r:.3f}: one example's removal is mostly retraining "
            "noise (heavy-tailed: a few pairs carry most of the covariance), so the LOO column is small and noisy for "
            "every method; compare its rows with each other rather than with 1."
        )
    if "cleansing" in gt:
        c = gt["cleansing"]
        out.append(
            f"- Cleansing: {c['removed']} examples removed (1 %), {c['seeds']} retrain seeds with ordinary dropout; "
            f"test accuracy with nothing removed {np.mean(c['accuracy_none']):.4f}, with random removal "
            f"{np.mean(c['accuracy_random']):.4f}. The column is the gain over random removal in points; the paper's "
            "Table 2 reports +1.3 points over no cleansing under a domain shift (SST-2 -> electronics); here "
            "validation and test come from the same distribution."
        )
    if "closed_form_gap_vs_patched_model" in first["extra"]:
        out.append(
            f"- Closed-form turn-over scores vs. the patched head (`turnover_hf.patch_model` + `instance_masks`, one "
            f"forward per row): max gap {first['extra']['closed_form_gap_vs_patched_model']:.1e}."
        )
    if "cached_top_gap_vs_turnover_scorer" in first["extra"]:
        out.append(
            "- Cached top-layer scores vs. `turnover_hf.TurnoverScorer` (batched path) on the full patched MiniLM: "
            f"max gap {first['extra']['cached_top_gap_vs_turnover_scorer']:.1e}."
        )
    library = first["extra"].get("library_turnover_scorer")
    if library:
        out.append(
            f"- The same single model through the library's generic `TurnoverScorer` on the full MiniLM (tokens in, "
            f"`{library['path']}` path): one target vs all N {library['one_target_seconds']:.1f} s, self-influence of "
            f"all N {library['self_influence_seconds']:.1f} s. The table's turn-over times use the cached top "
            "(the same scores); every peer also runs on the cached top."
        )
    out.append(
        "- Mislabel direction, single model: AUC "
        f"{first['extra']['mislabel_high_is_suspicious']['auc']:.3f} ranking high self-influence first, "
        f"{first['extra']['mislabel_low_is_suspicious']['auc']:.3f} ranking low self-influence first."
    )
    for row in results["rows"]:
        extra = row["extra"]
        if "r2_per_target_mean" in extra:
            out.append(
                f"- Mask-bit regression: a per-target linear function of the {results['settings']['width']} mask "
                f"bits explains {extra['r2_per_target_mean']:.1%} of the score variance (mean over targets); the "
                f"fitted part alone has LDS {extra['lds_of_fitted_part']:.3f}, the residuals {row['lds']:.3f}."
            )
        if "lds_by_damping_factor" in extra:
            sweep = ", ".join(f"{k}: {v:.3f}" for k, v in extra["lds_by_damping_factor"].items())
            out.append(
                f"- Gauss-Newton influence, LDS by damping factor (x mean eigenvalue): {sweep}. The table uses "
                f"the factor fixed before the run ({results['settings']['damping_factor']:g})."
            )
        if "max_abs_difference_vs_in_house" in extra:
            sketch = extra.get("pearson_vs_exact_library_per_target_mean")
            out.append(
                f"- {row['method']}: fit {extra['fit_seconds']:.1f} s (the setup); largest difference from the "
                f"in-house Gauss-Newton scores {extra['max_abs_difference_vs_in_house']:.1e} (largest |score| "
                f"{extra['max_abs_in_house']:.1e})"
                + (f"; per-target Pearson with the exact library scores {sketch:.3f}." if sketch is not None else ".")
            )
        if "max_abs_difference_vs_in_house" not in extra and "pearson_vs_exact_library_per_target_mean" in extra:
            versus = extra.get("mislabel_auc_vs_exact")
            out.append(
                f"- {row['method']}: fit {extra['fit_seconds']:.1f} s (the setup); per-target Pearson with the exact "
                f"library scores {extra['pearson_vs_exact_library_per_target_mean']:.3f}"
                + (f"; mislabel AUC minus the exact fit's {versus['difference']:+.4f} ({versus['level']:.0%} paired "
                   f"bootstrap interval {versus['low']:+.4f} to {versus['high']:+.4f}, {versus['resamples']} "
                   f"resamples)." if versus else ".")
            )
        if extra.get("accuracy_cost_sem") is not None:
            out.append(
                f"- {row['method']}: accuracy cost of masks {row['accuracy_cost']:+.2f} ± "
                f"{extra['accuracy_cost_sem']:.2f} points (mean ± standard error of the per-seed paired differences)."
            )
        if "ensemble_prediction_accuracy" in extra:
            out.append(
                f"- {row['method']}: accuracy of the averaged ensemble prediction "
                f"{extra['ensemble_prediction_accuracy']:.3f} (the table shows the mean member)."
            )
    repeats = [(row["method"], row["extra"]["top10_repetition"]) for row in results["rows"]
               if row.get("extra", {}).get("top10_repetition") is not None]
    if repeats:
        out.append(
            "- Top-10 repetition (how much the explanations of different targets share their strongest proponents: "
            "mean over target pairs of the shared fraction of their top-10 lists; 0 = every target has its own, "
            "1 = the same ten for all): " + "; ".join(f"{m}: {v:.2f}" for m, v in repeats) + "."
        )
    out.append(
        "- Accuracy cost of masks: the ordinary-dropout twin (same recipe, p, units and seeds) minus the turn-over "
        "model(s) a row scores, in points. Peers (g) score model (a), so they show its cost; run on an ordinary "
        "model they would cost nothing."
    )
    peers = []
    peers.append(
        f"Kronfluence {results['kronfluence']} (EK-FAC factors fitted on the masked training loss with sampled "
        "labels; targets on the full network; setup = fitting the factors, counted in both timing columns and "
        "once end to end)"
        if results.get("kronfluence")
        else "Kronfluence is not installed, so its row is missing (`pip install --no-deps kronfluence einops einconv opt-einsum`)"
    )
    peers.append(
        f"Captum {results['captum']} (TracInCP with per-sample gradients of the trainable layers, TracInCPFast on "
        "the last layer, both over Trainer-style checkpoint folders written with the learning rate; summed "
        "cross-entropy; Captum's self-influence is the masked training gradient against itself)"
        if results.get("captum")
        else "Captum is not installed, so its rows are missing (`pip install --no-deps captum`)"
    )
    out.append("- Peers: " + "; ".join(peers) + ".")
    for row in results["rows"]:
        extra = row["extra"]
        if "one_gc_collect_seconds" in extra:
            unfrozen = extra.get("one_gc_collect_seconds_unfrozen")
            frozen_text = (
                f" while it runs; the objects of the benchmark itself are frozen out of the collector (`gc.freeze`), "
                f"else each call would take {unfrozen:.2f} s here"
                if unfrozen is not None
                else " in this process"
            )
            out.append(
                "- Part of Kronfluence's fixed cost is its own memory release: about nine `gc.collect()` calls per "
                f"fit and scoring, {extra['one_gc_collect_seconds']:.2f} s each{frozen_text}."
            )
    env = results.get("environment", {})
    load = env.get("load_average")
    load_text = f" (load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f})" if load else ""
    cpu = results.get("cpu_seconds_process")
    cpu_text = f", {cpu:.0f} s of CPU time for the whole process (data included)" if cpu else ""
    out.append(
        f"- Whole run: {results['seconds_total']:.0f} s wall-clock on {env.get('threads', '?')} torch thread(s) of a "
        f"shared {env.get('cpu_count', '?')}-core machine{load_text}{cpu_text}; times are wall-clock and noisy. "
        "Train s = training of all the models one score matrix needs (K for an ensemble)."
    )
    return out


def environment() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average": list(load) if load else None,
    }
