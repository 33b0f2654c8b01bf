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

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from chatforge import io
from chatforge.chat_template import prompt_ids, validate_messages
from chatforge.config import ChatforgeError, ConfigError, option
from chatforge.train.preference import normalize_ranking

MIN_K, MAX_K = 4, 9


@dataclass
class Config:
    prompts: str = option("runs/speedrun/sft_data/rl_prompts.jsonl", "RLHF prompt pool with reference answers")
    ckpt: str = option("runs/speedrun/sft", "SFT checkpoint that samples the middle-ranked answers ('' = none)")
    inputs: list[str] = option([], "human ranking files (JSONL, the format above), trusted first")
    out_dir: str = option("runs/speedrun/rankings", "writes train.jsonl, val.jsonl, manifest.json here")
    max_prompts: int = option(400, "automatic rankings built for at most this many prompts")
    samples_per_prompt: int = option(2, "SFT answers per prompt (ranked below the reference, above corruptions)")
    max_tokens: int = option(64, "longest sampled answer in tokens")
    temperature: float = option(1.0, "sampling temperature of the SFT answers", ge=0)
    val_fraction: float = option(0.15, "share of prompts held out to measure the reward model's accuracy")
    device: str = option("auto", "device for sampling")
    seed: int = option(0, "seed for sampling, corruptions and the split")

    def validate(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"option 'val_fraction' must be in (0, 1); got {self.val_fraction}")
        if not 0 <= self.samples_per_prompt <= MAX_K - 5:
            raise ConfigError(f"option 'samples_per_prompt' must be in 0..{MAX_K - 5} so that K stays ≤ {MAX_K}")


def read_rankings(path: str | Path, source: str = "human") -> list[dict]:
    """Ranking records of a JSONL file, each checked; errors name the file and line."""
    records = []
    for number, record in io.read_jsonl(path, "rankings file"):
        where = f"{path}:{number}"
        try:
            validate_messages(record["prompt"])
            completions = record["completions"]
            if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
                raise ChatforgeError("'completions' must be a list of strings")
            if not MIN_K <= len(completions) <= MAX_K:
                raise ChatforgeError(f"{len(completions)} completions; a ranking needs {MIN_K} to {MAX_K}")
            record["ranking"] = normalize_ranking(record["ranking"], len(completions))
        except (KeyError, TypeError) as exc:
            raise ChatforgeError(f"{where}: missing field {exc}") from None
        except ChatforgeError as exc:
            raise ChatforgeError(f"{where}: {exc}") from None
        record.setdefault("source", source)
        record.setdefault("id", hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16])
        records.append(record)
    return records


def corruptions(answer: str, other_answer: str, rng: random.Random) -> list[str]:
    """Answers worse than any honest attempt: off-topic, cut off, word salad, stuck in a loop."""
    words = answer.split()
    shuffled = words[:]
    rng.shuffle(shuffled)
    first_sentence = " ".join(words[: max(3, len(words) // 6)])
    return [
        other_answer,
        " ".join(words[: max(1, len(words) // 3)]),
        " ".join(shuffled),
        " ".join([first_sentence] * 4),
    ]


def automatic_rankings(pool: list[dict], sample_answers, rng: random.Random) -> list[dict]:
    """Reference > SFT samples > corruptions, for each prompt of the pool.

    ``sample_answers(prompts) -> list[list[str]]`` gives the SFT model's answers (empty lists without one).
    """
    sampled = sample_answers([p["messages"] for p in pool])
    records = []
    for i, (item, samples) in enumerate(zip(pool, sampled)):
        other = pool[(i + 1 + rng.randrange(len(pool) - 1)) % len(pool)]["reference"] if len(pool) > 1 else "I don't know."
        bad = corruptions(item["reference"], other, rng)
        completions = [item["reference"], *samples, *bad]
        tiers = [[0], list(range(1, 1 + len(samples))), list(range(1 + len(samples), len(completions)))]
        records.append({"id": item["id"], "prompt": item["messages"], "completions": completions,
                        "ranking": [t for t in tiers if t], "source": "auto"})
    return records


def read_prompt_pool(path: str | Path) -> list[dict]:
    """The RLHF prompt pool: {"id", "messages" (ending in a user turn), "reference" (held-out answer)}."""
    pool = []
    for number, item in io.read_jsonl(path, "prompt pool (run `chatforge sft-data` first)"):
        try:
            validate_messages(item["messages"])
        except (KeyError, TypeError, ChatforgeError) as exc:
            raise ChatforgeError(f"{path}:{number}: not a prompt record with 'messages' ({exc})") from None
        if not isinstance(item.get("reference"), str) or not item["reference"].strip():
            raise ChatforgeError(f"{path}:{number}: prompt has no 'reference' answer")
        pool.append(item)
    if not pool:
        raise ChatforgeError(f"{path} holds no prompts")
    return pool


def _sampler(cfg: Config):
    if not cfg.ckpt or not cfg.samples_per_prompt:
        return lambda prompts: [[] for _ in prompts]
    from chatforge.infer.loading import EngineOptions, load_engine
    from chatforge.infer.params import SamplingParams

    engine = load_engine(EngineOptions(ckpt=cfg.ckpt, device=cfg.device))
    # the full distribution: no top-k/top-p, so the samples are what the policy really says
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, n=cfg.samples_per_prompt,
                            seed=cfg.seed, truncate=True)

    def sample(prompts: list[list[dict]]) -> list[list[str]]:
        ids = [prompt_ids(m, engine.tokenizer) for m in prompts]
        return [[c.text.strip() for c in out.choices] for out in engine.generate(ids, params)]

    return sample


def _split(record_id: str, seed: int, val_fraction: float) -> str:
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def run(cfg: Config, args: list[str]) -> None:
    cfg.validate()
    rng = random.Random(cfg.seed)
    records = [r for path in cfg.inputs for r in read_rankings(path)]
    pool = read_prompt_pool(cfg.prompts)[: cfg.max_prompts]
    records += automatic_rankings(pool, _sampler(cfg), rng)
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    for record in records:
        splits[_split(record["id"], cfg.seed, cfg.val_fraction)].append(record)
    if not splits["train"] or not splits["val"]:
        raise ChatforgeError(f"{len(records)} rankings are too few to hold some out; add prompts or rankings")
    out = Path(cfg.out_dir)
    manifest = {"records": len(records), "splits": {}, "sources": {}}
    for name, rows in splits.items():
        io.write_jsonl(out / f"{name}.jsonl", rows)
        manifest["splits"][name] = len(rows)
        for row in rows:
            manifest["sources"][row["source"]] = manifest["sources"].get(row["source"], 0) + 1
    manifest["completions_per_prompt"] = sorted({len(r["completions"]) for r in records})
    io.write_json(out / "manifest.json", manifest)
    print(json.dumps(manifest, indent=2))
