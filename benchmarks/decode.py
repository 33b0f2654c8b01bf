"""Decode speed of the chatforge engine, on one set of weights, in one run:

1. batch-1 greedy decode tokens/s: ``Engine.generate`` vs ``transformers``' ``GPT2LMHeadModel.generate`` (its
   own KV cache) on the same weights exported with ``export_hf_gpt2``; same prompt, exactly N new tokens
   for both (min_new_tokens / min_tokens), medians of interleaved repeats;
2. 16 requests submitted at once to the continuous-batching ``Scheduler`` vs the same 16 run one after another.

Uses the checkpoint at ``--ckpt`` if it exists, else a randomly initialised "ada" preset (the report says
which). The last line printed is ``RESULT decode_speed_ratio_vs_hf <value>``.

    .venv/bin/python benchmarks/decode.py [--ckpt=runs/speedrun/pretrain] [--new_tokens=128] [--threads=1]
"""

from __future__ import annotations

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
from chatforge.infer.scheduler import Scheduler
from chatforge.model.gpt import GPT, preset_config
from chatforge.model.hf import export_hf_gpt2


@dataclass
class Config:
    ckpt: str = option("runs/speedrun/pretrain", "checkpoint to measure; a random 'ada' model if it does not exist")
    prompt_tokens: int = option(16, "prompt length of the batch-1 comparison")
    new_tokens: int = option(128, "tokens generated per request in the batch-1 comparison")
    repeats: int = option(5, "timed repeats of each measurement (medians are reported)")
    requests: int = option(16, "concurrent requests in the continuous-batching comparison")
    request_tokens: int = option(64, "tokens generated per request in the continuous-batching comparison")
    threads: int = option(1, "torch intra-op threads for both libraries (0 = torch's default); on a shared "
                             "2-core machine 1 avoids OpenMP barriers stalling on a busy core")
    seed: int = option(0, "seed of the random model and prompts")


def _load(cfg: Config):
    ckpt = Path(cfg.ckpt)
    if ckpt.exists():
        from chatforge.model.checkpoint import load_model, tokenizer_path
        from chatforge.tokenizer import Tokenizer

        model, _ = load_model(ckpt)
        return model, Tokenizer.load(tokenizer_path(ckpt)), f"checkpoint {ckpt}"
    torch.manual_seed(cfg.seed)
    return GPT(preset_config("ada")), None, f"randomly initialised 'ada' preset (no checkpoint at {ckpt})"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _batch1(cfg: Config, engine: Engine, hf, prompt: list[int]) -> tuple[float, float, float]:
    """Median tokens/s of chatforge and transformers, and the fraction of positions where they agree."""
    n = cfg.new_tokens
    params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
    ids = torch.tensor([prompt])

    def ours():
        return engine.generate([prompt], params)[0].choices[0].token_ids

    def theirs():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)
        return out[0, len(prompt):].tolist()

    agree = sum(a == b for a, b in zip(ours(), theirs())) / n  # also the warm-up of both
    ours_s, theirs_s = [], []
    for _ in range(cfg.repeats):  # interleaved, so drifting load on a shared machine hits both alike
        ours_s.append(_timed(ours))
        theirs_s.append(_timed(theirs))
    return n / statistics.median(ours_s), n / statistics.median(theirs_s), agree


def _concurrent(cfg: Config, engine: Engine, prompts: list[list[int]]) -> tuple[float, float, bool]:
    """Median seconds for the requests one after another and all at once, and whether outputs match."""
    params = SamplingParams(
        temperature=0.0, max_tokens=cfg.request_tokens, min_tokens=cfg.request_tokens, ignore_eos=True
    )
    alone: list = []

    def sequential():
        alone[:] = [engine.generate([p], params)[0].choices[0].token_ids for p in prompts]

    together: list = [None] * len(prompts)

    def concurrent():
        with Scheduler(engine, max_batch_size=len(prompts)) as scheduler:

            def client(i):
                together[i] = scheduler.submit(prompts[i], params).result().choices[0].token_ids

            threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    seq_s, conc_s = [], []
    for _ in range(max(1, cfg.repeats // 2)):
        seq_s.append(_timed(sequential))
        conc_s.append(_timed(concurrent))
    return statistics.median(seq_s), statistics.median(conc_s), alone == together


def main(argv: list[str]) -> None:
    cfg, _ = parse(Config, argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    import transformers

    model, tokenizer, source = _load(cfg)
    model.eval()
    engine = Engine(model, tokenizer, max_batch_size=cfg.requests)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf_gpt2(model, tmp)
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp).eval()
    generator = torch.Generator().manual_seed(cfg.seed)
    vocab = engine.vocab_size
    prompt = torch.randint(vocab, (cfg.prompt_tokens,), generator=generator).tolist()
    lengths = torch.randint(8, 41, (cfg.requests,), generator=generator).tolist()
    prompts = [torch.randint(vocab, (n,), generator=generator).tolist() for n in lengths]

    print(f"model: {source}; {model.num_params() / 1e6:.1f}M parameters, vocab {model.config.vocab_size}")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
        f"device cpu"
    )
    ours, theirs, agree = _batch1(cfg, engine, hf, prompt)
    print(
        f"batch-1 greedy decode, {cfg.prompt_tokens}-token prompt, {cfg.new_tokens} new tokens, median of "
        f"{cfg.repeats}: chatforge {ours:.1f} tok/s, transformers {theirs:.1f} tok/s "
        f"(same tokens at {agree:.0%} of positions)"
    )
    seq, conc, same = _concurrent(cfg, engine, prompts)
    total = cfg.requests * cfg.request_tokens
    print(
        f"{cfg.requests} requests x {cfg.request_tokens} tokens: one after another {seq:.2f} s "
        f"({total / seq:.0f} tok/s), continuous batching {conc:.2f} s ({total / conc:.0f} tok/s); "
        f"outputs {'identical' if same else 'DIFFER'}"
    )
    print(f"RESULT continuous_batching_speedup {seq / conc:.2f}")
    print(f"RESULT decode_speed_ratio_vs_hf {ours / theirs:.2f}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ChatforgeError as exc:
        die(str(exc))
