"""How an evaluation runs its per-item work: over the whole list here, or split across the ranks of a torchrun
job by the caller (``chatforge.train.distributed.map_shares``, which this layer cannot import)."""

from __future__ import annotations

from typing import Callable

# map_shares(fn, items): fn(share, index of the share's first item) -> one result per item; all results in order
MapShares = Callable[[Callable[[list, int], list], list], list]


def whole(fn: Callable[[list, int], list], items: list) -> list:
    """Every item in this process, as one share."""
    return fn(items, 0)
