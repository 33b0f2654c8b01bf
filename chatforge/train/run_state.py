"""What one training run holds and keeps across a resume: the placed and wrapped model, the optimizer, the counters,
the metrics rows; its checkpoints (save and exact restore) and its summary. ``Trainer`` steps it."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.state_dict as sd
from torch import nn

from chatforge import io
from chatforge.device import autocast, dtype_name, resolve_compile, resolve_dtype
from chatforge.errors import ChatforgeError
from chatforge.model import checkpoint as ckpt
from chatforge.model.weights import export_sharded
from chatforge.train import distributed, throughput
from chatforge.train.config import TrainConfig, split_batch
from chatforge.train.optim import make_optimizer
from chatforge.train.outputs import METRICS_FILE, PLOT_FILE, plot_losses, read_metrics

# an FSDP checkpoint's weights and optimizer state as torch.distributed.checkpoint shards (every rank writes its own)
SHARDED_MODEL_DIR, SHARDED_OPTIMIZER_DIR = "model", "optimizer"


def _eval_metrics(out: float | dict | None) -> dict:
    if out is None:
        return {}
    if isinstance(out, dict):
        return {("val_loss" if k == "loss" else f"val_{k}"): float(v) for k, v in out.items()}
    return {"val_loss": float(out)}


class RunState:
    """Set up (or resume) one run; see ``Trainer`` for the arguments."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False,
                 meta: dict | None = None, tokenizer: str | Path | None = None, state: Any = None,
                 evaluate: Callable[[nn.Module, str], float | dict | None] | None = None):
        cfg.validate()
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.state, self.evaluate_fn = state, evaluate
        self.meta = dict(meta or {})
        self.meta.setdefault("model", ckpt.model_config_of(model))
        self.tokenizer = tokenizer
        self.dist = distributed.init(cfg.device)
        self.device = self.dist.device
        self.micro, self.accum = split_batch(cfg, self.dist.world_size)
        self.model = model
        self.start_from = self._checkpoint_to_resume(resume)  # before anything is written

        self.fsdp = cfg.parallel == "fsdp" and self.dist.enabled
        # checkpoints in the sharded format whenever fsdp is asked for, one process included: any world size then
        # resumes them with FSDP (1 -> N as well as N -> M and N -> 1)
        self.sharded_checkpoints = cfg.parallel == "fsdp"
        on_meta = any(p.is_meta for p in model.parameters())  # built without storage: initialised once sharded
        if not on_meta:
            self.model.to(self.device)
        self.compiled = resolve_compile(cfg.compile, self.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device, self.compiled or cfg.eager_bf16_pays)
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
        self.stopped_by = "steps"  # or "max_minutes" when the budget cut the schedule short, or "task"

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
        if self.fsdp and (folder / SHARDED_MODEL_DIR).is_dir():  # each rank reads its shards, whatever saved them
            weights = sd.get_model_state_dict(self.model)
            dcp.load(weights, checkpoint_id=folder / SHARDED_MODEL_DIR)
            sd.set_model_state_dict(self.model, weights)
        elif self.fsdp:  # a checkpoint in the ordinary format: every rank reads the whole file, keeps its shards
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
                    f"cannot resume {folder} with train.parallel=fsdp: it was saved with train.parallel=ddp, whose "
                    "optimizer state is not in the sharded format; resume it with train.parallel=ddp"
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
        if hasattr(self.state, "load_state_dict") and state.get("task") is not None:
            self.state.load_state_dict(state["task"])
        self.rows = read_metrics(self.out_dir, self.step)
        if self.dist.is_main:
            print(f"[train] resumed from {folder} at step {self.step}")

    def _wrap(self) -> nn.Module:
        wrapped = torch.compile(self.model) if self.compiled else self.model
        if self.dist.enabled and not self.fsdp:
            ids = [self.dist.local_rank] if torch.device(self.device).type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(wrapped, device_ids=ids)
        return wrapped

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's autocast (bf16 where it pays off): forward passes go inside it, backward passes not."""
        return autocast(self.device, self.dtype)

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Gradients accumulate locally inside it (every backward of a step but the last)."""
        if self.fsdp:
            return distributed.fsdp_no_sync(self.model)
        return self.wrapped.no_sync() if self.dist.enabled else contextlib.nullcontext()

    # ---- evaluation, checkpoints, outputs ----------------------------------------------------------------

    def evaluate(self) -> dict:
        """The validation metrics of the plain module now (a row of metrics.jsonl), if the run has ``evaluate``."""
        metrics = {}
        # every rank evaluates its share of the held-out items and the task reduces the sums (see
        # distributed.eval_share); a sharded model's forward needs every rank anyway
        if self.evaluate_fn is not None:
            t0 = time.perf_counter()
            self.model.eval()
            with torch.no_grad(), self.autocast():
                metrics = _eval_metrics(self.evaluate_fn(self.model, self.device))
            self.model.train()
            self.eval_seconds = time.perf_counter() - t0
            # eval_s: what evaluation took, so a curve can be put on training time alone. Every rank keeps the row
            # (the reduced figures are the same everywhere), so every rank's summary says the same
            if metrics:
                self.rows.append({"step": self.step, **metrics, "eval_s": round(self.eval_seconds, 3)})
        return metrics

    def _trainer_state(self, elapsed: float) -> dict:
        return {
            "optimizer": None if self.sharded_checkpoints else self.optimizer.state_dict(),  # else sharded, beside it
            "step": self.step,
            "seen": self.seen,
            "elapsed": elapsed,
            "rate": self.rate,
            "unit": self.unit,
            "warm_elapsed": self.warm_elapsed,
            "time_progress": self.time_progress,
            "rng": distributed.gather_over_ranks(ckpt.rng_state()),
            "task": self.state.state_dict() if hasattr(self.state, "state_dict") else None,
        }

    def save(self, elapsed: float) -> None:
        """A checkpoint of this step (every rank takes part), then metrics.jsonl and the plot."""
        t0 = time.perf_counter()
        state = self._trainer_state(elapsed)  # every rank takes part: the RNG states are gathered
        weights, folders = None, None
        if self.sharded_checkpoints:
            # weights and optimizer state stay sharded: every rank writes its shards, nothing is gathered; rank 0
            # then exports the weights from the shards into the ordinary model.safetensors a few tensors at a time
            # (chatforge.model.weights.export_sharded), so downstream stages load the checkpoint as any other
            staging = self.out_dir / ckpt.CHECKPOINTS_DIR
            folders = {name: staging / f".{name}-{ckpt.step_name(self.step)}"
                       for name in (SHARDED_MODEL_DIR, SHARDED_OPTIMIZER_DIR)}
            dcp.save(sd.get_model_state_dict(self.model), checkpoint_id=folders[SHARDED_MODEL_DIR])
            dcp.save(sd.get_optimizer_state_dict(self.model, self._optimizers()),
                     checkpoint_id=folders[SHARDED_OPTIMIZER_DIR])
            self.dist.barrier()
            if self.dist.is_main:
                weights = staging / f".{ckpt.WEIGHTS_FILE}-{ckpt.step_name(self.step)}"
                export_sharded(folders[SHARDED_MODEL_DIR], weights, {"step": str(self.step)})
        if self.dist.is_main:
            config = {**self.meta, "train": dataclasses.asdict(self.cfg)}
            ckpt.save_checkpoint(
                self.out_dir, self.step, self.model, state, config, self.tokenizer, keep=self.cfg.keep_checkpoints,
                weights=weights, folders=folders,
            )
            self.write_progress()
        self.dist.barrier()
        self.saved_step = self.step
        self.ckpt_seconds = time.perf_counter() - t0

    def write_progress(self) -> None:
        io.write_jsonl(self.out_dir / METRICS_FILE, self.rows)
        title = (
            f"{self.meta.get('stage', 'training')}: {self.params / 1e6:.2f}M params, {self.seen / 1e6:.2f}M {self.unit}"
        )
        plot_losses(self.rows, self.out_dir / PLOT_FILE, title)

    def _speed(self) -> dict:
        """Tokens/s of the whole job, its MFU and every rank's peak memory (a collective: all ranks call it)."""
        memory = max(distributed.gather_over_ranks(throughput.peak_memory_mb(self.device)))
        speed = {"peak_memory_mb": round(memory, 1)}
        if self.unit == "tokens" and self.rate:
            job_rate = self.rate * self.dist.world_size  # every rank processes its share at the measured rate
            peak, source = throughput.peak_flops(self.device, self.dtype)
            speed.update(job_tokens_per_s=round(job_rate, 1), peak_flops_source=source,
                         mfu=round(job_rate * throughput.flops_per_token(ckpt.unwrap(self.model)) /
                                   (peak * self.dist.world_size), 4))
        return speed

    def summary(self, elapsed: float) -> dict:
        """What summary.json says about the run (a collective: all ranks call it)."""
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
