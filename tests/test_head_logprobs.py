"""Log-probs, entropies and next-token losses computed piece by piece off hidden states equal the plain formulas
(the output layer's full logits, a log-softmax, a gather) in value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chatforge.model.gpt import GPT, GPTConfig
from chatforge.train import head_logprobs
from chatforge.train.head_logprobs import next_token_loss, output_layer, token_logprobs

VOCAB = 300


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch):
    monkeypatch.setattr(head_logprobs, "CHUNK_ELEMENTS", 7 * VOCAB)  # 7 rows a piece: 40 rows make 6 pieces


def model(arch: str, softcap: float = 0.0) -> GPT:
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=1, n_head=2, n_embd=32, arch=arch,
                        logit_softcap=softcap))
    if arch == "modern":  # its head starts near zero: spread the logits so the softmax is far from uniform
        torch.nn.init.normal_(gpt.lm_head.weight, std=0.5)
    return gpt


def plain(gpt: GPT, hidden: torch.Tensor, targets: torch.Tensor):
    """The formulas PPO used before: full logits, fp32 log-softmax, gather; entropy −Σ p log p."""
    logp = torch.log_softmax(gpt.logits(hidden).float(), -1)
    return logp.gather(1, targets.unsqueeze(1)).squeeze(1), -(logp.exp() * logp).sum(-1)


def grads(value: torch.Tensor, *inputs, retain_graph: bool = False):
    return torch.autograd.grad(value, inputs, retain_graph=retain_graph)


@pytest.mark.parametrize("keep", [True, False], ids=["probabilities kept", "recomputed"])
@pytest.mark.parametrize("arch, softcap", [("gpt2", 0.0), ("modern", 0.0), ("modern", 15.0)])
def test_token_logprobs_and_entropy_equal_the_log_softmax_of_the_logits(arch, softcap, keep, monkeypatch):
    if not keep:
        monkeypatch.setattr(head_logprobs, "KEEP_ELEMENTS", 0)
    gpt = model(arch, softcap)
    weight, _ = output_layer(gpt)
    hidden = torch.randn(40, 32, requires_grad=True)
    targets = torch.randint(0, VOCAB, (40,))
    upstream = torch.randn(40)  # any function of the log-probs: the gradient must be right per row
    expected, expected_entropy = plain(gpt, hidden, targets)
    logprobs, entropy = token_logprobs(gpt, hidden, targets, entropy=True)
    assert logprobs.dtype == entropy.dtype == torch.float32 and logprobs.shape == (40,)
    torch.testing.assert_close(logprobs, expected, rtol=0, atol=2e-6)
    torch.testing.assert_close(entropy, expected_entropy, rtol=0, atol=2e-5)
    assert not entropy.requires_grad
    want = grads((expected * upstream).sum(), hidden, weight)
    first = grads((logprobs * upstream).sum(), hidden, weight, retain_graph=True)
    second = grads((logprobs * upstream).sum(), hidden, weight)  # kept probabilities are not consumed by backward
    for got, expected_grad in (*zip(first, want), *zip(second, want)):
        torch.testing.assert_close(got, expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch, softcap", [("gpt2", 0.0), ("modern", 15.0)])
def test_next_token_loss_equals_cross_entropy_with_ignored_targets(arch, softcap):
    gpt = model(arch, softcap)
    weight, _ = output_layer(gpt)
    hidden = torch.randn(40, 32, requires_grad=True)
    targets = torch.randint(0, VOCAB, (40,))
    targets[[3, 17]] = -1
    expected = F.cross_entropy(gpt.logits(hidden).float(), targets, ignore_index=-1)
    loss = next_token_loss(gpt, hidden, targets)
    torch.testing.assert_close(loss, expected, rtol=0, atol=2e-6)
    # the gradient is computed in the forward pass and scaled by backward's: check a scale other than 1
    for got, want in zip(grads(0.3 * loss, hidden, weight), grads(0.3 * expected, hidden, weight)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(next_token_loss(gpt, hidden, targets), expected.detach(), rtol=0, atol=2e-6)


def test_under_bf16_autocast_they_are_as_close_to_fp32_as_the_plain_formulas_are():
    """The products run in bf16 as lm_head's would; the error against fp32 is the plain bf16 formulas' error."""
    gpt = model("modern")
    weight, _ = output_layer(gpt)
    hidden = torch.randn(40, 32, requires_grad=True)
    targets = torch.randint(0, VOCAB, (40,))
    upstream = torch.randn(40)
    exact, _ = plain(gpt, hidden, targets)
    exact_grads = grads((exact * upstream).sum(), hidden, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        old, _ = plain(gpt, hidden, targets)
        new, _ = token_logprobs(gpt, hidden, targets)
    for got in (old, new):
        assert got.dtype == torch.float32
    old_grads = grads((old * upstream).sum(), hidden, weight)
    new_grads = grads((new * upstream).sum(), hidden, weight)
    assert (new - exact).abs().max() <= 1.5 * (old - exact).abs().max() + 1e-6
    assert (new - exact).abs().max() > 0  # it really computed in bf16
    for new_g, old_g, exact_g in zip(new_grads, old_grads, exact_grads):
        assert new_g.dtype == exact_g.dtype == torch.float32
        assert (new_g - exact_g).norm() <= 1.5 * (old_g - exact_g).norm()
