"""The N x D hypergradient table (in memory or memory-mapped), and its projection onto one target set (lean mode)."""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ...data import check_ids_known, rows_of_ids
from ...errors import ConfigMismatchError, TurnoverError
from ...files import PathLike, atomic_path, read_format_meta
from ..gradients import ParamSpec
from .saved import FORMAT, FORMAT_VERSION, IDS_NAME, META_NAME, ROW_CHUNK, TABLE_NPY, TABLE_SAFETENSORS


# ---------------------------------------------------------------------------------------------------------------
# The N x D table
# ---------------------------------------------------------------------------------------------------------------
def _mix(P: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``out[k] = sum_j P[k, j] * X[j]`` per coordinate: P (K, K, D), X (K, ..., D). Elementwise, because a batched
    matmul over D tiny matrices is far slower."""
    shape = (-1,) + (1,) * (X.dim() - 2) + (P.shape[-1],)
    return torch.stack([sum(P[k, j].reshape(shape[1:]) * X[j] for j in range(P.shape[1])) for k in range(P.shape[0])])


def _inverse(P: torch.Tensor) -> torch.Tensor:
    """Inverse of each of the D matrices in a (K, K, D) stack, K in {1, 2}."""
    if P.shape[0] == 1:
        return 1.0 / P
    a, b, c, d = P[0, 0], P[0, 1], P[1, 0], P[1, 1]
    det = a * d - b * c
    return torch.stack([torch.stack([d, -b]), torch.stack([-c, a])]) / det


class Hypergradients:
    """The hypergradient table: one float32 row of ``D`` values per training example, with lazy shared updates.

    Rows are stored as ``S`` and the true values are ``X = P S`` per coordinate, where ``P`` is a (K, K, D) stack
    of small matrices (K = 2 when momentum is tracked: state ``(h, m)``; else K = 1). A step whose linear map
    ``A`` (momentum, weight decay, learning rate) is the same for every row only updates ``P <- A P``; the rows of
    the step's examples receive their gradient term as ``S += P^-1 b c``. When ``P`` mixes the two state components
    badly (balanced condition number above ``rebase_condition``, see :meth:`_condition`) the table is rewritten as
    ``S <- P S``, ``P <- I``, which keeps float32 rows accurate to about ``rebase_condition`` ulps.

    With ``storage_dir`` the arrays are ``.npy`` memory maps in that folder (tables larger than RAM); otherwise
    numpy arrays in memory.

    Example:
        >>> table = Hypergradients(torch.arange(100), dim=4096, storage_dir="runs/hydra")
        >>> table.read(table.rows_of(torch.tensor([3, 7]))).shape          # (2, 4096)
    """

    def __init__(
        self,
        example_ids: torch.Tensor,
        dim: int,
        *,
        storage_dir: Optional[PathLike] = None,
        rebase_condition: float = 100.0,
        dtype: Any = np.float32,
        _arrays: Optional[list[np.ndarray]] = None,
        _seen: Optional[np.ndarray] = None,
    ) -> None:
        ids = check_ids_known(torch.as_tensor(example_ids), None).cpu()
        self.example_ids = ids
        self._order = torch.argsort(ids)
        self._sorted = ids[self._order]
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self.storage_dir = os.fspath(storage_dir) if storage_dir is not None else None
        self.rebase_condition = float(rebase_condition)
        self.arrays: list[np.ndarray] = _arrays if _arrays is not None else [self._new_array(TABLE_NPY)]
        self.P = torch.ones(1, 1, self.dim, dtype=torch.float64)
        self.seen = _seen if _seen is not None else np.zeros(len(ids), dtype=np.int64)

    # -- layout ---------------------------------------------------------------------------------------------
    def _new_array(self, name: str) -> np.ndarray:
        shape = (len(self.example_ids), self.dim)
        if self.storage_dir is None:
            return np.zeros(shape, dtype=self.dtype)
        if os.path.isfile(os.path.join(self.storage_dir, META_NAME)):
            raise TurnoverError(
                f"{self.storage_dir!r} holds a saved HYDRA result; it is kept as it is. Choose another storage_dir."
            )
        os.makedirs(self.storage_dir, exist_ok=True)
        # open_memmap writes a real .npy header, so the file loads with np.load(mmap_mode="r") later.
        return np.lib.format.open_memmap(os.path.join(self.storage_dir, name), mode="w+", dtype=self.dtype, shape=shape)

    @property
    def K(self) -> int:
        return self.P.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def ensure_momentum(self) -> None:
        """Add the momentum half of the state (zeros) the first time an optimizer with momentum is tracked."""
        if self.K == 2:
            return
        self.arrays.append(self._new_array("hydra_momentum.npy"))
        P = torch.zeros(2, 2, self.dim, dtype=torch.float64)
        P[0, 0], P[1, 1] = self.P[0, 0], 1.0
        self.P = P

    def rows_of(self, example_ids: torch.Tensor) -> torch.Tensor:
        """Row index of each id; unknown ids raise :class:`ExampleIdError`."""
        return rows_of_ids(self._sorted, self._order, example_ids)

    # -- reading and writing --------------------------------------------------------------------------------
    def read_state(self, rows: torch.Tensor) -> torch.Tensor:
        """True state ``X = P S`` of these rows, float64 ``(K, n, D)``."""
        idx = rows.numpy()
        return _mix(self.P, torch.stack([torch.from_numpy(np.asarray(a[idx])).double() for a in self.arrays]))

    def _state_block(self, start: int, stop: int) -> torch.Tensor:
        """True state of the contiguous rows ``start:stop`` (slices, not fancy indexing: no copy of the index)."""
        return _mix(self.P, torch.stack([torch.from_numpy(np.asarray(a[start:stop])).double() for a in self.arrays]))

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        """Hypergradients ``h`` of these rows, float32 ``(n, D)``."""
        if self.K == 1 and bool((self.P == 1).all()):
            return torch.from_numpy(np.asarray(self.arrays[0][rows.numpy()])).float()
        return self.read_state(rows)[0].float()

    def _add(self, k: int, rows: torch.Tensor, values: torch.Tensor) -> None:
        # Rows may repeat within a step (an example in two micro-batches): sum duplicates before the fancy "+=".
        unique, inverse = torch.unique(rows, return_inverse=True)
        summed = torch.zeros(len(unique), values.shape[1], dtype=torch.float64).index_add_(0, inverse, values)
        idx = unique.numpy()
        # numpy casts to the array's dtype on assignment (float32 tables; float64 for the lean projections)
        self.arrays[k][idx] = (torch.from_numpy(np.asarray(self.arrays[k][idx])).double() + summed).numpy()

    def rebase(self) -> None:
        """Rewrite the table as its true values (``S <- P S``, ``P <- I``), chunk by chunk."""
        if bool((self.P == torch.eye(self.K, dtype=torch.float64)[..., None]).all()):
            return
        n = len(self.example_ids)
        for start in range(0, n, ROW_CHUNK):
            stop = min(start + ROW_CHUNK, n)
            X = self._state_block(start, stop)
            for k, array in enumerate(self.arrays):
                array[start:stop] = X[k].numpy()
        self.P = torch.eye(self.K, dtype=torch.float64)[..., None].repeat(1, 1, self.dim)

    # -- updates --------------------------------------------------------------------------------------------
    def apply(self, A: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, C: torch.Tensor) -> None:
        """One step for every row: ``x <- A x`` (shared map), plus ``b * c`` on the rows of the step's examples.

        ``A`` is (K, K, D), ``b`` (K, D), ``C`` (len(rows), D): the gradient terms of the step's examples.
        """
        P = _mix(A, self.P)  # A @ P per coordinate
        Q = _mix(_inverse(P), b)
        self.P = P
        if len(rows):
            C = C.double()
            for k in range(self.K):
                self._add(k, rows, C * Q[k])
        if self._condition() > self.rebase_condition:
            self.rebase()

    def apply_dense(self, A: torch.Tensor, b: torch.Tensor, C_all: torch.Tensor) -> None:
        """``x <- A x + b * c`` with a term ``c`` for every row (the exact mode's Hessian term), ``C_all`` (N, D)."""
        self.rebase()
        n = len(self.example_ids)
        for start in range(0, n, ROW_CHUNK):
            stop = min(start + ROW_CHUNK, n)
            new = _mix(A, self._state_block(start, stop)) + b[:, None, :] * C_all[start:stop].double()[None]
            for k, array in enumerate(self.arrays):
                array[start:stop] = new[k].numpy()

    def _condition(self) -> float:
        """How much float32 accuracy the lazy form can lose, worst coordinate (1 = none).

        Rows hold sums of terms ``P_j^-1 b c`` read back through ``P``; accuracy is lost to cancellation only when
        ``P`` mixes the two state components badly. Storage precision does not depend on the units of ``h`` and
        ``m`` (Adam's ``lr / sqrt(v)`` can be 1e4), so the measure is the condition number after balancing the
        diagonal scales: ``(p^2 + r^2 + 2 |q s|) / (2 |det|)`` for ``P = [[p, q], [s, r]]`` (1 for the identity,
        ``beta^-t`` after ``t`` steps of a momentum ``beta``). A scalar (K = 1) never cancels; there only the
        float32 range matters.
        """
        if self.K == 1:
            mag = self.P.abs()[0, 0]
            return 1.0 if float(torch.maximum(mag, 1.0 / mag).max()) < 1e30 else math.inf
        p, q, s_, r = self.P[0, 0], self.P[0, 1], self.P[1, 0], self.P[1, 1]
        det = (p * r - q * s_).abs()
        balanced = (p * p + r * r + 2 * (q * s_).abs()) / (2 * det)
        scale = torch.maximum(self.P.abs().amax((0, 1)), _inverse(self.P).abs().amax((0, 1)))
        return float(torch.where(scale < 1e30, balanced, torch.full_like(balanced, math.inf)).max())

    # -- files ----------------------------------------------------------------------------------------------
    def save_arrays(self, folder: PathLike) -> str:
        """Write the true hypergradients (after a rebase) and the ids to ``folder``; return the table's file name."""
        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        self.rebase()
        table = self.arrays[0]
        with atomic_path(os.path.join(folder, IDS_NAME)) as tmp:
            save_file({"example_ids": self.example_ids.contiguous(), "seen": torch.from_numpy(self.seen.copy())}, tmp)
        if isinstance(table, np.memmap):
            table.flush()
            target = os.path.join(folder, TABLE_NPY)
            if os.path.abspath(target) != os.path.abspath(table.filename):
                with atomic_path(target) as tmp:
                    shutil.copyfile(table.filename, tmp)
            return TABLE_NPY
        with atomic_path(os.path.join(folder, TABLE_SAFETENSORS)) as tmp:
            save_file({"hypergradients": torch.from_numpy(table)}, tmp)
        return TABLE_SAFETENSORS

    @classmethod
    def load_arrays(cls, folder: PathLike, table_name: str, dim: int, mmap: bool = True) -> "Hypergradients":
        folder = os.fspath(folder)
        ids = load_file(os.path.join(folder, IDS_NAME))
        path = os.path.join(folder, table_name)
        if table_name.endswith(".npy"):
            table = np.load(path, mmap_mode="r" if mmap else None)
        else:
            table = load_file(path)["hypergradients"].numpy()
        if table.shape != (len(ids["example_ids"]), dim):
            raise ConfigMismatchError(f"{path!r} has shape {table.shape}, expected {(len(ids['example_ids']), dim)}.")
        return cls(ids["example_ids"], dim, _arrays=[table], _seen=ids["seen"].numpy().copy())


class ProjectedHypergradients:
    """Lean storage: the projections ``G_q . h_i`` onto ``Q`` fixed target gradients instead of ``h_i`` itself.

    With SGD (momentum, dampening, Nesterov, weight decay, any learning-rate schedule, clipping) a step's
    recurrence is one linear map per optimizer parameter group, the same for every coordinate of the group, plus
    the example's gradient term. Projecting onto the part ``G_q|g`` of a target gradient that lies in group ``g``
    therefore commutes with the step: ``(G_q|g . h_i, G_q|g . m_i)`` follows the group's map with the term
    ``G_q|g . c_i`` in place of ``c_i``. Each group keeps one such table of ``N x Q`` float64 values (twice that with
    momentum): a :class:`Hypergradients` with ``D = Q``, whose lazy shared map keeps each step's work on its own
    rows. ``G_q . h_i`` is the sum over the groups.

    Adam's per-coordinate preconditioner does not commute with the projection, nor does a step that moves the
    coordinates of one group by different maps (a parameter without gradient while it carries state): the first is
    refused before training, the second when it happens.

    Example:
        >>> table = ProjectedHypergradients(torch.arange(100), target_grads)      # target_grads: (Q, D)
        >>> table.read(table.rows_of(torch.tensor([3, 7]))).shape                  # (2, Q): G_q . h_i
    """

    def __init__(self, example_ids: torch.Tensor, targets: torch.Tensor, *, rebase_condition: float = 100.0) -> None:
        ids = check_ids_known(torch.as_tensor(example_ids), None).cpu()
        self.example_ids = ids
        self._order = torch.argsort(ids)
        self._sorted = ids[self._order]
        self.targets = targets.detach().double().cpu()  # (Q, D)
        self.dim = self.targets.shape[1]
        self.rebase_condition = float(rebase_condition)
        self.seen = np.zeros(len(ids), dtype=np.int64)
        self.groups: Optional[list[tuple[torch.Tensor, Hypergradients]]] = None
        self.momentum = False
        self.active = torch.ones(self.dim, dtype=torch.bool)  # columns whose parameter has a gradient this step
        self._touched = torch.zeros(self.dim, dtype=torch.bool)  # columns that may hold state already

    @property
    def K(self) -> int:
        return 2 if self.momentum else 1

    @property
    def nbytes(self) -> int:
        return sum(table.nbytes for _, table in self.groups or [])

    def rows_of(self, example_ids: torch.Tensor) -> torch.Tensor:
        return rows_of_ids(self._sorted, self._order, example_ids)

    def ensure_momentum(self) -> None:
        self.momentum = True
        for _, table in self.groups or []:
            table.ensure_momentum()

    def set_groups(self, columns: Sequence[torch.Tensor]) -> None:
        """The tracked columns of each optimizer parameter group (fixed for the run)."""
        q = self.targets.shape[0]
        self.groups = [(cols, Hypergradients(self.example_ids, q, rebase_condition=self.rebase_condition,
                                             dtype=np.float64)) for cols in columns]
        if self.momentum:
            self.ensure_momentum()

    @staticmethod
    def _uniform(values: torch.Tensor, group: int) -> torch.Tensor:
        if not bool((values == values[..., :1]).all()):
            raise TurnoverError(
                f"lean HYDRA: one optimizer step moved the parameters of parameter group {group} by different maps "
                "(e.g. a parameter received no gradient while the others did, after it had been trained); the "
                "projections need one map per group. Use hydra_mode='full'."
            )
        return values[..., 0]

    def apply(self, A: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, C: torch.Tensor) -> None:
        """One step (same arguments as :meth:`Hypergradients.apply`, with the full ``D`` columns)."""
        if self.groups is None:
            raise TurnoverError("lean HYDRA: set_groups(...) must be called before the first step.")
        q, K = self.targets.shape[0], self.K
        C = C.double()
        for g, (cols, table) in enumerate(self.groups):
            held = cols[self._touched[cols]]  # state may be nonzero here: the map must be the group's one
            fed = cols[self.active[cols]]  # these receive this step's gradient term
            if not len(held) and not len(fed):
                continue
            Ag = self._uniform(A[:, :, held], g) if len(held) else torch.eye(K, dtype=torch.float64)
            bg = self._uniform(b[:, fed], g) if len(fed) else torch.zeros(K, dtype=torch.float64)
            proj = C[:, fed] @ self.targets[:, fed].T if len(fed) else torch.zeros(len(rows), q, dtype=torch.float64)
            table.apply(Ag[..., None].expand(K, K, q), bg[:, None].expand(K, q), rows, proj)
        self._touched |= self.active

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        """``G_q . h_i`` of these rows, float64 ``(n, Q)``."""
        out = torch.zeros(len(rows), self.targets.shape[0], dtype=torch.float64)
        for _, table in self.groups or []:
            out += table.read_state(rows)[0]
        return out


@dataclass
class SavedHypergradients:
    """A saved HYDRA result: the table, the tracked parameters, and the metadata of ``hydra.json``."""

    table: Hypergradients
    specs: list[ParamSpec]
    meta: dict[str, Any]

    @classmethod
    def load(cls, folder: PathLike, mmap: bool = True) -> "SavedHypergradients":
        """Read a folder written by :meth:`HydraTracker.save` (``.npy`` tables are memory-mapped)."""
        meta = read_format_meta(folder, META_NAME, FORMAT, FORMAT_VERSION, "HYDRA result")
        specs, offset = [], 0
        for p in meta["parameters"]:
            specs.append(ParamSpec(p["name"], tuple(p["shape"]), offset))
            offset += specs[-1].numel
        table = Hypergradients.load_arrays(folder, meta["table"], meta["dim"], mmap=mmap)
        return cls(table, specs, meta)
