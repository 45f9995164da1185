"""A seeded CountSketch of per-example gradients: identical on every device and process, O(D) memory."""

from __future__ import annotations

from typing import Sequence

import torch

from ...errors import TurnoverError
from ...masks import keyed_hash, salted_hash
from ..gradients import ParamSpec

_SIGN_SALT = 0x5BD1E995


# ---------------------------------------------------------------------------------------------------------------
# CountSketch
# ---------------------------------------------------------------------------------------------------------------
class CountSketch:
    """A fixed random projection of ``D`` parameter coordinates to ``dim``: coordinate ``i`` goes to one bucket with
    a random sign, both from the integer hash of ``(seed, parameter name, index)``.

    ``O(D)`` memory (a bucket and a sign per coordinate), generated on the CPU with integer ops, so the sketch is
    the same on every device and in every process; applied with ``index_add_``. ``E[<S a, S b>] = <a, b>``.

    Example:
        >>> sketch = CountSketch(param_specs(model, None), dim=4096, seed=0)
        >>> sketch(grads).shape                                  # (B, D) -> (B, 4096)
    """

    def __init__(self, specs: Sequence[ParamSpec], dim: int, seed: int = 0) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise TurnoverError(f"projection_dim must be a positive integer (e.g. 4096), got {dim!r}.")
        self.dim = dim
        self.seed = int(seed)
        buckets, signs = [], []
        for spec in specs:
            hashed = keyed_hash(self.seed, spec.name, torch.arange(spec.numel, dtype=torch.int64))
            buckets.append(hashed % dim)
            signs.append(1.0 - 2.0 * (salted_hash(hashed, _SIGN_SALT) & 1).float())
        self.buckets = torch.cat(buckets)
        self.signs = torch.cat(signs)
        self._on: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """Sketch the rows of ``flat`` ``(B, D)`` to ``(B, dim)`` (same device and dtype)."""
        key = (flat.device, flat.dtype)
        if key not in self._on:
            self._on[key] = (self.buckets.to(flat.device), self.signs.to(flat.device, flat.dtype))
        buckets, signs = self._on[key]
        return flat.new_zeros(flat.shape[0], self.dim).index_add_(1, buckets, flat * signs)
