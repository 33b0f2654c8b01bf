import pytest
import torch

from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, PRESETS, GPTConfig, preset_config
from chatforge.model.kv_cache import KVCache

TINY = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=16)


def test_forward_shapes_and_loss_ignores_minus_one():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx = torch.randint(0, 97, (3, 10))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 10, 97)
    targets = idx.clone()
    targets[:, 5:] = -1
    _, masked = model(idx, targets)
    _, first_half = model(idx[:, :5], idx[:, :5])
    assert torch.allclose(masked, first_half, atol=1e-6)  # causal: later tokens do not change earlier logits


def test_output_projection_is_tied_to_embedding():
    model = GPT(TINY)
    hidden = torch.randn(1, 1, 16)
    assert torch.allclose(model.logits(hidden), hidden @ model.wte.weight.T)


def test_kv_cache_matches_full_recompute_with_rows_at_different_positions():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 4))
    cache = KVCache.for_model(model, batch_size=2)
    # prefill each row separately (different lengths), then decode both rows together
    cache_a = KVCache.for_model(model, batch_size=1)
    with torch.no_grad():
        model(a, kv_cache=cache_a)
        cache.k[:, 0], cache.v[:, 0], cache.lengths[0] = cache_a.k[:, 0], cache_a.v[:, 0], 7
        cache_b = KVCache.for_model(model, batch_size=1)
        model(b, kv_cache=cache_b)
        cache.k[:, 1], cache.v[:, 1], cache.lengths[1] = cache_b.k[:, 0], cache_b.v[:, 0], 4
        nxt = torch.tensor([[5], [9]])
        step_logits, _ = model(nxt, kv_cache=cache)
        full_a, _ = model(torch.cat([a, nxt[:1]], 1))
        full_b, _ = model(torch.cat([b, nxt[1:]], 1))
    assert torch.allclose(step_logits[0, -1], full_a[0, -1], atol=1e-5)
    assert torch.allclose(step_logits[1, -1], full_b[0, -1], atol=1e-5)
    assert cache.lengths.tolist() == [8, 5]


def test_context_overflow_is_a_clear_error():
    model = GPT(TINY)
    with pytest.raises(ChatforgeError, match="context"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = KVCache.for_model(model, batch_size=1, max_len=8)
    with pytest.raises(ChatforgeError, match="context full"):
        model(torch.zeros(1, 9, dtype=torch.long), kv_cache=cache)


def test_presets_validate_and_bad_config_is_named():
    for name in PRESETS:
        preset_config(name).validate()
    with pytest.raises(ChatforgeError, match="n_embd"):
        GPTConfig(n_embd=10, n_head=3).validate()
    with pytest.raises(ChatforgeError, match="unknown model preset"):
        preset_config("gpt5")
