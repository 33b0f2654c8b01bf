"""Token shards: atomic writing with meta.json, and stateless, rank-consistent batches from TokenWindows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chatforge.data.shards import TokenWindows, read_meta, write_shard
from chatforge.errors import ChatforgeError

VOCAB = 60_000  # above every id of the arange shards below, so x[i, j] + 1 == x[i, j + 1] inside a window


def arange_shard(tmp_path, n: int = 5000, split: str = "train"):
    path = tmp_path / f"{split}.bin"
    write_shard(path, [np.arange(0, n // 2), np.arange(n // 2, n)], VOCAB, tokenizer_hash="abc")
    return path


def test_write_shard_concatenates_and_records_meta(tmp_path):
    path = tmp_path / "tokens" / "val.bin"
    written = write_shard(path, [[1, 2, 3], np.array([4, 5]), []], vocab_size=10, tokenizer_hash="h1")
    assert written == 5
    assert np.fromfile(path, dtype=np.uint16).tolist() == [1, 2, 3, 4, 5]
    assert read_meta(path) == {
        "vocab_size": 10,
        "dtype": "uint16",
        "tokenizer_hash": "h1",
        "splits": {"val": {"file": "val.bin", "tokens": 5}},
    }


def test_large_vocab_uses_uint32(tmp_path):
    path = tmp_path / "train.bin"
    write_shard(path, [[70_000, 1]], vocab_size=100_000)
    assert read_meta(path)["dtype"] == "uint32"
    assert np.fromfile(path, dtype=np.uint32).tolist() == [70_000, 1]


def test_meta_keeps_sibling_splits_only_for_the_same_tokenizer(tmp_path):
    write_shard(tmp_path / "train.bin", [[1, 2]], 10, "h1")
    write_shard(tmp_path / "val.bin", [[3]], 10, "h1")
    assert set(read_meta(tmp_path)["splits"]) == {"train", "val"}
    write_shard(tmp_path / "val.bin", [[3]], 10, "h2")
    assert set(read_meta(tmp_path)["splits"]) == {"val"}


def test_failed_write_leaves_the_previous_shard(tmp_path):
    path = tmp_path / "train.bin"
    write_shard(path, [[1, 2, 3]], 10)
    with pytest.raises(ChatforgeError, match="token id 12 outside vocabulary of size 10"):
        write_shard(path, [[4, 5], [12]], 10)
    assert np.fromfile(path, dtype=np.uint16).tolist() == [1, 2, 3]
    assert read_meta(path)["splits"]["train"]["tokens"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "train.bin"]


def test_windows_are_contiguous_and_targets_are_shifted(tmp_path):
    windows = TokenWindows(arange_shard(tmp_path), block_size=16)
    assert len(windows) == windows.num_tokens == 5000
    x, y = windows.batch(step=0, batch_size=8)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # the shard is 0, 1, 2, ... so the next token is always one more
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)
    assert int(x.min()) >= 0 and int(y.max()) <= 4999


def test_batches_are_a_pure_function_of_seed_and_step(tmp_path):
    path = arange_shard(tmp_path)
    first, again = TokenWindows(path, 16, seed=1), TokenWindows(path, 16, seed=1)
    assert torch.equal(first.batch(7, 8)[0], again.batch(7, 8)[0])  # e.g. after a resume at step 7
    assert not torch.equal(first.batch(7, 8)[0], first.batch(8, 8)[0])
    assert not torch.equal(first.batch(7, 8)[0], TokenWindows(path, 16, seed=2).batch(7, 8)[0])


def test_rank_slices_concatenate_to_the_single_process_batch(tmp_path):
    windows = TokenWindows(arange_shard(tmp_path), 16)
    x, y = windows.batch(3, 12)
    for world in (2, 3, 4):
        parts = [windows.batch(3, 12, rank=r, world_size=world) for r in range(world)]
        assert all(part[0].shape == (12 // world, 16) for part in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_eval_batches_walk_the_shard_in_order_and_wrap(tmp_path):
    windows = TokenWindows(arange_shard(tmp_path, n=101), block_size=10)
    assert windows.num_windows == 10
    batches = list(windows.eval_batches(n_batches=3, batch_size=4))
    starts = [int(x[i, 0]) for x, _ in batches for i in range(4)]
    assert starts == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 0, 10]
    assert all(torch.equal(y, x + 1) for x, y in batches)
    again = list(windows.eval_batches(3, 4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    halves = [next(windows.eval_batches(1, 4, rank=r, world_size=2))[0] for r in range(2)]
    assert torch.equal(torch.cat(halves), batches[0][0])


def test_errors_name_the_problem(tmp_path):
    path = arange_shard(tmp_path, n=20)
    windows = TokenWindows(path, 8)
    with pytest.raises(ChatforgeError, match="multiple of world_size 3"):
        windows.batch(0, 8, world_size=3)
    with pytest.raises(ChatforgeError, match="rank 2 is outside world_size 2"):
        windows.batch(0, 8, rank=2, world_size=2)
    with pytest.raises(ChatforgeError, match="fewer than block_size \\+ 1 = 21"):
        TokenWindows(path, 20)
    TokenWindows(path, 19)  # exactly block_size + 1 tokens is enough
    with pytest.raises(ChatforgeError, match="token shard not found"):
        TokenWindows(tmp_path / "missing.bin", 8)
    (tmp_path / "other.bin").write_bytes(b"\0\0" * 30)
    with pytest.raises(ChatforgeError, match="no entry for split 'other'"):
        TokenWindows(tmp_path / "other.bin", 8)
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ChatforgeError, match="not the 20 uint16 tokens"):
        TokenWindows(path, 8)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(ChatforgeError, match="meta.json not found"):
        TokenWindows(path, 8)

