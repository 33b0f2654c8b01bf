"""Positive pairs for contrastive training and retrieval evaluation.

Unsupervised: neighbouring spans of the same document (the CPT recipe: text next to each other is about the
same thing). Supervised, where the data has them: a function's docstring and its code, a comment and the
code under it (both from the Python code corpus, found with ``ast``/``tokenize`` so strings that merely look
like comments are never taken), a user turn and the assistant's answer, WordNet glosses and their lemmas or
examples (when Debian's ``wordnet-base`` is installed) and pairs a user supplies as JSONL.
"""

from __future__ import annotations

import ast
import io
import random
import re
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from chatforge.config import option
from chatforge.data.chat_batches import EpochOrder
from chatforge.errors import ChatforgeError
from chatforge.io import read_jsonl


@dataclass(frozen=True)
class Pair:
    """Two texts that belong together; ``query`` is the side a searcher would type."""

    query: str
    document: str
    kind: str  # span | docstring | comment | chat | wordnet | user


@dataclass
class PairConfig:
    span_chars: int = option(600, "characters per span for neighbouring-span pairs (cut at whitespace)")
    span_pairs_per_doc: int = option(4, "at most this many neighbouring-span pairs from one document")
    docstrings: bool = option(True, "docstring <-> function pairs from code documents")
    comments: bool = option(True, "comment <-> following code pairs from code documents")
    chat: bool = option(True, "user turn <-> assistant answer pairs from chat documents")
    wordnet_dir: str = option("/usr/share/wordnet", "WordNet database (Debian wordnet-base); skipped when absent")
    wordnet_pairs: int = option(20000, "at most this many WordNet pairs (0 = none)")
    user_pairs: list[str] = option([], "JSONL files of {query|text_a, document|text_b} pairs")
    max_code_lines: int = option(40, "function/code blocks are cut to this many lines")

    def validate(self) -> None:
        if self.span_chars < 20:
            raise ChatforgeError(f"pairs.span_chars must be >= 20, got {self.span_chars}")


def split_spans(text: str, span_chars: int) -> list[str]:
    """Consecutive pieces of about ``span_chars`` characters, cut at a line break or space when possible."""
    spans, start = [], 0
    while start < len(text):
        end = min(start + span_chars, len(text))
        if end < len(text):
            floor = start + span_chars // 2  # never cut a span to less than half its size
            cut = text.rfind("\n", floor, end)
            if cut == -1:
                cut = text.rfind(" ", floor, end)
            if cut != -1:
                end = cut
        piece = text[start:end].strip()
        if piece:
            spans.append(piece)
        start = end
    return spans


def span_pairs(text: str, span_chars: int, max_pairs: int, rng: random.Random) -> list[Pair]:
    """Neighbouring, non-overlapping spans (0,1), (2,3), ... of one document; a random ``max_pairs`` of them."""
    spans = split_spans(text, span_chars)
    pairs = [Pair(spans[i], spans[i + 1], "span") for i in range(0, len(spans) - 1, 2)]
    return rng.sample(pairs, max_pairs) if len(pairs) > max_pairs else pairs


def _summary(docstring: str) -> str:
    """The first paragraph of a docstring, on one line: what a person searching for the function would type."""
    first = docstring.strip().split("\n\n")[0]
    return " ".join(first.split())


def _trivial(body: list[ast.stmt]) -> bool:
    """A body that does nothing searchable: ``pass``, ``...`` or only ``raise NotImplementedError``."""
    for stmt in body:
        if isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):
            continue
        if isinstance(stmt, ast.Raise) and "NotImplementedError" in ast.unparse(stmt):
            continue
        return False
    return True


def docstring_pairs(source: str, max_lines: int = 40) -> list[Pair]:
    """(docstring summary, function code without its docstring) for every documented function in ``source``.

    Returns nothing for code that does not parse (code corpora hold Python 2 files and templates).
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        docstring = ast.get_docstring(node)
        if not docstring or _trivial(node.body[1:]):
            continue
        doc_node = node.body[0]
        if doc_node.lineno == node.lineno:  # `def f(): "doc"` on one line: no clean cut
            continue
        code_lines = lines[node.lineno - 1 : doc_node.lineno - 1] + lines[doc_node.end_lineno : node.end_lineno]
        code = textwrap.dedent("\n".join(code_lines[:max_lines])).strip()
        query = _summary(docstring)
        if len(query.split()) >= 3 and code:
            pairs.append(Pair(query, code, "docstring"))
    return pairs


def _comment_blocks(source: str) -> Iterator[tuple[list[str], int]]:
    """(comment lines, last line number) for every run of consecutive whole-line comments."""
    block: list[str] = []
    last = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type != tokenize.COMMENT or tok.line[: tok.start[1]].strip():
                continue  # a trailing comment after code is not a block header
            if block and tok.start[0] != last + 1:
                yield block, last
                block = []
            block.append(tok.string.lstrip("#").strip())
            last = tok.start[0]
    except (tokenize.TokenError, SyntaxError):
        return
    if block:
        yield block, last


def comment_pairs(source: str, max_lines: int = 40) -> list[Pair]:
    """(comment, the code block right under it) for every whole-line comment block followed by code.

    The block ends at the first blank or comment-only line. Comments of fewer than three words (``# noqa``,
    ``# -*- coding -*-``), commented-out code and licence banners are skipped.
    """
    lines = source.splitlines()
    pairs = []
    for block, last in _comment_blocks(source):
        text = " ".join(line for line in block if line)
        words = text.split()
        if len(words) < 3 or text.rstrip().endswith((":", ")", "]")) or "copyright" in text.lower():
            continue
        if sum(ch.isalpha() or ch == " " for ch in text) < 0.7 * len(text):
            continue  # mostly symbols: commented-out code or ASCII art
        code_lines = []
        for line in lines[last:]:
            if not line.strip() or line.strip().startswith("#"):
                break
            code_lines.append(line)
        code = textwrap.dedent("\n".join(code_lines[:max_lines])).strip()
        if code:
            pairs.append(Pair(text, code, "comment"))
    return pairs


_TURN = re.compile(r"^(User|Assistant|System|user|assistant|system):\s?", re.MULTILINE)


def chat_turns(doc: dict) -> list[tuple[str, str]]:
    """(role, text) turns of a chat document: its ``messages`` field, else ``Role: text`` lines of its text."""
    messages = doc.get("messages")
    if isinstance(messages, list):
        return [(m.get("role", ""), m.get("content", "")) for m in messages if isinstance(m, dict)]
    parts = _TURN.split(doc["text"])
    return [(parts[i].lower(), parts[i + 1].strip()) for i in range(1, len(parts) - 1, 2)]


def chat_pairs(doc: dict) -> list[Pair]:
    """(user turn, the assistant answer that follows it) for every exchange of a chat document."""
    turns = chat_turns(doc)
    return [
        Pair(turns[i][1], turns[i + 1][1], "chat")
        for i in range(len(turns) - 1)
        if turns[i][0] == "user" and turns[i + 1][0] == "assistant" and turns[i][1] and turns[i + 1][1]
    ]


def wordnet_pairs(wordnet_dir: str | Path, limit: int, rng: random.Random) -> list[Pair]:
    """(gloss definition, lemmas) and (definition, usage example) pairs from WordNet ``data.*`` files."""
    root = Path(wordnet_dir)
    pairs = []
    for name in ("data.noun", "data.verb", "data.adj", "data.adv"):
        path = root / name
        if not path.is_file():
            continue
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  ") or " | " not in line:
                    continue  # licence header
                fields, gloss = line.split(" | ", 1)
                parts = fields.split()
                count = int(parts[3], 16)
                lemmas = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in parts[4 : 4 + 2 * count : 2]]
                definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
                if not definition:
                    continue
                pairs.append(Pair(", ".join(lemmas), definition, "wordnet"))
                pairs += [Pair(definition, example, "wordnet") for example in re.findall(r'"([^"]+)"', gloss)]
    return rng.sample(pairs, limit) if len(pairs) > limit else pairs


def read_user_pairs(path: str | Path) -> list[Pair]:
    """Pairs from a JSONL file whose rows have ``query``/``document`` or ``text_a``/``text_b``."""
    pairs = []
    for number, row in read_jsonl(path, "pairs file"):
        query = row.get("query", row.get("text_a")) if isinstance(row, dict) else None
        document = row.get("document", row.get("text_b")) if isinstance(row, dict) else None
        if not isinstance(query, str) or not isinstance(document, str) or not query.strip() or not document.strip():
            raise ChatforgeError(
                f"{path}:{number}: a pair needs non-empty 'query' and 'document' (or 'text_a' and 'text_b') strings"
            )
        pairs.append(Pair(query, document, "user"))
    return pairs


def dedupe(pairs: Iterable[Pair]) -> list[Pair]:
    """Drop pairs whose query or document already appeared: a duplicate in a batch would be a false negative."""
    seen: set[str] = set()
    kept = []
    for pair in pairs:
        if pair.query in seen or pair.document in seen or pair.query == pair.document:
            continue
        seen.update((pair.query, pair.document))
        kept.append(pair)
    return kept


def document_pairs(doc: dict, cfg: PairConfig, rng: random.Random) -> list[Pair]:
    """Every pair one document yields under ``cfg``."""
    pairs = span_pairs(doc["text"], cfg.span_chars, cfg.span_pairs_per_doc, rng)
    kind = doc.get("kind", "text")
    if kind == "code":
        if cfg.docstrings:
            pairs += docstring_pairs(doc["text"], cfg.max_code_lines)
        if cfg.comments:
            pairs += comment_pairs(doc["text"], cfg.max_code_lines)
    elif kind == "chat" and cfg.chat:
        pairs += chat_pairs(doc)
    return pairs


def build_pairs(documents: Iterable[dict], cfg: PairConfig, seed: int = 0) -> list[Pair]:
    """All training pairs from ``documents`` plus WordNet and user pairs, de-duplicated and shuffled."""
    rng = random.Random(seed)
    pairs = [pair for doc in documents for pair in document_pairs(doc, cfg, rng)]
    if cfg.wordnet_pairs > 0:
        pairs += wordnet_pairs(cfg.wordnet_dir, cfg.wordnet_pairs, rng)
    for path in cfg.user_pairs:
        pairs += read_user_pairs(path)
    pairs = dedupe(pairs)
    rng.shuffle(pairs)
    return pairs


class PairBatches:
    """Batches of pairs as a pure function of the step (see ``EpochOrder``): no pair meets itself as a negative,
    and a resumed run (or rank ``r`` of ``world``) draws exactly the batches an uninterrupted single process would."""

    def __init__(self, pairs: list[Pair], batch_size: int, seed: int = 0):
        self.pairs = pairs
        self.batch_size = batch_size
        self.order = EpochOrder(len(pairs), batch_size, seed, what="training pairs")

    def batch(self, step: int, rank: int = 0, world: int = 1) -> list[Pair]:
        """This rank's contiguous share of global batch number ``step``."""
        return [self.pairs[i] for i in self.order.indices(step, rank, world)]
