"""rewrite text by an instruction with an edit model: `chatforge edit --instruction=... < input`.

    chatforge edit --instruction="Fix the spelling." < draft.txt
    echo "def f(x):\n    return x * 2" | chatforge edit --instruction="Rename x to value."
    chatforge edit --input=notes.txt --instruction="Restore the punctuation." --n=3 --temperature=0.7

The text comes from ``--input`` (a file) or stdin; the request is rendered with the edit template of the one
chat template (the edit stage, ``chatforge edit-train``, trained on exactly this) and the rewrite is printed.
Greedy by default; ``max_tokens`` defaults to the room an edit needs (the text's length and half again).
"""

from __future__ import annotations

from dataclasses import dataclass

from chatforge.chat_template import edit_messages, prompt_ids
from chatforge.config import option
from chatforge.errors import ChatforgeError
from chatforge.infer.edits import edit_params
from chatforge.infer.loading import EngineOptions, load_engine
from chatforge.infer.params import BOUNDS
from chatforge.infer.terminal import read_text


@dataclass
class Config(EngineOptions):
    ckpt: str = option("runs/speedrun/edit", "an edit model (`chatforge edit-train`), checkpoint or run directory")
    instruction: str = option("", "what to do to the text, e.g. 'Fix the spelling.' (required)")
    input: str = option("", "file holding the text to edit (default: stdin)")
    temperature: float = option(0.0, "sampling temperature; 0 = greedy", **BOUNDS["temperature"].field_kwargs())
    max_tokens: int | None = option(None, "most tokens of the rewrite (default: the text's length and half again)")


def run(cfg: Config, args: list[str]) -> None:
    if args:
        raise ChatforgeError(f"unexpected argument(s) {' '.join(args)}: the text comes from stdin or --input")
    if not cfg.instruction.strip():
        raise ChatforgeError("option 'instruction' is required, e.g. --instruction='Fix the spelling.'")
    text = read_text(cfg.input).rstrip("\n")
    engine = load_engine(cfg)
    prompt = prompt_ids(edit_messages(cfg.instruction, text), engine.tokenizer)
    if len(prompt) >= engine.block_size:
        raise ChatforgeError(f"the text and instruction take {len(prompt)} tokens, more than the model's context of "
                             f"{engine.block_size}; edit a shorter piece")
    params = cfg.sampling()
    if cfg.max_tokens is None:
        params.max_tokens = edit_params(engine.tokenizer, text, engine.block_size, len(prompt)).max_tokens
    completion = engine.generate([prompt], params)[0]
    for choice in completion.choices:
        if len(completion.choices) > 1:
            print(f"=== edit {choice.index + 1} ===")
        print(choice.text.strip("\n"))
