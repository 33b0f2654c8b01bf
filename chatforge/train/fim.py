"""Fill-in-the-middle continued pretraining: the FIM corpus (chunks transformed to PSM/SPM) and its evaluation.

The `chatforge fim` stage (chatforge/stages/fim.py) runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chatforge.config import option
from chatforge.data.documents import read_documents
from chatforge.data.fim import transform
from chatforge.errors import ChatforgeError
from chatforge.evals.fim_eval import evaluate_insertion, make_examples
from chatforge.infer.loading import EngineOptions, load_engine
from chatforge.train import distributed
from chatforge.train.continued import Build, ContinuedTrainConfig


@dataclass
class FIMTrainConfig(ContinuedTrainConfig):
    # no time budget by default: a FIM run and its twin must train the same number of steps to be compared
    max_minutes: float = option(0.0, "wall-time budget in minutes (0 = none)")
    # held-out loss after 300 steps from the speedrun's base: AdamW 1e-3 3.808, Muon 2e-3 3.789, Muon 6e-3 3.816
    lr: float = option(2e-3, "peak learning rate (Muon's), reached at the end of warm-up")


def chunk_text(text: str, size: int) -> list[str]:
    """Pieces of at most ``size`` characters, cut after a line end where there is one in the piece."""
    chunks = []
    while text:
        if len(text) <= size:
            chunks.append(text)
            break
        cut = text.rfind("\n", 0, size) + 1 or size
        chunks.append(text[:cut])
        text = text[cut:]
    return [c for c in chunks if c.strip()]


def read_chunks(path: Path, size: int) -> list[tuple[str, str]]:
    """(chunk, kind) of every document; kind is "code" for code documents, else "text"."""
    return [(chunk, "code" if doc.get("kind") == "code" else "text")
            for doc in read_documents(path) for chunk in chunk_text(doc["text"], size)]


def fim_corpus(cfg) -> Build:
    def build(tokenizer, block_size: int) -> tuple[dict, dict]:
        chunk_chars = cfg.chunk_chars or 3 * block_size
        data = Path(cfg.data_dir)
        train_chunks = read_chunks(data / "pretrain_train.jsonl", chunk_chars)
        val_chunks = read_chunks(data / "pretrain_val.jsonl", chunk_chars)
        if not train_chunks or not val_chunks:
            raise ChatforgeError(f"{data} gave {len(train_chunks)} train and {len(val_chunks)} held-out chunks; "
                                 "run `chatforge data` first or set --data_dir")
        rng = np.random.default_rng(cfg.train.seed)
        chosen, chars = [], 0
        for index in rng.permutation(len(train_chunks)):
            if chars >= cfg.max_train_chars:
                break
            chosen.append(train_chunks[index][0])
            chars += len(chosen[-1])
        counts = {"chunk_chars": chunk_chars, "train_chunks": len(chosen), "train_chars": chars,
                  "val_chunks": len(val_chunks), "fim_rate": cfg.fim_rate, "spm_rate": cfg.spm_rate}
        splits = {"train": (transform(text, tokenizer, rng, cfg.fim_rate, cfg.spm_rate) for text in chosen),
                  "val": (ids + [tokenizer.eot_id] for ids in tokenizer.encode_batch([c for c, _ in val_chunks]))}
        return splits, counts

    return build


def describe(counts: dict) -> str:
    return (
        f"{counts['train_chunks']} train chunks of <= {counts['chunk_chars']} chars "
        f"({counts['train_tokens'] / 1e6:.2f}M "
        f"tokens, {counts['fim_rate']:.0%} in FIM order), {counts['val_chunks']} held out"
    )


def evaluate(cfg, chunk_chars: int) -> dict:
    examples = make_examples(
        read_chunks(Path(cfg.data_dir) / "pretrain_val.jsonl", chunk_chars), cfg.eval_examples, seed=cfg.train.seed
    )
    engine = load_engine(EngineOptions(ckpt=cfg.out_dir, device=distributed.init(cfg.train.device).device))
    return evaluate_insertion(engine, examples, map_shares=distributed.map_shares)  # each rank its share
