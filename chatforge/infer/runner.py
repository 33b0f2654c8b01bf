"""Continuous batching: a fixed set of KV-cache slots that requests join and leave between decode steps.

Active sequences always occupy rows [0, n) of the cache. A decode step runs on every slot with fixed shapes
(``KVCache.decode_view``: lengths and the active-row flags are tensors, nothing is read back to the host), so
the engine can hand in a compiled step; the one host read per step is the sampled tokens. New sequences are
prefilled together, right-padded into one batch (a request's extra samples copy its prefilled row instead of
recomputing it); a finished sequence's row is refilled by moving the last active row into it.
``Engine.generate``/``stream`` and the ``Scheduler`` all drive this one loop.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Union

import torch

from chatforge.infer.detokenizer import IncrementalDetokenizer
from chatforge.infer.outputs import Choice, Completion, Delta, FinishReason, TokenLogprob
from chatforge.infer.params import SamplingParams
from chatforge.infer.sampling import BatchSampler, SamplingRow, token_logprobs
from chatforge.model.kv_cache import KVCache

Event = Union[Delta, Completion]  # a request's stream: deltas, then its completion last


@dataclass
class Prepared:
    """A request checked against the model: token ids that fit the context, and what ends it."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop_ids: list[int]


@dataclass
class _Sequence:
    request: "Request"
    index: int
    sampling: SamplingRow
    detok: IncrementalDetokenizer
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    finish_reason: FinishReason | None = None


class Request:
    """One submitted request: its samples and, once all are finished, its completion."""

    _ids = itertools.count()

    def __init__(self, prepared: Prepared):
        self.id = next(Request._ids)
        self.prepared = prepared
        self.sequences: list[_Sequence] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.completion: Completion | None = None

    @property
    def streams(self) -> bool:
        """Samples are streamed as they grow, unless best_of must first rank them all."""
        return self.prepared.params.num_samples == self.prepared.params.n

    def _finish(self) -> list[Event]:
        params = self.prepared.params
        ranked = self.sequences
        if not self.streams:  # keep the n samples with the highest mean log-prob per token, as OpenAI's best_of
            ranked = sorted(ranked, key=lambda s: s.cumulative_logprob / max(len(s.tokens), 1), reverse=True)[
                : params.n
            ]
        choices = [
            Choice(
                index=i,
                text=s.detok.text,
                token_ids=s.tokens,
                finish_reason=s.finish_reason,
                logprobs=s.logprobs if params.logprobs is not None else None,
                cumulative_logprob=s.cumulative_logprob if s.sampling.wants_logprobs else None,
            )
            for i, s in enumerate(ranked)
        ]
        self.completion = Completion(self.prepared.prompt_ids, choices, self.prompt_logprobs)
        events: list[Event] = []
        if not self.streams:  # nothing was streamed: hand each chosen sample over as one delta
            events = [Delta(c.index, c.text, c.token_ids, c.logprobs, c.finish_reason) for c in choices]
        return events + [self.completion]


def _logprob_entries(tokens: list[int], chosen: torch.Tensor, top_ids, top_logprobs) -> list[TokenLogprob]:
    """Host-side TokenLogprob list from the tensors of ``token_logprobs`` (one transfer each)."""
    tops = [[] for _ in tokens]
    if top_ids is not None:
        tops = [list(zip(ids, lps)) for ids, lps in zip(top_ids.tolist(), top_logprobs.tolist())]
    return [TokenLogprob(t, v, top) for t, v, top in zip(tokens, chosen.tolist(), tops)]


class BatchRunner:
    """Owns a KV cache of ``max_batch_size`` slots and steps every admitted sequence one token at a time."""

    def __init__(
        self,
        model,
        vocab_size: int,
        max_batch_size: int,
        max_len: int,
        new_detokenizer: Callable[[SamplingParams], IncrementalDetokenizer],
        new_generator: Callable[[SamplingParams, int], torch.Generator | None],
        decode: Callable = None,
    ):
        self.model = model
        self.vocab_size = vocab_size
        self.capacity = max_batch_size
        self.cache = KVCache.for_model(model, max_batch_size, max_len)
        self.device = self.cache.k.device
        self._decode = decode or decode_step
        self._tokens = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)  # the step's input
        self._active = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)  # 1 for rows [0, n)
        self.sampler = BatchSampler(vocab_size, self.device)
        self._new_detokenizer = new_detokenizer
        self._new_generator = new_generator
        self.active: list[_Sequence] = []  # active[i] lives in cache row i
        self.waiting: deque[_Sequence] = deque()
        self.failed: list[tuple[Request, Exception]] = []  # requests that failed alone; read by take_failures
        self._last_tokens: torch.Tensor | None = None  # [len(active)] input of the next decode step

    @property
    def busy(self) -> bool:
        return bool(self.active or self.waiting)

    def add(self, prepared: Prepared) -> Request:
        """Queue a request's samples; raises (leaving the batch untouched) if its settings cannot be sampled."""
        request = Request(prepared)
        params = prepared.params
        rows = [SamplingRow(params, self._new_generator(params, i), prepared.prompt_ids, prepared.stop_ids)
                for i in range(params.num_samples)]
        self.sampler.probe(rows[:1])
        for i, row in enumerate(rows):
            seq = _Sequence(request, i, row, self._new_detokenizer(params))
            request.sequences.append(seq)
            self.waiting.append(seq)
        return request

    def take_failures(self) -> list[tuple[Request, Exception]]:
        """Requests whose prefill failed since the last call (each failed alone; the batch went on)."""
        failed, self.failed = self.failed, []
        return failed

    def cancel(self, request: Request) -> list[Event]:
        """Stop every sample of ``request`` now and free its slots; returns its final events."""
        if request.completion is not None:
            return []
        self.waiting = deque(s for s in self.waiting if s.request is not request)
        finished_rows = {i for i, s in enumerate(self.active) if s.request is request}
        events: list[Event] = []
        for seq in request.sequences:
            if seq.finish_reason is None:
                seq.finish_reason = "cancelled"
                seq.detok.finish()
                if request.streams:
                    events.append(Delta(seq.index, seq.detok.delta(), [], None, "cancelled"))
        self._compact(finished_rows)
        return events + request._finish()

    # ---- the step ------------------------------------------------------------------------------------------

    def step(self) -> list[tuple[Request, Event]]:
        """Decode one token for every active sequence, admit waiting ones into free slots (their first token
        comes from the prefill), and return what each request's stream gained."""
        logits = []
        if self.active:
            n = len(self.active)
            self._tokens[:n] = self._last_tokens
            # the first power-of-two rows holding every active one: a few shapes (each compiled once) and
            # little work wasted on empty slots when a large cache is nearly idle (a server at night)
            m = min(self.capacity, 1 << (n - 1).bit_length())
            cache = self.cache if m == self.capacity else self.cache.rows(0, m)
            step = self._decode(self.model, self._tokens[:m], cache, self._active[:m])
            logits.append(step[:n, : self.vocab_size])
        admitted = self._admit()
        if admitted is not None:
            logits.append(admitted)
        if not logits:
            return []
        logits = logits[0] if len(logits) == 1 else torch.cat(logits)
        sample = self.sampler.sample(logits)
        self.sampler.observe(sample.tokens)
        self._last_tokens = sample.tokens
        tokens = sample.tokens.tolist()
        entries = None
        if sample.logprobs is not None:
            entries = _logprob_entries(tokens, sample.logprobs, sample.top_ids, sample.top_logprobs)
        events: list[tuple[Request, Event]] = []
        finished_rows = set()
        for row, (seq, token) in enumerate(zip(self.active, tokens)):
            entry = None
            if entries is not None and seq.sampling.wants_logprobs:
                entry = entries[row]
                entry.top = entry.top[: seq.sampling.params.logprobs or 0]
                seq.cumulative_logprob += entry.logprob
                seq.logprobs.append(entry)
            finished = self._append(seq, token)
            request = seq.request
            if request.streams:
                shown = [entry] if entry is not None and seq.sampling.params.logprobs is not None else None
                events.append((request, Delta(seq.index, seq.detok.delta(), [token], shown, seq.finish_reason)))
            if finished:
                finished_rows.add(row)
                if all(s.finish_reason for s in request.sequences):
                    events += [(request, e) for e in request._finish()]
        self._compact(finished_rows)
        return events

    def _append(self, seq: _Sequence, token: int) -> bool:
        """Record a sampled token; returns True when it ended the sequence."""
        seq.tokens.append(token)
        prepared = seq.request.prepared
        if token in seq.sampling.stop_ids:
            seq.finish_reason = "stop"
        elif seq.detok.add(token):
            seq.finish_reason = "stop"
        elif len(seq.tokens) >= prepared.max_new_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason:
            seq.detok.finish()
        return seq.finish_reason is not None

    def _admit(self) -> torch.Tensor | None:
        """Prefill waiting sequences into free rows; returns the logits [m, V] of their last prompt position.

        Each request's first sample is prefilled (all of them in one padded batch, in rows [n, n + u)); its
        other samples then copy that row. A request whose prompt breaks the prefill fails alone (see
        ``_prefill_each``); the others are admitted."""
        admitted: list[_Sequence] = []
        while self.waiting and len(self.active) + len(admitted) < self.capacity:
            admitted.append(self.waiting.popleft())
        if not admitted:
            return None
        firsts = list({id(s.request): s for s in reversed(admitted)}.values())[::-1]  # first sample of each
        n = len(self.active)
        try:
            last = self._prefill([s.request for s in firsts], n)
        except Exception:  # one prompt may have broken the whole batch: find it by prefilling one at a time
            firsts, last = self._prefill_each(firsts, n)
            if not firsts:
                return None
        chosen, prefilled = {id(s) for s in firsts}, {id(s.request) for s in firsts}
        admitted = firsts + [s for s in admitted if id(s) not in chosen and id(s.request) in prefilled]
        source = {id(s.request): n + i for i, s in enumerate(firsts)}
        row_logits = []
        for row, seq in enumerate(admitted, start=n):
            first_row = source[id(seq.request)]
            if row != first_row:
                self.cache.copy_row(first_row, row)
            row_logits.append(last[first_row - n])
        self.active += admitted
        self._active[: len(self.active)] = 1
        self.sampler.add_rows([s.sampling for s in admitted])
        return torch.stack(row_logits)

    def _prefill_each(self, firsts: list[_Sequence], row: int) -> tuple[list[_Sequence], torch.Tensor | None]:
        """After a failed batched prefill: prefill each request alone into the next free row, so the one whose
        prompt broke the forward fails by itself (into ``failed``, its waiting samples dropped) and the others
        go on. Returns the sequences that were prefilled, in rows [row, ...), and their last logits."""
        prefilled, logits = [], []
        for seq in firsts:
            try:
                logits.append(self._prefill([seq.request], row + len(prefilled))[0])
            except Exception as exc:
                self.waiting = deque(s for s in self.waiting if s.request is not seq.request)
                self.failed.append((seq.request, exc))
                continue
            prefilled.append(seq)
        return prefilled, torch.stack(logits) if logits else None

    def _prefill(self, requests: list[Request], row: int) -> torch.Tensor:
        """Prefill ``requests`` into rows [row, row + len(requests)) together; their last logits [u, V]."""
        prompts = [r.prepared.prompt_ids for r in requests]
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        # right padding: attention is causal, so the padding never changes a real position's output
        ids = torch.zeros(len(prompts), max(len(p) for p in prompts), dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        view = self.cache.rows(row, row + len(requests))
        view.reset_rows(slice(None))
        echo = any(r.prepared.params.echo for r in requests)
        rows = torch.arange(len(prompts), device=self.device)
        if not echo and hasattr(self.model, "hidden_states"):
            # only the last position's logits are needed: skip the vocabulary projection of all the others
            hidden = self.model.hidden_states(ids, kv_cache=view)
            last = self.model.logits(hidden[rows, lengths - 1])[:, : self.vocab_size]
        else:
            logits = self.model(ids, kv_cache=view)[0][..., : self.vocab_size]
            last = logits[rows, lengths - 1]
            for i, request in enumerate(requests):
                params = request.prepared.params
                if params.echo and request.prompt_logprobs is None:
                    targets = prompts[i][1:]
                    entries = _logprob_entries(
                        targets, *token_logprobs(logits[i, : len(targets)], ids[i, 1 : len(prompts[i])],
                                                 params.logprobs or 0)
                    )
                    request.prompt_logprobs = [None] + entries
        view.lengths.copy_(lengths)
        return last

    def _compact(self, finished_rows: set[int]) -> None:
        """Drop finished rows, moving the last active rows into the holes so rows [0, n) stay the active ones."""
        if not finished_rows:
            return
        n = len(self.active)
        keep = n - len(finished_rows)
        holes = sorted(r for r in finished_rows if r < keep)
        movers = [r for r in range(keep, n) if r not in finished_rows]
        order = list(range(keep))
        for hole, mover in zip(holes, movers):
            self.cache.copy_row(mover, hole)
            order[hole] = mover
        self.active = [self.active[i] for i in order]
        self._active[keep:] = 0
        self.sampler.keep_rows(order)
        self._last_tokens = self._last_tokens[torch.tensor(order, dtype=torch.long, device=self.device)]


def decode_step(model, tokens: torch.Tensor, cache: KVCache, active: torch.Tensor) -> torch.Tensor:
    """Logits [B, V] of the next token of every cache slot after ``tokens`` [B]: fixed shapes, no host read."""
    return model(tokens[:, None], kv_cache=cache.decode_view(active))[0][:, -1]
