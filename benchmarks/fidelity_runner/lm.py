"""The causal-LM fidelity setting (``benchmarks/fidelity.py --setting lm``): a small GPT-2 fine-tuned with PEFT LoRA
under turn-over dropout, its influence rows judged against retraining on random halves of the fine-tuning set.

Steps (all offline, everything on one torch thread, nothing written outside a temporary folder):

1. Data: the Rotten Tomatoes snippets of ``turnover_hf.assets.rotten_tomatoes``. The fine-tuning set is the first
   ``n_train`` snippets of its ``train`` split, the targets the first ``n_targets`` of ``validation`` (held out);
   the base model and the BPE tokenizer (``examples/lm_common.py``) see only the ``test`` split and the rest of
   ``validation``, so they are disjoint from both.
2. Base model: a few-layer GPT-2 trained plainly (``transformers.Trainer``) on those snippets.
3. Fine-tuning recipe: PEFT LoRA on ``c_attn`` of every layer, patched with ``turnover_hf.patch_model`` (masks on
   the LoRA rank units, leaking parameters frozen), trained with ``turnover_hf.TurnoverTrainer``. A seed fixes the
   LoRA init, the batch order and the masks; scored models use seeds below
   :data:`~fidelity_runner.core.GROUND_TRUTH_SEED`, ground truths draw above it.
4. Ground truth: ``n_subsets`` random half-size subsets, each fine-tuned ``replicates`` times from the same base with
   the same recipe (other seeds); the targets' summed token cross-entropy on the full network is recorded.
5. Rows, scored on the same models: turn-over of one model and the mean of a seed ensemble (the library's
   ``InfluencePipeline(estimator="turnover")``), the library's projected influence function
   (``estimator="projected"``, each variant of ``projected_variants``) and Kronfluence's EK-FAC on the LoRA Linears.
   Each row: LDS (``turnover_hf.evaluation.lds``), seed agreement (the same method on a model of another seed),
   top-10 repetition, and training / fitting / scoring seconds.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset

import turnover_hf as th
from turnover_hf.evaluation import lds, random_subsets, seed_agreement, spearman_columns
from turnover_hf.evaluation.peers import kronfluence_version
from turnover_hf.losses import IGNORE_INDEX, counted_tokens, per_token_loss

from .core import GROUND_TRUTH_SEED, REPLICATE_SEED, top_k_repetition

# examples/lm_common.py: the offline sentences, the BPE tokenizer and the small GPT-2 the LM examples share.
_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(_EXAMPLES) not in sys.path:
    sys.path.insert(0, str(_EXAMPLES))
from lm_common import small_gpt2, tokenized, train_tokenizer

TITLE = "# Fidelity of influence on a causal LM (GPT-2 + PEFT LoRA, turn-over dropout)\n\n"


# -- settings -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LMSettings:
    """Sizes, the base model, the fine-tuning recipe and the rows of the LM setting."""

    n_train: int = 400
    n_targets: int = 40
    n_subsets: int = 30
    replicates: int = 2  # retrainings per subset (2: split-half reliability and a 2-retraining mean)
    ensemble: int = 4  # K of the seed-ensemble row
    ensemble_agreement: bool = True  # a second, disjoint ensemble of K for the ensemble row's seed agreement
    data_seed: int = 0
    n_base: int | None = None  # base-model snippets (None: all that are neither fine-tuning data nor targets)
    vocab_size: int = 2000
    max_length: int = 48
    n_layer: int = 2
    n_embd: int = 64
    base_epochs: float = 6.0
    base_lr: float = 3e-3
    epochs: float = 3.0
    lr: float = 2e-3
    batch_size: int = 32
    lora_r: int = 32
    lora_alpha: int = 64
    p: float = 0.5  # turn-over drop ratio on the LoRA rank units
    score_batch_size: int = 128  # (id, target) rows per forward of the turn-over scorer
    projected_variants: tuple[dict[str, Any], ...] = (
        {}, {"damping_factor": 1.0}, {"curvature": "full"}, {"curvature": "full", "damping_factor": 10.0},
        {"training_masks": False}, {"design": "sketch"},
    )
    kronfluence: bool = True  # run the Kronfluence rows when the package imports
    kronfluence_masks: tuple[bool, ...] = (True, False)  # one row each: training gradients masked / full network


QUICK = LMSettings(
    n_train=40, n_targets=6, n_subsets=6, ensemble=2, n_base=200, vocab_size=500, max_length=24, n_embd=32,
    base_epochs=1.0, epochs=1.0, lora_r=8, lora_alpha=16, batch_size=16,
)


def settings_for(
    quick: bool = False, subsets: int | None = None, epochs: float | None = None, ensemble: int | None = None
) -> LMSettings:
    """The default (or ``--quick``) settings with the command line's sizes applied."""
    settings = QUICK if quick else LMSettings()
    changes = {k: v for k, v in (("n_subsets", subsets), ("epochs", epochs), ("ensemble", ensemble)) if v is not None}
    return replace(settings, **changes)


# -- data and base model ------------------------------------------------------------------------------------------
@dataclass
class LMData:
    """The tokenizer, the trained base model, the fine-tuning set and the targets (collated once)."""

    tokenizer: Any
    base: torch.nn.Module
    train: Dataset  # columns example_id, input_ids
    targets: Dataset  # columns input_ids (held out)
    target_batch: dict[str, torch.Tensor]  # collated targets: input_ids, attention_mask, labels
    n_base: int
    base_seconds: float
    folder: str  # temporary folder for Trainer output


def _snippets(dataset: Dataset) -> Dataset:
    return dataset.remove_columns([c for c in dataset.column_names if c not in ("text", "example_id")])


def _quiet(trainer: Any) -> Any:
    """A Trainer without the callback that prints its log dicts (the run's log says what is trained)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def _training_args(folder: str, epochs: float, lr: float, batch_size: int, seed: int) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        folder, num_train_epochs=epochs, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_ratio=0.05, save_strategy="no", report_to=[], logging_strategy="no",
        use_cpu=True, seed=seed, data_seed=seed, disable_tqdm=True,
    )


def load_data(settings: LMSettings, folder: str) -> LMData:
    """Split the corpus, train the tokenizer and the base model on the snippets outside fine-tuning and targets."""
    from transformers import Trainer

    corpus = th.assets.rotten_tomatoes(seed=settings.data_seed, n_train=settings.n_train)
    held_out = th.assets.rotten_tomatoes(
        seed=settings.data_seed, n_train=settings.n_train, n_validation=settings.n_targets
    )["validation"]
    target_ids = set(held_out["example_id"])
    rest = [t for t, i in zip(corpus["validation"]["text"], corpus["validation"]["example_id"]) if i not in target_ids]
    base_texts = (list(corpus["test"]["text"]) + rest)[: settings.n_base]
    tokenizer = train_tokenizer(base_texts, vocab_size=settings.vocab_size)
    keep_ids = lambda d: tokenized(_snippets(d), tokenizer, settings.max_length).remove_columns(["text"])
    train, targets = keep_ids(corpus["train"]), keep_ids(held_out).remove_columns(["example_id"])
    base = small_gpt2(tokenizer, n_layer=settings.n_layer, n_embd=settings.n_embd, seed=settings.data_seed)
    base_data = tokenized(Dataset.from_dict({"text": base_texts}), tokenizer, settings.max_length)
    started = time.perf_counter()
    _quiet(Trainer(
        model=base,
        args=_training_args(os.path.join(folder, "base"), settings.base_epochs, settings.base_lr,
                            settings.batch_size, settings.data_seed),
        train_dataset=base_data.remove_columns(["text"]),
        data_collator=th.CausalLMCollator(tokenizer),
    )).train()
    base.eval()
    batch = th.CausalLMCollator(tokenizer)([dict(row) for row in targets])
    return LMData(tokenizer, base, train, targets, batch, len(base_texts), time.perf_counter() - started, folder)


# -- fine-tuning and measuring ------------------------------------------------------------------------------------
@dataclass
class FineTuned:
    """A LoRA model fine-tuned under turn-over dropout with one seed (LoRA init, batch order, masks)."""

    model: torch.nn.Module
    seed: int
    seconds: float


def fine_tune(data: LMData, settings: LMSettings, seed: int, rows: np.ndarray | None = None) -> FineTuned:
    """Fine-tune LoRA on ``c_attn`` of every layer of a copy of the base, patched, with ``TurnoverTrainer``, on the
    fine-tuning set (or its ``rows``)."""
    import peft

    started = time.perf_counter()
    torch.manual_seed(seed)  # the LoRA init
    lora = peft.LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, target_modules=["c_attn"],
                           fan_in_fan_out=True, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = th.patch_model(peft.get_peft_model(copy.deepcopy(data.base), lora),
                           th.TurnoverConfig(p=settings.p, seed=seed), freeze_leaking=True)
    train = data.train if rows is None else data.train.select(np.flatnonzero(rows).tolist())
    _quiet(th.TurnoverTrainer(
        model=model,
        args=_training_args(os.path.join(data.folder, "lora"), settings.epochs, settings.lr, settings.batch_size, seed),
        train_dataset=train,
    )).train()
    return FineTuned(model.eval(), seed, time.perf_counter() - started)


@torch.no_grad()
def target_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """``(T,)`` summed token cross-entropy of each target on the full network (no masks)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_token_loss(logits, batch["labels"], shift=True).sum(-1).double().numpy()


@dataclass
class GroundTruth:
    """Target losses of models fine-tuned on random half-size subsets, ``replicates`` times each."""

    subsets: np.ndarray  # (S, N) bool
    losses: np.ndarray  # (R, S, T)
    seconds: float

    @property
    def mean(self) -> np.ndarray:
        """``(S, T)`` mean over the retrainings of each subset."""
        return self.losses.mean(0)

    def split_half_reliability(self) -> float | None:
        """Mean over targets of the Spearman correlation, over subsets, between the first two retrainings."""
        if len(self.losses) < 2:
            return None
        return float(np.nanmean(spearman_columns(self.losses[0], self.losses[1])))

    def summary(self) -> dict[str, Any]:
        return {
            "subsets": len(self.subsets),
            "subset_size": int(self.subsets[0].sum()),
            "replicates": len(self.losses),
            "split_half_reliability": self.split_half_reliability(),
            "seconds": self.seconds,
            "seeds": f"subsets {GROUND_TRUTH_SEED}+s, replicates {REPLICATE_SEED}+s, ... (LoRA init, order, masks)",
        }


def ground_truth(data: LMData, settings: LMSettings, log: Callable[[str], None]) -> GroundTruth:
    """Fine-tune on every subset ``replicates`` times (seeds no scored model uses) and record the target losses."""
    started = time.perf_counter()
    subsets = random_subsets(settings.n_train, settings.n_subsets, seed=settings.data_seed + 7)
    losses = np.zeros((settings.replicates, len(subsets), settings.n_targets))
    for r in range(settings.replicates):
        log(f"ground truth: {len(subsets)} subsets, retraining {r + 1}/{settings.replicates} ...")
        offset = GROUND_TRUTH_SEED + r * (REPLICATE_SEED - GROUND_TRUTH_SEED)
        for s, rows in enumerate(subsets):
            losses[r, s] = target_losses(fine_tune(data, settings, offset + s, rows).model, data.target_batch)
    return GroundTruth(subsets, losses, time.perf_counter() - started)


# -- scoring ------------------------------------------------------------------------------------------------------
@dataclass
class Scored:
    """One method's ``(N, T)`` scores of one model (positive = the example lowers the target's loss) and its cost."""

    scores: torch.Tensor
    fit_seconds: float
    score_seconds: float


def _summed(scores: torch.Tensor, data: LMData) -> torch.Tensor:
    """Per-token-mean turn-over scores as scores of the summed loss (each target column times its counted tokens)."""
    return scores * counted_tokens(data.target_batch["labels"], shift=True).to(scores.dtype)


def turnover_scores(model: FineTuned, data: LMData, settings: LMSettings) -> Scored:
    """``InfluencePipeline(estimator="turnover")``: each example's flipped-mask loss minus its own-mask loss."""
    advice = logging.getLogger("turnover_hf.estimators.ensemble")  # the advice to average an ensemble: row (b) does
    level = advice.level
    advice.setLevel(logging.ERROR)
    try:
        pipe = th.InfluencePipeline(model.model, data.tokenizer, train_dataset=data.train, estimator="turnover",
                                    batch_size=settings.score_batch_size)
        scores, seconds = _timed(pipe.scores, data.targets)
    finally:
        advice.setLevel(level)
    return Scored(_summed(scores, data), 0.0, seconds)


def projected_scores(model: FineTuned, data: LMData, options: dict[str, Any]) -> Scored:
    """``InfluencePipeline(estimator="projected")``: fit (training gradients under each example's own mask, sampled-
    label Gauss-Newton curvature), then the targets' summed token cross-entropy against the fit."""
    pipe = th.InfluencePipeline(model.model, data.tokenizer, train_dataset=data.train, estimator="projected",
                                options={"show_progress": False, **options})
    _, fit_seconds = _timed(pipe.fit)
    scores, score_seconds = _timed(pipe.scores, data.targets)
    return Scored(scores, fit_seconds, score_seconds)


def lora_linears(model: torch.nn.Module) -> list[str]:
    """Names of the LoRA ``Linear`` modules (``lora_A`` / ``lora_B``) of a PEFT model."""
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and (".lora_A." in f"{name}." or ".lora_B." in f"{name}.")]


class _SequenceRows(torch.utils.data.Dataset):
    """Token sequences as fixed-width ``(input_ids, attention_mask, labels[, example_id])`` tuples for Kronfluence."""

    def __init__(self, batch: dict[str, torch.Tensor], ids: torch.Tensor | None = None) -> None:
        self.batch, self.ids = batch, ids

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        row = (self.batch["input_ids"][i], self.batch["attention_mask"][i], self.batch["labels"][i])
        return row if self.ids is None else (*row, self.ids[i])


def _kronfluence_task(tracked: list[str]) -> Any:
    """A Kronfluence ``Task`` on token sequences: summed token cross-entropy (labels sampled from the model's own
    next-token distribution for the factors when ``sample``), measurement = the target's summed token CE. Training
    rows that carry their example id run under that example's turn-over mask; targets on the full network."""
    from kronfluence.task import Task

    def logits_and_labels(batch: Any, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, attention_mask, labels, *ids = batch
        if ids:
            with th.instance_masks(model, ids[0], mode="train"):
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        else:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        return logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)

    class SummedTokenTask(Task):
        def compute_train_loss(self, batch: Any, model: torch.nn.Module, sample: bool = False) -> torch.Tensor:
            logits, labels = logits_and_labels(batch, model)
            if sample:
                with torch.no_grad():
                    drawn = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
                    labels = torch.where(labels == IGNORE_INDEX, labels, drawn)
            return F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE_INDEX)

        def compute_measurement(self, batch: Any, model: torch.nn.Module) -> torch.Tensor:
            logits, labels = logits_and_labels(batch, model)
            return F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE_INDEX)

        def get_influence_tracked_modules(self) -> list[str]:
            return tracked

        def get_attention_mask(self, batch: Any) -> torch.Tensor:
            return batch[1]

    return SummedTokenTask()


class _LinearWrapper(torch.nn.Sequential):
    """A ``Sequential`` holding one Linear (maybe inside Kronfluence's tracked module) that shows its weight and bias,
    as PEFT expects of a ``lora_A`` module."""

    def _linear(self) -> torch.nn.Module:
        inner = self[0]
        return getattr(inner, "original_module", inner)

    @property
    def weight(self) -> torch.Tensor:
        return self._linear().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self._linear().bias


def kronfluence_scores(model: FineTuned, data: LMData, masked: bool, seed: int = 0) -> Scored:
    """Kronfluence's EK-FAC influence on the LoRA Linears of a copy of the model; training examples under their own
    turn-over masks if ``masked`` (else the full network), targets on the full network; sign as the package's
    (positive = the example lowers the target's loss)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    # as for the library's own Kronfluence peer: lora_A's output masks move onto a wrapper, so the hooks Kronfluence
    # puts on the Linear see its raw output and the chain rule through the mask stays right
    from turnover_hf.evaluation.peers import masks_outside_linears

    collate = th.CausalLMCollator(data.tokenizer)
    ids = torch.as_tensor(data.train["example_id"]) if masked else None
    train_rows = _SequenceRows(collate([{"input_ids": row} for row in data.train["input_ids"]]), ids)
    target_rows = _SequenceRows(data.target_batch)
    module = copy.deepcopy(model.model).eval()
    renamed = masks_outside_linears(module, lora_linears(module))
    modules = dict(module.named_modules())
    for old, new in renamed.items():
        if new != old:  # PEFT reads lora_A's weight (its dtype) through the wrapper
            modules[old].__class__ = _LinearWrapper
    module.eval()  # the new wrappers too: masks only under instance_masks
    tracked = list(renamed.values())
    task = _kronfluence_task(tracked)
    warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")
    gc.collect()
    gc.freeze()  # Kronfluence calls gc.collect() several times; the benchmark's own objects stay out of it
    try:
        with tempfile.TemporaryDirectory() as folder:
            analyzer = Analyzer("turnover_lm", prepare_model(module, task), task, cpu=True, disable_tqdm=True,
                                output_dir=folder, log_level=logging.WARNING)
            started = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # the sampled labels of the factors
                analyzer.fit_all_factors("ekfac", dataset=train_rows, per_device_batch_size=64,
                                         factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
            fit_seconds = time.perf_counter() - started
            started = time.perf_counter()
            analyzer.compute_pairwise_scores(
                "pairs", "ekfac", query_dataset=target_rows, train_dataset=train_rows, per_device_query_batch_size=64,
                per_device_train_batch_size=64, score_args=ScoreArguments(damping_factor=None),
                overwrite_output_dir=True,
            )
            scores = analyzer.load_pairwise_scores("pairs")["all_modules"].T.float()
            score_seconds = time.perf_counter() - started
    finally:
        gc.unfreeze()
    return Scored(scores, fit_seconds, score_seconds)


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - started


# -- rows ---------------------------------------------------------------------------------------------------------
@dataclass
class LMRow:
    """One method's line of the LM table (None = not measured)."""

    method: str
    lds: float | None = None
    lds_2retrain: float | None = None  # against the mean of the retrainings of each subset
    agreement: float | None = None  # per-target Spearman with the same method on another seed's model(s)
    agreement_overall: float | None = None
    top10_repetition: float | None = None
    train_seconds: float | None = None  # fine-tuning every model the scores need
    fit_seconds: float | None = None  # the estimator's one-off setup (factors, projected training gradients)
    score_seconds: float | None = None  # all T targets against all N examples
    end_to_end_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def judged(method: str, a: Scored, b: Scored | None, truth: GroundTruth, train_seconds: float) -> LMRow:
    """A row from run A's scores (and run B's, for seed agreement)."""
    row = LMRow(
        method,
        lds=lds(a.scores, truth.subsets, truth.losses[0]),
        lds_2retrain=lds(a.scores, truth.subsets, truth.mean) if len(truth.losses) > 1 else None,
        top10_repetition=top_k_repetition(a.scores, 10),
        train_seconds=train_seconds,
        fit_seconds=a.fit_seconds,
        score_seconds=a.score_seconds,
        end_to_end_seconds=train_seconds + a.fit_seconds + a.score_seconds,
    )
    if b is not None:
        agreement = seed_agreement(a.scores, b.scores)
        row.agreement, row.agreement_overall = agreement["per_target"], agreement["overall"]
    return row


def _mean(members: Sequence[Scored]) -> Scored:
    return Scored(torch.stack([m.scores for m in members]).mean(0), sum(m.fit_seconds for m in members),
                  sum(m.score_seconds for m in members))


def run_lm(settings: LMSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train everything, score every row, return the JSON-ready results."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        log("base model ...")
        data = load_data(settings, folder)
        log(f"  base model on {data.n_base} snippets in {data.base_seconds:.0f}s; base target loss "
            f"{target_losses(data.base, data.target_batch).mean():.2f}")
        truth = ground_truth(data, settings, log)
        reliability = truth.split_half_reliability()
        log(f"  split-half reliability {reliability if reliability is not None else float('nan'):.3f}")
        k = settings.ensemble
        seeds = list(range(2 * k if settings.ensemble_agreement else max(k, 2)))
        log(f"scored models: seeds {seeds} ...")
        models = [fine_tune(data, settings, seed) for seed in seeds]
        a, b = models[0], models[1]
        rows: list[LMRow] = []

        log("(a) / (b) turn-over ...")
        turnover = [turnover_scores(m, data, settings) for m in models]
        rows.append(judged("(a) turn-over, single model", turnover[0], turnover[1], truth, a.seconds))
        second = _mean(turnover[k : 2 * k]) if settings.ensemble_agreement else None
        rows.append(judged(f"(b) turn-over, seed ensemble K={k}", _mean(turnover[:k]), second, truth,
                           sum(m.seconds for m in models[:k])))
        rows[-1].extra["agreement_between"] = "two disjoint ensembles" if second is not None else None

        for options in settings.projected_variants:
            what = ", ".join(f"{key}={value}" for key, value in options.items()) or "default options: design=eigen, curvature=auto"
            log(f"(g) projected influence ({what}) ...")
            rows.append(judged(f"(g) library projected influence function ({what})", projected_scores(a, data, options),
                               projected_scores(b, data, options), truth, a.seconds))

        if settings.kronfluence and kronfluence_version() is not None:
            for masked in settings.kronfluence_masks:
                where = "training examples under their masks" if masked else "full network"
                log(f"(g) Kronfluence EK-FAC ({where}) ...")
                rows.append(judged(f"(g) Kronfluence EK-FAC on the LoRA Linears ({where})",
                                   kronfluence_scores(a, data, masked), kronfluence_scores(b, data, masked), truth,
                                   a.seconds))
        else:
            log("(g) Kronfluence is not installed (or not selected): its row is skipped.")

        base_loss = float(target_losses(data.base, data.target_batch).mean())
        tuned_loss = float(target_losses(a.model, data.target_batch).mean())
    return {
        "setting": "lm",
        "settings": asdict(settings),
        "model": {
            "n_layer": settings.n_layer, "n_embd": settings.n_embd, "vocab_size": len(data.tokenizer),
            "lora_parameters": int(sum(p.numel() for p in a.model.parameters() if p.requires_grad)),
            "mask_sites": {name: dict(site) for name, site in a.model.turnover_config.mask_sites.items()},
            "base_snippets": data.n_base, "base_seconds": data.base_seconds,
            "target_loss_base_mean": base_loss, "target_loss_fine_tuned_mean": tuned_loss,
            "target_tokens_mean": float(counted_tokens(data.target_batch["labels"], shift=True).double().mean()),
            "fine_tune_seconds_mean": float(np.mean([m.seconds for m in models])),
        },
        "ground_truth": truth.summary(),
        "kronfluence": kronfluence_version(),
        "rows": [asdict(r) for r in rows],
        "seconds_total": time.perf_counter() - started,
    }
