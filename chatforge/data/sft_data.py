"""SFT curation: reading chat JSONL, the Curator (caps, common-prefix rule, de-duplication) and the splits.

The `chatforge sft-data` stage (chatforge/stages/sft_data.py) describes the inputs and rules and runs it; the
per-conversation rules are in ``sft_rules``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from chatforge import io
from chatforge.chat_template import validate_messages
from chatforge.data.sft_rules import (
    conversation_key,
    cutoff_reason,
    first_user_turn,
    fit_max_chars,
    is_empty,
    language_id,
    scrub_messages,
    trim_to_last_assistant,
)
from chatforge.errors import ChatforgeError

CATEGORIES = ("plain", "few-shot", "user-based")
LANGUAGES = ("en", "zh", "other")
SPLIT_FILES = {"train": "sft_train.jsonl", "val": "sft_val.jsonl", "rl": "rl_prompts.jsonl"}
MANIFEST = "manifest.json"
# What curation changes in a kept conversation (counted over kept conversations).
MODIFICATIONS = ("trimmed_to_last_assistant", "truncated_to_max_chars", "pii_scrubbed", "renamed_duplicate_id")
# Drop reasons in the order the rules run, so the manifest reads as the funnel.
DROP_REASONS = (
    "no_assistant_turn",
    "no_user_turn",
    "empty_assistant",
    "cut_off",
    "language",
    "too_long",
    "duplicate",
    "common_prefix",
    "user_cap",
)


@dataclass
class Conversation:
    id: str
    messages: list[dict]
    source: str
    category: str = "unknown"
    user_id: str | None = None
    origin: str = ""  # file:line, for error messages
    language: str = ""
    key: bytes = b""  # content hash: exact-duplicate key and split draw

    def record(self) -> dict:
        row = {"id": self.id, "messages": self.messages, "source": self.source, "category": self.category,
               "language": self.language}
        if self.user_id is not None:
            row["user_id"] = self.user_id
        return row


# --- reading -------------------------------------------------------------------------------------------------


def _category(value, where: str) -> str:
    if value is None:
        return "unknown"
    normal = str(value).strip().lower().replace("_", "-").replace(" ", "-")
    normal = {"fewshot": "few-shot", "userbased": "user-based"}.get(normal, normal)
    if normal not in CATEGORIES + ("unknown",):
        raise ChatforgeError(f"{where}: category {value!r} is not one of {', '.join(CATEGORIES)}")
    return normal


def _scalar_id(value, name: str, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ChatforgeError(f"{where}: '{name}' must be a string or an integer; got {value!r}")
    return str(value)


def parse_row(row: Any, where: str, default_source: str) -> Conversation:
    """One parsed JSONL row as a Conversation; anything malformed raises ChatforgeError naming ``where``."""
    if not isinstance(row, dict):
        raise ChatforgeError(f"{where}: expected a JSON object with 'messages'; got {type(row).__name__}")
    if "messages" not in row:
        raise ChatforgeError(f"{where}: no 'messages' list")
    try:
        validate_messages(row["messages"])
    except ChatforgeError as exc:
        raise ChatforgeError(f"{where}: {exc}") from None
    source = row.get("source", default_source)
    if not isinstance(source, str) or not source:
        raise ChatforgeError(f"{where}: 'source' must be a non-empty string; got {source!r}")
    return Conversation(
        id=_scalar_id(row.get("id"), "id", where) or where,
        messages=[{"role": m["role"], "content": m["content"]} for m in row["messages"]],
        source=source,
        category=_category(row.get("category"), where),
        user_id=_scalar_id(row.get("user_id"), "user_id", where),
        origin=where,
    )


def read_conversations(path: str | Path, default_source: str) -> Iterator[Conversation]:
    """The conversations of a JSONL file, in order; blank lines are skipped."""
    for number, row in io.read_jsonl(path, "chat file"):
        yield parse_row(row, f"{path}:{number}", default_source)


# --- curation ------------------------------------------------------------------------------------------------


@dataclass
class Curator:
    """Applies the rules to conversations one at a time, remembering what it kept; ``counts`` is the funnel."""

    cfg: Any  # the sft-data stage's options
    dropped: Counter = field(default_factory=Counter)
    cut_off: Counter = field(default_factory=Counter)
    modified: Counter = field(default_factory=Counter)
    pii: Counter = field(default_factory=Counter)
    kept: list[Conversation] = field(default_factory=list)
    _keys: set = field(default_factory=set)
    _prefixes: set = field(default_factory=set)
    _per_user: Counter = field(default_factory=Counter)
    _ids: set = field(default_factory=set)

    @property
    def full(self) -> bool:
        return 0 < self.cfg.max_conversations <= len(self.kept)

    def add(self, conv: Conversation) -> str | None:
        """Keep ``conv`` (returns None) or return the rule that dropped it; every outcome is counted."""
        reason = self._check(conv)
        if reason:
            self.dropped[reason] += 1
        return reason

    def _check(self, conv: Conversation) -> str | None:
        cfg = self.cfg
        changes: Counter = Counter()  # counted in ``modified`` only if the conversation is kept
        messages = trim_to_last_assistant(conv.messages)
        if not messages:
            return "no_assistant_turn"
        changes["trimmed_to_last_assistant"] = len(messages) < len(conv.messages)
        if first_user_turn(messages) is None:
            return "no_user_turn"
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        if any(map(is_empty, answers)):
            return "empty_assistant"
        for answer in answers:
            why = cutoff_reason(answer, cfg.cutoff_min_chars)
            if why:
                self.cut_off[why] += 1
                return "cut_off"
        prompts = "\n".join(m["content"] for m in messages if m["role"] != "assistant")
        conv.language = language_id("\n".join(answers), fallback=prompts)
        if conv.language not in cfg.languages:
            return "language"
        # Fitted before scrubbing too, so no time goes into scrubbing turns that are cut anyway; again after,
        # as a placeholder can be longer than what it replaced.
        scrubbed, pii = scrub_messages(fit_max_chars(messages, cfg.max_chars))
        fitted = fit_max_chars(scrubbed, cfg.max_chars)
        if not fitted:
            return "too_long"
        changes["truncated_to_max_chars"] = len(fitted) < len(messages)
        changes["pii_scrubbed"] = bool(pii)
        conv.messages = fitted
        conv.key = conversation_key(fitted)
        if conv.key in self._keys:
            return "duplicate"
        self._keys.add(conv.key)
        prefix = first_user_turn(fitted)[: cfg.prefix_chars]
        if prefix in self._prefixes:
            return "common_prefix"
        if conv.user_id is not None and self._per_user[conv.user_id] >= cfg.max_per_user:
            return "user_cap"
        self._prefixes.add(prefix)
        if conv.user_id is not None:
            self._per_user[conv.user_id] += 1
        changes["renamed_duplicate_id"] = conv.id in self._ids
        if changes["renamed_duplicate_id"]:
            conv.id = f"{conv.id}@{conv.origin}"
        self._ids.add(conv.id)
        self.modified.update(changes)
        self.pii.update(pii)
        self.kept.append(conv)
        return None

    def counts(self) -> dict:
        return {
            "kept": len(self.kept),
            "dropped": {reason: self.dropped[reason] for reason in DROP_REASONS},
            "cut_off_by": dict(sorted(self.cut_off.items())),
            "modified": {name: self.modified[name] for name in MODIFICATIONS},
            "pii_by_kind": dict(sorted(self.pii.items())),
        }


# --- splits and outputs --------------------------------------------------------------------------------------


def split_draw(key: bytes, seed: int) -> float:
    """A uniform number in [0, 1) from the conversation's content hash and the seed."""
    digest = hashlib.blake2b(key, digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2**64


def rl_prompt(conv: Conversation, history_chars: int) -> dict:
    """The conversation up to one of its assistant answers, which becomes the held-out reference: the latest
    answer whose history (every message before it) has at most ``history_chars`` characters, else the first
    answer; with ``history_chars`` 0 always the last one.

    The policy and the reward model read only their context's last tokens; a prompt longer than that leaves
    them judging answers to a question they cannot see, so the shorter exchanges make the better RL prompts."""
    messages = conv.messages
    answers = [i for i, m in enumerate(messages)
               if m["role"] == "assistant" and any(q["role"] == "user" for q in messages[:i])]
    fitting = [i for i in answers if sum(len(m["content"]) for m in messages[:i]) <= history_chars]
    cut = (fitting or answers[:1])[-1] if history_chars else answers[-1]
    row = conv.record()
    row["messages"], row["reference"] = messages[:cut], messages[cut]["content"]
    return row


def split(kept: list[Conversation], cfg) -> dict[str, list[dict]]:
    """Conversations ranked by their hash draw: the lowest ``val_fraction`` go to val, the next
    ``rl_fraction`` to the RLHF prompt pool, the rest to train (at least one each for a non-zero fraction).

    A conversation's place depends on its content and the seed, not on input order, so the splits are
    disjoint and the same on every run over the same data; adding data moves only conversations near the
    boundaries. Each split keeps the input order.
    """
    n = len(kept)
    sizes = {name: max(1, round(n * fraction)) if fraction else 0
             for name, fraction in (("val", cfg.val_fraction), ("rl", cfg.rl_fraction))}
    if sizes["val"] + sizes["rl"] >= n:
        raise ChatforgeError(f"only {n} conversations kept: too few for the val and RL splits "
                             f"({sizes['val']} + {sizes['rl']}) and a training split; add data or lower the fractions")
    ranked = sorted(range(n), key=lambda i: (split_draw(kept[i].key, cfg.seed), i))
    name_of = {i: "val" for i in ranked[: sizes["val"]]}
    name_of.update({i: "rl" for i in ranked[sizes["val"] : sizes["val"] + sizes["rl"]]})
    out: dict[str, list[dict]] = {name: [] for name in SPLIT_FILES}
    for i, conv in enumerate(kept):
        name = name_of.get(i, "train")
        out[name].append(rl_prompt(conv, cfg.rl_history_chars) if name == "rl" else conv.record())
    return out


def input_files(cfg) -> list[tuple[Path, str]]:
    """(path, default source) of every input, in reading order: user files, feedback, hold-out."""
    files = [(Path(p), "user") for p in cfg.inputs] + [(Path(p), "feedback") for p in cfg.feedback]
    if cfg.holdout:
        files.append((Path(cfg.holdout), "sharegpt"))
    if not files:
        raise ChatforgeError("no inputs: give --holdout, --inputs or --feedback")
    missing = [str(path) for path, _ in files if not path.is_file()]
    if missing:
        holdout_missing = bool(cfg.holdout) and str(Path(cfg.holdout)) in missing
        hint = " (run `chatforge data` first, or pass --holdout='' to use only your files)" if holdout_missing else ""
        raise ChatforgeError(f"input file(s) not found: {', '.join(missing)}{hint}")
    return files


def curate(cfg) -> tuple[Curator, list[dict]]:
    """Read every input through a Curator until the cap; returns it and per-file statistics."""
    curator = Curator(cfg)
    stats = []
    for path, source in input_files(cfg):
        before = len(curator.kept)
        read = 0
        for conv in read_conversations(path, source):
            if curator.full:
                break
            read += 1
            curator.add(conv)
        stats.append({"path": str(path), "source": source, "read": read, "kept": len(curator.kept) - before})
    return curator, stats
