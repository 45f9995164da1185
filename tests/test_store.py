"""Resumable results: a resumed run keeps its chunk layout, shards are checked, the final shape is checked, and a
finished folder holds the result only."""

import json
import os

import pytest
import torch

import turnover_hf as th
from turnover_hf.store import MANIFEST, RESULT, ScoreStore


def _run(store: ScoreStore, values: torch.Tensor, stop_after=None):
    """What the pipeline does: every missing shard computed (rows of ``values``) and saved, then the result."""
    parts = []
    for index, start, stop in store.chunks():
        part = store.shard(index)
        if part is None:
            if stop_after is not None and index >= stop_after:
                raise KeyboardInterrupt
            part = values[start:stop]
            store.write_shard(index, part)
        parts.append(part)
    store.finish(torch.cat(parts))
    return store.result()


def test_resuming_with_another_chunk_size_continues_in_the_recorded_layout(tmp_path):
    ids = torch.arange(100, 123)
    values = torch.randn(23, 3)
    with pytest.raises(KeyboardInterrupt):
        _run(ScoreStore(tmp_path / "r", "key", ids, 3, "test", chunk_size=8), values, stop_after=2)
    resumed = ScoreStore(tmp_path / "r", "key", ids, 3, "test", chunk_size=5)
    assert resumed.chunk_size == 8
    assert torch.equal(_run(resumed, values), values)
    assert sorted(os.listdir(tmp_path / "r")) == [MANIFEST, RESULT]  # no shards, nothing temporary


def test_a_finished_run_leaves_no_temporary_files(tmp_path):
    ids = torch.arange(10)
    store = ScoreStore(tmp_path / "r", "key", ids, 2, "test", chunk_size=4)
    (tmp_path / "r" / ".shard-000001.safetensors.x8Hq2.tmp").write_bytes(b"half a file")  # a kill -9 mid-write
    _run(store, torch.ones(10, 2))
    assert sorted(os.listdir(tmp_path / "r")) == [MANIFEST, RESULT]


def test_a_result_of_the_wrong_size_is_never_written(tmp_path):
    store = ScoreStore(tmp_path / "r", "key", torch.arange(10), 2, "test", chunk_size=4)
    with pytest.raises(th.TurnoverError, match=r"shape \(9, 2\) instead of \(10, 2\); nothing was written"):
        store.finish(torch.zeros(9, 2))
    assert not (tmp_path / "r" / RESULT).exists()


def test_a_shard_of_another_layout_is_refused(tmp_path):
    ids = torch.arange(10)
    store = ScoreStore(tmp_path / "r", "key", ids, 2, "test", chunk_size=4)
    store.write_shard(0, torch.zeros(4, 2))
    manifest = json.loads((tmp_path / "r" / MANIFEST).read_text())
    manifest["chunk_size"] = 3  # a folder whose layout and shards disagree
    (tmp_path / "r" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(th.TurnoverError, match=r"does not hold the rows 0\.\.2 of this result"):
        ScoreStore(tmp_path / "r", "key", ids, 2, "test", chunk_size=4).shard(0)


def test_a_damaged_manifest_is_named(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / MANIFEST).write_text("{ half")
    with pytest.raises(th.TurnoverError, match="manifest.json is not a readable manifest"):
        ScoreStore(tmp_path / "r", "key", torch.arange(3), 1, "test")


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, True])
def test_chunk_size_must_be_a_positive_integer(tmp_path, chunk_size):
    with pytest.raises(th.TurnoverError, match="chunk_size must be a positive integer"):
        ScoreStore(tmp_path / "r", "key", torch.arange(3), 1, "test", chunk_size=chunk_size)
