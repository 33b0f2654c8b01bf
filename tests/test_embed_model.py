import math

import numpy as np
import pytest
import torch

from chatforge.embed.model import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    ChatforgeEmbedder,
    EmbeddingModel,
    EmbedSpec,
    grad_cache_step,
    info_nce,
    pool,
)
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.tokenizer import Tokenizer

TINY = GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32)


def test_info_nce_matches_a_hand_computed_example():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    # logits = 2 * q @ d.T = [[1.2, 0], [1.6, 2]]
    rows = (-1.2 + math.log(math.exp(1.2) + 1)) + (-2 + math.log(math.exp(1.6) + math.exp(2)))
    cols = (-1.2 + math.log(math.exp(1.2) + math.exp(1.6))) + (-2 + math.log(1 + math.exp(2)))
    expected = (rows / 2 + cols / 2) / 2
    assert info_nce(q, d, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_pooling_ignores_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    lengths = torch.tensor([2, 4])
    assert torch.equal(pool(hidden, lengths, "last"), torch.stack([hidden[0, 1], hidden[1, 3]]))
    assert torch.allclose(pool(hidden, lengths, "mean"), torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)]))


def test_embeddings_are_unit_length_and_do_not_depend_on_padding():
    torch.manual_seed(0)
    model = EmbeddingModel(GPT(TINY), proj_dim=8).eval()
    ids = torch.randint(0, 50, (1, 6))
    alone = model(ids, torch.tensor([6]))
    padded = model(torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1), torch.tensor([6]))
    assert alone.shape == (1, 8)
    assert torch.allclose(alone.norm(dim=-1), torch.ones(1))
    assert torch.allclose(alone, padded, atol=1e-5)


def test_temperature_is_clamped():
    model = EmbeddingModel(GPT(TINY), temperature=0.05)
    assert model.scale().item() == pytest.approx(20.0)
    with torch.no_grad():
        model.log_inv_temperature.fill_(20.0)
    assert model.scale().item() == pytest.approx(1 / MIN_TEMPERATURE)
    with torch.no_grad():
        model.log_inv_temperature.fill_(-5.0)
    assert model.scale().item() == pytest.approx(1 / MAX_TEMPERATURE)


def _batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n,), generator=g)
    ids = torch.randint(0, 50, (n, int(lengths.max())), generator=g)
    return ids, lengths


def _chunks(ids, lengths, size):
    # each chunk padded only to its own longest row, as a real chunked encoder would
    return [
        (ids[i : i + size, : int(lengths[i : i + size].max())], lengths[i : i + size]) for i in range(0, len(ids), size)
    ]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_caching_equals_the_full_batch_gradient(dropout):
    torch.manual_seed(0)
    cfg = GPTConfig(**{**TINY.to_dict(), "dropout": dropout})
    model = EmbeddingModel(GPT(cfg), proj_dim=16)
    qa, ql = _batch(8, 1)
    da, dl = _batch(8, 2)

    if dropout == 0.0:
        model.zero_grad()
        full = info_nce(model(qa, ql), model(da, dl), model.scale())
        full.backward()
    else:  # with dropout the reference must draw the same masks, chunk by chunk, in the same order
        model.zero_grad()
        state = torch.get_rng_state()
        embs = []
        for ids, lengths in _chunks(qa, ql, 3) + _chunks(da, dl, 3):
            embs.append(model(ids, lengths))
        full = info_nce(torch.cat(embs[:3]), torch.cat(embs[3:]), model.scale())
        full.backward()
        torch.set_rng_state(state)
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    cached = grad_cache_step(model, _chunks(qa, ql, 3), _chunks(da, dl, 3))
    assert cached.item() == pytest.approx(full.item(), rel=1e-5)
    for name, p in model.named_parameters():
        # chunked and whole-batch sums round differently: gradients reach ~30, so compare at float32 noise of that scale
        assert torch.allclose(p.grad, reference[name], atol=1e-4, rtol=1e-4), name
    assert reference["log_inv_temperature"].abs().item() > 0  # the temperature is learned too


@pytest.fixture(scope="module")
def tokenizer():
    corpus = ["def add(a, b):\n    return a + b\n", "I like apples. I hate apples. query: document: "] * 20
    return Tokenizer.train(corpus, vocab_size=300)


def _embedder(kind, tokenizer):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32))
    return ChatforgeEmbedder(EmbeddingModel(gpt), tokenizer, EmbedSpec(kind=kind, max_tokens=24))


def test_search_markers_make_query_and_document_differ_and_similarity_does_not(tokenizer):
    texts = ["I like apples", "def add(a, b): return a + b"]
    similarity, search = _embedder("similarity", tokenizer), _embedder("search", tokenizer)
    q_ids, _ = similarity.encode(texts, "query")
    d_ids, _ = similarity.encode(texts, "document")
    assert torch.equal(q_ids, d_ids)
    assert np.allclose(similarity.embed(texts, "query"), similarity.embed(texts, "document"))
    q_ids, q_len = search.encode(texts, "query")
    d_ids, d_len = search.encode(texts, "document")
    end = tokenizer.eot_id
    assert q_ids[0, 0] == end and q_ids[0, q_len[0] - 1] == end  # framed by end tokens
    assert tokenizer.decode(q_ids[0, 1 : q_len[0] - 1].tolist()) == "query: I like apples"
    assert tokenizer.decode(d_ids[0, 1 : d_len[0] - 1].tolist()) == "document: I like apples"
    assert not np.allclose(search.embed(texts, "query"), search.embed(texts, "document"), atol=1e-4)


def test_long_texts_are_truncated_but_keep_their_end_token(tokenizer):
    search = _embedder("search", tokenizer)
    ids, lengths = search.encode(["apples " * 200], "document")
    assert lengths.item() == 24 and ids[0, 23] == tokenizer.eot_id


def test_spec_rejects_bad_values():
    with pytest.raises(ChatforgeError, match="embedding.kind"):
        EmbedSpec(kind="both").validate()
    with pytest.raises(ChatforgeError, match="different"):
        EmbedSpec(kind="search", query_marker="x", document_marker="x").validate()


def test_embedder_save_load_round_trip(tokenizer, tmp_path):
    embedder = _embedder("search", tokenizer)
    embedder.info["steps"] = 3
    embedder.save(tmp_path / "run" / "embedder")
    loaded = ChatforgeEmbedder.load(tmp_path / "run", device="cpu")  # the run directory works too
    texts = ["I like apples", "def add(a, b): return a + b"]
    assert np.allclose(loaded.embed(texts, "query"), embedder.embed(texts, "query"), atol=1e-6)
    assert loaded.info == {"steps": 3}
    assert loaded.spec() == {"type": "chatforge", "path": str((tmp_path / "run" / "embedder").resolve())}
    with pytest.raises(ChatforgeError, match="no embedding model"):
        ChatforgeEmbedder.load(tmp_path / "missing")
