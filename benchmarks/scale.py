"""How the cost of ``InfluencePipeline``'s estimators grows with the training set: time and memory at N = 2,000,
8,000 and 32,000 examples of the demo's model, in units of one plain gradient pass over the same N.

The model is the demo's (``turnover_hf.demo.build_model``): all-MiniLM-L6-v2 with bottleneck adapters in its top 3
layers, patched with turn-over dropout. The training set of size N is the Rotten Tomatoes training split of the
offline asset the demo uses (``turnover_hf.assets.rotten_tomatoes``, the demo's seed and subsample for N up to the
split's 3,404 reviews), tokenized as the demo tokenizes (``--max_length``, default the demo's 64); past the split's
size its texts repeat, each copy with an id of its own (``turnover_hf.add_example_ids``): this measures cost, not
fidelity. The targets are the first ``--targets`` (100) validation reviews, given to the pipeline as text.

For every N, in this order:

1. preparation, in this process: build the model and the data, train with ``TurnoverTrainer`` for
   ``--train_steps`` (2) optimizer steps on all N rows (the training-set record the pipeline checks covers every
   row; costs do not depend on the weights), save the influence-ready checkpoint and the tokenized data to a
   temporary folder, and time one plain gradient pass over the N rows: forward and backward of the mean loss of
   every batch of ``--batch_size`` (64), model in eval mode, no masks, no optimizer (collation included). This pass
   is the unit of cost;
2. per estimator (``--estimator``, several are measured side by side), in a fresh process (so each peak memory
   belongs to one measurement): load the checkpoint and the data, note the resident memory, then time
   ``InfluencePipeline(model, tokenizer, train_dataset=train, estimator=..., batch_size=...)`` (construction: input
   checks, not counted below), ``pipe.fit()`` (the estimator's fit), ``pipe.self_influence()`` of all N and
   ``pipe.scores(targets)`` against all N; end to end = fit + self-influence + targets, also divided by the
   gradient pass. Peak memory is the process's high-water mark of resident memory at the end (``VmHWM``: on Linux a
   child's ``ru_maxrss`` starts at its parent's size, so it is read only off Linux); "RSS added" is the peak from
   the moment the model and data are loaded (the mark is reset there) minus the resident memory then: what the
   estimator keeps plus its transients (the JSON also has the peak after each phase). An estimator that fails (e.g.
   its memory budget refuses the fit) gets its error in its row; the run goes on;
3. with ``--processes 1 2``, at the largest N (or ``--process_sizes``): the same measurement under
   ``python -m torch.distributed.run --nproc_per_node 2`` (what ``accelerate launch --cpu --num_processes 2`` starts;
   gloo on the CPU), each process with ``--threads`` torch threads. The pipeline shards scoring over the processes
   by chunks of ``chunk_size`` training ids (its default 1024; ``--chunk_size``): below two chunks per process some
   processes have nothing to score. Phases are timed between barriers (the slowest process counts); peak memory is
   the largest of one process. The 2-process rows are compared with the 1-process rows of step 2 (same checkpoint,
   same data): the ratio of fit and end-to-end times, and how far the scores are apart (largest absolute difference
   over the largest absolute score).

Then, per estimator, the log-log slopes over the sizes (least squares of log y on log N: 1 = linear, 2 = quadratic)
of end-to-end time, peak memory and memory added, and the ratios largest / smallest N. Times are reported, never
asserted; the machine is shared, so wall times are noisy (the load average is recorded). GB are 2^30 bytes.

Run from the repository root:

    PYTHONPATH=. python benchmarks/scale.py --estimator projected influence   # sizes 2000 8000 32000 (long)
    PYTHONPATH=. python benchmarks/scale.py --estimator influence --processes 1 2
    PYTHONPATH=. python benchmarks/scale.py --quick --estimator influence --processes 1 2   # smoke run, ~3 minutes

``--quick`` measures N = 64, 128 and 256 with 32 tokens per review and chunks of 64 ids. The script prints a
Markdown table and writes ``benchmarks/results/scale{,_quick}.{json,md}`` (atomically).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_timing as timing

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
SIZES = (2000, 8000, 32000)
QUICK_SIZES = (64, 128, 256)
QUICK_MAX_LENGTH = 32
QUICK_CHUNK_SIZE = 64  # the pipeline's default (1024) is above every quick N: one chunk, one busy process
GB = 2**30


@dataclass(frozen=True)
class Job:
    """One estimator at one N, measured by a child process (or a group of them); handed to it as JSON."""

    estimator: str
    n: int
    work_dir: str  # the folder of this N (see :func:`prepare`)
    result_path: str  # where the child writes what it measured (JSON)
    max_length: int
    batch_size: int
    threads: int
    chunk_size: int | None = None  # training ids per chunk of the pipeline's sharded loop (None: its default)
    scores_path: str | None = None  # where the main process keeps its scores, for the 1- vs 2-process check


@dataclass
class Row:
    """One estimator at one N on some number of processes."""

    estimator: str
    n: int
    processes: int
    gradient_pass_s: float | None
    fit_s: float | None = None
    self_influence_s: float | None = None
    targets_s: float | None = None
    end_to_end_s: float | None = None
    end_to_end_passes: float | None = None
    peak_rss_gb: float | None = None
    rss_added_gb: float | None = None
    rss_loaded_gb: float | None = None
    pipeline_s: float | None = None  # InfluencePipeline(...) itself: input checks and the training-set record
    scorer: str | None = None  # what the pipeline resolved the estimator to
    error: str | None = None
    process_wall_s: float | None = None  # the whole child (or torchrun), start-up and loading included
    ranks: list[dict[str, float]] = field(default_factory=list)  # memory of every process


# ---------------------------------------------------------------------------------------------------------------
# Memory and time
# ---------------------------------------------------------------------------------------------------------------
def _status_gb(field_name: str) -> float | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux), in GB; None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(f"{field_name}:"):
                    return int(line.split()[1]) * 1024 / GB
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss_gb() -> float | None:
    """Resident memory of this process now (``VmRSS``), in GB; None off Linux."""
    return _status_gb("VmRSS")


def peak_rss_gb() -> float:
    """Peak resident memory of this process image, in GB: ``VmHWM`` on Linux, else ``ru_maxrss``.

    Not ``ru_maxrss`` on Linux: a child's starts at its parent's resident memory (the kernel carries the old
    image's high-water mark across ``exec``), so a child of a large parent would report the parent's size.
    """
    peak = _status_gb("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / GB if sys.platform == "darwin" else peak * 1024 / GB


def reset_peak_rss() -> bool:
    """Set this process's high-water mark (``VmHWM``) to its resident memory now (Linux ``clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return False
    return _status_gb("VmHWM") is not None


def loglog_slope(points: Sequence[tuple[float, float | None]]) -> float | None:
    """Least-squares slope of log y on log x over the points with a positive y; None below two distinct x."""
    logs = [(math.log(x), math.log(y)) for x, y in points if y is not None and y > 0]
    if len({x for x, _ in logs}) < 2:
        return None
    mean_x = sum(x for x, _ in logs) / len(logs)
    mean_y = sum(y for _, y in logs) / len(logs)
    return sum((x - mean_x) * (y - mean_y) for x, y in logs) / sum((x - mean_x) ** 2 for x, _ in logs)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity where the platform says, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def free_port() -> int:
    """A TCP port nothing listens on right now, for the torchrun rendezvous (as tests/conftest.py picks one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------
# Preparation of one N (in the benchmark's own process) and one estimator at one N (in a child, or in each
# process of a torchrun group)
# ---------------------------------------------------------------------------------------------------------------
def quiet() -> None:
    """Only errors from transformers and adapters, no progress bars of datasets (the library's warnings and the
    estimators' progress bars stay)."""
    import logging

    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("adapters").setLevel(logging.ERROR)
    datasets.disable_progress_bars()  # tokenizing and saving; the estimators' own progress bars stay


def training_data(n: int, seed: int, n_targets: int) -> tuple[Any, list[str], int]:
    """N training rows (text, label, example_id 0..N-1), the target texts and the size of the review corpus.

    Up to the training split's size these are the demo's reviews (its seeded subsample); past it the split's texts
    repeat in order, each copy a row with an id of its own.
    """
    from datasets import Dataset, Features, Value

    import turnover_hf as th
    from turnover_hf.assets import rotten_tomatoes

    splits = rotten_tomatoes(seed=seed)
    corpus = len(splits["train"])
    if n < corpus:
        splits = rotten_tomatoes(seed=seed, n_train=n)
    reviews = splits["train"]
    texts, labels = reviews["text"], reviews["label"]
    features = Features({"text": Value("string"), "label": reviews.features["label"]})
    rows = Dataset.from_dict(
        {"text": [texts[i % len(texts)] for i in range(n)], "label": [labels[i % len(labels)] for i in range(n)]},
        features=features,
    )
    return th.add_example_ids(rows), list(splits["validation"]["text"][:n_targets]), corpus


def gradient_pass(model: Any, rows: list[dict[str, Any]], collator: Callable, batch_size: int) -> float:
    """Seconds of one plain pass over ``rows``: forward and backward of each batch's mean loss (eval mode, no
    masks, no optimizer; gradients are dropped after every batch)."""
    from turnover_hf.losses import model_inputs

    model.eval()
    device = next(model.parameters()).device
    started = time.perf_counter()
    for start in range(0, len(rows), batch_size):
        batch = collator(rows[start : start + batch_size])
        loss = model(**model_inputs(batch, device), labels=batch["labels"].to(device)).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def prepare(n: int, folder: Path, max_length: int, batch_size: int, n_targets: int, train_steps: int,
            seed: int) -> dict[str, Any]:
    """Build the demo's model and N rows, train ``train_steps`` optimizer steps on all of them, save the checkpoint
    (``folder/model``), the tokenized rows (``folder/train``) and the target texts (``folder/targets.json``), and
    time the gradient pass over the N rows."""
    import torch
    from datasets import DatasetDict
    from transformers import DataCollatorWithPadding, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    import turnover_hf as th
    from turnover_hf.demo import DemoSettings, build_model, tokenize

    settings = DemoSettings(n_train=n, max_length=max_length, seed=seed)
    model, tokenizer = build_model(settings)
    raw, targets, corpus = training_data(n, seed, n_targets)
    train = tokenize(DatasetDict({"train": raw}), tokenizer, max_length)["train"]
    train.save_to_disk(str(folder / "train"))
    (folder / "targets.json").write_text(json.dumps(targets))

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="scale-train-") as output_dir:
        args = TrainingArguments(
            output_dir=output_dir, use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no",
            disable_tqdm=True, dataloader_num_workers=0, per_device_train_batch_size=settings.batch_size,
            max_steps=train_steps, learning_rate=settings.learning_rate, seed=seed,
        )
        trainer = th.TurnoverTrainer(model=model, args=args, train_dataset=train,
                                     data_collator=DataCollatorWithPadding(tokenizer))
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    train_seconds = time.perf_counter() - started
    model.save_pretrained(str(folder / "model"))
    tokenizer.save_pretrained(str(folder / "model"))

    rows = train.remove_columns(["example_id"]).to_list()
    pass_seconds = gradient_pass(model, rows, DataCollatorWithPadding(tokenizer), batch_size)
    return {
        "n": n,
        "corpus_reviews": corpus,
        "distinct_texts": min(n, corpus),
        "mean_tokens": sum(len(r["input_ids"]) for r in rows) / len(rows),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_steps": train_steps,
        "train_s": train_seconds,
        "gradient_pass_s": pass_seconds,
        "torch_threads": torch.get_num_threads(),
    }


def describe_scorer(pipe: Any) -> str:
    """The estimator the pipeline resolved, its class and how it fitted (method, projection), when it says."""
    scorer = pipe.scorer
    details = [f"{name}={getattr(scorer, name)}" for name in ("method", "sketch_dim", "projection_dim")
               if getattr(scorer, name, None) is not None]
    return f"{pipe.estimator} ({type(scorer).__name__}{', ' + ', '.join(details) if details else ''})"


def measure_estimator(job: Job) -> dict[str, Any]:
    """One estimator at one N in this process (or in each process of a torchrun group): construction, fit,
    self-influence of all N, the targets against all N; times between barriers, memory of every process."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    import turnover_hf as th

    state = PartialState(cpu=True)  # gloo when started by torchrun; a no-op group of one otherwise
    work = Path(job.work_dir)
    model = th.load_influence_ready(str(work / "model"))
    tokenizer = AutoTokenizer.from_pretrained(str(work / "model"))
    train = load_from_disk(str(work / "train"))
    targets = json.loads((work / "targets.json").read_text())
    gc.collect()
    memory: dict[str, float] = {"rank": state.process_index, "rss_loaded_gb": current_rss_gb() or 0.0,
                                "peak_rss_loaded_gb": peak_rss_gb()}
    reset = reset_peak_rss()  # from here on the peak is the estimator's (not loading's transients)
    seconds: dict[str, float] = {}
    out: dict[str, Any] = {"processes": state.num_processes, "seconds": seconds}
    phase = "InfluencePipeline(...)"

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        nonlocal phase
        phase = name
        state.wait_for_everyone()
        started = time.perf_counter()
        value = fn()
        state.wait_for_everyone()
        seconds[name] = time.perf_counter() - started
        memory[f"peak_rss_after_{name}_gb"] = peak_rss_gb()  # which phase set the peak (since loading)
        return value

    self_values = scores = None
    try:
        chunking = {} if job.chunk_size is None else {"chunk_size": job.chunk_size}
        pipe = timed("pipeline", lambda: th.InfluencePipeline(
            model, tokenizer, train_dataset=train, estimator=job.estimator, batch_size=job.batch_size,
            max_length=job.max_length, **chunking,
        ))
        out["scorer"] = describe_scorer(pipe)
        timed("fit", pipe.fit)
        out["scorer"] = describe_scorer(pipe)  # what the fit chose (e.g. its method)
        self_values = timed("self_influence", lambda: torch.tensor(pipe.self_influence()["self_influence"]))
        scores = timed("targets", lambda: pipe.scores(targets))
    except Exception as err:  # noqa: BLE001 - any failure (e.g. a memory budget) is a result of this row
        out["error"] = f"{phase}: {type(err).__name__}: {err}"
        if state.num_processes > 1:  # the other processes may not have failed: no more collectives
            traceback.print_exc()
            out["ranks"] = [final_memory(memory, reset)]
            return out
    final_memory(memory, reset)
    out["ranks"] = gather_object([memory]) if state.num_processes > 1 else [memory]
    if state.is_main_process and job.scores_path is not None and scores is not None:
        from safetensors.torch import save_file

        save_file({"self_influence": self_values.contiguous(), "scores": scores.float().contiguous()}, job.scores_path)
    state.wait_for_everyone()
    return out


def final_memory(memory: dict[str, float], reset: bool) -> dict[str, float]:
    """Complete ``memory`` (of one process) with its peak and what the estimator added: the peak since the reset
    after loading minus the resident memory then (without a reset: the process's peak minus it)."""
    since_loaded = peak_rss_gb()
    memory["peak_rss_gb"] = max(since_loaded, memory["peak_rss_loaded_gb"])
    memory["rss_added_gb"] = (since_loaded if reset else memory["peak_rss_gb"]) - memory["rss_loaded_gb"]
    memory["peak_reset_after_loading"] = float(reset)
    return memory


def child(job: Job) -> int:
    """Run one job in this process; the main process writes what it measured to ``job.result_path``. Exit code 1
    when an estimator failed in a group of processes, so that torchrun stops the others (they may be waiting)."""
    import torch

    from turnover_hf.files import atomic_write_text

    torch.set_num_threads(job.threads)
    quiet()
    result = measure_estimator(job)
    if int(os.environ.get("RANK", "0")) == 0:
        atomic_write_text(job.result_path, json.dumps(result, indent=2) + "\n")
    return 1 if "error" in result and int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


# ---------------------------------------------------------------------------------------------------------------
# The parent: runs the children, builds the rows
# ---------------------------------------------------------------------------------------------------------------
def run_child(job: Job, processes: int, log: Callable[[str], None]) -> tuple[dict[str, Any], float]:
    """Run ``job`` in a fresh process (``processes`` > 1: under torchrun); its result, or an ``error`` if it died.
    Its stderr (progress bars, tracebacks) goes to ours."""
    env = dict(os.environ, OMP_NUM_THREADS=str(job.threads))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    script = [str(Path(__file__).resolve()), "--job", json.dumps(asdict(job))]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(free_port()), *script]
    else:
        command = [sys.executable, *script]
    if os.path.exists(job.result_path):
        os.remove(job.result_path)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, check=False)
    wall = time.perf_counter() - started
    if os.path.exists(job.result_path):  # written by the (main) process, also when its estimator failed
        return json.loads(Path(job.result_path).read_text()), wall
    killed = " (killed: out of memory?)" if done.returncode in (-9, 137) else ""
    message = f"the process exited with code {done.returncode}{killed}; its traceback is in the log above"
    log(f"  {job.estimator} N = {job.n:,} x{processes}: {message}")
    return {"error": message}, wall


def estimator_row(job: Job, processes: int, prepared: dict[str, Any], result: dict[str, Any], wall: float) -> Row:
    """A table row from a child's result and the gradient pass of its N."""
    seconds = result.get("seconds", {})
    ranks = result.get("ranks", [])
    unit = prepared.get("gradient_pass_s")
    row = Row(estimator=job.estimator, n=job.n, processes=processes, gradient_pass_s=unit,
              fit_s=seconds.get("fit"), self_influence_s=seconds.get("self_influence"),
              targets_s=seconds.get("targets"), pipeline_s=seconds.get("pipeline"), scorer=result.get("scorer"),
              error=result.get("error"), process_wall_s=wall, ranks=ranks)
    if row.fit_s is not None and row.self_influence_s is not None and row.targets_s is not None:
        row.end_to_end_s = row.fit_s + row.self_influence_s + row.targets_s
        row.end_to_end_passes = row.end_to_end_s / unit if unit else None
    if ranks:
        row.peak_rss_gb = max(r["peak_rss_gb"] for r in ranks)
        row.rss_loaded_gb = max(r["rss_loaded_gb"] for r in ranks)
        row.rss_added_gb = max(r["rss_added_gb"] for r in ranks)
    return row


def relative_gap(path: str, reference: str) -> dict[str, float] | None:
    """Largest absolute difference of two runs' scores over the largest absolute score of the reference, for the
    targets' scores and for self-influence; None if either run left no scores."""
    if not (os.path.exists(path) and os.path.exists(reference)):
        return None
    from safetensors.torch import load_file

    ours, theirs = load_file(path), load_file(reference)
    gaps = {}
    for key in ("scores", "self_influence"):
        scale = float(theirs[key].abs().max())
        gaps[key] = float((ours[key] - theirs[key]).abs().max()) / scale if scale else float("nan")
    return gaps


def summarise(rows: list[Row], prepared: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per estimator (1 process): log-log slopes of time and memory over N and the largest / smallest ratios."""
    passes = sorted((n, p.get("gradient_pass_s")) for n, p in prepared.items())
    summary: dict[str, Any] = {"gradient_pass_slope": loglog_slope(passes), "estimators": {}}
    for estimator in dict.fromkeys(r.estimator for r in rows):
        ok = sorted((r for r in rows if r.estimator == estimator and r.processes == 1 and r.error is None),
                    key=lambda r: r.n)
        entry: dict[str, Any] = {"sizes": [r.n for r in ok]}
        for key in ("end_to_end_s", "peak_rss_gb", "rss_added_gb", "end_to_end_passes"):
            entry[f"{key}_slope"] = loglog_slope([(r.n, getattr(r, key)) for r in ok])
            first, last = (getattr(ok[0], key), getattr(ok[-1], key)) if len(ok) > 1 else (None, None)
            entry[f"{key}_ratio"] = last / first if first and last is not None else None
        entry["n_ratio"] = ok[-1].n / ok[0].n if len(ok) > 1 else None
        summary["estimators"][estimator] = entry
    return summary


def compare_processes(rows: list[Row], work: Path) -> list[dict[str, Any]]:
    """Each multi-process row against the 1-process row of its estimator and N: time ratios, score agreement."""
    out = []
    for row in rows:
        if row.processes == 1:
            continue
        single = next((r for r in rows if r.processes == 1 and r.estimator == row.estimator and r.n == row.n), None)
        entry: dict[str, Any] = {"estimator": row.estimator, "n": row.n, "processes": row.processes}
        if single is not None and single.error is None and row.error is None:
            entry["fit_ratio"] = row.fit_s / single.fit_s if single.fit_s else None
            entry["end_to_end_ratio"] = row.end_to_end_s / single.end_to_end_s if single.end_to_end_s else None
            entry["relative_gap"] = relative_gap(str(scores_file(work, row.n, row.estimator, row.processes)),
                                                 str(scores_file(work, row.n, row.estimator, 1)))
        else:
            entry["error"] = row.error or (single.error if single is not None else "no 1-process row")
        out.append(entry)
    return out


def scores_file(work: Path, n: int, estimator: str, processes: int) -> Path:
    """Where the run of ``estimator`` at ``n`` on ``processes`` processes keeps its scores."""
    return work / f"n{n}" / f"scores_{estimator}_p{processes}.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------
def fmt(value: float | None, digits: int = 2) -> str:
    """A table cell: the value with ``digits`` decimals, or a dash."""
    return "–" if value is None else f"{value:.{digits}f}"


def ratio_text(value: float | None) -> str:
    """A ratio as ``x1.23``, or a dash."""
    return "–" if value is None else f"x{value:.2f}"


def render(results: dict[str, Any]) -> str:
    """The results as Markdown: the table, slopes and ratios, the process comparison, machine and notes."""
    s, env = results["settings"], results["environment"]
    rows = [Row(**r) for r in results["rows"]]
    failed = any(r.error for r in rows)
    lines = [
        "# Cost growth of InfluencePipeline's estimators (benchmarks/scale.py)",
        "",
        (f"`{results['command']}`: the demo's model (MiniLM + bottleneck adapters in the top 3 layers, turn-over "
         f"masks; {results['trainable_parameters']:,} trainable parameters), Rotten Tomatoes reviews of "
         f"{s['max_length']} tokens at most, pipeline batch {s['batch_size']} and chunk {s['chunk_size']}, "
         f"{s['targets']} validation reviews as targets, {s['threads']} torch thread(s) per process."),
        "",
        "| estimator | N | processes | gradient pass s | fit s | self-influence s | "
        f"{s['targets']} targets s | end-to-end s | end-to-end in passes | peak RSS GB | RSS added GB |"
        + (" error |" if failed else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if failed else ""),
    ]
    for r in rows:
        error = (r.error or "").replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| {r.estimator} | {r.n:,} | {r.processes} | {fmt(r.gradient_pass_s)} | {fmt(r.fit_s)} | "
            f"{fmt(r.self_influence_s)} | {fmt(r.targets_s)} | {fmt(r.end_to_end_s)} | {fmt(r.end_to_end_passes, 1)} | "
            f"{fmt(r.peak_rss_gb)} | {fmt(r.rss_added_gb)} |" + (f" {error[:300]} |" if failed else "")
        )
    summary = results["summary"]
    slopes = ("Log-log slopes over N (1 = linear, 2 = quadratic), 1 process; gradient pass: "
              f"{fmt(summary['gradient_pass_slope'])}.")
    lines += ["", slopes, ""]
    for estimator, e in summary["estimators"].items():
        if len(e["sizes"]) < 2:
            lines.append(f"- {estimator}: fewer than two sizes measured without error ({e['sizes']}).")
            continue
        lines.append(
            f"- {estimator} (N = {', '.join(f'{n:,}' for n in e['sizes'])}): end-to-end time slope "
            f"{fmt(e['end_to_end_s_slope'])}, peak RSS slope {fmt(e['peak_rss_gb_slope'])}, RSS added slope "
            f"{fmt(e['rss_added_gb_slope'])}; largest / smallest N (x{e['n_ratio']:g} examples): end to end "
            f"{ratio_text(e['end_to_end_s_ratio'])}, in passes {ratio_text(e['end_to_end_passes_ratio'])}, peak RSS "
            f"{ratio_text(e['peak_rss_gb_ratio'])}, RSS added {ratio_text(e['rss_added_gb_ratio'])}."
        )
    if results["process_comparison"]:
        lines += ["", "Several processes against one (same checkpoint and data):", ""]
        for c in results["process_comparison"]:
            head = f"- {c['estimator']}, N = {c['n']:,}, {c['processes']} processes / 1"
            if "error" in c:
                lines.append(f"{head}: not compared ({c['error'][:200]}).")
                continue
            gap = c["relative_gap"]
            agree = ("scores not saved" if gap is None else
                     f"scores differ by {gap['scores']:.1e} of the largest |score|, self-influence by "
                     f"{gap['self_influence']:.1e}")
            lines.append(f"{head}: fit {ratio_text(c['fit_ratio'])}, end to end {ratio_text(c['end_to_end_ratio'])}; "
                         f"{agree}.")
    lines += [
        "",
        (f"Machine: {env['cpu_count']} CPUs ({env['cpus_available']} available to this run), {s['threads']} torch "
         f"thread(s) per process, load average {env['load_average_1min_before']:.2f} -> "
         f"{env['load_average_1min_after']:.2f} (shared: wall times are noisy); torch {env['torch']}, transformers "
         f"{env['transformers']}, turnover-hf {env['turnover_hf']}; {results['wall_seconds']:.0f} s in all."),
        "",
        ("What the numbers mean: the gradient pass is one forward and backward of every training batch (the unit of "
         "cost; a training epoch is this plus the optimizer steps). End to end = fit + self-influence of all N + "
         f"the {s['targets']} targets against all N; \"in passes\" divides it by the gradient pass, so a value that "
         "stays flat as N grows means the estimator scales like training, and one that grows means it scales worse. "
         "Peak RSS is the process's peak resident memory (VmHWM; the largest process's with several); RSS added is "
         "the peak after loading the model and the data minus the resident memory then (what the estimator keeps "
         "plus its transients). Every estimator is measured in a fresh process (the gradient pass in the benchmark's "
         f"own); the model was trained for {s['train_steps']} optimizer steps on all N rows (costs do not depend on the "
         f"weights). Past {results['corpus_reviews']:,} reviews the texts repeat with new ids: this measures cost, "
         "not fidelity. Several-process rows run under torch.distributed.run (gloo), timed between barriers; their "
         "gradient pass is the 1-process one."),
    ]
    return "\n".join(lines) + "\n"


def print_row(row: Row, log: Callable[[str], None]) -> None:
    """One line of progress for a measured row."""
    if row.error:
        log(f"  {row.estimator} N = {row.n:,} x{row.processes}: {row.error[:400]}")
    else:
        log(f"  {row.estimator} N = {row.n:,} x{row.processes}: fit {row.fit_s:.2f} s, self {row.self_influence_s:.2f}"
            f" s, targets {row.targets_s:.2f} s, end to end {row.end_to_end_s:.2f} s = "
            f"{fmt(row.end_to_end_passes, 1)} passes, peak RSS {row.peak_rss_gb:.2f} GB (+{row.rss_added_gb:.2f})")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; ``--job`` (hidden) makes this process a child that measures one estimator."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", help=f"training set sizes N (default {' '.join(map(str, SIZES))}; "
                                                             f"--quick {' '.join(map(str, QUICK_SIZES))})")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: N = {' '.join(map(str, QUICK_SIZES))}, {QUICK_MAX_LENGTH} tokens, "
                             f"chunks of {QUICK_CHUNK_SIZE}")
    parser.add_argument("--estimator", nargs="+", default=["projected"],
                        help="estimators to measure side by side (default: projected)")
    parser.add_argument("--max_length", "--max-length", type=int,
                        help=f"tokens per review (default the demo's, 64; --quick {QUICK_MAX_LENGTH})")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=64,
                        help="batch of the gradient pass and of the pipeline (default 64)")
    parser.add_argument("--targets", type=int, default=100, help="validation reviews scored against all N (default 100)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1],
                        help="process counts (1 is always measured); above 1 runs under torch.distributed.run "
                             "at --process_sizes (e.g. --processes 1 2)")
    parser.add_argument("--process_sizes", "--process-sizes", type=int, nargs="+",
                        help="sizes measured with several processes (default: the largest)")
    parser.add_argument("--chunk_size", "--chunk-size", type=int,
                        help="InfluencePipeline(chunk_size=...), the unit its processes share (default: the "
                             f"pipeline's; --quick {QUICK_CHUNK_SIZE}, so that 2 processes share the scoring)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1: steadier)")
    parser.add_argument("--train_steps", "--train-steps", type=int, default=2,
                        help="optimizer steps of the training that records the training set (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="results stem (default benchmarks/results/scale[_quick])")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure every size and estimator (or, with the hidden ``--job``, one estimator as a child); print and write
    the results, and return them."""
    args = parse_args(argv)
    if args.job:
        raise SystemExit(child(Job(**json.loads(args.job))))

    import torch

    import turnover_hf as th
    from turnover_hf.demo import DemoSettings
    from turnover_hf.estimators import estimator_names
    from turnover_hf.files import atomic_write_text

    unknown = [e for e in args.estimator if e not in estimator_names()]
    if unknown:
        raise SystemExit(f"unknown estimator(s) {unknown}: this checkout has {estimator_names()}.")
    sizes = sorted(set(args.sizes or (QUICK_SIZES if args.quick else SIZES)))
    max_length = args.max_length or (QUICK_MAX_LENGTH if args.quick else DemoSettings.max_length)
    chunk_size = args.chunk_size or (QUICK_CHUNK_SIZE if args.quick else None)
    several = sorted({p for p in args.processes if p > 1})
    process_sizes = set(args.process_sizes or [sizes[-1]]) if several else set()
    if not process_sizes <= set(sizes):
        raise SystemExit(f"--process_sizes {sorted(process_sizes - set(sizes))} are not among the sizes {sizes}.")
    stem = args.output or RESULTS_DIR / f"scale{'_quick' if args.quick else ''}"
    started, load_before = time.perf_counter(), os.getloadavg()[0]

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)  # the gradient pass runs here, as the children run: one thread each
    quiet()
    rows: list[Row] = []
    prepared: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        work = Path(tmp)
        for n in sizes:
            folder = work / f"n{n}"
            folder.mkdir()
            log(f"N = {n:,}: model, data, {args.train_steps} training steps, gradient pass ...")
            prepared[n] = prepare(n, folder, max_length, args.batch_size, args.targets, args.train_steps, args.seed)
            gc.collect()  # the model and rows of this N are saved: not kept here while the children run
            log(f"  gradient pass over {n:,} rows: {prepared[n]['gradient_pass_s']:.2f} s")
            for processes in [1, *(several if n in process_sizes else [])]:
                for estimator in args.estimator:
                    keep = str(scores_file(work, n, estimator, processes)) if n in process_sizes else None
                    job = Job(estimator=estimator, n=n, work_dir=str(folder), result_path=str(folder / "result.json"),
                              max_length=max_length, batch_size=args.batch_size, threads=args.threads,
                              chunk_size=chunk_size, scores_path=keep)
                    log(f"N = {n:,}: {estimator} on {processes} process(es) ...")
                    result, wall = run_child(job, processes, log)
                    rows.append(estimator_row(job, processes, prepared[n], result, wall))
                    print_row(rows[-1], log)
        comparison = compare_processes(rows, work)

    first = prepared[sizes[0]]
    results = {
        "benchmark": "scale",
        "command": " ".join(["python benchmarks/scale.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {"sizes": sizes, "estimators": args.estimator, "max_length": max_length,
                     "batch_size": args.batch_size, "targets": args.targets, "processes": [1, *several],
                     "chunk_size": chunk_size or inspect.signature(th.InfluencePipeline).parameters["chunk_size"].default,
                     "process_sizes": sorted(process_sizes), "threads": args.threads,
                     "train_steps": args.train_steps, "seed": args.seed, "quick": args.quick},
        "environment": timing.environment(load_before, threads=args.threads, cpus_available=available_cpus()),
        "trainable_parameters": first["trainable_parameters"],
        "corpus_reviews": first["corpus_reviews"],
        "preparation": {str(n): p for n, p in prepared.items()},
        "rows": [asdict(r) for r in rows],
        "summary": summarise(rows, prepared),
        "process_comparison": comparison,
        "wall_seconds": time.perf_counter() - started,
    }
    table = render(results)
    print(table)
    atomic_write_text(f"{stem}.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(f"{stem}.md", table)
    log(f"wrote {stem}.json and .md")
    return results


if __name__ == "__main__":
    main()
