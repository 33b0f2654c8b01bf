"""Answers sampled through the shared engine for RL: one independent sample per conversation, with the ids."""

from __future__ import annotations

import dataclasses

from chatforge.chat_template import prompt_ids
from chatforge.infer.engine import Engine
from chatforge.infer.params import SamplingParams
from chatforge.infer.precision import InferenceOptions
from chatforge.model.gpt import GPT


def sample_answers(
    model: GPT, tokenizer, prompts: list[list[dict]], max_tokens: int, params: SamplingParams,
    inference: InferenceOptions | None = None, first_index: int = 0,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids incl. a final stop token) for each conversation, through the shared engine
    (which decodes from a converted copy of ``model`` when ``inference`` asks for bf16 or int8).

    ``prompts`` are items ``first_index``, ``first_index + 1``, ... of a larger list whose seeds they take, so
    processes sampling their own shares of a list draw what one process sampling all of it would."""
    engine = Engine(model, tokenizer, max_batch_size=len(prompts), options=inference)
    # one seed per request: equal prompts must still get independent samples
    settings = [
        dataclasses.replace(
            params,
            max_tokens=max_tokens,
            truncate=True,
            n=1,
            seed=None if params.seed is None else params.seed * 10_007 + first_index + i,
        )
        for i in range(len(prompts))
    ]
    outs = engine.generate([prompt_ids(p, tokenizer) for p in prompts], settings)
    return [(o.prompt_ids, list(o.choices[0].token_ids)) for o in outs]
