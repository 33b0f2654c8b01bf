"""Pretraining: the model and loop option groups, the next-token task and the token shards it reads.

The `chatforge pretrain` stage (chatforge/stages/pretrain.py) runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from chatforge.config import option
from chatforge.data.shards import TokenWindows, read_meta
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, PRESETS, GPTConfig, preset_config
from chatforge.tokenizer import TOKENIZER_FILE, Tokenizer
from chatforge.train.loop import TrainConfig, lm_loss

TOKENS_DIR = "tokens"


def count_params(config: GPTConfig) -> int:
    """Parameters of a GPT of this shape, counted without allocating it."""
    with torch.device("meta"):
        return GPT(config).num_params()


def _presets_table(vocab_size: int = 8192) -> str:
    rows = []
    for name, shape in PRESETS.items():
        config = preset_config(name, **({} if "vocab_size" in shape else {"vocab_size": vocab_size}))
        rows.append(f"    {name:<8} {config.n_layer:>2} layers, {config.n_head:>2} heads, {config.n_embd:>4} dims, "
                    f"context {config.block_size:>4}: {count_params(config) / 1e6:7.2f}M parameters")
    return f"Presets (parameters at a {vocab_size}-token vocabulary; gpt2 has its own 50257):\n" + "\n".join(rows)


__doc__ += "\n" + _presets_table()


@dataclass
class ModelConfig:
    preset: str = option("nano", f"size preset: {', '.join(PRESETS)} (see the table above)")
    n_layer: int = option(0, "transformer blocks (0 = the preset's)")
    n_head: int = option(0, "attention heads (0 = the preset's)")
    n_embd: int = option(0, "width of the residual stream (0 = the preset's)")
    block_size: int = option(0, "context length in tokens, also the training window (0 = the preset's)")
    dropout: float = option(0.0, "dropout rate (0 is best for short single-epoch runs)")
    bias: bool = option(True, "biases in Linear and LayerNorm layers, as GPT-2")

    def build(self, vocab_size: int) -> GPTConfig:
        overrides = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(self, k)}
        return preset_config(self.preset, vocab_size=vocab_size, dropout=self.dropout, bias=self.bias, **overrides)


@dataclass
class PretrainTrainConfig(TrainConfig):
    # Measured on 2 cores (bf16 autocast + torch.compile): see the module docstring of chatforge.train.loop
    # and the report of the pretrain stage; these fill ~10 minutes and max_minutes guards slower machines.
    steps: int = option(1800, "optimizer steps: the schedule's length (max_minutes may fit it shorter)")
    batch_size: int = option(16, "sequences per optimizer step, summed over all processes")
    lr: float = option(3e-3, "peak learning rate, reached at the end of warm-up")
    min_lr: float = option(3e-4, "learning rate at the end of the decay")
    warmup_steps: int = option(50, "steps of linear warm-up from 0 to lr")
    eval_every: int = option(250, "steps between validation losses (0 = only at the start and the end)")
    ckpt_every: int = option(250, "steps between checkpoints (0 = only at the end)")
    max_minutes: float = option(10.0, "wall-time budget in minutes: the schedule's length is fitted to the measured "
                                       "speed and the run stops with a checkpoint when it is spent (0 = none)")


class PretrainTask:
    """Random windows of the train shard; the validation loss over fixed windows of the val shard."""

    def __init__(self, train_windows: TokenWindows, val_windows: TokenWindows, batch_size: int, eval_batches: int,
                 eval_batch_size: int):
        self.train_windows, self.val_windows = train_windows, val_windows
        self.batch_size, self.eval_batches, self.eval_batch_size = batch_size, eval_batches, eval_batch_size

    def batch(self, step: int, part: int, parts: int, device: str):
        return self.train_windows.batch(step, self.batch_size, part, parts, device)

    loss = staticmethod(lm_loss)

    def eval_loss(self, model, device: str) -> float:
        losses = [
            float(model(x, y)[1])
            for x, y in self.val_windows.eval_batches(self.eval_batches, self.eval_batch_size, device=device)
        ]
        return sum(losses) / len(losses)


def open_shards(tokenizer_dir: str | Path, block_size: int, seed: int) -> tuple[Path, TokenWindows, TokenWindows]:
    """(tokenizer.json, train windows, val windows) of a tokenizer stage's output, checked to belong together."""
    root = Path(tokenizer_dir)
    if not root.is_dir():
        raise ChatforgeError(
            f"tokenizer directory not found: {root} (run `chatforge tokenizer` first, or set --tokenizer_dir)"
        )
    tokenizer_file = root / TOKENIZER_FILE
    tokenizer = Tokenizer.load(tokenizer_file)
    tokens = root / TOKENS_DIR
    meta = read_meta(tokens)
    if meta.get("tokenizer_hash") not in (None, tokenizer.hash):
        raise ChatforgeError(
            f"{tokens} was encoded with another tokenizer than {tokenizer_file} "
            f"({meta.get('tokenizer_hash')} vs {tokenizer.hash}); rerun `chatforge tokenizer`"
        )
    if meta["vocab_size"] != tokenizer.vocab_size:
        raise ChatforgeError(
            f"{tokens} has vocabulary size {meta['vocab_size']} but {tokenizer_file} has {tokenizer.vocab_size}"
        )
    windows = [TokenWindows(tokens / f"{split}.bin", block_size, seed) for split in ("train", "val")]
    return tokenizer_file, *windows
