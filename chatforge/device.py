"""Where and how to compute: the device, the autocast dtype and whether ``torch.compile`` can be used.

Every choice defaults to "auto" and is made at run time, so the same command trains on a laptop CPU and on
a GPU. What "auto" picks, and why (measured on a 2-core AVX512-BF16 CPU, torch 2.13, a 4.3M-parameter GPT):

* device: CUDA when available, else the CPU (MPS only when asked for by name: it lacks DDP and parts of
  autocast, so it is not a safe default).
* compile: on wherever inductor can build kernels (a C++ compiler for the CPU, Triton for CUDA). On the CPU
  it costs 15-30 s of compilation once and then runs 1.6x faster with bf16.
* dtype: bf16 autocast on CUDA GPUs that support it, and on CPUs with native bf16 instructions (AVX512-BF16
  or AMX) *when compiled*: eager bf16 autocast measured no faster than fp32 there (3.8k vs 3.9k tokens/s,
  the casts eat the gain) while compiled bf16 ran 6.1k against 4.0k for compiled fp32. Without native
  bf16 the CPU emulates it and loses. fp16 is never chosen: it needs loss scaling and bf16 does not.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import sys

import torch

from chatforge.errors import ChatforgeError

DTYPES = ("auto", "bf16", "fp32")


def resolve_device(name: str = "auto") -> str:
    """``auto`` → ``cuda`` if available else ``cpu``; an explicit device is checked to exist."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = name.split(":")[0]
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ChatforgeError(f"device {name!r} requested but CUDA is not available")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ChatforgeError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif kind == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ChatforgeError(f"device {name!r} requested but MPS is not available")
    elif kind != "cpu":
        raise ChatforgeError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return name


def device_type(device: str | torch.device) -> str:
    return torch.device(device).type


@functools.cache
def native_bf16(kind: str) -> bool:
    """Whether ``kind`` ("cpu"/"cuda") computes bf16 matmuls in hardware rather than by emulation."""
    if kind == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if kind == "cpu":
        cpu = torch.cpu
        checks = (getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None))
        return any(check is not None and check() for check in checks)
    return False


@functools.cache
def amx_cpu() -> bool:
    """Whether this CPU multiplies bf16 on AMX tiles (Intel Xeon from Sapphire Rapids on), as oneDNN then does."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return check is not None and check()


@functools.cache
def compile_supported(kind: str) -> bool:
    """Whether inductor can generate kernels here: Triton on CUDA, a working C++ compiler on the CPU."""
    if sys.platform == "win32" or kind not in ("cpu", "cuda"):
        return False
    try:
        if kind == "cuda":
            from torch.utils._triton import has_triton

            return has_triton()
        from torch._inductor.cpp_builder import get_cpp_compiler

        return shutil.which(os.environ.get("CXX") or get_cpp_compiler()) is not None
    except Exception:  # a broken or partial inductor install means no compile, not a crash
        return False


def resolve_compile(setting: str | bool, device: str | torch.device) -> bool:
    """``auto``/``true``/``false`` → whether to compile; ``true`` where it cannot work is an error."""
    value = str(setting).strip().lower()
    kind = device_type(device)
    if value == "auto":
        return compile_supported(kind)
    if value in ("true", "1", "yes", "on"):
        if not compile_supported(kind):
            raise ChatforgeError(f"compile=true but torch.compile cannot build kernels on {kind} here "
                                 "(needs a C++ compiler on the CPU, Triton on CUDA); use compile=auto or false")
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ChatforgeError(f"compile must be auto, true or false; got {setting!r}")


def resolve_dtype(setting: str, device: str | torch.device, bf16_pays_on_cpu: bool) -> torch.dtype:
    """``auto``/``bf16``/``fp32`` → the autocast dtype (``torch.float32`` means no autocast). On a CPU with native
    bf16, ``auto`` is bf16 only where the caller knows it is faster (``bf16_pays_on_cpu``: a compiled step, or an
    eager step measured faster in bf16); small eager products are slower in bf16 there (oneDNN's fixed cost)."""
    kind = device_type(device)
    if setting == "fp32":
        return torch.float32
    if setting == "bf16":
        if kind == "cuda" and not native_bf16(kind):
            raise ChatforgeError("dtype=bf16 but this GPU does not support bf16; use dtype=auto or fp32")
        if kind not in ("cpu", "cuda"):
            raise ChatforgeError(f"dtype=bf16 autocast is not supported on {kind}; use dtype=fp32")
        return torch.bfloat16
    if setting != "auto":
        raise ChatforgeError(f"dtype must be one of {', '.join(DTYPES)}; got {setting!r}")
    if kind == "cuda" and native_bf16(kind):
        return torch.bfloat16
    if kind == "cpu" and native_bf16(kind) and bf16_pays_on_cpu:
        return torch.bfloat16
    return torch.float32


def autocast(device: str | torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``; a no-op context for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type(device), dtype=dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[dtype]


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work (timings of asynchronous CUDA kernels are otherwise meaningless)."""
    if device_type(device) == "cuda":
        torch.cuda.synchronize(device)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
KEEP_FREED_BYTES = 2**31 - 1  # mallopt takes an int: the top of the heap is never handed back below 2 GiB


def keep_freed_memory() -> bool:
    """Make the C allocator keep freed memory for reuse instead of returning it to the OS (glibc; else a no-op).

    A CPU training step allocates and frees the same large buffers every step (the 8192-way head's logits are
    67 MB in bf16 and 134 MB in fp32 at 16 × 256 tokens). glibc serves requests above 32 MB with fresh mmap
    pages and unmaps them on free, so every step paid ~67k page faults (263 MB of pages the kernel zeroes).
    Without mmap and without trimming, the heap keeps those buffers and the next step reuses them: no faults,
    and with the other two changes of benchmarks/train_step_speed.py the speedrun's step ran 1.54x as fast on
    two quiet cores (228 -> 148 ms). The process then keeps its peak memory until it exits. Returns whether
    the setting took effect.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
    except (OSError, AttributeError):  # not glibc (musl has no libc.so.6 and no mallopt)
        return False
