"""Curate the SFT demonstrations, the held-out SFT eval split and the RLHF prompt pool (InstructGPT-style).

Inputs, read in this order (so the conversation cap and the common-prefix rule favour your own data): user
files in the OpenAI chat format (``--inputs``), the serving layer's feedback exports (``--feedback``), then
the ShareGPT hold-out of the data stage (``--holdout``). Every line is a JSON object::

    {"id": "...", "messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...],
     "user_id": "...", "category": "plain"|"few-shot"|"user-based", "source": "..."}

where only ``messages`` is required. A line that is not JSON, has a bad role or a message without string
content stops the stage with an error naming ``file:line``.

Curation, each rule counted in ``manifest.json`` (in the order applied to a conversation):
turns after the last assistant turn are trimmed (no assistant turn, or no user turn: dropped); dropped when an
assistant turn is empty, cut off (see ``cutoff_reason``) or not in ``languages`` (see ``language_id``);
personal information scrubbed (counted by kind); later turns dropped to fit ``max_chars``; exact duplicate
conversations dropped; prompts whose first user turn starts with the same ``prefix_chars`` characters as an
earlier kept prompt dropped; at most ``max_per_user`` prompts per user id; at most ``max_conversations`` kept.

Outputs in ``out_dir``: ``sft_train.jsonl`` and ``sft_val.jsonl`` (whole conversations) and
``rl_prompts.jsonl`` ({"id", "messages" up to and excluding the last assistant answer, "reference": that
answer, ...}), disjoint by conversation, split by ranking a hash of each conversation's content and the
seed (see ``split``); and ``manifest.json`` with the counts. Each file is written atomically, the manifest last.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from chatforge import io
from chatforge.chat_template import validate_messages
from chatforge.config import ChatforgeError, ConfigError, option
from chatforge.data.clean import dedup_key, scrub_pii

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
class Config:
    holdout: str = option(
        "runs/speedrun/data/chat_holdout.jsonl", "ShareGPT hold-out written by `chatforge data` ('' = none)"
    )
    inputs: list[str] = option([], "user JSONL files in the OpenAI chat format (optional user_id, category)")
    feedback: list[str] = option([], "feedback exports of the serving layer (`chatforge feedback export --as sft`)")
    out_dir: str = option("runs/speedrun/sft_data", "writes sft_train/sft_val/rl_prompts.jsonl and manifest.json")
    max_per_user: int = option(200, "at most this many prompts per user id (InstructGPT's cap)")
    prefix_chars: int = option(
        64, "drop a prompt whose first user turn starts with the same this-many characters as a kept one"
    )
    languages: list[str] = option(["en", "zh"], "allowed languages of the assistant turns (en, zh, other)")
    cutoff_min_chars: int = option(400, "an answer this long that stops mid-sentence counts as cut off")
    max_chars: int = option(12_000, "keep at most this many characters of a conversation (whole turns)")
    max_conversations: int = option(5_000, "stop after keeping this many conversations (0 = no cap)")
    val_fraction: float = option(0.05, "share of conversations held out as sft_val", ge=0, lt=1)
    rl_fraction: float = option(0.25, "share of conversations turned into the RLHF prompt pool", ge=0, lt=1)
    seed: int = option(0, "seed of the split hash")

    def validate(self) -> None:
        for name in ("max_per_user", "prefix_chars", "cutoff_min_chars", "max_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option '{name}' must be positive; got {getattr(self, name)}")
        if self.max_conversations < 0:
            raise ConfigError(f"option 'max_conversations' must be ≥ 0; got {self.max_conversations}")
        unknown = [lang for lang in self.languages if lang not in LANGUAGES]
        if unknown or not self.languages:
            raise ConfigError(f"option 'languages' takes some of {', '.join(LANGUAGES)}; got {self.languages}")
        for name in ("val_fraction", "rl_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"option '{name}' must be in [0, 1); got {getattr(self, name)}")
        if self.val_fraction + self.rl_fraction >= 1:
            raise ConfigError("options 'val_fraction' + 'rl_fraction' must leave some conversations for training")


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


def parse_line(line: str, where: str, default_source: str) -> Conversation:
    """One JSONL line as a Conversation; anything malformed raises ChatforgeError naming ``where``."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ChatforgeError(f"{where}: not valid JSON ({exc.msg})") from None
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
    for number, line in io.read_lines(path, "chat file"):
        yield parse_line(line, f"{path}:{number}", default_source)


# --- rules ---------------------------------------------------------------------------------------------------

_ZERO_WIDTH = "\u200b\u200c\u200d\u2060\ufeff"


def is_empty(text: str) -> bool:
    """Blank, zero-width characters only, or only an ellipsis (a placeholder some chat exports leave)."""
    return not text.strip().strip(_ZERO_WIDTH).strip().strip(".…").strip()


# Bracketed markers that tools and exports put where they cut text, looked for near the end of an answer.
TRUNCATION_MARKERS = ("[truncated", "(truncated", "<truncated", "truncated]", "truncated)", "[continued", "(continued",
                      "[cut off", "(cut off", "[output cut", "[message cut")
# Error messages of the ChatGPT web UI that ShareGPT captured in place of an answer (they open the turn).
ERROR_OPENINGS = ("too many requests in 1 hour", "an error occurred. if this issue persists", "network error",
                  "only one message at a time", "something went wrong. if this issue persists")
_SENTENCE_END = ".!?。！？…"
_CLOSERS = "\"'”’」』）)]}>*`|~_"  # quotes, brackets, markdown/HTML/table closers after a finished sentence
# A final word or character that cannot end an English sentence: the answer stopped in the middle of one.
_DANGLING_WORDS = frozenset(
    "a an the of to and or but with for in on at by from into that which who whose is are was were be can will "
    "would should could may might your our their its this these those as than like such".split()
)
_DANGLING_CHARS = ",:;(-–—/\\&=+[{，：；、（"
_LIST_MARKER = re.compile(r"^\s*(?:[-*+•]|\d+[.)]|#+|>)\s*")
# A last line up to this long may be a heading, a name or a table cell without a full stop; a list item
# (after its marker) may be longer: "10. Mongolian English Immersion and Cultural Exchange Center".
SHORT_LAST_LINE = 40
SHORT_LIST_ITEM = 70


def cutoff_reason(text: str, min_chars: int = 400) -> str | None:
    """Why an assistant answer looks cut off ("marker", "error_message", "open_code_block", "mid_sentence"),
    or None.

    The heuristic, in order:
    - a truncation marker ("[truncated]", "(continued ...") in the last 200 characters, or a ChatGPT UI error
      message ("Too many requests in 1 hour...", "network error") opening the answer;
    - an answer of at least ``min_chars`` characters (short answers like "Paris" or "Sure thing" are complete
      without punctuation) whose text, zero-width characters stripped, ends
      - inside a code block (an odd number of ``` fences) and not with a sentence end, or
      - with a character or word that cannot end a sentence (",", ":", "(", "and", "the", "of", ...), or
      - with a letter or digit on a last line longer than ``SHORT_LAST_LINE`` characters, or
        ``SHORT_LIST_ITEM`` for a list item after its marker (so "- Retailer.cs", a heading or a signature
        "Jane Doe" still count as finished).
    It misses cut-offs that happen to land right after a full stop, and flags the rare long answer that
    deliberately ends without punctuation on a long line (a bare URL, a long list item).
    """
    if any(marker in text[-200:].lower() for marker in TRUNCATION_MARKERS):
        return "marker"
    if text.lstrip(" \n!" + _ZERO_WIDTH).lower().startswith(ERROR_OPENINGS):
        return "error_message"
    body = text.strip().strip(_ZERO_WIDTH).rstrip()
    if len(body) < min_chars:
        return None
    if body.count("```") % 2 and body[-1] not in _SENTENCE_END:
        return "open_code_block"
    last_word = re.split(r"\s+", body)[-1].lower()
    if body[-1] in _DANGLING_CHARS or last_word in _DANGLING_WORDS:
        return "mid_sentence"
    if body[-1] in _SENTENCE_END or body[-1] in _CLOSERS or not body[-1].isalnum():
        return None
    last_line = body.rsplit("\n", 1)[-1]
    item = _LIST_MARKER.sub("", last_line)
    limit = SHORT_LIST_ITEM if len(item) < len(last_line) else SHORT_LAST_LINE
    return "mid_sentence" if len(item) > limit else None


_CODE_BLOCK = re.compile(r"```.*?(?:```|\Z)", re.S)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
_KANA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9d]")
_LATIN = "A-Za-z\u00c0-\u024f\u1e00-\u1eff"
_LATIN_WORD = re.compile(rf"[{_LATIN}]+(?:'[A-Za-z]+)?")
# Runs of letters of any other script (Cyrillic, Arabic, Hangul, Devanagari, Thai...).
_OTHER_WORD = re.compile(
    rf"(?:(?![{_LATIN}\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9d"
    r"\U00020000-\U0002fa1f])[^\W\d_])+"
)
# Frequent function words of English, and of the commonest other Latin-script languages (Spanish, French,
# Portuguese, Italian, German, Dutch, Scandinavian, Polish, Turkish, Indonesian/Malay, Vietnamese, romanised
# Hindi). Words that are also English words, names or tech terms ("die", "per", "non", "os", "com", "del",
# "mit", "jest", "los", "el", "et", "est", "es", "la", "dan") are left out of the second list.
_ENGLISH_WORDS = frozenset(
    "the of and to is that for it with as be by this are from at which but not have has you your can they we "
    "their there what when would should these more also been were its our how about than then into such may "
    "all any each some it's i'm don't here".split()
)
_FOREIGN_WORDS = frozenset(
    "de que por una para les des une pas dans sur avec qui sont nous vous und der das ist nicht ein eine zu "
    "von auf für ich wir sie het een niet zijn il che della sono uma não och att det är som jeg ikke nie się "
    "że bir için ile yang untuk dengan itu saya tidak và của là các có những hai nahi kya hain".split()
)
MIN_HAN_SHARE = 0.3  # of script units: a Han character counts as one unit, like a word of another script


def language_id(text: str, fallback: str = "") -> str:
    """"en", "zh" or "other" from the scripts of the text, code blocks and inline code removed.

    Each Han or kana character counts as one unit, each word of another script as one unit. Chinese: Han
    characters make at least ``MIN_HAN_SHARE`` of the units and kana (Japanese) under a quarter of the CJK
    characters. English: Latin-script words are the majority, and frequent English function words are at
    least twice as many as frequent function words of other Latin-script languages (Spanish "que", German
    "und", Malay "yang"...). Anything else is "other". Text without letters (only code, numbers or
    symbols) is judged by ``fallback`` (e.g. the user turns) when given, else "other".

    Limits: it tells scripts apart, and English from the commonest Latin-script languages by a few dozen
    function words, not languages in general: Cantonese or classical Chinese count as "zh"; a Latin-script
    language not in the word list, or a short text with none of the listed words ("Gracias", a list of
    Spanish nouns), counts as English; mixed-language answers go by the majority.
    """
    prose = _INLINE_CODE.sub(" ", _CODE_BLOCK.sub(" ", text))
    han = len(_HAN.findall(prose))
    kana = len(_KANA.findall(prose))
    latin = _LATIN_WORD.findall(prose)
    units = han + kana + len(latin) + len(_OTHER_WORD.findall(prose))
    if units == 0:
        return language_id(fallback) if fallback else "other"
    if han / units >= MIN_HAN_SHARE and kana < 0.25 * (han + kana):
        return "zh"
    if len(latin) * 2 <= units:
        return "other"
    words = Counter(word.lower() for word in latin)
    english = sum(n for word, n in words.items() if word in _ENGLISH_WORDS)
    foreign = sum(n for word, n in words.items() if word in _FOREIGN_WORDS)
    return "en" if english >= 2 * foreign else "other"


def trim_to_last_assistant(messages: list[dict]) -> list[dict]:
    """The conversation up to and including its last assistant turn (empty if it has none)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    return messages[: last + 1]


def fit_max_chars(messages: list[dict], max_chars: int) -> list[dict]:
    """The longest run of leading turns ending in an assistant turn with at most ``max_chars`` characters of
    content (empty if even the first exchange is longer)."""
    total, end = 0, 0
    for i, message in enumerate(messages):
        total += len(message["content"])
        if total > max_chars:
            break
        if message["role"] == "assistant":
            end = i + 1
    return messages[:end]


def conversation_key(messages: list[dict]) -> bytes:
    """Same key for the same conversation (case and runs of whitespace ignored)."""
    return dedup_key("\x00".join(f"{m['role']}\x01{m['content']}" for m in messages))


def first_user_turn(messages: list[dict]) -> str | None:
    return next((m["content"] for m in messages if m["role"] == "user"), None)


def scrub_messages(messages: list[dict]) -> tuple[list[dict], Counter]:
    """Every turn with personal information replaced by placeholders, and the replacements by kind."""
    scrubbed, found = [], Counter()
    for message in messages:
        text, counts = scrub_pii(message["content"])
        found.update(counts)
        scrubbed.append({"role": message["role"], "content": text})
    return scrubbed, found


# --- curation ------------------------------------------------------------------------------------------------


@dataclass
class Curator:
    """Applies the rules to conversations one at a time, remembering what it kept; ``counts`` is the funnel."""

    cfg: Config
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


def rl_prompt(conv: Conversation) -> dict:
    """The conversation up to its last assistant answer, which becomes the held-out reference."""
    row = conv.record()
    row["messages"], row["reference"] = conv.messages[:-1], conv.messages[-1]["content"]
    return row


def split(kept: list[Conversation], cfg: Config) -> dict[str, list[dict]]:
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
        out[name].append(rl_prompt(conv) if name == "rl" else conv.record())
    return out


def input_files(cfg: Config) -> list[tuple[Path, str]]:
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


def curate(cfg: Config) -> tuple[Curator, list[dict]]:
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


def run(cfg: Config, args: list[str]) -> None:
    start = time.perf_counter()
    curator, inputs = curate(cfg)
    if not curator.kept:
        raise ChatforgeError(f"no conversation survived curation: {curator.counts()['dropped']}")
    splits = split(curator.kept, cfg)
    out = Path(cfg.out_dir)
    files = {}
    for name, rows in splits.items():
        path = out / SPLIT_FILES[name]
        io.write_jsonl(path, rows)
        files[SPLIT_FILES[name]] = {"rows": len(rows), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    manifest = {
        "inputs": inputs,
        "stopped_at_cap": curator.full,
        "counts": curator.counts(),
        "files": files,
        "by_source": dict(Counter(c.source for c in curator.kept).most_common()),
        "by_category": dict(Counter(c.category for c in curator.kept).most_common()),
        "by_language": dict(Counter(c.language for c in curator.kept).most_common()),
        "seconds": round(time.perf_counter() - start, 3),
        "config": asdict(cfg),
    }
    io.write_json(out / MANIFEST, manifest)
    counts = manifest["counts"]
    dropped = ", ".join(f"{k} {v}" for k, v in counts["dropped"].items() if v)
    print(f"sft-data: read {sum(i['read'] for i in inputs)}, kept {counts['kept']} "
          f"(train {files[SPLIT_FILES['train']]['rows']}, val {files[SPLIT_FILES['val']]['rows']}, "
          f"rl prompts {files[SPLIT_FILES['rl']]['rows']}); dropped: {dropped or 'none'}; "
          f"{manifest['seconds']:.1f}s -> {out}")
