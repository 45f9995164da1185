"""The documentation site: it builds with --strict, its generated pages follow the code, its examples run."""

import contextlib
import html
import io
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
pytest.importorskip("mkdocs", reason="install the docs extra: pip install -e '.[docs]'")
pytest.importorskip("mkdocstrings_handlers.python", reason="install the docs extra: pip install -e '.[docs]'")


def markdown_pages():
    return sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)


def python_blocks(path):
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site as `mkdocs build --strict` writes it; a warning (broken link, missing reference) fails the build."""
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=_env())
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    return out


def _env():
    import os

    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_the_site_builds_strict(site):
    for page in ("index.html", "getting-started/index.html", "architecture/index.html", "reference/cli/index.html",
                 "method/quality/index.html", "results/fidelity/index.html"):
        assert (site / page).stat().st_size > 0, page


def _help(argv):
    from turnover_hf.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(argv)
    return out.getvalue()


def test_the_cli_page_lists_every_command_and_flag_the_command_takes(site):
    page = (site / "reference" / "cli" / "index.html").read_text()
    top = _help(["--help"])
    commands = re.findall(r"^    (\S+)", top.split("commands:", 1)[1], re.M)
    assert {"train", "explain", "label-issues", "self-influence", "cleanse", "report"} <= set(commands)
    sections = dict(re.findall(r'<h2 id="([\w-]+)">(.*?)(?=<h2 id=|\Z)', page, re.S))
    for command in commands:
        assert command in sections, f"the CLI page has no section for `turnover-hf {command}`"
        usage = _help([command, "--help"]).split("\n\n", 1)[0]
        flags = set(re.findall(r"(?<=[\[\s])(--?[A-Za-z][\w-]*)", usage))
        assert "--help" not in flags and len(flags) > 3
        listed = set(html.unescape(code) for code in re.findall(r"<code>(.*?)</code>", sections[command]))
        missing = sorted(flags - listed)
        assert not missing, f"`turnover-hf {command}` takes {missing}, which the CLI page does not list"


def test_every_public_name_has_an_api_entry(site):
    import turnover_hf

    documented = set()
    for page in (DOCS / "reference" / "api").glob("*.md"):
        documented |= {name.rsplit(".", 1)[-1] for name in re.findall(r"^::: (turnover_hf[\w.]*)", page.read_text(), re.M)}
    missing = sorted(set(turnover_hf.__all__) - documented)
    assert not missing, f"add `::: turnover_hf.NAME` to a page in docs/reference/api/ for {missing}"
    api = "".join(p.read_text() for p in (site / "reference" / "api").rglob("index.html"))
    for name in turnover_hf.__all__:
        assert re.search(rf'id="turnover_hf\.([\w.]+\.)?{name}"', api), f"{name} is missing from the built API pages"


def test_every_python_example_in_the_docs_and_readme_is_valid_python():
    blocks = [(p, code) for p in [ROOT / "README.md", *markdown_pages()] for code in python_blocks(p)]
    assert len(blocks) >= 10
    for path, code in blocks:
        compile(code, str(path), "exec")


def test_the_readme_is_short_and_its_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    links = re.findall(r"\]\((?!https?:)([^)#]+)", readme)
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        assert (ROOT / link).exists(), f"README links to {link}, which does not exist"


def test_the_estimator_guide_registers_an_estimator_the_pipeline_uses():
    import torch

    import turnover_hf
    from turnover_hf.estimators import unregister_estimator

    from conftest import tiny_bert, token_task

    code = python_blocks(DOCS / "guides" / "writing-an-estimator.md")[0]
    exec(compile(code, "writing-an-estimator.md", "exec"), {})
    try:
        train = turnover_hf.add_example_ids(token_task(10, seed=0))
        targets = token_task(2, seed=1)
        pipe = turnover_hf.InfluencePipeline(tiny_bert(), train_dataset=train, estimator="same-label")
        same = torch.tensor(train["labels"])[:, None] == torch.tensor(targets["labels"])[None]
        assert torch.equal(pipe.scores(targets), same.float() * 2 - 1)
    finally:
        unregister_estimator("same-label")


def test_every_command_line_in_the_docs_and_readme_uses_real_commands_and_flags():
    lines = [(p, line) for p in [ROOT / "README.md", *markdown_pages()]
             for block in re.findall(r"^```bash\n(.*?)^```", p.read_text(), re.S | re.M)
             for line in block.splitlines() if line.startswith("turnover-hf ")]
    assert len(lines) >= 5
    takes = {}
    for path, line in lines:
        command = line.split()[1]
        if command not in takes:
            usage = _help([command, "--help"]).split("\n\n", 1)[0]
            takes[command] = {flag.replace("-", "_").lstrip("_") for flag in re.findall(r"(?<=[\[\s])--[\w-]+", usage)}
        for flag in re.findall(r"(?<=\s)--[\w-]+", line.split("#", 1)[0]):
            assert flag.replace("-", "_").lstrip("_") in takes[command], f"{path.name}: `{line}` uses {flag}"
