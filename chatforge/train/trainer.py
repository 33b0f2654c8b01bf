"""The shared training loop's pieces, for a loop to drive: ``Trainer``.

``chatforge.train.loop.train`` drives it over a ``Task``; PPO (``chatforge.train.ppo``) drives it from its own
rollout → epochs × minibatches loop. Either way the optimizer, schedule, accumulation, clipping, DDP/FSDP,
checkpoints, exact resume, metrics, progress bar and time budget are these ones.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from chatforge import io
from chatforge.device import device_type, keep_freed_memory
from chatforge.errors import ChatforgeError
from chatforge.train import distributed
from chatforge.train.config import lr_at
from chatforge.train.optim import apply_schedule
from chatforge.train.outputs import SUMMARY_FILE
from chatforge.train.run_state import RunState


@dataclass
class Micro:
    """What a task's own ``backward`` needs to know about the micro-batch it computes."""

    scale: float  # multiply the loss by this before backpropagating (1 / micro-batches per step)
    autocast: Callable[[], contextlib.AbstractContextManager]  # wrap forward passes in it, not backward
    no_sync: Callable[[], contextlib.AbstractContextManager]  # wrap every backward but the micro-batch's last


class TrainingInterrupted(ChatforgeError):
    """Stopped by SIGINT/SIGTERM after saving a checkpoint; the run continues with ``resume``."""


def _as_metrics(out: torch.Tensor | dict) -> tuple[torch.Tensor, int | None, dict]:
    if isinstance(out, torch.Tensor):
        return out, None, {}
    if not isinstance(out, dict) or "loss" not in out:
        raise TypeError("a task's loss must return a scalar tensor or a dict with a 'loss' entry")
    extras = {k: float(v) for k, v in out.items() if k not in ("loss", "tokens")}
    tokens = out.get("tokens")
    return out["loss"], None if tokens is None else int(tokens), extras


def clip_gradients(parameters, max_norm: float) -> float:
    """Scale the gradients down to a global norm of ``max_norm`` (0 = never) when it is above; returns the norm.

    Unlike ``clip_grad_norm_``, which multiplies every gradient by min(1, max_norm / norm), gradients within
    the bound are left alone: the same result without a pass over all of them on most steps.
    """
    with_grads = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in with_grads])
    value = float(distributed.full_value(norm))  # every rank: a sharded norm is gathered
    if max_norm > 0 and value > max_norm:
        torch.nn.utils.clip_grads_with_norm_(with_grads, max_norm, norm)
    return value


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


class Trainer(RunState):
    """One training run, stepped by the caller's loop::

        with Trainer(model, cfg, out_dir, resume=resume, state=task, evaluate=task.eval_loss) as trainer:
            while not trainer.done:
                trainer.optimizer_step(lambda part, parts: batch_of(trainer.step, part, parts), loss)
            summary = trainer.finish()

    The constructor places the model on the run's device (FSDP-sharding it under ``train.parallel=fsdp``),
    builds the optimizer and, with ``resume``, restores the latest checkpoint of ``out_dir`` exactly (weights,
    optimizer, RNG, step, and ``state.load_state_dict``); without it an ``out_dir`` holding checkpoints is an
    error. ``state`` (optional ``state_dict``/``load_state_dict``) is the caller's state saved in every
    checkpoint; ``evaluate(model, device)`` the validation loss (float, dict or None) run at the start, every
    ``eval_every`` steps and at the end. ``meta`` and ``tokenizer`` go into every checkpoint (see ``train``).
    Entering the context installs the SIGINT/SIGTERM handler, evaluates a fresh run and opens the progress bar.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if device_type(self.device) == "cpu":
            keep_freed_memory()  # each step reuses the last one's large buffers instead of faulting in new pages
        self.out_of_time = False
        self.stop_reason: str | None = None  # why the caller stopped the run early
        self._stop_pending: str | None = None
        self._steps_here, self._timed_seconds, self._timed_units = 0, 0.0, 0.0

    def __enter__(self) -> Trainer:
        from tqdm import tqdm

        self._started = time.perf_counter()
        self.model.train()
        if self.step == 0:
            self.evaluate()  # the curve's starting point
        # a log file (not a terminal) gets a progress line every 30 s instead of ten redraws a second
        self.bar = tqdm(
            total=self.cfg.steps,
            initial=self.step,
            disable=not (self.dist.is_main and self.cfg.progress),
            dynamic_ncols=True,
            desc=self.meta.get("stage", "train"),
            unit="step",
            mininterval=0.1 if sys.stderr.isatty() else 30,
        )
        self._signal = _StopSignal().__enter__()
        self._step_began = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._close()

    def _close(self) -> None:
        """Restore the signal handlers (a signal then stops the process at once) and close the progress bar."""
        self._signal.__exit__()
        self.bar.close()

    def elapsed(self) -> float:
        """Run time so far, the time before a resume included."""
        return self.elapsed_before + time.perf_counter() - self._started

    @property
    def done(self) -> bool:
        """True when the steps are taken, the time budget is spent or a stop was asked for."""
        return self.step >= self.cfg.steps or self.out_of_time or self.stop_reason is not None

    def stop_after_next_step(self, reason: str) -> None:
        """End the run after the next optimizer step (with its checkpoint), printing ``reason``. Every rank must
        ask at the same step."""
        self._stop_pending = reason

    # ---- one optimizer step ------------------------------------------------------------------------------

    def optimizer_step(
        self,
        batch: Callable[[int, int], Any],
        loss: Callable[[torch.nn.Module, Any], torch.Tensor | dict] | None = None,
        backward: Callable[[torch.nn.Module, Any, Micro], torch.Tensor | dict] | None = None,
        metrics: dict | None = None,
    ) -> dict:
        """One optimizer step on the global batch, then its metrics row, and validation/checkpoint when due.

        ``batch(part, parts)`` is part ``part`` (0-based) of ``parts`` equal, contiguous parts of the global
        batch (this process computes parts rank × accumulation … + accumulation − 1, one micro-batch each);
        ``loss(model, batch)`` its mean loss (a scalar tensor, or a dict with "loss", optional "tokens" and
        scalar metrics), called under autocast and backpropagated here; or ``backward(model, batch, micro)``,
        a loss that runs its own backward passes (see ``Micro``). ``metrics`` join the step's row as they are.
        Returns the step's loss (the mean over the ranks' micro-batches), grad norm and metrics. A SIGINT or
        SIGTERM ends the run after the step with a checkpoint and ``TrainingInterrupted``.
        """
        out = self._step(batch, loss, backward, lambda: self._signal.requested,
                         lambda: (self.elapsed(), self.eval_seconds + self.ckpt_seconds))
        self.step += 1
        self.seen += out["units"]
        self._steps_here += 1
        # the time since the last step ended: what the caller did in between (a PPO rollout) counts as training
        seconds = time.perf_counter() - self._step_began
        if self._steps_here > 1:  # the first step of a process compiles and warms up; it would skew the rate
            self._timed_seconds, self._timed_units = self._timed_seconds + seconds, self._timed_units + out["units"]
            self.rate = self._timed_units / self._timed_seconds
        self.out_of_time = self._track_budget(out["elapsed"], out["reserve"])
        last = self.step == self.cfg.steps or self.out_of_time
        out["metrics"].update(metrics or {})
        if self.step % self.cfg.log_every == 0 or last:
            self.rows.append({"step": self.step, "loss": round(out["loss"], 6), "grad_norm": round(out["grad_norm"], 4),
                              self.unit: int(self.seen), "elapsed_s": round(out["elapsed"], 2), **out["metrics"]})
        self._update_bar(out, seconds)
        if out["interrupted"]:
            self.bar.close()
            if self.saved_step != self.step:
                self.save(self.elapsed())
            raise TrainingInterrupted(
                f"training interrupted at step {self.step}; checkpoint saved in {self.out_dir}; "
                "run again with --resume to continue"
            )
        if self._stop_pending is not None:
            self.stop_reason, self.stopped_by = self._stop_pending, "task"
            if self.dist.is_main:
                self.bar.write(f"[train] stopping early at step {self.step}: {self.stop_reason}")
        else:
            self._evaluate_and_save_when_due(out["loss"], last)
        self._step_began = time.perf_counter()
        return out

    def _step(self, batch, loss, backward, interrupted: Callable[[], bool],
              clock: Callable[[], tuple[float, float]]) -> dict:
        """The optimizer step: its loss, units processed, grad norm, metrics, and what every rank must agree on.

        The step's single collective sums the loss and units over the ranks, ORs ``interrupted()`` (so all
        stop after the same step) and hands everyone rank 0's ``clock()`` (run time so far, time reserved for
        the end), from which the time-based decay is computed identically everywhere.
        """
        lr = lr_at(self.step, self.cfg, self.time_progress)
        apply_schedule(self.optimizer, lr / self.cfg.lr, self.step, self.cfg)
        loss_sum, units, extras = 0.0, 0, {}
        for index in range(self.accum):
            micro_batch = batch(self.dist.rank * self.accum + index, self.dist.world_size * self.accum)
            last = index == self.accum - 1
            with contextlib.nullcontext() if last else self.no_sync():
                if backward is not None:
                    value, tokens, more = _as_metrics(
                        backward(self.wrapped, micro_batch, Micro(1.0 / self.accum, self.autocast, self.no_sync))
                    )
                else:
                    with self.autocast():
                        value, tokens, more = _as_metrics(loss(self.wrapped, micro_batch))
                    (value / self.accum).backward()
            loss_sum += float(value.detach())
            units += self.micro if tokens is None else tokens
            if tokens is None:
                self.unit = "sequences"
            for key, number in more.items():
                extras[key] = extras.get(key, 0.0) + number / self.accum
        grad_norm = clip_gradients(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed, reserve = clock() if self.dist.is_main else (0.0, 0.0)
        reduced = torch.tensor(
            [loss_sum / self.accum, units, float(interrupted()), elapsed, reserve],
            dtype=torch.float64,
            device=self.device,
        )
        mean_loss, units, stop, elapsed, reserve = self.dist.all_reduce(reduced).tolist()
        mean_loss /= self.dist.world_size
        if not math.isfinite(mean_loss):
            raise ChatforgeError(
                f"the training loss became {mean_loss} at step {self.step + 1}; lower train.lr or check the data"
            )
        return {
            "loss": mean_loss,
            "units": units,
            "grad_norm": grad_norm,
            "metrics": {"lr": lr, **extras},
            "interrupted": stop > 0,
            "elapsed": elapsed,
            "reserve": reserve,
        }

    def _update_bar(self, out: dict, seconds: float) -> None:
        if self.cfg.max_minutes and 0 < self.time_progress < 1:  # the bar's total and ETA follow the budget
            self.bar.total = min(
                self.cfg.steps,
                self.step + round((self.step - self.cfg.warmup_steps) * (1 / self.time_progress - 1)),
            )
        self.bar.update(1)
        self.bar.set_postfix_str(
            f"loss {out['loss']:.4f} | {out['units'] / seconds:,.0f} {self.unit[:3]}/s", refresh=False
        )

    def _evaluate_and_save_when_due(self, loss: float, last: bool) -> None:
        """Validation every ``eval_every`` and a checkpoint every ``ckpt_every`` steps (the last step's are
        ``finish``'s)."""
        if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and not last:
            metrics = self.evaluate()
            if metrics:
                self.bar.write(
                    f"step {self.step}: train loss {loss:.4f}, " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                )
        if self.cfg.ckpt_every and self.step % self.cfg.ckpt_every == 0 and not last:
            self.save(self.elapsed())

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

    # ---- the end -----------------------------------------------------------------------------------------

    def finish(self) -> dict:
        """The final validation and checkpoint, metrics.jsonl, loss.png and summary.json; returns the summary."""
        self._close()
        if self.step < self.cfg.steps and self.stopped_by == "steps":
            self.stopped_by = "max_minutes"
        if not any(r.get("step") == self.step and "val_loss" in r for r in self.rows):
            self.evaluate()
        if self.saved_step != self.step:
            self.save(self.elapsed())
        summary = self.summary(self.elapsed())
        if self.dist.is_main:
            self.write_progress()
            io.write_json(self.out_dir / SUMMARY_FILE, summary)
            val = f", val loss {summary['final_val_loss']:.4f}" if summary["final_val_loss"] is not None else ""
            print(
                f"[train] {self.step} steps, {self.seen / 1e6:.2f}M {self.unit} in {summary['wall_time_s']:.0f} s"
                f"{val}; outputs in {self.out_dir}"
            )
        return summary
