"""Continuous batching: a fixed set of KV-cache slots that requests join and leave between decode chunks.

Active sequences always occupy rows [0, n) of the cache. A decode step runs on every slot with fixed shapes
(``KVCache.decode_view``: lengths and the active-row flags are tensors, nothing is read back to the host), so
the engine can hand in a compiled step. Steps run in chunks of up to ``CHUNK_STEPS``: each step's sampled
tokens feed the next on the device, a row that has its last token (its budget, or a stop token) stops growing
its cache, and the host reads the chunk's tokens once, then detokenises, checks stop strings and emits one
delta per row; tokens a row drew after it finished are dropped, so a chunk gives exactly the tokens that
single steps would. With a compiled engine on the CPU, a chunk over rows that fill the cache runs as one
compiled call (``decode_chunk``) when the sampler's settings allow it. New sequences are prefilled together,
right-padded into one batch (a request's extra samples copy its prefilled row instead of recomputing it); a
finished sequence's row is refilled by moving the last active row into it. ``Engine.generate``/``stream``
and the ``Scheduler`` all drive this one loop.
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
from chatforge.infer.sampling import BatchSampler, SamplingRow, StepSample, token_logprobs
from chatforge.model.kv_cache import KVCache

Event = Union[Delta, Completion]  # a request's stream: deltas, then its completion last
# Decode steps between two host reads of the tokens. More amortise the per-token Python further; fewer waste
# less when every row stops early in a chunk (and add less latency for a request waiting for a slot).
CHUNK_STEPS = 8
# Attention in a compiled decode step reads the cache up to the smallest of these (or the whole cache) that holds
# every active row: a few shapes, so a compiled step compiles a few graphs, and no work on the cache's empty tail.
VISIBLE_SIZES = (32, 64, 128, 256, 512, 1024)
# A compiled chunk of steps takes minutes of C++ compilation per graph (~1.5 min at the speedrun's shape), so one
# over a cache of at most this many row-positions attends to all of it, one graph where the windows make four:
# batch 1 over 256 positions measured 0.154 ms a token against 0.159 with windows (speedrun shape, int8).
WHOLE_CACHE_POSITIONS = 1024
# Prompts admitted together are prefilled in groups of similar length (``prefill_groups``): one padded batch
# wastes work on padding, one call per prompt pays each call's Python and dispatch. A call costs about as much
# as this many padded positions (speedrun shape: ~0.6 ms a call, ~15-25 us a position).
PREFILL_CALL_POSITIONS = 32
# Prefills pad their prompts, and an eager runner sizes its cache, to a multiple of this many positions: attention
# then reads a multiple of it too (visible_positions). The attention kernels give a row bit-identical results
# whatever the number of masked positions after its keys when the length read is such a multiple (measured at
# 32-256: SDPA in fp32 and bf16, and the eager step's batched products), and not at other lengths (a 23-token
# prompt alone against padded to 40). With bf16 products row-invariant too (MIN_PRODUCT_ROWS), a request's tokens
# do not depend on the rest of the batch.
POSITION_ALIGN = 32
# An eager step multiplies at least this many rows: oneDNN's bf16 product of a single row sums in another order
# once the inner dimension is large (one row differs in ~8 % of rows at 1536 -> 384; two rows and more always agree
# with each other), so a request alone would get other tokens than in a batch.
MIN_PRODUCT_ROWS = 2


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
        decode_chunk: Callable | None = None,
    ):
        self.model = model
        self.vocab_size = vocab_size
        self._decode = decode or decode_step
        self.compiled = compiled = self._decode is not decode_step
        # a compiled step has its own products (and one-row shapes measured faster); see MIN_PRODUCT_ROWS
        self.min_rows = 1 if compiled else MIN_PRODUCT_ROWS
        if not compiled:
            max_len = min(aligned(max_len), model.config.block_size)
        self.capacity = max_batch_size  # sequences at once; the cache may hold spare rows for MIN_PRODUCT_ROWS
        rows = max(max_batch_size, self.min_rows)
        self.cache = KVCache.for_model(model, rows, max_len, compiled=compiled)
        self.device = self.cache.k.device
        self._decode_chunk = decode_chunk  # a compiled decode_chunk, or None to step from Python
        self._tokens = torch.zeros(rows, dtype=torch.long, device=self.device)  # each row's next input
        self._active = torch.zeros(rows, dtype=torch.long, device=self.device)  # 1 for rows [0, n)
        self.sampler = BatchSampler(vocab_size, self.device)
        self._new_detokenizer = new_detokenizer
        self._new_generator = new_generator
        self.active: list[_Sequence] = []  # active[i] lives in cache row i
        self.waiting: deque[_Sequence] = deque()
        self.failed: list[tuple[Request, Exception]] = []  # requests that failed alone; read by take_failures
        # reading a tensor on the host costs a memory read on the CPU but a wait for the device elsewhere
        self.cheap_reads = self.device.type == "cpu"

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
        """``admit`` then ``decode``: what each request's stream gained. (A caller that streams hands the
        admitted requests' first tokens out before the chunk: less time to the first token.)"""
        return self.admit() + self.decode()

    def decode(self, arrivals: Callable[[], bool] | None = None) -> list[tuple[Request, Event]]:
        """Decode a chunk of up to ``CHUNK_STEPS`` tokens for every active sequence. ``arrivals`` (the
        Scheduler's: a request is waiting for a free slot) ends the chunk after the current step, so a request
        that comes in mid-chunk joins the batch a step later instead of up to a chunk later."""
        if not self.active:
            return []
        n = len(self.active)
        budgets = [s.request.prepared.max_new_tokens - len(s.tokens) for s in self.active]
        steps = min(CHUNK_STEPS, max(budgets))
        # the first power-of-two rows holding every active one: a few shapes (each compiled once) and
        # little work wasted on empty slots when a large cache is nearly idle (a server at night)
        m = min(self.cache.batch_size, max(self.min_rows, 1 << (n - 1).bit_length()))
        cache = self.cache if m == self.cache.batch_size else self.cache.rows(0, m)
        longest = max(len(s.request.prepared.prompt_ids) + len(s.tokens) for s in self.active)  # cache length + 1
        visible = visible_positions(longest + steps - 1, self.cache.max_len, self.compiled)
        left = torch.tensor(budgets, device=self.device)  # tokens each row may still draw
        if self._decode_chunk is not None and m == n and self.sampler.traceable():
            # every step of the chunk in one compiled call: no Python, dispatch or guard check between steps (a
            # request arriving meanwhile waits for the chunk's end), and rows done early still compute to its end
            if m * self.cache.max_len <= WHOLE_CACHE_POSITIONS:
                visible = self.cache.max_len
            tokens = self._decode_chunk(self.model, self.sampler, self._tokens[:n], cache, self._active[:n],
                                        visible, left, CHUNK_STEPS, self.vocab_size)
            return self._take(0, tokens)
        # whether a row can finish inside this chunk: by its budget, or by drawing one of its stop tokens
        may_end = steps >= min(budgets) or any(s.sampling.stop_ids for s in self.active)
        live = self._active[:n]
        samples = []
        for _ in range(steps):
            samples.append(advance(self.model, self.sampler, self._decode, self._tokens[:m], cache, self._active[:m],
                                   visible, n, self.vocab_size, left if may_end else None))
            if may_end and self.cheap_reads and not bool(live.any()):  # every row has finished: the rest is waste
                break
            if arrivals is not None and arrivals():
                break
        return self._take(0, torch.stack([s.tokens for s in samples], 1), samples)

    def _take(self, first: int, tokens: torch.Tensor, samples: list | None = None) -> list[tuple[Request, Event]]:
        """Hand the ``tokens`` [rows, steps] drawn for rows [first, ...) to their sequences, with their log-probs
        from ``samples`` (one StepSample per step) if they have them: each row takes tokens until it finishes,
        and the rest of its chunk is dropped."""
        chosen = tokens.tolist()  # the chunk's one host read
        entries = None
        if samples is not None and samples[0].logprobs is not None:
            entries = [_logprob_entries(t, s.logprobs, s.top_ids, s.top_logprobs)
                       for t, s in zip(zip(*chosen), samples)]  # [steps][rows]
        events: list[tuple[Request, Event]] = []
        finished_rows = set()
        for row, (seq, tokens) in enumerate(zip(self.active[first:], chosen), start=first):
            params, request = seq.sampling.params, seq.request
            shown = [] if entries is not None and params.logprobs is not None else None
            taken = []
            for step, token in enumerate(tokens):
                taken.append(token)
                if entries is not None and seq.sampling.wants_logprobs:
                    entry = entries[step][row - first]
                    entry.top = entry.top[: params.logprobs or 0]
                    seq.cumulative_logprob += entry.logprob
                    seq.logprobs.append(entry)
                    if shown is not None:
                        shown.append(entry)
                if self._append(seq, token):
                    break
            if request.streams:
                events.append((request, Delta(seq.index, seq.detok.delta(), taken, shown, seq.finish_reason)))
            if seq.finish_reason:
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

    def admit(self) -> list[tuple[Request, Event]]:
        """Prefill waiting sequences into free rows and draw their first tokens from the prefill's logits.

        Each request's first sample is prefilled (all of them in one padded batch, in rows [n, n + u)); its
        other samples then copy that row. A request whose prompt breaks the prefill fails alone (see
        ``_prefill_each``); the others are admitted."""
        admitted: list[_Sequence] = []
        while self.waiting and len(self.active) + len(admitted) < self.capacity:
            admitted.append(self.waiting.popleft())
        if not admitted:
            return []
        firsts = list({id(s.request): s for s in reversed(admitted)}.values())[::-1]  # first sample of each
        firsts.sort(key=lambda s: len(s.request.prepared.prompt_ids))  # similar lengths pad less (prefill_groups)
        n = len(self.active)
        try:
            requests = [s.request for s in firsts]
            widths = [self._prefill_width(len(r.prepared.prompt_ids)) for r in requests]
            last = torch.cat([self._prefill(requests[group], n + group.start) for group in prefill_groups(widths)])
        except Exception:  # one prompt may have broken the whole batch: find it by prefilling one at a time
            firsts, last = self._prefill_each(firsts, n)
            if not firsts:
                return []
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
        sample = self.sampler.sample(torch.stack(row_logits), start=n)
        self.sampler.observe(sample.tokens, start=n)
        self._tokens[n : len(self.active)] = sample.tokens
        return self._take(n, sample.tokens[:, None], [sample])

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
        width = self._prefill_width(max(len(p) for p in prompts))
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        view = self.cache.rows(row, row + len(requests))
        view.reset_rows(slice(None))
        echo = any(r.prepared.params.echo for r in requests)
        rows = torch.arange(len(prompts), device=self.device)
        if not echo and hasattr(self.model, "hidden_states"):
            # only the last position's logits are needed: skip the vocabulary projection of all the others
            hidden = self.model.hidden_states(ids, kv_cache=view)
            picked = hidden[rows, lengths - 1]
            if len(prompts) < self.min_rows:  # see MIN_PRODUCT_ROWS
                picked = picked.repeat(self.min_rows, 1)
            last = self.model.logits(picked)[: len(prompts), : self.vocab_size]
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

    def _prefill_width(self, length: int) -> int:
        """The padded length of a prefill whose longest prompt has ``length`` tokens (see POSITION_ALIGN)."""
        return min(aligned(length), self.cache.max_len)

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
        self._active[:keep], self._active[keep:] = 1, 0  # a hole may hold a row that stopped growing mid-chunk
        self.sampler.keep_rows(order)
        self._tokens[:keep] = self._tokens[torch.tensor(order, dtype=torch.long, device=self.device)]


def aligned(positions: int) -> int:
    """``positions`` rounded up to a multiple of POSITION_ALIGN."""
    return -(-positions // POSITION_ALIGN) * POSITION_ALIGN


def prefill_groups(lengths: list[int]) -> list[slice]:
    """Consecutive groups of prompts (``lengths`` ascending) to prefill together, each padded to its longest:
    the split with the fewest padded positions, counting PREFILL_CALL_POSITIONS for each forward call's own
    cost (dynamic programming over the split points)."""
    best, cut = [0] + [None] * len(lengths), [0] * (len(lengths) + 1)
    for stop in range(1, len(lengths) + 1):
        for start in range(stop):
            cost = best[start] + (stop - start) * lengths[stop - 1] + PREFILL_CALL_POSITIONS
            if best[stop] is None or cost < best[stop]:
                best[stop], cut[stop] = cost, start
    groups, stop = [], len(lengths)
    while stop:
        groups.append(slice(cut[stop], stop))
        stop = cut[stop]
    return groups[::-1]


def visible_positions(needed: int, max_len: int, compiled: bool = True) -> int:
    """The cache positions a decode step attends to when its rows need ``needed``: for a compiled step the next of
    VISIBLE_SIZES (each size is a graph), for an eager one the next multiple of POSITION_ALIGN (a server's cache
    spans the whole context: 72 positions needed read 96, not 128)."""
    if not compiled:
        return min(aligned(needed), max_len)
    return min(next((v for v in VISIBLE_SIZES if v >= needed), max_len), max_len)


def advance(model, sampler: BatchSampler, decode: Callable, tokens: torch.Tensor, cache: KVCache,
            active: torch.Tensor, visible: int, n: int, vocab_size: int, left: torch.Tensor | None) -> StepSample:
    """One step of every cache slot (``decode``: ``decode_step`` or its compiled twin) and the next token of the
    active rows [0, n), which becomes their next input. With ``left`` (each row's remaining budget, counted
    down here), a row that drew its last token or one of its stop tokens stops growing its cache."""
    sample = sampler.sample(decode(model, tokens, cache, active, visible)[:n, :vocab_size])
    sampler.observe(sample.tokens)
    tokens[:n] = sample.tokens
    if left is not None:
        left -= 1
        active[:n].mul_((left > 0) & ~sampler.stops(sample.tokens))
    return sample


def decode_chunk(model, sampler: BatchSampler, tokens: torch.Tensor, cache: KVCache, active: torch.Tensor,
                 visible: int, left: torch.Tensor, steps: int, vocab_size: int) -> torch.Tensor:
    """``steps`` of ``advance`` on rows that fill the cache, with no host read: the tokens drawn [rows, steps].
    Written to be compiled whole (the sampler's settings must be ``traceable``)."""
    drawn = [advance(model, sampler, decode_step, tokens, cache, active, visible, tokens.size(0), vocab_size,
                     left).tokens for _ in range(steps)]
    return torch.stack(drawn, 1)


def decode_step(model, tokens: torch.Tensor, cache: KVCache, active: torch.Tensor,
                visible: int | None = None) -> torch.Tensor:
    """Logits [B, V] of the next token of every cache slot after ``tokens`` [B], attending to the first
    ``visible`` cache positions (all by default): fixed shapes, no host read."""
    return model(tokens[:, None], kv_cache=cache.decode_view(active, visible))[0][:, -1]
