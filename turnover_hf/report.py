"""A self-contained HTML report of an influence run: configuration, explained targets, suspects and plots.

One file, no external assets: plots are embedded as base64 PNG, every text is escaped, nothing is fetched when it
is opened. :func:`screenshot` renders it with headless Chromium (to check it, or to show it).

Example:
    >>> from turnover_hf import report, plots
    >>> report.write_report("run.html", config=model.turnover_config, model="all-MiniLM-L6-v2",
    ...     explanations=pipe(["a gripping film"], top_k=5), suspects=pipe.self_influence(),
    ...     figures={"Self-influence": plots.self_influence_histogram(pipe.self_influence())})
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, Union

from datasets import Dataset

from .audit import KIND_TITLES, KINDS
from .errors import TurnoverError
from .estimators import get_estimator
from .files import PathLike, atomic_path, atomic_write_text
from .plots import figure_png
from .version import __version__

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SCORE_COLUMNS = ("score", "self_influence", "mean_influence")
ROW_KEYS = {"example_id", "label", "labels", "score", "self_influence", "mean_influence"}
TARGET_KEYS = {
    "text", "label", "proponents", "opponents", "label_source", "predicted", "confidence", "members", "agreement",
}
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

FigureLike = Union["Figure", bytes, PathLike]  # noqa: F821 (a matplotlib Figure, PNG bytes, or a PNG file)
LabelNames = Union[Sequence[str], Mapping[Any, str], None]
Rows = Union[Dataset, Sequence[Mapping[str, Any]]]

CSS = """
:root { --fg: #1d2327; --muted: #5f6b73; --line: #dde3e8; --band: #f5f7f9; --pos: #0b7a55; --neg: #b3261e;
        --accent: #0b5cad; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.45;
       font: 15px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "DejaVu Sans", sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 32px 48px; }
header { border-bottom: 3px solid var(--accent); padding-bottom: 12px; margin-bottom: 8px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 6px; }
p, li { max-width: 80ch; }
.muted { color: var(--muted); }
nav a { color: var(--accent); margin-right: 14px; text-decoration: none; font-size: 14px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; min-width: 150px;
        background: var(--band); }
.card .value { font-size: 20px; font-weight: 600; }
.card .key { font-size: 12px; color: var(--muted); text-transform: uppercase; letter-spacing: .03em; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 14px; font-size: 14px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--band); font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { width: 70%; overflow-wrap: anywhere; }
table.kv { width: auto; min-width: 40%; }
table.kv td:first-child { color: var(--muted); padding-right: 24px; }
.pos { color: var(--pos); } .neg { color: var(--neg); }
.target { border-left: 4px solid var(--accent); background: var(--band); padding: 8px 12px; margin: 8px 0;
          overflow-wrap: anywhere; }
.facts { font-size: 14px; color: var(--muted); margin: 4px 0 8px; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 18px; }
.pair h4 { margin: 8px 0 2px; font-size: 14px; }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(440px, 1fr)); gap: 18px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 8px; padding: 8px; background: #fff; }
figure img { width: 100%; height: auto; display: block; }
figcaption { font-size: 13px; color: var(--muted); margin-top: 6px; }
pre { background: var(--band); border: 1px solid var(--line); padding: 10px; overflow-x: auto; font-size: 12px; }
details summary { cursor: pointer; color: var(--accent); margin: 6px 0; }
footer { margin-top: 36px; font-size: 12px; color: var(--muted); border-top: 1px solid var(--line); padding-top: 8px; }
table.audit td.text { width: 42%; } table.audit td.reason { width: 28%; } table.audit td.source { font-size: 12px; }
table.audit .other { color: var(--muted); display: block; margin-top: 4px; }
@media (max-width: 800px) { .pair { grid-template-columns: 1fr; } }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def _score(value: float) -> str:
    kind = "pos" if value > 0 else "neg" if value < 0 else ""
    return f'<td class="num {kind}">{value:+.4f}</td>'


def _label(value: Any, label_names: LabelNames) -> str:
    if value is None:
        return ""
    if isinstance(label_names, Mapping):
        return str(label_names.get(value, label_names.get(str(value), value)))
    if label_names is not None and isinstance(value, int) and 0 <= value < len(label_names):
        return str(label_names[value])
    return str(value)


def _png(figure: FigureLike, name: str) -> bytes:
    """PNG bytes of a matplotlib Figure, of bytes that are a PNG, or of a PNG file."""
    if hasattr(figure, "savefig"):

        return figure_png(figure)
    if isinstance(figure, (bytes, bytearray)):
        data = bytes(figure)
    elif isinstance(figure, (str, os.PathLike)):
        if not os.path.isfile(figure):
            raise TurnoverError(f"figure {name!r}: no file {os.fspath(figure)!r}.")
        with open(figure, "rb") as handle:
            data = handle.read()
    else:
        raise TurnoverError(
            f"figure {name!r} is a {type(figure).__name__}; give a matplotlib Figure, PNG bytes or a PNG file path."
        )
    if not data.startswith(PNG_SIGNATURE):
        raise TurnoverError(f"figure {name!r} is not a PNG image.")
    return data


def _records(rows: Rows | None) -> list[dict[str, Any]]:
    if rows is None:
        return []
    if isinstance(rows, Dataset):
        keep = [c for c in rows.column_names if c not in ("input_ids", "attention_mask", "token_type_ids")]
        return [dict(r) for r in rows.select_columns(keep)]
    return [dict(r) for r in rows]


def _score_of(row: Mapping[str, Any]) -> float | None:
    for key in SCORE_COLUMNS:
        if key in row and row[key] is not None:
            return float(row[key])
    return None


def _rows_table(rows: Sequence[Mapping[str, Any]], text_column: str, label_names: LabelNames, score_name: str) -> str:
    if not rows:
        return '<p class="muted">none</p>'
    out = [f'<table><tr><th class="num">{_e(score_name)}</th><th>label</th><th class="num">id</th><th>text</th></tr>']
    for row in rows:
        score = _score_of(row)
        label = row.get("label", row.get("labels"))
        out.append(
            "<tr>" + (_score(score) if score is not None else "<td></td>")
            + f"<td>{_e(_label(label, label_names))}</td>"
            + f'<td class="num">{_e(row.get("example_id", ""))}</td>'
            + f'<td class="text">{_e(row.get(text_column, ""))}</td></tr>'
        )
    out.append("</table>")
    return "".join(out)


def _kv_table(items: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(_number(v))}</td></tr>" for k, v in items.items())
    return f'<table class="kv">{rows}</table>'


def _config_dict(config: Any) -> dict[str, Any] | None:
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, Mapping):
        return dict(config)
    raise TurnoverError(f"config must be a TurnoverConfig or a dict, got {type(config).__name__}.")


def _config_section(config: dict[str, Any] | None, model: str | None, dataset_sizes: Mapping[str, int] | None,
                    metrics: Mapping[str, Any] | None) -> str:
    out = ['<section id="run"><h2>Run</h2>']
    cards = {}
    if model:
        cards["model"] = model
    for split, size in (dataset_sizes or {}).items():
        cards[split] = _number(int(size))
    for key, value in (metrics or {}).items():
        cards[key] = _number(value)
    if cards:
        out.append('<div class="cards">')
        out += [
            f'<div class="card"><div class="key">{_e(k)}</div><div class="value">{_e(v)}</div></div>'
            for k, v in cards.items()
        ]
        out.append("</div>")
    if config is not None:
        sites = config.get("mask_sites") or {}
        summary = {
            "drop ratio p": config.get("p"), "mask seed": config.get("seed"), "scheme": config.get("scheme"),
            "masked modules": len(sites), "masked units": sum(int(s.get("units", 0)) * int(s.get("channels", 1)) for s in sites.values()),
            "training examples (masks)": config.get("num_train_examples"),
            "active adapters": ", ".join(config.get("active_adapters") or []) or "none",
            "turnover-hf version": config.get("library_version"),
        }
        out.append("<h3>Turn-over dropout configuration</h3>")
        out.append(_kv_table({k: v for k, v in summary.items() if v is not None}))
        out.append("<details><summary>turnover_config.json</summary><pre>"
                   + _e(json.dumps(config, indent=2, sort_keys=True)) + "</pre></details>")
    out.append("</section>")
    return "".join(out)


def _explanation(index: int, item: Mapping[str, Any], text_column: str, label_names: LabelNames, top_k: int) -> str:
    text = item.get(text_column, item.get("text"))
    label = _label(item.get("label"), label_names)
    title = f"Target {index + 1}"
    if item.get("example_id") is not None:
        title += f" (#{item['example_id']})"
    facts = [f"label <b>{_e(label)}</b>" + (f" ({_e(item['label_source'])})" if item.get("label_source") else "")]
    if item.get("predicted") is not None:
        predicted = f"predicted <b>{_e(_label(item['predicted'], label_names))}</b>"
        if item.get("confidence") is not None:
            predicted += f" with probability {float(item['confidence']):.2f}"
        facts.append(predicted)
    if (item.get("members") or 1) > 1:
        facts.append(f"mean of {int(item['members'])} models")
        if item.get("agreement") is not None:
            facts.append(f"estimated ranking agreement {float(item['agreement']):.2f}")
    facts += [
        f"{_e(k.replace('_', ' '))}: {_e(_number(v))}"
        for k, v in item.items()
        if k not in TARGET_KEYS and k != text_column and k != "example_id" and isinstance(v, (int, float, str))
    ]
    out = [f"<h3>{_e(title)}</h3>"]
    if text is not None:
        out.append(f'<div class="target">{_e(text)}</div>')
    out.append(f'<div class="facts">{" · ".join(facts)}</div>')
    proponents = list(item.get("proponents") or [])[:top_k]
    opponents = list(item.get("opponents") or [])[:top_k]
    out.append('<div class="pair"><div><h4 class="pos">Proponents: helped this prediction</h4>'
               + _rows_table(proponents, text_column, label_names, "influence")
               + '</div><div><h4 class="neg">Opponents: hurt this prediction</h4>'
               + _rows_table(opponents, text_column, label_names, "influence") + "</div></div>")
    return "".join(out)



AUDIT_MEANING = {
    "wrong_label": "labels the model's ranking flags as likely wrong (suggested label: the model's prediction)",
    "duplicate": "training examples with the same or nearly the same text as an earlier one",
    "leakage": "training examples whose text (or nearly) is also in the validation or test set",
    "outlier": "training examples far from every other one in the model's own representation",
    "data_value": "training examples that raise the validation loss most (negative mean influence)",
}


def _audit_section(issues: Rows, text_column: str, label_names: LabelNames, max_rows: int) -> str:
    """Counts of each kind of data issue, what each means, and the top rows of each (see turnover_hf.audit): the
    section ``render_report(audit=issues, max_audit_rows=5)`` adds, ``issues`` being what
    :meth:`InfluencePipeline.audit` returns."""
    rows = _records(issues)
    notes = issues.info.description if isinstance(issues, Dataset) and issues.info.description else ""
    counts = {kind: sum(1 for r in rows if r.get("kind") == kind) for kind in KINDS}
    out = [('<section id="audit"><h2>Data audit</h2><p class="muted">Issues found in the training set, by kind; '
            "score: higher is more of an issue within a kind. Source: the signal that produced the row.</p>"),
           '<table class="kv"><tr><th>kind</th><th class="num">rows</th><th>meaning</th></tr>']
    for kind in KINDS:
        out.append(f'<tr data-kind="{kind}" data-count="{counts[kind]}"><td>{_e(KIND_TITLES[kind])}</td>'
                   f'<td class="num">{counts[kind]:,}</td><td>{_e(AUDIT_MEANING[kind])}</td></tr>')
    out.append("</table>")
    if notes:
        out.append('<details><summary>Notes (thresholds, what was skipped)</summary><pre>' + _e(notes)
                   + "</pre></details>")
    for kind in KINDS:
        chosen = sorted((r for r in rows if r.get("kind") == kind), key=lambda r: -float(r["score"]))[:max_rows]
        if not chosen:
            continue
        out.append(f"<h3>{_e(KIND_TITLES[kind])} (top {len(chosen)} of {counts[kind]:,})</h3>"
                   '<table class="audit"><tr><th class="num">score</th><th class="num">id</th><th>label</th>'
                   "<th>reason</th><th>text</th><th>source</th></tr>")
        for r in chosen:
            label = _label(r.get("label"), label_names)
            if r.get("suggested_label") is not None:
                label += f" → {_label(r['suggested_label'], label_names)}"
            other = r.get("other_text")
            other = f'<span class="other">↔ {_e(other)}</span>' if other else ""
            out.append(f'<tr><td class="num">{float(r["score"]):.4g}</td><td class="num">{_e(r["example_id"])}</td>'
                       f'<td>{_e(label)}</td><td class="reason">{_e(r.get("reason") or "")}</td>'
                       f'<td class="text">{_e(r.get(text_column) or r.get("text") or "")}{other}</td>'
                       f'<td class="source muted">{_e(r.get("source") or "")}</td></tr>')
        out.append("</table>")
    out.append("</section>")
    return "".join(out)


def render_report(
    *,
    title: str = "turnover-hf report",
    summary: str | None = None,
    config: Any = None,
    model: str | None = None,
    dataset_sizes: Mapping[str, int] | None = None,
    metrics: Mapping[str, Any] | None = None,
    explanations: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    suspects: Rows | None = None,
    figures: Mapping[str, FigureLike] | None = None,
    captions: Mapping[str, str] | None = None,
    label_names: LabelNames = None,
    text_column: str = "text",
    top_k: int = 5,
    max_suspects: int = 10,
    estimator: str = "turnover",
    audit: Rows | None = None,
    max_audit_rows: int = 5,
) -> str:
    """The HTML text of a report.

    Args:
        title: the heading.
        summary: an optional paragraph under the heading.
        config: the model's :class:`TurnoverConfig` (``model.turnover_config``) or its dict.
        model: the model's name or path.
        dataset_sizes: e.g. ``{"training examples": 2000, "targets": 486}``.
        metrics: e.g. ``{"validation accuracy": 0.81}``.
        explanations: what ``InfluencePipeline.__call__`` returns (one dict or a list), each optionally with the
            target's ``text`` and ``predicted`` / ``confidence``.
        suspects: :meth:`InfluencePipeline.self_influence` (or rows with a score); the highest ``max_suspects``
            are listed.
        max_suspects: how many suspects are listed.
        figures: title -> matplotlib Figure, PNG bytes or PNG file.
        captions: title -> a sentence under the figure.
        label_names: names of the integer labels (a list, or ``model.config.id2label``).
        text_column: the text field of training rows and targets.
        top_k: rows per proponent/opponent table.
        estimator: the ``InfluencePipeline`` estimator that made the scores (any registered name): the page says
            what a score means for it.
        audit: :meth:`InfluencePipeline.audit` (rows of ``kind``, ``score``, ``reason``, ...): a section with the
            count of each kind and its top rows.
        max_audit_rows: rows shown per kind of issue.

    Example:
        >>> page = render_report(config=model.turnover_config, suspects=pipe.self_influence())
        >>> page.startswith("<!DOCTYPE html>")
        True
    """
    spec = get_estimator(estimator)  # what one score means, and what to say beside one model's scores
    config_dict = _config_dict(config)
    if isinstance(explanations, Mapping):  # the single result of pipe("one text")
        explanations = [explanations]
    explanations = list(explanations or [])
    suspect_rows = _records(suspects)
    if suspect_rows and any(_score_of(r) is None for r in suspect_rows):
        raise TurnoverError(f"suspects need a score column (one of {SCORE_COLUMNS}), as pipe.self_influence() has.")
    suspect_rows = sorted(suspect_rows, key=lambda r: -_score_of(r))[:max_suspects]
    images = {name: _png(figure, name) for name, figure in (figures or {}).items()}

    sections = [("run", "Run")]
    if images:
        sections.append(("plots", "Plots"))
    if explanations:
        sections.append(("explanations", "Explained predictions"))
    if suspect_rows:
        sections.append(("suspects", "Suspected mislabelled"))
    if audit is not None:
        sections.append(("audit", "Data audit"))
    body = [
        "<header>", f"<h1>{_e(title)}</h1>",
        f"<p>{_e(summary)}</p>" if summary else "",
        "<nav>" + "".join(f'<a href="#{key}">{_e(name)}</a>' for key, name in sections) + "</nav>",
        "</header>",
        _config_section(config_dict, model, dataset_sizes, metrics),
    ]
    if images:
        body.append('<section id="plots"><h2>Plots</h2><div class="figures">')
        for name, data in images.items():
            encoded = base64.b64encode(data).decode("ascii")
            caption = (captions or {}).get(name)
            body.append(
                f'<figure><img alt="{_e(name)}" src="data:image/png;base64,{encoded}">'
                f"<figcaption><b>{_e(name)}</b>{'. ' + _e(caption) if caption else ''}</figcaption></figure>"
            )
        body.append("</div></section>")
    if explanations:
        body.append(
            '<section id="explanations"><h2>Explained predictions</h2><p class="muted">Influence of a training '
            f"example on a target: {_e(spec.definition)} Positive: the example helped the model "
            "towards the target's label; negative: it pushed away from it.</p>"
        )
        if spec.one_model_caveat and any(item.get("members") == 1 for item in explanations):
            body.append(f'<p class="muted"><b>One model:</b> {spec.one_model_caveat}</p>')
        body += [_explanation(i, item, text_column, label_names, top_k) for i, item in enumerate(explanations)]
        body.append("</section>")
    if suspect_rows:
        body.append(
            '<section id="suspects"><h2>Suspected mislabelled training examples</h2><p class="muted">Highest '
            "self-influence first: the model gets these right mostly because it trained on them, so the rest of the "
            "data disagrees with their label (Kobayashi et al. 2020, App. E). Check these labels first.</p>"
            + _rows_table(suspect_rows, text_column, label_names, "self-influence") + "</section>"
        )
    if audit is not None:
        body.append(_audit_section(audit, text_column, label_names, max_audit_rows))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body.append(f"<footer>turnover-hf {_e(__version__)} · {_e(stamp)}</footer>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
        + "\n".join(part for part in body if part)
        + "</main></body></html>\n"
    )


def write_report(path: PathLike, *, overwrite: bool = False, **kwargs: Any) -> str:
    """Write a self-contained HTML report atomically; returns its path.

    Args:
        path: the ``.html`` file to write.
        overwrite: replace an existing file (without it, an existing file is kept and an error raised).

        **kwargs: what to show: the keyword arguments of :func:`render_report`.

    Example:
        >>> write_report("runs/report.html", config=model.turnover_config, suspects=pipe.self_influence(),
        ...              figures={"Self-influence": plots.self_influence_histogram(pipe.self_influence())})
        'runs/report.html'
    """
    if os.path.exists(path) and not overwrite:
        raise TurnoverError(f"{os.fspath(path)!r} exists; choose another path or pass overwrite=True to replace it.")
    atomic_write_text(path, render_report(**kwargs))
    return os.fspath(path)


def find_chromium() -> str | None:
    """The path of a Chromium / Chrome executable on PATH, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(
    html_path: PathLike, png_path: PathLike, *, width: int = 1280, height: int = 2400, timeout: float = 120.0
) -> str:
    """Render an HTML file with headless Chromium into a PNG (to check a report renders, or to show it).

    Example:
        >>> screenshot("runs/report.html", "runs/report.png", width=1200, height=1800)
        'runs/report.png'
    """
    browser = find_chromium()
    if browser is None:
        raise TurnoverError("no Chromium on PATH; install it (e.g. apt-get install chromium) to take screenshots.")
    if not os.path.isfile(html_path):
        raise TurnoverError(f"no HTML file {os.fspath(html_path)!r} to render.")
    png_path = os.path.abspath(png_path)
    os.makedirs(os.path.dirname(png_path), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="turnover-chromium-") as profile:
        output = os.path.join(profile, "screenshot.png")
        command = [
            browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            "--disable-extensions", "--mute-audio", f"--user-data-dir={profile}", f"--screenshot={output}",
            f"--window-size={int(width)},{int(height)}", pathlib.Path(html_path).resolve().as_uri(),
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise TurnoverError(f"Chromium did not render {os.fspath(html_path)!r} within {timeout:.0f} s.") from None
        if not os.path.isfile(output):
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise TurnoverError(f"Chromium wrote no screenshot (exit {done.returncode}): {last}")
        with atomic_path(png_path) as tmp:
            shutil.copyfile(output, tmp)
    return png_path
