"""Resumable score results on disk: a manifest, one safetensors shard per chunk of training ids, a final file.

A folder holds exactly one result. Its manifest records a fingerprint of what was asked (model weights, mask
config, targets, ids); a later call with the same question continues from the shards already written, and a
different question is refused instead of overwriting anything. Every file is written atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from typing import Any, Iterator, Optional

import torch
from safetensors.torch import load_file, save_file

from .errors import TurnoverError
from .files import atomic_path, atomic_write_text

MANIFEST = "manifest.json"
RESULT = "scores.safetensors"
LOCK = ".lock"
_YOUNG_SECONDS = 10.0  # a claim file this young may still be being written by its owner

logger = logging.getLogger(__name__)


class ScoreStore:
    """One resumable result in ``folder``: rows = training ids (in the asked order), columns = targets.

    The manifest records the chunk layout (``chunk_size``); a later call continues in that layout whatever chunk
    size it asks for, every shard holds the ids of its rows and is checked on reading, and the final result's shape
    is checked before it is written. A finished result leaves only ``manifest.json`` and ``scores.safetensors``.

    Example:
        >>> store = ScoreStore("scores/valid", key, ids, n_columns=3, description="scores of 3 targets", chunk_size=1024)
        >>> store.chunks()        # [(0, 0, 1024), (1, 1024, 2048), ...]: (index, start, stop) of every shard
    """

    def __init__(self, folder: str, key: str, example_ids: torch.Tensor, n_columns: int, description: str,
                 chunk_size: int = 1024) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise TurnoverError(f"chunk_size must be a positive integer (training ids per saved chunk), got {chunk_size!r}.")
        self.folder = os.fspath(folder)
        if os.path.isfile(self.folder):
            raise TurnoverError(f"output_dir {self.folder!r} is a file; give a folder for the result.")
        self.example_ids = example_ids.cpu()
        self.n_columns = n_columns
        self.chunk_size = chunk_size
        manifest = {"key": key, "n_ids": len(example_ids), "n_columns": n_columns, "description": description,
                    "chunk_size": chunk_size}
        path = os.path.join(self.folder, MANIFEST)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as handle:
                    existing = json.load(handle)
                existing.get("key")
            except (ValueError, AttributeError) as err:
                raise TurnoverError(
                    f"{path} is not a readable manifest ({err}); the folder does not hold a result this version can "
                    "continue. Delete the folder to recompute, or choose another output_dir."
                ) from None
            if existing.get("key") != key:
                raise TurnoverError(
                    f"{self.folder!r} already holds another result ({existing.get('description')}); it is kept as it "
                    "is. Choose another output_dir, or delete that folder to recompute."
                )
            recorded = existing.get("chunk_size")
            if recorded is not None and recorded != chunk_size:
                logger.info("%s was started with chunk_size=%d; continuing in that layout (asked: %d).",
                            self.folder, recorded, chunk_size)
                self.chunk_size = int(recorded)
        else:
            os.makedirs(self.folder, exist_ok=True)
            atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")

    def chunks(self) -> list[tuple[int, int, int]]:
        """(index, start, stop) of every shard, in the folder's layout."""
        n = len(self.example_ids)
        return [(k, start, min(start + self.chunk_size, n)) for k, start in enumerate(range(0, n, self.chunk_size))]

    def _shard(self, index: int) -> str:
        return os.path.join(self.folder, f"shard-{index:06d}.safetensors")

    def result(self) -> Optional[torch.Tensor]:
        """The finished (n_ids, n_columns) result, or None if the run is not complete."""
        path = os.path.join(self.folder, RESULT)
        if not os.path.isfile(path):
            return None
        data = load_file(path)
        if not torch.equal(data["example_ids"], self.example_ids):
            raise TurnoverError(f"{path!r} holds scores for other example ids; delete the folder to recompute.")
        if tuple(data["scores"].shape) != (len(self.example_ids), self.n_columns):
            raise TurnoverError(
                f"{path!r} holds scores of shape {tuple(data['scores'].shape)}, not ({len(self.example_ids)}, "
                f"{self.n_columns}); it was written by a faulty earlier run. Delete the folder to recompute."
            )
        return data["scores"]

    def shard(self, index: int) -> Optional[torch.Tensor]:
        """The saved scores of shard ``index``, checked to be the rows of its ids; None if not computed yet."""
        path = self._shard(index)
        if not os.path.isfile(path):
            return None
        _, start, stop = self.chunks()[index]
        data = load_file(path)
        ids = data.get("example_ids")
        if (ids is not None and not torch.equal(ids, self.example_ids[start:stop])) or tuple(data["scores"].shape) != (stop - start, self.n_columns):
            raise TurnoverError(
                f"{path} does not hold the rows {start}..{stop - 1} of this result (another chunk layout or run). "
                "Delete the folder to recompute."
            )
        return data["scores"]

    def write_shard(self, index: int, scores: torch.Tensor) -> None:
        _, start, stop = self.chunks()[index]
        with atomic_path(self._shard(index)) as tmp:
            save_file({"scores": scores.contiguous().cpu(), "example_ids": self.example_ids[start:stop].contiguous()}, tmp)

    def finish(self, scores: torch.Tensor) -> None:
        """Write the final result (after checking its shape) and remove the shards and any temporary leftovers."""
        expected = (len(self.example_ids), self.n_columns)
        if tuple(scores.shape) != expected:
            raise TurnoverError(
                f"the result for {self.folder!r} has shape {tuple(scores.shape)} instead of {expected}; nothing was "
                "written. This is a bug: please report it with the call that produced it."
            )
        with atomic_path(os.path.join(self.folder, RESULT)) as tmp:
            save_file({"example_ids": self.example_ids.contiguous(), "scores": scores.contiguous().cpu()}, tmp)
        for name in os.listdir(self.folder):
            if (name.startswith("shard-") and name.endswith(".safetensors")) or (name.startswith(".") and name.endswith(".tmp")):
                os.remove(os.path.join(self.folder, name))


def _holder(path: str) -> Optional[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as handle:
            holder = json.load(handle)
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stale(path: str, holder: Optional[dict[str, Any]]) -> bool:
    """A claim left by a process that is gone: its pid is dead on this host, or it is unreadable and not young."""
    if holder is None:
        try:
            return time.time() - os.path.getmtime(path) > _YOUNG_SECONDS
        except OSError:
            return True
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


@contextlib.contextmanager
def claim_folder(folder: str) -> Iterator[str]:
    """Hold ``folder`` for this process while a result is computed into it: an atomic claim file (created with
    ``O_CREAT | O_EXCL``, holding the pid and host), removed on exit. A folder another live process holds is refused
    naming that process; a claim left by a process that died is taken over.

    Example:
        >>> with claim_folder("scores/valid"):
        ...     ...        # no other process computes into scores/valid meanwhile
    """
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if not _stale(path, holder):
                who = (f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})" if holder
                       else "another process (starting now)")
                raise TurnoverError(
                    f"output_dir {folder!r} is in use by {who}: two runs cannot compute into one folder. Wait for it "
                    f"to finish, or choose another output_dir; if that process is gone, delete {path!r}."
                ) from None
            aside = f"{path}.stale-{os.getpid()}"
            try:
                os.replace(path, aside)  # atomic: of two processes taking over, one moves the dead claim
            except FileNotFoundError:
                continue
            if _holder(aside) != holder:  # another process claimed it meanwhile: give its claim back
                os.replace(aside, path)
                continue
            os.remove(aside)
            logger.info("took over %s from process %s, which is no longer running.", path, (holder or {}).get("pid"))
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(me, handle)
        break
    else:
        raise TurnoverError(f"could not claim output_dir {folder!r} ({path!r} keeps changing); try again.")
    try:
        yield path
    finally:
        if _holder(path) == me:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


@contextlib.contextmanager
def claim_output(folder: Optional[str], state: Any) -> Iterator[None]:
    """:func:`claim_folder` for a run sharded over ``state``'s processes: the main process claims the folder and every
    process gets its answer, so all of them refuse together (a no-op without a folder)."""
    if folder is None:
        yield
        return
    error, claim = None, None
    if state.is_main_process:
        claim = claim_folder(folder)
        try:
            claim.__enter__()
        except TurnoverError as err:
            error, claim = str(err), None
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error is not None:
        if claim is not None:
            claim.__exit__(None, None, None)
        raise TurnoverError(error)
    try:
        yield
    finally:
        if claim is not None:
            claim.__exit__(None, None, None)
