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
import hashlib
import json
import logging
import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from ..config import CONFIG_NAME, TurnoverConfig
from ..context import state_of
from ..errors import ConfigMismatchError, TurnoverError
from ..files import atomic_write_text
from ..losses import eval_mode, is_causal_lm, model_inputs
from ..patcher import patch_model
from ..ranks import spearman_columns
from ..trainer import TurnoverTrainer, trained_weights_problem
from .registry import BuiltEstimator, Estimator, EstimatorContext, register_estimator
from .turnover import TurnoverScorer, masks_key

logger = logging.getLogger(__name__)

MEMBER_PREFIX = "member-"


MANIFEST_NAME = "ensemble.json"
MANIFEST_FORMAT, MANIFEST_VERSION = "turnover-hf-ensemble", 1
_RETRAIN = ("retrain it: run train_ensemble again with the same arguments and output_dir (it trains the members "
            "that are missing and records them), or `turnover-hf train --num_members K` again")


def member_dirs(path: Union[str, os.PathLike]) -> list[str]:
    """The member folders (``member-0``, ``member-1``, ...) of an ensemble folder, in member order; [] if none."""
    found = [d for d in glob.glob(os.path.join(os.fspath(path), MEMBER_PREFIX + "*")) if os.path.isfile(os.path.join(d, CONFIG_NAME))]
    suffix = lambda d: os.path.basename(d)[len(MEMBER_PREFIX):]
    return sorted((d for d in found if suffix(d).isdigit()), key=lambda d: int(suffix(d)))


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _member_record(folder: str) -> dict[str, Any]:
    """What identifies a saved member: its mask seed, a digest of its config's content and of each weights file."""
    with open(os.path.join(folder, CONFIG_NAME), encoding="utf-8") as handle:
        config = json.load(handle)
    weights = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors") and os.path.isfile(os.path.join(folder, f)))
    return {
        "folder": os.path.basename(folder),
        "seed": config.get("seed"),
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "weights_sha256": {f: _file_digest(os.path.join(folder, f)) for f in weights},
    }


def record_ensemble(path: Union[str, os.PathLike], members: Optional[Sequence[Union[str, os.PathLike]]] = None) -> str:
    """Write ``ensemble.json`` (atomically) into an ensemble folder: its members' folder names, mask seeds and the
    digests of their configs and weights, so that loading refuses a member deleted or changed since. ``train_ensemble``
    writes it; call this for a folder written before it did, or after replacing a member on purpose.

    Example:
        >>> record_ensemble("out/ensemble")                  # records member-0 ... member-K-1 as they are now
        >>> InfluencePipeline("out/ensemble", tokenizer, train_dataset=train)   # refuses a member changed later
    """
    root = os.fspath(path)
    folders = [os.fspath(m) for m in members] if members is not None else _numbered_members(root)
    if not folders:
        raise TurnoverError(f"{root!r} holds no ensemble members ({MEMBER_PREFIX}0, {MEMBER_PREFIX}1, ...) to record.")
    records = []
    for folder in folders:
        if os.path.dirname(os.path.abspath(folder)) != os.path.abspath(root):
            raise TurnoverError(f"ensemble member {folder!r} is not a folder of {root!r}; members live inside it.")
        if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
            raise ConfigMismatchError(
                f"ensemble member {folder!r} has no {CONFIG_NAME}, so it is not a complete influence-ready model; "
                f"{_RETRAIN}, or remove the folder."
            )
        records.append(_member_record(folder))
    seeds = [r["seed"] for r in records]
    if len(set(map(str, seeds))) != len(seeds):
        raise ConfigMismatchError(f"the members of {root!r} share mask seeds ({seeds}); each member needs its own seed.")
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "members": records}
    target = os.path.join(root, MANIFEST_NAME)
    atomic_write_text(target, json.dumps(manifest, indent=2) + "\n")
    return target


def _numbered_members(root: str) -> list[str]:
    """Every ``member-<k>`` folder of ``root`` (complete or not), in member order."""
    found = [d for d in glob.glob(os.path.join(root, MEMBER_PREFIX + "*")) if os.path.isdir(d)]
    numbered = [d for d in found if os.path.basename(d)[len(MEMBER_PREFIX):].isdigit()]
    return sorted(numbered, key=lambda d: int(os.path.basename(d)[len(MEMBER_PREFIX):]))


def is_ensemble_folder(path: Union[str, os.PathLike]) -> bool:
    """A folder of ensemble members: it records them (``ensemble.json``) or holds ``member-<k>`` folders, and is not
    itself a checkpoint."""
    root = os.fspath(path)
    if os.path.isfile(os.path.join(root, CONFIG_NAME)):
        return False
    return os.path.isfile(os.path.join(root, MANIFEST_NAME)) or bool(_numbered_members(root))


def _read_manifest(root: str) -> Optional[list[dict[str, Any]]]:
    """The members ``ensemble.json`` records (None if the folder has none); refuses a damaged or newer file."""
    target = os.path.join(root, MANIFEST_NAME)
    if not os.path.isfile(target):
        return None
    try:
        with open(target, encoding="utf-8") as handle:
            manifest = json.load(handle)
        recorded = manifest["members"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(recorded, list) or not recorded:
            raise ValueError("not an ensemble record")
        for entry in recorded:
            str(entry["folder"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigMismatchError(
            f"{target} is damaged ({type(err).__name__}: {err}), so the ensemble's members cannot be checked. Restore "
            f"it, or record the members as they are now with turnover_hf.record_ensemble({root!r}) if you trust them."
        ) from err
    if manifest.get("version") != MANIFEST_VERSION:
        raise ConfigMismatchError(
            f"{target} is version {manifest.get('version')!r}; this turnover-hf reads version {MANIFEST_VERSION}. "
            "Upgrade turnover-hf."
        )
    return recorded


def _check_member(root: str, entry: dict[str, Any], names: list[str]) -> str:
    """The folder of the member ``entry`` of ``ensemble.json`` records, refused unless present and unchanged."""
    name = str(entry["folder"])
    folder = os.path.join(root, name)
    where = f"ensemble member {name!r} of {root!r}"
    if os.path.basename(name) != name or not os.path.isdir(folder):
        raise ConfigMismatchError(
            f"{where} is missing ({MANIFEST_NAME} records {len(names)} members: {names}); the ensemble would be "
            f"scored without it. Restore the folder, or {_RETRAIN}."
        )
    if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        raise ConfigMismatchError(
            f"{where} has no {CONFIG_NAME} (deleted?), so its masks cannot be re-created and the ensemble would be "
            f"scored without it. Restore the file from a copy of the ensemble, or {_RETRAIN}."
        )
    now = _member_record(folder)
    if now["seed"] != entry.get("seed"):
        raise ConfigMismatchError(
            f"{where} has mask seed {now['seed']!r} in its {CONFIG_NAME}, but the ensemble recorded seed "
            f"{entry.get('seed')!r}: its masks would not be the ones it was trained with. Restore the recorded seed in "
            f"{os.path.join(folder, CONFIG_NAME)}, or {_RETRAIN}."
        )
    if now["config_sha256"] != entry.get("config_sha256"):
        raise ConfigMismatchError(
            f"{where}: its {CONFIG_NAME} changed since the ensemble was trained, so its masks may not be the ones it "
            f"was trained with. Restore the file from a copy of the ensemble, or {_RETRAIN}."
        )
    recorded_weights = entry.get("weights_sha256") or {}
    changed = sorted(f for f in set(recorded_weights) | set(now["weights_sha256"])
                     if recorded_weights.get(f) != now["weights_sha256"].get(f))
    if changed:
        raise ConfigMismatchError(
            f"{where}: its weights changed since the ensemble was trained ({changed} differ from {MANIFEST_NAME}), "
            f"e.g. by further training saved into the folder; its scores would not be turn-over scores of the trained "
            f"member. Restore the member's files, or {_RETRAIN}. If you replaced the member on purpose with one "
            f"trained on its recorded seed, record it with turnover_hf.record_ensemble({root!r})."
        )
    return folder


def ensemble_members(path: Union[str, os.PathLike]) -> list[str]:
    """The member folders of an ensemble folder, after checking each is the member recorded in ``ensemble.json``:
    present, with its config, its mask seed and its weights unchanged. A folder written before the record existed
    is read from its ``member-<k>`` folders (numbered without gaps), with a warning.

    Example:
        >>> ensemble_members("out/ensemble")               # ['out/ensemble/member-0', ...] or a refusal
    """
    root = os.fspath(path)
    recorded = _read_manifest(root)
    if recorded is None:
        return _unrecorded_members(root)
    names = [str(entry["folder"]) for entry in recorded]
    folders = [_check_member(root, entry, names) for entry in recorded]
    extra = sorted({os.path.basename(d) for d in member_dirs(root)} - set(names))
    if extra:
        raise ConfigMismatchError(
            f"{root!r} holds member folders {extra} that its {MANIFEST_NAME} does not record ({names}). Remove them, or "
            f"record them as members with turnover_hf.record_ensemble({root!r})."
        )
    return folders


def _unrecorded_members(root: str) -> list[str]:
    """The members of an ensemble folder written before ``ensemble.json`` existed, refusing what shows damage."""
    numbered = _numbered_members(root)
    incomplete = [os.path.basename(d) for d in numbered if not os.path.isfile(os.path.join(d, CONFIG_NAME))]
    if incomplete:
        raise ConfigMismatchError(
            f"ensemble members {incomplete} of {root!r} have no {CONFIG_NAME}, so the ensemble would be scored "
            f"without them. Restore the files, or {_RETRAIN}; or remove those folders and record the rest with "
            f"turnover_hf.record_ensemble({root!r})."
        )
    numbers = [int(os.path.basename(d)[len(MEMBER_PREFIX):]) for d in numbered]
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
        raise ConfigMismatchError(
            f"ensemble {root!r} is missing members {[MEMBER_PREFIX + str(k) for k in missing]} (its members are "
            f"numbered from 0 without gaps), so it would be scored without them. Restore them, or {_RETRAIN}."
        )
    logger.warning(
        "ensemble %r records no member list (%s, which train_ensemble now writes): a member deleted or changed since training cannot be detected; scoring its %d member folders. Record them now with "
        "turnover_hf.record_ensemble(%r).", root, MANIFEST_NAME, len(numbered), root,
    )
    return numbered


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
    fingerprints = [(config.training_set or {}).get("fingerprint") for config in configs]
    for k, print_k in enumerate(fingerprints):
        if print_k and fingerprints[0] and print_k != fingerprints[0]:
            raise ConfigMismatchError(
                f"ensemble member {k} was trained on another training set than member 0 (fingerprints "
                f"{print_k[:12]} and {fingerprints[0][:12]}), so their scores name different rows: every member must be "
                "trained on the same training set (train_ensemble does this)."
            )
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
    recorded = {str(entry["folder"]): entry for entry in _read_manifest(root) or []}
    paths = []
    for k in range(num_members):
        member_config = TurnoverConfig.from_dict({**config.to_dict(), "seed": config.seed + k})
        folder = os.path.join(root, f"{MEMBER_PREFIX}{k}")
        paths.append(folder)
        if os.path.isfile(os.path.join(folder, CONFIG_NAME)):  # written last by a save: the member is complete
            _check_resumable(TurnoverConfig.from_pretrained(folder), member_config, folder, len(train_dataset))
            if os.path.basename(folder) in recorded:  # kept as recorded, never re-recorded with other weights
                _check_member(root, recorded[os.path.basename(folder)], list(recorded))
            logger.info("ensemble member %d is already trained in %s; keeping it.", k, folder)
            continue
        member_args = copy.copy(args)
        member_args.output_dir, member_args.seed = os.path.join(folder, "checkpoints"), args.seed + k
        model = patch_model(model_init(), member_config, freeze_leaking=freeze_leaking)
        trainer = trainer_class(model=model, args=member_args, train_dataset=train_dataset, **trainer_kwargs)
        trainer.train()
        trainer.save_model(folder)
        logger.info("ensemble member %d/%d saved to %s.", k + 1, num_members, folder)
        if getattr(args, "process_index", 0) == 0:
            record_ensemble(root, paths)  # after each member: an interrupted run leaves a consistent record
    if getattr(args, "process_index", 0) == 0:
        record_ensemble(root, paths)
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
    "InfluencePipeline(<its output_dir>, ...); or score this model with the influence function: "
    "estimator='influence' for a classifier (exact), estimator='projected' for a causal language model or many "
    "training examples (what estimator='auto' picks; docs/method/quality.md)."
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
