"""The corpus format every consumer of the data stage reads: JSON lines of documents with a string "text"."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

from chatforge import io
from chatforge.errors import ChatforgeError


def read_documents(path: str | Path) -> Iterator[dict]:
    """Documents ``{"id", "text", "source", "kind", ...}`` of a JSONL file, streamed; ids default to ``file:line``."""
    for number, doc in io.read_jsonl(path, "document file (run `chatforge data` first, or pass a JSONL file)"):
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise ChatforgeError(f"{path}:{number}: a document needs an object with a string 'text' field")
        doc.setdefault("id", f"{Path(path).stem}:{number}")
        yield doc


def unit_hash(*parts: object) -> float:
    """A number in [0, 1) fixed by ``parts``: the same on every machine and run (unlike ``hash``), so splits
    chosen by it are reproducible."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
