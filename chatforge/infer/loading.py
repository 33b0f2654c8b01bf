"""What every command that decodes from a checkpoint shares: its options and how the engine is loaded."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from chatforge.chat_template import prompt_ids, stop_token_ids
from chatforge.config import option
from chatforge.device import resolve_device
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.infer.answers import ended
from chatforge.infer.engine import Engine
from chatforge.infer.params import SamplingParams
from chatforge.infer.precision import InferenceOptions
from chatforge.model.checkpoint import load_model, tokenizer_path
from chatforge.tokenizer import Tokenizer


@dataclass
class EngineOptions(InferenceOptions, SamplingParams):
    ckpt: str = option("runs/speedrun/pretrain", "checkpoint directory, run directory or Hugging Face GPT-2 directory")
    tokenizer: str = option("", "tokenizer.json or its directory (default: the checkpoint's tokenizer)")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    max_batch_size: int = option(16, "sequences decoded together")

    def validate(self) -> None:
        SamplingParams.validate(self)
        InferenceOptions.validate(self)
        if self.max_batch_size < 1:
            raise ConfigError(f"option 'max_batch_size' must be >= 1; got {self.max_batch_size}")

    def inference(self) -> InferenceOptions:
        return InferenceOptions(self.dtype, self.quantize, self.compile)

    def sampling(self) -> SamplingParams:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingParams)}
        values["stop"] = [unescape(s) for s in self.stop]
        return SamplingParams(**values).validate()


def unescape(text: str) -> str:
    """Backslash escapes typed on a command line ("\\n") as the characters they name; other text unchanged."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def load_engine(options: EngineOptions) -> Engine:
    """The checkpoint's model and tokenizer (or ``--tokenizer``) wrapped in an Engine."""
    if not Path(options.ckpt).exists():
        raise ChatforgeError(f"checkpoint not found: {options.ckpt} (train one, or pass --ckpt)")
    model, _ = load_model(options.ckpt, device=resolve_device(options.device))
    tokenizer = Tokenizer.load(options.tokenizer or tokenizer_path(options.ckpt))
    return Engine(model, tokenizer, max_batch_size=options.max_batch_size, options=options.inference())


def checkpoint_engine(ckpt: str, device: str, inference: InferenceOptions | None = None, **options) -> Engine:
    """``load_engine`` for a command whose own options name the checkpoint, the device and how to compute."""
    inference = inference or InferenceOptions()
    return load_engine(EngineOptions(ckpt=ckpt, device=device, **dataclasses.asdict(inference), **options))


def sample_answer_texts(engine: Engine | None, prompts: list[list[dict]], n: int, max_tokens: int,
                        temperature: float, seed: int) -> list[list[tuple[str, bool]]]:
    """``n`` sampled answers to each chat prompt (message list) as (text, ended with the stop token within
    ``max_tokens``); without an engine or with ``n`` = 0, no answers."""
    if engine is None or not n:
        return [[] for _ in prompts]
    end_id = stop_token_ids(engine.tokenizer)[0]
    # the full distribution: no top-k/top-p, so the samples are what the policy really says
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, n=n, seed=seed, truncate=True)
    outs = engine.generate([prompt_ids(m, engine.tokenizer) for m in prompts], params)
    return [[(c.text.strip(), ended(list(c.token_ids), end_id)) for c in out.choices] for out in outs]
