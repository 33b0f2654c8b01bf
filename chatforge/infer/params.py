"""Decoding settings of one request, checked before any compute is spent on it."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from chatforge.config import option
from chatforge.errors import ChatforgeError

MAX_TOP_LOGPROBS = 20  # as OpenAI: alternatives beyond this are noise and cost a top-k over the vocabulary
MAX_TEMPERATURE = 2.0  # as OpenAI
GREEDY_BELOW = 1e-5  # a temperature this small is greedy decoding (dividing by it would overflow the logits)
MAX_REPETITION_PENALTY = 10.0
MAX_STOP_STRINGS = 16  # the server allows OpenAI's 4
MAX_STOP_CHARS = 256  # a stop string is matched against the text at every step: its length is work per token
MAX_LOGIT_BIAS = 1024
MAX_INT32 = 2**31 - 1


class ParamError(ChatforgeError):
    """A bad sampling setting; ``param`` names it (as data: the server reports it without parsing the message)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Bound:
    """A setting's range: ``low`` (excluded when ``open_low``) to ``high`` (None: no upper bound)."""

    low: float
    high: float | None
    open_low: bool = False

    def holds(self, value) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        return above and (self.high is None or value <= self.high)

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.open_low else '>='} {self.low:g}"
        return f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}]"

    def field_kwargs(self) -> dict:
        """The bound as keywords of pydantic's ``Field`` and of ``chatforge.config.option``: the server's request
        models and the command line check the same range."""
        low = {"gt": self.low} if self.open_low else {"ge": self.low}
        return {**low, **({"le": self.high} if self.high is not None else {})}


# Every numeric setting's range. Upper bounds keep each value inside the tensor types it is put in (int64,
# float32); vocabulary-sized bounds (top_k, token ids) are checked by the engine, which knows the vocabulary.
BOUNDS: dict[str, Bound] = {
    "max_tokens": Bound(1, MAX_INT32),
    "min_tokens": Bound(0, MAX_INT32),
    "temperature": Bound(0, MAX_TEMPERATURE),
    "top_k": Bound(0, MAX_INT32),
    "top_p": Bound(0, 1, open_low=True),
    "min_p": Bound(0, 1),
    "repetition_penalty": Bound(0, MAX_REPETITION_PENALTY, open_low=True),
    "presence_penalty": Bound(-2, 2),
    "frequency_penalty": Bound(-2, 2),
    "n": Bound(1, MAX_INT32),
    "best_of": Bound(1, MAX_INT32),
    "seed": Bound(-(2**63), 2**64 - 1),
    "logprobs": Bound(0, MAX_TOP_LOGPROBS),
}
FLOAT_SETTINGS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


@dataclass
class SamplingParams:
    """How to decode one request. Field names and meanings follow OpenAI's completions API where it has one.

    Log-probabilities (``logprobs``, ``echo``) are always those of the model itself, before any penalty,
    bias, temperature or filtering, so they can be compared across settings and used as PPO's behaviour
    policy (sample with ``temperature=1`` and no filtering, and the two distributions coincide).
    """

    max_tokens: int | None = option(
        64,
        "most tokens to generate per sample (none: until the context is full)",
        **BOUNDS["max_tokens"].field_kwargs(),
    )
    min_tokens: int = option(
        0, "stop tokens are suppressed until this many tokens were generated", **BOUNDS["min_tokens"].field_kwargs()
    )
    temperature: float = option(1.0, "sampling temperature; 0 = greedy", **BOUNDS["temperature"].field_kwargs())
    top_k: int = option(0, "sample only among the k most likely tokens (0 = off)", **BOUNDS["top_k"].field_kwargs())
    top_p: float = option(
        1.0,
        "sample only among the most likely tokens whose probability reaches top_p (1 = off)",
        **BOUNDS["top_p"].field_kwargs(),
    )
    min_p: float = option(
        0.0, "drop tokens less likely than min_p times the most likely one (0 = off)", **BOUNDS["min_p"].field_kwargs()
    )
    repetition_penalty: float = option(
        1.0,
        "CTRL/HF: divide positive logits of prompt and generated tokens by it, multiply negative ones (1 = off)",
        **BOUNDS["repetition_penalty"].field_kwargs(),
    )
    presence_penalty: float = option(
        0.0,
        "OpenAI: subtract from the logit of every token generated so far, once",
        **BOUNDS["presence_penalty"].field_kwargs(),
    )
    frequency_penalty: float = option(
        0.0,
        "OpenAI: subtract count times from the logit of every generated token",
        **BOUNDS["frequency_penalty"].field_kwargs(),
    )
    logit_bias: dict[int, float] = option({}, 'added to the logits of token ids, JSON: {"50": -100}')
    stop: list[str] = option([], "stop strings (may span tokens; cut from the text)")
    stop_token_ids: list[int] = option([], "token ids that end a sample, besides end-of-text / end-of-turn")
    ignore_eos: bool = option(False, "do not stop at end-of-text / end-of-turn")
    n: int = option(1, "samples returned per prompt", **BOUNDS["n"].field_kwargs())
    best_of: int | None = option(
        None,
        "samples drawn per prompt; the n with the highest mean log-prob are returned",
        **BOUNDS["best_of"].field_kwargs(),
    )
    seed: int | None = option(
        None, "makes sampling reproducible, whatever else shares the batch", **BOUNDS["seed"].field_kwargs()
    )
    logprobs: int | None = option(
        None,
        "return each sampled token's log-prob and its k most likely alternatives",
        **BOUNDS["logprobs"].field_kwargs(),
    )
    echo: bool = option(False, "also return the log-probs of the prompt's tokens")
    truncate: bool = option(False, "drop the oldest prompt tokens when the prompt does not fit the context")
    skip_special_tokens: bool = option(True, "special tokens add no text")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SamplingParams":
        """Build from a mapping (e.g. a JSON request body); unknown names are rejected, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ParamError(unknown[0], f"unknown sampling parameter(s) {', '.join(unknown)}; "
                                         f"known: {', '.join(sorted(known))}")
        params = cls(**values)
        params.validate()
        return params

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def num_samples(self) -> int:
        """Sequences actually decoded for this request (``best_of`` if set, else ``n``)."""
        return self.best_of or self.n

    def validate(self) -> "SamplingParams":
        """Raise ParamError naming the first bad setting; normalise ``stop`` given as a single string.

        Every value that reaches a tensor is range-checked here (the server relies on it: one request's
        setting must never fail a batch it shares with others); vocabulary bounds are the engine's."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("max_tokens", "best_of", "seed", "logprobs"):
            _check_type(name, getattr(self, name), int, optional=True)
        for name in ("min_tokens", "top_k", "n"):
            _check_type(name, getattr(self, name), int)
        for name in FLOAT_SETTINGS:
            _check_type(name, getattr(self, name), float)
            if not math.isfinite(getattr(self, name)):
                raise ParamError(name, f"{name} must be a finite number, got {getattr(self, name)}")
        for name in ("ignore_eos", "echo", "truncate", "skip_special_tokens"):
            _check_type(name, getattr(self, name), bool)
        for name in BOUNDS:
            if getattr(self, name) is not None:
                check_bound(name, getattr(self, name))
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ParamError("min_tokens", f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                                           f"got {self.min_tokens}")
        if not isinstance(self.logit_bias, dict):
            raise ParamError("logit_bias", f"logit_bias must map token ids to numbers, got {self.logit_bias!r}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ParamError("logit_bias", f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens; "
                                           f"got {len(self.logit_bias)}")
        self.logit_bias = {_token_id("logit_bias", k): _bias(k, v) for k, v in self.logit_bias.items()}
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ParamError("stop", f"stop must be a list of non-empty strings, got {self.stop!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ParamError("stop", f"stop takes at most {MAX_STOP_STRINGS} sequences; got {len(self.stop)}")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ParamError("stop", f"stop sequences are at most {MAX_STOP_CHARS} characters long")
        if not isinstance(self.stop_token_ids, list):
            raise ParamError("stop_token_ids", f"stop_token_ids must be a list of token ids, "
                                               f"got {self.stop_token_ids!r}")
        self.stop_token_ids = [_token_id("stop_token_ids", t) for t in self.stop_token_ids]
        if self.best_of is not None and self.best_of < self.n:
            raise ParamError("best_of", f"best_of ({self.best_of}) must be >= n ({self.n})")
        return self




def check_bound(name: str, value) -> None:
    bound = BOUNDS[name]
    if not bound.holds(value):
        hint = " (0 = greedy)" if name == "temperature" else " (0 = off)" if name == "top_k" else ""
        raise ParamError(name, f"{name} must be {bound.describe()}{hint}, got {value}")


def _check_type(name: str, value: Any, tp: type, optional: bool = False) -> None:
    if value is None and optional:
        return
    ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ParamError(name, f"{name} must be {'an integer' if tp is int else 'a ' + tp.__name__}, got {value!r}")


def _token_id(name: str, value: Any) -> int:
    """Token ids arrive as ints, or as strings when they were JSON object keys."""
    try:
        token = int(value)
    except (TypeError, ValueError):
        raise ParamError(name, f"{name}: {value!r} is not a token id") from None
    if token < 0 or token > MAX_INT32 or isinstance(value, (bool, float)):
        raise ParamError(name, f"{name}: {value!r} is not a token id")
    return token


def _bias(token: Any, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
        raise ParamError("logit_bias", f"logit_bias[{token}] must be a number in [-100, 100], got {value!r}")
    return float(value)
