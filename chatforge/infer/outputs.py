"""What the engine hands back: whole completions, streamed deltas, log-probabilities."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class TokenLogprob:
    """The model's log-probability of one token, with the ``top`` most likely alternatives at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, log-prob), most likely first


@dataclass
class Choice:
    """One sample of a request.

    ``token_ids`` are every sampled token, including a final stop token; ``text`` is their decoded text
    without the stop token and cut before a stop string.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None
    cumulative_logprob: float | None = None  # sum of the sampled tokens' log-probs, when they were computed

    @property
    def token_logprobs(self) -> list[float]:
        """Log-probs of the sampled tokens (PPO's behaviour-policy log-probs); empty if not requested."""
        return [lp.logprob for lp in self.logprobs or []]


@dataclass
class Completion:
    prompt_ids: list[int]  # as decoded: after truncation, if the request asked for it
    choices: list[Choice]
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with ``echo``; the first token has no context

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)


@dataclass
class Delta:
    """What one decode step added to choice ``index``: new text (possibly empty while a multi-byte character
    or a possible stop string is held back), new tokens, and the finish reason on the choice's last delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
