"""Instance-specific dropout masks, generated on the fly from (seed, layer key, example id, unit).

Nothing is stored: every bit is a 32-bit integer hash of its coordinates compared with a threshold, computed with
vectorised int64 tensor ops on the device of ``example_ids``. Intermediate values never exceed 2**49, so no integer
overflow happens and the bits are identical on every device, for every batch composition, order and process count.

Two schemes:

* ``"independent"``: each (example, unit) bit is its own hash; a unit is kept with probability ``1 - p``.
* ``"hashed"``: the codebook composition of Kobayashi et al. (2020, App. D). A virtual codebook of
  ``codebook_size`` rows per layer keeps each unit with probability ``(1 - p) ** (1 / codebook_picks)``; an
  example ANDs ``codebook_picks`` distinct rows chosen by hashing its id, so it keeps a fraction ``1 - p``.
  Rows are hashed when needed, so the codebook is never materialised either.

Example:
    >>> ids = torch.tensor([0, 1, 2])
    >>> m = mask_for(ids, "classifier", 8, p=0.5, seed=0)   # (3, 8), values in {0, 2}
    >>> torch.equal(m + flip(m, p=0.5), torch.full_like(m, 2.0))
    True
"""

from __future__ import annotations

import functools
import zlib
from typing import Any, Literal, Union

import torch

Scheme = Literal["independent", "hashed"]
SCHEMES: tuple[str, ...] = ("independent", "hashed")

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_ROW_SALT = 0x2545F491
_PICK_SALT = 0x68E31DA4

IntOrTensor = Union[int, torch.Tensor]


def _mul32(x: IntOrTensor, c: int) -> IntOrTensor:
    """``(x * c) mod 2**32`` for ``0 <= x < 2**32`` without int64 overflow (16-bit limbs)."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _fmix32(h: IntOrTensor) -> IntOrTensor:
    """MurmurHash3's 32-bit finaliser: a bijection with full avalanche; works on ints and int64 tensors."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def layer_hash(layer_key: str) -> int:
    """A stable 32-bit hash of a layer key (the module's qualified name)."""
    return zlib.crc32(layer_key.encode("utf-8")) & _M32


def _layer_base(seed: int, layer_key: str) -> int:
    h = _fmix32((seed & _M32) ^ _GOLDEN)
    h = _fmix32(h ^ ((seed >> 32) & _M32))
    return _fmix32(h ^ layer_hash(layer_key))


def _example_hash(base: int, example_ids: torch.Tensor) -> torch.Tensor:
    h = _fmix32((example_ids & _M32) ^ base)
    return _fmix32(h ^ (example_ids >> 32))


def keyed_hash(seed: int, key: str, indices: torch.Tensor) -> torch.Tensor:
    """32-bit hashes (int64 tensor) of ``indices`` under ``(seed, key)``: the integer hash masks are drawn from,
    for other seeded draws that must agree on every device (e.g. a gradient sketch's buckets)."""
    return _example_hash(_layer_base(seed, key), indices)


def salted_hash(hashes: IntOrTensor, salt: int) -> IntOrTensor:
    """An independent 32-bit hash derived from ``hashes`` and ``salt`` (e.g. a random sign per coordinate)."""
    return _fmix32(hashes ^ salt)


@functools.lru_cache(maxsize=512)
def _unit_hash(units: int, device: torch.device) -> torch.Tensor:
    # Cached per (width, device): every layer of a width asks for the same values on every forward.
    u = torch.arange(units, dtype=torch.int64, device=device)
    return _fmix32(_mul32(u, _GOLDEN) ^ 0x7F4A7C15)


@functools.lru_cache(maxsize=512)
def _codebook(base: int, units: int, threshold: int, codebook_size: int, device: torch.device) -> torch.Tensor:
    """The virtual codebook of one layer, (codebook_size, units) bools; cached, it depends on no example."""
    rows = torch.arange(codebook_size, dtype=torch.int64, device=device)
    row_hash = _fmix32(_fmix32(rows ^ _fmix32(base ^ _ROW_SALT)))
    return _fmix32(row_hash[:, None] ^ _unit_hash(units, device)[None, :]) < threshold


def _threshold(keep_probability: float) -> int:
    return min(int(round(keep_probability * 2**32)), 2**32)


def validate_drop_ratio(p: float) -> float:
    """Return ``p`` as a float if it is a usable drop ratio, else raise a ``ValueError`` that says so."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < float(p) < 1.0):
        raise ValueError(f"p (the drop ratio) must be a number strictly between 0 and 1, got {p!r}; 0.5 is the default.")
    return float(p)


def validate_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not (0 <= seed < 2**63):
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}.")
    return seed


def check_example_ids(example_ids: torch.Tensor) -> torch.Tensor:
    """Validate a batch of example ids: a 1-D integer tensor of non-negative values; returns it as int64."""
    if not isinstance(example_ids, torch.Tensor):
        try:
            example_ids = torch.as_tensor(example_ids)
        except (TypeError, ValueError, RuntimeError):
            shown = repr(example_ids)
            raise ValueError(
                f"example_ids must be non-negative integers, got {shown[:80] + ('...' if len(shown) > 80 else '')}; "
                "use the ids of the dataset's id column (turnover_hf.add_example_ids adds them)."
            ) from None
    if example_ids.dtype in (torch.bool,) or example_ids.is_floating_point() or example_ids.is_complex():
        raise ValueError(f"example_ids must be an integer tensor, got dtype {example_ids.dtype}.")
    if example_ids.dim() != 1:
        raise ValueError(f"example_ids must be 1-D (one id per example in the batch), got shape {tuple(example_ids.shape)}.")
    example_ids = example_ids.to(torch.int64)
    if example_ids.numel() and bool((example_ids < 0).any()):
        raise ValueError("example_ids must be non-negative integers; add them with turnover_hf.add_example_ids(dataset).")
    return example_ids


def _pick_rows(ex_hash: torch.Tensor, codebook_size: int, picks: int) -> torch.Tensor:
    """``picks`` distinct codebook rows per example (sequential sampling without replacement), shape (B, picks)."""
    chosen: list[torch.Tensor] = []
    for j in range(picks):
        r = torch.remainder(_fmix32(ex_hash ^ _mul32(j + 1, _PICK_SALT)), codebook_size - j)
        if chosen:
            # Skip over rows already taken, visiting them in ascending order, to map r onto the unused rows.
            for c in torch.sort(torch.stack(chosen, dim=1), dim=1).values.unbind(1):
                r = r + (r >= c).to(r.dtype)
        chosen.append(r)
    return torch.stack(chosen, dim=1)


def keep_bits(
    example_ids: torch.Tensor,
    layer_key: str,
    units: int,
    *,
    p: float = 0.5,
    seed: int = 0,
    scheme: Scheme = "independent",
    codebook_size: int = 64,
    codebook_picks: int = 4,
) -> torch.Tensor:
    """Boolean keep bits of shape ``(len(example_ids), units)`` on ``example_ids.device``; True = unit kept."""
    p = validate_drop_ratio(p)
    seed = validate_seed(seed)
    example_ids = check_example_ids(example_ids)
    if units < 1:
        raise ValueError(f"units must be >= 1, got {units}.")
    device = example_ids.device
    base = _layer_base(seed, layer_key)
    ex = _example_hash(base, example_ids)
    unit = _unit_hash(units, device)
    if scheme == "independent":
        return _fmix32(ex[:, None] ^ unit[None, :]) < _threshold(1.0 - p)
    if scheme == "hashed":
        if not (1 <= codebook_picks <= codebook_size):
            raise ValueError(
                f"the hashed scheme needs 1 <= codebook_picks <= codebook_size, got picks={codebook_picks}, "
                f"size={codebook_size}."
            )
        rows = _pick_rows(_fmix32(ex ^ _PICK_SALT), codebook_size, codebook_picks)  # (B, k)
        codebook = _codebook(base, units, _threshold((1.0 - p) ** (1.0 / codebook_picks)), codebook_size, device)
        return codebook[rows].all(dim=1)
    raise ValueError(f"unknown mask scheme {scheme!r}; choose one of {SCHEMES}.")


def scale_of(p: float) -> float:
    """The value of a kept unit, ``1 / (1 - p)`` (inverted-dropout scaling)."""
    return 1.0 / (1.0 - validate_drop_ratio(p))


def mask_for(
    example_ids: torch.Tensor,
    layer_key: str,
    units: int,
    *,
    flipped: Union[bool, torch.Tensor] = False,
    dtype: torch.dtype = torch.float32,
    **scheme: Any,
) -> torch.Tensor:
    """The scaled masks m(z) (or, where ``flipped``, the flipped masks) of a batch, shape ``(B, units)``.

    ``flipped`` is a bool for the whole batch or a bool tensor of shape ``(B,)`` choosing per row; ``scheme`` holds
    the keyword arguments of :func:`keep_bits` (``p``, ``seed``, ``scheme``, ``codebook_size``, ``codebook_picks``).

    Example:
        >>> m = mask_for(torch.tensor([7, 8]), "bert.encoder.layer.5.output.adapters.a.adapter_up", 16, p=0.5)
        >>> m.shape
        torch.Size([2, 16])
    """
    bits = keep_bits(example_ids, layer_key, units, **scheme)
    if isinstance(flipped, torch.Tensor):
        bits = bits ^ flipped.to(device=bits.device, dtype=torch.bool)[:, None]
    elif flipped:
        bits = ~bits
    return bits.to(dtype) * scale_of(scheme.get("p", 0.5))


def flip(mask: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """The flipped mask ``1 / (1 - p) - m``: the units ``m`` dropped, scaled; the sub-network that never saw z."""
    return scale_of(p) - mask
