"""Reward labels from what people did with an answer (the feedback store's implicit signals), and their reader.

``chatforge feedback export --as rewards`` writes one JSON line per model answer that has signals::

    {"id", "prompt": [messages up to the question], "completion": the answer as the model wrote it,
     "reward": float in [-1, 1], "signals": [kinds], "source": "feedback", "model", "provenance"}

and ``chatforge reward --signals FILE`` trains the reward model on the rewards (pointwise, beside or instead of
rankings).

The rule (``signal_reward``): each distinct signal kind adds its weight, and the sum is clipped to [-1, 1]::

    copied +1    continued +0.5    regenerated -1    asked_again -1

Why these weights: copying is the person taking the answer to use, the strongest endorsement a page can see;
replying is weaker (a reply may be a complaint or a correction), so it counts half; asking for another answer
and re-asking the question both say this answer did not serve, as plainly as a copy says it did. Kinds count
once however often they were recorded (copying an answer ten times is not ten times the approval), and the
sum is clipped because the signals are evidence for one yes/no judgement of the answer, not a scale: copied and
continued is a clear yes (+1, not +1.5), copied then regenerated is a contradiction (0).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from chatforge import io
from chatforge.chat_template import validate_messages
from chatforge.errors import ChatforgeError

SIGNAL_WEIGHTS = {"copied": 1.0, "continued": 0.5, "regenerated": -1.0, "asked_again": -1.0}
SIGNALS = tuple(SIGNAL_WEIGHTS)


def signal_reward(kinds) -> float:
    """The reward of an answer with these signal kinds (the module docstring's rule)."""
    unknown = set(kinds) - set(SIGNAL_WEIGHTS)
    if unknown:
        raise ChatforgeError(f"unknown signal(s) {sorted(unknown)}; signals are {', '.join(SIGNALS)}")
    return max(-1.0, min(1.0, sum(SIGNAL_WEIGHTS[k] for k in set(kinds))))


def answer_key(record: dict) -> str:
    """What an answer is, for splitting rewards into training and held-out ones: a digest of its prompt and
    completion. Not its id: the feedback store's ids are random (uuid4), so a split by id put the same answers
    on other sides in every store (a rerun of the same users trained another reward model), and it held out copies
    of answers it trained on (the same answer to the same question, given in several conversations)."""
    return hashlib.sha256(json.dumps([record["prompt"], record["completion"]], sort_keys=True).encode()).hexdigest()


def _check_record(record: dict) -> None:
    validate_messages(record["prompt"])
    if record["prompt"][-1]["role"] != "user":
        raise ChatforgeError("'prompt' must end with the user's question")
    if not isinstance(record["completion"], str):
        raise ChatforgeError("'completion' must be a string")
    reward = record["reward"]
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        raise ChatforgeError(f"'reward' must be a number; got {reward!r}")
    if not -1.0 <= reward <= 1.0:
        raise ChatforgeError(f"'reward' must be within [-1, 1]; got {reward}")
    signals = record.get("signals", [])
    if not isinstance(signals, list) or not all(isinstance(s, str) and s in SIGNAL_WEIGHTS for s in signals):
        raise ChatforgeError(f"'signals' must be a list of {', '.join(SIGNALS)}; got {signals!r}")


def read_signal_rewards(path: str | Path) -> list[dict]:
    """The reward records of a JSONL file (the format above), each checked; errors name the file and line."""
    records = []
    for number, record in io.read_jsonl(path, "signal rewards file (write one with `chatforge feedback export "
                                              "--as rewards`)"):
        try:
            if not isinstance(record, dict):
                raise ChatforgeError("a line must be a JSON object")
            _check_record(record)
        except (KeyError, TypeError) as exc:
            raise ChatforgeError(f"{path}:{number}: missing field {exc}") from None
        except ChatforgeError as exc:
            raise ChatforgeError(f"{path}:{number}: {exc}") from None
        record["reward"] = float(record["reward"])
        record.setdefault("id", hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16])
        records.append(record)
    return records
