"""Logits processors and the per-row sampler of a batch whose rows each have their own settings.

Every processor works on a [B, V] batch with one parameter per row, so a batch of requests with different
settings costs the same handful of tensor ops as a batch with one setting. Each row's random numbers are a
counter-based stream: a key drawn once from the row's own ``torch.Generator``, hashed with the row's step
count into one uniform per step (inverse-CDF). The whole batch's uniforms are a few vectorised integer ops,
and a seeded request still gets the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from chatforge.infer.params import SamplingParams


def apply_penalties(logits: torch.Tensor, prompt_mask: torch.Tensor, counts: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Repetition (CTRL/HF: over prompt and generated tokens, positive logits divided, negative multiplied),
    presence (OpenAI: minus ``presence`` once a token was generated) and frequency (OpenAI: minus
    ``frequency * count``) penalties. ``prompt_mask`` [B, V] marks prompt tokens, ``counts`` [B, V] counts
    generated ones; the three parameters are [B]."""
    generated = counts > 0
    rep = repetition[:, None]
    repeated = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(prompt_mask | generated, repeated, logits)
    return logits - presence[:, None] * generated - frequency[:, None] * counts


# The filters usually keep a handful of tokens: they look among this many most likely ones first, and sort the
# whole vocabulary only when some row's kept set may reach past them (a full sort of every row costs ~100x more).
FILTER_CANDIDATES = 64


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf every token outside the row's top-k, outside its nucleus (the smallest set of most likely
    tokens whose probability reaches ``top_p``) or less likely than ``min_p`` times its most likely token.
    ``top_k`` = 0, ``top_p`` = 1 and ``min_p`` = 0 switch a filter off for that row. The most likely token
    always survives."""
    V = logits.size(-1)
    k = torch.where(top_k > 0, top_k, V).clamp(max=V)
    if V > FILTER_CANDIDATES:
        ordered, order = logits.topk(FILTER_CANDIDATES, dim=-1)
        remove, covered = _filter_sorted(ordered, k, top_p, min_p, logits)
        if bool(covered.all()):
            return _keep(logits, ordered, order, remove)
    ordered, order = logits.sort(dim=-1, descending=True)
    remove, _ = _filter_sorted(ordered, k, top_p, min_p, logits)
    return _keep(logits, ordered, order, remove)


def _filter_sorted(ordered: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                   logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of a row's most likely tokens ``ordered`` [B, K] (its logits, descending) the filters remove, and
    whether every token past them is removed too (``covered`` [B]: the K decide the row)."""
    K, V = ordered.size(-1), logits.size(-1)
    within = k <= K  # the top-k cut falls among the K (always, when K = V)
    kth = ordered.gather(-1, (k.clamp(max=K) - 1)[:, None])
    remove = (ordered < kth) & within[:, None]  # ties with the k-th logit stay, as in HF
    probs = ordered.masked_fill(remove, float("-inf")).softmax(dim=-1)
    whole = k >= V  # top-k off: probabilities over the whole vocabulary
    if K < V:
        # the whole vocabulary's log-normaliser, read off log_softmax's largest entry: logsumexp itself runs ~15x
        # slower on the CPU when a row's logits span a wide range (a low temperature): 2.3 ms vs 0.15 ms at 16 rows
        log_norm = ordered[:, :1] - logits.log_softmax(dim=-1).amax(dim=-1, keepdim=True)
        probs = torch.where(whole[:, None], (ordered - log_norm).exp(), probs)
    mass_before = probs.cumsum(dim=-1) - probs
    # top_p = 1 must keep the whole distribution exactly, even where rounding puts the cumulative sum at 1
    remove |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
    remove |= probs < min_p[:, None] * probs[:, :1]
    remove[:, 0] = False
    # a token past the K has at least the K's mass before it, and at most the K-th's probability
    past = ((mass_before[:, -1] + probs[:, -1] >= top_p) & (top_p < 1)) | (probs[:, -1] < min_p * probs[:, 0])
    return remove, within | (whole & past)


def _keep(logits: torch.Tensor, ordered: torch.Tensor, order: torch.Tensor, remove: torch.Tensor) -> torch.Tensor:
    """``logits`` with only the unremoved of ``ordered`` (at vocabulary positions ``order``) left, the rest -inf."""
    return torch.full_like(logits, float("-inf")).scatter(-1, order, ordered.masked_fill(remove, float("-inf")))


# aten's CPU argmax walks a row one element at a time, while max-reductions are vectorised: argmax over [64, 8192]
# took ~0.7 ms of a ~7 ms decode step, its two-stage twin (``greedy_tokens``) ~0.13 ms. Both give the same
# tokens; below this many rows the twin's extra calls cost more than they save (1 row: 12 -> 24 us).
BLOCKED_ARGMAX_ROWS = 8
ARGMAX_BLOCKS = range(64, 7, -1)  # block widths tried, widest first: the vocabulary size must be a multiple


def greedy_tokens(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` of logits [B, V], first maximum included, in two vectorised stages on the CPU: the maxima
    of blocks of the row, the first block holding the row's maximum (argmax over V / width blocks), then the first
    maximum inside that block."""
    if x.device.type != "cpu" or torch.compiler.is_compiling() or x.dim() != 2 or x.size(0) < BLOCKED_ARGMAX_ROWS:
        return x.argmax(dim=-1)
    V = x.size(-1)
    width = next((w for w in ARGMAX_BLOCKS if V % w == 0), None)
    if width is None:
        return x.argmax(dim=-1)
    blocks = x.reshape(x.size(0), V // width, width)
    block = blocks.amax(-1).argmax(-1)  # [B]
    inside = blocks[torch.arange(x.size(0), device=x.device), block].argmax(-1)
    return block * width + inside


def sample_from(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row by inverse CDF: the first token whose cumulative probability exceeds ``u * total``
    (``u`` in [0, 1]). A token of probability 0 can never be chosen: its cumulative sum equals its
    predecessor's, and the target stays strictly below the total even when ``u * total`` rounds up to it."""
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms.double()[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (xorshift-multiply, as Wellons' hash prospector), on int64
    tensors holding values in [0, 2^32): both multipliers are below 2^31, so products stay below 2^63 and
    nothing relies on overflow."""
    x = ((x >> 16) ^ x) * 0x7FEB352D & _MASK32
    x = ((x >> 15) ^ x) * 0x045D9F3B & _MASK32
    return (x >> 16) ^ x


def counter_uniforms(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) (53 bits, float64) that depend only on each row's ``keys`` [B] (62-bit) and
    ``counters`` [B]: row i's stream is the same whatever the other rows are."""
    lo, hi = keys & _MASK32, keys >> 32
    a = _mix32(lo ^ _mix32(counters & _MASK32))
    a = _mix32(a ^ hi)
    b = _mix32(a ^ 0x9E3779B9)
    return ((a << 21) | (b >> 11)).double() / 2.0**53


@dataclass
class SamplingRow:
    """One sequence's sampling state."""

    params: SamplingParams
    generator: torch.Generator | None  # None for greedy rows
    prompt_ids: list[int]
    stop_ids: list[int]

    @property
    def wants_logprobs(self) -> bool:
        # best_of ranks samples by mean log-probability, so it needs them even if the caller did not ask
        return self.params.logprobs is not None or self.params.num_samples > self.params.n


@dataclass
class StepSample:
    tokens: torch.Tensor  # [B]
    logprobs: torch.Tensor | None  # [B] the model's log-prob of each sampled token
    top_ids: torch.Tensor | None  # [B, k] most likely tokens, k = the largest ``logprobs`` of any row
    top_logprobs: torch.Tensor | None


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int):
    """Log-probs [N] of ``tokens`` under ``logits`` [N, V], plus the ``top`` most likely (ids, log-probs)."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)
    if top == 0:
        return chosen, None, None
    top_logprobs, top_ids = logp.topk(top, dim=-1)
    return chosen, top_ids, top_logprobs


class BatchSampler:
    """Samples the next token of every row of a batch; rows join, leave and are reordered between steps.

    Everything a step needs lives in per-row tensors (random streams, counts, the tokens that stop each row,
    how many tokens each row has drawn), so steps can follow each other on the device without the host
    looking at a token in between; ``sample`` and ``observe`` take the ``start`` of a run of rows so a
    prefill can sample just the rows it admitted."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = device
        self.rows: list[SamplingRow] = []
        self.prompt_mask = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self.counts = torch.zeros(0, vocab_size, device=device)
        self.stop_mask = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)  # tokens that end each row
        self.keys = torch.zeros(0, dtype=torch.long, device=device)  # each row's random stream ...
        self.draws = torch.zeros(0, dtype=torch.long, device=device)  # ... and how far along it is (= tokens drawn)
        self._tensors: dict[str, torch.Tensor] | None = None  # per-row parameters, rebuilt when rows change

    def add_rows(self, rows: list[SamplingRow]) -> None:
        mask = torch.zeros(len(rows), self.vocab_size, dtype=torch.bool, device=self.device)
        stops = torch.zeros(len(rows), self.vocab_size, dtype=torch.bool, device=self.device)
        for i, row in enumerate(rows):
            if row.params.repetition_penalty != 1:
                mask[i, torch.tensor(row.prompt_ids, device=self.device)] = True
            stops[i, torch.tensor(row.stop_ids, dtype=torch.long, device=self.device)] = True
        keys = [int(torch.randint(2**62, (), generator=r.generator, device=r.generator.device))
                if r.generator is not None else 0 for r in rows]
        self.rows += rows
        self.keys = torch.cat([self.keys, torch.tensor(keys, dtype=torch.long, device=self.device)])
        self.draws = torch.cat([self.draws, torch.zeros(len(rows), dtype=torch.long, device=self.device)])
        self.prompt_mask = torch.cat([self.prompt_mask, mask])
        self.stop_mask = torch.cat([self.stop_mask, stops])
        self.counts = torch.cat([self.counts, torch.zeros(len(rows), self.vocab_size, device=self.device)])
        self._tensors = None

    def probe(self, rows: list[SamplingRow]) -> None:
        """Sample once with ``rows``' settings on a batch of their own (random generators untouched), so a
        setting that cannot be turned into tensors fails here, for its request alone, not in a shared step."""
        probe = BatchSampler(self.vocab_size, self.device)
        probe.add_rows([dataclasses.replace(row, generator=None) for row in rows])
        probe.sample(torch.zeros(len(rows), self.vocab_size, device=self.device))

    def keep_rows(self, order: list[int]) -> None:
        """Row i becomes old row ``order[i]``; rows not listed are dropped."""
        index = torch.tensor(order, dtype=torch.long, device=self.device)
        self.rows = [self.rows[i] for i in order]
        self.prompt_mask = self.prompt_mask.index_select(0, index)
        self.stop_mask = self.stop_mask.index_select(0, index)
        self.counts = self.counts.index_select(0, index)
        self.keys, self.draws = self.keys.index_select(0, index), self.draws.index_select(0, index)
        self._tensors = None

    def _row_tensors(self) -> dict:
        """Per-row parameters as [B] tensors plus batch-wide flags that let common cases skip work."""
        if self._tensors is None:
            def col(values, dtype=torch.float32):
                return torch.tensor(values, dtype=dtype, device=self.device)

            params = [r.params for r in self.rows]
            t = {
                "greedy": col([p.greedy for p in params], torch.bool),
                "temperature": col([p.temperature if not p.greedy else 1.0 for p in params]),
                "top_k": col([p.top_k for p in params], torch.long),
                "top_p": col([p.top_p for p in params]),
                "min_p": col([p.min_p for p in params]),
                "repetition": col([p.repetition_penalty for p in params]),
                "presence": col([p.presence_penalty for p in params]),
                "frequency": col([p.frequency_penalty for p in params]),
                "min_tokens": col([p.min_tokens if r.stop_ids else 0 for p, r in zip(params, self.rows)], torch.long),
                "all_greedy": all(p.greedy for p in params),
                "any_greedy": any(p.greedy for p in params),
                "any_penalty": any(
                    p.repetition_penalty != 1 or p.presence_penalty or p.frequency_penalty for p in params
                ),
                "any_filter": any(p.top_k or p.top_p < 1 or p.min_p for p in params),
                "any_min_tokens": any(p.min_tokens and r.stop_ids for p, r in zip(params, self.rows)),
                "any_logprobs": any(r.wants_logprobs for r in self.rows),
                "top": max((p.logprobs or 0 for p in params), default=0),
                "bias": None,
            }
            if any(p.logit_bias for p in params):
                t["bias"] = torch.zeros(len(params), self.vocab_size, device=self.device)
                for i, p in enumerate(params):
                    for token, value in p.logit_bias.items():
                        t["bias"][i, token] = value
            self._tensors = t
        return self._tensors

    def traceable(self) -> bool:
        """Whether ``sample`` reads nothing back to the host and draws no log-probs, so a compiled chunk of steps
        can hold it (the filters check on the host whether their candidates decide every row)."""
        t = self._row_tensors()
        return not t["any_filter"] and not t["any_logprobs"]

    def _part(self, start: int, count: int) -> dict:
        """``_row_tensors`` of rows [start, start + count) (the batch-wide flags stay those of all rows: at
        worst a step does work a part did not need, never different work for a row)."""
        t = self._row_tensors()
        if start == 0 and count == len(self.rows):
            return t
        rows = slice(start, start + count)
        return {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in t.items()}

    def sample(self, logits: torch.Tensor, start: int = 0) -> StepSample:
        """Next token of rows [start, start + len(logits)) from their raw logits [B, V].

        Order as HF/vLLM: logit bias, penalties, min_tokens, then greedy argmax or temperature, filters, draw."""
        rows = slice(start, start + logits.size(0))
        t = self._part(start, logits.size(0))
        x = logits.float()
        if t["bias"] is not None:
            x = x + t["bias"]
        if t["any_penalty"]:
            x = apply_penalties(x, self.prompt_mask[rows], self.counts[rows], t["repetition"], t["presence"],
                                t["frequency"])
        if t["any_min_tokens"]:  # a row's stop tokens are off until it has drawn min_tokens
            young = self.draws[rows] < t["min_tokens"]
            x = x.masked_fill(young[:, None] & self.stop_mask[rows], float("-inf"))
        if t["all_greedy"]:
            tokens = greedy_tokens(x)
        elif t["any_greedy"]:
            tokens = torch.where(t["greedy"], greedy_tokens(x), self._draw(x, t, self.draws[rows], self.keys[rows]))
        else:
            tokens = self._draw(x, t, self.draws[rows], self.keys[rows])
        if t["any_logprobs"]:
            return StepSample(tokens, *token_logprobs(logits, tokens, t["top"]))
        return StepSample(tokens, None, None, None)

    def _draw(self, x: torch.Tensor, t: dict, draws: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        x = x / t["temperature"][:, None]
        if t["any_filter"]:
            x = filter_logits(x, t["top_k"], t["top_p"], t["min_p"])
        return sample_from(x.softmax(dim=-1), counter_uniforms(keys, draws))

    def observe(self, tokens: torch.Tensor, start: int = 0) -> None:
        """Count the tokens just sampled for rows [start, start + len(tokens)); only rows with penalties ever
        read their counts."""
        rows = slice(start, start + tokens.size(0))
        if self._row_tensors()["any_penalty"]:
            self.counts[rows].scatter_add_(1, tokens[:, None], torch.ones(len(tokens), 1, device=self.device))
        self.draws[rows] += 1

    def stops(self, tokens: torch.Tensor) -> torch.Tensor:
        """Whether each of rows [0, len(tokens)) just drew one of its stop tokens [B] (on the device)."""
        return self.stop_mask[: tokens.size(0)].gather(1, tokens[:, None]).squeeze(1)
