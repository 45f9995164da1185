"""MkDocs hook: pages made at build time from the code and the measurements, so they cannot drift from them.

- ``reference/cli.md``: every ``turnover-hf`` command and flag, walked from the real argparse parsers
  (``turnover_hf.cli.parsers()``, the ones ``main`` uses).
- ``results/<name>.md`` and the screenshot: the measured result files of ``benchmarks/results/``, so the measured
  pages can link to the full tables.
"""

from __future__ import annotations

import argparse
import html
import os
import pathlib
import sys
import warnings

from mkdocs.structure.files import File

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
CLI_PAGE = "reference/cli.md"


def _import_cli():
    """The CLI package of this checkout (not an installed copy elsewhere), quietly."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from turnover_hf import cli
    return cli


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (no pipes, no HTML, no emphasis)."""
    text = html.escape(" ".join(str(text).split()), quote=False)
    for char in ("|", "*", "_", "[", "]", "`"):
        text = text.replace(char, "\\" + char)
    return text


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = parser._get_formatter()
    return formatter._expand_help(action) if action.help else ""


def visible_options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options a user sees in ``--help`` (suppressed ones are left out, as argparse does)."""
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS]


def _options_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| flag | default | description |", "|---|---|---|"]
    for action in visible_options(parser):
        flags = ", ".join(f"`{flag}`" for flag in action.option_strings)
        if action.required:
            default = "required"
        elif action.default in (None, False, argparse.SUPPRESS) or action.nargs == 0:
            default = ""
        else:
            default = f"`{action.default}`"
        text = _help(parser, action)
        if action.choices and action.dest != "help":
            text = f"{text} Choices: {', '.join(map(str, action.choices))}."
        rows.append(f"| {flags} | {default} | {_cell(text)} |")
    return rows


def cli_markdown() -> str:
    """The CLI reference page, from the parsers ``turnover-hf`` runs with."""
    cli = _import_cli()
    top, commands = cli.parsers()
    lines = [
        "# Command line",
        "",
        "Generated at build time from the `turnover-hf` argparse parsers (`docs/hooks/generated_pages.py`), so it",
        "lists exactly the commands and flags the installed version takes. `pip install -e .` installs the",
        "command (also `python -m turnover_hf`); `turnover-hf COMMAND --help` prints the same text in a terminal.",
        "",
        "```text",
        top.format_help().rstrip(),
        "```",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    for name in commands:
        lines.append(f"| [`{name}`](#{name}) | {_cell(helps.get(name, ''))} |")
    for name, parser in commands.items():
        lines += ["", f"## {name} {{#{name}}}", "", "```text", parser.format_usage().strip(), "```", ""]
        for paragraph in (parser.description or "").split("\n\n"):
            lines += [" ".join(paragraph.split()), ""]
        lines += [*_options_table(parser), ""]
        if parser.epilog:
            lines += ["```text", parser.epilog.rstrip(), "```"]
    if "train" in commands:
        lines += ["", "`train --help_all` lists every `TrainingArguments` option as well; each is accepted as a flag."]
    return "\n".join(lines) + "\n"


def on_files(files, config):
    files.append(File.generated(config, CLI_PAGE, content=cli_markdown()))
    for path in sorted(RESULTS.glob("*.md")) + sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path)))
    return files
