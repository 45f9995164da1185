"""Where every setting's data come from: the offline Rotten Tomatoes corpus and its fingerprint, on-disk caches of
what frozen layers make of it (valid only for the corpus they were computed on), and the flipped labels of the
mislabel test."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import turnover_hf as th
from turnover_hf.files import atomic_path

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
CACHE_DIR = RESULTS_DIR / "cache"


def texts_fingerprint(example_ids: Sequence[int], texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for example_id, text in zip(example_ids, texts):
        digest.update(f"{example_id}\t{text}\n".encode())
    return digest.hexdigest()


def corpus() -> tuple[list[tuple[int, str, int]], str]:
    """Every review of every split as ``(example_id, text, label)`` in id order, and the fingerprint of the texts."""
    splits = th.assets.rotten_tomatoes().values()
    rows = sorted(
        (int(i), t, int(y)) for s in splits for i, t, y in zip(s["example_id"], s["text"], s["label"])
    )
    return rows, texts_fingerprint([i for i, _, _ in rows], [t for _, t, _ in rows])


def load_cache(path: Path, fingerprint: str) -> dict[str, torch.Tensor] | None:
    """The tensors of a cache file written for the corpus with this fingerprint; None if absent or stale."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as handle:
        valid = (handle.metadata() or {}).get("texts_sha256") == fingerprint
    return load_file(str(path)) if valid else None


def save_cache(path: Path, tensors: dict[str, torch.Tensor], fingerprint: str, **metadata: str) -> None:
    """Write a cache file that :func:`load_cache` accepts for this corpus fingerprint (``metadata``: what it holds)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"texts_sha256": fingerprint, **metadata})


def with_flipped_labels(
    labels: torch.Tensor, fraction: float, seed: int, num_labels: int = 2
) -> tuple[torch.Tensor, np.ndarray]:
    """``labels`` with a random ``fraction`` of rows moved to another class, and the boolean mask of those rows."""
    rng = np.random.default_rng(seed)
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[rng.permutation(len(labels))[: round(fraction * len(labels))]] = True
    shift = torch.as_tensor(rng.integers(1, num_labels, size=len(labels)))
    noisy = torch.where(torch.as_tensor(flipped), (labels + shift) % num_labels, labels)
    return noisy, flipped
