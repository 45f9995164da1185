"""Atomic file writes: a temporary file in the target folder, fsync, then ``os.replace``.

An interrupted run therefore leaves either the previous file or the complete new one, never a half-written result.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator, Union

from .errors import ConfigMismatchError, TurnoverError

PathLike = Union[str, os.PathLike]


def umask() -> int:
    """The process's umask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes files private; results are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)


def read_format_meta(folder: PathLike, name: str, fmt: str, version: int, what: str) -> dict[str, Any]:
    """The JSON metadata ``name`` of a saved result in ``folder``, checked to be ``fmt`` version ``version``."""
    path = os.path.join(os.fspath(folder), name)
    if not os.path.isfile(path):
        raise TurnoverError(f"{os.fspath(folder)!r} holds no {what} ({name} is missing).")
    with open(path, encoding="utf-8") as handle:
        meta = json.load(handle)
    if meta.get("format") != fmt or meta.get("version") != version:
        raise ConfigMismatchError(f"{path!r} is not a {fmt} v{version} file.")
    return meta
