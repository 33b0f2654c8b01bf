"""PPO arithmetic: KL-shaped rewards, GAE, the clipped objectives, the adaptive KL controller."""

from __future__ import annotations

import math

import pytest
import torch

from chatforge.train.ppo_math import AdaptiveKL, gae, policy_loss, token_rewards, value_loss, whiten


def test_kl_is_zero_and_advantage_is_the_reward_when_actor_equals_reference():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = token_rewards(logprobs, logprobs.clone(), scores, mask, beta=0.1)
    assert kl.abs().max().item() == 0
    assert rewards.tolist() == [[0.0, 0.0, 2.0], [0.0, -1.0, 0.0]]
    advantages, returns = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    assert advantages.tolist() == [[2.0, 2.0, 2.0], [-1.0, -1.0, 0.0]]  # every token earns the final score
    assert torch.equal(returns, advantages)


def test_kl_penalty_is_per_token():
    logprobs, ref = torch.tensor([[-1.0, -1.0]]), torch.tensor([[-2.0, -1.5]])
    rewards, kl = token_rewards(logprobs, ref, torch.tensor([0.0]), torch.ones(1, 2), beta=0.5)
    assert kl.tolist() == [[1.0, 0.5]] and rewards.tolist() == [[-0.5, -0.25]]


def test_gae_matches_a_hand_computed_value():
    rewards, values, mask = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 1.0]]), torch.ones(1, 2)
    advantages, _ = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    delta1 = 2.0 - 1.0
    delta0 = 1.0 + 0.9 * 1.0 - 0.5
    assert advantages[0, 1].item() == pytest.approx(delta1)
    assert advantages[0, 0].item() == pytest.approx(delta0 + 0.9 * 0.8 * delta1)


def test_clipped_objective_matches_a_hand_computed_value():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    loss, clip_frac = policy_loss(new, old, adv, torch.ones(1, 3), clip=0.2)
    # token 1: min(1.5, 1.2)*1 = 1.2; token 2: min(-0.5, -0.8) = -0.8; token 3: min(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx(-(1.2 - 0.8 + 2.2) / 3, rel=1e-6)
    assert clip_frac.item() == pytest.approx(2 / 3)


def test_value_loss_takes_the_larger_of_clipped_and_unclipped():
    values, old, returns = torch.tensor([[2.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]])
    assert value_loss(values, old, returns, torch.ones(1, 1), clip=0.5).item() == pytest.approx(0.5 * 1.5 ** 2)


def test_whiten_and_adaptive_kl():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 99.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    assert w[0, :3].mean().item() == pytest.approx(0, abs=1e-6) and w[0, 3].item() == 0
    controller = AdaptiveKL(beta=0.1, target=6.0, horizon=10000)
    controller.update(kl=12.0, n_samples=1000)  # KL too high: β grows, by at most 20 % of n/horizon
    assert controller.beta == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    controller.update(kl=0.0, n_samples=1000)
    assert controller.beta < 0.1 * (1 + 0.2 * 0.1)
    assert not math.isnan(controller.beta)
