"""A GPT with a scalar head: the reward model (score at the last token) and the PPO critic (a value per token)."""

from __future__ import annotations

import torch
from torch import nn

from chatforge.model.gpt import GPT


class ScalarHeadModel(nn.Module):
    """``gpt`` plus a linear map from each final hidden state to one number.

    The head starts at zero so a fresh reward model or critic says 0 everywhere instead of noise that the
    first updates would have to unlearn.
    """

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt
        self.config = gpt.config
        freeze_output_layer(gpt)
        self.head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """One value per position, [B, T]."""
        return self.head(self.gpt.hidden_states(idx)).squeeze(-1).float()

    def score(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The value at each row's last real token (rows are right-padded to a common width), [B]."""
        values = self(idx)
        return values.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)


def freeze_output_layer(gpt: GPT) -> None:
    """Stop training the untied output layer (``lm_head``, arch=modern) of a GPT read through its hidden states
    alone: it gets no gradient, and DDP, which waits for every trainable parameter's, would fail its next step."""
    head = getattr(gpt, "lm_head", None)
    if head is not None:
        head.requires_grad_(False)
