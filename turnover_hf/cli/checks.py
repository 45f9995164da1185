"""Up-front checks of what a command reads and writes: each data file before it is parsed, and each output path
before any computation, so a mistake costs a second and one line that names the file, the row and the fix.

Example:
    >>> check_output_file("out/scores.parquet", "--output", (".csv", ".json"), overwrite=False)
    Traceback (most recent call last):
    turnover_hf.errors.TurnoverError: --output 'out/scores.parquet': unsupported extension '.parquet'; give a file ending in .csv or .json.
"""

from __future__ import annotations

import codecs
import math
import os
import tempfile
from typing import Any, Optional, Sequence

import pyarrow.compute as pc

from ..errors import TurnoverError

_CHUNK = 1 << 20
TEXT_FORMATS = (".csv", ".tsv", ".json", ".jsonl", ".txt")


def _either(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def check_data_file(path: str, what: str, extensions: Sequence[str]) -> None:
    """Refuse a data file that cannot hold data before ``datasets`` parses it: a missing file, an unknown extension,
    an empty file, a text file that is not UTF-8 (naming the byte, its line and the fix) or a Parquet file that is
    not Parquet."""
    if os.path.isdir(path):
        return
    if not os.path.isfile(path):
        raise TurnoverError(f"{what} {path!r}: no such file or folder; check the path.")
    extension = os.path.splitext(path)[1].lower()
    if extension not in extensions:
        raise TurnoverError(
            f"{what} {path!r}: unknown format {extension or '(no extension)'!r}; use {', '.join(extensions)} or a "
            "save_to_disk folder."
        )
    if os.path.getsize(path) == 0:
        raise TurnoverError(f"{what} {path!r} is empty; give a file with a header row and at least one example.")
    if extension == ".parquet":
        with open(path, "rb") as handle:
            head = handle.read(4)
            handle.seek(-4 if os.path.getsize(path) >= 8 else 0, os.SEEK_END)
            tail = handle.read(4)
        if head != b"PAR1" or tail != b"PAR1":
            raise TurnoverError(
                f"{what} {path!r} is not a Parquet file (no PAR1 magic bytes); write it with pandas' to_parquet or "
                "datasets' to_parquet, or give it the extension of its real format."
            )
        return
    if extension in TEXT_FORMATS:
        _check_utf8(path, what)


def _check_utf8(path: str, what: str) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset, blank = 1, 0, True
    with open(path, "rb") as handle:
        first = handle.read(4)
        handle.seek(0)
        if first.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            raise TurnoverError(
                f"{what} {path!r} is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8 (e.g. "
                f"iconv -f UTF-16 -t UTF-8 {path} > utf8{os.path.splitext(path)[1]})."
            )
        while True:
            chunk = handle.read(_CHUNK)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                position = offset + err.start
                bad = chunk[err.start : err.start + 1] if err.start < len(chunk) else b""
                line += chunk[: err.start].count(b"\n")
                raise TurnoverError(
                    f"{what} {path!r} is not UTF-8 (byte {bad.hex() and '0x' + bad.hex()} at offset {position}, line "
                    f"{line}); save it as UTF-8 (e.g. iconv -f latin1 -t UTF-8 {path} > "
                    f"utf8{os.path.splitext(path)[1]}, or in a spreadsheet: Save as CSV UTF-8)."
                ) from None
            if text.strip("\ufeff \t\r\n"):
                blank = False
            line += chunk.count(b"\n")
            offset += len(chunk)
            if not chunk:
                break
    if blank:
        raise TurnoverError(f"{what} {path!r} holds only blank lines; give a file with a header row and examples.")


def check_rows(data: Any, path: str, what: str, text_columns: Sequence[str] = (), label_columns: Sequence[str] = ()) -> None:
    """Refuse a loaded table with no rows (a header only), an empty cell in ``text_columns`` or ``label_columns``
    (naming the row and its line) or a text column that holds no text."""
    named = f"{what} {path!r}" if path and repr(path) not in what else what
    if len(data) == 0:
        raise TurnoverError(
            f"{named} has no rows (only a header, or an empty list); add at least one example."
        )
    header = 2 if os.path.splitext(path)[1].lower() in (".csv", ".tsv") else 1
    for column in (*text_columns, *label_columns):
        if column not in data.column_names:
            continue
        is_label = column in label_columns
        arrow = data.data.column(column)
        if arrow.null_count == 0 and (is_label and str(arrow.type).startswith(("int", "uint", "dictionary"))
                                      or (not is_label and str(arrow.type) in ("string", "large_string")
                                          and not pc.any(pc.equal(arrow, "")).as_py())):
            continue  # no empty cell (the common case, checked without a pass in Python)
        for i, value in enumerate(data[column]):
            if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
                where = f"row {i + 1}" + (f" (line {i + header} of the file)" if header == 2 else "")
                raise TurnoverError(
                    f"{named}: {where} has no {column!r}; fill that cell or remove the row."
                )
            if not is_label and not isinstance(value, str):
                raise TurnoverError(
                    f"{named}: the {column!r} column holds {type(value).__name__} values, not text; name "
                    "the text column with --text_column."
                )


def _nearest_existing(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return folder


def check_writable(path: str, flag: str) -> None:
    """Refuse a path under a file, or whose nearest existing folder is not writable."""
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        raise TurnoverError(
            f"{flag} {path!r}: {existing!r} is a file, so nothing can be written under it; choose another path."
        )
    try:  # a real write (permissions alone say nothing on read-only mounts or for root)
        fd, probe = tempfile.mkstemp(prefix=".turnover-write-check-", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise TurnoverError(
            f"{flag} {path!r}: the folder {existing!r} is not writable ({err.strerror}); choose another path."
        ) from None


def check_output_file(path: Optional[str], flag: str, extensions: Sequence[str], overwrite: bool,
                      overwrite_flag: str = "--overwrite") -> None:
    """Refuse, before any computation, an output file that could not be written or would replace data unasked."""
    if not path:
        return
    extension = os.path.splitext(path)[1].lower()
    if extension not in extensions:
        raise TurnoverError(
            f"{flag} {path!r}: unsupported extension {extension or '(none)'!r}; give a file ending in "
            f"{_either(list(extensions))}."
        )
    if os.path.isdir(path):
        raise TurnoverError(f"{flag} {path!r} is a folder; give a file path ending in {_either(list(extensions))}.")
    if os.path.exists(path) and not overwrite:
        raise TurnoverError(f"{flag} {path!r} exists; choose another path or pass {overwrite_flag} to replace it.")
    check_writable(path, flag)


def check_output_folder(path: Optional[str], flag: str, overwrite: bool, overwrite_flag: str = "--overwrite") -> None:
    """Refuse, before any computation, an output folder that is a file, is not empty (unless ``overwrite``) or
    cannot be created."""
    if not path:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise TurnoverError(f"{flag} {path!r} is a file; give a folder path.")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise TurnoverError(f"{flag} {path!r} is not empty; choose another folder or pass {overwrite_flag} to replace it.")
    check_writable(path, flag)


def check_counts(**flags: tuple[Any, int]) -> None:
    """Refuse, before any computation, a count flag below its minimum: ``check_counts(top_k=(value, 1))``."""
    for name, (value, minimum) in flags.items():
        if value is not None and value < minimum:
            raise TurnoverError(f"--{name} must be {minimum} or more, got {value}.")
