"""Reward-model losses on rankings: hand-computed values, tiers, and a prompt's pairs kept together."""

from __future__ import annotations

import math

import pytest
import torch

from chatforge.data.rankings import normalize_ranking
from chatforge.errors import ChatforgeError
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.heads import ScalarHeadModel
from chatforge.train.preference import ordered_pairs, pairwise_accuracy, pairwise_loss, plackett_luce_loss


def _nll_sigmoid(x: float) -> float:
    return -math.log(1 / (1 + math.exp(-x)))


def test_pairwise_loss_matches_a_hand_computed_example():
    scores = torch.tensor([1.0, 0.0, 2.0])
    tiers = normalize_ranking([2, 0, 1], 3)  # 2 > 0 > 1
    expected = (_nll_sigmoid(2 - 1) + _nll_sigmoid(2 - 0) + _nll_sigmoid(1 - 0)) / 3
    assert pairwise_loss(scores, tiers).item() == pytest.approx(expected, rel=1e-6)
    assert pairwise_accuracy(scores, tiers) == (3, 3)


def test_ties_and_partial_orders_only_count_known_pairs():
    tiers = normalize_ranking([[1], [0, 3]], 5)  # 1 beats 0 and 3; 0 ~ 3 tie; 2 and 4 unranked
    assert sorted(ordered_pairs(tiers)) == [(1, 0), (1, 3)]
    with pytest.raises(ChatforgeError, match="twice"):
        normalize_ranking([0, 0], 2)
    with pytest.raises(ChatforgeError, match="outside"):
        normalize_ranking([0, 7], 3)
    with pytest.raises(ChatforgeError, match="orders nothing"):
        normalize_ranking([[0, 1]], 2)


def test_plackett_luce_matches_a_hand_computed_example():
    scores = torch.tensor([0.5, -1.0, 2.0])
    tiers = normalize_ranking([2, 0, 1], 3)
    s = scores.tolist()
    first = math.log(sum(math.exp(v) for v in s)) - s[2]
    second = math.log(math.exp(s[0]) + math.exp(s[1])) - s[0]
    assert plackett_luce_loss(scores, tiers).item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_score_reads_the_last_real_token_and_head_starts_at_zero():
    torch.manual_seed(0)
    model = ScalarHeadModel(GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)))
    idx = torch.randint(0, 50, (2, 8))
    assert model.score(idx, torch.tensor([8, 5])).abs().max().item() == 0.0
    torch.nn.init.normal_(model.head.weight)
    values = model(idx)
    assert torch.equal(model.score(idx, torch.tensor([8, 5])), torch.stack([values[0, 7], values[1, 4]]))
