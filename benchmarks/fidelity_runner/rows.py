"""The fidelity runner: one skeleton of rows (a)-(g) for every setting, judged against the same ground truths.

Row (a), the single model, always runs first: every other row compares with or reuses it. The other rows come in
named groups (:data:`ROW_GROUPS`, filled with :func:`row_group`), run in the order a setting's ``row_groups``
lists them. A new method (say a streaming influence estimator) is one function ``(run: Run) -> list[Row]``
registered under a new name and added to the ``row_groups`` of the settings that can run it; a new setting (say a
causal LM) is a :class:`~fidelity_runner.core.Setting` subclass. Neither copies this skeleton.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from turnover_hf.evaluation import explained_variance, lds, linear_residuals, mislabel_detection
from turnover_hf.evaluation.peers import captum_version, kronfluence_version

from .core import (
    CLEANSING_SEED,
    GROUND_TRUTH_SEED,
    LOO_SEED,
    REPLICATE_SEED,
    Judge,
    Model,
    Part,
    Pool,
    Row,
    Setting,
    Variant,
    checkpoint_epochs,
    ground_truth,
    paired_sem,
    timed,
)
from .peers import PeerSetup, peer_rows


@dataclass
class Run:
    """One run of a setting: the ground truths, the model pool and the single model (a) the other rows reuse."""

    setting: Setting
    judge: Judge
    pool: Pool
    checkpoint_epochs: list[int]
    log: Callable[[str], None]
    model_a: Model = None
    model_b: Model = None
    noisy_a: Model = None
    scores_a: torch.Tensor | None = None
    scores_b: torch.Tensor | None = None
    self_a: torch.Tensor | None = None
    row_a: Row | None = None
    target_scores: dict[int, torch.Tensor] = field(default_factory=dict)  # base-variant members by seed

    def on_model_a(self, row: Row) -> Row:
        """Rows that score model (a) share its accuracy, its accuracy cost and its training time."""
        a = self.row_a
        row.accuracy, row.accuracy_cost, row.train_seconds = a.accuracy, a.accuracy_cost, a.train_seconds
        return row

    def member_scores(self, model: Model, part: Part) -> torch.Tensor:
        """Base-variant scores of one seed's model; on the targets computed once (ensembles of several sizes and
        rows (a) / (b) share members)."""
        setting = self.setting
        if part is not setting.targets:
            return setting.scores(setting.base, model, part)
        if model.init_seed not in self.target_scores:
            self.target_scores[model.init_seed] = setting.scores(setting.base, model, part)
        return self.target_scores[model.init_seed]

    def one_model_row(self, variant: Variant, name: str, how: str = "mask") -> Row:
        """A single turn-over model of a variant (runs A, B and A on flipped labels), scored like (a)."""
        setting, pool, judge = self.setting, self.pool, self.judge
        a, b, noisy = pool.get(variant, 0), pool.get(variant, 1), pool.get(variant, 0, noisy=True)
        gap = checked(setting, variant, a, name)
        row = judge.fidelity(
            Row(name),
            setting.scores(variant, a, setting.targets, how),
            setting.scores(variant, b, setting.targets, how),
        )
        suspicion, row.self_seconds = timed(setting.self_scores, variant, noisy, how)
        _, row.target_seconds = timed(setting.scores, variant, a, setting.one_target, how)
        row.accuracy, row.train_seconds = setting.accuracy(variant, a), a.seconds
        row.accuracy_cost = pool.accuracy_cost(variant, [0], row.accuracy)
        row.extra[setting.gap_key] = gap
        return judge.mislabels(row, suspicion).finish()


def checked(setting: Setting, variant: Variant, model: Model, name: str) -> float:
    """:meth:`Setting.check`, raising when the setting's scores are not the library's."""
    gap = setting.check(variant, model)
    if gap > 1e-4:
        raise RuntimeError(f"turn-over scores of {name!r} disagree with the library's by {gap:.3g}.")
    return gap


ROW_GROUPS: dict[str, Callable[[Run], list[Row]]] = {}


def row_group(name: str) -> Callable[[Callable[[Run], list[Row]]], Callable[[Run], list[Row]]]:
    """Decorator: register a function ``(run) -> rows`` as the row group ``name`` (listed in ``Setting.row_groups``)."""

    def register(fn: Callable[[Run], list[Row]]) -> Callable[[Run], list[Row]]:
        ROW_GROUPS[name] = fn
        return fn

    return register


def single_model(run: Run) -> list[Row]:
    """(a) single-model turn-over, and the check that its scores are the library's definition."""
    setting, pool, judge = run.setting, run.pool, run.judge
    base = setting.base
    name = f"(a) turn-over, single model, {setting.label(base)}"
    run.log("(a) single-model turn-over ...")
    run.model_a = pool.get(base, 0, checkpoint_epochs=run.checkpoint_epochs)
    run.model_b = pool.get(base, 1, checkpoint_epochs=run.checkpoint_epochs)
    run.noisy_a = pool.get(base, 0, noisy=True, checkpoint_epochs=run.checkpoint_epochs)
    gap = checked(setting, base, run.model_a, name)
    run.scores_a = run.member_scores(run.model_a, setting.targets)
    run.scores_b = run.member_scores(run.model_b, setting.targets)
    row = run.row_a = judge.fidelity(Row(name), run.scores_a, run.scores_b)
    run.self_a, row.self_seconds = timed(setting.self_scores, base, run.noisy_a)
    _, row.target_seconds = timed(setting.scores, base, run.model_a, setting.one_target)
    row.accuracy, row.train_seconds = setting.accuracy(base, run.model_a), run.model_a.seconds
    row.accuracy_cost = pool.accuracy_cost(base, [0], row.accuracy)
    row.extra[setting.gap_key] = gap
    # The direction of self-influence for mislabels, both ways, so the choice is visible.
    row.extra["mislabel_low_is_suspicious"] = mislabel_detection(run.self_a, judge.flipped, low_is_suspicious=True)
    row.extra["mislabel_high_is_suspicious"] = mislabel_detection(run.self_a, judge.flipped, low_is_suspicious=False)
    row.extra.update(setting.single_model_extra(run.model_a))
    return [judge.mislabels(row, run.self_a).finish()]


@row_group("b")
def ensembles(run: Run) -> list[Row]:
    """(b) seed ensembles: two disjoint ensembles of K models for agreement; mislabels from one ensemble."""
    setting, pool, judge = run.setting, run.pool, run.judge
    base = setting.base

    def ensemble_scores(models: list[Model], part: Part) -> torch.Tensor:
        return torch.stack([run.member_scores(m, part) for m in models]).mean(0)

    def ensemble_self(models: list[Model]) -> torch.Tensor:
        return torch.stack([setting.self_scores(base, m) for m in models]).mean(0)

    rows = []
    for k in setting.settings.ensembles:
        run.log(f"(b) ensemble of {k} ...")
        first, second = pool.many(base, range(k)), pool.many(base, range(k, 2 * k))
        row = judge.fidelity(
            Row(f"(b) turn-over, seed ensemble K={k}"), ensemble_scores(first, setting.targets),
            ensemble_scores(second, setting.targets),
        )
        suspicion, row.self_seconds = timed(ensemble_self, pool.many(base, range(k), noisy=True))
        _, row.target_seconds = timed(ensemble_scores, first, setting.one_target)
        members = [setting.accuracy(base, m) for m in first]
        row.accuracy = float(np.mean(members))
        row.accuracy_cost = pool.accuracy_cost(base, range(k), row.accuracy)
        row.extra["accuracy_cost_sem"] = paired_sem(pool.plain_accuracies(base, range(k)), members)
        row.train_seconds = float(sum(m.seconds for m in first))
        row.extra.update(setting.ensemble_extra(first))
        rows.append(judge.mislabels(row, suspicion).finish())
    return rows


@row_group("c")
def wider(run: Run) -> list[Row]:
    """(c) wider masked layers: the setting's wider variants, each scored like (a)."""
    rows = []
    for variant, name in run.setting.wider():
        run.log(f"{name} ...")
        rows.append(run.one_model_row(variant, name))
    return rows


@row_group("d")
def mask_bit_residuals(run: Run) -> list[Row]:
    """(d) residuals after regressing each target's scores on the examples' centred mask bits (model (a))."""
    setting, judge = run.setting, run.judge
    run.log("(d) mask-bit regression ...")
    bits = setting.mask_bits
    res_a, res_b = linear_residuals(run.scores_a, bits(run.model_a)), linear_residuals(run.scores_b, bits(run.model_b))
    row = judge.fidelity(
        Row(f"(d) turn-over {setting.label(setting.base)}, mask-bit regression residuals"),
        torch.from_numpy(res_a),
        torch.from_numpy(res_b),
    )
    row.extra["r2_per_target_mean"] = float(np.nanmean(explained_variance(run.scores_a, res_a)))
    row.extra["lds_of_fitted_part"] = lds(run.scores_a.double().numpy() - res_a, judge.subsets, judge.gt)
    suspicion, row.self_seconds = timed(lambda: linear_residuals(run.self_a, bits(run.noisy_a))[:, 0])
    row.self_seconds += run.row_a.self_seconds
    _, row.target_seconds = timed(linear_residuals, run.scores_a[:, :1], bits(run.model_a))
    row.target_seconds += run.row_a.target_seconds
    run.on_model_a(row)
    return [judge.mislabels(row, torch.from_numpy(suspicion)).finish()]


@row_group("e")
def references(run: Run) -> list[Row]:
    """(e) another reference than the example's own mask (the full network; the mirror image), model (a)."""
    setting, judge, base = run.setting, run.judge, run.setting.base
    rows = []
    for reference, label in setting.references:
        run.log(f"(e) {label} ...")
        row = judge.fidelity(
            Row(f"(e) turn-over {setting.label(base)}, {label}"),
            setting.scores(base, run.model_a, setting.targets, reference),
            setting.scores(base, run.model_b, setting.targets, reference),
        )
        suspicion, row.self_seconds = timed(setting.self_scores, base, run.noisy_a, reference)
        _, row.target_seconds = timed(setting.scores, base, run.model_a, setting.one_target, reference)
        run.on_model_a(row)
        rows.append(judge.mislabels(row, suspicion).finish())
    return rows


@row_group("f")
def channels(run: Run) -> list[Row]:
    """(f) K parallel masked channels in one model: the setting's channel variants, each scored like (a)."""
    rows = []
    for variant, name, how in run.setting.channel_rows():
        run.log(f"{name} ...")
        rows.append(run.one_model_row(variant, name, how))
    return rows


@row_group("g")
def peers(run: Run) -> list[Row]:
    """(g) peers on the same model as (a)."""
    setting, a = run.setting, run.row_a
    p = PeerSetup(
        run.judge,
        Row("", accuracy=a.accuracy, accuracy_cost=a.accuracy_cost, train_seconds=a.train_seconds),
        run.model_a,
        run.model_b,
        run.noisy_a,
        setting.targets,
        setting.one_target,
        steps_per_epoch=-(-setting.n_train // setting.settings.batch_size),
        train_ids=setting.train_ids,
        **setting.peer_hooks(run.model_a),
    )
    return peer_rows(p, setting.settings, setting.grad_dot_label, run.log)


@row_group("loss")
def training_loss(run: Run) -> list[Row]:
    """The training loss of model (a) on the flipped labels: a mislabel detector only."""
    row = Row("(g) training loss (mislabels only)")
    loss_noisy, row.self_seconds = timed(run.setting.training_losses, run.noisy_a)
    row.accuracy, row.train_seconds = run.row_a.accuracy, run.row_a.train_seconds
    return [run.judge.mislabels(row, loss_noisy, low_is_suspicious=False)]


def run(setting: Setting, log: Callable[[str], None] = print, groups: Sequence[str] | None = None) -> dict[str, Any]:
    """Train everything, score every row group of the setting (or only ``groups`` of them, after row (a)), and return
    the rows plus diagnostics (JSON-ready)."""
    unknown = sorted(set(groups or ()) - set(setting.row_groups))
    if unknown:
        raise ValueError(f"row groups {unknown} are not in the {setting.name} setting; it has {list(setting.row_groups)}.")
    started = time.perf_counter()
    settings = setting.settings
    epochs = checkpoint_epochs(settings.epochs, settings.tracin_checkpoints)
    current = Run(setting, ground_truth(setting, log), Pool(setting), epochs, log)
    rows = single_model(current)  # every other row compares with or reuses model (a)
    for name in setting.row_groups:
        if groups is None or name in groups:
            rows.extend(ROW_GROUPS[name](current))
    return {**results_dict(setting, current.judge, epochs, rows, started), **setting.results_extra()}


def results_dict(
    setting: Setting, judge: Judge, ckpt_epochs: Sequence[int], rows: list[Row], started: float
) -> dict[str, Any]:
    """The JSON-ready results of one run."""
    return {
        "setting": setting.name,
        "settings": asdict(setting.settings),
        "ground_truth": {
            **judge.summary(),
            "recipe": asdict(setting.recipe),
            "seeds": (
                f"subsets {GROUND_TRUTH_SEED}+s and {REPLICATE_SEED}+s, leave-one-out {LOO_SEED}+s, cleansing "
                f"{CLEANSING_SEED}+s (weights, batch order and masks); scored models use seeds below "
                f"{GROUND_TRUTH_SEED}"
            ),
        },
        "tracin_checkpoint_epochs": list(ckpt_epochs),
        "kronfluence": kronfluence_version(),
        "captum": captum_version(),
        "rows": [asdict(r) for r in rows],
        "seconds_total": time.perf_counter() - started,
    }
