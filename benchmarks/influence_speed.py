"""Speed of the library's influence function against Kronfluence (EK-FAC), on the fidelity benchmark's models.

For both settings of ``benchmarks/fidelity.py`` (``head``: a 384 -> 128 -> 2 head on frozen MiniLM features;
``adapters``: a bottleneck adapter in MiniLM's top layer on cached lower-layer outputs; both take the factorised
fit, as the cached top layer sees one row per example), this script trains the single scored model once (run A of
the fidelity benchmark, with its data, recipe and seed; everything is imported from ``benchmarks/fidelity.py``)
and then times, in the same process and interleaved repeat by repeat:

* library (``turnover_hf.InfluenceFunctionScorer``, exact): the fit (its factorisation comes with the first
  scoring); fit + the scores of all N training examples against one target; fit + self-influence of all N
  (``self_scores`` over the training batches of 256, as the fidelity benchmark calls it); end to end = fit + one
  target + self-influence on one scorer. The one-target and self-influence columns use a fresh fit each, so no
  work is shared between them;
* Kronfluence (``turnover_hf.evaluation.peers.KronfluenceEKFAC``, as the fidelity benchmark runs it): the factors
  (the fit), fit + pairwise scores of all N against one target, fit + self-influence of all N, end to end = the
  fit once plus both scorings.

Medians of ``--repeats`` (default 3); the order library / Kronfluence alternates between repeats so drift of a
shared machine favours neither. The library's scores are checked against the in-house Gauss-Newton influence of
``turnover_hf.evaluation.peers`` (the same definition), as in the fidelity benchmark. Times are printed, never
asserted.

Run from the repository root (one torch thread, as the fidelity benchmark; about 3 minutes after the caches of
``benchmarks/results/cache`` exist):

    PYTHONPATH=. python benchmarks/influence_speed.py                    # both settings
    PYTHONPATH=. python benchmarks/influence_speed.py --setting head     # one setting

It prints a Markdown table and writes ``benchmarks/results/influence_speed.{json,md}`` (atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity  # noqa: E402  (the fidelity benchmark's data, models and peers)

import turnover_hf as th  # noqa: E402
from turnover_hf.evaluation import patched_classifier  # noqa: E402
from turnover_hf.evaluation.peers import KronfluenceEKFAC, MarginFactors, gauss_newton_influence  # noqa: E402
from turnover_hf.files import atomic_write_text  # noqa: E402

RESULTS_STEM = fidelity.RESULTS_DIR / "influence_speed"
SETTINGS = ("head", "adapters")
COLUMNS = (
    ("fit", "fit"),
    ("one_target", "fit + 1 target vs all N"),
    ("self", "fit + self-influence of all N"),
    ("end_to_end", "end to end (fit + 1 target + self)"),
)


@dataclass
class Case:
    """One trained model as both estimators see it (the fidelity benchmark's run A of a setting)."""

    setting: str
    description: str
    library_model: Callable[[], ContextManager[nn.Module]]  # the patched model the library scores
    train_batches: list[dict[str, torch.Tensor]]  # collated training batches with example_ids
    target_inputs: dict[str, torch.Tensor]  # model inputs of the one target
    target_labels: torch.Tensor
    train_ids: torch.Tensor
    kronfluence_model: Callable[[], ContextManager[nn.Module]]  # the module Kronfluence sees
    kronfluence_train_rows: torch.utils.data.Dataset
    kronfluence_target_rows: torch.utils.data.Dataset
    kronfluence_tracked: list[str] | None
    train_factors: Callable[[bool], MarginFactors]  # in-house factors of the training set (own masks if True)
    target_factors: Callable[[], MarginFactors]  # in-house factors of the one target (full network)
    damping_factor: float


def head_case() -> Case:
    """The head setting: frozen MiniLM features, a 384 -> 128 -> 2 head with turn-over masks on its hidden units."""
    settings = fidelity.Settings()
    data = fidelity.load_data(settings.n_train, settings.n_targets, settings.n_test, settings.noise,
                              settings.data_seed, full_cache=True)
    settings = replace(settings, in_features=int(data.train.features.shape[1]))
    trained = fidelity.ModelPool(data).get(settings.recipe(), 0)
    train, target = data.train, fidelity.Split(data.targets.features[:1], data.targets.labels[:1], data.targets.ids[:1])
    masks = trained.masks(train.ids)
    ones = torch.ones(1, settings.recipe().channels, settings.width)  # targets run on the full network
    return Case(
        setting="head",
        description=f"head {settings.in_features} -> {settings.width} -> 2 on frozen MiniLM features, N = {len(train)}",
        library_model=lambda: contextlib.nullcontext(patched_classifier(trained.head, trained.mask_seed).eval()),
        train_batches=fidelity.library_batches({"features": train.features}, train.labels, train.ids),
        target_inputs={"features": target.features},
        target_labels=target.labels,
        train_ids=train.ids,
        kronfluence_model=lambda: contextlib.nullcontext(trained.head),
        kronfluence_train_rows=fidelity.head_rows(train.features, masks, train.labels),
        kronfluence_target_rows=fidelity.head_rows(target.features, ones, target.labels),
        kronfluence_tracked=None,
        train_factors=lambda masked: fidelity.head_factors(trained.head, train.features, train.labels,
                                                            masks if masked else None),
        target_factors=lambda: fidelity.head_factors(trained.head, target.features, target.labels, None),
        damping_factor=settings.damping_factor,
    )


def adapter_case() -> Case:
    """The adapter setting: a bottleneck adapter in MiniLM's top layer, trained on cached lower-layer outputs."""
    settings = fidelity.AdapterSettings(library_timing=False)
    data = fidelity.load_adapter_data(settings, full_cache=True)
    top = data.model_and_top(settings.reduction_factor)[1]
    trained = fidelity.TopPool(data).get(settings.reduction_factor, settings.recipe(), 0)
    train, target = data.train, data.targets.select([0])

    def factors(part: Any, masked: bool) -> MarginFactors:
        with trained.active(top):
            return fidelity.top_factors(top, part, masked)

    return Case(
        setting="adapters",
        description=(f"adapter of {fidelity.adapter_units(top)} units in MiniLM's top layer + classifier, "
                     f"N = {len(train)}"),
        library_model=lambda: trained.active(top),
        train_batches=fidelity.library_batches({"hidden": train.hidden, "residual": train.residual}, train.labels,
                                               train.example_ids),
        target_inputs={"hidden": target.hidden, "residual": target.residual},
        target_labels=target.labels,
        train_ids=train.example_ids,
        kronfluence_model=lambda: trained.active(top),
        kronfluence_train_rows=fidelity.top_rows(train, True),
        kronfluence_target_rows=fidelity.top_rows(target, False),
        kronfluence_tracked=fidelity.top_layer_names(top),
        train_factors=lambda masked: factors(train, masked),
        target_factors=lambda: factors(target, False),
        damping_factor=settings.damping_factor,
    )


def _seconds(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


class LibraryRuns:
    """The library's timed runs on a case; keeps the scores of the last repeat for the exactness check."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.scores: torch.Tensor | None = None
        self.self_scores: torch.Tensor | None = None

    def _fitted(self, module: nn.Module) -> th.InfluenceFunctionScorer:
        scorer = th.InfluenceFunctionScorer(module, self.case.train_batches, damping_factor=self.case.damping_factor,
                                            show_progress=False)
        return scorer.fit()

    def _one_target(self, scorer: th.InfluenceFunctionScorer) -> torch.Tensor:
        return scorer.scores(self.case.target_inputs, self.case.target_labels, self.case.train_ids)

    def _self_influence(self, scorer: th.InfluenceFunctionScorer) -> torch.Tensor:
        return torch.cat([scorer.self_scores(b, b["labels"], b["example_ids"]) for b in self.case.train_batches])

    def run(self) -> dict[str, float]:
        """One repeat: fit + one target and fit + self-influence on fresh fits, then all three on one fit."""
        out: dict[str, float] = {}
        with self.case.library_model() as module:
            # the model copy / weight swap of library_model is outside the timings, as for Kronfluence
            for column, score in (("one_target", self._one_target), ("self", self._self_influence)):
                scorer, fit_seconds = _seconds(lambda: self._fitted(module))
                _, score_seconds = _seconds(lambda: score(scorer))
                out[column] = fit_seconds + score_seconds
                del scorer
            scorer, out["fit"] = _seconds(lambda: self._fitted(module))
            self.scores, target_seconds = _seconds(lambda: self._one_target(scorer))
            self.self_scores, self_seconds = _seconds(lambda: self._self_influence(scorer))
            out["end_to_end"] = out["fit"] + target_seconds + self_seconds
        return out


class KronfluenceRuns:
    """Kronfluence's timed runs on a case: the factors once per repeat, then pairwise and self scores."""

    def __init__(self, case: Case) -> None:
        self.case = case

    def run(self) -> dict[str, float]:
        with self.case.kronfluence_model() as module:
            fitted, fit_seconds = _seconds(lambda: KronfluenceEKFAC(module, self.case.kronfluence_train_rows,
                                                                    tracked=self.case.kronfluence_tracked))
            try:
                _, target_seconds = _seconds(lambda: fitted.scores(self.case.kronfluence_target_rows))
                _, self_seconds = _seconds(fitted.self_scores)
            finally:
                fitted.close()
        return {"fit": fit_seconds, "one_target": fit_seconds + target_seconds, "self": fit_seconds + self_seconds,
                "end_to_end": fit_seconds + target_seconds + self_seconds}


def kronfluence_installed() -> bool:
    try:
        import kronfluence  # noqa: F401
    except ImportError:
        return False
    return True


def exactness(case: Case, library: LibraryRuns) -> dict[str, float]:
    """Largest differences of the library's scores from the in-house Gauss-Newton influence (same definition)."""
    masked = case.train_factors(True)
    in_house = gauss_newton_influence(masked, case.target_factors(), case.damping_factor)[:, 0]
    in_house_self = gauss_newton_influence(masked, case.train_factors(False), case.damping_factor, paired=True)
    return {
        "one_target_max_abs_difference": float((library.scores[:, 0] - in_house).abs().max()),
        "one_target_max_abs_in_house": float(in_house.abs().max()),
        "self_max_abs_difference": float((library.self_scores - in_house_self).abs().max()),
        "self_max_abs_in_house": float(in_house_self.abs().max()),
    }


def measure(case: Case, repeats: int, with_kronfluence: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Interleaved repeats of both estimators on ``case``; medians, ratios and the exactness check."""
    runners: dict[str, Any] = {"library": LibraryRuns(case)}
    if with_kronfluence:
        runners["kronfluence"] = KronfluenceRuns(case)
    times: dict[str, dict[str, list[float]]] = {name: {c: [] for c, _ in COLUMNS} for name in runners}
    gc.collect()
    gc.freeze()  # Kronfluence calls gc.collect() often; both estimators run with the same frozen heap
    try:
        for repeat in range(repeats):
            order = list(runners) if repeat % 2 == 0 else list(runners)[::-1]
            for name in order:
                seconds = runners[name].run()
                for column, value in seconds.items():
                    times[name][column].append(value)
                log(f"  {case.setting} repeat {repeat + 1}/{repeats} {name}: "
                    + ", ".join(f"{c} {v:.2f}s" for c, v in seconds.items()))
    finally:
        gc.unfreeze()
    median = {name: {c: statistics.median(v) for c, v in columns.items()} for name, columns in times.items()}
    result: dict[str, Any] = {"setting": case.setting, "description": case.description, "times": times,
                              "median": median, "exactness": exactness(case, runners["library"])}
    if with_kronfluence:
        result["kronfluence_over_library"] = {c: median["kronfluence"][c] / median["library"][c] for c, _ in COLUMNS}
    return result


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table (one line per setting and estimator) and notes."""
    lines = [
        "# Influence function speed: turnover_hf.InfluenceFunctionScorer vs Kronfluence EK-FAC",
        "",
        f"Seconds, medians of {results['repeats']} repeats, {results['threads']} torch thread(s), both estimators "
        "measured in the same run (interleaved). `benchmarks/influence_speed.py`.",
        "",
        "| setting | estimator | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---|---|" + "---:|" * len(COLUMNS),
    ]
    for setting in results["settings"]:
        for name, medians in setting["median"].items():
            lines.append(f"| {setting['setting']} | {name} | "
                         + " | ".join(f"{medians[c]:.2f}" for c, _ in COLUMNS) + " |")
        if "kronfluence_over_library" in setting:
            ratios = setting["kronfluence_over_library"]
            lines.append(f"| {setting['setting']} | Kronfluence / library | "
                         + " | ".join(f"{ratios[c]:.1f}x" for c, _ in COLUMNS) + " |")
    lines.append("")
    for setting in results["settings"]:
        gap = setting["exactness"]
        lines.append(
            f"- {setting['setting']} ({setting['description']}): library vs in-house Gauss-Newton influence, largest "
            f"difference {gap['one_target_max_abs_difference']:.1e} on the target (largest |score| "
            f"{gap['one_target_max_abs_in_house']:.1e}), {gap['self_max_abs_difference']:.1e} on self-influence "
            f"({gap['self_max_abs_in_house']:.1e})."
        )
    if not results["kronfluence"]:
        lines.append("- Kronfluence is not installed (`pip install turnover-hf[bench]`): its rows are skipped.")
    lines.append("- The library's one-target and self-influence columns use a fresh fit each; end to end fits once. "
                 "Its fit column is the pass over the training set and the system S of the factorised fit; S is "
                 "factorised at the first scoring, so that work is in the scoring columns. Kronfluence fits its "
                 "factors once per repeat (the setup, counted in every column).")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=(*SETTINGS, "both"), default="both")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the fidelity benchmark uses one)")
    parser.add_argument("--output", type=Path, default=RESULTS_STEM, help="results stem (.json and .md are added)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    with_kronfluence = kronfluence_installed()
    if not with_kronfluence:
        log("Kronfluence is not installed (pip install turnover-hf[bench]): timing the library alone.")
    builders = {"head": head_case, "adapters": adapter_case}
    chosen = SETTINGS if args.setting == "both" else (args.setting,)
    results: dict[str, Any] = {"repeats": args.repeats, "threads": args.threads, "kronfluence": with_kronfluence,
                               "environment": fidelity.environment(), "settings": []}
    for setting in chosen:
        log(f"{setting}: data and training ...")
        case = builders[setting]()
        results["settings"].append(measure(case, args.repeats, with_kronfluence, log))
    table = markdown(results)
    print(table)
    atomic_write_text(f"{args.output}.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(f"{args.output}.md", table)
    return results


if __name__ == "__main__":
    main()
