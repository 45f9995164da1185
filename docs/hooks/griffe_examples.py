"""Griffe extension for the API reference: the package's docstrings title their doctest block ``Example:`` (the
house style); Google-style parsing knows only ``Examples:`` as a code section and would render the block as prose."""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_TITLE = re.compile(r"^(\s*)Example:\s*$", re.M)


class ExampleSections(griffe.Extension):
    """Read an ``Example:`` section as the ``Examples:`` section it is."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE_TITLE.sub(r"\1Examples:", obj.docstring.value)
