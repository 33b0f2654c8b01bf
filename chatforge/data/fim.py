"""Fill-in-the-middle (Bavarian et al., 2022): documents reordered so a left-to-right model learns to insert.

A document is cut at two random character positions into prefix / middle / suffix and becomes, in
prefix-suffix-middle (PSM) order::

    <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle <|endoftext|>

or in suffix-prefix-middle (SPM) order::

    <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle <|endoftext|>

The three parts are tokenized separately (character-level cuts), and ``<|endoftext|>`` ends the middle, so
at inference the model writes the middle after the prompt of ``insertion_ids`` and stops at end-of-text;
``middle_params`` bans the FIM markers from the middle (a small model otherwise likes to emit another marker
right after ``<|fim_middle|>``, which can never be part of a middle).
Training data (the ``fim`` stage), the engine's ``suffix`` path (``generate --suffix``, the API's
``suffix``), the FIM evaluation and APE's reverse proposals all build their ids here.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from chatforge.errors import ChatforgeError
from chatforge.tokenizer import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

ORDERS = ("psm", "spm")


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ChatforgeError(f"FIM order must be one of {', '.join(ORDERS)}; got {order!r}")


def insertion_ids(tokenizer, prefix: str, suffix: str, order: str = "psm") -> list[int]:
    """The prompt after which the model writes the text between ``prefix`` and ``suffix``."""
    _check_order(order)
    pre, suf, mid = (tokenizer.special_id(t) for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE))
    if order == "psm":
        return [pre] + tokenizer.encode(prefix) + [suf] + tokenizer.encode(suffix) + [mid]
    return [pre, suf] + tokenizer.encode(suffix) + [mid] + tokenizer.encode(prefix)


def middle_params(tokenizer, params):
    """``params`` (SamplingParams) with the three FIM markers banned: a middle never contains them."""
    banned = {tokenizer.special_id(t): -100.0 for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)}
    return dataclasses.replace(params, logit_bias={**params.logit_bias, **banned})


def fim_example(tokenizer, prefix: str, middle: str, suffix: str, order: str = "psm") -> tuple[list[int], int]:
    """(ids of the whole training sequence, index of the middle's first token)."""
    prompt = insertion_ids(tokenizer, prefix, suffix, order)
    return prompt + tokenizer.encode(middle) + [tokenizer.eot_id], len(prompt)


def random_split(text: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """Prefix, middle, suffix at two uniformly random character positions (either part may be empty)."""
    i, j = sorted(int(x) for x in rng.integers(0, len(text) + 1, size=2))
    return text[:i], text[i:j], text[j:]


def transform(text: str, tokenizer, rng: np.random.Generator, fim_rate: float, spm_rate: float) -> list[int]:
    """One document's training ids: with probability ``fim_rate`` reordered (SPM with probability ``spm_rate``,
    else PSM), otherwise left to right; always ending in ``<|endoftext|>``."""
    if rng.random() >= fim_rate:
        return tokenizer.encode(text) + [tokenizer.eot_id]
    order = "spm" if rng.random() < spm_rate else "psm"
    return fim_example(tokenizer, *random_split(text, rng), order=order)[0]
