"""Insertion quality on held-out documents with a removed span: loss and exact match of the middle.

Each example is a held-out chunk with one span taken out (a whole line of code, or one to four words of
prose). A model writes the span from the prefix and the suffix (``chatforge.data.fim``, PSM and SPM orders,
greedy, stopped at end-of-text) and the exact match compares it with the removed span, both stripped of
surrounding white space. The middle loss is the mean negative log-likelihood per token of the span. Its
``left_to_right`` variant scores the span from the prefix alone: the most a model that never saw FIM can use,
so FIM helps exactly when its middle loss with the suffix is below this figure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from chatforge.data.fim import ORDERS, insertion_ids, middle_params
from chatforge.evals.shares import MapShares, whole
from chatforge.infer.params import SamplingParams

WORD = re.compile(r"\S+\s*")


@dataclass
class Example:
    prefix: str
    middle: str
    suffix: str
    kind: str  # "code" or "text"


def remove_span(chunk: str, kind: str, rng: np.random.Generator) -> Example | None:
    """One example from a chunk: a line of code, or 1-4 words of text; None when the chunk has no room for one."""
    if kind == "code":
        lines = chunk.splitlines(keepends=True)
        candidates = [i for i, line in enumerate(lines) if line.strip() and 0 < i < len(lines) - 1]
        if not candidates:
            return None
        i = int(rng.choice(candidates))
        return Example("".join(lines[:i]), lines[i], "".join(lines[i + 1:]), kind)
    words = [m.span() for m in WORD.finditer(chunk)]
    if len(words) < 8:
        return None
    length = int(rng.integers(1, 5))
    first = int(rng.integers(2, len(words) - length - 1))
    start, end = words[first][0], words[first + length - 1][1]
    return Example(chunk[:start], chunk[start:end], chunk[end:], kind)


def make_examples(chunks: list[tuple[str, str]], count: int, seed: int) -> list[Example]:
    """Up to ``count`` examples from (text, kind) chunks, drawn reproducibly."""
    rng = np.random.default_rng(seed)
    examples = []
    for index in rng.permutation(len(chunks)):
        example = remove_span(*chunks[index], rng)
        if example is not None and example.middle.strip():
            examples.append(example)
            if len(examples) == count:
                break
    return examples


def _mean_nll(logprob_lists: list[list[float]]) -> float:
    values = [-lp for lps in logprob_lists for lp in lps]
    return float(np.mean(values)) if values else float("nan")


def _outcomes(engine, examples: list[Example], max_new_tokens: int) -> list[dict]:
    """Per example: for each order the middle's token log-probs and the middle written greedily, and the middle's
    log-probs from the prefix alone ("left_to_right")."""
    tokenizer = engine.tokenizer
    middles = [tokenizer.encode(e.middle) for e in examples]
    outcomes: list[dict] = [{} for _ in examples]
    for order in ORDERS:
        prompts = [insertion_ids(tokenizer, e.prefix, e.suffix, order) for e in examples]
        scores = engine.score_batch(list(zip(prompts, middles)), truncate=True)
        params = [
            middle_params(
                tokenizer, SamplingParams(temperature=0.0, max_tokens=min(len(m) + 8, max_new_tokens), truncate=True)
            )
            for m in middles
        ]
        for outcome, score, completion in zip(outcomes, scores, engine.generate(prompts, params)):
            outcome[order] = (score, completion.choices[0].text)
    start = [tokenizer.eot_id]  # documents follow end-of-text in the training stream
    pairs = [(start + tokenizer.encode(e.prefix), m) for e, m in zip(examples, middles)]
    for outcome, score in zip(outcomes, engine.score_batch(pairs, truncate=True)):
        outcome["left_to_right"] = score
    return outcomes


def evaluate_insertion(engine, examples: list[Example], max_new_tokens: int = 48,
                       map_shares: MapShares = whole) -> dict:
    """Per order (psm, spm): middle loss and exact match, overall and per kind; and the left-to-right middle loss.
    ``map_shares`` runs the per-example work (under torchrun: each rank its share, see ``chatforge.evals.shares``)."""
    outcomes = map_shares(lambda share, _: _outcomes(engine, share, max_new_tokens), examples)
    results: dict = {
        "examples": len(examples),
        "kinds": {k: sum(e.kind == k for e in examples) for k in ("code", "text")},
    }
    for order in ORDERS:
        scores = [outcome[order][0] for outcome in outcomes]
        written = [outcome[order][1] for outcome in outcomes]
        hits = [w.strip() == e.middle.strip() for w, e in zip(written, examples)]
        results[order] = {
            "middle_loss": round(_mean_nll(scores), 4),
            "exact_match": round(float(np.mean(hits)), 4),
            **{
                f"exact_match_{k}": round(float(np.mean([h for h, e in zip(hits, examples) if e.kind == k])), 4)
                for k in ("code", "text")
                if results["kinds"][k]
            },
        }
        results[order]["samples"] = [
            {"prefix_end": e.prefix[-60:], "suffix_start": e.suffix[:60], "removed": e.middle, "written": w}
            for e, w in list(zip(examples, written))[:5]
        ]
    results["left_to_right_middle_loss"] = round(_mean_nll([outcome["left_to_right"] for outcome in outcomes]), 4)
    return results
