"""The measurements of ``scripts/gpu_check.sh``, one per subcommand; each prints ``| name | value |`` table rows.

    python benchmarks/gpu_check.py info
    python benchmarks/gpu_check.py pretrain OUT_DIR [small|1.3b] [ddp|fsdp] [DEVICE]   # also under torchrun
    python benchmarks/gpu_check.py compare OUT_ONE OUT_N N                              # loss equality, scaling
    python benchmarks/gpu_check.py decode [small] [DEVICE]
    python benchmarks/gpu_check.py rollout OUT_DIR [small] [DEVICE]                     # also under torchrun

DEVICE is cuda; the size ``tiny`` with DEVICE ``cpu`` is how tests/test_gpu_check.py runs every path here.

Nothing is downloaded: the models are randomly initialised and trained on random tokens (speed and memory do
not depend on what the tokens are; the loss comparison only needs the same tokens in both runs).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from chatforge.device import device_type, synchronize
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.train import distributed
from chatforge.train.loop import TrainConfig, lm_loss, read_metrics, train

SHAPES = {  # GPT-2 small (124M) and a ~1.3B model (GPT-2 XL's width, 24 layers)
    "small": dict(arch="gpt2", vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "1.3b": dict(arch="gpt2", vocab_size=50304, block_size=1024, n_layer=24, n_head=16, n_embd=2048),
    # tests/test_gpu_check.py runs every subcommand with it on the CPU, so the paths a GPU takes are exercised
    "tiny": dict(arch="gpt2", vocab_size=50304, block_size=256, n_layer=2, n_head=2, n_embd=64),
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


def pretrain(out_dir: str, size: str = "small", parallel: str = "ddp", device: str = "cuda") -> None:
    ranks = distributed.init(device)
    shape = SHAPES[size]
    torch.manual_seed(0)
    with torch.device("meta" if parallel == "fsdp" else "cpu"):
        model = GPT(GPTConfig(**shape))
    cfg = TrainConfig(steps=STEPS, batch_size=BATCH, micro_batch_size=BATCH // ranks.world_size // 2,
                      optimizer="adamw", lr=3e-4, min_lr=3e-5, warmup_steps=5, eval_every=0, ckpt_every=0,
                      parallel=parallel, device=device, progress=False, activation_checkpointing=size == "1.3b")
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


def _engine(size: str, device: str, max_batch_size: int):
    """An engine on a random model of ``size``, decoding in bf16 on a GPU (fp32 on the CPU test)."""
    from chatforge.infer.engine import Engine
    from chatforge.infer.precision import InferenceOptions

    torch.manual_seed(0)
    dtype = "bf16" if device_type(device) == "cuda" else "fp32"
    return Engine(GPT(GPTConfig(**SHAPES[size])), device=device, max_batch_size=max_batch_size,
                  options=InferenceOptions(dtype=dtype))


def decode(size: str = "small", device: str = "cuda") -> None:
    from chatforge.infer.params import SamplingParams

    engine = _engine(size, device, 64)
    params = SamplingParams(max_tokens=128, min_tokens=128, temperature=0)
    for batch in (1, 16, 64):
        prompts = [[(7 * i + j) % 50000 for j in range(32)] for i in range(batch)]
        engine.generate(prompts[:1], params)  # warm-up
        synchronize(device)
        t0 = time.perf_counter()
        engine.generate(prompts, params)
        synchronize(device)
        row(f"engine decode {engine.options.dtype}, batch {batch} (tokens/s)",
            f"{batch * 128 / (time.perf_counter() - t0):,.0f}")


ROLLOUT_PROMPTS, ROLLOUT_TOKENS = 64, 128


def rollout(out_dir: str, size: str = "small", device: str = "cuda") -> None:
    """One PPO rollout's generation (64 prompts x 128 sampled tokens, GPT-2 small in bf16) the way PPO shares it:
    each rank samples its contiguous share (``distributed.map_shares``) and every rank gathers all answers. Run
    on one GPU first, then under torchrun, which also prints the speed-up over the one-GPU time."""
    from chatforge.infer.params import SamplingParams

    ranks = distributed.init(device)
    engine = _engine(size, ranks.device, ROLLOUT_PROMPTS)
    params = SamplingParams(max_tokens=ROLLOUT_TOKENS, min_tokens=ROLLOUT_TOKENS, temperature=1.0, seed=0)
    prompts = [[(7 * i + j) % 50000 for j in range(32)] for i in range(ROLLOUT_PROMPTS)]
    engine.generate(prompts[:1], params)  # warm-up
    ranks.barrier()
    synchronize(ranks.device)
    t0 = time.perf_counter()
    answers = distributed.map_shares(
        lambda share, first: [c.choices[0].token_ids for c in engine.generate(share, params)], prompts)
    synchronize(ranks.device)
    seconds = time.perf_counter() - t0
    if not ranks.is_main:
        return
    if len(answers) != ROLLOUT_PROMPTS or any(len(a) != ROLLOUT_TOKENS for a in answers):
        raise SystemExit(f"rollout: expected {ROLLOUT_PROMPTS} answers of {ROLLOUT_TOKENS} tokens")
    timing = Path(out_dir) / "rollout_one_gpu_s"
    row(f"PPO rollout ({ROLLOUT_PROMPTS} prompts x {ROLLOUT_TOKENS} tokens) on {ranks.world_size} GPU(s) (s)",
        f"{seconds:.2f}")
    if ranks.world_size == 1:
        timing.write_text(str(seconds))
    elif timing.exists():
        row(f"PPO rollout speed-up, {ranks.world_size} GPUs vs 1", f"{float(timing.read_text()) / seconds:.2f}x")


if __name__ == "__main__":
    commands = {"info": info, "pretrain": pretrain, "compare": compare, "decode": decode, "rollout": rollout}
    commands[sys.argv[1]](*sys.argv[2:])
