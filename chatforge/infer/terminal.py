"""Printing completions to the terminal (streamed, with log-probs, beams) and reading prompts and text from files
or stdin, for `chatforge generate` and `chatforge edit`.
"""

from __future__ import annotations

import dataclasses
import sys

from chatforge import io
from chatforge.errors import ChatforgeError
from chatforge.infer.engine import Engine
from chatforge.infer.outputs import Completion
from chatforge.infer.params import SamplingParams


def read_prompts(args: list[str], prompts_file: str) -> list[str]:
    if args:
        return list(args)
    if prompts_file:
        if prompts_file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            lines = io.read_text(prompts_file, "prompts file").splitlines()
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise ChatforgeError(f"no prompts in {prompts_file}")
        return prompts
    text = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read().rstrip("\n")
    if not text:
        raise ChatforgeError("no prompt: give prompts as arguments, with --prompts_file, or on stdin")
    return [text]


def _print_logprobs(tokenizer, label: str, entries) -> None:
    def show(t):
        return repr(tokenizer.decode([t]))
    print(f"[{label}]")
    for entry in entries:
        if entry is not None:  # the prompt's first token has no context, hence no log-prob
            top = "  ".join(f"{show(t)} {lp:.3f}" for t, lp in entry.top)
            print(f"  {show(entry.token_id):>16} {entry.logprob:8.3f}" + (f"   | {top}" if top else ""))


def show_completion(tokenizer, completion: Completion, title: str | None, echo: bool, streamed: bool) -> None:
    """Print what was not streamed already: texts, then the log-probs that were asked for."""
    for choice in completion.choices:
        if not streamed:
            if title:
                print(f"=== {title}" + (f", sample {choice.index + 1}" if len(completion.choices) > 1 else "") + " ===")
            print((tokenizer.decode(completion.prompt_ids) if echo else "") + choice.text)
        if choice.logprobs is not None:
            _print_logprobs(tokenizer, "log-probs of the generated tokens", choice.logprobs)
    if completion.prompt_logprobs is not None:
        _print_logprobs(tokenizer, "log-probs of the prompt", completion.prompt_logprobs)


def streamed(engine: Engine, prompt: str | list[int], params: SamplingParams, title: str | None) -> Completion:
    stream = engine.stream(prompt, params)
    if title:
        print(f"=== {title} ===")
    if params.echo:
        sys.stdout.write(engine.tokenizer.decode(stream.prompt_ids))
    for delta in stream:
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    show_completion(engine.tokenizer, stream.completion, title, params.echo, streamed=True)
    return stream.completion


def beams(engine: Engine, cfg, prompt: str, title: str | None) -> list[dict]:
    beams = engine.beam_search(prompt, cfg.beam_width, cfg.max_tokens, cfg.length_penalty, cfg.early_stopping,
                               cfg.n, cfg.stop_token_ids)
    for rank, beam in enumerate(beams, 1):
        print(f"=== {title + ', ' if title else ''}beam {rank}: score {beam.score:.4f}, log-prob {beam.logprob:.4f}"
              f"{'' if beam.finished else ' (unfinished)'} ===")
        print(beam.text)
    return [dataclasses.asdict(b) for b in beams]


def read_text(path: str) -> str:
    if path:
        return io.read_text(path, "input file")
    if sys.stdin is None or sys.stdin.isatty():
        raise ChatforgeError("no text to edit: pipe it on stdin or pass --input=FILE")
    return sys.stdin.read()
