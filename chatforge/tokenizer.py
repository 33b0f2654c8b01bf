"""Byte-level BPE tokenizer: trained and saved with Hugging Face ``tokenizers``, encoded with ``tiktoken``.

Text is first split by ``SPLIT_PATTERN`` (the GPT-4 pattern with numbers in runs of at most two digits), each
piece is mapped to bytes (GPT-2's byte-to-unicode alphabet, so every UTF-8 string is representable and round
trips exactly) and merged by BPE. HF ``tokenizers`` trains the merges and owns the saved ``tokenizer.json``;
encoding runs through a ``tiktoken.Encoding`` rebuilt from the same vocabulary because it is several times
faster. The two agree id for id because the trainer gives the 256 byte tokens ids 0..255 and every merged
token the next id in merge order, so a token's id is its merge rank, which is exactly what tiktoken's
``mergeable_ranks`` means. ``_ranks_from_hf`` checks that property on every load.

Special tokens (``SPECIAL_TOKENS``) are added after training, so they take the top ids and never take part in
merges. ``encode`` treats text that happens to contain "<|user|>" as ordinary characters; special ids come
only from ``special_id`` so user text can never forge a role marker.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator

import tiktoken
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from chatforge import io
from chatforge.errors import ChatforgeError

# GPT-4's (cl100k) split pattern, except numbers split into runs of at most 2 digits instead of 3: with an
# 8k vocabulary, 1000 three-digit tokens would cost an eighth of the vocabulary for little compression.
# Contractions, letter runs with one leading non-letter, digit runs, punctuation runs with trailing newlines,
# newline runs, and whitespace that leaves its last space to the following word.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# What HF's ByteLevel pre-tokenizer splits by when use_regex=True: lets GPT-2-style tokenizer.json files load.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

END_OF_TEXT = "<|endoftext|>"  # document boundary; every pretraining document ends with it
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"  # a chat turn's role
END_OF_TURN = "<|end|>"
FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"
TOOL_CALL, TOOL_RESULT = "<|tool_call|>", "<|tool_result|>"
PAD = "<|pad|>"
# the order fixes their ids (right after the 256 byte tokens), so it never changes
SPECIAL_TOKENS = (
    END_OF_TEXT, SYSTEM, USER, ASSISTANT, END_OF_TURN, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, TOOL_CALL, TOOL_RESULT, PAD,
)

TOKENIZER_FILE = "tokenizer.json"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable unicode character (HF ByteLevel uses the same)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return chars


_UNICODE_TO_BYTE = {char: byte for byte, char in _bytes_to_unicode().items()}


def _token_bytes(token: str, source: str) -> bytes:
    try:
        return bytes(_UNICODE_TO_BYTE[char] for char in token)
    except KeyError:
        raise ChatforgeError(
            f"{source}: token {token!r} is not byte-level BPE (a char outside GPT-2's byte alphabet)"
        ) from None


def _split_pattern(pre_tokenizer: dict | None, source: str) -> str:
    """The regex the HF pre-tokenizer splits by, which tiktoken must use too."""
    pre_tokenizer = pre_tokenizer or {}
    if pre_tokenizer.get("type") == "ByteLevel" and pre_tokenizer.get("use_regex", True):
        return GPT2_SPLIT_PATTERN
    steps = pre_tokenizer.get("pretokenizers", [])
    if (
        pre_tokenizer.get("type") == "Sequence"
        and len(steps) == 2
        and steps[0].get("type") == "Split"
        and "Regex" in steps[0].get("pattern", {})
        and steps[0].get("behavior") == "Isolated"
        and not steps[0].get("invert")
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex")
        and not steps[1].get("add_prefix_space")
    ):
        return steps[0]["pattern"]["Regex"]
    raise ChatforgeError(
        f"{source}: unsupported pre_tokenizer {json.dumps(pre_tokenizer)[:200]}; expected ByteLevel or "
        "Sequence[Split(Regex, isolated), ByteLevel(use_regex=false)]"
    )


def _ranks_from_hf(spec: dict, source: str) -> dict[bytes, int]:
    """tiktoken's mergeable_ranks (token bytes -> id) from a byte-level BPE tokenizer.json, after checking that
    ids are ranks: bytes first, then one new token per merge with ids increasing in merge order."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or spec.get("normalizer") is not None:
        raise ChatforgeError(f"{source}: only byte-level BPE without a normalizer is supported")
    vocab: dict[str, int] = model["vocab"]
    ranks = {_token_bytes(token, source): token_id for token, token_id in vocab.items()}
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ChatforgeError(f"{source}: vocabulary ids are not contiguous from 0")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise ChatforgeError(f"{source}: vocabulary lacks some of the 256 byte tokens")
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
    if len(merges) != len(vocab) - 256:
        raise ChatforgeError(
            f"{source}: {len(merges)} merges for {len(vocab)} tokens; expected one merge per non-byte token"
        )
    previous = max(ranks[bytes([b])] for b in range(256))
    for index, (left, right) in enumerate(merges):
        merged = vocab.get(left + right)
        if merged is None or merged <= previous:
            raise ChatforgeError(f"{source}: merge {index} ({left!r}, {right!r}) does not create the next token id")
        previous = merged
    return ranks


class Tokenizer:
    """A byte-level BPE vocabulary with fast encoding (tiktoken) and its HF ``tokenizers`` twin for training/saving."""

    def __init__(self, hf: HFTokenizer, source: str = "<trained tokenizer>"):
        self.hf = hf
        # HF would otherwise turn "<|user|>" typed in ordinary text into the special token
        hf.encode_special_tokens = True
        spec = json.loads(hf.to_str())
        self.pattern = _split_pattern(spec.get("pre_tokenizer"), source)
        ranks = _ranks_from_hf(spec, source)
        self.specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        if sorted(self.specials.values()) != list(range(len(ranks), len(ranks) + len(self.specials))):
            raise ChatforgeError(
                f"{source}: special token ids must follow the vocabulary ({sorted(self.specials.values())})"
            )
        self.hash = _content_hash(self.pattern, ranks, self.specials)
        self.encoding = tiktoken.Encoding(
            name=f"chatforge-{self.hash}", pat_str=self.pattern, mergeable_ranks=ranks, special_tokens=self.specials
        )
        self._token_bytes: list[bytes] | None = None

    # ---- construction -------------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Learn BPE merges from ``texts``; ``vocab_size`` counts the 256 bytes, the merges and ``SPECIAL_TOKENS``.

        A corpus with too few distinct pairs ends with a smaller vocabulary (see ``vocab_size``).
        """
        min_size = 256 + len(SPECIAL_TOKENS) + 1
        if vocab_size < min_size:
            raise ChatforgeError(
                f"vocab_size={vocab_size} is too small; it must be at least {min_size} (256 bytes + specials + 1 merge)"
            )
        hf = HFTokenizer(models.BPE(byte_fallback=False))
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - len(SPECIAL_TOKENS),
            min_frequency=0,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even those the corpus lacks
            special_tokens=[],  # added below, after the merges, so they take the top ids
        )
        seen = _CharCounter(texts)
        hf.train_from_iterator(seen, trainer)
        if seen.chars == 0:
            raise ChatforgeError("no text to train the tokenizer on")
        hf.add_special_tokens(list(SPECIAL_TOKENS))
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.json`` (or a directory holding one), ours or any byte-level BPE file (e.g. GPT-2's)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise ChatforgeError(f"tokenizer not found: {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for malformed files
            raise ChatforgeError(f"cannot read tokenizer {path}: {exc}") from None
        try:
            return cls(hf, source=str(path))
        except ChatforgeError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a field of the wrong kind or missing
            raise ChatforgeError(f"{path}: not a byte-level BPE tokenizer chatforge can use ({exc!r})") from None

    def save(self, directory: str | Path) -> Path:
        """Write ``tokenizer.json`` into ``directory`` atomically; returns its path."""
        path = Path(directory) / TOKENIZER_FILE
        io.write_text(path, self.hf.to_str(pretty=True))
        return path

    # ---- encoding -----------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings inside it are encoded as plain text."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 2) -> list[list[int]]:
        """``encode`` of each text, spread over ``num_threads`` threads (tiktoken releases the GIL)."""
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of ``ids`` (special tokens as their text); a prefix may end inside a UTF-8 character."""
        ids = list(ids)
        try:
            return self.encoding.decode_bytes(ids)
        except (KeyError, OverflowError):  # unknown id, or one that does not fit tiktoken's unsigned ids
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ChatforgeError(f"token id {bad} is outside the vocabulary (size {self.vocab_size})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; bytes that are not valid UTF-8 (a cut-off character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ---- vocabulary ---------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (ids are 0..vocab_size-1)."""
        return self.encoding.n_vocab

    def special_id(self, name: str) -> int:
        """The id of special token ``name`` (e.g. "<|user|>")."""
        try:
            return self.specials[name]
        except KeyError:
            raise ChatforgeError(
                f"tokenizer has no special token {name!r}; it has {', '.join(self.specials) or 'none'}"
            ) from None

    @property
    def eot_id(self) -> int:
        """The id of ``<|endoftext|>``, which ends every document."""
        return self.special_id(END_OF_TEXT)

    def id_to_token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token's bytes are its text)."""
        return self.token_bytes[token_id]

    @property
    def token_bytes(self) -> list[bytes]:
        """Bytes of every token, indexed by id (built once)."""
        if self._token_bytes is None:
            self._token_bytes = [self.encoding.decode_single_token_bytes(i) for i in range(self.vocab_size)]
        return self._token_bytes


class _CharCounter:
    """Passes texts through to the trainer while counting their characters."""

    def __init__(self, texts: Iterable[str]):
        self.texts = texts
        self.chars = 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            self.chars += len(text)
            yield text


def _content_hash(pattern: str, ranks: dict[bytes, int], specials: dict[str, int]) -> str:
    """Identifies the tokenization itself, independent of how tokenizer.json happens to be formatted."""
    digest = hashlib.sha256(pattern.encode())
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        digest.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
    digest.update(json.dumps(sorted(specials.items(), key=lambda item: item[1])).encode())
    return digest.hexdigest()[:16]
