"""What every endpoint family shares: the server's state and the ``Serving`` base class — model checks,
admission, submission to the scheduler, waiting with cancellation and a deadline, server-sent events, and
the content filters. ``chat``, ``completions``, ``embeddings`` and ``edits`` build on it (as vLLM's
``OpenAIServing*`` classes do); ``api`` routes requests to them."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Sequence

from fastapi import Request
from fastapi.responses import StreamingResponse

from chatforge.errors import ChatforgeError
from chatforge.infer.outputs import Completion, Delta
from chatforge.infer.params import ParamError, SamplingParams
from chatforge.infer.scheduler import RequestHandle, Scheduler
from chatforge.safety.filters import FilterPipeline, Policy, StreamGuard
from chatforge.serve import errors
from chatforge.serve.errors import APIError
from chatforge.serve.options import ModelCard, ServeOptions
from chatforge.serve.protocol import SamplingFields
from chatforge.serve.security import ConcurrencyLimit, RateLimiter

MAX_STOP_STRINGS = 4  # as OpenAI


@dataclass
class Call:
    """One HTTP request being served: who sent it (client id: owns what it stores), whose budget it spends
    (the API key's, or without keys the client address's: a browser cookie is free to drop), and when it
    must be done by."""

    request: Request
    who: str
    limit_key: str
    deadline: float  # time.monotonic() value

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


class ServerState:
    """What the endpoint families share: the scheduler and its engine, the served cards, the filters, the
    feedback store, the admission limits, and the chat completions still being recorded."""

    def __init__(self, scheduler: Scheduler, options: ServeOptions, card: ModelCard | None = None,
                 embed_card: ModelCard | None = None, store=None):
        self.scheduler = scheduler
        self.engine = scheduler.engine
        self.tokenizer = self.engine.tokenizer
        if self.tokenizer is None:
            raise ChatforgeError("serving needs an engine with a tokenizer")
        self.options = options
        self.card = card or ModelCard(options.model_name or "chatforge", self.engine.block_size, fim=options.fim)
        self.embed_card = embed_card
        self.filters = FilterPipeline(Policy.load(options.safety_policy)) if options.safety_policy else None
        self.store = store
        self.tokens = RateLimiter(options.token_rate_limit, unit="tokens")
        self.running = ConcurrencyLimit(options.max_concurrent)
        self.recording: dict[str, threading.Event] = {}  # completion id -> set once its answers are stored

    def cards(self) -> list[ModelCard]:
        return [self.card] + ([self.embed_card] if self.embed_card else [])


def token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token's text (invalid UTF-8 of a partial character replaced) and its raw bytes."""
    raw = tokenizer.id_to_token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


async def merge(handles: Sequence[RequestHandle]) -> AsyncIterator[tuple[int, Delta]]:
    """(which handle, delta) from several running requests as the deltas arrive; closing it cancels them all."""
    if len(handles) == 1:
        async for delta in handles[0]:
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, handle: RequestHandle) -> None:
        try:
            async for delta in handle:
                queue.put_nowait((i, delta))
        except Exception as exc:
            queue.put_nowait((i, exc))
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        running = len(handles)
        while running:
            i, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for handle in handles:
            handle.cancel()


class EventStream(StreamingResponse):
    """Server-sent events that cancel their requests however the response ends, even when the client left
    before the first event (when the body iterator never ran, so its own cleanup never would); then runs
    ``on_close`` callbacks (recording the answers, releasing the client's concurrency slot)."""

    def __init__(self, events: AsyncIterator[bytes], handles: Sequence[RequestHandle]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.handles = handles
        self.on_close: list[Callable[[], Awaitable[None] | None]] = []

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for handle in self.handles:
                handle.cancel()
            for callback in self.on_close:
                result = callback()
                if result is not None:
                    await result


class RequestAborted(Exception):
    """The client left or the request's deadline passed while it ran."""


class Serving:
    """Checks, admission and the plumbing between an HTTP request and the scheduler, for every family."""

    def __init__(self, state: ServerState):
        self.state = state
        self.scheduler, self.engine, self.tokenizer = state.scheduler, state.engine, state.tokenizer
        self.options, self.filters = state.options, state.filters
        self.hidden_ids = self.engine.special_ids  # special tokens add no text, so no logprob entries either

    @property
    def card(self) -> ModelCard:
        return self.state.card

    # ---- content filters -----------------------------------------------------------------------------------

    def log_decisions(self, where: str, decisions: list) -> None:
        if self.state.store is not None and decisions:
            self.state.store.log_filter_decisions(where, [d.to_json() for d in decisions], self.card.id)

    def filter_prompt(self, text: str, param: str) -> str:
        """The prompt text after the input filters; a refusal is a 400 with code content_filter."""
        if self.filters is None:
            return text
        checked = self.filters.check(text)
        self.log_decisions("input", checked.decisions)
        if checked.refused is not None:
            raise APIError(400, checked.message, param=param, code="content_filter")
        return checked.text

    def output_guards(self, n: int) -> list[StreamGuard] | None:
        return [StreamGuard(self.filters) for _ in range(n)] if self.filters is not None else None

    def filtered_choice(self, guard: StreamGuard | None, text: str, finish_reason: str) -> tuple[str, str]:
        """A whole answer through the output filters: cut where a refusing filter tripped."""
        if guard is None:
            return text, finish_reason
        out = guard.feed(text) + guard.finish()
        self.log_decisions("output", guard.decisions)
        return out, "content_filter" if guard.tripped is not None else finish_reason

    def filtered_text(self, text: str) -> str:
        """Text shown to users that the model did not write (tool results) through the output filters."""
        if self.filters is None:
            return text
        return self.filtered_choice(StreamGuard(self.filters), text, "stop")[0]

    def check_logprobs_allowed(self, wanted: bool, param: str) -> None:
        if wanted and self.filters is not None:  # alternatives and raw tokens would show what the filters cut
            raise APIError(400, "this server filters answers, so log-probabilities (which show the raw tokens) are "
                                "not available", param=param, code="content_filter")

    # ---- checks and admission ------------------------------------------------------------------------------

    def check_model(self, name: str, kind: str) -> None:
        card = next((c for c in self.state.cards() if c.id == name), None)
        if card is None:
            raise APIError(404, f"The model '{name}' does not exist. This server has: "
                                f"{', '.join(c.id for c in self.state.cards())}.", param="model",
                           code="model_not_found")
        if card.kind != kind:
            raise APIError(400, f"The model '{name}' is a {card.kind} model and cannot serve this endpoint.",
                           param="model", code="model_not_supported")

    def admit(self, limit_key: str, prompt_lengths: Sequence[int], params: Sequence[SamplingParams]) -> None:
        """Count the request's sequences (n x prompts) and tokens before admitting it: a 503 when the waiting
        sequences would pass max_waiting (unless nothing waits), a 429 when the client's token budget is out."""
        sequences = sum(p.num_samples for p in params)
        waiting = self.scheduler.stats()["waiting"]
        if waiting and waiting + sequences > self.options.max_waiting:
            raise APIError(503, "The server is overloaded with requests; retry shortly.", type="server_error",
                           code="overloaded", headers={"Retry-After": "1"})
        tokens = sum(length + p.num_samples * p.max_tokens for length, p in zip(prompt_lengths, params))
        self.state.tokens.take(limit_key, tokens)

    @property
    def token_limit(self) -> int:
        return min(self.options.max_tokens, self.engine.block_size - 1)

    def check_requested(self, requested: int | None, param: str) -> None:
        if requested is not None and requested > self.token_limit:
            raise APIError(400, f"{param} is too large: {requested}. This model supports at most {self.token_limit} "
                                "completion tokens per request.", param=param, code="max_tokens_exceeded")

    def resolve_max_tokens(self, requested: int | None, prompt_len: int, param: str, prompt_param: str) -> int:
        """The request's completion budget; what fits the context when it did not set one."""
        self.check_requested(requested, param)
        room = self.engine.block_size - prompt_len
        if requested is None:
            if room < 1:
                raise self.context_error(prompt_len, 1, prompt_param)
            return min(self.token_limit, room)
        if requested > room:
            raise self.context_error(prompt_len, requested, prompt_param)
        return requested

    def context_error(self, prompt_len: int, completion: int, param: str) -> APIError:
        return APIError(400, f"This model's maximum context length is {self.engine.block_size} tokens. However, you "
                             f"requested {prompt_len + completion} tokens ({prompt_len} in the {param}, {completion} "
                             f"in the completion). Please reduce the length of the {param} or of the completion, "
                             "or set truncate=true.", param=param, code="context_length_exceeded")

    def reserved_tokens(self, requested: int | None) -> int:
        """Completion room kept free when truncating a prompt that set no max_tokens."""
        return requested or min(self.token_limit, self.engine.block_size // 4)

    def sampling(self, body: SamplingFields, max_tokens: int, logprobs: int | None, stop_ids: Sequence[int] = (),
                 echo: bool = False, best_of: int | None = None, names: dict[str, str] | None = None) -> SamplingParams:
        """The request's SamplingParams, checked once, by SamplingParams itself; ``names`` maps a setting to
        the request field it came from when they differ (chat's ``top_logprobs`` is the engine's logprobs)."""
        for name, value in (("n", body.n), ("best_of", best_of)):
            if value is not None and value > self.options.max_samples:
                raise APIError(400, f"'{name}' may be at most {self.options.max_samples} on this server; got {value}",
                               param=name)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise APIError(400, f"'stop' takes at most {MAX_STOP_STRINGS} sequences; got {len(stop)}", param="stop")
        values = dict(max_tokens=max_tokens, n=body.n or 1, best_of=best_of, seed=body.seed, logprobs=logprobs,
                      echo=echo, stop=stop, stop_token_ids=list(stop_ids), logit_bias=dict(body.logit_bias or {}))
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                     "repetition_penalty", "min_tokens", "ignore_eos"):
            if getattr(body, name) is not None:
                values[name] = getattr(body, name)
        try:
            return self.engine.check_params(SamplingParams(**values))
        except ParamError as exc:
            raise APIError(400, str(exc), param=(names or {}).get(exc.param, exc.param)) from None

    def submit(self, ids: list[int], params: SamplingParams) -> RequestHandle:
        try:
            return self.scheduler.submit(ids, params)
        except ParamError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        except ChatforgeError as exc:
            raise APIError(400, str(exc)) from None

    def submit_all(self, limit_key: str, prompts: Sequence[list[int]],
                   params: Sequence[SamplingParams]) -> list[RequestHandle]:
        """Admit and submit a request's prompts; if one cannot be submitted, the others are cancelled."""
        self.admit(limit_key, [len(ids) for ids in prompts], params)
        handles: list[RequestHandle] = []
        try:
            for ids, p in zip(prompts, params):
                handles.append(self.submit(ids, p))
        except APIError:
            for handle in handles:
                handle.cancel()
            raise
        return handles

    # ---- waiting for results -------------------------------------------------------------------------------

    async def watched(self, work: Awaitable, call: Call, abort: Callable[[], None]):
        """``work``'s result, unless the client disconnects or the deadline passes first: then ``abort()``
        stops it (the work must end soon after) and the request fails with 499 or 504."""

        async def disconnected() -> None:
            while (await call.request.receive())["type"] != "http.disconnect":
                pass

        task, watch = asyncio.ensure_future(work), asyncio.create_task(disconnected())
        try:
            done, _ = await asyncio.wait({task, watch}, timeout=call.remaining(), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if task in done:
            return task.result()
        abort()
        try:
            await task
        except Exception:  # the aborted work's own ending (a cancelled request, RequestAborted) says nothing new
            pass
        if watch in done:
            raise APIError(499, "client closed the request")
        raise APIError(504, f"the request did not finish within the server's limit of {self.options.request_timeout:g} "
                            "s; ask for fewer tokens", type="server_error", code="timeout")

    async def collect(self, handles: Sequence[RequestHandle], call: Call) -> list[Completion]:
        """Every handle's completion, cancelling them all if the client disconnects or the deadline passes."""

        async def run() -> None:
            async for _ in merge(handles):
                pass

        def cancel() -> None:
            for handle in handles:
                handle.cancel()

        await self.watched(run(), call, cancel)
        return [h.completion for h in handles]

    async def sse(self, chunks: AsyncIterator[dict], call: Call) -> AsyncIterator[bytes]:
        """Server-sent events of ``chunks``, ended by ``[DONE]``; a failure or the deadline becomes an error
        event (the status line is long gone) that says nothing of the server's internals."""
        try:
            async with asyncio.timeout(call.remaining()):
                async for chunk in chunks:
                    yield b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"
        except TimeoutError:
            body = errors.error_body(f"the request did not finish within the server's limit of "
                                     f"{self.options.request_timeout:g} s", type="server_error", code="timeout")
            yield b"data: " + json.dumps(body).encode() + b"\n\n"
        except Exception:
            incident = uuid.uuid4().hex[:12]
            errors.log.exception("stream failed (incident %s)", incident)
            body = errors.error_body(f"generation failed (incident {incident}; the server's log has the details)",
                                     type="server_error")
            yield b"data: " + json.dumps(body).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    @staticmethod
    def usage(completions: list[Completion]) -> dict:
        prompt = sum(len(c.prompt_ids) for c in completions)
        generated = sum(c.num_generated_tokens for c in completions)
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}
