"""Conversations as training batches: rendered by the one chat template, loss on assistant tokens only.

Batches are a pure function of the step (each epoch is a fresh seeded permutation of the conversations, cut
into whole batches), so a resumed run and every rank of a distributed one draw exactly the conversations
an uninterrupted single process would.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from chatforge.chat_template import render
from chatforge.data.shards import check_split, rank_slice, to_device
from chatforge.errors import ChatforgeError

IGNORE = -1  # target id the model's loss skips


class EpochOrder:
    """Global batch ``step`` as item indices: epochs are seeded permutations cut into whole batches (the
    remainder of an epoch is skipped), so no item appears twice in one batch."""

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, what: str = "items"):
        if num_items < batch_size:
            raise ChatforgeError(f"only {num_items} {what} for a batch of {batch_size}; lower batch_size or add data")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.batches_per_epoch = num_items // batch_size
        self._epoch, self._order = -1, np.arange(0)

    def indices(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        check_split(self.batch_size, rank, world_size)
        epoch, index = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        return rank_slice(self._order[index * self.batch_size : (index + 1) * self.batch_size], rank, world_size)


def encode_conversations(
    conversations: Iterable[list[dict]], tokenizer, block_size: int
) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) per conversation, cut to ``block_size + 1`` tokens; conversations with no assistant token
    inside the window teach nothing and are left out."""
    encoded = []
    for messages in conversations:
        chat = render(messages, tokenizer)
        ids, mask = chat.ids[: block_size + 1], chat.loss_mask[: block_size + 1]
        if any(mask[1:]):
            encoded.append((ids, mask))
    return encoded


class ChatBatches:
    """Padded (input, target) batches of whole conversations; targets are ``IGNORE`` except on assistant tokens."""

    def __init__(self, encoded: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int, seed: int = 0):
        if not encoded:
            raise ChatforgeError("no conversation with an assistant answer to train on")
        self.encoded, self.pad_id = encoded, pad_id
        self.order = EpochOrder(len(encoded), batch_size, seed, what="conversations")

    def batch(self, step: int, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu"):
        return self.rows(self.order.indices(step, rank, world_size), device)

    def eval_batch_count(self, batch_size: int) -> int:
        """How many batches of ``batch_size`` take every conversation once (the last one may be smaller)."""
        return -(-len(self.encoded) // batch_size)

    def eval_batch(self, index: int, batch_size: int, device: str | torch.device = "cpu"):
        """Evaluation batch ``index``: conversations in order, so ranks can split evaluation by batch."""
        start = index * batch_size
        return self.rows(np.arange(start, min(start + batch_size, len(self.encoded))), device)

    def rows(self, indices: np.ndarray, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = [self.encoded[i] for i in indices]
        width = max(len(ids) for ids, _ in chosen) - 1
        x = torch.full((len(chosen), width), self.pad_id, dtype=torch.long)
        y = torch.full((len(chosen), width), IGNORE, dtype=torch.long)
        for row, (ids, mask) in enumerate(chosen):
            n = len(ids) - 1
            x[row, :n] = torch.tensor(ids[:-1])
            # the target at position t is token t+1, learned only where token t+1 is the assistant's
            y[row, :n] = torch.tensor([t if m else IGNORE for t, m in zip(ids[1:], mask[1:])])
        return to_device(x, device), to_device(y, device)


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids right-padded with ``pad_id`` into one [len(rows), longest] tensor, and their lengths."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, torch.tensor([len(r) for r in rows])
