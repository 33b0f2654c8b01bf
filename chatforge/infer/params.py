"""Decoding settings of one request, checked before any compute is spent on it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from chatforge.config import ChatforgeError, option

MAX_TOP_LOGPROBS = 20  # as OpenAI: alternatives beyond this are noise and cost a top-k over the vocabulary


@dataclass
class SamplingParams:
    """How to decode one request. Field names and meanings follow OpenAI's completions API where it has one.

    Log-probabilities (``logprobs``, ``echo``) are always those of the model itself, before any penalty,
    bias, temperature or filtering, so they can be compared across settings and used as PPO's behaviour
    policy (sample with ``temperature=1`` and no filtering, and the two distributions coincide).
    """

    max_tokens: int | None = option(64, "most tokens to generate per sample (none: until the context is full)")
    min_tokens: int = option(0, "stop tokens are suppressed until this many tokens were generated")
    temperature: float = option(1.0, "sampling temperature; 0 = greedy", ge=0)
    top_k: int = option(0, "sample only among the k most likely tokens (0 = off)")
    top_p: float = option(1.0, "sample only among the most likely tokens whose probability reaches top_p (1 = off)",
                          gt=0, le=1)
    min_p: float = option(0.0, "drop tokens less likely than min_p times the most likely one (0 = off)", ge=0, le=1)
    repetition_penalty: float = option(1.0, "CTRL/HF: divide positive logits of prompt and generated tokens by it, "
                                            "multiply negative ones (1 = off)", gt=0)
    presence_penalty: float = option(0.0, "OpenAI: subtract from the logit of every token generated so far, once",
                                     ge=-2, le=2)
    frequency_penalty: float = option(0.0, "OpenAI: subtract count times from the logit of every generated token",
                                      ge=-2, le=2)
    logit_bias: dict[int, float] = option({}, 'added to the logits of token ids, JSON: {"50": -100}')
    stop: list[str] = option([], "stop strings (may span tokens; cut from the text)")
    stop_token_ids: list[int] = option([], "token ids that end a sample, besides end-of-text / end-of-turn")
    ignore_eos: bool = option(False, "do not stop at end-of-text / end-of-turn")
    n: int = option(1, "samples returned per prompt")
    best_of: int | None = option(None, "samples drawn per prompt; the n with the highest mean log-prob are returned")
    seed: int | None = option(None, "makes sampling reproducible, whatever else shares the batch")
    logprobs: int | None = option(None, "return each sampled token's log-prob and its k most likely alternatives")
    echo: bool = option(False, "also return the log-probs of the prompt's tokens")
    truncate: bool = option(False, "drop the oldest prompt tokens when the prompt does not fit the context")
    skip_special_tokens: bool = option(True, "special tokens add no text")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SamplingParams":
        """Build from a mapping (e.g. a JSON request body); unknown names are rejected, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ChatforgeError(f"unknown sampling parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        params = cls(**values)
        params.validate()
        return params

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def num_samples(self) -> int:
        """Sequences actually decoded for this request (``best_of`` if set, else ``n``)."""
        return self.best_of or self.n

    def validate(self) -> "SamplingParams":
        """Raise ChatforgeError naming the first bad setting; normalise ``stop`` given as a single string."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check_type("max_tokens", self.max_tokens, int, optional=True)
        _check_type("min_tokens", self.min_tokens, int)
        _check_type("top_k", self.top_k, int)
        _check_type("n", self.n, int)
        _check_type("best_of", self.best_of, int, optional=True)
        _check_type("seed", self.seed, int, optional=True)
        _check_type("logprobs", self.logprobs, int, optional=True)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            _check_type(name, getattr(self, name), float)
            if not math.isfinite(getattr(self, name)):
                raise ChatforgeError(f"{name} must be a finite number, got {getattr(self, name)}")
        for name in ("ignore_eos", "echo", "truncate", "skip_special_tokens"):
            _check_type(name, getattr(self, name), bool)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ChatforgeError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise ChatforgeError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.temperature < 0:
            raise ChatforgeError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ChatforgeError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ChatforgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ChatforgeError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ChatforgeError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ChatforgeError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not isinstance(self.logit_bias, dict):
            raise ChatforgeError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}")
        self.logit_bias = {_token_id("logit_bias", k): _bias(k, v) for k, v in self.logit_bias.items()}
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ChatforgeError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, list):
            raise ChatforgeError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        self.stop_token_ids = [_token_id("stop_token_ids", t) for t in self.stop_token_ids]
        if self.n < 1:
            raise ChatforgeError(f"n must be >= 1, got {self.n}")
        if self.best_of is not None and self.best_of < self.n:
            raise ChatforgeError(f"best_of ({self.best_of}) must be >= n ({self.n})")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ChatforgeError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}] (or unset), got {self.logprobs}")
        return self


def _check_type(name: str, value: Any, tp: type, optional: bool = False) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ChatforgeError(f"{name} must be {'an integer' if tp is int else 'a ' + tp.__name__}, got {value!r}")


def _token_id(name: str, value: Any) -> int:
    """Token ids arrive as ints, or as strings when they were JSON object keys."""
    try:
        token = int(value)
    except (TypeError, ValueError):
        raise ChatforgeError(f"{name}: {value!r} is not a token id") from None
    if token < 0 or isinstance(value, (bool, float)):
        raise ChatforgeError(f"{name}: {value!r} is not a token id")
    return token


def _bias(token: Any, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
        raise ChatforgeError(f"logit_bias[{token}] must be a number in [-100, 100], got {value!r}")
    return float(value)
