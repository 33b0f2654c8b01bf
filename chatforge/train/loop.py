"""The one training loop: pretraining, SFT, the reward model, PPO and embeddings all train through ``train``.

A stage supplies the model (any ``nn.Module``), a ``Task`` (where batches come from and what the loss is) and
a ``TrainConfig``; the loop does the rest the same way for everyone:

* AdamW, or Muon for the blocks' matrices with AdamW for the rest (``chatforge.train.optim``); linear
  warm-up then cosine, linear, warm-up-stable-decay (flat, then linear) or no decay to ``min_lr``, gradient
  clipping;
* gradient accumulation: each process cuts its share of the global batch into micro-batches;
* DDP over ``torchrun`` processes (``chatforge.train.distributed``), bf16 autocast and ``torch.compile``
  where they pay off (``chatforge.device``);
* validation every ``eval_every`` steps, checkpoints every ``ckpt_every`` steps and at the end, exact resume
  (``chatforge.model.checkpoint``), a wall-time budget (``max_minutes``) the schedule is fitted to;
* a progress bar (loss, tokens/s, ETA), ``metrics.jsonl``, ``loss.png`` and ``summary.json`` in ``out_dir``.

The Task protocol (duck-typed; only ``batch`` and ``loss`` are required)::

    batch(step, part, parts, device) -> batch
        Part ``part`` (0-based) of ``parts`` equal, contiguous parts of the global batch of optimizer step
        ``step``. It must be a pure function of its arguments: that is what makes resume exact and makes N
        processes see exactly the rows one process would (part = rank * accumulation + micro-batch).
    loss(model, batch) -> Tensor | dict
        The mean loss of the micro-batch (a scalar tensor with a graph), or a dict with "loss" (required),
        "tokens" (int: tokens processed, for tokens/s; without it throughput is counted in sequences) and any
        other scalar metrics to log. ``model`` is the wrapped module (compiled, DDP): call it, i.e. its
        ``forward``, so DDP sees the computation; reach the plain module with ``checkpoint.unwrap(model)``.
        Micro-batches are weighted equally, so the step's loss is the mean of the micro-batch means.
    eval_loss(model, device) -> float | dict | None                                    (optional)
        Validation loss (or a dict with "loss" and more metrics) of the plain module, called on rank 0 in
        eval mode under ``no_grad`` and autocast.
    backward(model, batch, micro: Micro) -> Tensor | dict                              (optional)
        For losses that run their own backward passes (gradient caching): compute the loss, backpropagate
        ``loss * micro.scale``, wrap forward passes in ``micro.autocast()`` and every backward but the last
        in ``micro.no_sync()``; return the detached loss (or a dict as ``loss`` does). Replaces ``loss``.
    state_dict() -> dict / load_state_dict(state)                                      (optional)
        Task state saved in checkpoints (plain tensors and Python values).
    should_stop() -> str | None                                                        (optional)
        Checked after every step; a message ends training there (with a checkpoint), e.g. PPO's KL limit.
        It must give the same answer on every rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.state_dict as sd
from torch import nn

from chatforge import io
from chatforge.config import option
from chatforge.device import autocast, dtype_name, resolve_compile, resolve_dtype
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.model import checkpoint as ckpt
from chatforge.train import distributed, throughput
from chatforge.train.optim import OPTIMIZERS, apply_schedule, make_optimizer

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "loss.png"
SCHEDULES = ("cosine", "linear", "constant", "wsd")
SHARDED_OPTIMIZER_DIR = "optimizer"  # a checkpoint's optimizer state as torch.distributed.checkpoint shards


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


class Task(Protocol):
    def batch(self, step: int, part: int, parts: int, device: str) -> Any: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor | dict: ...


@dataclass
class Micro:
    """What a task's own ``backward`` needs to know about the micro-batch it computes."""

    scale: float  # multiply the loss by this before backpropagating (1 / micro-batches per step)
    autocast: Callable[[], contextlib.AbstractContextManager]  # wrap forward passes in it, not backward
    no_sync: Callable[[], contextlib.AbstractContextManager]  # wrap every backward but the micro-batch's last


class TrainingInterrupted(ChatforgeError):
    """Stopped by SIGINT/SIGTERM after saving a checkpoint; the run continues with ``resume``."""


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Next-token loss of an ``(inputs, targets)`` batch for models returning ``(logits, loss)`` like GPT."""
    x, y = batch
    _, loss = model(x, y)
    return {"loss": loss, "tokens": x.numel()}


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


def _split(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
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


def _as_metrics(out: torch.Tensor | dict) -> tuple[torch.Tensor, int | None, dict]:
    if isinstance(out, torch.Tensor):
        return out, None, {}
    if not isinstance(out, dict) or "loss" not in out:
        raise TypeError("a task's loss must return a scalar tensor or a dict with a 'loss' entry")
    extras = {k: float(v) for k, v in out.items() if k not in ("loss", "tokens")}
    tokens = out.get("tokens")
    return out["loss"], None if tokens is None else int(tokens), extras


def _eval_metrics(out: float | dict | None) -> dict:
    if out is None:
        return {}
    if isinstance(out, dict):
        return {("val_loss" if k == "loss" else f"val_{k}"): float(v) for k, v in out.items()}
    return {"val_loss": float(out)}


class _StopSignal:
    """The first SIGINT/SIGTERM asks the loop to stop at the next step boundary; a second one is not caught."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def read_metrics(out_dir: str | Path, up_to_step: int | None = None) -> list[dict]:
    """Rows of ``metrics.jsonl`` (those of steps after ``up_to_step`` dropped: a resumed run redoes them)."""
    path = Path(out_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if up_to_step is None or row.get("step", 0) <= up_to_step:
                rows.append(row)
    return rows


def plot_losses(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Train loss (raw and smoothed) and validation loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train)
        smooth, ema = [], losses[0]
        for value in losses:
            ema = 0.9 * ema + 0.1 * value
            smooth.append(ema)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, smooth, color="tab:blue", label="train (smoothed)")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


class _Run:
    """State of one call of ``train``; see its docstring."""

    def __init__(self, model, task, cfg: TrainConfig, out_dir, resume, meta, tokenizer):
        cfg.validate()
        self.cfg, self.task, self.out_dir = cfg, task, Path(out_dir)
        self.meta = dict(meta or {})
        self.meta.setdefault("model", ckpt.model_config_of(model))
        self.tokenizer = tokenizer
        self.dist = distributed.init(cfg.device)
        self.device = self.dist.device
        self.micro, self.accum = _split(cfg, self.dist.world_size)
        self.model = model
        self.start_from = self._checkpoint_to_resume(resume)  # before anything is written

        self.fsdp = cfg.parallel == "fsdp" and self.dist.enabled
        on_meta = any(p.is_meta for p in model.parameters())  # built without storage: initialised once sharded
        if not on_meta:
            self.model.to(self.device)
        self.compiled = resolve_compile(cfg.compile, self.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device, self.compiled)
        if self.fsdp:
            param_dtype = self.dtype if self.dtype != torch.float32 else None
            distributed.shard_model(self.model, param_dtype, cfg.activation_checkpointing)
        if on_meta:
            distributed.materialize(self.model, self.device, cfg.seed)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.step, self.seen, self.elapsed_before = 0, 0, 0.0
        self.warm_elapsed = None  # run time when warm-up ended: the time-based decay starts there
        self.time_progress = 0.0
        self.rate = None  # steady units/s measured in this process
        self.rows: list[dict] = []
        self.unit = "tokens"  # or "sequences" for tasks that do not count their tokens
        torch.manual_seed(cfg.seed + self.dist.rank)
        random.seed(cfg.seed + self.dist.rank)
        np.random.seed(cfg.seed + self.dist.rank)
        if self.start_from is not None:
            self._restore(self.start_from)
        self.wrapped = self._wrap()
        self.eval_seconds = 0.0
        self.ckpt_seconds = 0.0
        self.saved_step = self.step if self.start_from is not None else None
        self.stopped_by = "steps"  # or "max_minutes" when the budget cut the schedule short

    # ---- setup -------------------------------------------------------------------------------------------

    def _checkpoint_to_resume(self, resume: bool) -> Path | None:
        """Rank 0 looks for the checkpoint and every rank resumes that one (or fails naming it)."""
        found = self.dist.agree_on_path(
            ckpt.latest_checkpoint(self.out_dir) if self.dist.is_main else None, "checkpoint"
        )
        if found is None:
            if resume and self.dist.is_main:
                print(f"[train] no checkpoint in {self.out_dir}; starting from scratch")
            return None
        if not resume:
            raise ChatforgeError(
                f"{self.out_dir} already holds checkpoints ({found.name}); continue it with "
                "--resume, or choose another out_dir"
            )
        ckpt.check_compatible(found, self.model, self.meta.get("model"))
        return found

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        return getattr(self.optimizer, "optimizers", [self.optimizer])

    def _restore(self, folder: Path) -> None:
        if self.fsdp:  # every rank reads the whole file and keeps its shards
            sd.set_model_state_dict(self.model, ckpt.load_weights_file(folder, self.model, "cpu"),
                                    options=sd.StateDictOptions(full_state_dict=True))
        else:
            ckpt.load_weights(folder, self.model, self.device)
        state = ckpt.load_trainer_state(folder)
        base_lrs = [group["base_lr"] for group in self.optimizer.param_groups]
        try:
            if (folder / SHARDED_OPTIMIZER_DIR).is_dir():  # resharded to this run's ranks, whatever saved it
                optimizer_state = sd.get_optimizer_state_dict(self.model, self._optimizers())
                dcp.load(optimizer_state, checkpoint_id=folder / SHARDED_OPTIMIZER_DIR)
                sd.set_optimizer_state_dict(self.model, self._optimizers(), optimizer_state)
            elif self.fsdp:
                raise ChatforgeError(
                    f"cannot resume {folder} with train.parallel=fsdp: it was saved by a ddp or single-process "
                    "run, whose optimizer state is not sharded; resume it with train.parallel=ddp"
                )
            else:
                self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise ChatforgeError(
                f"cannot resume from {folder}: its optimizer state does not fit this model and "
                f"train.optimizer={self.cfg.optimizer} ({exc})"
            ) from None
        for group, base_lr in zip(self.optimizer.param_groups, base_lrs):  # states saved before base_lr existed
            group["base_lr"] = base_lr
        self.step, self.seen = state["step"], state["seen"]
        self.elapsed_before = state["elapsed"]
        self.rate, self.unit = state.get("rate"), state.get("unit", self.unit)
        self.warm_elapsed, self.time_progress = state.get("warm_elapsed"), state.get("time_progress", 0.0)
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[self.dist.rank] if len(rngs) == self.dist.world_size else rngs[0])
        if hasattr(self.task, "load_state_dict") and state.get("task") is not None:
            self.task.load_state_dict(state["task"])
        self.rows = read_metrics(self.out_dir, self.step)
        if self.dist.is_main:
            print(f"[train] resumed from {folder} at step {self.step}")

    def _wrap(self) -> nn.Module:
        wrapped = torch.compile(self.model) if self.compiled else self.model
        if self.dist.enabled and not self.fsdp:
            ids = [self.dist.local_rank] if torch.device(self.device).type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(wrapped, device_ids=ids)
        return wrapped

    def _autocast(self):
        return autocast(self.device, self.dtype)

    def _no_sync(self):
        if self.fsdp:
            return distributed.fsdp_no_sync(self.model)
        return self.wrapped.no_sync() if self.dist.enabled else contextlib.nullcontext()

    # ---- one optimizer step ------------------------------------------------------------------------------

    def _train_step(self, interrupted: Callable[[], bool], clock: Callable[[], tuple[float, float]]) -> dict:
        """One optimizer step: its loss, units processed, grad norm, metrics, and what every rank must agree on.

        The step's single collective sums the loss and units over the ranks, ORs ``interrupted()`` (so all
        stop after the same step) and hands everyone rank 0's ``clock()`` (run time so far, time reserved for
        the end), from which the time-based decay is computed identically everywhere.
        """
        lr = lr_at(self.step, self.cfg, self.time_progress)
        apply_schedule(self.optimizer, lr / self.cfg.lr, self.step, self.cfg)
        custom = getattr(self.task, "backward", None)
        loss_sum, units, extras = 0.0, 0, {}
        for index in range(self.accum):
            batch = self.task.batch(
                self.step, self.dist.rank * self.accum + index, self.dist.world_size * self.accum, self.device
            )
            last = index == self.accum - 1
            with contextlib.nullcontext() if last else self._no_sync():
                if custom is not None:
                    loss, tokens, more = _as_metrics(
                        custom(self.wrapped, batch, Micro(1.0 / self.accum, self._autocast, self._no_sync))
                    )
                else:
                    with self._autocast():
                        loss, tokens, more = _as_metrics(self.task.loss(self.wrapped, batch))
                    (loss / self.accum).backward()
            loss_sum += float(loss.detach())
            units += self.micro if tokens is None else tokens
            if tokens is None:
                self.unit = "sequences"
            for key, value in more.items():
                extras[key] = extras.get(key, 0.0) + value / self.accum
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = float(distributed.full_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed, reserve = clock() if self.dist.is_main else (0.0, 0.0)
        reduced = torch.tensor(
            [loss_sum / self.accum, units, float(interrupted()), elapsed, reserve],
            dtype=torch.float64,
            device=self.device,
        )
        loss, units, stop, elapsed, reserve = self.dist.all_reduce(reduced).tolist()
        loss /= self.dist.world_size
        if not math.isfinite(loss):
            raise ChatforgeError(
                f"the training loss became {loss} at step {self.step + 1}; lower train.lr or check the data"
            )
        return {
            "loss": loss,
            "units": units,
            "grad_norm": grad_norm,
            "metrics": {"lr": lr, **extras},
            "interrupted": stop > 0,
            "elapsed": elapsed,
            "reserve": reserve,
        }

    # ---- evaluation, checkpoints, outputs ----------------------------------------------------------------

    def _evaluate(self) -> dict:
        metrics = {}
        evaluate = getattr(self.task, "eval_loss", None)
        # a sharded model's forward needs every rank (each gathers the blocks' parameters from the others)
        if (self.dist.is_main or self.fsdp) and evaluate is not None:
            t0 = time.perf_counter()
            self.model.eval()
            with torch.no_grad(), self._autocast():
                metrics = _eval_metrics(evaluate(self.model, self.device))
            self.model.train()
            self.eval_seconds = time.perf_counter() - t0
            # eval_s: what evaluation took, so a curve can be put on training time alone
            if metrics and self.dist.is_main:
                self.rows.append({"step": self.step, **metrics, "eval_s": round(self.eval_seconds, 3)})
        return metrics

    def _trainer_state(self, elapsed: float) -> dict:
        return {
            "optimizer": None if self.fsdp else self.optimizer.state_dict(),  # fsdp: sharded, beside it
            "step": self.step,
            "seen": self.seen,
            "elapsed": elapsed,
            "rate": self.rate,
            "unit": self.unit,
            "warm_elapsed": self.warm_elapsed,
            "time_progress": self.time_progress,
            "rng": self.dist.gather_object(ckpt.rng_state()),
            "task": self.task.state_dict() if hasattr(self.task, "state_dict") else None,
        }

    def _save(self, elapsed: float) -> None:
        t0 = time.perf_counter()
        state = self._trainer_state(elapsed)  # every rank takes part: the RNG states are gathered
        weights, folders = None, None
        if self.fsdp:  # the weights gathered whole on rank 0 (the ordinary file); the optimizer state stays sharded
            weights = sd.get_model_state_dict(
                self.model, options=sd.StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            sharded = self.out_dir / ckpt.CHECKPOINTS_DIR / f".{SHARDED_OPTIMIZER_DIR}-{ckpt.step_name(self.step)}"
            dcp.save(sd.get_optimizer_state_dict(self.model, self._optimizers()), checkpoint_id=sharded)
            self.dist.barrier()
            folders = {SHARDED_OPTIMIZER_DIR: sharded}
        if self.dist.is_main:
            config = {**self.meta, "train": dataclasses.asdict(self.cfg)}
            ckpt.save_checkpoint(
                self.out_dir, self.step, self.model, state, config, self.tokenizer, keep=self.cfg.keep_checkpoints,
                weights=weights, folders=folders,
            )
            self._write_progress()
        self.dist.barrier()
        self.saved_step = self.step
        self.ckpt_seconds = time.perf_counter() - t0

    def _write_progress(self) -> None:
        io.write_jsonl(self.out_dir / METRICS_FILE, self.rows)
        title = (
            f"{self.meta.get('stage', 'training')}: {self.params / 1e6:.2f}M params, {self.seen / 1e6:.2f}M {self.unit}"
        )
        plot_losses(self.rows, self.out_dir / PLOT_FILE, title)

    def _speed(self) -> dict:
        """Tokens/s of the whole job, its MFU and every rank's peak memory (a collective: all ranks call it)."""
        memory = max(self.dist.gather_object(throughput.peak_memory_mb(self.device)))
        speed = {"peak_memory_mb": round(memory, 1)}
        if self.unit == "tokens" and self.rate:
            job_rate = self.rate * self.dist.world_size  # every rank processes its share at the measured rate
            peak, source = throughput.peak_flops(self.device, self.dtype)
            speed.update(job_tokens_per_s=round(job_rate, 1), peak_flops_source=source,
                         mfu=round(job_rate * throughput.flops_per_token(ckpt.unwrap(self.model)) /
                                   (peak * self.dist.world_size), 4))
        return speed

    def _summary(self, elapsed: float) -> dict:
        train_losses = [r["loss"] for r in self.rows if "loss" in r][-10:]
        val = [r["val_loss"] for r in self.rows if "val_loss" in r]
        unit = self.unit
        return {
            **{k: v for k, v in self.meta.items() if not isinstance(v, (dict, list))},
            "params": self.params,
            "steps": self.step,
            "stopped_by": self.stopped_by,
            f"{unit}_seen": int(self.seen),
            f"{unit}_per_s": None if self.rate is None else round(self.rate, 1),
            "final_train_loss": round(sum(train_losses) / len(train_losses), 4) if train_losses else None,
            "final_val_loss": round(val[-1], 4) if val else None,
            "best_val_loss": round(min(val), 4) if val else None,
            "wall_time_s": round(elapsed, 1),
            "world_size": self.dist.world_size,
            "parallel": "fsdp" if self.fsdp else "ddp" if self.dist.enabled else "single",
            **self._speed(),
            "device": self.device,
            "dtype": dtype_name(self.dtype),
            "compiled": self.compiled,
            "batch_size": self.cfg.batch_size,
            "micro_batch_size": self.micro,
            "grad_accum_steps": self.accum,
            "model": self.meta.get("model"),
            "train": dataclasses.asdict(self.cfg),
        }

    # ---- the wall-time budget ----------------------------------------------------------------------------

    def _track_budget(self, elapsed: float, reserve: float) -> bool:
        """Update the time-based decay progress from rank 0's clock; True when the budget is spent.

        ``reserve`` is what the final evaluation and checkpoint will take (as last measured), so the run
        ends with them inside the budget. Every rank gets the same clock, hence the same learning rate.
        """
        budget = self.cfg.max_minutes * 60
        if not budget:
            return False
        if self.warm_elapsed is None and self.step >= self.cfg.warmup_steps:
            self.warm_elapsed = elapsed
        if self.warm_elapsed is not None:
            self.time_progress = (elapsed - self.warm_elapsed) / max(1e-9, budget - reserve - self.warm_elapsed)
        return elapsed + reserve >= budget

    # ---- the loop ----------------------------------------------------------------------------------------

    def run(self) -> dict:
        from tqdm import tqdm

        cfg, main = self.cfg, self.dist.is_main
        t_start = time.perf_counter()

        def elapsed() -> float:
            return self.elapsed_before + time.perf_counter() - t_start

        self.model.train()
        if self.step == 0:
            self._evaluate()  # the curve's starting point
        steps_here, timed_seconds, timed_units = 0, 0.0, 0.0
        # a log file (not a terminal) gets a progress line every 30 s instead of ten redraws a second
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not (main and cfg.progress),
            dynamic_ncols=True,
            desc=self.meta.get("stage", "train"),
            unit="step",
            mininterval=0.1 if sys.stderr.isatty() else 30,
        )
        interrupted = out_of_time = False
        with _StopSignal() as stop_signal:
            while self.step < cfg.steps and not out_of_time:
                t0 = time.perf_counter()
                out = self._train_step(
                    lambda: stop_signal.requested, lambda: (elapsed(), self.eval_seconds + self.ckpt_seconds)
                )
                self.step += 1
                self.seen += out["units"]
                steps_here += 1
                seconds = time.perf_counter() - t0
                if steps_here > 1:  # the first step of a process compiles and warms up; it would skew the rate
                    timed_seconds, timed_units = timed_seconds + seconds, timed_units + out["units"]
                    self.rate = timed_units / timed_seconds
                out_of_time = self._track_budget(out["elapsed"], out["reserve"])
                last = self.step == cfg.steps or out_of_time
                if self.step % cfg.log_every == 0 or last:
                    self.rows.append(
                        {
                            "step": self.step,
                            "loss": round(out["loss"], 6),
                            "grad_norm": round(out["grad_norm"], 4),
                            self.unit: int(self.seen),
                            "elapsed_s": round(out["elapsed"], 2),
                            **out["metrics"],
                        }
                    )
                if cfg.max_minutes and 0 < self.time_progress < 1:  # the bar's total and ETA follow the budget
                    bar.total = min(
                        cfg.steps, self.step + round((self.step - cfg.warmup_steps) * (1 / self.time_progress - 1))
                    )
                bar.update(1)
                bar.set_postfix_str(
                    f"loss {out['loss']:.4f} | {out['units'] / seconds:,.0f} {self.unit[:3]}/s", refresh=False
                )
                if out["interrupted"]:
                    interrupted = True
                    break
                reason = getattr(self.task, "should_stop", lambda: None)()
                if reason:  # the task's state is the same on every rank, so all of them stop at this step
                    self.stopped_by = "task"
                    if main:
                        bar.write(f"[train] stopping early at step {self.step}: {reason}")
                    break
                if cfg.eval_every and self.step % cfg.eval_every == 0 and not last:
                    metrics = self._evaluate()
                    if metrics:
                        bar.write(
                            f"step {self.step}: train loss {out['loss']:.4f}, "
                            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                        )
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and not last:
                    self._save(elapsed())
        bar.close()
        if interrupted:
            if self.saved_step != self.step:
                self._save(elapsed())
            raise TrainingInterrupted(
                f"training interrupted at step {self.step}; checkpoint saved in {self.out_dir}; "
                "run again with --resume to continue"
            )
        if self.step < cfg.steps and self.stopped_by == "steps":
            self.stopped_by = "max_minutes"
        if not any(r.get("step") == self.step and "val_loss" in r for r in self.rows):
            self._evaluate()
        if self.saved_step != self.step:
            self._save(elapsed())
        summary = self._summary(elapsed())
        if main:
            self._write_progress()
            io.write_json(self.out_dir / SUMMARY_FILE, summary)
            val = f", val loss {summary['final_val_loss']:.4f}" if summary["final_val_loss"] is not None else ""
            print(
                f"[train] {self.step} steps, {self.seen / 1e6:.2f}M {self.unit} in {summary['wall_time_s']:.0f} s"
                f"{val}; outputs in {self.out_dir}"
            )
        return summary


def train(
    model: nn.Module,
    task: Task,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    meta: dict | None = None,
    tokenizer: str | Path | None = None,
) -> dict:
    """Train ``model`` on ``task`` as ``cfg`` says; checkpoints and outputs go to ``out_dir``. Returns the summary.

    ``resume`` continues from ``out_dir``'s latest checkpoint (exactly: same weights, optimizer, RNG, step,
    hence the same batches); without it an ``out_dir`` that already holds checkpoints is an error, so nothing
    is overwritten. A resumed checkpoint must fit ``model`` (ChatforgeError otherwise, before any write).
    ``meta`` (JSON values) is stored in every checkpoint's config.json; its ``"model"`` entry (default: the
    GPT config of ``model``) is what ``checkpoint.load_model`` rebuilds, and its scalar entries are copied
    into summary.json. ``tokenizer`` (tokenizer.json or its folder) is copied into every checkpoint.
    The caller builds the model (seeded, on any device); the loop moves it to the run's device.
    Raises ``TrainingInterrupted`` (after checkpointing) when stopped by SIGINT/SIGTERM.
    """
    return _Run(model, task, cfg, out_dir, resume, meta, tokenizer).run()
