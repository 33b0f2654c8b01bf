"""Key/value cache for incremental decoding.

Each batch row is a slot with its own length, so rows can sit at different positions: prompts of different
lengths decode together, and a finished row can be refilled with a new request (continuous batching).

A forward pass asks for ``positions(T)`` once, then calls ``update`` once per layer, then ``advance(T)``.
Everything the layers share (positions, scatter index, attention mask, visible length) is computed once in
``positions`` with a single host read of the lengths, so a decode step costs no per-layer host syncs.

``decode_view`` is the cache as a static-shape decode step sees it (one token for every slot, attention over
the first ``visible`` positions under a mask built from the lengths tensor): its shapes depend only on the
slot count and ``visible`` (which the caller rounds to a few sizes) and it never reads a value back to the
host, so the step can be compiled once per shape and captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chatforge.errors import ChatforgeError


@dataclass
class _StepPlan:
    """What every layer of one forward pass needs to write and read the cache."""

    T: int
    positions: torch.Tensor  # [B, T] absolute positions of the new tokens
    start: int | None  # common write offset when all rows have the same length (a slice beats a scatter)
    index: torch.Tensor | None  # [B, H, T, D] scatter index when rows differ
    end: int  # keys [0, end) are visible to some row
    mask: torch.Tensor | None  # [B, 1, T, end]; None when every key is visible to every query


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, n_head: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        # zeros, not empty: masked keys get weight 0, and 0 * NaN from uninitialised memory would still be NaN
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._plan: _StepPlan | None = None

    @classmethod
    def for_model(
        cls, model, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
        compiled: bool = False,
    ) -> "KVCache":
        """A cache for ``model``'s layers in ``dtype``; by default the parameters' dtype, but fp32 for an eager CPU
        step: there SDPA's bf16 kernel is slower than its fp32 one, and writing keys in fp32 costs less than
        converting the cache on every read (bf16 weights at 64 rows, speedrun shape: 7.6 -> 7.0 ms a step; at one
        row 1.27 -> 1.06). A compiled step reads a bf16 cache in its own fused loops."""
        cfg = model.config
        max_len = max_len or cfg.block_size
        if max_len > cfg.block_size:
            raise ChatforgeError(f"cache length {max_len} exceeds the model's context of {cfg.block_size} tokens")
        param = next(model.parameters())
        return cls(
            cfg.n_layer,
            batch_size,
            cfg.kv_heads,
            cfg.head_dim,
            max_len,
            device=param.device,
            dtype=dtype or (torch.float32 if param.device.type == "cpu" and not compiled else param.dtype),
        )

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache over rows [start, stop) that shares this cache's storage (a view, nothing is copied)."""
        view = object.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.max_len = self.max_len
        view.lengths = self.lengths[start:stop]
        view._plan = None
        return view

    def positions(self, T: int) -> torch.Tensor:
        """Absolute positions [B, T] of the T tokens about to be written to each row."""
        self._plan = self._make_plan(T)
        return self._plan.positions

    def _make_plan(self, T: int) -> _StepPlan:
        lengths = self.lengths.tolist()  # the one host read of a forward pass
        longest, shortest = max(lengths), min(lengths)
        if longest + T > self.max_len:
            raise ChatforgeError(f"context full: {longest} + {T} tokens exceed the cache's {self.max_len}")
        device = self.lengths.device
        positions = self.lengths[:, None] + torch.arange(T, device=device)
        end = longest + T
        uniform = longest == shortest
        index = None
        if not uniform:
            B, H, _, D = self.k.shape[1:]
            index = positions[:, None, :, None].expand(B, H, T, D)
        mask = None
        if T > 1 or not uniform:  # a single new token in equally long rows sees every key: no mask needed
            keys = torch.arange(end, device=device)
            mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # causal within each row's timeline
        return _StepPlan(T, positions, longest if uniform else None, index, end, mask)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k, v [B, H, T, D] at each row's offset; return visible keys, values and mask."""
        T = k.size(2)
        plan = self._plan if self._plan is not None and self._plan.T == T else self.positions(T)
        if plan.start is not None:
            self.k[layer, :, :, plan.start : plan.start + T] = k
            self.v[layer, :, :, plan.start : plan.start + T] = v
        else:
            self.k[layer].scatter_(2, plan.index, k.to(self.k.dtype))
            self.v[layer].scatter_(2, plan.index, v.to(self.v.dtype))
        return self.k[layer, :, :, : plan.end], self.v[layer, :, :, : plan.end], plan.mask

    def advance(self, T: int) -> None:
        self.lengths += T
        self._plan = None

    def reset_rows(self, rows) -> None:
        """Free slots so new requests can be placed in them."""
        self.lengths[rows] = 0
        self._plan = None

    def decode_view(self, active: torch.Tensor, visible: int | None = None) -> "StaticDecode":
        """The cache for a one-token step of every slot; ``active`` [B] (0/1, long) says whose length grows.
        Attention reads the first ``visible`` positions (all ``max_len`` by default): every active row's
        length must be below it."""
        return StaticDecode(self, active, visible or self.max_len)

    def copy_row(self, src: int, dst: int) -> None:
        """Make row ``dst`` a copy of row ``src`` (a prompt prefilled once, sampled several times)."""
        end = int(self.lengths[src])
        self.k[:, dst, :, :end] = self.k[:, src, :, :end]
        self.v[:, dst, :, :end] = self.v[:, src, :, :end]
        self.lengths[dst] = end
        self._plan = None

    def reorder_rows(self, order: torch.Tensor) -> None:
        """Row i becomes a copy of old row ``order[i]`` (beam search keeps the beams that survived)."""
        self.k.copy_(self.k.index_select(1, order))
        self.v.copy_(self.v.index_select(1, order))
        self.lengths.copy_(self.lengths.index_select(0, order))
        self._plan = None


class StaticDecode:
    """One decode step over every slot with shapes fixed by the cache and ``visible``, and no host read: the
    new token of row b goes to position ``lengths[b]`` (a scatter), attention reads positions [0, visible),
    and keys at positions > ``lengths[b]`` are masked.

    Inactive slots compute garbage that nobody reads; their length stays put, so they never run off the end.
    """

    def __init__(self, cache: KVCache, active: torch.Tensor, visible: int):
        self.cache, self.active, self.visible = cache, active, visible
        self._mask: torch.Tensor | None = None

    def positions(self, T: int) -> torch.Tensor:
        if T != 1:
            raise ChatforgeError(f"a static decode step takes one token per row, got {T}")
        lengths = self.cache.lengths
        keys = torch.arange(self.visible, device=lengths.device)
        self._mask = (keys[None, :] <= lengths[:, None])[:, None, None]  # [B, 1, 1, visible]
        return lengths[:, None].clone()  # advance() bumps lengths in place; positions must not move with it

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self._mask is None:
            self.positions(k.size(2))
        B, H, _, D = k.shape
        k, v = k.to(self.cache.k.dtype), v.to(self.cache.v.dtype)
        if torch.compiler.is_compiling() or k.dtype != torch.float32:
            # index_put_ on the whole cache: inductor writes it in place, where a scatter_ into a view of the
            # cache makes it copy each layer's cache around the write; eager, aten's scatter_ is vectorised for
            # fp32 only (bf16 at 64 rows: 369 us a write against index_put_'s 12; fp32 at one row: 2.2 against 6)
            rows, heads = torch.arange(B, device=k.device)[:, None], torch.arange(H, device=k.device)[None, :]
            at = (torch.full((1, 1), layer, device=k.device), rows, heads, self.cache.lengths[:, None])  # [B, H]
            self.cache.k.index_put_(at, k[:, :, 0])
            self.cache.v.index_put_(at, v[:, :, 0])
        else:
            index = self.cache.lengths[:, None, None, None].expand(B, H, 1, D)
            self.cache.k[layer].scatter_(2, index, k)
            self.cache.v[layer].scatter_(2, index, v)
        return self.cache.k[layer, :, :, : self.visible], self.cache.v[layer, :, :, : self.visible], self._mask

    def advance(self, T: int) -> None:
        self.cache.lengths += self.active * T
        self._mask = None
