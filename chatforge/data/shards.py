"""Token shards: each split's token ids back to back in a raw ``{split}.bin`` file, read as a numpy memmap.

Documents are concatenated, each followed by ``<|endoftext|>`` (the caller appends it), so a training window
may span a document boundary exactly as the model will see one at inference. ``meta.json`` beside the ``.bin``
files records the dtype (uint16 while every id fits, else uint32), the vocabulary size, the tokenizer's hash
and each split's token count; readers check the file size against it, so a truncated shard is caught at once.

``TokenWindows`` draws training batches statelessly: the batch of a step depends only on (seed, step), so
resuming needs nothing but the step number and any number of data-parallel ranks together read exactly the
rows a single process would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from chatforge import io
from chatforge.errors import ChatforgeError

META_FILE = "meta.json"


def dtype_for(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id below ``vocab_size``."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_shard(
    path: str | Path, token_arrays: Iterable[np.ndarray | list[int]], vocab_size: int, tokenizer_hash: str | None = None
) -> int:
    """Write the concatenation of ``token_arrays`` to ``path`` (e.g. ``tokens/train.bin``) atomically.

    Records the split (the file's stem) in ``meta.json`` beside it; entries written for another vocabulary,
    dtype or tokenizer are dropped, since their shards no longer match. Returns the number of tokens written.
    Not safe for two processes writing shards into the same directory at once.
    """
    path = Path(path)
    dtype = dtype_for(vocab_size)
    written = 0
    with io.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        for tokens in token_arrays:
            array = np.asarray(tokens)
            if array.size and (array.min() < 0 or array.max() >= vocab_size):
                raise ChatforgeError(f"{path}: token id {int(array.max())} outside vocabulary of size {vocab_size}")
            fh.write(array.astype(dtype, copy=False).tobytes())
            written += array.size
    _record_split(path, written, vocab_size, tokenizer_hash)
    return written


def _record_split(path: Path, tokens: int, vocab_size: int, tokenizer_hash: str | None) -> None:
    meta_path = path.parent / META_FILE
    header = {"vocab_size": vocab_size, "dtype": dtype_for(vocab_size).name, "tokenizer_hash": tokenizer_hash}
    try:
        meta = io.read_json(meta_path) if meta_path.is_file() else {}
    except ChatforgeError:
        meta = {}  # a damaged record of earlier splits is rewritten with this split alone
    splits = meta.get("splits", {}) if all(meta.get(k) == v for k, v in header.items()) else {}
    splits[path.stem] = {"file": path.name, "tokens": tokens}
    io.write_json(meta_path, {**header, "splits": splits})


def read_meta(path: str | Path) -> dict:
    """The ``meta.json`` of a shard file's directory (or of the directory itself)."""
    path = Path(path)
    meta_path = (path if path.is_dir() else path.parent) / META_FILE
    if not meta_path.is_file():
        raise ChatforgeError(f"{meta_path} not found; token shards are written by `chatforge tokenizer`")
    return io.read_json(meta_path, "token shard metadata")


def to_device(tensor: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)  # overlaps the copy with compute
    return tensor.to(device)


class TokenWindows:
    """Windows of ``block_size + 1`` consecutive tokens from one shard, as (input, next-token target) batches."""

    def __init__(self, path: str | Path, block_size: int, seed: int = 0):
        self.path = Path(path)
        if not self.path.is_file():
            raise ChatforgeError(f"token shard not found: {self.path}")
        if block_size < 1:
            raise ChatforgeError(f"block_size must be at least 1, got {block_size}")
        self.meta = read_meta(self.path)
        splits = self.meta.get("splits")
        entry = splits.get(self.path.stem) if isinstance(splits, dict) else None
        if entry is None:
            raise ChatforgeError(f"{self.path.parent / META_FILE} has no entry for split '{self.path.stem}'")
        if self.meta.get("dtype") not in ("uint16", "uint32") or not isinstance(entry, dict) or \
                not isinstance(entry.get("tokens"), int) or isinstance(entry.get("tokens"), bool):
            raise ChatforgeError(f"{self.path.parent / META_FILE} is damaged: expected a 'dtype' of uint16 or uint32 "
                                 f"and a whole number of 'tokens' for split '{self.path.stem}'")
        dtype = np.dtype(self.meta["dtype"])
        if self.path.stat().st_size != entry["tokens"] * dtype.itemsize:
            raise ChatforgeError(
                f"{self.path} holds {self.path.stat().st_size} bytes, not the {entry['tokens']} {dtype} tokens "
                "meta.json records"
            )
        if entry["tokens"] < block_size + 1:
            raise ChatforgeError(
                f"{self.path} has {entry['tokens']} tokens, fewer than block_size + 1 = {block_size + 1}"
            )
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r")
        self.block_size = block_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_tokens(self) -> int:
        """Tokens in the shard."""
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer that wrote the shard."""
        return self.meta["vocab_size"]

    @property
    def num_windows(self) -> int:
        """How many non-overlapping windows ``eval_batches`` walks through before it wraps around."""
        return (len(self.tokens) - 1) // self.block_size

    def batch(
        self, step: int, batch_size: int, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the global batch of ``step``: ``batch_size`` windows at random offsets.

        Returns int64 ``x, y`` of shape ``[batch_size // world_size, block_size]`` with ``y`` = ``x`` shifted by one.
        """
        check_split(batch_size, rank, world_size)
        rng = np.random.default_rng([self.seed, step])
        # every rank draws all offsets and keeps its slice, so the global batch is the same for any world size
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=batch_size)
        return self._rows(rank_slice(starts, rank, world_size), device)

    def eval_batches(
        self, n_batches: int, batch_size: int, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``n_batches`` deterministic batches of consecutive, non-overlapping windows from the shard's start.

        Identical on every call (no randomness), so validation losses are comparable across a run. A shard with
        fewer than ``n_batches * batch_size`` windows (see ``num_windows``) is walked again from its start.
        """
        for index in range(n_batches):
            yield self.eval_batch(index, batch_size, rank, world_size, device)

    def eval_batch(
        self, index: int, batch_size: int, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of ``eval_batches`` (so evaluation can be split across ranks by batch)."""
        check_split(batch_size, rank, world_size)
        windows = np.arange(index * batch_size, (index + 1) * batch_size) % self.num_windows
        return self._rows(rank_slice(windows * self.block_size, rank, world_size), device)

    def _rows(self, starts: np.ndarray, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(self.tokens[starts[:, None] + np.arange(self.block_size + 1)].astype(np.int64))
        return to_device(rows[:, :-1].contiguous(), device), to_device(rows[:, 1:].contiguous(), device)


def check_split(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1 or world_size < 1 or batch_size % world_size:
        raise ChatforgeError(f"batch_size {batch_size} must be a positive multiple of world_size {world_size}")
    if not 0 <= rank < world_size:
        raise ChatforgeError(f"rank {rank} is outside world_size {world_size}")


def rank_slice(rows: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    per_rank = len(rows) // world_size
    return rows[rank * per_rank : (rank + 1) * per_rank]
