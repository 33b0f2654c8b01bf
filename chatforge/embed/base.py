"""What every embedder is (the ``Embedder`` protocol) and how long texts are cut into token windows."""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from chatforge.errors import ChatforgeError


class Embedder(Protocol):
    """What an index needs from an embedding model (chatforge-embed and the MiniLM baseline both are one)."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str], role: str = "document") -> np.ndarray:
        """L2-normalised float32 embeddings [len(texts), dim]; ``role`` is "query" or "document"."""

    def chunk(self, text: str, chunk_tokens: int, overlap: int) -> list[str]:
        """``text`` cut into windows of at most ``chunk_tokens`` of this model's tokens."""

    def spec(self) -> dict:
        """A JSON description ``load_embedder`` turns back into this embedder."""


def token_windows(n_tokens: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) windows of ``size`` tokens covering ``n_tokens``, consecutive windows sharing ``overlap``."""
    if size < 1 or not 0 <= overlap < size:
        raise ChatforgeError(f"chunks need chunk_tokens >= 1 and 0 <= overlap < chunk_tokens; got {size} and {overlap}")
    windows, start = [], 0
    while True:
        end = min(start + size, n_tokens)
        windows.append((start, end))
        if end >= n_tokens:
            return windows
        start = end - overlap
