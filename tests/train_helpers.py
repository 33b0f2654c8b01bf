"""Tiny models, tasks and corpora shared by the training-loop, checkpoint, DDP and pretrain tests."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import torch

from chatforge.data.shards import write_shard
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.tokenizer import Tokenizer
from chatforge.train.loop import TrainConfig, lm_loss

VOCAB, BLOCK = 64, 16


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(
        GPTConfig(**{"vocab_size": VOCAB, "block_size": BLOCK, "n_layer": 2, "n_head": 2, "n_embd": 32, **overrides})
    )


def fast_config(**overrides) -> TrainConfig:
    """fp32, eager, CPU, no progress bar: quick and bit-for-bit repeatable."""
    values = dict(
        steps=20,
        batch_size=8,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=3,
        eval_every=0,
        ckpt_every=0,
        dtype="fp32",
        compile="false",
        device="cpu",
        progress=False,
    )
    return TrainConfig(**{**values, **overrides})


class CountingTask:
    """Rows count up from a random start (mod VOCAB): learnable, and each step's batch a pure function of it.

    ``crash_at``/``signal_at`` simulate a crash (an exception) or a Ctrl-C (SIGINT to this process) when the
    batch of that 0-based step is drawn.
    """

    def __init__(self, batch_size: int = 8, crash_at: int | None = None, signal_at: int | None = None):
        self.batch_size, self.crash_at, self.signal_at = batch_size, crash_at, signal_at

    def batch(self, step: int, part: int, parts: int, device: str):
        if step == self.crash_at:
            raise RuntimeError(f"simulated crash at step {step}")
        if step == self.signal_at and part == 0:
            os.kill(os.getpid(), signal.SIGINT)
        g = torch.Generator().manual_seed(1000 + step)
        starts = torch.randint(0, VOCAB, (self.batch_size, 1), generator=g)
        rows = (starts + torch.arange(BLOCK + 1)) % VOCAB
        per = self.batch_size // parts
        rows = rows[part * per : (part + 1) * per]
        return rows[:, :-1].to(device), rows[:, 1:].to(device)

    loss = staticmethod(lm_loss)

    def eval_loss(self, model, device: str) -> float:
        x, y = self.batch(10_000, 0, 1, device)
        return float(model(x, y)[1])


def losses(out_dir: str | Path) -> dict[int, float]:
    """Train loss per step from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world, hello there! How are you today? " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Once upon a time there was a small model that learned to count: one two three four five.",
] * 10


def make_corpus(root: str | Path, train_copies: int = 20) -> Path:
    """A tokenizer stage's output in miniature: tokenizer.json and tokens/{train,val,test}.bin + meta.json."""
    root = Path(root)
    tokenizer = Tokenizer.train(TEXTS, vocab_size=300)
    tokenizer.save(root)
    rng = np.random.default_rng(0)
    docs = [tokenizer.encode(t) + [tokenizer.eot_id] for t in TEXTS]
    for split, copies in (("train", train_copies), ("val", 2), ("test", 2)):
        arrays = [docs[i] for i in rng.integers(0, len(docs), size=copies * len(docs) // 4)]
        write_shard(root / "tokens" / f"{split}.bin", arrays, tokenizer.vocab_size, tokenizer.hash)
    return root


def tiny_pretrain_args(tokenizer_dir: Path, out_dir: Path, **overrides) -> list[str]:
    """`chatforge pretrain` options for a 2-layer model trained in a second or two."""
    values = {
        "tokenizer_dir": tokenizer_dir,
        "out_dir": out_dir,
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 32,
        "model.block_size": 32,
        "eval_batches": 2,
        "train.steps": 8,
        "train.batch_size": 8,
        "train.warmup_steps": 2,
        "train.eval_every": 4,
        "train.ckpt_every": 4,
        "train.max_minutes": 0,
        "train.dtype": "fp32",
        "train.compile": "false",
        "train.device": "cpu",
        "train.progress": "false",
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return [f"--{k}={v}" for k, v in values.items()]
