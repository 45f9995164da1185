"""The Markdown table and notes of the causal-LM fidelity setting (``lm.py`` writes the results it reads)."""

from __future__ import annotations

from typing import Any

from .lm import TITLE

COLUMNS = (
    ("method", "method"),
    ("lds", "LDS"),
    ("lds_2retrain", "LDS (2-retrain mean)"),
    ("agreement", "seed agreement"),
    ("top10_repetition", "top-10 repetition"),
    ("train_seconds", "train s"),
    ("fit_seconds", "fit s"),
    ("score_seconds", "score s (T targets x N)"),
    ("end_to_end_seconds", "end-to-end s"),
)


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if key == "method":
        return str(value)
    if key.endswith("seconds"):
        return f"{value:.2f}" if value < 10 else f"{value:.0f}"
    return f"{value:.3f}"


def describe(results: dict[str, Any]) -> str:
    """The sentence before the table: model, recipe and sizes."""
    s, m, gt = results["settings"], results["model"], results["ground_truth"]
    reliability = gt["split_half_reliability"]
    return (
        f"GPT-2 ({m['n_layer']} layers, n_embd {m['n_embd']}, BPE vocabulary {m['vocab_size']}) trained plainly on "
        f"{m['base_snippets']} Rotten Tomatoes snippets ({s['base_epochs']:g} epochs), then PEFT LoRA (r={s['lora_r']}, "
        f"alpha {s['lora_alpha']}) on `c_attn` of every layer ({m['lora_parameters']} parameters), patched with "
        f"turn-over dropout (p={s['p']:g} on the LoRA rank units) and fine-tuned with `TurnoverTrainer` "
        f"({s['epochs']:g} epochs, AdamW lr {s['lr']:g}, batch {s['batch_size']}) on N={s['n_train']} other snippets; "
        f"T={s['n_targets']} held-out target snippets, loss = summed token cross-entropy (mean "
        f"{m['target_tokens_mean']:.1f} tokens; mean target loss {m['target_loss_base_mean']:.1f} before, "
        f"{m['target_loss_fine_tuned_mean']:.1f} after fine-tuning). Ground truth: {gt['subsets']} half-size subsets "
        f"x {gt['replicates']} retrainings"
        + (f" (split-half reliability {reliability:.3f})." if reliability is not None else ".")
    )


def markdown(results: dict[str, Any]) -> str:
    """The setting line and the table."""
    lines = [
        describe(results),
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "|".join("---" if key == "method" else "---:" for key, _ in COLUMNS) + "|",
    ]
    for row in results["rows"]:
        lines.append("| " + " | ".join(_cell(key, row.get(key)) for key, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def notes(results: dict[str, Any]) -> list[str]:
    """What each row is, the ground truth's reliability, and the run's cost, as Markdown bullet points."""
    s, gt, m = results["settings"], results["ground_truth"], results["model"]
    reliability = gt["split_half_reliability"]
    out = [
        (
            f"- LDS: per target, Spearman over the {gt['subsets']} subsets ({gt['subset_size']} examples each) between "
            "the predicted loss (const - sum of the included examples' scores, `turnover_hf.evaluation.lds`) and the "
            "loss of the model fine-tuned on the subset from the same base with the same recipe and seeds no scored "
            f"model uses ({gt['seeds']}); mean over targets. `LDS` uses the first retraining, `LDS (2-retrain mean)` "
            f"the mean of the {gt['replicates']}."
        ),
        (
            f"- Split-half reliability of the ground truth (per-target Spearman between the two retrainings of each "
            f"subset, mean): {reliability:.3f}, so even an exact predictor of the expected loss scores well below 1."
            if reliability is not None
            else "- One retraining per subset: the ground truth's split-half reliability was not measured."
        ),
        (
            "- Seed agreement: per-target Spearman over the training examples between the method's scores of the "
            "scored model (seed 0) and of a model fine-tuned with seed 1 (for the ensemble: between two disjoint "
            "ensembles of K, seeds 0..K-1 and K..2K-1), mean over targets."
        ),
        (
            "- Top-10 repetition: mean over target pairs of the shared fraction of their ten highest-scored (most "
            "helpful) training examples; 1 = the same ten for every target."
        ),
        (
            "- (a) `InfluencePipeline(model, tokenizer, train_dataset=train, estimator=\"turnover\").scores(targets)` "
            "(each example's loss under its flipped mask minus under its own mask; the pipeline's per-token means are "
            "multiplied by each target's token count, i.e. scores of the summed loss). (b) the mean of K such score "
            "matrices of models fine-tuned with seeds 0..K-1 (what `InfluencePipeline` returns for the list of "
            "models)."
        ),
        (
            "- (g) projected: `InfluencePipeline(..., estimator=\"projected\", options=...)`, the library's damped "
            "Gauss-Newton influence function in a projection of the LoRA gradients (default: design `eigen`, 4096 "
            "coordinates, `curvature=auto` = the diagonal of the curvature in its Kronecker eigenbasis (EK-FAC's "
            "eigenvalue correction), damping 0.1 x its mean; `curvature=full`: the whole 4096 x 4096 matrix; "
            "`design=sketch`: random sides, one CountSketch and the full matrix); training gradients of the summed "
            "token cross-entropy under each example's own mask (`training_masks=False`: on the full network), "
            "per-token Gauss-Newton curvature from labels sampled from the model (each draw fixed by the example's "
            "id), targets' summed token cross-entropy on the full network; positive = helps, as LDS expects. fit s = "
            "`pipe.fit()` (the pass over the training set), score s = the targets."
        ),
    ]
    if results.get("kronfluence"):
        out.append(
            f"- (g) Kronfluence {results['kronfluence']} EK-FAC (damping 0.1 x mean eigenvalue, its heuristic) on the "
            "LoRA `lora_A` / `lora_B` Linears: training loss = summed token cross-entropy with labels sampled from the "
            "model for the factors, measurement = the target's summed token cross-entropy on the full network. "
            "\"training examples under their masks\": factors and training gradients under each example's own "
            "turn-over mask (`turnover_hf.instance_masks(model, ids, mode=\"train\")`, with `lora_A`'s output masks "
            "moved onto a wrapper so Kronfluence's hooks see the Linear's raw output, as the library's Kronfluence peer "
            "does; the copy's masked loss and gradients equal the model's); \"full network\": no masks anywhere."
        )
    else:
        out.append("- Kronfluence is not installed (or not selected), so its rows are missing.")
    out.append(
        f"- Cost: the base model took {m['base_seconds']:.0f} s; one LoRA fine-tuning on all N "
        f"{m['fine_tune_seconds_mean']:.1f} s on average; the ground truth {gt['seconds']:.0f} s "
        f"({gt['subsets'] * gt['replicates']} fine-tunings on halves). Whole run {results['seconds_total']:.0f} s "
        f"wall-clock"
        + (f", {results['cpu_seconds_process']:.0f} s of CPU time for the process" if results.get("cpu_seconds_process") else "")
        + f" on {results.get('environment', {}).get('threads', 1)} torch thread(s) of a shared machine (load average "
        f"at the end {_load(results)}); times are wall-clock and noisy. End-to-end = train + fit + score."
    )
    if s["ensemble_agreement"]:
        out.append(f"- Scored models: {2 * s['ensemble']} LoRA fine-tunings (seeds 0..{2 * s['ensemble'] - 1}).")
    return out


def _load(results: dict[str, Any]) -> str:
    load = results.get("environment", {}).get("load_average")
    return " / ".join(f"{v:.1f}" for v in load) if load else "unknown"


def render(results: dict[str, Any]) -> tuple[str, str]:
    """The table with its notes, and the whole Markdown file (title first)."""
    table = markdown(results) + "\n" + "\n".join(notes(results)) + "\n"
    return table, TITLE + table
