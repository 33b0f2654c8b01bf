"""The speedrun's pretraining step before and after the CPU fast path, interleaved in one process.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/train_step_speed.py [--steps 100] [--depth 4] [--batch 16]
        [--tokens runs/speedrun/tokenizer/tokens/train.bin]

The shape, optimizer and schedule are `chatforge pretrain`'s defaults (arch=modern at ``--depth``, Muon for the
blocks' matrices + AdamW for the rest, the √B learning rate, warm-up), compiled with bf16 autocast where the
loop would. Three runs from the same initial weights on the same batches, each in its own process (the C
allocator's state is per process), take their steps in turn, so load from other jobs on a shared machine hits
all of them alike:

* ``before``: the step as it was: glibc's default allocator behaviour (buffers above 32 MB mmap-ed afresh
  and unmapped on free), ``torch.nn.utils.clip_grad_norm_`` (a multiply of every gradient each step) and
  ``torch.optim.Muon.step`` (one Newton–Schulz iteration per matrix);
* ``after``: the training loop's pieces now: ``chatforge.device.keep_freed_memory``,
  ``chatforge.train.trainer.clip_gradients`` and ``MuonWithAdamW.step`` (``batched_muon_step``);
* ``before again``: ``before`` once more, the noise floor of both the timing and the losses (with two
  threads the compiled backward sums in a nondeterministic order, so even identical runs drift apart).

Per-step times are medians over the timed steps (after ``--warmup``), with the minor page faults per step.
The losses of the first ``--steps`` steps are compared run against run: ``after`` must stay as close to
``before`` as ``before again`` does. The last line is ``RESULT train_step_speedup <before / after median>``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from chatforge.device import autocast, keep_freed_memory, resolve_compile, resolve_dtype
from chatforge.model.gpt import GPT
from chatforge.train.config import lr_at
from chatforge.train.loop import lm_loss
from chatforge.train.optim import apply_schedule, make_optimizer
from chatforge.train.pretrain import ModelConfig, PretrainTrainConfig, scaled_lr
from chatforge.train.trainer import clip_gradients


class Run:
    def __init__(self, name: str, fast: bool, config, cfg, dtype, compiled: bool):
        self.name, self.fast, self.cfg, self.dtype = name, fast, cfg, dtype
        torch.manual_seed(0)
        self.model = GPT(config)
        self.model.train()
        self.optimizer = make_optimizer(self.model, cfg, "cpu")
        self.wrapped = torch.compile(self.model) if compiled else self.model
        self.losses: list[float] = []

    def step(self, step: int, batch) -> tuple[float, int, float]:
        """(seconds, minor page faults, loss) of one optimizer step."""
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        apply_schedule(self.optimizer, lr_at(step, self.cfg) / self.cfg.lr, step, self.cfg)
        with autocast("cpu", self.dtype):
            loss = lm_loss(self.wrapped, batch)["loss"]
        loss.backward()
        self.losses.append(float(loss.detach()))
        if self.fast:
            clip_gradients(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
        else:
            float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
            self.optimizer.muon.step()
            self.optimizer.adamw.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, self.losses[-1]


def worker(conn, name: str, fast: bool, args) -> None:
    """One run in its own process: builds it, then takes the step the parent names until it sends None."""
    if fast:
        keep_freed_memory()
    config, cfg = shape(args)
    compiled = resolve_compile("auto", "cpu")
    run = Run(name, fast, config, cfg, resolve_dtype("auto", "cpu", compiled), compiled)
    data = batches(args, args.vocab, config.block_size, args.warmup + args.steps)
    conn.send((run.model.num_params(), str(run.dtype), compiled))
    while (step := conn.recv()) is not None:
        conn.send(run.step(step, data[step]))


def shape(args):
    """The speedrun's model config at ``--depth`` and its pretraining loop options."""
    config = ModelConfig().build(args.vocab, args.depth)
    cfg = PretrainTrainConfig()
    cfg.lr = scaled_lr(args.batch * config.block_size, cfg.optimizer)
    return config, cfg


def batches(args, vocab: int, block: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(0)
    if args.tokens:
        tokens = np.memmap(args.tokens, dtype=np.uint16, mode="r")
        starts = rng.integers(0, len(tokens) - block - 1, size=(count, args.batch))
        rows = [torch.from_numpy(tokens[s[:, None] + np.arange(block + 1)].astype(np.int64)) for s in starts]
    else:
        rows = [torch.from_numpy(rng.integers(0, vocab, size=(args.batch, block + 1))) for _ in range(count)]
    return [(r[:, :-1].contiguous(), r[:, 1:].contiguous()) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=100, help="timed steps of each run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    default_tokens = Path("runs/speedrun/tokenizer/tokens/train.bin")
    parser.add_argument("--tokens", default=str(default_tokens) if default_tokens.is_file() else "",
                        help="a uint16 token shard to draw windows from (default: the speedrun's, else random)")
    args = parser.parse_args()

    config, _ = shape(args)
    context = multiprocessing.get_context("spawn")
    names = {"before": False, "after": True, "before again": False}
    pipes, processes = {}, []
    for name, fast in names.items():
        parent, child = context.Pipe()
        processes.append(context.Process(target=worker, args=(child, name, fast, args), daemon=True))
        processes[-1].start()
        pipes[name] = parent
    params, dtype, compiled = [pipes[name].recv() for name in names][0]
    tokens_per_step = args.batch * config.block_size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {dtype}{' + compile' if compiled else ''}; "
          f"depth {args.depth} ({config.n_layer} layers x {config.n_embd}, {params / 1e6:.2f}M params), batch "
          f"{args.batch} x {config.block_size}, data: {args.tokens or 'random tokens'}; {args.steps} timed steps "
          f"per run after {args.warmup}")
    results = {name: [] for name in names}
    order = list(names)
    for step in range(args.warmup + args.steps):
        for i in range(len(order)):  # each run goes first, second and last in turn
            name = order[(step + i) % len(order)]
            pipes[name].send(step)
            results[name].append(pipes[name].recv())
    for name in names:
        pipes[name].send(None)
    for process in processes:
        process.join()

    medians = {}
    losses = {}
    for name, rows in results.items():
        times, faults, losses[name] = zip(*rows)
        timed = times[args.warmup:]
        medians[name] = statistics.median(timed)
        print(f"{name:<13} median {1000 * medians[name]:7.1f} ms/step  {tokens_per_step / medians[name]:8,.0f}"
              f" tokens/s  (quartiles {', '.join(f'{1000 * q:.0f}' for q in statistics.quantiles(timed, n=4))} ms; "
              f"{statistics.median(faults[args.warmup:]):,.0f} page faults/step)")
    for name in ("after", "before again"):
        gaps = [abs(a - b) for a, b in zip(losses[name], losses["before"])]
        print(f"losses {name} vs before over {len(gaps)} steps: max |diff| {max(gaps):.4f}, "
              f"mean {sum(gaps) / len(gaps):.4f}; last {losses[name][-1]:.4f} vs {losses['before'][-1]:.4f}")
    print(f"speed after / before: {medians['before'] / medians['after']:.3f} "
          f"(noise floor: before again / before {medians['before'] / medians['before again']:.3f})")
    print(f"RESULT train_step_speedup {medians['before'] / medians['after']:.3f}")


if __name__ == "__main__":
    main()
