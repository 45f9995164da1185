"""Mask-seed ensembles: the same fine-tuning run K times with K mask seeds, scores averaged.

One model's turn-over score is dominated by the difference between two random half-networks, not by the
example (benchmarks/fidelity.py: two mask seeds' rankings agree at Spearman ~0.0 with 128 masked units and
N = 2,000). That noise is independent across mask seeds, so the mean of K members keeps the signal and shrinks the
noise like 1/sqrt(K), and the split-half agreement of the members measures how far it has shrunk.

Example:
    >>> paths = train_ensemble(model_init, TurnoverConfig(seed=0), args, train, num_members=16)
    >>> pipe = InfluencePipeline(args.output_dir, tokenizer, train_dataset=train)   # loads every member
    >>> pipe("a gripping film")["agreement"]                                        # measured reliability
"""

from __future__ import annotations

import copy
import glob
import logging
import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..config import CONFIG_NAME, TurnoverConfig
from ..context import state_of
from ..errors import ConfigMismatchError, TurnoverError
from ..losses import eval_mode, is_causal_lm, model_inputs
from .registry import BuiltEstimator, Estimator, EstimatorContext, register_estimator
from .turnover import TurnoverScorer, masks_key
from ..ranks import spearman_columns
from ..patcher import patch_model
from ..trainer import TurnoverTrainer, trained_weights_problem

logger = logging.getLogger(__name__)

MEMBER_PREFIX = "member-"


def member_dirs(path: Union[str, os.PathLike]) -> list[str]:
    """The member folders (``member-0``, ``member-1``, ...) of an ensemble folder, in member order; [] if none."""
    found = [d for d in glob.glob(os.path.join(os.fspath(path), MEMBER_PREFIX + "*")) if os.path.isfile(os.path.join(d, CONFIG_NAME))]
    suffix = lambda d: os.path.basename(d)[len(MEMBER_PREFIX):]
    return sorted((d for d in found if suffix(d).isdigit()), key=lambda d: int(suffix(d)))


def check_members(models: Sequence[nn.Module]) -> list[TurnoverConfig]:
    """Configs of ensemble members, after checking they can be averaged: trained on the same ids, distinct seeds."""
    if len(models) == 0:
        raise TurnoverError("an ensemble needs at least one model.")
    configs = [state_of(m).config for m in models]
    first = configs[0]
    seen: dict[int, int] = {}
    for k, config in enumerate(configs):
        if config.id_column != first.id_column or config.num_train_examples != first.num_train_examples:
            raise ConfigMismatchError(
                f"ensemble member {k} was trained on {config.num_train_examples} examples with id column "
                f"{config.id_column!r}, member 0 on {first.num_train_examples} with {first.id_column!r}: every "
                "member must be trained on the same training set."
            )
        if config.seed in seen:
            raise ConfigMismatchError(
                f"ensemble members {seen[config.seed]} and {k} share mask seed {config.seed}, so their masks are the "
                "same and averaging them removes no noise: train each member with its own TurnoverConfig(seed=...) "
                "(train_ensemble does this)."
            )
        seen[config.seed] = k
    return configs


def split_half_agreement(member_scores: torch.Tensor) -> dict[str, Any]:
    """How reproducible the ensemble mean is, measured from its own members.

    ``member_scores`` is ``(K, n_ids, n_targets)``. The members are split into even and odd halves; ``half`` is
    the per-target Spearman correlation of the two half-means over the ids, and ``estimated`` its Spearman-Brown
    extrapolation ``2r / (1 + r)`` to the full ensemble: the expected rank agreement of this ensemble's scores with
    those of another ensemble of the same size trained with other seeds. Needs K >= 2 and n_ids >= 3.

    Example:
        >>> split_half_agreement(torch.randn(8, 100, 3))["estimated"]     # ~0 for pure noise
    """

    k, n = member_scores.shape[:2]
    if k < 2 or n < 3:
        raise TurnoverError(f"split-half agreement needs at least 2 members and 3 ids, got {k} and {n}.")
    half_a, half_b = member_scores[0::2].mean(0), member_scores[1::2].mean(0)
    half = spearman_columns(half_a.double().numpy(), half_b.double().numpy())
    estimated = np.where(np.isfinite(half), 2 * half / np.maximum(1 + half, 1e-12), np.nan)
    return {"half": half.tolist(), "estimated": estimated.tolist(), "members": int(k)}


class EnsembleScorer(Estimator):
    """Turn-over scores of several members (same training set, different mask seeds), averaged.

    Has the scorer interface :class:`~turnover_hf.InfluencePipeline` uses (``scores``, ``self_scores``,
    ``device``) plus ``member_scores`` for the reliability measurement and ``predict`` (mean probabilities).

    Example:
        >>> scorer = EnsembleScorer([model_a, model_b, model_c, model_d])
        >>> per_member = scorer.member_scores(targets, labels, example_ids)     # (4, n_ids, n_targets)
        >>> split_half_agreement(per_member)["estimated"]
    """

    def __init__(self, models: Sequence[nn.Module], *, batch_size: int = 64, fast: bool = True) -> None:
        self.configs = check_members(models)
        self.models = list(models)
        self.members = [TurnoverScorer(m, batch_size=batch_size, fast=fast) for m in self.models]
        self.model = self.models[0]
        self.device = self.members[0].device

    def __len__(self) -> int:
        return len(self.members)

    @property
    def num_members(self) -> int:  # type: ignore[override]
        return len(self.members)

    token_level = True

    def cache_key(self) -> list[dict[str, Any]]:
        return [masks_key(c) for c in self.configs]

    def self_score_columns(self, batches: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
        return torch.cat([self.member_self_scores(b, b["labels"], b["example_ids"]).T for b in batches])

    def token_scores(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        """The members' mean per-token scores, ``(n_ids, n_targets, T)``."""
        return torch.stack([m.token_scores(targets, labels, example_ids) for m in self.members]).mean(0)

    @property
    def path(self) -> str:
        return ",".join(sorted({m.path for m in self.members}))

    def member_scores(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        """Every member's scores, float32 ``(K, n_ids, n_targets)`` on the CPU."""
        return torch.stack([m.scores(targets, labels, example_ids) for m in self.members])

    def scores(self, targets: Mapping[str, torch.Tensor], labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        """The ensemble's influence of each id on each target, float32 ``(n_ids, n_targets)`` on the CPU."""
        return self.member_scores(targets, labels, example_ids).mean(0)

    def member_self_scores(self, batch: Mapping[str, torch.Tensor], labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        """Every member's self-influence of the batch's rows, ``(K, n)``."""
        return torch.stack([m.self_scores(batch, labels, example_ids) for m in self.members])

    def self_scores(self, batch: Mapping[str, torch.Tensor], labels: torch.Tensor, example_ids: torch.Tensor) -> torch.Tensor:
        """The ensemble's self-influence of each training row, ``(n,)``."""
        return self.member_self_scores(batch, labels, example_ids).mean(0)

    def predict(self, targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The ensemble's prediction for unlabelled targets: argmax of the mean probabilities (mean for regression)."""
        outputs = []
        for model in self.models:
            device = next(model.parameters()).device
            with eval_mode(model), torch.no_grad():
                outputs.append(model(**model_inputs(targets, device)).logits.float().cpu())
        logits = torch.stack(outputs)
        if logits.dim() == 3 and logits.shape[-1] == 1:
            return logits.mean(0).squeeze(-1)
        return logits.softmax(-1).mean(0).argmax(-1)


def train_ensemble(
    model_init: Callable[[], nn.Module],
    config: TurnoverConfig,
    args: Any,
    train_dataset: Any,
    *,
    num_members: int = 16,
    freeze_leaking: bool = False,
    trainer_class: Optional[type] = None,
    **trainer_kwargs: Any,
) -> list[str]:
    """Fine-tune ``num_members`` influence-ready models that differ only in their seeds; return their folders.

    Member k is ``model_init()`` patched with ``config`` at mask seed ``config.seed + k``, trained by
    :class:`~turnover_hf.TurnoverTrainer` with ``args.seed + k`` and saved to ``<args.output_dir>/member-k``.
    ``freeze_leaking`` is passed to :func:`~turnover_hf.patch_model`; ``trainer_kwargs`` (``processing_class``,
    ``data_collator``, ``eval_dataset``, ``callbacks``, ...) to every member's trainer.
    Members already saved there (same config) are kept, so an interrupted run resumes with the next member.
    ``InfluencePipeline(args.output_dir, ...)`` loads them all.

    Example:
        >>> args = TrainingArguments("out/ensemble", num_train_epochs=3)
        >>> train_ensemble(lambda: AutoModelForSequenceClassification.from_pretrained(base), TurnoverConfig(),
        ...                args, train, num_members=16, processing_class=tokenizer)
    """

    if num_members < 1:
        raise TurnoverError(f"num_members must be at least 1, got {num_members}.")
    trainer_class = trainer_class or TurnoverTrainer
    root = args.output_dir
    paths = []
    for k in range(num_members):
        member_config = TurnoverConfig.from_dict({**config.to_dict(), "seed": config.seed + k})
        folder = os.path.join(root, f"{MEMBER_PREFIX}{k}")
        paths.append(folder)
        if os.path.isfile(os.path.join(folder, CONFIG_NAME)):  # written last by a save: the member is complete
            _check_resumable(TurnoverConfig.from_pretrained(folder), member_config, folder, len(train_dataset))
            logger.info("ensemble member %d is already trained in %s; keeping it.", k, folder)
            continue
        member_args = copy.copy(args)
        member_args.output_dir, member_args.seed = os.path.join(folder, "checkpoints"), args.seed + k
        model = patch_model(model_init(), member_config, freeze_leaking=freeze_leaking)
        trainer = trainer_class(model=model, args=member_args, train_dataset=train_dataset, **trainer_kwargs)
        trainer.train()
        trainer.save_model(folder)
        logger.info("ensemble member %d/%d saved to %s.", k + 1, num_members, folder)
    return paths


def _check_resumable(saved: TurnoverConfig, wanted: TurnoverConfig, folder: str, n_train: int) -> None:
    fields = ("p", "seed", "scheme", "codebook_size", "codebook_picks", "id_column")
    diffs = [f"{name}: {getattr(saved, name)!r} vs {getattr(wanted, name)!r}" for name in fields
             if getattr(saved, name) != getattr(wanted, name)]
    if saved.num_train_examples != n_train:
        diffs.append(f"training examples: {saved.num_train_examples} vs {n_train}")
    if diffs:
        raise ConfigMismatchError(
            f"{folder} already holds a member trained with another config ({'; '.join(diffs)}); give another "
            "output_dir, or remove that folder to retrain it."
        )


# -- turn-over dropout as a registered estimator: one patched model, or an ensemble of them -------------------
def _is_ensemble(context: EstimatorContext) -> Optional[str]:
    return "an ensemble of turn-over models averages their scores" if len(context.models) > 1 else None


def _is_language_model(context: EstimatorContext) -> Optional[str]:
    if is_causal_lm(context.model):
        return "the influence function covers classifiers, and this is a causal language model"
    return None


SINGLE_MODEL_WARNING = (
    "scoring with a single turn-over model: its scores are dominated by the difference between two random "
    "half-networks (two mask seeds' rankings agree at Spearman ~0 in benchmarks/fidelity.py). Average an ensemble "
    "of models trained with different mask seeds for rankings you can trust: turnover_hf.train_ensemble(...), then "
    "InfluencePipeline(<its output_dir>, ...); or, for a classifier, score this model with estimator='influence' "
    "(a Gauss-Newton influence function)."
)


@register_estimator(
    "turnover",
    description="turn-over dropout: forward passes under each example's mask and its flipped mask (average an "
                "ensemble of mask seeds, see --num_members of train).",
    definition="the target's loss under the example's flipped mask (a sub-network that never trained on it) minus "
               "its loss under the example's own mask.",
    auto=lambda context: _is_ensemble(context) or _is_language_model(context),
    auto_priority=20,
    worth="Scored by turn-over dropout on this one model: one score compares two halves of the masked units, so "
          "single scores are close to noise and the same reviews can top the lists of several targets.",
    low_self_influence="Most negative: the sub-network that saw them does worse on them than the one that did not; "
                       "ambiguous reviews, or labels the rest of the data contradicts.",
    one_model_caveat="a single model's rankings are close to noise on large training sets; average an ensemble of "
                     "mask seeds (<code>turnover_hf.train_ensemble</code>) before acting on individual rows.",
    multi_model=True,
    needs_masks=True,
)
def _build(context: EstimatorContext) -> BuiltEstimator:
    """One patched model, or an ensemble of them (their mean score, with a measured agreement)."""
    config = state_of(context.model).config
    for k, model in enumerate(context.models):
        problem = trained_weights_problem(model)
        if problem is not None:
            raise ConfigMismatchError(f"turn-over scores of {'member ' + str(k) if len(context.models) > 1 else 'this model'} "
                                      f"would be wrong: {problem}.")
    if len(context.models) > 1:
        scorer: Estimator = EnsembleScorer(context.models, batch_size=context.batch_size, fast=context.fast)
    else:
        scorer = TurnoverScorer(context.model, batch_size=context.batch_size, fast=context.fast)
        logger.warning(SINGLE_MODEL_WARNING)
    return BuiltEstimator(scorer, config.id_column, config.num_train_examples)
