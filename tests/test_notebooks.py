"""Every notebook in notebooks/ is stored executed and still runs (with tiny settings) on the current code."""

import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook tests need the [test] extra (nbformat, nbclient)")
from nbclient import NotebookClient  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))


def test_the_notebooks_exist():
    names = {os.path.basename(path) for path in NOTEBOOKS}
    assert {"quickstart.ipynb", "error_interpretation.ipynb", "data_cleansing.ipynb", "mislabel_detection.ipynb",
            "hydra_vs_turnover.ipynb", "language_model.ipynb"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: os.path.basename(p))
def test_notebook_is_stored_executed_and_still_runs(path, tmp_path, monkeypatch):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.execution_count is not None for cell in code), "store the notebook executed"
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"], "stored with an error"
    plots = sum("plots." in cell.source for cell in code)
    stored_images = [o for cell in code for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(stored_images) >= plots, "every plot cell should show its figure"
    monkeypatch.setenv("TURNOVER_HF_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for cell in code:
        cell.outputs = []
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    shown = "".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for cell in code for o in cell.outputs)
    assert shown.strip(), "the notebook printed nothing"
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert len([o for cell in code for o in cell.outputs if "image/png" in o.get("data", {})]) >= plots
