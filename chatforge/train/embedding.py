"""Contrastive pre-training (CPT) of an embedding model from a GPT, as a task on the shared training loop.

The `chatforge embed` stage (chatforge/stages/embed.py) runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chatforge.config import option
from chatforge.embed.data import PairBatches
from chatforge.embed.model import EmbedSpec, encode_texts, grad_cache_step, info_nce
from chatforge.train import distributed
from chatforge.train.loop import TrainConfig

EMBEDDER_DIR = "embedder"


@dataclass
class EmbedTrainConfig(TrainConfig):
    steps: int = option(300, "optimizer steps (max_minutes may fit it shorter)")
    batch_size: int = option(64, "pairs per step: each query's negatives are the other 63 documents")
    # after 300 steps from the speedrun's base, held-out contrastive loss / top-1 and MRR@10 on neighbouring
    # spans: AdamW 3e-4 2.773 / 0.320 / 0.713, Muon 6e-3 2.627 / 0.359 / 0.752 (Muon 2e-3: 3.30 at step 100)
    optimizer: str = option("muon", "adamw, or muon (Muon for the blocks' matrices, AdamW for the rest)")
    lr: float = option(6e-3, "peak learning rate (Muon's), reached at the end of warm-up")
    min_lr: float = option(3e-5, "learning rate at the end of the decay")
    warmup_steps: int = option(20, "steps of linear warm-up")
    eval_every: int = option(100, "steps between held-out contrastive loss / accuracy")
    ckpt_every: int = option(100, "steps between checkpoints")
    max_minutes: float = option(3.0, "wall-time budget in minutes (0 = none)")
    dtype: str = option("fp32", "fp32: gradient caching replays forward passes, which must match exactly")
    compile: str = option("false", "texts of every length make compiled shapes churn")


class ContrastiveTask:
    def __init__(
        self, batches: PairBatches, val_pairs: list, tokenizer, spec: EmbedSpec, block_size: int, chunk_size: int
    ):
        self.batches, self.val_pairs = batches, val_pairs
        self.tokenizer, self.spec, self.block_size, self.chunk_size = tokenizer, spec, block_size, chunk_size

    def _chunks(self, texts: list[str], role: str, device: str) -> list:
        chunks = []
        for start in range(0, len(texts), self.chunk_size):
            ids, lengths = encode_texts(
                self.tokenizer, texts[start : start + self.chunk_size], role, self.spec, self.block_size
            )
            chunks.append((ids.to(device), lengths))
        return chunks

    def batch(self, step: int, part: int, parts: int, device: str):
        pairs = self.batches.batch(step, part, parts)
        return self._chunks([p.query for p in pairs], "query", device), self._chunks(
            [p.document for p in pairs], "document", device
        )

    def backward(self, model, batch, micro) -> dict:
        queries, documents = batch
        loss = grad_cache_step(model, queries, documents, loss_weight=micro.scale, sync_context=micro.no_sync)
        return {"loss": loss, "tokens": int(sum(lengths.sum() for _, lengths in queries + documents))}

    @torch.no_grad()
    def eval_loss(self, model, device: str) -> dict:
        """Held-out InfoNCE over all pairs (every document a negative of every other query) and top-1 retrieval;
        each rank embeds its share of the chunks and every rank gets all embeddings."""
        chunks = [self._chunks([p.query for p in self.val_pairs], "query", device),
                  self._chunks([p.document for p in self.val_pairs], "document", device)]

        def embed(index: int) -> tuple[torch.Tensor, torch.Tensor]:
            return tuple(model(*side[index]).cpu() for side in chunks)

        embedded = distributed.map_shared(embed, len(chunks[0]))
        queries, documents = (torch.cat([pair[side] for pair in embedded]).to(device) for side in (0, 1))
        top1 = float(
            (queries @ documents.T).argmax(1).eq(torch.arange(len(queries), device=queries.device)).float().mean()
        )
        return {"loss": float(info_nce(queries, documents, model.scale())), "top1": top1}
