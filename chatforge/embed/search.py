"""Semantic search over a folder or JSONL of documents: reading the corpus, building an index, printing hits.

The `chatforge search` stage (chatforge/stages/search.py) runs it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Iterator

from chatforge.data.documents import read_documents
from chatforge.embed.index import SearchIndex, open_embedder
from chatforge.errors import ChatforgeError


def read_corpus(path: str | Path, extensions: list[str]) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of every document of a JSONL file or of every matching file under a folder."""
    path = Path(path)
    if path.is_file():
        for doc in read_documents(path):
            yield str(doc["id"]), doc["text"]
        return
    if not path.is_dir():
        raise ChatforgeError(f"nothing to index at {path}: not a file or folder")
    found = False
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in extensions):
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary or not UTF-8: not searchable text
        found = True
        yield str(file.relative_to(path)), text
    if not found:
        raise ChatforgeError(f"no documents to index in {path} (looked for {', '.join(extensions)} files)")


def build_index(cfg) -> SearchIndex:
    embedder = open_embedder(cfg.embedder, cfg.device or None)
    start = time.perf_counter()
    index = SearchIndex.build(
        read_corpus(cfg.build, cfg.extensions), embedder, cfg.chunk_tokens, cfg.overlap, cfg.backend
    )
    seconds = time.perf_counter() - start
    index.meta["build_seconds"] = round(seconds, 3)
    index.save(cfg.index)
    print(
        f"indexed {index.meta['documents']} documents as {len(index)} chunks with {embedder.name} "
        f"({index.backend}) in {seconds:.1f}s ({len(index) / seconds:.1f} chunks/s) -> {cfg.index}",
        file=sys.stderr,
    )
    return index


def print_hits(query: str, index: SearchIndex, cfg) -> None:
    start = time.perf_counter()
    hits = index.search(query, cfg.k)
    ms = (time.perf_counter() - start) * 1000
    if cfg.json:
        for rank, hit in enumerate(hits, 1):
            print(
                json.dumps(
                    {
                        "query": query,
                        "rank": rank,
                        "doc_id": hit.doc_id,
                        "score": round(hit.score, 4),
                        "chunk": hit.chunk,
                    },
                    ensure_ascii=False,
                )
            )
        return
    print(f"query: {query}  ({ms:.0f} ms)")
    for rank, hit in enumerate(hits, 1):
        snippet = " ".join(hit.chunk.split())
        print(f"{rank:>2}. {hit.score:.3f}  {hit.doc_id}\n    {snippet[:300]}")
