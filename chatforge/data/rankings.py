"""The ranking data format (K completions per prompt, tiers best first, K in [MIN_K, MAX_K]), its reader and the
automatic builder (reference > sampled > corrupted). The `chatforge rankings` stage writes the files.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Callable

from chatforge import io
from chatforge.chat_template import validate_messages
from chatforge.errors import ChatforgeError

MIN_K, MAX_K = 4, 9


def normalize_ranking(ranking: list, num_responses: int) -> list[list[int]]:
    """Tiers from either a flat best-first list of indices or a list of tiers; checks every index once."""
    tiers = [[r] if isinstance(r, int) else list(r) for r in ranking]
    seen = [i for tier in tiers for i in tier]
    if any(not isinstance(i, int) or not 0 <= i < num_responses for i in seen):
        raise ChatforgeError(f"ranking {ranking} names a response outside 0..{num_responses - 1}")
    if len(seen) != len(set(seen)):
        raise ChatforgeError(f"ranking {ranking} names a response twice")
    tiers = [t for t in tiers if t]
    if len(tiers) < 2:
        raise ChatforgeError(f"ranking {ranking} orders nothing: it needs at least two tiers")
    return tiers


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


def concise(reference: str, fits: Callable[[str], bool]) -> str | None:
    """The reference's longest run of whole first sentences that ``fits`` the answer budget, when that is
    shorter than the reference: a finished, on-topic answer of the length the policy can give."""
    sentences = re.split(r"(?<=[.!?:])\s+", reference.strip())
    kept = ""
    for sentence in sentences[:-1]:
        candidate = f"{kept} {sentence}".strip()
        if not fits(candidate):
            break
        kept = candidate
    return kept or None


def automatic_rankings(pool: list[dict], sampled: list[list[tuple[str, bool]]], rng: random.Random,
                       fits: Callable[[str], bool] | None = None) -> list[dict]:
    """Reference > its concise form > finished SFT samples > corruptions, the SFT model's answer to another prompt
    and unfinished SFT samples, for each prompt of the pool.

    The concise form (whole first sentences of the reference that ``fits`` the answer budget, when ``fits`` is
    given and the reference is longer) shows the reward model short answers that are good, so a short answer is
    judged by what it says, not only by how little it risks.

    ``sampled[i]`` holds the SFT model's answers to prompt i and whether each ended with <|end|> inside its token
    budget, as (text, finished) pairs (empty lists without a model). An unfinished answer ranks with
    the corruptions: the same rule PPO applies when it takes ``unfinished_penalty`` off such a rollout.
    """
    records = []
    for i, (item, samples) in enumerate(zip(pool, sampled)):
        j = (i + 1 + rng.randrange(len(pool) - 1)) % len(pool) if len(pool) > 1 else i
        other = pool[j]["reference"] if j != i else "I don't know."
        # the model's own answer to another question: fluent, in the policy's style and off topic, so the
        # reward model must judge what an answer says about this question rather than who wrote it
        off_topic = [sampled[j][0][0]] if j != i and sampled[j] else []
        finished = [text for text, done in samples if done]
        bad = corruptions(item["reference"], other, rng) + off_topic + [text for text, done in samples if not done]
        short = [c for c in [concise(item["reference"], fits)] if c] if fits else []
        completions = [item["reference"], *short, *finished, *bad]
        good = 1 + len(short) + len(finished)
        tiers = [[0], list(range(1, 1 + len(short))), list(range(1 + len(short), good))]
        tiers.append(list(range(good, len(completions))))
        records.append(
            {
                "id": item["id"],
                "prompt": item["messages"],
                "completions": completions,
                "ranking": [t for t in tiers if t],
                "source": "auto",
            }
        )
    return records


def held_out_split(pool: list[dict], held_out: int) -> tuple[list[dict], list[dict]]:
    """(prompts to train on, prompts held out for judging): the pool's last ``held_out`` prompts are held out, by
    PPO, by the proxy reward model's rankings and by `eval rlhf` alike."""
    return pool[: len(pool) - held_out], pool[len(pool) - held_out :]


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


def prompt_key(record: dict) -> str:
    """What a ranking is about, for splitting rankings into training and validation ones: a digest of its prompt.
    Not its id: rankings exported from the feedback store carry its random ids (uuid4), so a split by id moved the
    same rankings between the sides in every export, and two rankings of one question (two users, or one user
    twice) could sit on both sides, the validation accuracy then measuring answers the model trained on."""
    return hashlib.sha256(json.dumps(record["prompt"], sort_keys=True).encode()).hexdigest()


def split_score(key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by ``key`` and ``seed``: below the validation fraction means validation."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(record_id: str, seed: int, val_fraction: float) -> str:
    return "val" if split_score(record_id, seed) < val_fraction else "train"


def split_by_prompt(records: list[dict], seed: int, val_fraction: float) -> dict[str, list[dict]]:
    """Rankings into "train" and "val" by ``prompt_key``, so every ranking of a question sits on one side. When
    the hash leaves a side empty and there are two questions or more, the question that scored nearest to the
    other side moves there: a few dozen rankings (a small feedback export) still give a validation set."""
    scores = {key: split_score(key, seed) for key in {prompt_key(r) for r in records}}
    val_keys = {key for key, score in scores.items() if score < val_fraction}
    if len(scores) > 1 and not val_keys:
        val_keys = {min(scores, key=scores.get)}
    elif len(scores) > 1 and len(val_keys) == len(scores):
        val_keys.remove(max(scores, key=scores.get))
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    for record in records:
        splits["val" if prompt_key(record) in val_keys else "train"].append(record)
    return splits
