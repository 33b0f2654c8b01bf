"""Key/value cache for incremental decoding.

Each batch row is a slot with its own length, so rows can sit at different positions: prompts of different
lengths decode together, and a finished row can be refilled with a new request (continuous batching).
"""

from __future__ import annotations

import torch

from chatforge.config import ChatforgeError


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, n_head: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> "KVCache":
        cfg = model.config
        max_len = max_len or cfg.block_size
        if max_len > cfg.block_size:
            raise ChatforgeError(f"cache length {max_len} exceeds the model's context of {cfg.block_size} tokens")
        param = next(model.parameters())
        return cls(cfg.n_layer, batch_size, cfg.n_head, cfg.n_embd // cfg.n_head, max_len,
                   device=param.device, dtype=dtype or param.dtype)

    def positions(self, T: int) -> torch.Tensor:
        """Absolute positions [B, T] of the T tokens about to be written to each row."""
        if int(self.lengths.max()) + T > self.max_len:
            raise ChatforgeError(f"context full: {int(self.lengths.max())} + {T} tokens exceed the cache's {self.max_len}")
        return self.lengths[:, None] + torch.arange(T, device=self.lengths.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k, v [B, H, T, D] at each row's offset; return visible keys, values and mask."""
        B, _, T, _ = k.shape
        pos = self.positions(T)
        index = pos[:, None, :, None].expand(B, k.size(1), T, k.size(3))
        self.k[layer].scatter_(2, index, k.to(self.k.dtype))
        self.v[layer].scatter_(2, index, v.to(self.v.dtype))
        end = int(pos.max()) + 1
        keys = torch.arange(end, device=k.device)
        mask = keys[None, None, :] <= pos[:, :, None]  # [B, T, end]: causal within each row's own timeline
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], mask[:, None]

    def advance(self, T: int) -> None:
        self.lengths += T

    def reset_rows(self, rows) -> None:
        """Free slots so new requests can be placed in them."""
        self.lengths[rows] = 0
