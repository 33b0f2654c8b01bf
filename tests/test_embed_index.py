import hashlib

import numpy as np
import pytest

from chatforge.embed.base import token_windows
from chatforge.embed.evaluate import retrieval_metrics
from chatforge.embed.index import SearchIndex
from chatforge.errors import ChatforgeError


class BagOfWords:
    """A deterministic embedder for index tests: hashed word counts, L2-normalised."""

    name = "bag-of-words"
    dim = 64

    def embed(self, texts, role="document"):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i, int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    def chunk(self, text, chunk_tokens, overlap):
        words = text.split()
        return [" ".join(words[a:b]) for a, b in token_windows(len(words), chunk_tokens, overlap)] if words else []

    def spec(self):
        return {"type": "bag-of-words"}


DOCS = [
    ("fruit", "apples and pears grow on trees in the orchard"),
    ("code", "def sort(items): return sorted(items) python function"),
    ("sea", "the ocean has waves and salt water and fish"),
    ("long", " ".join(f"filler{i}" for i in range(30)) + " zebra stripes"),
]


def test_token_windows_overlap_and_cover():
    assert token_windows(10, 4, 1) == [(0, 4), (3, 7), (6, 10)]
    assert token_windows(3, 4, 1) == [(0, 3)]
    with pytest.raises(ChatforgeError, match="overlap"):
        token_windows(10, 4, 4)


def test_search_finds_the_relevant_document_and_chunks_long_ones():
    index = SearchIndex.build(DOCS, BagOfWords(), chunk_tokens=8, overlap=2, backend="numpy")
    assert index.doc_ids.count("long") == 5  # 32 words in windows of 8 sharing 2
    assert index.search("python sort function", k=1)[0].doc_id == "code"
    hit = index.search("zebra stripes", k=1)[0]
    assert hit.doc_id == "long" and "zebra" in hit.chunk and 0 < hit.score <= 1.0 + 1e-6


@pytest.mark.parametrize("backend", ["faiss", "hnsw"])
def test_faiss_backends_agree_with_exact_numpy_search(backend):
    pytest.importorskip("faiss", reason="faiss-cpu is not installed")
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [str(i) for i in range(500)]
    exact = SearchIndex(BagOfWords(), vectors, ids, ids, backend="numpy")
    other = SearchIndex(BagOfWords(), vectors, ids, ids, backend=backend)
    queries = rng.normal(size=(20, 32)).astype(np.float32)
    exact_hits, other_hits = exact.search_vectors(queries, 10), other.search_vectors(queries, 10)
    if backend == "faiss":  # both exact: identical ids in identical order, same scores
        assert [[h.doc_id for h in row] for row in exact_hits] == [[h.doc_id for h in row] for row in other_hits]
        assert np.allclose(
            [[h.score for h in r] for r in exact_hits], [[h.score for h in r] for r in other_hits], atol=1e-5
        )
    else:  # approximate: nearly all true neighbours found
        found = sum(len({h.doc_id for h in a} & {h.doc_id for h in b}) for a, b in zip(exact_hits, other_hits))
        assert found / 200 >= 0.9


@pytest.mark.parametrize("backend", ["numpy", "faiss", "hnsw"])
def test_save_load_round_trip_gives_the_same_hits(tmp_path, backend):
    if backend != "numpy":
        pytest.importorskip("faiss", reason="faiss-cpu is not installed")
    index = SearchIndex.build(DOCS, BagOfWords(), chunk_tokens=8, overlap=2, backend=backend)
    index.save(tmp_path / "idx")
    index.save(tmp_path / "idx")  # saving over an existing index replaces it whole
    loaded = SearchIndex.load(tmp_path / "idx", embedder=BagOfWords())
    assert loaded.backend == backend and len(loaded) == len(index) and loaded.meta["chunk_tokens"] == 8
    for query in ("apples orchard", "ocean fish", "zebra"):
        assert loaded.search(query, 3) == index.search(query, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no staging directories left behind


def test_failed_save_leaves_the_previous_index(tmp_path, monkeypatch):
    index = SearchIndex.build(DOCS, BagOfWords(), chunk_tokens=8, overlap=2, backend="numpy")
    index.save(tmp_path / "idx")
    monkeypatch.setattr(np, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        SearchIndex.build(DOCS[:1], BagOfWords(), backend="numpy").save(tmp_path / "idx")
    assert len(SearchIndex.load(tmp_path / "idx", embedder=BagOfWords())) == len(index)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_index_errors_are_clear(tmp_path):
    with pytest.raises(ChatforgeError, match="no search index"):
        SearchIndex.load(tmp_path)
    with pytest.raises(ChatforgeError, match="every document was empty"):
        SearchIndex.build([("a", "  ")], BagOfWords())
    with pytest.raises(ChatforgeError, match="unknown index backend"):
        SearchIndex.build(DOCS, BagOfWords(), backend="annoy")


def test_retrieval_metrics_by_hand():
    docs = np.eye(3, dtype=np.float32)
    # query 0 ranks its document first; query 1 second; query 2 ties with a distractor (counted against it)
    queries = np.array([[1, 0, 0], [0.9, 0.1, 0], [0.5, 0, 0.5]], dtype=np.float32)
    m = retrieval_metrics(queries, docs, k=10)
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    assert m["recall@10"] == 1.0
    assert retrieval_metrics(queries, docs, k=1)["mrr@1"] == pytest.approx(1 / 3)
