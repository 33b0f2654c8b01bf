"""A vector index of document chunks: build from (doc_id, text) pairs, save atomically, reload, search.

Documents are cut into windows of ``chunk_tokens`` tokens overlapping by ``overlap`` tokens (a sentence cut
at a window edge is whole in the next window), embedded as documents, and searched by the cosine similarity
of a query embedding (vectors are L2-normalised, so the inner product is the cosine).

Backends: ``faiss`` (exact inner-product search, BLAS-fast), ``hnsw`` (faiss' approximate HNSW graph, for
large indexes), ``numpy`` (exact, no dependency: the fallback when faiss is not installed). ``faiss`` and
``numpy`` return the same hits; the tests check it.

    index = SearchIndex.build([(doc_id, text), ...], embedder)
    index.save("runs/search/index")
    index = SearchIndex.load("runs/search/index")        # reloads the embedder it was built with
    for hit in index.search("how do I sort a list", k=5):
        print(hit.doc_id, hit.score, hit.chunk)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from chatforge import io
from chatforge.embed.base import Embedder
from chatforge.embed.minilm import MiniLMEmbedder
from chatforge.embed.model import ChatforgeEmbedder
from chatforge.errors import ChatforgeError
from chatforge.io import atomic_directory

INDEX_FORMAT = 1
HNSW_FILE = "hnsw.faiss"
BACKENDS = ("auto", "faiss", "hnsw", "numpy")


@dataclass(frozen=True)
class Hit:
    doc_id: str
    chunk: str
    score: float  # cosine similarity of query and chunk, in [-1, 1]


def load_embedder(spec: dict, device: str | None = None) -> Embedder:
    """The embedder an index's ``spec`` names."""
    kind = spec.get("type")
    if kind == "chatforge":
        return ChatforgeEmbedder.load(spec["path"], device=device)
    if kind == "minilm":
        return MiniLMEmbedder(device=device)
    raise ChatforgeError(f"unknown embedder type {kind!r} in index metadata")


def open_embedder(name: str, device: str | None) -> Embedder:
    """``minilm`` (the baseline) or a ``chatforge embed`` output directory."""
    return load_embedder({"type": "minilm"} if name == "minilm" else {"type": "chatforge", "path": name}, device=device)


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def _read_faiss(path: Path, shape: tuple[int, int], recorded: dict | None):
    """A saved faiss index that holds ``shape`` vectors and matches its ``recorded`` size and hash (indexes saved
    before hashes were recorded are only checked by faiss); a damaged file is a ChatforgeError naming it."""
    problem = io.record_mismatch(path, recorded) if isinstance(recorded, dict) else None
    if problem:
        raise ChatforgeError(f"the search index is damaged: {problem}")
    try:
        index = _faiss().read_index(str(path))
    except (RuntimeError, MemoryError) as exc:  # faiss's C++ errors, a garbage length as std::bad_alloc
        raise ChatforgeError(f"{path} is damaged: {str(exc).strip().splitlines()[-1]}") from None
    if (index.ntotal, index.d) != tuple(shape):
        raise ChatforgeError(f"{path} holds {index.ntotal} vectors of {index.d} dimensions; vectors.npy has {shape}")
    return index


def resolve_backend(backend: str) -> str:
    """``auto`` becomes ``faiss`` when faiss is installed, else ``numpy``; asking for a missing faiss is an error."""
    if backend not in BACKENDS:
        raise ChatforgeError(f"unknown index backend {backend!r}; backends: {', '.join(BACKENDS)}")
    have_faiss = _faiss() is not None
    if backend == "auto":
        return "faiss" if have_faiss else "numpy"
    if backend in ("faiss", "hnsw") and not have_faiss:
        raise ChatforgeError(
            f"index backend {backend!r} needs faiss-cpu (pip install -r requirements.txt); use backend=numpy"
        )
    return backend


class _NumpySearch:
    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = queries @ self.vectors.T
        k = min(k, scores.shape[1])
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return np.take_along_axis(top_scores, order, axis=1), np.take_along_axis(top, order, axis=1)


class _FaissSearch:
    def __init__(self, index):
        self.index = index

    @classmethod
    def build(cls, vectors: np.ndarray, backend: str, hnsw_m: int = 32) -> "_FaissSearch":
        faiss = _faiss()
        if backend == "hnsw":
            index = faiss.IndexHNSWFlat(vectors.shape[1], hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
        else:
            index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return cls(index)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = max(64, 2 * k)  # the graph walk's beam: wider = closer to exact
        return self.index.search(queries, k)


class SearchIndex:
    """Chunks of documents with their embeddings, searchable by a text query."""

    def __init__(
        self,
        embedder: Embedder,
        vectors: np.ndarray,
        doc_ids: list[str],
        chunks: list[str],
        backend: str = "auto",
        meta: dict | None = None,
        _engine=None,
    ):
        if len(vectors) != len(chunks) or len(doc_ids) != len(chunks):
            raise ChatforgeError("index vectors, chunks and doc ids differ in length")
        self.embedder = embedder
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.doc_ids = doc_ids
        self.chunks = chunks
        self.backend = resolve_backend(backend)
        self.meta = dict(meta or {})
        if _engine is not None:
            self._engine = _engine
        elif self.backend == "numpy":
            self._engine = _NumpySearch(self.vectors)
        else:
            self._engine = _FaissSearch.build(self.vectors, self.backend)

    def __len__(self) -> int:
        return len(self.chunks)

    @classmethod
    def build(
        cls,
        documents: Iterable[tuple[str, str]],
        embedder: Embedder,
        chunk_tokens: int = 128,
        overlap: int = 32,
        backend: str = "auto",
        batch_size: int = 32,
        progress=None,
    ) -> "SearchIndex":
        """Chunk and embed ``(doc_id, text)`` documents. ``progress(done, total)`` is called per batch if given."""
        doc_ids, chunks = [], []
        for doc_id, text in documents:
            for piece in embedder.chunk(text, chunk_tokens, overlap):
                if piece.strip():
                    doc_ids.append(str(doc_id))
                    chunks.append(piece)
        if not chunks:
            raise ChatforgeError("no text to index: every document was empty")
        parts = []
        for start in range(0, len(chunks), batch_size):
            parts.append(embedder.embed(chunks[start : start + batch_size], role="document"))
            if progress:
                progress(min(start + batch_size, len(chunks)), len(chunks))
        meta = {"chunk_tokens": chunk_tokens, "overlap": overlap, "documents": len(set(doc_ids))}
        return cls(embedder, np.concatenate(parts), doc_ids, chunks, backend, meta)

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The ``k`` chunks most similar to ``query``, best first."""
        return self.search_vectors(self.embedder.embed([query], role="query"), k)[0]

    def search_vectors(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """Hits for each row of ``queries`` (already embedded, [n, dim])."""
        if k < 1:
            raise ChatforgeError(f"k must be >= 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.vectors.shape[1]:
            raise ChatforgeError(
                f"query vectors of shape {queries.shape} do not match the index dimension {self.vectors.shape[1]}"
            )
        scores, rows = self._engine.search(queries, min(k, len(self)))
        return [
            [Hit(self.doc_ids[r], self.chunks[r], float(s)) for s, r in zip(row_scores, row_ids) if r >= 0]
            for row_scores, row_ids in zip(scores, rows)
        ]

    def save(self, directory: str | Path) -> None:
        """Write the index to ``directory`` all at once: a failed save leaves any previous index untouched."""
        with atomic_directory(directory) as staging:
            np.save(staging / "vectors.npy", self.vectors)
            rows = ({"doc_id": doc_id, "chunk": chunk} for doc_id, chunk in zip(self.doc_ids, self.chunks))
            io.write_jsonl(staging / "chunks.jsonl", rows)
            files = {}
            if self.backend == "hnsw":  # a graph is slow to rebuild; flat indexes are rebuilt from vectors.npy
                _faiss().write_index(self._engine.index, str(staging / HNSW_FILE))
                files[HNSW_FILE] = io.file_record(staging / HNSW_FILE)  # faiss itself cannot tell a damaged file
            info = {
                "format": INDEX_FORMAT,
                "backend": self.backend,
                "dim": int(self.vectors.shape[1]),
                "chunks": len(self),
                "embedder": self.embedder.spec(),
                **self.meta,
                "files": files,
            }
            (staging / "index.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(
        cls,
        directory: str | Path,
        embedder: Embedder | None = None,
        backend: str | None = None,
        device: str | None = None,
    ) -> "SearchIndex":
        """Reload a saved index; its embedder is reloaded from the index metadata unless one is given."""
        directory = Path(directory)
        info_path = directory / "index.json"
        if not info_path.is_file():
            raise ChatforgeError(
                f"no search index at {directory} (missing index.json); build one with `chatforge search --build`"
            )
        info = io.read_json(info_path, "index metadata")
        if info.get("format") != INDEX_FORMAT:
            raise ChatforgeError(
                f"{directory} holds index format {info.get('format')}, this chatforge reads {INDEX_FORMAT}"
            )
        for key, kind in (("dim", int), ("backend", str), ("embedder", dict)):
            if not isinstance(info.get(key), kind) or isinstance(info.get(key), bool):
                raise ChatforgeError(f"{info_path}: '{key}' must be {kind.__name__}; got {info.get(key)!r}")
        vectors = io.read_array(directory / "vectors.npy", "index vectors")
        if vectors.ndim != 2 or vectors.shape[1] != info["dim"] or vectors.dtype.kind != "f":
            raise ChatforgeError(
                f"{directory / 'vectors.npy'} holds {vectors.dtype} vectors of shape {vectors.shape}; "
                f"expected float rows of {info['dim']} dimensions (index.json)"
            )
        doc_ids, chunks = [], []
        for number, row in io.read_jsonl(directory / "chunks.jsonl", "index chunks"):
            if not (isinstance(row, dict) and isinstance(row.get("doc_id"), str) and isinstance(row.get("chunk"), str)):
                raise ChatforgeError(f"{directory / 'chunks.jsonl'}:{number}: expected string 'doc_id' and 'chunk'")
            doc_ids.append(row["doc_id"])
            chunks.append(row["chunk"])
        if len(chunks) != len(vectors):
            raise ChatforgeError(f"{directory} is damaged: {len(chunks)} chunks but {len(vectors)} vectors")
        embedder = embedder or load_embedder(info["embedder"], device=device)
        if embedder.dim != info["dim"]:
            raise ChatforgeError(
                f"embedder {embedder.name} makes {embedder.dim}-d vectors but {directory} holds {info['dim']}-d ones"
            )
        wanted = backend or info["backend"]
        if wanted in ("faiss", "hnsw") and _faiss() is None and backend is None:
            wanted = "numpy"  # saved with faiss, reloaded without it: exact search still works
        engine = None
        if wanted == "hnsw" and (directory / HNSW_FILE).is_file():
            recorded = info.get("files", {}).get(HNSW_FILE) if isinstance(info.get("files"), dict) else None
            engine = _FaissSearch(_read_faiss(directory / HNSW_FILE, vectors.shape, recorded))
        meta = {k: v for k, v in info.items() if k not in ("format", "backend", "dim", "chunks", "embedder", "files")}
        return cls(embedder, vectors, doc_ids, chunks, wanted, meta, engine)
