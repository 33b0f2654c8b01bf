"""Training throughput: chatforge's GPT against Hugging Face ``transformers``' GPT2LMHeadModel of the same shape.

    .venv/bin/python benchmarks/train_throughput.py [--preset nano] [--steps 20] [--batch 16] [--block 256]

Both models get the same batches (random token windows, or real ones with ``--tokens DIR/train.bin``), the
same loss (cross-entropy of logits against next tokens), the same optimizer (AdamW, fused, the same
hyper-parameters and parameter groups) and the same gradient clipping, in one process, one after another.
What differs is how each is run by default:

* chatforge: its training fast path, exactly what ``chatforge.train.loop`` picks on this machine
  (``chatforge.device``): bf16 autocast + ``torch.compile`` where they are supported, else fp32 eager.
* transformers: the way a ``GPT2LMHeadModel`` trains out of the box, fp32 eager (its SDPA attention).
  For context (not in the ratio) it is also run on chatforge's fast path with ``--hf-fast``.

Tokens/s are measured over ``--steps`` steps after ``--warmup`` untimed ones (compilation happens there).
MFU is model FLOPs (6 per parameter in a matmul per token, plus attention's 12·layers·width·context) per
second over the matmul peak measured here on the spot, in the dtype each run computes in.
The last line is ``RESULT train_speed_ratio_vs_hf <chatforge tokens/s ÷ transformers tokens/s>``.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from chatforge.device import autocast, dtype_name, resolve_compile, resolve_dtype
from chatforge.model.gpt import GPT, preset_config
from chatforge.train.loop import TrainConfig
from chatforge.train.optim import make_optimizer


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an n×n by n×n matmul in ``dtype``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm up the kernels
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def batches(args, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(0)
    if args.tokens:
        tokens = np.memmap(args.tokens, dtype=np.uint16, mode="r")
        starts = rng.integers(0, len(tokens) - args.block - 1, size=(args.warmup + args.steps, args.batch))
        rows = [torch.from_numpy(tokens[s[:, None] + np.arange(args.block + 1)].astype(np.int64)) for s in starts]
    else:
        rows = [
            torch.from_numpy(rng.integers(0, vocab, size=(args.batch, args.block + 1)))
            for _ in range(args.warmup + args.steps)
        ]
    return [(r[:, :-1].contiguous(), r[:, 1:].contiguous()) for r in rows]


def measure(name: str, model: torch.nn.Module, logits_of, data, args, dtype: torch.dtype, compiled: bool) -> float:
    """Tokens/s of forward + backward + clip + AdamW over the timed steps."""
    model.train()
    cfg = TrainConfig(lr=1e-3, weight_decay=0.1)
    optimizer = make_optimizer(model, cfg, "cpu")
    run = torch.compile(model) if compiled else model
    timed = 0.0
    for i, (x, y) in enumerate(data):
        t0 = time.perf_counter()
        with autocast("cpu", dtype):
            logits = logits_of(run, x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        if i >= args.warmup:
            timed += time.perf_counter() - t0
    rate = args.steps * args.batch * args.block / timed
    print(f"{name:<44} {rate:9,.0f} tokens/s   (final loss {loss.item():.3f})", flush=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tokens", default="", help="a uint16 token shard to draw real windows from")
    parser.add_argument("--hf-fast", action="store_true", help="also run transformers on chatforge's fast path")
    args = parser.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = preset_config(args.preset, vocab_size=args.vocab, block_size=args.block)
    compiled = resolve_compile("auto", "cpu")
    fast = resolve_dtype("auto", "cpu", compiled)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; model: preset {args.preset} "
        f"({cfg.n_layer} layers, {cfg.n_embd} dims, vocab {cfg.vocab_size}, context {cfg.block_size}), "
        f"batch {args.batch} x {args.block} tokens, {args.steps} timed steps after {args.warmup} warm-up"
    )
    peaks = {torch.float32: matmul_peak(torch.float32), torch.bfloat16: matmul_peak(torch.bfloat16)}
    print("matmul peak: " + ", ".join(f"{dtype_name(d)} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()))

    torch.manual_seed(0)
    ours = GPT(cfg)
    hf_config = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
    )
    theirs = GPT2LMHeadModel(hf_config)
    params = ours.num_params()
    assert params == sum(p.numel() for p in theirs.parameters()), "the two models must have the same shape"
    flops_per_token = 6 * (params - ours.wpe.weight.numel()) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    data = batches(args, cfg.vocab_size)

    def mfu(rate, dtype):
        return f"MFU {100 * rate * flops_per_token / peaks[dtype]:.1f}% of the {dtype_name(dtype)} peak"

    def hf_logits(m, x):
        return m(input_ids=x).logits
    def ours_logits(m, x):
        return m(x)[0]
    label = f"chatforge ({dtype_name(fast)}{' + compile' if compiled else ''}, fused AdamW)"
    ours_rate = measure(label, ours, ours_logits, data, args, fast, compiled)
    hf_rate = measure("transformers (fp32 eager, fused AdamW)", theirs, hf_logits, data, args, torch.float32, False)
    print(f"{params / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOP per token")
    print(f"chatforge:    {ours_rate:9,.0f} tokens/s, {mfu(ours_rate, fast)}")
    print(f"transformers: {hf_rate:9,.0f} tokens/s, {mfu(hf_rate, torch.float32)}")
    if args.hf_fast:
        torch.manual_seed(0)
        rate = measure(
            f"transformers ({dtype_name(fast)}{' + compile' if compiled else ''}, for context)",
            GPT2LMHeadModel(hf_config),
            hf_logits,
            data,
            args,
            fast,
            compiled,
        )
        print(f"transformers on the fast path: {rate:9,.0f} tokens/s, {mfu(rate, fast)}")
    print(f"ratio chatforge / transformers: {ours_rate / hf_rate:.2f}")
    print(f"RESULT train_speed_ratio_vs_hf {ours_rate / hf_rate:.3f}")


if __name__ == "__main__":
    main()
