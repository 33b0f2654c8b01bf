"""The shared training loop's options (``TrainConfig``) and its learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from chatforge.config import option
from chatforge.errors import ConfigError
from chatforge.train import distributed
from chatforge.train.optim import OPTIMIZERS

SCHEDULES = ("cosine", "linear", "constant", "wsd")


@dataclass
class TrainConfig:
    steps: int = option(1000, "optimizer steps: the schedule's length (max_minutes may fit it shorter)")
    batch_size: int = option(32, "sequences per optimizer step, summed over all processes")
    micro_batch_size: int = option(0, "sequences per forward pass in one process; less than its share of the batch "
                                      "means gradient accumulation (0 = the whole share)")
    lr: float = option(3e-3, "peak learning rate, reached at the end of warm-up")
    min_lr: float = option(3e-4, "learning rate at the end of the decay")
    schedule: str = option("cosine", "decay after warm-up: cosine, linear, constant or wsd (flat, then linear)")
    flat_fraction: float = option(0.35, "wsd: share of the post-warm-up run held at the peak before the linear decay")
    warmup_steps: int = option(50, "steps of linear warm-up from 0 to lr")
    optimizer: str = option("adamw", "adamw, or muon (Muon for the blocks' matrices, AdamW for the rest; "
                                      "lr is then Muon's rate, see chatforge.train.optim)")
    weight_decay: float = option(0.1, "weight decay of weight matrices (never of norms, biases or embeddings)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    muon_momentum: float = option(0.95, "Muon momentum (after its warm-up from 0.85)")
    muon_momentum_warmup: int = option(300, "steps over which Muon's momentum rises from 0.85 (0 = none)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = no clipping)")
    eval_every: int = option(100, "steps between validation losses (0 = only at the start and the end)")
    ckpt_every: int = option(200, "steps between checkpoints (0 = only at the end)")
    keep_checkpoints: int = option(2, "how many newest checkpoints to keep (0 = all)")
    max_minutes: float = option(0.0, "wall-time budget in minutes: the schedule's length is fitted to the measured "
                                      "speed and the run stops with a checkpoint when it is spent (0 = none)")
    log_every: int = option(1, "steps between rows of metrics.jsonl")
    dtype: str = option("auto", "autocast dtype: auto (bf16 where it is faster), bf16 or fp32")
    compile: str = option("auto", "torch.compile the model: auto (where supported), true or false")
    device: str = option("auto", "auto, cpu, cuda or cuda:N (under torchrun each rank takes its local GPU)")
    parallel: str = option("ddp", "under torchrun: ddp (every rank holds the whole model) or fsdp (FSDP2: parameters, "
                                  "gradients and optimizer state sharded across the ranks)")
    activation_checkpointing: bool = option(False, "fsdp: recompute each block's activations in backward "
                                                   "(less memory, ~30 % more compute)")
    seed: int = option(0, "seed of the random draws during training (dropout); batches are the task's")
    progress: bool = option(True, "show a progress bar")
    # dtype=auto on a CPU with native bf16: an eager (uncompiled) step stays in fp32 unless the trainer has measured
    # its own step faster in bf16
    eager_bf16_pays: ClassVar[bool] = False

    def validate(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option 'train.{name}' must be >= 1; got {getattr(self, name)}")
        for name in ("micro_batch_size", "warmup_steps", "eval_every", "ckpt_every", "keep_checkpoints",
                     "weight_decay", "grad_clip", "max_minutes", "min_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"option 'train.{name}' must be >= 0; got {getattr(self, name)}")
        if self.log_every < 1:
            raise ConfigError(f"option 'train.log_every' must be >= 1; got {self.log_every}")
        if not self.lr > 0 or self.min_lr > self.lr:
            raise ConfigError(f"options 'train.lr' ({self.lr}) must be > 0 and 'train.min_lr' ({self.min_lr}) <= lr")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"options 'train.beta1'/'train.beta2' must be in [0, 1); got {self.beta1}, {self.beta2}")
        if not 0 <= self.flat_fraction < 1:
            raise ConfigError(f"option 'train.flat_fraction' must be in [0, 1); got {self.flat_fraction}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"option 'train.optimizer' must be one of {', '.join(OPTIMIZERS)}; "
                              f"got {self.optimizer!r}")
        if not 0 <= self.muon_momentum < 1 or self.muon_momentum_warmup < 0:
            raise ConfigError("option 'train.muon_momentum' must be in [0, 1) and 'train.muon_momentum_warmup' >= 0")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"option 'train.schedule' must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if self.parallel not in distributed.PARALLEL_MODES:
            raise ConfigError(f"option 'train.parallel' must be one of {', '.join(distributed.PARALLEL_MODES)}; "
                              f"got {self.parallel!r}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"option 'train.dtype' must be auto, bf16 or fp32; got {self.dtype!r}")
        if str(self.compile).lower() not in ("auto", "true", "false"):
            raise ConfigError(f"option 'train.compile' must be auto, true or false; got {self.compile!r}")



def lr_at(step: int, cfg: TrainConfig, time_progress: float = 0.0) -> float:
    """Learning rate of 0-based optimizer step ``step``.

    Linear warm-up over ``warmup_steps``, then decay to ``min_lr`` over whichever runs out first: the steps
    left until ``cfg.steps`` or, under a ``max_minutes`` budget, the time (``time_progress`` is the fraction
    of the post-warm-up time already spent). A budget thus always ends on a fully decayed learning rate, at
    whatever speed the machine turns out to run.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    step_progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, max(step_progress, time_progress))
    if cfg.schedule == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.schedule == "wsd":  # warm-up, stable, decay: the flat part is where most of the learning happens
        coeff = min(1.0, (1.0 - progress) / (1.0 - cfg.flat_fraction))
    else:
        coeff = 1.0 - progress
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def split_batch(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro-batch size, micro-batches per step) of one process."""
    if cfg.batch_size % world_size:
        raise ConfigError(f"train.batch_size {cfg.batch_size} must be a multiple of the {world_size} processes")
    share = cfg.batch_size // world_size
    micro = cfg.micro_batch_size or share
    if micro > share or share % micro:
        raise ConfigError(
            f"train.micro_batch_size {micro} must divide each process's share of the batch ({share} = "
            f"batch_size {cfg.batch_size} / {world_size} processes)"
        )
    return micro, share // micro
