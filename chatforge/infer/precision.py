"""Inference precision: the weights' dtype, int8 weight-only quantization and a compiled decode step.

One ``InferenceOptions`` travels from every command line (``--dtype``, ``--quantize``, ``--compile``) through
``load_engine`` to the ``Engine``, and PPO rollouts and the evals build their engines from it too, so there
is one path that decides how generation computes.

* ``dtype=auto`` is bf16 where the hardware supports it (a GPU, or a CPU with native bf16, eager or compiled) and
  fp32 otherwise (see ``torch_dtype``).
  The weights themselves are converted (a copy, so a model being trained keeps its fp32 master weights):
  decoding reads every weight once per token, so halving the bytes is what makes a step faster; autocast
  would read fp32 and cast on every step.
* ``quantize=int8`` stores each ``nn.Linear`` weight as int8 with one scale per output channel and
  multiplies through aten's ``_weight_int8pack_mm`` (the kernel torchao's int8 weight-only also lowers to on
  the CPU; measured here, see benchmarks/decode.py). Its activations are bf16: the kernel's fp32 path is
  ~10x slower. Embeddings (and GPT-2's head, tied to them) stay in the model's dtype: an int8 copy of the
  tied head measured faster but cut greedy agreement with fp32 on the GPT-2 checkpoint of runs/before from
  99.72 % to 98.31 % (benchmarks/decode_quality.py, int8 with fp32 activations), under the 99 % bar.
* ``compile`` wraps the static-shape decode step in ``torch.compile``; on CUDA as ``mode="reduce-overhead"``
  (CUDA graphs: the cache tensors are marked static so a replay reads and writes them in place), on the CPU
  with inductor's C++ wrapper. On the CPU a whole chunk of steps, sampling included, is also compiled as one
  call (``compiled_chunk``), and one-row products are written out (``chatforge.model.gpt.linear``). The price
  is compilation: minutes per graph (one per model, precision, row count and sampler settings), cached on disk
  by inductor, so it pays on long runs and on servers, not on a short eval.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from chatforge.config import option
from chatforge.device import DTYPES, device_type, resolve_compile, resolve_dtype
from chatforge.errors import ConfigError
from chatforge.model.gpt import writes_out_product, written_out_product

QUANTIZATIONS = ("none", "int8")


@dataclass
class InferenceOptions:
    dtype: str = option("auto", "weights' dtype for decoding: auto (bf16 where the GPU or CPU supports it), "
                                "bf16 or fp32")
    quantize: str = option("none", "weight-only quantization of the linear layers: none or int8")
    compile: str = option("false", "torch.compile the decode step (auto, true, false); pays off on long runs")

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"option 'dtype' must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.quantize not in QUANTIZATIONS:
            raise ConfigError(f"option 'quantize' must be one of {', '.join(QUANTIZATIONS)}; got {self.quantize!r}")

    def torch_dtype(self, device: str | torch.device) -> torch.dtype:
        # auto is bf16 wherever the hardware has it, an eager CPU step included: with the cache kept in fp32
        # (KVCache.for_model) eager bf16 is faster at every batch size measured, and a request's tokens do not
        # depend on the rest of the batch (the runner's POSITION_ALIGN and MIN_PRODUCT_ROWS, the model's
        # INVARIANT_PRODUCT_ROWS on AMX CPUs)
        return resolve_dtype(self.dtype, device, bf16_pays_on_cpu=True)


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 weight and a per-output-channel scale (symmetric, absmax / 127)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", (weight / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if writes_out_product(x):  # one row in a compiled CPU step: 4.3 -> 2.7 us for 512 x 128
            y = (written_out_product(x, self.weight) * self.scales.float()).to(x.dtype)
        else:
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales).to(x.dtype)
            y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by an ``Int8Linear``."""
    for name, child in model.named_children():
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8Linear(child))
        else:
            quantize_int8(child)
    return model


def inference_model(model: nn.Module, options: InferenceOptions) -> nn.Module:
    """``model`` itself when it already computes as asked (fp32, no quantization), else a converted copy."""
    options.validate()
    device = next(model.parameters()).device
    dtype = options.torch_dtype(device)
    if dtype == next(model.parameters()).dtype and options.quantize == "none":
        return model
    converted = copy.deepcopy(model).to(dtype=dtype).eval()
    for p in converted.parameters():
        p.requires_grad_(False)
    return quantize_int8(converted) if options.quantize == "int8" else converted


def compiled_step(step: Callable, options: InferenceOptions, device: str | torch.device) -> Callable:
    """``step`` (the runner's decode step), compiled when ``options.compile`` says so."""
    if not resolve_compile(options.compile, device):
        return step
    if device_type(device) != "cuda":
        return _compiled_for_cpu(step)
    graphed = torch.compile(step, dynamic=False, fullgraph=True, mode="reduce-overhead")

    def replay(model, tokens, cache, active, visible=None):
        # a CUDA graph replays fixed addresses: the cache and the step's inputs must be those same tensors
        for tensor in (cache.k, cache.v, cache.lengths, tokens, active):
            torch._dynamo.mark_static_address(tensor)
        torch.compiler.cudagraph_mark_step_begin()
        # the graph's output buffer is reused by the next replay
        return graphed(model, tokens, cache, active, visible).clone()

    return replay


def compiled_chunk(chunk: Callable, options: InferenceOptions, device: str | torch.device) -> Callable | None:
    """``chunk`` (the runner's several steps in one call) compiled for a CPU when ``options.compile`` says so;
    else None. On the CPU each compiled call pays its guard checks (~1,000 of them: every weight is an input)
    and the runner's Python between steps, together more than a whole step of the speedrun's model; a CUDA
    step replays a graph and the host runs ahead of the device, so CUDA keeps ``compiled_step``."""
    if device_type(device) == "cuda" or not resolve_compile(options.compile, device):
        return None
    return _compiled_for_cpu(chunk)


def _compiled_for_cpu(fn: Callable) -> Callable:
    # dynamo keeps its compiled graphs per code object, and every engine compiles these same functions: each model
    # type, precision, power-of-two row count, cache window and set of sampler switches (greedy, penalties, bias,
    # min_tokens) is one more graph, hundreds for a server that meets them all, and with fullgraph a graph past
    # the limit is an error, not a fallback: minutes of compilation per graph are the bound that matters
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, 1024)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4096)
    # a C++ wrapper calls the kernels without a Python call each: 0.34 -> 0.28 ms a step at batch 1 on the
    # speedrun's shape, where the kernels themselves are a few microseconds
    return torch.compile(fn, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})
