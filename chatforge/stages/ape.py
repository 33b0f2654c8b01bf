"""Automatic Prompt Engineer (APE): the model writes candidate instructions for a task and scores them.

    chatforge ape --task=capitalize                      # a built-in ICL task (chatforge.evals.icl)
    chatforge ape --demos=my_task.jsonl --baseline="Translate the word into French."
    chatforge ape --task=reverse --metric=accuracy --mc_rounds=2

1. Proposals (Zhou et al., 2022). Forward: the model continues "I gave a friend an instruction and some
   inputs. ... The instruction was" after demonstrations. Reverse: an insert-capable model
   (``chatforge fim``, ``--insert_ckpt``) fills the blank of "Instruction: ___" placed before the
   demonstrations (``chatforge.data.fim``). Candidates are sampled, cut at the line end and de-duplicated.
2. Scoring: ``logprob`` = mean log-probability per token of the gold outputs given instruction + input
   (the paper's log-probability score), or ``accuracy`` = exact match of the greedy output.
3. Adaptive filtering: all candidates are scored on a small random subset of the training demonstrations;
   the best ``keep`` share by running mean survives and is scored on a new disjoint subset, their running
   mean updated; this repeats for ``rounds`` rounds; the survivors are scored on the whole training set.
4. Optional iterative Monte-Carlo search (``mc_rounds``): the model proposes variants of the best
   instructions ("Generate a variation of the following instruction ..."); they are scored on the whole
   training set and the best are kept.

Writes ``out_dir/ranked.json`` (every scored instruction, best first, with the number of examples behind
its score) and ``summary.json``: candidate counts per round, and the held-out score of the best instruction
against the hand-written baseline and against no instruction.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chatforge import io
from chatforge.config import nested, option
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.infer.loading import checkpoint_engine
from chatforge.infer.params import BOUNDS, SamplingParams
from chatforge.infer.precision import InferenceOptions
from chatforge.model.checkpoint import trained_for_fim
from chatforge.prompting.ape import (
    METRICS,
    VARIATION,
    Scorer,
    adaptive_filter,
    first_line,
    forward_proposals,
    load_demos,
    reverse_proposals,
)


@dataclass
class Config:
    ckpt: str = option("runs/speedrun/pretrain", "the model that proposes, executes and scores instructions")
    insert_ckpt: str = option("runs/speedrun/fim", "an insert-capable model for reverse proposals ('' = forward only)")
    task: str = option("capitalize", "a built-in ICL task (see `chatforge eval --help`), unless --demos is given")
    demos: str = option("", "JSONL of {input, output} demonstrations: the task to find an instruction for")
    baseline: str = option("", "a hand-written instruction to compare with (default: the built-in task's description)")
    data_dir: str = option("runs/speedrun/data", "the data stage's out_dir (for built-in tasks that read the corpus)")
    out_dir: str = option("runs/speedrun/ape", "where ranked.json and summary.json go")
    items: int = option(60, "items of a built-in task")
    held_out: int = option(20, "demonstrations kept aside to evaluate the best instruction")
    prompt_demos: int = option(5, "demonstrations shown when proposing")
    forward: int = option(16, "forward-mode candidates sampled")
    reverse: int = option(16, "reverse-mode candidates sampled (needs insert_ckpt)")
    temperature: float = option(0.9, "sampling temperature of proposals", **BOUNDS["temperature"].field_kwargs())
    metric: str = option("logprob", "logprob (mean log-prob of gold outputs) or accuracy (exact match)")
    subset: int = option(8, "demonstrations per adaptive-filtering round")
    rounds: int = option(2, "adaptive-filtering rounds on disjoint subsets before the full evaluation")
    keep: float = option(0.5, "share of candidates kept after each round (by running mean)")
    mc_rounds: int = option(1, "iterative Monte-Carlo rounds of variants of the best (0 = none)")
    mc_top: int = option(3, "best instructions varied per Monte-Carlo round")
    mc_variants: int = option(4, "variants sampled per instruction per Monte-Carlo round")
    seed: int = option(0, "makes the sampling and the subsets reproducible")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    inference: InferenceOptions = nested(InferenceOptions, "how generation computes (dtype, quantize, compile)")

    def validate(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"option 'metric' must be one of {', '.join(METRICS)}; got {self.metric!r}")
        if not 0 < self.keep <= 1:
            raise ConfigError(f"option 'keep' must be in (0, 1]; got {self.keep}")
        for name in ("held_out", "prompt_demos", "subset"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option '{name}' must be >= 1; got {getattr(self, name)}")
        if self.forward + self.reverse < 1:
            raise ConfigError("options 'forward' and 'reverse' ask for no candidates at all")


def run(cfg: Config, args: list[str]) -> None:
    cfg.validate()
    items, baseline = load_demos(cfg)
    rng = np.random.default_rng(cfg.seed)
    shuffled = [items[i] for i in rng.permutation(len(items))]
    held_out, train = shuffled[: cfg.held_out], shuffled[cfg.held_out:]
    if len(train) < cfg.prompt_demos + cfg.subset:
        raise ChatforgeError(f"{len(items)} demonstrations leave {len(train)} for proposing and scoring; need at least "
                             f"{cfg.prompt_demos + cfg.subset} besides the {cfg.held_out} held out")
    engine = checkpoint_engine(cfg.ckpt, cfg.device, cfg.inference)
    shown = train[: cfg.prompt_demos]
    proposals = {
        "forward": forward_proposals(engine, shown, cfg.forward, cfg.temperature, cfg.seed) if cfg.forward else []
    }
    if cfg.reverse and cfg.insert_ckpt:
        if Path(cfg.insert_ckpt).exists() and trained_for_fim(cfg.insert_ckpt):
            inserter = checkpoint_engine(cfg.insert_ckpt, cfg.device, cfg.inference)
            proposals["reverse"] = reverse_proposals(inserter, shown, cfg.reverse, cfg.temperature, cfg.seed)
        elif not cfg.forward:
            raise ChatforgeError(
                f"--forward=0 asks for reverse proposals only, but {cfg.insert_ckpt} is not a model "
                "trained by `chatforge fim`; train one, point --insert_ckpt at one or set --forward"
            )
        else:
            print(
                f"[ape] reverse proposals skipped: {cfg.insert_ckpt} is not a model trained by `chatforge fim` "
                "(train one with `chatforge fim`, or set --insert_ckpt)"
            )
    candidates = list(dict.fromkeys(c for found in proposals.values() for c in found if c))
    if not candidates:
        raise ChatforgeError(
            "the model proposed no non-empty instruction; raise --forward/--reverse or the temperature"
        )
    print(
        f"[ape] proposed {', '.join(f'{len(v)} {k}' for k, v in proposals.items())}: {len(candidates)} distinct "
        "candidates"
    )
    scorer = Scorer(engine, cfg.metric)
    scored, alive = adaptive_filter(candidates, scorer.score, train, cfg.subset, cfg.rounds, cfg.keep, rng)
    print(f"[ape] adaptive filtering, candidates alive per round: {' -> '.join(map(str, alive))}")
    monte_carlo = []
    for r in range(cfg.mc_rounds):
        best = sorted(scored, key=lambda c: -scored[c][0])[: cfg.mc_top]
        params = SamplingParams(
            n=cfg.mc_variants,
            temperature=cfg.temperature,
            max_tokens=24,
            stop=["\n"],
            seed=cfg.seed + 1 + r,
            truncate=True,
        )
        variants = [
            first_line(choice.text)
            for c in engine.generate([VARIATION.format(b) for b in best], params)
            for choice in c.choices
        ]
        new = [v for v in dict.fromkeys(variants) if v and v not in scored]
        scored.update({v: (float(np.mean(scorer.score(v, train))), len(train)) for v in new})
        monte_carlo.append(len(new))
        print(f"[ape] Monte-Carlo round {r + 1}: {len(new)} new variants of the best {len(best)}")
    ranked = sorted(
        ({"instruction": c, "score": round(s, 4), "examples": n} for c, (s, n) in scored.items()),
        key=lambda row: -row["score"],
    )
    best = ranked[0]["instruction"]
    held = {
        name: round(float(np.mean(scorer.score(text, held_out))), 4)
        for name, text in (("best", best), ("baseline", baseline), ("none", ""))
    }
    summary = {
        "task": cfg.demos or cfg.task,
        "metric": cfg.metric,
        "ckpt": cfg.ckpt,
        "proposed": {k: len(v) for k, v in proposals.items()},
        "distinct_candidates": len(candidates),
        "alive_per_round": alive,
        "monte_carlo_new": monte_carlo,
        "best_instruction": best,
        "baseline_instruction": baseline,
        "held_out_examples": len(held_out),
        "held_out_score": held,
        "top": ranked[:5],
    }
    out = Path(cfg.out_dir)
    io.write_json(out / "ranked.json", ranked)
    io.write_json(out / "summary.json", summary)
    print(f"[ape] best instruction: {best!r} (train {cfg.metric} {ranked[0]['score']:.4f})")
    print(
        f"[ape] held-out {cfg.metric} on {len(held_out)} examples: best {held['best']:.4f}, hand-written "
        f"{held['baseline']:.4f} ({baseline!r}), no instruction {held['none']:.4f}; wrote {out}"
    )
