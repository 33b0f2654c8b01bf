"""Instruction-driven edits through the engine: the edit template of ``chatforge.chat_template``, greedy, with
room for the text to grow."""

from __future__ import annotations

from chatforge.chat_template import edit_messages, prompt_ids
from chatforge.infer.params import SamplingParams


def edit_params(tokenizer, text: str, block_size: int, prompt_length: int) -> SamplingParams:
    """Greedy, with room for the text to grow by half and a bit (a docstring), within the context."""
    room = block_size - prompt_length
    return SamplingParams(temperature=0.0, max_tokens=max(1, min(room, len(tokenizer.encode(text)) * 3 // 2 + 32)))


def apply_edits(engine, requests: list[tuple[str, str]]) -> list[str]:
    """The model's rewrite of each (instruction, text)."""
    prompts = [prompt_ids(edit_messages(instruction, text), engine.tokenizer) for instruction, text in requests]
    params = [edit_params(engine.tokenizer, text, engine.block_size, len(p)) for p, (_, text) in zip(prompts, requests)]
    return [c.choices[0].text.strip("\n") for c in engine.generate(prompts, params)]
