"""Fingerprints: one sha256 over tensors and JSON-able values, and the one fingerprint of a model's weights that
every saved fit, score result and training record is checked against.

Example:
    >>> fingerprint(torch.zeros(3), {"seed": 0})          # 64 hex digits
    >>> weights_fingerprint(model) == weights_fingerprint(model)
    True
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Optional

import torch
from torch import nn


def fingerprint(*parts: Any) -> str:
    """A sha256 over tensors (their bytes, shape and dtype) and JSON-able values."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(part, dict) and part and all(isinstance(v, torch.Tensor) for v in part.values()):
            for key in sorted(part):
                digest.update(key.encode())
                digest.update(fingerprint(part[key]).encode())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def weights_fingerprint(model: nn.Module, names: Optional[Iterable[str]] = None, *, float32: bool = False) -> str:
    """The fingerprint of ``model``'s parameters (all of them, or those ``names``), by name; with ``float32``, of
    their values as float32 (the same for a model whatever dtype it was loaded in, where that dtype holds them)."""
    named = dict(model.named_parameters())
    chosen = named if names is None else {name: named[name] for name in names}
    return fingerprint({name: p.detach().float() if float32 else p.detach() for name, p in chosen.items()})
