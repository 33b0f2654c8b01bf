"""semantic search: index a folder or JSONL of documents with an embedding model, then query it.

    chatforge search --build=docs/ --index=runs/search/index          # chunk, embed and save the index
    chatforge search --index=runs/search/index how do I sort a list   # the best chunks for a query
    chatforge search --build=corpus.jsonl --embedder=minilm "query"   # build with MiniLM, then query

A folder is read recursively (files with the listed extensions, id = relative path); a JSONL file has one
document per line with a "text" field and an optional "id". The index (see ``chatforge.embed.index``) is
saved atomically and reloads with the embedder it was built with.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatforge.config import option
from chatforge.embed.index import BACKENDS, SearchIndex
from chatforge.embed.search import build_index, print_hits
from chatforge.errors import ChatforgeError


@dataclass
class Config:
    index: str = option("runs/search/index", "directory of the vector index (written by --build, read by queries)")
    build: str = option("", "folder or JSONL file of documents to index (empty = use the existing index)")
    embedder: str = option("runs/speedrun/embed", "embedding model: a `chatforge embed` output directory, or 'minilm'")
    extensions: list[str] = option([".txt", ".md", ".rst", ".py"], "file extensions indexed when --build is a folder")
    chunk_tokens: int = option(128, "tokens per chunk")
    overlap: int = option(32, "tokens shared by consecutive chunks of a document")
    backend: str = option(
        "auto", f"vector search backend: {', '.join(BACKENDS)} (auto = faiss if installed, else numpy)"
    )
    k: int = option(5, "number of hits printed per query")
    json: bool = option(False, "print hits as JSON lines instead of text")
    device: str = option("", "torch device for the embedder (empty = cuda if available, else cpu)")

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ChatforgeError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.k < 1:
            raise ChatforgeError(f"k must be >= 1, got {self.k}")


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
