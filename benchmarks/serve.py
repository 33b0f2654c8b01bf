"""Serving throughput under concurrency: 16 streaming clients at once vs the same requests one by one.

Starts ``chatforge serve`` in a subprocess on a free localhost port (the real CLI, uvicorn and scheduler),
then drives it with the official ``openai`` async client:

1. sequential: each request is sent after the previous one finished;
2. concurrent: all requests are sent at once, each client streaming its answer.

Every request asks for exactly ``--max_tokens`` tokens (``ignore_eos``), so both phases generate the same
number of tokens. Reported: generated tokens/s of each phase and their ratio (target >= 4x), p50/p95 time to
first token (first streamed content) of each phase, and the error count (failed requests, or answers that
are not exactly ``max_tokens`` long; target 0). Uses the checkpoint at ``--ckpt`` if it exists, else a
randomly initialised GPT of the ``--preset`` size with a tokenizer trained on a few sentences (the report
says which). The last line printed is ``RESULT serve_concurrency_ratio <value>``.

    .venv/bin/python benchmarks/serve.py [--ckpt=runs/speedrun/sft] [--clients=16] [--max_tokens=64]
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

from chatforge.config import die, option, parse
from chatforge.errors import ChatforgeError

MODEL = "bench"
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion briefly.",
             "List three prime numbers.", "How do plants make food?", "Translate 'good morning' to Spanish.",
             "What is 12 times 12?", "Name a famous painter."]


@dataclass
class Config:
    ckpt: str = option("runs/speedrun/sft", "checkpoint to serve; a random --preset model if it does not exist")
    preset: str = option("nano", "size of the random model when there is no checkpoint (the speedrun's default)")
    vocab_size: int = option(8192, "vocabulary of the random model (the speedrun tokenizer's default size)")
    clients: int = option(16, "concurrent streaming clients (and requests in each phase)")
    max_tokens: int = option(64, "tokens generated per request")
    device: str = option("cpu", "device of the server")
    threads: int = option(1, "torch intra-op threads of the server (0 = torch's default); the clients share the "
                             "machine, and on 2 cores 1 keeps OpenMP barriers from stalling on a busy core")
    repeats: int = option(3, "timed runs of each phase (medians are reported)")
    seed: int = option(0, "seed of the random model")
    startup_timeout: float = option(180.0, "seconds to wait for the server to answer /health")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_checkpoint(cfg: Config, folder: Path) -> str:
    import torch

    from chatforge.model.gpt import GPT, preset_config
    from chatforge.model.hf import export_hf_gpt2
    from chatforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(QUESTIONS * 20, vocab_size=400)
    tokenizer.save(folder)
    torch.manual_seed(cfg.seed)
    model = GPT(preset_config(cfg.preset, vocab_size=max(cfg.vocab_size, tokenizer.vocab_size)))
    export_hf_gpt2(model, folder)
    return (f"randomly initialised '{cfg.preset}' preset, vocabulary {model.config.vocab_size} "
            f"({model.num_params() / 1e6:.1f}M parameters; no checkpoint at {cfg.ckpt})")


def _start_server(ckpt: str, tokenizer: str, cfg: Config, port: int, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "chatforge.cli", "serve", f"--ckpt={ckpt}", f"--port={port}", f"--model_name={MODEL}",
            f"--max_batch_size={cfg.clients}", f"--device={cfg.device}", f"--run_dir={log.parent}",
            f"--max_tokens={cfg.max_tokens}", f"--threads={cfg.threads}", "--log_level=warning"]
    if tokenizer:
        args.append(f"--tokenizer={tokenizer}")
    return subprocess.Popen(args, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _wait_ready(url: str, server: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ChatforgeError(f"the server exited with {server.returncode}:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise ChatforgeError(f"the server did not answer /health within {timeout:.0f} s")


async def _one(client: openai.AsyncOpenAI, question: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first streamed text, seconds to the end, tokens generated) of one streamed request."""
    start = time.perf_counter()
    first = None
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=1.0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    tokens = 0
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter() - start
    return (first if first is not None else end), end, tokens


async def _phase(url: str, cfg: Config, concurrent: bool) -> tuple[float, list[float], int, int]:
    """(wall seconds, times to first token, tokens generated, errors) of one phase."""
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(cfg.clients)]
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        if concurrent:
            requests = (_one(client, q, cfg.max_tokens) for q in questions)
            results = await asyncio.gather(*requests, return_exceptions=True)
        else:
            results = []
            for q in questions:
                try:
                    results.append(await _one(client, q, cfg.max_tokens))
                except Exception as exc:  # counted as an error, the phase goes on
                    results.append(exc)
        wall = time.perf_counter() - start
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = len(results) - len(ok) + sum(1 for r in ok if r[2] != cfg.max_tokens)
    for r in results:
        if isinstance(r, BaseException):
            print(f"  error: {type(r).__name__}: {r}")
    return wall, [r[0] for r in ok], sum(r[2] for r in ok), errors


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str]) -> None:
    cfg, _ = parse(Config, argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if Path(cfg.ckpt).exists():
            ckpt, tokenizer, source = cfg.ckpt, "", f"checkpoint {cfg.ckpt}"
        else:
            ckpt, tokenizer = str(tmp / "model"), str(tmp / "model")
            source = _random_checkpoint(cfg, tmp / "model")
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = tmp / "server.log"
        server = _start_server(ckpt, tokenizer, cfg, port, log)
        try:
            _wait_ready(url, server, cfg.startup_timeout, log)
            print(
                f"model: {source}; server: chatforge serve on {url}, {cfg.clients} slots, device {cfg.device}, "
                f"{os.cpu_count()} CPU cores"
            )
            asyncio.run(_phase(url, Config(**{**cfg.__dict__, "clients": 2}), concurrent=True))  # warm-up
            runs = {False: [], True: []}
            for _ in range(cfg.repeats):  # interleaved, so drifting load on a shared machine hits both alike
                for concurrent in (False, True):
                    runs[concurrent].append(asyncio.run(_phase(url, cfg, concurrent)))
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
    print(f"{cfg.clients} streamed chat requests x {cfg.max_tokens} tokens, median of {cfg.repeats} interleaved runs")
    rates, errors = {}, 0
    for concurrent, name in ((False, "one by one"), (True, "concurrent")):
        walls = [r[0] for r in runs[concurrent]]
        ttft = [t for r in runs[concurrent] for t in r[1]]
        errors += sum(r[3] for r in runs[concurrent])
        rates[concurrent] = statistics.median(r[2] / r[0] for r in runs[concurrent])
        print(
            f"  {name + ':':12} {statistics.median(walls):6.2f} s, {rates[concurrent]:7.1f} tok/s, time to first "
            f"token p50 {_percentile(ttft, 0.5) * 1000:.0f} ms, p95 {_percentile(ttft, 0.95) * 1000:.0f} ms, "
            f"errors {sum(r[3] for r in runs[concurrent])}"
        )
    ratio = rates[True] / rates[False]
    print(f"throughput ratio concurrent / one by one: {ratio:.2f}x (target >= 4x); errors {errors} (target 0)")
    print(f"RESULT serve_concurrency_ratio {ratio:.2f}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ChatforgeError as exc:
        die(str(exc))
