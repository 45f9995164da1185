"""The on-disk store of projected training gradients: one plain ``.npy`` float32 file of ``(rows, k)`` and one of
int64 example ids per process that wrote rows, read back in blocks with ordinary file reads (the store is never
mapped or held whole in memory: what stays resident is one block)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from ...data import check_ids_known, rows_of_ids
from ...errors import ConfigMismatchError, TurnoverError
from ...files import PathLike, atomic_path

BLOCK_ROWS = 4096  # rows read from a shard at once


SHARD_PREFIXES = ("gradients-", "example_ids-")


def shard_names(rank: int, world: int) -> tuple[str, str]:
    """File names of the gradients and ids written by process ``rank`` of ``world``."""
    tag = f"{rank:05d}-of-{world:05d}"
    return f"{SHARD_PREFIXES[0]}{tag}.npy", f"{SHARD_PREFIXES[1]}{tag}.npy"


def ids_name(gradients_name: str) -> str:
    """The ids file beside a gradients file of the store."""
    return gradients_name.replace(SHARD_PREFIXES[0], SHARD_PREFIXES[1], 1)


def is_shard_file(name: str) -> bool:
    """Whether a file name is one a :class:`RowWriter` writes (gradients or ids of some process)."""
    return name.startswith(SHARD_PREFIXES) and name.endswith(".npy")


class RowWriter:
    """Writes ``rows`` x ``dim`` float32 gradients and their ids to ``folder`` as they come (atomically: the files
    appear under their names only when every row was written).

    Example:
        >>> with RowWriter(folder, rank=0, world=1, rows=n, dim=k) as writer:
        ...     writer.write(ids, grads)
    """

    def __init__(self, folder: PathLike, rank: int, world: int, rows: int, dim: int) -> None:
        self.folder, self.rows, self.dim = os.fspath(folder), int(rows), int(dim)
        self.names = shard_names(rank, world)
        self.written = 0
        self.ids = np.empty(self.rows, dtype=np.int64)

    def __enter__(self) -> "RowWriter":
        self._grads_path = atomic_path(os.path.join(self.folder, self.names[0]))
        tmp = self._grads_path.__enter__()
        self._handle = open(tmp, "wb")
        np.lib.format.write_array_header_2_0(
            self._handle, {"descr": np.dtype("<f4").str, "fortran_order": False, "shape": (self.rows, self.dim)})
        return self

    def write(self, example_ids: torch.Tensor, grads: torch.Tensor) -> None:
        n = len(example_ids)
        if self.written + n > self.rows or grads.shape != (n, self.dim):
            raise TurnoverError(f"the gradient store expected {self.rows} rows of {self.dim}; got more or another width.")
        self.ids[self.written : self.written + n] = example_ids.cpu().numpy()
        self._handle.write(np.ascontiguousarray(grads.detach().cpu().float().numpy(), dtype="<f4").tobytes())
        self.written += n

    def __exit__(self, kind: object, value: object, trace: object) -> None:
        self._handle.close()
        if kind is None and self.written != self.rows:
            short = TurnoverError(f"the gradient store got {self.written} of {self.rows} rows.")
            self._grads_path.__exit__(TurnoverError, short, None)  # removes the temporary file
            raise short
        self._grads_path.__exit__(kind, value, trace)
        if kind is None:
            with atomic_path(os.path.join(self.folder, self.names[1])) as tmp:
                with open(tmp, "wb") as handle:
                    np.save(handle, self.ids, allow_pickle=False)


@dataclass
class _Shard:
    path: str
    offset: int  # bytes before the first row
    rows: int


class RowStore:
    """Read access to the stored gradients of every shard in ``folder`` (``files``: the gradient files, in order).

    Example:
        >>> store = RowStore(folder, ["gradients-00000-of-00001.npy"], dim=4096)
        >>> store.read(torch.tensor([3, 7]))        # (2, 4096) float32, by example id
    """

    def __init__(self, folder: PathLike, files: Sequence[str], dim: int) -> None:
        self.folder, self.files, self.dim = os.fspath(folder), list(files), int(dim)
        self.shards: list[_Shard] = []
        ids = []
        for name in self.files:
            path = os.path.join(self.folder, name)
            id_path = os.path.join(self.folder, ids_name(name))
            if not os.path.isfile(path) or not os.path.isfile(id_path):
                raise ConfigMismatchError(
                    f"the projected-gradient store in {self.folder!r} lacks {name!r} or its ids: the fit is "
                    "incomplete. Delete the folder and fit again."
                )
            with open(path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(handle)
                offset = handle.tell()
            if fortran or dtype != np.dtype("<f4") or len(shape) != 2 or shape[1] != self.dim:
                raise ConfigMismatchError(f"{path!r} is not a (rows, {self.dim}) float32 gradient store.")
            shard_ids = np.load(id_path, allow_pickle=False)
            if shard_ids.shape != (shape[0],):
                raise ConfigMismatchError(f"{id_path!r} holds {shard_ids.shape} ids for {shape[0]} stored rows.")
            self.shards.append(_Shard(path, offset, shape[0]))
            ids.append(torch.from_numpy(shard_ids))
        self.example_ids = check_ids_known(torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64), None)
        self._order = torch.argsort(self.example_ids)
        self._sorted = self.example_ids[self._order]
        self._starts = np.cumsum([0] + [s.rows for s in self.shards])

    def __len__(self) -> int:
        return len(self.example_ids)

    def positions(self, example_ids: torch.Tensor) -> torch.Tensor:
        """Rows of the store holding these ids (refusing ids it does not hold, naming them)."""
        return rows_of_ids(self._sorted, self._order, check_ids_known(torch.as_tensor(example_ids).cpu(), self.example_ids))

    def read(self, example_ids: torch.Tensor) -> torch.Tensor:
        """``(n, k)`` float32 gradients of these ids, in their order."""
        positions = self.positions(example_ids).numpy()
        out = np.empty((len(positions), self.dim), dtype=np.float32)
        order = np.argsort(positions, kind="stable")
        wanted = positions[order]
        for start, stop, block in self._blocks(int(wanted[0]) if len(wanted) else 0,
                                               int(wanted[-1]) + 1 if len(wanted) else 0):
            inside = (wanted >= start) & (wanted < stop)
            out[order[inside]] = block[wanted[inside] - start]
        return torch.from_numpy(out)

    def blocks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(example ids, (n, k) float32 gradients)`` of every stored row, block by block."""
        for start, stop, block in self._blocks(0, len(self)):
            yield self.example_ids[start:stop], torch.from_numpy(block)

    def _blocks(self, first: int, last: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """Rows ``first .. last - 1`` (store positions) in blocks of at most :data:`BLOCK_ROWS`, read from disk."""
        for shard, begin in zip(self.shards, self._starts[:-1]):
            lo, hi = max(first, begin), min(last, begin + shard.rows)
            if lo >= hi:
                continue
            with open(shard.path, "rb") as handle:
                for start in range(lo, hi, BLOCK_ROWS):
                    stop = min(start + BLOCK_ROWS, hi)
                    handle.seek(shard.offset + (start - begin) * self.dim * 4)
                    block = np.fromfile(handle, dtype="<f4", count=(stop - start) * self.dim)
                    if block.size != (stop - start) * self.dim:
                        raise ConfigMismatchError(f"{shard.path!r} is truncated: delete the folder and fit again.")
                    yield int(start), int(stop), block.reshape(stop - start, self.dim)
