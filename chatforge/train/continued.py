"""Continued pretraining on a token corpus the stage builds itself: what the code and fim stages share.

The stage supplies ``build(tokenizer, block_size) -> ({split: token-id lists}, counts)``; this writes
``out_dir/data`` as a tokenizer stage's output (tokenizer.json, tokens/{train,val}.bin, corpus.json), measures
the starting model's held-out loss, and trains with the pretrain stage's task on the shared loop. A resumed
run reuses ``out_dir/data`` so its batches do not change. Under torchrun rank 0 builds the corpus and the other
ranks read it once it is written (``out_dir`` must be on storage every node sees).
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from chatforge import io
from chatforge.config import option
from chatforge.data.shards import write_shard
from chatforge.errors import ChatforgeError
from chatforge.model.checkpoint import latest_checkpoint, load_model, tokenizer_path
from chatforge.tokenizer import TOKENIZER_FILE, Tokenizer
from chatforge.train import distributed
from chatforge.train.loop import TrainConfig, train
from chatforge.train.pretrain import TOKENS_DIR, PretrainTask, open_shards


@dataclass
class ContinuedTrainConfig(TrainConfig):
    steps: int = option(300, "optimizer steps: the schedule's length (max_minutes may fit it shorter)")
    batch_size: int = option(16, "sequences per optimizer step, summed over all processes")
    # held-out code loss after 300 steps from the speedrun's base: AdamW 1e-3 3.126, Muon 2e-3 3.107, Muon 6e-3 3.056
    optimizer: str = option("muon", "adamw, or muon (Muon for the blocks' matrices, AdamW for the rest)")
    lr: float = option(6e-3, "peak learning rate (Muon's), reached at the end of warm-up")
    min_lr: float = option(1e-4, "learning rate at the end of the decay")
    warmup_steps: int = option(20, "steps of linear warm-up from 0 to lr")
    eval_every: int = option(100, "steps between validation losses (0 = only at the start and the end)")
    ckpt_every: int = option(100, "steps between checkpoints (0 = only at the end)")
    max_minutes: float = option(5.0, "wall-time budget in minutes (0 = none)")


DATA_DIR = "data"
CORPUS_FILE = "corpus.json"

# build(tokenizer, the model's context length) -> (token ids per split: "train" and "val", counts for corpus.json)
Build = Callable[[Tokenizer, int], tuple[dict[str, Iterable[list[int]]], dict]]


def write_token_data(data: Path, tokenizer_file: Path, build: Build, block_size: int) -> dict:
    tokenizer = Tokenizer.load(tokenizer_file)
    splits, counts = build(tokenizer, block_size)
    for split, rows in splits.items():
        arrays = (np.asarray(ids, dtype=np.int64) for ids in rows)
        counts[f"{split}_tokens"] = write_shard(data / TOKENS_DIR / f"{split}.bin", arrays, tokenizer.vocab_size,
                                                tokenizer.hash)
    with io.atomic_path(data / TOKENIZER_FILE) as tmp:
        shutil.copyfile(tokenizer_file, tmp)
    io.write_json(data / CORPUS_FILE, counts)
    return counts


def continue_training(stage: str, cfg, build: Build, describe: Callable[[dict], str],
                      meta: dict | None = None) -> tuple[dict, float]:
    """Train ``cfg.init_from`` further on the built corpus; returns (summary, starting held-out loss).

    ``cfg`` needs init_from, out_dir, resume, eval_batches and train (a TrainConfig); ``describe(counts)`` is the
    line printed about the corpus.
    """
    ranks = distributed.init(cfg.train.device)
    out = Path(cfg.out_dir)
    if not cfg.resume and latest_checkpoint(out) is not None:
        raise ChatforgeError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out_dir")
    model, info = load_model(cfg.init_from)
    data = out / DATA_DIR
    if ranks.is_main and not (cfg.resume and (data / CORPUS_FILE).is_file()):
        write_token_data(data, tokenizer_path(cfg.init_from), build, model.config.block_size)
    ranks.barrier()
    ranks.agree_on_path(data / CORPUS_FILE, "corpus")
    counts = io.read_json(data / CORPUS_FILE, "corpus counts")
    print(f"[{stage}] corpus: {describe(counts)}")
    tokenizer_copy, train_windows, val_windows = open_shards(data, model.config.block_size, cfg.train.seed)
    if model.config.vocab_size < train_windows.vocab_size:
        raise ChatforgeError(
            f"{tokenizer_copy} has {train_windows.vocab_size} tokens but {cfg.init_from} only {model.config.vocab_size}"
        )
    chunk = cfg.train.micro_batch_size or cfg.train.batch_size
    task = PretrainTask(
        train_windows, val_windows, cfg.train.batch_size, cfg.eval_batches * cfg.train.batch_size // chunk, chunk
    )
    device = ranks.device
    with torch.no_grad():
        base_val_loss = task.eval_loss(model.to(device).eval(), device)
    print(f"[{stage}] held-out loss of the starting model ({info['path']}): {base_val_loss:.4f}")
    model.train()
    meta = {
        "stage": stage,
        "init_from": str(info["path"]),
        "base_val_loss": round(base_val_loss, 4),
        "corpus_train_tokens": counts["train_tokens"],
        **(meta or {}),
        "model": model.config.to_dict(),
        "stage_config": dataclasses.asdict(cfg),
    }
    summary = train(model, task, cfg.train, out, resume=cfg.resume, meta=meta, tokenizer=tokenizer_copy)
    summary["corpus"] = counts
    return summary, base_val_loss
