"""The rules SFT curation applies to one conversation: empty and cut-off answers, language identification,
trimming to the last assistant turn, length limits and PII scrubbing (InstructGPT's filters, in small)."""

from __future__ import annotations

import re
from collections import Counter

from chatforge.data.clean import dedup_key, scrub_pii

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
