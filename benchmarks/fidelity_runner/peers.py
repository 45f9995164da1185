"""Row (g): peers scored on the same model as row (a), whatever the setting (gradient dot product, TracIn, the
Gauss-Newton influence function in-house and the library's, Captum, Kronfluence).

A setting describes how the peers see its models through :class:`PeerSetup`'s hooks (``Setting.peer_hooks``); a
new estimator on the library's patched model needs only ``library_model`` / ``library_batches`` /
``library_targets`` (see :func:`library_influence_rows`).
"""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

import turnover_hf as th
from turnover_hf import evaluation as ev
from turnover_hf.evaluation.peers import captum_version, kronfluence_version  # not re-exported by the package

from .core import Judge, Row, timed

# the exact library fit's row: the reference of the projected rows' paired mislabel-AUC comparison
EXACT_LIBRARY_ROW = "(g) Gauss-Newton influence, library InfluenceFunctionScorer (exact)"


def library_batches(
    inputs: dict[str, torch.Tensor], labels: torch.Tensor, ids: torch.Tensor, batch_size: int = 256
) -> list[dict[str, torch.Tensor]]:
    """Collated training batches (model inputs, labels, example_ids) for the library's estimators."""
    return [
        {**{k: v[s : s + batch_size] for k, v in inputs.items()}, "labels": labels[s : s + batch_size].long(),
         "example_ids": ids[s : s + batch_size]}
        for s in range(0, len(labels), batch_size)
    ]


def write_checkpoints(checkpoints: Sequence[Any], folder: str, steps_per_epoch: int) -> list[str]:
    """Trainer-style checkpoint folders (``checkpoint-{step}``) of in-memory snapshots, for Captum."""
    return [
        ev.save_trainer_checkpoint(
            folder, c.state_dict, step=steps_per_epoch * c.epoch, epoch=c.epoch, learning_rate=c.lr
        )
        for c in checkpoints
    ]


def captum_available() -> bool:
    return captum_version() is not None


def kronfluence_available() -> bool:
    return kronfluence_version() is not None


@dataclass
class PeerSetup:
    """How a setting exposes its models to the peer rows: runs A and B (clean) and run A on flipped labels.

    ``train_factors(model, checkpoint, noisy, masked)``: margin-gradient factors of the training set (flipped labels
    if ``noisy``; under the examples' masks if ``masked``) at the final weights or a checkpoint's.
    ``target_factors(model, checkpoint, part)``: the same for targets, on the full network. ``module(model)``: a
    context giving the ``nn.Module`` that Captum and Kronfluence see (final weights, this model's mask seed);
    ``train_rows(model, noisy)`` / ``target_rows(part)``: their datasets of ``(*inputs, label)`` tuples.
    """

    judge: Judge
    template: Row  # accuracy, accuracy cost and training time of run A, shared by every peer row
    a: Any
    b: Any
    noisy: Any
    targets: Any
    one_target: Any
    train_factors: Callable[[Any, Any, bool, bool], ev.MarginFactors]
    target_factors: Callable[[Any, Any, Any], ev.MarginFactors]
    module: Callable[[Any], Any]
    train_rows: Callable[[Any, bool], torch.utils.data.Dataset]
    target_rows: Callable[[Any], torch.utils.data.Dataset]
    captum_layers: list[str]
    captum_layers_label: str
    final_layer: str
    kronfluence_tracked: list[str] | None
    steps_per_epoch: int
    library_model: Callable[[Any], Any]  # a context giving the patched nn.Module the library's estimators score
    library_batches: Callable[[Any, bool], list[dict[str, torch.Tensor]]]  # its training batches (with example_ids)
    library_targets: Callable[[Any], dict[str, torch.Tensor]]  # the model inputs and labels of a target split
    train_ids: torch.Tensor

    def row(self, method: str) -> Row:
        return replace(self.template, method=method, extra={})

    def scored(
        self,
        method: str,
        score: Callable[[Any, Any], torch.Tensor],
        self_score: Callable[[Any], torch.Tensor],
    ) -> Row:
        """A row from ``score(model, part)`` (``(N, T)``) and ``self_score(noisy model)`` (``(N,)``), timed."""
        row = self.judge.fidelity(self.row(method), score(self.a, self.targets), score(self.b, self.targets))
        suspicion, row.self_seconds = timed(self_score, self.noisy)
        _, row.target_seconds = timed(score, self.a, self.one_target)
        return self.judge.mislabels(row, suspicion)


def gradient_peer_rows(
    p: PeerSetup, grad_dot_label: str, damping_factor: float, damping_factors: Sequence[float]
) -> list[Row]:
    """Gradient dot product, TracIn over the in-memory checkpoints, exact Gauss-Newton influence (in-house)."""

    def dot(model: Any, part: Any, checkpoint: Any = None) -> torch.Tensor:
        train, target = p.train_factors(model, checkpoint, False, True), p.target_factors(model, checkpoint, part)
        return ev.gradient_dot(train, target)

    def dot_self(model: Any, checkpoint: Any = None) -> torch.Tensor:
        # each example's masked training gradient against its own full-network loss gradient
        masked, full = p.train_factors(model, checkpoint, True, True), p.train_factors(model, checkpoint, True, False)
        return ev.gradient_dot(masked, full, paired=True)

    def influence(model: Any, part: Any, factor: float = damping_factor) -> torch.Tensor:
        train, target = p.train_factors(model, None, False, True), p.target_factors(model, None, part)
        return ev.gauss_newton_influence(train, target, factor)

    def influence_self(model: Any) -> torch.Tensor:
        masked, full = p.train_factors(model, None, True, True), p.train_factors(model, None, True, False)
        return ev.gauss_newton_influence(masked, full, damping_factor, paired=True)

    epochs = ", ".join(str(c.epoch) for c in p.a.checkpoints)
    rows = [
        p.scored(grad_dot_label, dot, dot_self),
        p.scored(
            f"(g) TracInCP in-house, {len(p.a.checkpoints)} checkpoints (epochs {epochs})",
            lambda m, part: sum(c.lr * dot(m, part, c) for c in m.checkpoints),
            lambda m: sum(c.lr * dot_self(m, c) for c in m.checkpoints),
        ),
        p.scored(f"(g) Gauss-Newton influence, damping {damping_factor:g} x mean eigenvalue", influence, influence_self),
    ]
    sweep = sorted(set(damping_factors) | {damping_factor})
    rows[-1].extra["lds_by_damping_factor"] = {
        str(f): ev.lds(influence(p.a, p.targets, f), p.judge.subsets, p.judge.gt) for f in sweep
    }
    return rows


def _library_row(p: PeerSetup, method: str, fitted: Callable[[Any, Any, bool], Any]) -> tuple[Row, torch.Tensor]:
    """A row of a library estimator fitted by ``fitted(module, model, noisy)`` (the fit is the setup, counted in both
    timing columns and once end to end, as for Kronfluence), and run A's scores of the targets."""
    fit_seconds: dict[int, float] = {}
    kept: dict[int, torch.Tensor] = {}

    def score(model: Any, part: Any) -> torch.Tensor:
        with p.library_model(model) as module:
            scorer, fit_seconds[id(model)] = timed(fitted, module, model, False)
            target = p.library_targets(part)
            scores = scorer.scores({k: v for k, v in target.items() if k != "labels"}, target["labels"], p.train_ids)
        if part is p.targets:
            kept[id(model)] = scores
        return scores

    def self_score(model: Any) -> torch.Tensor:
        with p.library_model(model) as module:
            scorer = fitted(module, model, True)
            return torch.cat([scorer.self_scores(b, b["labels"], b["example_ids"]) for b in p.library_batches(model, True)])

    row = p.scored(method, score, self_score)
    row.setup_seconds = row.extra["fit_seconds"] = fit_seconds[id(p.a)]
    return row, kept[id(p.a)]


def _pearson_per_target(scores: torch.Tensor, reference: torch.Tensor) -> float:
    centred = [x - x.mean(0) for x in (scores.double(), reference.double())]
    return float(((centred[0] * centred[1]).sum(0) / (centred[0].norm(dim=0) * centred[1].norm(dim=0))).mean())


def library_influence_rows(p: PeerSetup, damping_factor: float, projections: Sequence[int]) -> list[Row]:
    """``turnover_hf.InfluenceFunctionScorer`` on the patched model: exact, then with each CountSketch projection.

    A fit per model (clean runs A and B, and the flipped labels for self-influence) is the setup. Each row records
    its largest difference from the in-house factorised Gauss-Newton influence (the same definition) and, when
    sketched, its per-target Pearson correlation with the exact library scores.
    """
    in_house = ev.gauss_newton_influence(
        p.train_factors(p.a, None, False, True), p.target_factors(p.a, None, p.targets), damping_factor
    )
    rows, exact = [], None
    for dim in (None, *projections):
        def fitted(module: Any, model: Any, noisy: bool, dim: int | None = dim) -> th.InfluenceFunctionScorer:
            scorer = th.InfluenceFunctionScorer(module, p.library_batches(model, noisy), damping_factor=damping_factor,
                                                sketch_dim=dim, show_progress=False)
            return scorer.fit()

        what = "exact" if dim is None else f"CountSketch d={dim}"
        row, scores_a = _library_row(p, EXACT_LIBRARY_ROW if dim is None else
                                     f"(g) Gauss-Newton influence, library InfluenceFunctionScorer ({what})", fitted)
        row.extra["max_abs_difference_vs_in_house"] = float((scores_a - in_house).abs().max())
        row.extra["max_abs_in_house"] = float(in_house.abs().max())
        if dim is None:
            exact = scores_a
        elif exact is not None:
            row.extra["pearson_vs_exact_library_per_target_mean"] = _pearson_per_target(scores_a, exact)
        rows.append(row)
    return rows


def library_projected_rows(p: PeerSetup, damping_factor: float, variants: Sequence[dict[str, Any]]) -> list[Row]:
    """``turnover_hf.ProjectedInfluenceScorer`` (estimator "projected") on the patched model, one row per variant
    (its options; ``damping_factor`` defaults to the setting's). ``"damping_rule": "absolute"`` rescales the factor so
    that ``lambda = factor x trace / D`` (the exact fit's lambda: the rejected rule) instead of the library's
    ``trace / k`` (the same multiple of the projected matrix's mean eigenvalue). Each row records its per-target Pearson
    correlation with the exact library scores at the same damping factor and its fit time (the setup)."""
    rows: list[Row] = []
    references: dict[float, torch.Tensor] = {}
    for variant in variants:
        options = {"damping_factor": damping_factor, **variant}
        absolute = options.pop("damping_rule", "relative") == "absolute"

        def fitted(module: Any, model: Any, noisy: bool, options: dict = options, absolute: bool = absolute) -> Any:
            scorer = th.ProjectedInfluenceScorer(module, show_progress=False, **options)
            if absolute:  # lambda = factor x trace / D, written as the library rule's factor
                scorer = th.ProjectedInfluenceScorer(module, show_progress=False, **{
                    **options, "damping_factor": options["damping_factor"] * scorer.dim / scorer.num_parameters})
            return scorer.fit(p.library_batches(model, noisy))

        what = ", ".join(f"{k}={v}" for k, v in variant.items())
        row, scores_a = _library_row(p, f"(g) Gauss-Newton influence, library ProjectedInfluenceScorer ({what})", fitted)
        factor = options["damping_factor"]
        if factor not in references:  # the exact library scores at this damping, fitted once for every variant
            with p.library_model(p.a) as module:
                exact = th.InfluenceFunctionScorer(module, p.library_batches(p.a, False), damping_factor=factor,
                                                   show_progress=False).fit()
                target = p.library_targets(p.targets)
                references[factor] = exact.scores({k: v for k, v in target.items() if k != "labels"},
                                                  target["labels"], p.train_ids)
        row.extra["pearson_vs_exact_library_per_target_mean"] = _pearson_per_target(scores_a, references[factor])
        exact_suspicion = p.judge.suspicions.get(EXACT_LIBRARY_ROW)
        if exact_suspicion is not None and factor == damping_factor:  # paired bootstrap against the exact fit's AUC
            row.extra["mislabel_auc_vs_exact"] = ev.auc_difference(
                p.judge.suspicions[row.method], exact_suspicion, p.judge.flipped)
        rows.append(row)
    return rows


def captum_peer_rows(p: PeerSetup) -> list[Row]:
    """Captum's TracInCP (trainable layers) and TracInCPFast (last layer) over Trainer-style checkpoint folders."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths, write_seconds = {}, 0.0
        for name, model in (("a", p.a), ("b", p.b), ("noisy", p.noisy)):
            paths[id(model)], seconds = timed(
                write_checkpoints, model.checkpoints, os.path.join(folder, name), p.steps_per_epoch
            )
            write_seconds = seconds if model is p.a else write_seconds
        for label, kwargs in (
            (f"TracInCP ({p.captum_layers_label})", {"layers": p.captum_layers}),
            (f"TracInCPFast ({p.final_layer})", {"final_layer": p.final_layer}),
        ):

            def score(model: Any, part: Any, kw: dict = kwargs) -> torch.Tensor:
                with p.module(model) as module:
                    train, targets = p.train_rows(model, False), p.target_rows(part)
                    return ev.captum_tracin(module, train, paths[id(model)], targets, **kw)

            def self_score(model: Any, kw: dict = kwargs) -> torch.Tensor:
                with p.module(model) as module:
                    return ev.captum_tracin(module, p.train_rows(model, True), paths[id(model)], None, **kw)

            row = p.scored(f"(g) Captum {label}, {len(p.a.checkpoints)} Trainer checkpoints", score, self_score)
            row.train_seconds = (row.train_seconds or 0.0) + write_seconds  # a Trainer writes them while training
            rows.append(row)
    return rows


def kronfluence_peer_row(p: PeerSetup) -> Row:
    """Kronfluence's EK-FAC influence: factors fitted once per model (the setup), then pairwise or self scores.

    Kronfluence calls ``gc.collect()`` several times per fit and scoring; in this process, which holds hundreds of
    trained models, each call would cost far more than in a user's process. The objects alive before Kronfluence
    starts are therefore frozen out of the collector (``gc.freeze``) while it runs.
    """
    _, gc_before = timed(gc.collect)
    gc.freeze()
    try:
        row = _kronfluence_row(p)
    finally:
        gc.unfreeze()
    row.extra["one_gc_collect_seconds_unfrozen"] = gc_before
    return row


def _kronfluence_row(p: PeerSetup) -> Row:
    _, gc_seconds = timed(gc.collect)

    def fit(model: Any, noisy: bool) -> ev.KronfluenceEKFAC:
        with p.module(model) as module:
            return ev.KronfluenceEKFAC(module, p.train_rows(model, noisy), tracked=p.kronfluence_tracked)

    fitted_a, setup = timed(fit, p.a, False)
    fitted_b = fit(p.b, False)
    row = p.judge.fidelity(
        p.row("(g) Kronfluence EK-FAC influence, damping 0.1 x mean eigenvalue"),
        fitted_a.scores(p.target_rows(p.targets)),
        fitted_b.scores(p.target_rows(p.targets)),
    )
    suspicion, row.self_seconds = timed(lambda: fit(p.noisy, True).self_scores())
    _, scoring = timed(fitted_a.scores, p.target_rows(p.one_target))
    row.setup_seconds, row.target_seconds = setup, setup + scoring
    row.extra["one_gc_collect_seconds"] = gc_seconds
    for fitted in (fitted_a, fitted_b):
        fitted.close()
    return p.judge.mislabels(row, suspicion)


def peer_rows(p: PeerSetup, settings: Any, grad_dot_label: str, log: Callable[[str], None]) -> list[Row]:
    """Every peer row of a setting: in-house gradient methods, then Captum and Kronfluence when installed."""
    log("(g) peers: gradient dot, TracIn, Gauss-Newton influence ...")
    rows = gradient_peer_rows(p, grad_dot_label, settings.damping_factor, settings.damping_factors)
    log("(g) library InfluenceFunctionScorer (exact and CountSketch) ...")
    rows.extend(library_influence_rows(p, settings.damping_factor, settings.influence_projections))
    log("(g) library ProjectedInfluenceScorer ...")
    rows.extend(library_projected_rows(p, settings.damping_factor, settings.projected_variants))
    if "captum" in settings.peers and captum_available():
        log("(g) Captum TracInCP / TracInCPFast over Trainer-style checkpoints ...")
        rows[2:2] = captum_peer_rows(p)  # beside the in-house TracIn row
    else:
        log("(g) Captum is not installed (or not selected): its rows are skipped.")
    if "kronfluence" in settings.peers and kronfluence_available():
        log("(g) Kronfluence EK-FAC ...")
        rows.append(kronfluence_peer_row(p))
    else:
        log("(g) Kronfluence is not installed (or not selected): its row is skipped.")
    return [row.finish() for row in rows]
