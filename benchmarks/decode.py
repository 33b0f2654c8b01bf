"""Decode speed of the chatforge engine against transformers, and against this machine's limits, in one run.

For each of two GPT-2-layout models (the layout transformers can load, so both libraries run the very same
weights exported with ``export_hf_gpt2``): the speedrun's shape (taken from ``--ckpt``'s config, with its
weights when that checkpoint is arch=gpt2, else random weights of that shape) and a ~15M-parameter model:

1. batch-1 greedy decode tokens/s of chatforge at each precision (fp32, bf16, int8; eager, and compiled with
   ``--compile``) vs ``GPT2LMHeadModel.generate`` in fp32 eager (as a user runs it) and in bf16; the same
   prompt and exactly N new tokens for all (min_new_tokens / min_tokens), medians of interleaved repeats,
   timed in this process's CPU time unless ``--clock=wall`` (the machine is shared: wall time measures the
   other jobs too; everything here runs on one thread, so on a quiet machine the two agree);
2. 16 and 64 requests submitted at once to the continuous-batching ``Scheduler`` vs one after another, with
   the engine a server builds by default (``--dtype=auto``: bf16 where the CPU has it) and with fp32;
3. each tokens/s as a fraction of the machine's limit for that precision: the larger of (weight bytes per
   token / measured memory bandwidth) and (FLOPs per token / measured matmul peak) is the least time a token
   can take.

Then, when ``--ckpt`` is a modern checkpoint, its chatforge speeds at each precision (transformers cannot run
that architecture), and a profile of one decode step (matmul vs attention vs everything else, i.e. Python and
dispatch). Quality of bf16/int8 is ``benchmarks/decode_quality.py``. The last line printed is
``RESULT decode_speed_ratio_vs_hf <value>`` (best chatforge batch-1 setting over transformers fp32, speedrun shape).

    .venv/bin/python benchmarks/decode.py [--ckpt=runs/speedrun/pretrain] [--new_tokens=128] [--threads=1]
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from chatforge.config import die, option, parse
from chatforge.errors import ChatforgeError
from chatforge.infer.engine import Engine
from chatforge.infer.params import SamplingParams
from chatforge.infer.precision import InferenceOptions
from chatforge.infer.runner import decode_step, visible_positions
from chatforge.infer.scheduler import Scheduler
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.hf import export_hf_gpt2
from chatforge.model.kv_cache import KVCache

SPEEDRUN_SHAPE = dict(n_layer=4, n_head=2, n_embd=128, block_size=256, vocab_size=8192)  # without a checkpoint
MODEL_15M = dict(n_layer=7, n_head=6, n_embd=384, block_size=256, vocab_size=8192)
PRECISIONS = {"fp32": ("fp32", "none"), "bf16": ("bf16", "none"), "int8": ("bf16", "int8")}


@dataclass
class Config:
    ckpt: str = option("runs/speedrun/pretrain", "the speedrun checkpoint (its shape; its weights if arch=gpt2)")
    prompt_tokens: int = option(16, "prompt length of the batch-1 comparison")
    new_tokens: int = option(128, "tokens generated per request in the batch-1 comparison")
    repeats: int = option(5, "timed repeats of each batch-1 measurement (medians are reported)")
    concurrency: list[int] = option([16, 64], "request counts of the continuous-batching comparison")
    request_tokens: int = option(32, "tokens generated per request in the continuous-batching comparison")
    compile: bool = option(False, "also measure the torch.compile'd decode step (pays minutes of compilation)")
    threads: int = option(1, "torch intra-op threads for both libraries (0 = torch's default); on a shared "
                             "2-core machine 1 avoids OpenMP barriers stalling on a busy core")
    seed: int = option(0, "seed of the random models and prompts")
    clock: str = option("cpu", "what a measurement times: cpu (this process's CPU time, every thread: on a shared "
                               "machine the other jobs' load does not count) or wall")


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
_clock = CLOCKS["cpu"]


def _timed(fn) -> float:
    start = _clock()
    fn()
    return _clock() - start


def _median_time(fn, repeats: int) -> float:
    return statistics.median(_timed(fn) for _ in range(repeats))


# ---- the machine's limits ---------------------------------------------------------------------------------------

@dataclass
class Limits:
    bandwidth: float  # bytes/s, one thread streaming a buffer far larger than the caches
    peak: dict  # FLOP/s of a large matmul per dtype

    def tokens_per_s(self, weight_bytes: float, flops: float, dtype: torch.dtype) -> float:
        return 1 / max(weight_bytes / self.bandwidth, flops / self.peak[dtype])


def measure_limits() -> Limits:
    src = torch.ones(64 * 2**20)  # 256 MB
    dst = torch.empty_like(src)
    seconds = _median_time(lambda: dst.copy_(src), 5)
    bandwidth = 2 * src.numel() * 4 / seconds  # read + write
    peak = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        peak[dtype] = 2 * 1024**3 / _median_time(lambda: a @ b, 5)  # noqa: B023 (timed at once)
    return Limits(bandwidth, peak)


def per_token_cost(model: GPT, weight_bytes_per_param: float) -> tuple[float, float]:
    """Weight bytes read and FLOPs spent per decoded token: every linear layer's matrix once, and GPT-2's head,
    which is the token table (other embeddings are a row lookup)."""
    matrices = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    if model.config.arch == "gpt2":
        matrices += model.wte.weight.numel()
    return matrices * weight_bytes_per_param, 2.0 * matrices


# ---- batch-1 ----------------------------------------------------------------------------------------------------

def chatforge_runner(engine: Engine, prompt: list[int], n: int):
    params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
    return lambda: engine.generate([prompt], params)[0].choices[0].token_ids


def hf_runner(hf, prompt: list[int], n: int):
    ids = torch.tensor([prompt])

    def run():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    return run


def interleaved(runners: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each runner, timed in turn so drifting load on a shared machine hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            times[name].append(_timed(run))
    return {name: statistics.median(t) for name, t in times.items()}


def engines(model: GPT, cfg: Config, max_batch_size: int = 1) -> dict[str, Engine]:
    out = {}
    for name, (dtype, quantize) in PRECISIONS.items():
        out[name] = Engine(model, max_batch_size=max_batch_size, options=InferenceOptions(dtype, quantize))
        if cfg.compile:
            options = InferenceOptions(dtype, quantize, compile="true")
            out[f"{name} compiled"] = Engine(model, max_batch_size=max_batch_size, options=options)
    return out


def batch1(cfg: Config, model: GPT, hf: dict, limits: Limits, label: str) -> dict[str, float]:
    """Tokens/s of every chatforge precision and transformers setting; prints a table, returns the rates."""
    generator = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(model.config.vocab_size, (cfg.prompt_tokens,), generator=generator).tolist()
    n = cfg.new_tokens
    runners = {f"chatforge {name}": chatforge_runner(e, prompt, n) for name, e in engines(model, cfg).items()}
    runners.update({f"transformers {name}": hf_runner(m, prompt, n) for name, m in hf.items()})
    outputs = {name: run() for name, run in runners.items()}  # also the warm-up (and the compilation)
    seconds = interleaved(runners, cfg.repeats)
    reference = outputs.get("transformers fp32")
    print(f"\n[{label}] batch-1 greedy decode, {cfg.prompt_tokens}-token prompt, {n} new tokens, "
          f"median of {cfg.repeats} interleaved repeats")
    print(f"  {'setting':<28}{'tok/s':>8}{'vs HF fp32':>12}{'of limit':>10}{'same tokens as HF fp32':>25}")
    rates = {}
    for name, s in seconds.items():
        rates[name] = n / s
        width = 1 if "int8" in name else (2 if "bf16" in name else 4)
        dtype = torch.float32 if "fp32" in name else torch.bfloat16
        limit = limits.tokens_per_s(*per_token_cost(model, width), dtype)
        vs, agree = "-", "-"  # a model transformers cannot run has nothing to compare with
        if reference:
            vs = f"{rates[name] / (n / seconds['transformers fp32']):.2f}x"
            agree = f"{sum(a == b for a, b in zip(outputs[name], reference)) / n:.0%}"
        print(f"  {name:<28}{rates[name]:>8.0f}{vs:>12}{rates[name] / limit:>10.1%}{agree:>25}")
    return rates


# ---- continuous batching ----------------------------------------------------------------------------------------

def concurrent(cfg: Config, engine: Engine, count: int, label: str) -> tuple[float, float]:
    """Prints sequential vs concurrent times of ``count`` requests; returns both (seconds)."""
    generator = torch.Generator().manual_seed(cfg.seed + count)
    lengths = torch.randint(8, 41, (count,), generator=generator).tolist()
    prompts = [torch.randint(engine.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    params = SamplingParams(temperature=0.0, max_tokens=cfg.request_tokens, min_tokens=cfg.request_tokens,
                            ignore_eos=True)
    alone: list = []
    together: list = [None] * count

    def sequential():
        alone[:] = [engine.generate([p], params)[0].choices[0].token_ids for p in prompts]

    def at_once():
        def client(i):
            together[i] = scheduler.submit(prompts[i], params).result().choices[0].token_ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    with Scheduler(engine, max_batch_size=count) as scheduler:  # one scheduler serves every burst, as a server's
        at_once()  # warm-up
        seconds = interleaved({"sequential": sequential, "concurrent": at_once}, 2)
    total = count * cfg.request_tokens
    seq, conc = seconds["sequential"], seconds["concurrent"]
    print(f"[{label}] {count} requests x {cfg.request_tokens} tokens: one after another {seq:.2f} s "
          f"({total / seq:.0f} tok/s), continuous batching {conc:.2f} s ({total / conc:.0f} tok/s): "
          f"{seq / conc:.2f}x; outputs {'identical' if alone == together else 'DIFFER'}")
    return seq, conc


def serving(cfg: Config, model: GPT, label: str) -> None:
    """Continuous batching vs one request after another, for the engine a server builds by default (dtype=auto:
    bf16 on a CPU with native bf16) and for fp32, each against itself; the default's batched throughput is also
    given against the faster of the two engines one request at a time (what a single user would run). Whether a
    request's greedy tokens stay the same with the rest of the batch is printed for each."""
    settings = {"default": InferenceOptions(), "fp32": InferenceOptions("fp32", "none")}
    for count in cfg.concurrency:
        times = {}
        for name, options in settings.items():
            engine = Engine(model, max_batch_size=max(cfg.concurrency), options=options)
            dtype = str(next(engine.model.parameters()).dtype).removeprefix("torch.")
            times[name] = concurrent(cfg, engine, count, f"{label}, {name} engine ({dtype})")
        (seq, conc), fastest_alone = times["default"], min(t[0] for t in times.values())
        print(f"[{label}] {count} requests: the default engine batched is {fastest_alone / conc:.2f}x the faster "
              "engine one request at a time")
        print(f"RESULT continuous_batching_speedup_{count}_{label.replace(' ', '_')} {seq / conc:.2f}")


# ---- where a step's time goes -----------------------------------------------------------------------------------

def profile_step(model: GPT, options: InferenceOptions, batch: int, context: int, label: str) -> None:
    """Share of one decode step's wall time in matmuls, in attention, in other kernels and outside any kernel
    (Python and dispatch), from torch.profiler's self CPU times over 50 steps at half of a ``context``-long
    cache (the engine sizes its cache to the longest request), attending to the occupied part as the engine
    does."""
    engine = Engine(model, max_batch_size=batch, options=options)
    cache = KVCache.for_model(engine.model, batch, context)
    cache.lengths.fill_(context // 2)
    tokens, active = torch.zeros(batch, dtype=torch.long), torch.ones(batch, dtype=torch.long)

    visible = visible_positions(context // 2 + 1, context)

    def steps():
        for _ in range(50):
            decode_step(engine.model, tokens, cache, active, visible)
            cache.lengths.fill_(context // 2)

    with torch.inference_mode():
        steps()
        start = time.perf_counter()  # wall time, whatever --clock says: the profiler's op times are wall time
        steps()
        wall = time.perf_counter() - start
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            steps()
    groups = {"matmul": 0.0, "attention": 0.0, "other kernels": 0.0}
    for event in prof.key_averages():
        us = event.self_cpu_time_total
        # the model's products never batch: a bmm is attention's
        if any(k in event.key for k in ("attention", "sdpa", "softmax", "bmm")):
            groups["attention"] += us
        elif any(k in event.key for k in ("mm", "linear", "int8pack", "matmul")):
            groups["matmul"] += us
        else:
            groups["other kernels"] += us
    kernels = sum(groups.values()) / 1e6 / 50
    step = wall / 50
    parts = {k: v / 1e6 / 50 for k, v in groups.items()}
    # the profiler's own overhead inflates op times; scale them to the unprofiled step where they exceed it
    scale = min(1.0, step / kernels) if kernels else 1.0
    parts = {k: v * scale for k, v in parts.items()}
    parts["Python/dispatch (outside ops)"] = max(0.0, step - sum(parts.values()))
    shares = ", ".join(f"{k} {v / step:.0%}" for k, v in parts.items())
    print(f"[{label}] decode step, batch {batch}, {options.dtype}/{options.quantize}: {step * 1e3:.2f} ms = {shares}")


# ---- models -----------------------------------------------------------------------------------------------------

def speedrun_models(cfg: Config) -> tuple[GPT, GPT | None, str]:
    """The GPT-2-layout model of the speedrun's shape, and the speedrun checkpoint itself if it is modern."""
    ckpt = Path(cfg.ckpt)
    if not ckpt.exists():
        torch.manual_seed(cfg.seed)
        return GPT(GPTConfig(**SPEEDRUN_SHAPE)), None, f"no checkpoint at {ckpt}: random weights, depth-4 shape"
    from chatforge.model.checkpoint import load_model

    model, _ = load_model(ckpt)
    if model.config.arch == "gpt2":
        return model, None, f"checkpoint {ckpt}"
    c = model.config
    shape = dict(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.block_size, vocab_size=c.vocab_size)
    torch.manual_seed(cfg.seed)
    note = f"checkpoint {ckpt} is arch=modern: transformers compared on random GPT-2 weights of its shape"
    return GPT(GPTConfig(**shape)), model.eval(), note


def hf_models(model: GPT) -> dict:
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        export_hf_gpt2(model, tmp)
        fp32 = transformers.GPT2LMHeadModel.from_pretrained(tmp).eval()
    return {"fp32": fp32, "bf16": copy.deepcopy(fp32).to(torch.bfloat16)}


def main(argv: list[str]) -> None:
    cfg, _ = parse(Config, argv)
    global _clock
    if cfg.clock not in CLOCKS:
        raise ChatforgeError(f"option 'clock' must be one of {', '.join(CLOCKS)}; got {cfg.clock!r}")
    _clock = CLOCKS[cfg.clock]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
          f"device cpu, {cfg.clock} time; a shared, noisy machine: every ratio compares figures measured in this "
          "one run")
    limits = measure_limits()
    print(f"limits: memory bandwidth {limits.bandwidth / 1e9:.1f} GB/s; matmul peak fp32 "
          f"{limits.peak[torch.float32] / 1e9:.0f} GFLOP/s, bf16 {limits.peak[torch.bfloat16] / 1e9:.0f} GFLOP/s")
    speedrun, modern, note = speedrun_models(cfg)
    torch.manual_seed(cfg.seed)
    models = {"speedrun shape": speedrun.eval(), "15M": GPT(GPTConfig(**MODEL_15M)).eval()}
    print(f"speedrun shape: {note}")
    ratios = {}
    for label, model in models.items():
        print(f"\n== {label}: {model.num_params() / 1e6:.1f}M parameters, {model.config.n_layer} layers, "
              f"{model.config.n_embd} wide, vocab {model.config.vocab_size}")
        rates = batch1(cfg, model, hf_models(model), limits, label)
        best = max((r, n) for n, r in rates.items() if n.startswith("chatforge"))
        ratios[label] = best[0] / rates["transformers fp32"]
        print(f"  best chatforge: {best[1]} at {ratios[label]:.2f}x transformers fp32")
        serving(cfg, model, label)
    if modern is not None:
        print(f"\n== speedrun checkpoint itself (arch=modern, {modern.num_params() / 1e6:.1f}M parameters): "
              "chatforge only")
        batch1(cfg, modern, {}, limits, "speedrun modern")
    print()
    for label, model in models.items():
        for name in ("fp32", "int8"):
            dtype, quantize = PRECISIONS[name]
            for batch in (1, 16):
                profile_step(model, InferenceOptions(dtype, quantize), batch, cfg.prompt_tokens + cfg.new_tokens, label)
    print(f"RESULT decode_speed_ratio_vs_hf_15M {ratios['15M']:.2f}")
    print(f"RESULT decode_speed_ratio_vs_hf {ratios['speedrun shape']:.2f}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ChatforgeError as exc:
        die(str(exc))
