"""Automatic Prompt Engineer: instruction proposals (forward and by insertion), scoring and the adaptive filter.

The `chatforge ape` stage (chatforge/stages/ape.py) runs them.
"""

from __future__ import annotations

import math

import numpy as np

from chatforge.data.fim import insertion_ids, middle_params
from chatforge.errors import ConfigError
from chatforge.evals.icl import built_in_tasks, demo_text, user_task
from chatforge.infer.params import SamplingParams

FORWARD_HEAD = ("I gave a friend an instruction and some inputs. The friend read the instruction and wrote an "
                "output for every one of the inputs. Here are the input-output pairs:\n\n")
VARIATION = (
    "Generate a variation of the following instruction while keeping the semantic meaning.\n\nInput: {}\n\nOutput:"
)
METRICS = ("logprob", "accuracy")


def first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip().strip('"').strip()


def forward_proposals(engine, demos: list[tuple[str, str]], count: int, temperature: float, seed: int) -> list[str]:
    prompt = FORWARD_HEAD + demo_text(demos) + "The instruction was"
    params = SamplingParams(n=count, temperature=temperature, max_tokens=24, stop=["\n"], seed=seed, truncate=True)
    return [first_line(c.text) for c in engine.generate([prompt], params)[0].choices]


def reverse_proposals(engine, demos: list[tuple[str, str]], count: int, temperature: float, seed: int) -> list[str]:
    ids = insertion_ids(engine.tokenizer, "Instruction:", "\n\n" + demo_text(demos))
    params = middle_params(
        engine.tokenizer, SamplingParams(n=count, temperature=temperature, max_tokens=24, seed=seed, truncate=True)
    )
    return [first_line(c.text) for c in engine.generate([ids], params)[0].choices]


class Scorer:
    """Scores of instructions on demonstrations; ``score(instruction, items)`` is a list, one per item."""

    def __init__(self, engine, metric: str):
        self.engine, self.metric = engine, metric

    @staticmethod
    def prompt(instruction: str, query: str) -> str:
        return (f"Instruction: {instruction}\n\n" if instruction else "") + f"Input: {query}\nOutput:"

    def score(self, instruction: str, items: list[tuple[str, str]]) -> list[float]:
        prompts = [self.prompt(instruction, x) for x, _ in items]
        if self.metric == "logprob":
            return [
                float(np.mean(lps))
                for lps in self.engine.score_batch([(p, " " + y) for p, (_, y) in zip(prompts, items)], truncate=True)
            ]
        params = SamplingParams(temperature=0.0, max_tokens=24, stop=["\n"], truncate=True)
        return [
            float(c.choices[0].text.strip() == y.strip())
            for c, (_, y) in zip(self.engine.generate(prompts, params), items)
        ]


def adaptive_filter(
    candidates: list[str],
    score,
    train: list[tuple[str, str]],
    subset: int,
    rounds: int,
    keep: float,
    rng: np.random.Generator,
) -> tuple[dict[str, tuple[float, int]], list[int]]:
    """APE's filtering: score on disjoint random subsets, keep the best share by running mean, then score the
    survivors on the whole set. Returns ({instruction: (mean score, examples)}, candidates alive per round)."""
    order = rng.permutation(len(train))
    sums = {c: 0.0 for c in candidates}
    seen = {c: 0 for c in candidates}
    alive, counts = list(candidates), [len(candidates)]
    for r in range(rounds):
        chunk = [train[i] for i in order[r * subset : (r + 1) * subset]]
        if not chunk:
            break
        for c in alive:
            values = score(c, chunk)
            sums[c] += sum(values)
            seen[c] += len(values)
        # a top share rather than a quantile threshold: ties at the cut (common with accuracy) must not keep everyone
        ranked = sorted(alive, key=lambda c: -sums[c] / seen[c])
        alive = ranked[: max(1, math.ceil(keep * len(alive)))]
        counts.append(len(alive))
    final = {c: (float(np.mean(score(c, train))), len(train)) for c in alive}
    return final, counts


def load_demos(cfg) -> tuple[list[tuple[str, str]], str]:
    if cfg.demos:
        task = user_task(cfg.demos)
    else:
        tasks = {t.name: t for t in built_in_tasks(cfg.data_dir, cfg.items, cfg.seed)}
        if cfg.task not in tasks:
            raise ConfigError(f"option 'task' must be one of {', '.join(tasks)} (or pass --demos); got {cfg.task!r}")
        task = tasks[cfg.task]
    return task.items, cfg.baseline or task.description
