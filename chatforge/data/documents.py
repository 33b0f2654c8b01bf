"""The corpus format every consumer of the data stage reads: JSON lines of documents with a string "text"."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from chatforge import io
from chatforge.config import ChatforgeError


def read_documents(path: str | Path) -> Iterator[dict]:
    """Documents ``{"id", "text", "source", "kind", ...}`` of a JSONL file, streamed; ids default to ``file:line``."""
    for number, doc in io.read_jsonl(path, "document file (run `chatforge data` first, or pass a JSONL file)"):
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise ChatforgeError(f"{path}:{number}: a document needs an object with a string 'text' field")
        doc.setdefault("id", f"{Path(path).stem}:{number}")
        yield doc
