"""Resumable score results on disk: a manifest, one safetensors shard per chunk of training ids, a final file.

A folder holds exactly one result. Its manifest records a fingerprint of what was asked (model weights, mask
config, targets, ids); a later call with the same question continues from the shards already written, and a
different question is refused instead of overwriting anything. Every file is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from .errors import TurnoverError
from .files import atomic_path, atomic_write_text

MANIFEST = "manifest.json"
RESULT = "scores.safetensors"


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


class ScoreStore:
    """One resumable result in ``folder``: rows = training ids (in the asked order), columns = targets."""

    def __init__(self, folder: str, key: str, example_ids: torch.Tensor, n_columns: int, description: str) -> None:
        self.folder = os.fspath(folder)
        self.example_ids = example_ids.cpu()
        self.n_columns = n_columns
        manifest = {"key": key, "n_ids": len(example_ids), "n_columns": n_columns, "description": description}
        path = os.path.join(self.folder, MANIFEST)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                existing = json.load(handle)
            if existing.get("key") != key:
                raise TurnoverError(
                    f"{self.folder!r} already holds another result ({existing.get('description')}); it is kept as it "
                    "is. Choose another output_dir, or delete that folder to recompute."
                )
        else:
            os.makedirs(self.folder, exist_ok=True)
            atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")

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
        return data["scores"]

    def shard(self, index: int) -> Optional[torch.Tensor]:
        path = self._shard(index)
        return load_file(path)["scores"] if os.path.isfile(path) else None

    def write_shard(self, index: int, scores: torch.Tensor) -> None:
        with atomic_path(self._shard(index)) as tmp:
            save_file({"scores": scores.contiguous().cpu()}, tmp)

    def finish(self, scores: torch.Tensor) -> None:
        with atomic_path(os.path.join(self.folder, RESULT)) as tmp:
            save_file({"example_ids": self.example_ids.contiguous(), "scores": scores.contiguous().cpu()}, tmp)
