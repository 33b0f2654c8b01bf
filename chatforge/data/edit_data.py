"""Edit triples (input, instruction, output) made from the corpus: typos, casing, punctuation, renames, docstrings.

The `chatforge edit-data` stage (chatforge/stages/edit_data.py) writes them.
"""

from __future__ import annotations

import ast
import io as text_io
import re
import textwrap
import tokenize
from typing import Iterator

import numpy as np

from chatforge import io
from chatforge.errors import ChatforgeError

INSTRUCTIONS = {
    "spelling": ["Fix the spelling mistakes.", "Correct the typos.", "Fix the spelling."],
    "capitalization": ["Restore the capitalization.", "Fix the capital letters."],
    "punctuation": ["Restore the punctuation.", "Add the missing punctuation."],
    "rename": ["Rename {old} to {new}.", "Change the name {old} to {new}."],
    "docstring": ["Add a docstring.", "Write a docstring for this function."],
}
TYPES = tuple(INSTRUCTIONS)
NEW_NAMES = ("value", "item", "count", "result", "data", "name", "key", "other", "text", "number", "total", "entry")
SENTENCE = re.compile(r"[A-Z][^\n]*?[.!?](?=\s|$)")
PUNCTUATION = re.compile(r"[.,;:!?]")


def sentences(docs: list[dict], max_chars: int) -> Iterator[str]:
    """Whole English sentences of prose and chat documents, 30 to max_chars characters."""
    for doc in docs:
        if doc.get("kind") == "code":
            continue
        for match in SENTENCE.finditer(doc["text"]):
            sentence = match.group()
            if (
                30 <= len(sentence) <= max_chars
                and sentence.isascii()
                and PUNCTUATION.search(sentence[:-1]) is not None
            ):
                yield sentence


def functions(docs: list[dict], max_chars: int) -> Iterator[tuple[str, ast.FunctionDef]]:
    """(dedented source, parsed node) of the short functions and methods in code documents."""
    for doc in docs:
        if doc.get("kind") != "code":
            continue
        try:
            tree = ast.parse(doc["text"])
        except (SyntaxError, ValueError):
            continue
        lines = doc["text"].splitlines(keepends=True)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.decorator_list:
                source = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno]))
                if len(source) <= max_chars:
                    try:
                        yield source, ast.parse(source).body[0]
                    except SyntaxError:
                        continue


def add_typos(sentence: str, rng: np.random.Generator) -> str:
    words = [m for m in re.finditer(r"[A-Za-z]{4,}", sentence)]
    if not words:
        return sentence
    text = sentence
    for match in sorted(
        rng.choice(words, size=min(len(words), int(rng.integers(1, 3))), replace=False), key=lambda m: -m.start()
    ):
        word, i = match.group(), int(rng.integers(1, len(match.group()) - 2))
        damaged = [
            word[:i] + word[i + 1] + word[i] + word[i + 2 :],
            word[:i] + word[i + 1 :],
            word[:i] + word[i] + word[i:],
        ]
        text = text[: match.start()] + damaged[int(rng.integers(0, 3))] + text[match.end() :]
    return text


def rename(source: str, old: str, new: str) -> str:
    """``source`` with every NAME token ``old`` replaced by ``new`` (strings and comments untouched)."""
    lines = source.splitlines(keepends=True)
    tokens = [
        t
        for t in tokenize.generate_tokens(text_io.StringIO(source).readline)
        if t.type == tokenize.NAME and t.string == old
    ]
    for token in reversed(tokens):
        row, col = token.start
        lines[row - 1] = lines[row - 1][:col] + new + lines[row - 1][col + len(old) :]
    return "".join(lines)


def without_docstring(source: str, node: ast.FunctionDef) -> str | None:
    """The function without its docstring; None when it has none, shares a line with it, or is only a docstring."""
    if ast.get_docstring(node) is None or len(node.body) < 2:
        return None
    doc = node.body[0]
    lines = source.splitlines(keepends=True)
    if doc.lineno == node.lineno or lines[doc.lineno - 1].strip()[:3] not in ('"""', "'''", 'r""'):
        return None
    return "".join(lines[: doc.lineno - 1] + lines[doc.end_lineno :])


def make_triples(
    docs: list[dict], types: list[str], limit: int, max_chars: int, rng: np.random.Generator
) -> list[dict]:
    """Up to ``limit`` triples per type from ``docs``."""
    found: dict[str, list[dict]] = {t: [] for t in types}

    def add(kind: str, source: str, output: str, damaged: str, **names) -> None:
        """The model is asked to turn ``damaged`` into ``output``."""
        if damaged != output and len(found[kind]) < limit:
            instruction = str(rng.choice(INSTRUCTIONS[kind])).format(**names)
            found[kind].append(
                {"type": kind, "instruction": instruction, "input": damaged, "output": output, "source": source}
            )

    prose = list(sentences(docs, max_chars))
    for index in rng.permutation(len(prose)):
        sentence = prose[index]
        kind = str(rng.choice([t for t in ("spelling", "capitalization", "punctuation") if t in types] or ["none"]))
        if kind == "spelling":
            add(kind, "prose", sentence, add_typos(sentence, rng))
        elif kind == "capitalization":
            add(kind, "prose", sentence, sentence.lower())
        elif kind == "punctuation":
            add(kind, "prose", sentence, re.sub(r"\s+", " ", PUNCTUATION.sub("", sentence)).strip())
    code = list(functions(docs, max_chars))
    for index in rng.permutation(len(code)):
        source, node = code[index]
        stripped = without_docstring(source, node) if "docstring" in types else None
        params = [a.arg for a in node.args.args if a.arg not in ("self", "cls")]
        can_rename = "rename" in types and bool(params)
        if stripped is not None and (not can_rename or rng.random() < 0.5):
            add("docstring", "code", source, stripped)
        elif can_rename:
            old = str(rng.choice(params))
            choices = [n for n in NEW_NAMES if not re.search(rf"\b{n}\b", source)]
            if choices:
                new = str(rng.choice(choices))
                add("rename", "code", rename(source, old, new), source, old=old, new=new)
    return [t for kind in types for t in found[kind]]


def read_user_triples(path: str) -> list[dict]:
    triples = []
    for number, row in io.read_jsonl(path, "edit triples file"):
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) and row.get(k) for k in ("input", "instruction", "output")
        ):
            raise ChatforgeError(
                f"{path}:{number}: an edit triple needs non-empty string 'input', 'instruction' and 'output' fields"
            )
        triples.append(
            {
                "type": str(row.get("type") or "user"),
                "instruction": row["instruction"],
                "input": row["input"],
                "output": row["output"],
                "source": path,
            }
        )
    return triples


def counts(triples: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in triples:
        counts[t["type"]] = counts.get(t["type"], 0) + 1
    return counts
