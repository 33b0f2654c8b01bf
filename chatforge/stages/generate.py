"""generate text from a checkpoint with every decoding control, streamed to the terminal.

    chatforge generate "Once upon a time" --temperature=0.8 --top_p=0.9 --max_tokens=100
    chatforge generate --prompts_file=prompts.txt --n=3 --seed=1 --stream=false --output=out.jsonl
    echo "The capital of France" | chatforge generate --temperature=0 --logprobs=3
    chatforge generate "Once upon a time" --beam_width=4 --length_penalty=1.0
    chatforge generate --ckpt=runs/speedrun/fim "def add(a, b):" --suffix='

print(add(1, 2))' --temperature=0

Prompts come from the positional arguments, else from ``--prompts_file`` (one per line, blank lines skipped;
``-`` reads lines from stdin), else the whole of stdin is one prompt. With one sample per prompt (no
``best_of``, no beam search) and ``--stream`` on, text is printed as it is decoded, one prompt after
another; otherwise all prompts are decoded together in continuous batches and printed when done. Stop
strings understand backslash escapes (``--stop='\n\n'``); commas separate several. With ``--suffix`` (also
escaped) each prompt is the text before an insertion and the model writes what goes between (fill-in-the-middle).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

from chatforge import io
from chatforge.config import option
from chatforge.data.fim import ORDERS, insertion_ids, middle_params
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.infer.loading import EngineOptions, load_engine, unescape
from chatforge.infer.terminal import beams, read_prompts, show_completion, streamed
from chatforge.model.checkpoint import trained_for_fim


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


def run(cfg: Config, args: list[str]) -> None:
    params = cfg.sampling()
    prompts = read_prompts(args, cfg.prompts_file)
    engine = load_engine(cfg)
    inputs = prompts
    if cfg.suffix is not None:
        if not trained_for_fim(cfg.ckpt):
            raise ChatforgeError(f"{cfg.ckpt} was not trained for insertion, so --suffix would give noise; train one "
                                 "with `chatforge fim` (or drop --suffix)")
        suffix = unescape(cfg.suffix)
        inputs = [insertion_ids(engine.tokenizer, p, suffix, cfg.fim_order) for p in prompts]
        params = middle_params(engine.tokenizer, params)
    titles = [f"prompt {i + 1}" if len(prompts) > 1 else None for i in range(len(prompts))]
    if cfg.beam_width:
        rows = [{"prompt": p, "beams": beams(engine, cfg, p, t)} for p, t in zip(prompts, titles)]
    else:
        if cfg.stream and params.num_samples == 1:
            completions = [streamed(engine, p, params, t) for p, t in zip(inputs, titles)]
        else:
            completions = engine.generate(inputs, params)
            for completion, title in zip(completions, titles):
                show_completion(engine.tokenizer, completion, title or ("prompt" if params.n > 1 else None),
                                 params.echo, streamed=False)
        rows = [{"prompt": p, **dataclasses.asdict(c)} for p, c in zip(prompts, completions)]
    if cfg.output:
        io.write_jsonl(cfg.output, rows)
        print(f"wrote {len(rows)} results to {cfg.output}", file=sys.stderr)
