"""The one training loop: pretraining, SFT, the reward model and embeddings all train through ``train``.

A stage supplies the model (any ``nn.Module``), a ``Task`` (where batches come from and what the loss is) and
a ``TrainConfig``; the loop does the rest the same way for everyone, with the pieces of
``chatforge.train.trainer.Trainer`` (which PPO, ``chatforge.train.ppo``, drives from its own rollout loop):

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
        Validation loss (or a dict with "loss" and more metrics) of the plain module, called on every rank in
        eval mode under ``no_grad`` and autocast: each rank computes its share of the held-out items
        (``distributed.eval_share``) and the sums are reduced (``distributed.sum_over_ranks``), so the figure is
        the single process's.
    backward(model, batch, micro: Micro) -> Tensor | dict                              (optional)
        For losses that run their own backward passes (gradient caching): compute the loss, backpropagate
        ``loss * micro.scale``, wrap forward passes in ``micro.autocast()`` and every backward but the last
        in ``micro.no_sync()``; return the detached loss (or a dict as ``loss`` does). Replaces ``loss``.
    state_dict() -> dict / load_state_dict(state)                                      (optional)
        Task state saved in checkpoints (plain tensors and Python values).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from chatforge.train.config import TrainConfig, lr_at
from chatforge.train.outputs import SUMMARY_FILE, read_metrics
from chatforge.train.trainer import Micro, Trainer, TrainingInterrupted

# the loop's public names, wherever they live
__all__ = ["SUMMARY_FILE", "Micro", "Task", "TrainConfig", "TrainingInterrupted", "lm_loss", "lr_at",
           "read_metrics", "train"]


class Task(Protocol):
    def batch(self, step: int, part: int, parts: int, device: str) -> Any: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor | dict: ...


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Next-token loss of an ``(inputs, targets)`` batch for models returning ``(logits, loss)`` like GPT."""
    x, y = batch
    _, loss = model(x, y)
    return {"loss": loss, "tokens": x.numel()}


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
    evaluate = getattr(task, "eval_loss", None)
    with Trainer(model, cfg, out_dir, resume=resume, meta=meta, tokenizer=tokenizer, state=task,
                 evaluate=evaluate) as trainer:
        while not trainer.done:
            step = trainer.step
            trainer.optimizer_step(lambda part, parts: task.batch(step, part, parts, trainer.device),
                                   loss=getattr(task, "loss", None), backward=getattr(task, "backward", None))
        return trainer.finish()
