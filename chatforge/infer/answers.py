"""Answers sampled through the shared engine for RL: one independent sample per conversation, with the ids."""

from __future__ import annotations

import dataclasses

from chatforge.chat_template import prompt_ids, stop_token_ids
from chatforge.infer.engine import Engine
from chatforge.infer.params import SamplingParams
from chatforge.infer.precision import InferenceOptions
from chatforge.model.gpt import GPT

BUDGET_PROMPTS = 64  # prompts whose answers set the length budget (enough for a stable 90th percentile)


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


def ended(response: list[int], end_id: int) -> bool:
    """Whether an answer finished with the end-of-turn token inside its budget (else it was cut off)."""
    return bool(response) and response[-1] == end_id


def measure_answer_budget(
    model: GPT, tokenizer, prompts: list[list[dict]], seed: int, quantile: float = 0.9,
    inference: InferenceOptions | None = None,
) -> dict:
    """The answer length budget read off the model's own answers: sample one answer to each of the first
    ``BUDGET_PROMPTS`` prompts (temperature 1, the policy's full distribution) with room for half the context,
    and take the ``quantile`` of the lengths (an answer still running at the cap counts as the cap), rounded up
    to a multiple of 8. Callers that pass the same prompts and seed measure the same budget.

    RL rollouts and the ranking data use this budget, so most answers end by themselves and the few that do not
    are the ones the unfinished-answer rule is for."""
    cap, end_id = model.config.block_size // 2, stop_token_ids(tokenizer)[0]
    params = SamplingParams(temperature=1.0, seed=seed)
    pairs = sample_answers(model, tokenizer, prompts[:BUDGET_PROMPTS], cap, params, inference)
    lengths = sorted(len(r) if ended(r, end_id) else cap for _, r in pairs)
    at_quantile = lengths[min(len(lengths) - 1, int(quantile * len(lengths)))]
    return {
        "max_tokens": min(cap, -(-at_quantile // 8) * 8),
        "cap": cap,
        "quantile": quantile,
        "prompts": len(pairs),
        "ended_within_cap": round(sum(ended(r, end_id) for _, r in pairs) / len(pairs), 4),
        "median_length": lengths[len(lengths) // 2],
    }
