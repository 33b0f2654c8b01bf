"""build the ranking data for the reward model: human/feedback rankings plus an automatic builder.

A ranking record (JSONL, one per line)::

    {"id": "...", "prompt": [{"role": "user", "content": "..."}], "completions": ["...", ...],
     "ranking": [[0], [2, 3], [1]], "source": "human"}

``completions`` holds K responses (4 ≤ K ≤ 9); ``ranking`` lists tiers best first (a flat list of indices is
a total order; responses in the same tier are tied; responses in no tier are unranked). Sources, in order of
trust: ranking files given with ``--inputs`` (``human``; the serving layer's ``chatforge feedback export
--as rankings`` writes this format), then the automatic builder, since no preference data ships in any
package: for each prompt of the RLHF pool, the held-out reference answer ranks above answers sampled from
the SFT model, which rank above corrupted answers (another prompt's answer, a truncated, a shuffled and a
looping answer). The manifest counts records per source and split.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from chatforge import io
from chatforge.config import nested, option
from chatforge.data.rankings import (
    MAX_K,
    automatic_rankings,
    held_out_split,
    read_prompt_pool,
    read_rankings,
    split_by_prompt,
)
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.infer.answers import measure_answer_budget
from chatforge.infer.loading import checkpoint_engine, sample_answer_texts
from chatforge.infer.params import BOUNDS
from chatforge.infer.precision import InferenceOptions


@dataclass
class Config:
    prompts: str = option("runs/speedrun/sft_data/rl_prompts.jsonl", "RLHF prompt pool with reference answers")
    ckpt: str = option("runs/speedrun/sft", "SFT checkpoint that samples the middle-ranked answers ('' = none)")
    inputs: list[str] = option([], "human ranking files (JSONL, the format above), trusted first")
    out_dir: str = option("runs/speedrun/rankings", "writes train.jsonl, val.jsonl, manifest.json here")
    max_prompts: int = option(0, "automatic rankings built for at most this many prompts of the pool (0 = all)")
    held_out_prompts: int = option(
        200, "the pool's last prompts, which PPO holds out for evaluation: their rankings go to held_out.jsonl, "
        "read only by the gold reward model (`chatforge reward --include_held_out`)", ge=0,
    )
    samples_per_prompt: int = option(2, "SFT answers per prompt (ranked below the reference, above corruptions; "
                                        "an answer that does not end within max_tokens ranks with the corruptions)")
    max_tokens: int = option(0, "longest sampled answer in tokens (0 = measured from the SFT model's answers, "
                                "the budget PPO measures the same way)", ge=0)
    temperature: float = option(1.0, "sampling temperature of the SFT answers", **BOUNDS["temperature"].field_kwargs())
    val_fraction: float = option(0.15, "share of prompts held out to measure the reward model's accuracy")
    device: str = option("auto", "device for sampling")
    inference: InferenceOptions = nested(InferenceOptions, "how sampling computes (dtype, quantize, compile)")
    seed: int = option(0, "seed for sampling, corruptions and the split")

    def validate(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"option 'val_fraction' must be in (0, 1); got {self.val_fraction}")
        if not 0 <= self.samples_per_prompt <= MAX_K - 7:
            raise ConfigError(f"option 'samples_per_prompt' must be in 0..{MAX_K - 7} so that K stays ≤ {MAX_K}")


def run(cfg: Config, args: list[str]) -> None:
    cfg.validate()
    rng = random.Random(cfg.seed)
    records = [r for path in cfg.inputs for r in read_rankings(path)]
    pool = read_prompt_pool(cfg.prompts)
    train_pool, held_out = held_out_split(pool, cfg.held_out_prompts)
    held_out_ids = {p["id"] for p in held_out}
    engine = checkpoint_engine(cfg.ckpt, cfg.device, cfg.inference) if cfg.ckpt else None
    budget = {"max_tokens": cfg.max_tokens}
    if engine and not cfg.max_tokens:  # the SFT model's own budget, on the same prompts and seed as PPO's
        budget = measure_answer_budget(engine.source, engine.tokenizer, [p["messages"] for p in train_pool], cfg.seed,
                                       inference=cfg.inference)
    chosen = pool[: cfg.max_prompts or len(pool)]
    sampled = sample_answer_texts(engine, [p["messages"] for p in chosen], cfg.samples_per_prompt,
                                  budget["max_tokens"], cfg.temperature, cfg.seed)
    fits = None
    if engine and budget["max_tokens"]:
        fits = lambda text: len(engine.tokenizer.encode(text)) < budget["max_tokens"]  # noqa: E731
    records += automatic_rankings(chosen, sampled, rng, fits)
    splits = split_by_prompt([r for r in records if r["id"] not in held_out_ids], cfg.seed, cfg.val_fraction)
    splits["held_out"] = [r for r in records if r["id"] in held_out_ids]
    if not splits["train"] or not splits["val"]:
        raise ChatforgeError(f"{len(records)} rankings are too few to hold some out; add prompts or rankings")
    out = Path(cfg.out_dir)
    manifest = {"records": len(records), "splits": {}, "sources": {}, "answer_budget": budget}
    for name, rows in splits.items():
        io.write_jsonl(out / f"{name}.jsonl", rows)
        manifest["splits"][name] = len(rows)
        for row in rows:
            manifest["sources"][row["source"]] = manifest["sources"].get(row["source"], 0) + 1
    manifest["completions_per_prompt"] = sorted({len(r["completions"]) for r in records})
    manifest["unfinished_samples"] = sum(not done for answers in sampled for _, done in answers)
    io.write_json(out / "manifest.json", manifest)
    print(json.dumps(manifest, indent=2))
