"""Document filters: Unicode/control-character normalisation, PII scrubbing, the Codex code filters,
exact and MinHash near-duplicate detection.

Every function here is pure (text in, text or verdict out) so the pipeline can count what each one did and
the Codex stage can reuse ``codex_filter_reason`` on its own files.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import unicodedata
from collections import Counter

import numpy as np
from datasketch import MinHash, MinHashLSH

# --- Unicode and control characters -------------------------------------------------------------------------

# C0/C1 controls except \t and \n (\r is turned into \n first), plus the byte-order mark left by some editors.
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")


def normalize_unicode(text: str) -> str:
    """Unicode NFC, so the same visible text always has the same code points (and the same hash)."""
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def strip_control_chars(text: str) -> tuple[str, int]:
    """Remove control characters, keeping ``\\n`` and ``\\t``; returns (text, how many characters were removed).

    Windows and old-Mac line ends become ``\\n`` rather than disappearing, so lines are not glued together.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    cleaned, removed = _CONTROL_CHARS.subn("", text)
    return cleaned, removed


# --- PII -----------------------------------------------------------------------------------------------------

PII_PLACEHOLDERS = {"KEY": "<KEY>", "EMAIL": "<EMAIL>", "IP": "<IP>", "PHONE": "<PHONE>"}

_KEY_PATTERNS = [
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S),
    # Vendor prefixes: OpenAI, AWS access key id, GitHub tokens, Slack tokens, Google API keys.
    re.compile(r"(?<![\w-])sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}"),
    re.compile(r"(?<![A-Za-z0-9])AKIA[0-9A-Z]{16}(?![A-Za-z0-9])"),
    re.compile(r"(?<![A-Za-z0-9])gh[pousr]_[A-Za-z0-9]{30,}"),
    re.compile(r"(?<![A-Za-z0-9])xox[abprs]-[A-Za-z0-9-]{10,}"),
    re.compile(r"(?<![A-Za-z0-9])AIza[0-9A-Za-z_-]{35}"),
]
# A long hex/base64 string only counts as a secret next to a name that says so (``api_key = "..."``,
# ``Authorization: Bearer ...``): on its own it is far more often a checksum, a test vector or a git hash,
# and stdlib code is full of those.
_CONTEXT_SECRET = re.compile(
    r"""(?ix)
    (?P<name>\b[\w-]*(?:api[_-]?key|secret|token|passw(?:or)?d|access[_-]?key|private[_-]?key|auth)[\w-]*
        ["']?\s*[:=]\s*["']?
      | \bbearer\s+)
    (?P<value>[A-Za-z0-9+/_.=-]{16,})
    (?![\w(])
    """
)
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}(?![\w(@-])")
_IPV4 = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w]|\.\d)"
)
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# Separators are required (a bare run of digits is a number, not a phone), and spaces as separators only
# after a +country code or a (area code), since "1024 2048 4096" is a row of numbers.
_PHONE = re.compile(
    r"""(?x)(?<![\w.+-])
    (?: \+\d{1,3}[ .-]?(?:\(\d{1,4}\)|\d{1,4})(?:[ .-]\d{2,4}){2,3}
      | \(\d{3}\)\ ?\d{3}[ .-]\d{4}
      | \d{3}([.-])\d{3}\1\d{4}
    )(?![\w-]|\.\d)"""
)


def _is_secret_value(value: str) -> bool:
    # Identifiers and words ("token = tokenize_line") have no digits; real keys nearly always mix both.
    return any(c.isdigit() for c in value) and any(c.isalpha() for c in value)


def _is_public_ip(candidate: str, min_groups: int = 0) -> bool:
    # Loopback, private and documentation ranges (127.0.0.1, 10.x, 192.168.x, 2001:db8::) identify nobody
    # and are everywhere in ordinary code, so only globally routable addresses count as PII.
    if min_groups and sum(1 for group in candidate.split(":") if group) < min_groups:
        return False  # "a[::2]" and "1:2:3" are slices and times, not addresses
    try:
        return ipaddress.ip_address(candidate).is_global
    except ValueError:
        return False


def scrub_pii(text: str) -> tuple[str, Counter]:
    """Replace e-mail addresses, phone numbers, public IPv4/IPv6 addresses and API keys/secrets by placeholders.

    Returns the scrubbed text and a Counter of replacements by kind (KEY, EMAIL, IP, PHONE).
    """
    counts: Counter = Counter()

    def replace_all(pattern: re.Pattern, kind: str, text: str, accept=lambda m: True) -> str:
        def substitute(match: re.Match) -> str:
            if not accept(match):
                return match.group(0)
            counts[kind] += 1
            return PII_PLACEHOLDERS[kind]

        return pattern.sub(substitute, text)

    # Keys go first so their digits are not half-eaten by the phone rule; IPs before phones for the same reason.
    for pattern in _KEY_PATTERNS:
        text = replace_all(pattern, "KEY", text)
    text = _replace_context_secrets(text, counts)
    if "@" in text:
        text = replace_all(_EMAIL, "EMAIL", text)
    text = replace_all(_IPV4, "IP", text, lambda m: _is_public_ip(m.group(0)))
    if "::" in text or text.count(":") >= 7:
        text = replace_all(_IPV6, "IP", text, lambda m: _is_public_ip(m.group(0), min_groups=3))
    text = replace_all(_PHONE, "PHONE", text, lambda m: 9 <= sum(c.isdigit() for c in m.group(0)) <= 15)
    return text, counts


def _replace_context_secrets(text: str, counts: Counter) -> str:
    def substitute(match: re.Match) -> str:
        if not _is_secret_value(match.group("value")):
            return match.group(0)
        counts["KEY"] += 1
        return match.group("name") + PII_PLACEHOLDERS["KEY"]

    return _CONTEXT_SECRET.sub(substitute, text)


# --- Codex filters for code ----------------------------------------------------------------------------------

AUTOGENERATED_MARKERS = ("auto-generated", "autogenerated", "automatically generated", "do not edit", "generated by")


def codex_filter_reason(
    text: str,
    *,
    max_bytes: int = 1_000_000,
    max_mean_line_length: float = 100,
    max_line_length: int = 1000,
    min_alnum_fraction: float = 0.25,
    header_lines: int = 10,
) -> str | None:
    """Name of the first Codex-paper rule a code file fails, or None if it passes.

    The rules (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): files over ``max_bytes``
    ("too_large"), likely auto-generated by a marker in the first ``header_lines`` lines ("auto_generated"),
    any line longer than ``max_line_length`` ("max_line_length"), mean line length over
    ``max_mean_line_length`` ("mean_line_length"), or alphanumeric share under ``min_alnum_fraction``
    ("low_alphanumeric").
    """
    if len(text.encode("utf-8")) > max_bytes:
        return "too_large"
    lines = text.splitlines() or [""]
    header = "\n".join(lines[:header_lines]).lower()
    if any(marker in header for marker in AUTOGENERATED_MARKERS):
        return "auto_generated"
    lengths = [len(line) for line in lines]
    if max(lengths) > max_line_length:
        return "max_line_length"
    if sum(lengths) / len(lengths) > max_mean_line_length:
        return "mean_line_length"
    if not text or sum(map(str.isalnum, text)) / len(text) < min_alnum_fraction:
        return "low_alphanumeric"
    return None


# --- Duplicates ----------------------------------------------------------------------------------------------


def dedup_key(text: str) -> bytes:
    """Hash of the text with case and runs of whitespace ignored: equal keys are exact duplicates."""
    return hashlib.blake2b(" ".join(text.casefold().split()).encode("utf-8"), digest_size=16).digest()


_BASE = np.uint64(0x100000001B3)  # odd, so invertible modulo 2**64
_BASE_INVERSE = np.uint64(pow(int(_BASE), -1, 2**64))


class _Powers:
    """Cached BASE**i and BASE**-i modulo 2**64, grown on demand to the longest text seen."""

    def __init__(self) -> None:
        self.up = np.ones(1, dtype=np.uint64)
        self.down = np.ones(1, dtype=np.uint64)

    def ensure(self, n: int) -> None:
        if len(self.up) >= n:
            return
        size = max(n, 2 * len(self.up))
        with np.errstate(over="ignore"):
            self.up = np.cumprod(np.concatenate([[np.uint64(1)], np.full(size - 1, _BASE)]), dtype=np.uint64)
            self.down = np.cumprod(np.concatenate([[np.uint64(1)], np.full(size - 1, _BASE_INVERSE)]), dtype=np.uint64)


_POWERS = _Powers()


def _mix64(h: np.ndarray) -> np.ndarray:
    # splitmix64 finaliser: polynomial hashes are poorly spread in their low bits, and MinHash wants uniform bits.
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


def shingle_hashes(text: str, unit: str = "word", size: int = 5) -> np.ndarray:
    """Sorted unique 64-bit hashes of the text's shingles: ``size`` consecutive words or characters.

    Words are compared with case and whitespace ignored. Substring hashes come from one prefix sum over the
    code points (a polynomial hash modulo 2**64), so a long document costs a few numpy passes, not a Python
    loop per shingle, and the result is the same in every process (unlike ``hash(str)``).
    """
    if unit == "word":
        text = " ".join(text.casefold().split())
    if not text:
        return np.zeros(0, dtype=np.uint64)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = len(codes)
    if unit == "word":
        starts = np.concatenate([[0], np.flatnonzero(codes == ord(" ")) + 1])
        ends = np.concatenate([starts[size:] - 1, [n]])  # shingle i runs to the space before word i+size
        starts = starts[: len(ends)]
    elif unit == "char":
        starts = np.arange(max(n - size + 1, 1))
        ends = np.minimum(starts + size, n)
    else:
        raise ValueError(f"unknown shingle unit {unit!r} (word or char)")
    _POWERS.ensure(n + 1)
    with np.errstate(over="ignore"):
        prefix = np.concatenate([[np.uint64(0)], np.cumsum(codes * _POWERS.down[:n], dtype=np.uint64)])
        # sum_{j in [s, e)} c_j * BASE**-(j-s): the same value wherever the substring occurs.
        hashes = (prefix[ends] - prefix[starts]) * _POWERS.up[starts]
    return np.unique(_mix64(hashes))


class NearDuplicateIndex:
    """MinHash LSH over documents seen so far (datasketch); ``add`` reports whether a document is a near-duplicate.

    Long documents are summarised by their ``max_shingles`` smallest shingle hashes (a bottom-k sample, which
    similar documents share), so the cost per document is bounded however long it is.
    """

    SCHEME = "affine64"  # our shingle hashes are 64-bit

    def __init__(
        self,
        threshold: float = 0.8,
        num_perm: int = 128,
        unit: str = "word",
        shingle_size: int = 5,
        max_shingles: int = 512,
        seed: int = 1,
    ) -> None:
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.unit, self.shingle_size, self.max_shingles = unit, shingle_size, max_shingles
        # One set of permutations shared by every signature instead of re-drawing it per document.
        self.permutations = MinHash(num_perm=num_perm, seed=seed, scheme=self.SCHEME).permutations

    def signature(self, text: str) -> MinHash:
        """The MinHash of the text's (bounded) shingle set."""
        hashes = shingle_hashes(text, self.unit, self.shingle_size)[: self.max_shingles]
        minhash = MinHash(permutations=self.permutations, scheme=self.SCHEME, hashfunc=int)
        minhash.update_batch(hashes.tolist())
        return minhash

    def add(self, key: str, text: str) -> str | None:
        """Key of an earlier document this one nearly duplicates (then it is not added), else None (added)."""
        minhash = self.signature(text)
        matches = self.lsh.query(minhash)
        if matches:
            return min(matches)
        self.lsh.insert(key, minhash)
        return None
