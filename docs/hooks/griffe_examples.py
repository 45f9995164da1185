"""Griffe extension for the API reference: read the package's docstrings as they are written.

- The house style titles a doctest block ``Example:``; Google-style parsing knows only ``Examples:`` as a code
  section and would render the block as prose.
- Some docstrings name objects with Sphinx roles (``:class:`~turnover_hf.TurnoverConfig```), which Markdown shows
  verbatim: they become inline code with the name as written (the last part when it starts with ``~``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_TITLE = re.compile(r"^(\s*)Example:\s*$", re.M)
_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):`(~?)([^`]+)`")


def _role_as_code(match: re.Match) -> str:
    short, name = match.groups()
    return f"`{name.rsplit('.', 1)[-1] if short else name}`"


class ExampleSections(griffe.Extension):
    """Read ``Example:`` as the ``Examples:`` section it is, and Sphinx roles as inline code."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _EXAMPLE_TITLE.sub(r"\1Examples:", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(_role_as_code, text)
