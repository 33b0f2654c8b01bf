"""The measurements of ``scripts/gpu_check.sh``, one per subcommand; each prints ``| name | value |`` table rows.

    python benchmarks/gpu_check.py info
    python benchmarks/gpu_check.py pretrain OUT_DIR [small|1.3b] [ddp|fsdp]   # also under torchrun
    python benchmarks/gpu_check.py compare OUT_ONE OUT_N N                     # loss equality, scaling
    python benchmarks/gpu_check.py decode

Nothing is downloaded: the models are randomly initialised and trained on random tokens (speed and memory do
not depend on what the tokens are; the loss comparison only needs the same tokens in both runs).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from chatforge.model.gpt import GPT, GPTConfig
from chatforge.train import distributed
from chatforge.train.loop import TrainConfig, lm_loss, read_metrics, train

SHAPES = {  # GPT-2 small (124M) and a ~1.3B model (GPT-2 XL's width, 24 layers)
    "small": dict(arch="gpt2", vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "1.3b": dict(arch="gpt2", vocab_size=50304, block_size=1024, n_layer=24, n_head=16, n_embd=2048),
}
STEPS, BATCH = 30, 16


def row(name: str, value) -> None:
    print(f"| {name} | {value} |", flush=True)


class RandomTokens:
    def __init__(self, shape: dict):
        self.vocab, self.block = shape["vocab_size"], shape["block_size"]

    def batch(self, step, part, parts, device):
        g = torch.Generator().manual_seed(step)
        rows = torch.randint(0, self.vocab, (BATCH, self.block + 1), generator=g)
        per = BATCH // parts
        rows = rows[part * per : (part + 1) * per]
        return rows[:, :-1].to(device), rows[:, 1:].to(device)

    loss = staticmethod(lm_loss)


def info() -> None:
    row("GPU", f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    row("CUDA (torch build)", torch.version.cuda)
    row("NCCL", ".".join(map(str, torch.cuda.nccl.version())))
    row("bf16 supported", torch.cuda.is_bf16_supported())


def pretrain(out_dir: str, size: str = "small", parallel: str = "ddp") -> None:
    ranks = distributed.init("cuda")
    shape = SHAPES[size]
    torch.manual_seed(0)
    with torch.device("meta" if parallel == "fsdp" else "cpu"):
        model = GPT(GPTConfig(**shape))
    cfg = TrainConfig(steps=STEPS, batch_size=BATCH, micro_batch_size=BATCH // ranks.world_size // 2,
                      optimizer="adamw", lr=3e-4, min_lr=3e-5, warmup_steps=5, eval_every=0, ckpt_every=0,
                      parallel=parallel, device="cuda", progress=False, activation_checkpointing=size == "1.3b")
    summary = train(model, RandomTokens(shape), cfg, out_dir)
    if ranks.is_main:
        first_step = read_metrics(out_dir)[0]["elapsed_s"] if read_metrics(out_dir) else None
        label = f"{size} {parallel} x{ranks.world_size}"
        row(f"{label}: parameters", f"{summary['params'] / 1e6:.0f}M")
        row(f"{label}: tokens/s", summary.get("job_tokens_per_s"))
        row(f"{label}: MFU", summary.get("mfu"))
        row(f"{label}: peak memory per rank (MB)", summary.get("peak_memory_mb"))
        row(f"{label}: first step incl. compile (s)", first_step)


def compare(one: str, many: str, n: str) -> None:
    losses = [{r["step"]: r["loss"] for r in read_metrics(path) if "loss" in r} for path in (one, many)]
    gap = max(abs(losses[0][s] - losses[1][s]) for s in losses[0])
    row(f"DDP x{n} vs 1 GPU: largest loss gap over {len(losses[0])} steps", f"{gap:.2e} (bf16: < 2e-2 expected)")
    speeds = [json.loads((Path(p) / "summary.json").read_text())["job_tokens_per_s"] for p in (one, many)]
    row(f"DDP x{n} scaling efficiency", f"{speeds[1] / (int(n) * speeds[0]):.2f}")


def decode() -> None:
    from chatforge.infer.engine import Engine
    from chatforge.infer.params import SamplingParams

    torch.manual_seed(0)
    engine = Engine(GPT(GPTConfig(**SHAPES["small"])), device="cuda", max_batch_size=64, dtype=torch.bfloat16)
    params = SamplingParams(max_tokens=128, min_tokens=128, temperature=0)
    for batch in (1, 16, 64):
        prompts = [[(7 * i + j) % 50000 for j in range(32)] for i in range(batch)]
        engine.generate(prompts[:1], params)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.generate(prompts, params)
        torch.cuda.synchronize()
        row(f"engine decode bf16, batch {batch} (tokens/s)", f"{batch * 128 / (time.perf_counter() - t0):,.0f}")


if __name__ == "__main__":
    commands = {"info": info, "pretrain": pretrain, "compare": compare, "decode": decode}
    commands[sys.argv[1]](*sys.argv[2:])
