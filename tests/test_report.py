"""The HTML report holds exactly the run's numbers and rows, escaped and self-contained, and renders in Chromium."""

import base64
import copy
import re
from html.parser import HTMLParser

import numpy as np
import pytest

import turnover_hf as th

pytest.importorskip("matplotlib")
from test_plots import PNG, run  # noqa: F401  (the trained tiny run, shared fixture)

from turnover_hf import plots, report
from turnover_hf.training_set import keep_training_record

HTML_BIT = ' <script>alert("x")</script> & co'
LABEL_NAMES = ["absent", "present"]


class _Tables(HTMLParser):
    """Every <table> as a list of rows of cell texts, and every <img> src."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self._cell = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


@pytest.fixture(scope="module")
def page_inputs(run):  # noqa: F811
    """Report inputs from a real pipeline whose training texts carry HTML."""
    train = run["train"].map(lambda r, i: {"text": r["text"] + (HTML_BIT if i % 3 == 0 else "")}, with_indices=True)
    # These texts are not the ones the model trained on, and the pipeline refuses them against the recorded training
    # set; this test is about escaping only, so a copy of the model forgets that record.
    model = copy.deepcopy(run["pipe"].model)
    keep_training_record(model, None)
    pipe = th.InfluencePipeline(model, run["pipe"].tokenizer, train_dataset=train)
    valid = run["valid"]
    explanations = pipe([{"text": t, "label": y} for t, y in zip(valid["text"][:2], valid["label"][:2])], top_k=3)
    for item, text in zip(explanations, valid["text"][:2]):
        item["text"] = text
    suspects = pipe.self_influence()
    figures = {
        "Self-influence": plots.self_influence_histogram(suspects),
        "Flip sanity": plots.flip_sanity_curves(run["trainer"].state.log_history),
    }
    return dict(
        title="Tiny run", model="tiny-bert <v1>", config=pipe.model.turnover_config,
        dataset_sizes={"train": len(train), "validation": len(valid)}, metrics={"validation accuracy": 0.75},
        explanations=explanations, suspects=suspects, figures=figures, label_names=LABEL_NAMES, top_k=3,
        max_suspects=len(train),
    )


def _row(entry, score_key="score"):
    return [f"{entry[score_key]:+.4f}", LABEL_NAMES[entry["label"]], str(entry["example_id"]), entry["text"]]


def test_report_holds_the_runs_numbers_and_rows(page_inputs, tmp_path):
    path = report.write_report(tmp_path / "report.html", **page_inputs)
    page = open(path, encoding="utf-8").read()
    parsed = _Tables()
    parsed.feed(page)
    tables = parsed.tables
    # Configuration: the summary table and the full JSON.
    config = page_inputs["config"]
    summary = dict(row for row in tables[0])
    assert summary["mask seed"] == str(config.seed)
    assert summary["masked modules"] == str(len(config.mask_sites))
    assert summary["training examples (masks)"] == str(config.num_train_examples)
    assert f"&quot;seed&quot;: {config.seed}" in page
    for text in ("tiny-bert &lt;v1&gt;", "validation accuracy", "0.75", "48"):
        assert text in page
    # Explanations: proponents and opponents tables, row for row, in the pipeline's order.
    for n, item in enumerate(page_inputs["explanations"]):
        proponents, opponents = tables[1 + 2 * n][1:], tables[2 + 2 * n][1:]
        assert proponents == [_row(p) for p in item["proponents"]]
        assert opponents == [_row(o) for o in item["opponents"]]
    # Suspects: every training row, highest self-influence first.
    suspects = sorted(page_inputs["suspects"], key=lambda r: -r["self_influence"])
    assert tables[-1][1:] == [_row(s, "self_influence") for s in suspects]
    # The figures are embedded PNGs, the only images.
    assert len(parsed.images) == len(page_inputs["figures"])
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)


def test_report_is_self_contained_and_escaped(page_inputs, tmp_path):
    page = report.render_report(**page_inputs)
    assert re.search(r'(src|href)\s*=\s*"(?!data:|#)', page) is None  # only data URIs and in-page anchors
    for external in ("<script", "<link", "@import", "url(", "http://", "https://"):
        assert external not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in page


def test_write_report_never_overwrites_unless_asked(page_inputs, tmp_path):
    path = tmp_path / "report.html"
    path.write_text("mine", encoding="utf-8")
    with pytest.raises(th.TurnoverError, match="overwrite=True"):
        report.write_report(path, title="x")
    assert path.read_text(encoding="utf-8") == "mine"
    report.write_report(path, overwrite=True, title="second")
    assert "<h1>second</h1>" in path.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_bad_report_inputs_get_clear_errors(tmp_path):
    with pytest.raises(th.TurnoverError, match="score column"):
        report.render_report(suspects=[{"example_id": 1, "text": "x"}])
    with pytest.raises(th.TurnoverError, match="not a PNG"):
        report.render_report(figures={"broken": b"GIF89a"})
    with pytest.raises(th.TurnoverError, match="no file"):
        report.render_report(figures={"missing": tmp_path / "none.png"})


@pytest.mark.skipif(report.find_chromium() is None, reason="needs Chromium on PATH (apt-get install chromium)")
def test_report_renders_in_headless_chromium(page_inputs, tmp_path):
    image_module = pytest.importorskip("PIL.Image", reason="pixel checks need Pillow")
    html_path = report.write_report(tmp_path / "report.html", **page_inputs)
    png_path = report.screenshot(html_path, tmp_path / "shot.png", width=1100, height=1600)
    with image_module.open(png_path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=float)
    assert pixels.shape[:2] == (1600, 1100)
    assert pixels.std() > 20  # not a blank page
    assert (pixels.min(-1) < 200).mean() > 0.02  # text, tables and plots cover part of it
    # The embedded histogram was decoded and drawn: its bar colour (#0072B2 at alpha 0.85 on white) is on screen.
    bars = np.array([38, 135, 190])
    assert (np.abs(pixels - bars).max(-1) <= 8).sum() > 1000
