"""Semantic search: index a folder or JSONL of documents with an embedding model, then query it.

    chatforge search --build=docs/ --index=runs/search/index          # chunk, embed and save the index
    chatforge search --index=runs/search/index how do I sort a list   # the best chunks for a query
    chatforge search --build=corpus.jsonl --embedder=minilm "query"   # build with MiniLM, then query

A folder is read recursively (files with the listed extensions, id = relative path); a JSONL file has one
document per line with a "text" field and an optional "id". The index (see ``chatforge.embed.index``) is
saved atomically and reloads with the embedder it was built with.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from chatforge.config import option
from chatforge.data.documents import read_documents
from chatforge.embed.index import BACKENDS, Embedder, SearchIndex, load_embedder
from chatforge.errors import ChatforgeError


@dataclass
class Config:
    index: str = option("runs/search/index", "directory of the vector index (written by --build, read by queries)")
    build: str = option("", "folder or JSONL file of documents to index (empty = use the existing index)")
    embedder: str = option("runs/speedrun/embed", "embedding model: a `chatforge embed` output directory, or 'minilm'")
    extensions: list[str] = option([".txt", ".md", ".rst", ".py"], "file extensions indexed when --build is a folder")
    chunk_tokens: int = option(128, "tokens per chunk")
    overlap: int = option(32, "tokens shared by consecutive chunks of a document")
    backend: str = option("auto", f"vector search backend: {', '.join(BACKENDS)} (auto = faiss if installed, else numpy)")
    k: int = option(5, "number of hits printed per query")
    json: bool = option(False, "print hits as JSON lines instead of text")
    device: str = option("", "torch device for the embedder (empty = cuda if available, else cpu)")

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ChatforgeError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.k < 1:
            raise ChatforgeError(f"k must be >= 1, got {self.k}")


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


def open_embedder(name: str, device: str | None) -> Embedder:
    return load_embedder({"type": "minilm"} if name == "minilm" else {"type": "chatforge", "path": name}, device=device)


def build_index(cfg: Config) -> SearchIndex:
    embedder = open_embedder(cfg.embedder, cfg.device or None)
    start = time.perf_counter()
    index = SearchIndex.build(read_corpus(cfg.build, cfg.extensions), embedder, cfg.chunk_tokens, cfg.overlap, cfg.backend)
    seconds = time.perf_counter() - start
    index.meta["build_seconds"] = round(seconds, 3)
    index.save(cfg.index)
    print(f"indexed {index.meta['documents']} documents as {len(index)} chunks with {embedder.name} "
          f"({index.backend}) in {seconds:.1f}s ({len(index) / seconds:.1f} chunks/s) -> {cfg.index}", file=sys.stderr)
    return index


def print_hits(query: str, index: SearchIndex, cfg: Config) -> None:
    start = time.perf_counter()
    hits = index.search(query, cfg.k)
    ms = (time.perf_counter() - start) * 1000
    if cfg.json:
        for rank, hit in enumerate(hits, 1):
            print(json.dumps({"query": query, "rank": rank, "doc_id": hit.doc_id, "score": round(hit.score, 4), "chunk": hit.chunk}, ensure_ascii=False))
        return
    print(f"query: {query}  ({ms:.0f} ms)")
    for rank, hit in enumerate(hits, 1):
        snippet = " ".join(hit.chunk.split())
        print(f"{rank:>2}. {hit.score:.3f}  {hit.doc_id}\n    {snippet[:300]}")


def run(cfg: Config, args: list[str]) -> None:
    query = " ".join(args).strip()
    if not cfg.build and not query:
        raise ChatforgeError("nothing to do: give --build=FOLDER_OR_JSONL to index documents, and/or a query to search")
    if cfg.build:
        index = build_index(cfg)
    else:
        index = SearchIndex.load(cfg.index, backend=None, device=cfg.device or None)
    if query:
        print_hits(query, index, cfg)
