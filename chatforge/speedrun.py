"""Running stages in order with skip/rerun bookkeeping, and the sample generations of the report card.

The speedrun stage (``chatforge/stages/speedrun.py``) lists its steps; this module runs them: a step whose
outputs exist and whose options hash as when it finished is skipped unless a step it reads from ran again.

Under torchrun the training steps run on every rank (data-parallel); every other step (data, tokenizer,
evaluations, samples) runs on rank 0 alone while the others wait, so no two processes write the same files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from chatforge import io
from chatforge.chat_template import prompt_ids
from chatforge.device import resolve_device
from chatforge.infer.engine import Engine
from chatforge.infer.params import SamplingParams
from chatforge.model.checkpoint import latest_checkpoint, load_model, tokenizer_path
from chatforge.tokenizer import Tokenizer
from chatforge.train import distributed

STATE_FILE = "speedrun_state.json"
TEXT_PROMPTS = ["The meaning of life is", "def fibonacci(n):", "In 1492, Columbus", "今天天气"]
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for learning to cook.",
    "Explain what a neural network is in one sentence.",
    "请用一句话介绍一下你自己。",
    "如何学习编程？",
]


@dataclass
class Step:
    name: str
    options: object  # the stage's config, hashed to tell whether finished outputs are still up to date
    done_marker: Path
    action: Callable[[], None]
    needs: tuple[str, ...] = ()  # stages whose outputs it reads: when one of them ran again, so must it
    every_rank: bool = False  # a training stage: under torchrun every rank runs it; other steps run on rank 0


def options_fingerprint(options: object) -> str:
    values = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else options
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def train_resuming(stage, options) -> None:
    """Run a training stage; an interrupted run continues from its last checkpoint instead of starting over."""
    out_dir = Path(options.out_dir)
    ranks = distributed.init(getattr(getattr(options, "train", None), "device", "auto"))
    resume = latest_checkpoint(out_dir) is not None
    if resume and (out_dir / "summary.json").exists():
        if ranks.is_main:  # finished before with other options (else the speedrun would have skipped it): redo
            shutil.rmtree(out_dir)
        resume = False
    ranks.barrier()
    options.resume = ranks.broadcast_object(resume)  # rank 0's view: the checkpoint it will broadcast
    stage.run(options, [])


def write_samples(run_dir: Path, max_tokens: int, device: str) -> None:
    """Greedy continuations of fixed text prompts by the pretrained model, and answers to fixed chat prompts
    (English and Chinese) by the SFT and PPO models; printed and saved to samples.json for the report card."""

    models = [
        ("pretrained", run_dir / "pretrain", False),
        ("code", run_dir / "code", False),
        ("sft", run_dir / "sft", True),
        ("ppo", run_dir / "ppo", True),
    ]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, repetition_penalty=1.2)
    samples = []
    for label, ckpt, chat in models:
        if latest_checkpoint(ckpt) is None:
            continue
        model, _ = load_model(ckpt, device=resolve_device(device))
        tokenizer = Tokenizer.load(tokenizer_path(ckpt))
        prompts = CHAT_PROMPTS if chat else TEXT_PROMPTS
        inputs = [prompt_ids([{"role": "user", "content": p}], tokenizer) for p in prompts] if chat else prompts
        for prompt, completion in zip(prompts, Engine(model, tokenizer).generate(inputs, params)):
            text = completion.choices[0].text.strip() if chat else completion.choices[0].text
            samples.append({"model": label, "prompt": prompt, "completion": text})
            print(f"--- {label} | {prompt}\n{text if chat else prompt + text}\n")
    io.write_json(run_dir / "samples.json", samples)


def load_state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def run_steps(steps: list[Step], run_dir: Path, only: str = "", force: bool = False) -> dict[str, float]:
    """Run the steps in order, skipping one whose outputs exist and whose options are unchanged since it finished
    unless a step it reads from ran again; returns the seconds each step took (this run's or a former one's)."""
    ranks = distributed.init()
    state = ranks.broadcast_object(load_state(run_dir))
    timings = state.get("seconds", {})
    ran: set[str] = set()
    for step in steps:
        if only and step.name != only:
            continue
        fingerprint = options_fingerprint(step.options)
        up_to_date = step.done_marker.exists() and state.get("fingerprints", {}).get(step.name) == fingerprint
        if up_to_date and not force and not ran.intersection(step.needs):
            print(f"[speedrun] {step.name}: up to date, skipped ({step.done_marker})")
            continue
        print(f"[speedrun] {step.name} ...", flush=True)
        t0 = time.perf_counter()
        if step.every_rank or ranks.is_main:
            step.action()
        ranks.barrier()
        ran.add(step.name)
        timings[step.name] = round(time.perf_counter() - t0, 1)
        state.setdefault("fingerprints", {})[step.name] = fingerprint
        state["seconds"] = timings
        if ranks.is_main:  # after each stage, so an interruption loses only the current one
            io.write_json(run_dir / STATE_FILE, state)
        print(f"[speedrun] {step.name} done in {timings[step.name]:.0f} s", flush=True)
    return timings
