"""``POST /v1/embeddings``: when an embedding model was loaded; otherwise a 400 saying so."""

from __future__ import annotations

import base64
import threading

import anyio
import numpy as np

from chatforge.serve.errors import APIError
from chatforge.serve.protocol import EmbeddingRequest
from chatforge.serve.serving import ServerState, Serving

MAX_EMBED_INPUTS = 2048


class EmbeddingServing(Serving):
    def __init__(self, state: ServerState, embedder=None):
        super().__init__(state)
        self.embedder = embedder
        self._lock = threading.Lock()

    async def create(self, body: EmbeddingRequest):
        if self.embedder is None:
            known = body.model == self.card.id
            raise APIError(400 if known else 404,
                           f"The model '{body.model}' {'is a chat model; ' if known else 'does not exist; '}"
                           "this server has no embedding model loaded (start it with --embed_ckpt=DIR).",
                           param="model", code="model_not_supported" if known else "model_not_found")
        self.check_model(body.model, "embedding")
        texts = self.inputs(body.input)
        if body.dimensions is not None and body.dimensions != self.embedder.dim:
            raise APIError(400, f"this model's embeddings have {self.embedder.dim} dimensions; 'dimensions' must be "
                                f"that or unset (got {body.dimensions})", param="dimensions")
        vectors, tokens = await anyio.to_thread.run_sync(self._embed, texts, body.input_type or "document")
        data = []
        for i, vector in enumerate(vectors):
            if body.encoding_format == "base64":
                value = base64.b64encode(vector.astype("<f4").tobytes()).decode()
            else:
                value = vector.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": self.state.embed_card.id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def inputs(self, value) -> list[str]:
        tokenizer = self.embedder.tokenizer
        if isinstance(value, str):
            items = [value]
        elif value and isinstance(value[0], int):
            items = [value]
        else:
            items = list(value)
        if not items or len(items) > MAX_EMBED_INPUTS:
            raise APIError(400, f"'input' must hold 1 to {MAX_EMBED_INPUTS} items; got {len(items)}", param="input")
        texts = []
        for item in items:
            if isinstance(item, list):
                bad = [t for t in item if not 0 <= t < tokenizer.vocab_size]
                if bad:
                    raise APIError(400, f"token id {bad[0]} is outside the vocabulary", param="input")
                item = tokenizer.decode(item)
            if not item:
                raise APIError(400, "'input' cannot contain an empty string", param="input")
            texts.append(item)
        return texts

    def _embed(self, texts: list[str], role: str) -> tuple[np.ndarray, int]:
        with self._lock:  # one forward at a time: the model is not shared-state safe across threads
            vectors = self.embedder.embed(texts, role=role)
        limit = self.embedder.spec_.max_tokens
        tokens = sum(min(len(self.embedder.tokenizer.encode(t)), limit) for t in texts)
        return vectors, tokens
