"""Pretraining: the model and loop option groups, the recipe's rules (size dial, time budget, learning rates),
the next-token task and the token shards it reads.

The `chatforge pretrain` stage (chatforge/stages/pretrain.py) runs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from chatforge.config import option
from chatforge.data.shards import TokenWindows, read_meta
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.model.checkpoint import latest_checkpoint, read_config
from chatforge.model.gpt import ARCHS, GPT, PRESETS, GPTConfig, preset_config
from chatforge.tokenizer import TOKENIZER_FILE, Tokenizer
from chatforge.train import distributed
from chatforge.train.loop import TrainConfig, lm_loss
from chatforge.train.throughput import flops_per_token, matmul_peak

TOKENS_DIR = "tokens"
HEAD_WIDTH = 64
DEFAULT_DEPTH = 4
# Calibration of the budget rule on this project's reference machine (2 Zen 5 cores, bf16, compiled):
EXPECTED_MFU = 0.35  # model FLOPs / matmul peak measured at depth 4, batch 16 × 256, 7 minutes: 0.3485
# training tokens per non-embedding parameter from which a deeper model pays: after 6 minutes on one core,
# depth 3 (6.4 tokens per parameter) and depth 4 (4.3) tied at 4.38 / 4.40 held-out loss
TOKENS_PER_PARAM = 5.0
COMPILE_SECONDS = 30.0  # what torch.compile and the evaluations take out of a budget
# Peak learning rates measured best at 16 × 256 tokens a batch; other batches scale them by √(B / 4096) (the
# gradient noise scale). The AdamW groups of optimizer=muon follow Muon's rate at fixed ratios (train.optim).
# Held-out loss after 4 minutes on one core at Muon rates 0.0018 (the public recipe's √B rule), 0.0036,
# 0.0072, 0.0144 and 0.0288: 5.18 (4 heads), 4.81, 4.62, 4.53, 4.55; the flat optimum's lower end is kept
# for longer runs.
REFERENCE_BATCH_TOKENS = 4096
LR_AT_REFERENCE_BATCH = {"muon": 0.0144, "adamw": 3e-3}


def scaled_lr(batch_tokens: int, optimizer: str) -> float:
    """The peak learning rate for ``batch_tokens`` tokens a batch by the √B rule from the measured reference."""
    reference = LR_AT_REFERENCE_BATCH.get(optimizer, LR_AT_REFERENCE_BATCH["adamw"])
    return reference * math.sqrt(batch_tokens / REFERENCE_BATCH_TOKENS)


def count_params(config: GPTConfig) -> int:
    """Parameters of a GPT of this shape, counted without allocating it."""
    with torch.device("meta"):
        return GPT(config).num_params()


def _presets_table(vocab_size: int = 8192) -> str:
    rows = []
    for name, shape in PRESETS.items():
        config = preset_config(name, **({} if "vocab_size" in shape else {"vocab_size": vocab_size, "arch": "modern"}))
        rows.append(f"    {name:<8} {config.n_layer:>2} layers, {config.n_head:>2} heads, {config.n_embd:>4} dims, "
                    f"context {config.block_size:>4}: {count_params(config) / 1e6:7.2f}M parameters")
    return (f"Presets (parameters of arch=modern at a {vocab_size}-token vocabulary; gpt2 is arch=gpt2 with its own "
            "50257):\n" + "\n".join(rows))


__doc__ += "\n" + _presets_table()


@dataclass
class ModelConfig:
    arch: str = option("", f"architecture: {' or '.join(ARCHS)} (gpt2 imports/exports Hugging Face GPT-2); empty = "
                           "modern, or init_from's own")
    preset: str = option("", f"size preset: {', '.join(PRESETS)} (see the table above; empty = the depth dial)")
    depth: int = option(0, "size dial: depth d gives d layers of width 64·ceil(d/2), heads 64 wide "
                           "(0 = chosen by budget_minutes, or 4 without a budget)")
    n_layer: int = option(0, "transformer blocks (0 = the preset's or the dial's)")
    n_head: int = option(0, "attention heads (0 = the preset's or the dial's)")
    n_kv_head: int = option(0, "key/value heads, fewer than n_head for grouped-query attention (modern; 0 = n_head)")
    n_embd: int = option(0, "width of the residual stream (0 = the preset's or the dial's)")
    block_size: int = option(0, "context length in tokens, also the training window (0 = the preset's, or 256)")
    dropout: float = option(0.0, "dropout rate (0 is best for short single-epoch runs)")
    bias: bool = option(True, "gpt2: biases in Linear and LayerNorm layers, as GPT-2")
    # tanh over every logit took a quarter of a training step on the CPU (the 8192-way output layer dominates
    # a small model) for no gain at equal time: measured 5.18 vs 5.43 held-out loss after 4 minutes
    logit_softcap: float = option(0.0, "modern: logits = cap·tanh(logits / cap) (0 = none)")
    value_embeds: bool = option(True, "modern: value embeddings mixed into attention on alternating layers")

    def build(self, vocab_size: int, depth: int = 0) -> GPTConfig:
        """The GPT config; ``depth`` is the dial's setting when neither a preset nor ``self.depth`` is given."""
        overrides = {k: getattr(self, k) for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size")
                     if getattr(self, k)}
        arch_name = self.arch or "modern"
        arch = {"arch": arch_name, "bias": self.bias and arch_name == "gpt2", "logit_softcap": self.logit_softcap,
                "value_embeds": self.value_embeds, "vocab_size": vocab_size, "dropout": self.dropout}
        if self.preset:
            return preset_config(self.preset, **arch, **overrides)
        config = GPTConfig(**{**depth_shape(self.depth or depth or DEFAULT_DEPTH), **arch, **overrides})
        config.validate()
        return config

    @property
    def shape_given(self) -> bool:
        """Whether the options fix the size, so a time budget has nothing to choose."""
        return bool(self.preset or self.depth or self.n_layer or self.n_embd)


def depth_shape(depth: int) -> dict:
    """The size dial: ``depth`` layers, width 64·ceil(depth / 2), heads 64 wide, context 256.

    The aspect ratio is 32 (public GPU recipes use 64): on a CPU budget of minutes the lowest loss comes
    from a small, narrow model that sees many tokens (4 × 128 beat 4 × 256 at equal time). Heads stay
    64 wide because attention over 32-wide heads ran 40 % slower per FLOP on the CPU.
    """
    if depth < 1:
        raise ConfigError(f"option 'model.depth' must be >= 1; got {depth}")
    width = HEAD_WIDTH * math.ceil(depth / 2)
    return {"n_layer": depth, "n_embd": width, "n_head": width // HEAD_WIDTH, "block_size": 256}


def non_embedding_params(config: GPTConfig) -> int:
    """Parameters of the blocks' matrices: what a scaling law counts (lookups cost no FLOPs)."""
    d, kv = config.n_embd, config.kv_heads * config.head_dim
    return config.n_layer * (2 * d * d + 2 * d * kv + 8 * d * d)


def train_flops_per_token(config: GPTConfig) -> float:
    """Training FLOPs per token of a GPT of this shape, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        return flops_per_token(GPT(config))


def pick_depth(budget_minutes: float, vocab_size: int, device: str, model: ModelConfig) -> tuple[int, float]:
    """(depth, tokens expected) of the compute-optimal model for the budget, the way Chinchilla prescribes.

    Tokens/s of each depth is predicted from its FLOPs per token and this machine's measured matmul peak at
    the utilisation measured here (``EXPECTED_MFU``); the chosen depth is the largest whose expected tokens
    reach ``TOKENS_PER_PARAM`` per non-embedding parameter, the ratio at which the loss after a fixed time
    was lowest on this machine (see the constants).
    """
    peak = matmul_peak(device)
    seconds = max(budget_minutes * 60 - COMPILE_SECONDS, 1.0)
    best = (1, 0.0)
    for depth in range(1, 33):
        config = model.build(vocab_size, depth)
        tokens = peak * EXPECTED_MFU / train_flops_per_token(config) * seconds
        if depth == 1 or tokens >= TOKENS_PER_PARAM * non_embedding_params(config):
            best = (depth, tokens)
    return best


@dataclass
class PretrainTrainConfig(TrainConfig):
    # The recipe: Muon for the blocks' matrices and AdamW (β1 0.8, ε 1e-10) for embeddings, head and scalars;
    # warm-up, flat to 35 % of the run, linear decay to 0. The run's length is the time budget's.
    steps: int = option(1_000_000, "optimizer steps: the schedule's length (the time budget fits it shorter)")
    batch_size: int = option(16, "sequences per optimizer step, summed over all processes")
    optimizer: str = option("muon", "muon (Muon for the blocks' matrices, AdamW for the rest) or adamw")
    lr: float = option(0.0, "peak learning rate (Muon's with optimizer=muon); 0 = the batch-scaled rule "
                            "(see LR_AT_REFERENCE_BATCH)")
    min_lr: float = option(0.0, "learning rate at the end of the decay")
    schedule: str = option("wsd", "decay after warm-up: cosine, linear, constant or wsd (flat, then linear)")
    warmup_steps: int = option(40, "steps of linear warm-up from 0 to lr")
    weight_decay: float = option(0.0, "weight decay of weight matrices (never of norms, biases or embeddings)")
    beta1: float = option(0.8, "AdamW beta1")
    eps: float = option(1e-10, "AdamW epsilon")
    eval_every: int = option(250, "steps between validation losses (0 = only at the start and the end)")
    ckpt_every: int = option(250, "steps between checkpoints (0 = only at the end)")
    max_minutes: float = option(0.0, "wall-time budget in minutes (0 = budget_minutes decides)")


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
        """The mean loss of the fixed validation batches (all of one size), each rank computing its share."""
        total = 0.0
        for index, counted in distributed.eval_share(self.eval_batches):
            loss = float(model(*self.val_windows.eval_batch(index, self.eval_batch_size, device=device))[1])
            total += loss if counted else 0.0
        return distributed.sum_over_ranks([total], device)[0] / self.eval_batches


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


def choose_shape(cfg, vocab_size: int, device: str) -> tuple[GPTConfig, str]:
    """The model config to train and how it was chosen: a resumed run's own, the options', or the budget's."""
    if cfg.model.shape_given or not cfg.budget_minutes:
        config = cfg.model.build(vocab_size)
        return config, f"preset {cfg.model.preset}" if cfg.model.preset else f"depth {cfg.model.depth or DEFAULT_DEPTH}"
    found = latest_checkpoint(cfg.out_dir) if cfg.resume else None
    if found is not None:  # the budget's choice depends on measured speed: a resumed run keeps its shape
        return GPTConfig(**read_config(found)["model"]), f"the shape of {found}"
    # every rank measures, rank 0's choice holds: the ranks of one job must build the same model
    depth, tokens = distributed.init(cfg.train.device).broadcast_object(
        pick_depth(cfg.budget_minutes, vocab_size, device, cfg.model))
    return cfg.model.build(vocab_size, depth), (f"depth {depth}, chosen for a {cfg.budget_minutes:g}-minute budget "
                                               f"(~{tokens / 1e6:.1f}M tokens expected)")
