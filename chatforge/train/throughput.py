"""What a training stage's summary says about speed: model FLOPs utilisation (MFU) and peak memory.

MFU = achieved model FLOP/s ÷ the hardware's peak FLOP/s, with the model's FLOPs counted the standard way
(6 per matrix parameter per token for forward + backward, plus attention's 12·layers·context·width); FLOPs the
implementation adds (recomputation, padding) are not counted, so MFU compares setups fairly. The peak is the
dense tensor-core figure from a table of known GPUs (bf16; half of it for fp32, which runs as TF32), and on
the CPU (or an unknown GPU) a 1024² matmul measured on the spot (``matmul_peak``).
"""

from __future__ import annotations

import math
import resource
import sys
import time

import torch
from torch import nn

from chatforge.device import native_bf16, synchronize

# dense bf16 tensor-core FLOP/s by a substring of torch.cuda.get_device_name() (most specific first)
GPU_BF16_PEAKS = (
    ("B200", 2250e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("A6000", 155e12),
)


def flops_per_token(model: nn.Module) -> float:
    """Training FLOPs per token: 6 × the parameters of non-embedding matrices, plus attention for a GPT."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    matrices = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings)
    config = getattr(model, "config", None)
    attention = 12 * config.n_layer * config.block_size * config.n_embd if config is not None else 0
    return 6 * matrices + attention


def peak_flops(device: str, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(torch.device(device))
        for key, bf16 in GPU_BF16_PEAKS:
            if key in name:
                return (bf16 if dtype == torch.bfloat16 else bf16 / 2), f"table: {name}"
    return matmul_peak(device), "measured 1024² matmul"


def matmul_peak(device: str) -> float:
    """FLOP/s of a 1024² matmul in the training dtype, measured on the spot (best of 6)."""
    dtype = torch.bfloat16 if native_bf16(torch.device(device).type) else torch.float32
    a = torch.randn(1024, 1024, dtype=dtype, device=device)
    best = math.inf
    for _ in range(6):
        synchronize(device)
        t0 = time.perf_counter()
        a @ a
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best


def peak_memory_mb(device: str) -> float:
    """Peak memory of this process: allocated CUDA memory on a GPU, resident size on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
