"""Losses of a reward model on rankings of K responses to one prompt, as InstructGPT trains it.

A ranking is a list of tiers, best first: ``[[2], [0, 3], [1]]`` says 2 beats 0 and 3 (a tie), which beat 1;
responses in no tier are unranked. Only pairs with a known order count. All K responses of a prompt are
scored in one forward pass and their C(K,2) comparisons averaged into one loss term, so a prompt's pairs are
never shuffled apart into separate batch elements (which InstructGPT found overfits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ordered_pairs(tiers: list[list[int]]) -> list[tuple[int, int]]:
    """(winner, loser) for every pair whose order the tiers fix."""
    return [(w, lose) for i, better in enumerate(tiers) for worse in tiers[i + 1 :] for w in better for lose in worse]


def pairwise_loss(scores: torch.Tensor, tiers: list[list[int]]) -> torch.Tensor:
    """Mean of −log σ(r_w − r_l) over the prompt's known-order pairs."""
    winners, losers = zip(*ordered_pairs(tiers))
    return -F.logsigmoid(scores[list(winners)] - scores[list(losers)]).mean()


def plackett_luce_loss(scores: torch.Tensor, tiers: list[list[int]]) -> torch.Tensor:
    """Listwise: −log P(ranking) under Plackett–Luce. Each response competes with itself and everything ranked
    below its tier (tied responses do not compete with one another); the last tier chooses nothing."""
    terms = []
    for i, tier in enumerate(tiers[:-1]):
        below = [j for worse in tiers[i + 1 :] for j in worse]
        for item in tier:
            pool = scores[[item] + below]
            terms.append(torch.logsumexp(pool, 0) - scores[item])
    return torch.stack(terms).mean()


def pairwise_accuracy(scores: torch.Tensor, tiers: list[list[int]]) -> tuple[int, int]:
    """(pairs the scores order correctly, pairs with a known order)."""
    pairs = ordered_pairs(tiers)
    return sum(int(scores[w] > scores[lose]) for w, lose in pairs), len(pairs)
