import pytest
import torch

from chatforge.errors import ChatforgeError
from chatforge.model.gpt import (
    GPT,
    PRESETS,
    GPTConfig,
    causal_attention,
    preset_config,
    rms_norm,
    written_out_causal_attention,
)
from chatforge.model.kv_cache import KVCache

TINY = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=16)
MODERN = GPTConfig(vocab_size=97, block_size=32, n_layer=3, n_head=4, n_embd=32, arch="modern", logit_softcap=15.0)
GQA = GPTConfig(vocab_size=97, block_size=32, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, arch="modern")
CONFIGS = pytest.mark.parametrize("config", [TINY, MODERN, GQA], ids=["gpt2", "modern", "modern-gqa"])


def randomized(config: GPTConfig) -> GPT:
    """A model with every weight random: modern's zero-initialised projections would hide position bugs."""
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    return model


@CONFIGS
def test_forward_shapes_and_loss_ignores_minus_one(config):
    model = randomized(config)
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


@CONFIGS
def test_kv_cache_matches_full_recompute_with_rows_at_different_positions(config):
    model = randomized(config)
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
    assert torch.allclose(step_logits[0, -1], full_a[0, -1], atol=1e-4)
    assert torch.allclose(step_logits[1, -1], full_b[0, -1], atol=1e-4)
    assert cache.lengths.tolist() == [8, 5]


def test_modern_architecture_pieces():
    model = GPT(MODERN)
    names = {n for n, _ in model.named_parameters()}
    assert "wpe.weight" not in names and "lm_head.weight" in names  # rotary positions, untied head
    assert not any(n.endswith("bias") for n in names)
    assert set(model.value_embeds) == {"0", "2"}  # alternating layers, the last included
    for block in model.h:  # zero-initialised output projections: the blocks start as identities
        assert block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
    logits, _ = randomized(MODERN)(torch.randint(0, 97, (2, 8)))
    assert logits.abs().max() < 15.0  # soft-capped


def test_grouped_query_attention_shrinks_the_kv_cache():
    full, grouped = KVCache.for_model(GPT(MODERN), 1), KVCache.for_model(GPT(GQA), 1)
    assert grouped.k.numel() * 2 == full.k.numel()
    with pytest.raises(ChatforgeError, match="n_kv_head"):
        GPTConfig(arch="modern", n_head=4, n_kv_head=3, n_embd=32).validate()
    with pytest.raises(ChatforgeError, match="arch=modern"):
        GPTConfig(n_head=4, n_kv_head=2, n_embd=32).validate()


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


@pytest.mark.parametrize("form", ["this CPU's", "written out"])
def test_attention_under_cpu_autocast_is_causal_and_close_to_fp32(form):
    """Under an eager CPU bf16 autocast whole-sequence attention is written out, or SDPA's fp32 kernel on an AMX CPU:
    either way values and gradients within bf16 rounding of fp32 SDPA's, grouped-query heads included, a bf16 result
    as autocast gives, and a position never sees a later one. Both forms are checked on every machine."""
    def attention(q, k, v, dropout, gqa):
        if form == "written out":
            return written_out_causal_attention(q, k, v)
        return causal_attention(q, k, v, dropout, gqa)

    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    k, v = (torch.randn(2, 2, 16, 8, requires_grad=True) for _ in range(2))
    expected = causal_attention(q, k, v, 0.0, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention(q, k, v, 0.0, True)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=3e-2)
    grads = torch.autograd.grad(got.float().square().sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad(expected.square().sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=0, atol=0.1 * float(b.abs().max()))
    later = k.detach().clone()
    later[:, :, 9:] = torch.randn_like(later[:, :, 9:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moved = attention(q, later, v, 0.0, True)
    assert torch.equal(moved[:, :, :9], got[:, :, :9]) and not torch.equal(moved[:, :, 9:], got[:, :, 9:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_of_a_training_step_equals_torchs_in_value_and_gradient(dtype):
    """Eager training takes rms_norm's own backward (three passes); it must give torch's gradient."""
    torch.manual_seed(0)
    # rows of every scale: where the mean square is small, the eps inside the square root must be torch's
    scales = torch.logspace(-3, 1, 15).view(3, 5, 1)
    x = (torch.randn(3, 5, 16) * scales).to(dtype).requires_grad_()
    weights = torch.randn(3, 5, 16)
    got = rms_norm(x)
    expected = torch.nn.functional.rms_norm(x, (16,))
    assert got.dtype == dtype and torch.equal(got, expected)
    (grad,) = torch.autograd.grad((got.float() * weights).sum(), x)
    (want,) = torch.autograd.grad((expected.float() * weights).sum(), x)
    assert grad.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(grad.float(), want.float(), rtol=tolerance, atol=tolerance * float(want.abs().max()))
    with torch.no_grad():  # scoring and decoding keep torch's kernel
        assert torch.equal(rms_norm(x), expected)
