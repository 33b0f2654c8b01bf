"""Vector index speed: build time and query latency of the faiss, HNSW and numpy backends side by side.

    .venv/bin/python benchmarks/embed_index.py [--n=100000] [--dim=192] [--queries=200] [--k=10]

Vectors are clustered unit vectors (a mixture of Gaussians around random centres), because real embeddings
cluster by topic and an approximate graph index behaves on them as it does on real data; uniformly random
vectors in many dimensions have no meaningful neighbours and would understate HNSW's recall. The HNSW row
reports recall@k against exact search, the price of its speed. Embedding throughput is the model's business and is
measured by ``chatforge embed`` / ``chatforge search --build`` (chunks/s in their output).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from chatforge.config import option, parse
from chatforge.embed.index import SearchIndex, resolve_backend


@dataclass
class Config:
    n: int = option(100_000, "vectors in the index")
    dim: int = option(192, "vector size (192 = the ada preset's width, 384 = MiniLM)")
    queries: int = option(200, "queries, searched one at a time as a user would")
    k: int = option(10, "hits per query")


def clustered(rng: np.random.Generator, n: int, dim: int, clusters: int = 200) -> np.ndarray:
    centres = np.random.default_rng(1).normal(size=(clusters, dim))  # shared by index and queries
    x = (centres[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, dim))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class _NoEmbedder:
    name, dim = "none", 0


def main(argv: list[str]) -> None:
    cfg, _ = parse(Config, argv)
    rng = np.random.default_rng(0)
    vectors, queries = clustered(rng, cfg.n, cfg.dim), clustered(rng, cfg.queries, cfg.dim)
    ids = [str(i) for i in range(cfg.n)]
    backends = ["numpy"] + (["faiss", "hnsw"] if resolve_backend("auto") == "faiss" else [])
    exact = None
    print(f"{cfg.n} vectors x {cfg.dim} dims, {cfg.queries} single queries, k={cfg.k}")
    print(f"{'backend':<8} {'build s':>9} {'query ms':>9} {'queries/s':>10} {'recall@k':>9}")
    for backend in backends:
        start = time.perf_counter()
        index = SearchIndex(_NoEmbedder(), vectors, ids, ids, backend=backend)
        build = time.perf_counter() - start
        start = time.perf_counter()
        hits = [index.search_vectors(queries[i : i + 1], cfg.k)[0] for i in range(cfg.queries)]
        per_query = (time.perf_counter() - start) / cfg.queries
        found = [{h.doc_id for h in row} for row in hits]
        exact = exact or found
        recall = np.mean([len(a & b) / cfg.k for a, b in zip(found, exact)])
        print(f"{backend:<8} {build:>9.3f} {per_query * 1000:>9.3f} {1 / per_query:>10.0f} {recall:>9.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
