"""generate text from a checkpoint with every decoding control, streamed to the terminal.

    chatforge generate "Once upon a time" --temperature=0.8 --top_p=0.9 --max_tokens=100
    chatforge generate --prompts_file=prompts.txt --n=3 --seed=1 --stream=false --output=out.jsonl
    echo "The capital of France" | chatforge generate --temperature=0 --logprobs=3
    chatforge generate "Once upon a time" --beam_width=4 --length_penalty=1.0
    chatforge generate --ckpt=runs/speedrun/fim "def add(a, b):" --suffix='\n\nprint(add(1, 2))' --temperature=0

Prompts come from the positional arguments, else from ``--prompts_file`` (one per line, blank lines skipped;
``-`` reads lines from stdin), else the whole of stdin is one prompt. With one sample per prompt (no
``best_of``, no beam search) and ``--stream`` on, text is printed as it is decoded, one prompt after
another; otherwise all prompts are decoded together in continuous batches and printed when done. Stop
strings understand backslash escapes (``--stop='\\n\\n'``); commas separate several. With ``--suffix`` (also
escaped) each prompt is the text before an insertion and the model writes what goes between (fill-in-the-middle).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

from chatforge import io
from chatforge.config import ChatforgeError, ConfigError, option
from chatforge.data.fim import ORDERS, insertion_ids, middle_params
from chatforge.infer.engine import Engine
from chatforge.infer.outputs import Completion
from chatforge.infer.loading import EngineOptions, load_engine, unescape
from chatforge.infer.params import SamplingParams


@dataclass
class Config(EngineOptions):
    prompts_file: str = option("", "file with one prompt per line ('-' = lines of stdin)")
    stream: bool = option(True, "print text as it is generated")
    output: str = option("", "also write every completion (ids, text, log-probs) to this JSON-lines file")
    beam_width: int = option(0, "beam search with this many beams instead of sampling (0 = off)")
    length_penalty: float = option(1.0, "beam search: score = log-prob / length ** length_penalty")
    early_stopping: bool = option(False, "beam search: stop once beam_width hypotheses are finished")
    suffix: str | None = option(None, "insert: write the text between each prompt and this suffix (needs a model "
                                      "trained by `chatforge fim`; stops at the end of the middle)")
    fim_order: str = option("psm", "insert prompt order: psm (prefix, suffix, middle) or spm (suffix, prefix, middle)")

    def validate(self) -> None:
        super().validate()
        if self.beam_width < 0:
            raise ConfigError(f"option 'beam_width' must be >= 0 (0 = sampling); got {self.beam_width}")
        if self.beam_width and self.n > self.beam_width:
            raise ConfigError(f"option 'n' ({self.n}) cannot exceed 'beam_width' ({self.beam_width})")
        if self.suffix is not None:
            if self.fim_order not in ORDERS:
                raise ConfigError(f"option 'fim_order' must be one of {', '.join(ORDERS)}; got {self.fim_order!r}")
            if self.echo or self.beam_width:
                raise ConfigError("option 'suffix' does not combine with 'echo' or 'beam_width'")
        if not math.isfinite(self.length_penalty):
            raise ConfigError(f"option 'length_penalty' must be a finite number; got {self.length_penalty}")


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
    show = lambda t: repr(tokenizer.decode([t]))
    print(f"[{label}]")
    for entry in entries:
        if entry is not None:  # the prompt's first token has no context, hence no log-prob
            top = "  ".join(f"{show(t)} {lp:.3f}" for t, lp in entry.top)
            print(f"  {show(entry.token_id):>16} {entry.logprob:8.3f}" + (f"   | {top}" if top else ""))


def _show_completion(tokenizer, completion: Completion, title: str | None, echo: bool, streamed: bool) -> None:
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


def _streamed(engine: Engine, prompt: str | list[int], params: SamplingParams, title: str | None) -> Completion:
    stream = engine.stream(prompt, params)
    if title:
        print(f"=== {title} ===")
    if params.echo:
        sys.stdout.write(engine.tokenizer.decode(stream.prompt_ids))
    for delta in stream:
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _show_completion(engine.tokenizer, stream.completion, title, params.echo, streamed=True)
    return stream.completion


def _beams(engine: Engine, cfg: Config, prompt: str, title: str | None) -> list[dict]:
    beams = engine.beam_search(prompt, cfg.beam_width, cfg.max_tokens, cfg.length_penalty, cfg.early_stopping,
                               cfg.n, cfg.stop_token_ids)
    for rank, beam in enumerate(beams, 1):
        print(f"=== {title + ', ' if title else ''}beam {rank}: score {beam.score:.4f}, log-prob {beam.logprob:.4f}"
              f"{'' if beam.finished else ' (unfinished)'} ===")
        print(beam.text)
    return [dataclasses.asdict(b) for b in beams]


def run(cfg: Config, args: list[str]) -> None:
    params = cfg.sampling()
    prompts = read_prompts(args, cfg.prompts_file)
    engine = load_engine(cfg)
    inputs = prompts
    if cfg.suffix is not None:
        from chatforge.train.checkpoint import trained_for_fim

        if not trained_for_fim(cfg.ckpt):
            raise ChatforgeError(f"{cfg.ckpt} was not trained for insertion, so --suffix would give noise; train one "
                                 "with `chatforge fim` (or drop --suffix)")
        suffix = unescape(cfg.suffix)
        inputs = [insertion_ids(engine.tokenizer, p, suffix, cfg.fim_order) for p in prompts]
        params = middle_params(engine.tokenizer, params)
    titles = [f"prompt {i + 1}" if len(prompts) > 1 else None for i in range(len(prompts))]
    if cfg.beam_width:
        rows = [{"prompt": p, "beams": _beams(engine, cfg, p, t)} for p, t in zip(prompts, titles)]
    else:
        if cfg.stream and params.num_samples == 1:
            completions = [_streamed(engine, p, params, t) for p, t in zip(inputs, titles)]
        else:
            completions = engine.generate(inputs, params)
            for completion, title in zip(completions, titles):
                _show_completion(engine.tokenizer, completion, title or ("prompt" if params.n > 1 else None),
                                 params.echo, streamed=False)
        rows = [{"prompt": p, **dataclasses.asdict(c)} for p, c in zip(prompts, completions)]
    if cfg.output:
        io.write_jsonl(cfg.output, rows)
        print(f"wrote {len(rows)} results to {cfg.output}", file=sys.stderr)
