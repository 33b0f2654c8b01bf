"""The OpenAI-compatible HTTP API over one engine's continuous-batching scheduler.

    app = create_app(Scheduler(engine), ServeOptions(model_name="chatforge-sft"), store=FeedbackStore(url))

Endpoints (``/openapi.json`` describes them all):

* ``GET /v1/models``, ``GET /v1/models/{id}`` — the served model(s); each card also says ``context_length``,
  ``kind`` (chat or embedding) and ``fim`` (whether ``suffix`` insertion is available).
* ``POST /v1/chat/completions`` — prompts are rendered by THE chat template (``chatforge.chat_template``);
  ``stream``, ``n``, ``stop``, ``max_tokens``/``max_completion_tokens``, ``temperature``, ``top_p``,
  presence/frequency penalties, ``logit_bias``, ``seed``, ``logprobs``/``top_logprobs``, ``user``; ``tools``
  (functions the client runs: the answer ends in ``tool_calls``) and ``tool_choice`` (none/auto); with
  ``--tools`` the server also runs built-in tools (calculator, retrieval) inside the answer.
* ``POST /v1/completions`` — ``prompt`` as text(s) or token ids, ``suffix`` (only for a model trained for
  fill-in-the-middle, else a 400), ``echo``, ``logprobs``, ``best_of``, ``stream``.
* ``POST /v1/moderations`` — OpenAI's shape: per input, ``flagged``, ``categories`` and ``category_scores``
  of the content filters (the ``--safety_policy`` categories, PII, and its classifier if any). With a
  policy, chat prompts go through the filters before generation (a refusal is a 400 with code
  ``content_filter``) and answers while they stream (a tripped filter cuts the answer:
  ``finish_reason: "content_filter"``); every decision is logged to the feedback store.
* ``POST /v1/edits`` — the legacy edit shape (``input``, ``instruction``), rendered with the edit template that
  ``chatforge edit-train`` trains on; serve an edit model for useful answers.
* ``POST /v1/embeddings`` — when an embedding model was loaded; otherwise a 400 saying so.
* ``GET /health`` — scheduler occupancy; ``GET /`` — the web chat page; ``/feedback/...`` — its store.

Every generation request is submitted to the shared ``Scheduler``, so concurrent requests decode together.
Streams are server-sent events ending in ``data: [DONE]``. A client that disconnects (mid-stream, or while
waiting for a non-streamed answer) has its request cancelled, which frees its KV-cache slots at the next
step. Bad input of any kind is a 4xx in OpenAI's error shape (see ``chatforge.serve.errors``).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Sequence

import anyio
import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles

from chatforge.chat_template import ROLE_TOKENS, edit_messages, fit_to_context, prompt_ids, stop_token_ids
from chatforge.config import option
from chatforge.data.fim import insertion_ids, middle_params
from chatforge.data.rankings import MAX_K, MIN_K
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.infer.outputs import Completion, Delta, TokenLogprob
from chatforge.infer.params import SamplingParams
from chatforge.infer.scheduler import RequestHandle, Scheduler
from chatforge.safety.filters import FilterPipeline, Policy, StreamGuard
from chatforge.serve import errors
from chatforge.serve.errors import APIError
from chatforge.serve.feedback_api import feedback_router
from chatforge.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EditRequest,
    EmbeddingRequest,
    ModerationRequest,
    SamplingFields,
)
from chatforge.serve.security import BodySizeLimit, KeyChecker, RateLimiter
from chatforge.tools.loop import answer_with_tools
from chatforge.tools.registry import Tool, builtin_tools

STATIC_DIR = Path(__file__).parent / "static"
MAX_STOP_STRINGS = 4
MAX_PROMPTS = 128  # texts in one /v1/completions request
MAX_EMBED_INPUTS = 2048


@dataclass
class ServeOptions:
    model_name: str = option("", "model id clients send in 'model' (default: the checkpoint folder's name)")
    api_keys: list[str] = option([], "accepted Bearer API keys, comma-separated (none = no authentication)")
    api_keys_file: str = option("", "file with one accepted API key per line (keeps keys off the command line)")
    rate_limit: float = option(0.0, "requests per minute per API key (per client address without keys); 0 = off")
    max_request_bytes: int = option(1_048_576, "largest request body; bigger ones get a 413")
    max_tokens: int = option(1024, "most tokens one request may ask to generate (capped by the context)")
    max_samples: int = option(16, "largest n and best_of of one request")
    max_waiting: int = option(256, "requests waiting for a slot beyond which new ones get a 503")
    compare_k: int = option(4, "answers side by side in the web page's compare mode (4..9, what a ranking needs)")
    fim: bool = option(False, "the model was trained for fill-in-the-middle, so /v1/completions accepts 'suffix' "
                              "(also on when the checkpoint's config.json says \"fim\": true)")
    tools: list[str] = option([], "built-in tools run server-side in every chat request: calculator, retrieval")
    index: str = option("", "search index of the retrieval tool (built by `chatforge search --build`)")
    max_tool_calls: int = option(3, "tool calls the model may make per answer")
    safety_policy: str = option("", "content-filter policy (TOML/YAML/JSON, see chatforge.safety.filters) applied to "
                                    "prompts and answers; empty = no filtering (/v1/moderations then checks PII only)")

    def validate(self) -> None:
        for name in ("max_request_bytes", "max_tokens", "max_samples", "max_waiting"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option '{name}' must be >= 1; got {getattr(self, name)}")
        if self.rate_limit < 0:
            raise ConfigError(f"option 'rate_limit' must be >= 0 (0 = off); got {self.rate_limit}")
        if self.max_tool_calls < 0:
            raise ConfigError(f"option 'max_tool_calls' must be >= 0 (0 = answer without calls); got {self.max_tool_calls}")
        if not MIN_K <= self.compare_k <= MAX_K:
            raise ConfigError(f"option 'compare_k' must be in {MIN_K}..{MAX_K} (a ranking for the reward model "
                              f"compares that many answers); got {self.compare_k}")

    def keys(self) -> list[str]:
        keys = list(self.api_keys)
        if self.api_keys_file:
            path = Path(self.api_keys_file)
            if not path.is_file():
                raise ChatforgeError(f"API keys file not found: {path}")
            keys += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return keys


@dataclass
class ModelCard:
    id: str
    context_length: int
    kind: str = "chat"  # chat (chat and text completions) or embedding
    fim: bool = False
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def to_json(self) -> dict:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "chatforge",
                "context_length": self.context_length, "kind": self.kind, "fim": self.fim}


def token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token's text (invalid UTF-8 of a partial character replaced) and its raw bytes."""
    raw = tokenizer.id_to_token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def _check_text(value: str, param: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates survive JSON parsing but no tokenizer can encode them
        raise APIError(400, f"'{param}' contains characters that are not valid Unicode text", param=param) from None
    return value


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
    before the first event (when the body iterator never ran, so its own cleanup never would)."""

    def __init__(self, events: AsyncIterator[bytes], handles: Sequence[RequestHandle]):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.handles = handles

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for handle in self.handles:
                handle.cancel()


class OpenAIService:
    """The request handlers: checking, prompt building, submission to the scheduler, response shapes."""

    def __init__(self, scheduler: Scheduler, options: ServeOptions, embedder=None, card: ModelCard | None = None):
        self.scheduler = scheduler
        self.engine = scheduler.engine
        self.tokenizer = self.engine.tokenizer
        if self.tokenizer is None:
            raise ChatforgeError("serving needs an engine with a tokenizer")
        self.options = options
        self.card = card or ModelCard(options.model_name or "chatforge", self.engine.block_size, fim=options.fim)
        self.embedder = embedder
        self.embed_card = None
        if embedder is not None:
            self.embed_card = ModelCard(embedder.name, embedder.spec_.max_tokens, kind="embedding")
        self._embed_lock = threading.Lock()
        specials = getattr(self.tokenizer, "specials", {})
        self.chat_ready = all(token in specials for token in ROLE_TOKENS.values())
        self.hidden_ids = self.engine.special_ids  # special tokens add no text, so no logprob entries either
        self.builtin_tools = builtin_tools(options.tools, options.index) if options.tools else {}
        self.filters = FilterPipeline(Policy.load(options.safety_policy)) if options.safety_policy else None
        self.moderation = self.filters or FilterPipeline()
        self.store = None  # the feedback store, where filter decisions are logged (set by create_app)

    def log_decisions(self, where: str, decisions: list) -> None:
        if self.store is not None and decisions:
            self.store.log_filter_decisions(where, [d.to_json() for d in decisions], self.card.id)

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

    # ---- shared checks -------------------------------------------------------------------------------------

    def cards(self) -> list[ModelCard]:
        return [self.card] + ([self.embed_card] if self.embed_card else [])

    def check_model(self, name: str, kind: str) -> None:
        card = next((c for c in self.cards() if c.id == name), None)
        if card is None:
            raise APIError(404, f"The model '{name}' does not exist. This server has: "
                                f"{', '.join(c.id for c in self.cards())}.", param="model", code="model_not_found")
        if card.kind != kind:
            raise APIError(400, f"The model '{name}' is a {card.kind} model and cannot serve this endpoint.",
                           param="model", code="model_not_supported")

    def check_capacity(self) -> None:
        if self.scheduler.stats()["waiting"] >= self.options.max_waiting:
            raise APIError(503, "The server is overloaded with requests; retry shortly.", type="server_error",
                           code="overloaded", headers={"Retry-After": "1"})

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
                 echo: bool = False, best_of: int | None = None) -> SamplingParams:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise APIError(400, f"'stop' takes at most {MAX_STOP_STRINGS} sequences; got {len(stop)}", param="stop")
        for name, value in (("n", body.n), ("best_of", best_of)):
            if value is not None and value > self.options.max_samples:
                raise APIError(400, f"'{name}' may be at most {self.options.max_samples} on this server; got {value}",
                               param=name)
        values = dict(max_tokens=max_tokens, n=body.n or 1, best_of=best_of, seed=body.seed, logprobs=logprobs,
                      echo=echo, stop=[_check_text(s, "stop") for s in stop], stop_token_ids=list(stop_ids),
                      logit_bias=dict(body.logit_bias or {}))
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                     "repetition_penalty", "min_tokens", "ignore_eos"):
            if getattr(body, name) is not None:
                values[name] = getattr(body, name)
        try:
            return SamplingParams(**values).validate()
        except ChatforgeError as exc:
            # SamplingParams' messages start with the setting's name ("top_p must be...", "logit_bias[5] ...")
            name = re.match(r"\w*", str(exc)).group()
            raise APIError(400, str(exc), param=name if name in values or hasattr(body, name) else None) from None

    def submit(self, ids: list[int], params: SamplingParams) -> RequestHandle:
        self.check_capacity()
        try:
            return self.scheduler.submit(ids, params)
        except ChatforgeError as exc:
            raise APIError(400, str(exc)) from None

    # ---- logprob shapes ------------------------------------------------------------------------------------

    def chat_logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        if entries is None:
            return None

        def item(token_id: int, logprob: float) -> dict:
            text, raw = token_text(self.tokenizer, token_id)
            return {"token": text, "logprob": logprob, "bytes": raw}

        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries if e.token_id not in self.hidden_ids], "refusal": None}

    def legacy_logprobs(self, entries: list[tuple[int, TokenLogprob | None]], offset: int) -> tuple[dict, int]:
        """OpenAI's completions logprobs ({tokens, token_logprobs, top_logprobs, text_offset}) of
        (token id, entry) pairs, the first at character ``offset``; also returns the offset after them."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, entry in entries:
            if token_id in self.hidden_ids:
                continue
            text, _ = token_text(self.tokenizer, token_id)
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            out["token_logprobs"].append(entry.logprob if entry else None)
            top = None
            if entry is not None:
                top = {token_text(self.tokenizer, t)[0]: lp for t, lp in entry.top}
            out["top_logprobs"].append(top)
            offset += len(text)
        return out, offset

    # ---- waiting for results -------------------------------------------------------------------------------

    async def collect(self, handles: Sequence[RequestHandle], request: Request) -> list[Completion]:
        """Every handle's completion, cancelling them all if the client disconnects first."""

        async def run() -> None:
            async for _ in merge(handles):
                pass

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.create_task(run()), asyncio.create_task(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                for handle in handles:
                    handle.cancel()
        if not work.done() or work.cancelled():
            raise APIError(499, "client closed the request")
        work.result()  # re-raises an engine failure
        return [h.completion for h in handles]

    async def sse(self, chunks: AsyncIterator[dict]) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"
        except Exception as exc:  # the engine failed mid-stream: the status line is long gone, say it in-band
            errors.log.exception("stream failed")
            body = errors.error_body(f"generation failed: {exc}", type="server_error")
            yield b"data: " + json.dumps(body).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    # ---- chat ----------------------------------------------------------------------------------------------

    def chat_prompt(self, body: ChatCompletionRequest) -> tuple[list[dict], list[int], int]:
        if not self.chat_ready:
            raise APIError(400, f"The model '{self.card.id}' has no chat-template tokens (its tokenizer lacks "
                                "<|user|>/<|assistant|>); use /v1/completions.", param="model")
        try:
            messages = [m.as_template() for m in body.messages]
        except ValueError as exc:
            raise APIError(400, f"a tool call's arguments are not a JSON object: {exc}", param="messages") from None
        for i, m in enumerate(messages):
            _check_text(m["content"], f"messages.{i}.content")
            if m["role"] in ("user", "system", "tool"):
                m["content"] = self.filter_prompt(m["content"], f"messages.{i}.content")
        requested = body.max_completion_tokens or body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        self.check_requested(requested, param)
        try:
            if body.truncate:
                messages = fit_to_context(messages, self.tokenizer, self.engine.block_size - self.reserved_tokens(requested))
            ids = prompt_ids(messages, self.tokenizer)
        except ChatforgeError as exc:
            code = "context_length_exceeded" if "context" in str(exc) else None
            raise APIError(400, str(exc), param="messages", code=code) from None
        return messages, ids, self.resolve_max_tokens(requested, len(ids), param, "messages")

    async def chat(self, body: ChatCompletionRequest, request: Request):
        self.check_model(body.model, "chat")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        messages, ids, max_tokens = self.chat_prompt(body)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        stop_ids = [] if body.ignore_eos else stop_token_ids(self.tokenizer)
        params = self.sampling(body, max_tokens, logprobs, stop_ids)
        tools = self.request_tools(body)
        if tools:
            return await self.chat_with_tools(body, messages, tools, params)
        handle = self.submit(ids, params)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(self.sse(self.chat_chunks(handle, rid, created, params.n, include_usage)), [handle])
        (completion,) = await self.collect([handle], request)
        guards = self.output_guards(len(completion.choices))
        choices = []
        for c in completion.choices:
            text, finish = self.filtered_choice(guards[c.index] if guards else None, c.text, c.finish_reason)
            choices.append({"index": c.index, "message": {"role": "assistant", "content": text},
                            "logprobs": self.chat_logprobs(c.logprobs), "finish_reason": finish})
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.card.id,
                "choices": choices, "usage": self.usage([completion])}

    def request_tools(self, body: ChatCompletionRequest) -> dict[str, Tool]:
        """The server's built-in tools and the request's functions (the client runs those), unless tool_choice is none."""
        if body.tool_choice == "none":
            return {}
        tools = dict(self.builtin_tools)
        for spec in body.tools or []:
            if spec.function.name in tools:
                raise APIError(400, f"tool name '{spec.function.name}' is taken (built-in tools: {', '.join(self.builtin_tools)})",
                               param="tools")
            tools[spec.function.name] = Tool(spec.function.name, spec.function.description or "",
                                             spec.function.parameters or {"type": "object", "properties": {}})
        return tools

    async def chat_with_tools(self, body: ChatCompletionRequest, messages: list[dict], tools: dict[str, Tool],
                              params: SamplingParams):
        """The toolset loop over the scheduler: built-in calls run here; a call of a client's function ends the
        answer with ``tool_calls`` (finish_reason "tool_calls") for the client to run and send back."""
        if params.num_samples != 1 or params.logprobs is not None:
            raise APIError(400, "with tools, a request returns one choice without logprobs (n = 1)", param="tools")
        turns = ScheduledTurns(self)
        run = await anyio.to_thread.run_sync(
            lambda: answer_with_tools(turns, messages, tools, params, self.options.max_tool_calls))
        guards = self.output_guards(1)
        content, finish_reason = self.filtered_choice(guards[0] if guards else None, run.messages[-1]["content"],
                                                      run.finish_reason)
        message: dict = {"role": "assistant", "content": content or None}
        if run.pending and finish_reason != "content_filter":
            message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                      "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
                                     for c in run.pending]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        extra = {"tool_runs": run.calls}  # chatforge: the server-side calls behind the answer
        if body.stream:
            # streamed calls carry their position: the openai client's stream helpers assemble calls by index
            delta = {"content": message["content"]}
            if "tool_calls" in message:
                delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]

            async def chunks() -> AsyncIterator[dict]:
                for part, finish in (({"role": "assistant", "content": ""}, None), (delta, None), ({}, finish_reason)):
                    yield {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.card.id,
                           "choices": [{"index": 0, "delta": part, "logprobs": None, "finish_reason": finish}]}
            return EventStream(self.sse(chunks()), [])
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.card.id,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
                "usage": self.usage(turns.completions), **extra}

    async def chat_chunks(self, handle: RequestHandle, rid: str, created: int, n: int,
                          include_usage: bool) -> AsyncIterator[dict]:
        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.card.id,
                    "choices": choices, **extra}

        for i in range(n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        guards = self.output_guards(n)
        cut: set[int] = set()
        async for _, delta in merge([handle]):
            if delta.index in cut:
                continue
            logprobs = self.chat_logprobs(delta.logprobs)
            text, finish = delta.text, delta.finish_reason
            if guards is not None:
                guard = guards[delta.index]
                text = guard.feed(text) + (guard.finish() if finish else "")
                if guard.tripped is not None or finish:
                    self.log_decisions("output", guard.decisions)
                if guard.tripped is not None:  # cut the answer here, mid-stream
                    finish = "content_filter"
                    cut.add(delta.index)
                    if len(cut) == n:
                        handle.cancel()
            if not (text or finish or (logprobs and logprobs["content"])):
                continue
            yield chunk([{"index": delta.index, "delta": {"content": text} if text else {},
                          "logprobs": logprobs, "finish_reason": finish}])
            if len(cut) == n:
                break
        if include_usage:
            yield chunk([], usage=self.usage([handle.completion]))

    @staticmethod
    def usage(completions: list[Completion]) -> dict:
        prompt = sum(len(c.prompt_ids) for c in completions)
        generated = sum(c.num_generated_tokens for c in completions)
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    # ---- moderations ---------------------------------------------------------------------------------------

    def moderations(self, body: ModerationRequest) -> dict:
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        if not texts:
            raise APIError(400, "'input' must not be an empty list", param="input")
        results = []
        for i, text in enumerate(texts):
            scores = self.moderation.scores(_check_text(text, f"input.{i}"))
            threshold = self.moderation.policy.classifier_threshold
            flags = {name: score >= (threshold if name == "classifier" else 1.0) for name, score in scores.items()}
            results.append({"flagged": any(flags.values()), "categories": flags,
                            "category_scores": {k: round(v, 4) for k, v in scores.items()}})
        return {"id": f"modr-{uuid.uuid4().hex}", "model": "chatforge-filters", "results": results}

    # ---- edits ---------------------------------------------------------------------------------------------

    async def edits(self, body: EditRequest, request: Request):
        """The legacy edits shape over the chat model, with the edit template the edit stage trains on."""
        self.check_model(body.model, "chat")
        if body.stream:
            raise APIError(400, "/v1/edits does not stream; use /v1/chat/completions for a streamed edit", param="stream")
        if not self.chat_ready:
            raise APIError(400, f"The model '{self.card.id}' has no chat-template tokens, so it cannot edit.",
                           param="model")
        _check_text(body.input, "input")
        if not _check_text(body.instruction, "instruction").strip():
            raise APIError(400, "'instruction' must say how to edit the input", param="instruction")
        ids = prompt_ids(edit_messages(body.instruction, body.input), self.tokenizer)
        max_tokens = self.resolve_max_tokens(body.max_tokens, len(ids), "max_tokens", "input")
        handle = self.submit(ids, self.sampling(body, max_tokens, None, stop_token_ids(self.tokenizer)))
        (completion,) = await self.collect([handle], request)
        return {"object": "edit", "created": int(time.time()), "model": self.card.id,
                "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason}
                            for c in completion.choices],
                "usage": self.usage([completion])}

    # ---- text completions ----------------------------------------------------------------------------------

    def completion_prompts(self, body: CompletionRequest) -> list[str | list[int]]:
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts = [prompt]
        elif not prompt:
            raise APIError(400, "'prompt' must not be an empty list", param="prompt")
        elif isinstance(prompt[0], int):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request; got {len(prompts)}", param="prompt")
        prompts = [self.filter_prompt(_check_text(p, "prompt"), "prompt") if isinstance(p, str) else p for p in prompts]
        if body.suffix is not None:
            if not self.card.fim:
                raise APIError(400, f"The model '{self.card.id}' was not trained for insertion (fill-in-the-middle), "
                                    "so 'suffix' is not supported. Send the prompt without a suffix, or serve a model "
                                    "trained with FIM.", param="suffix", code="suffix_not_supported")
            if not all(isinstance(p, str) for p in prompts):
                raise APIError(400, "'suffix' needs text prompts, not token ids", param="suffix")
            _check_text(body.suffix, "suffix")
        return prompts

    def completion_ids(self, body: CompletionRequest, prompt: str | list[int], requested: int | None) -> list[int]:
        if body.suffix is not None:
            return insertion_ids(self.tokenizer, prompt, body.suffix)
        try:
            ids = self.engine.encode(prompt)
        except ChatforgeError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        if body.truncate:
            ids = ids[-(self.engine.block_size - self.reserved_tokens(requested)):]
        return ids

    async def completions(self, body: CompletionRequest, request: Request):
        self.check_model(body.model, "chat")
        if body.stream and body.best_of is not None and body.best_of > (body.n or 1):
            raise APIError(400, "'best_of' cannot be used with 'stream' (the best answers are known only at the end)",
                           param="best_of")
        self.check_requested(body.max_tokens, "max_tokens")
        prompts = self.completion_prompts(body)
        all_ids = [self.completion_ids(body, p, body.max_tokens) for p in prompts]
        max_tokens = [self.resolve_max_tokens(body.max_tokens, len(ids), "max_tokens", "prompt") for ids in all_ids]
        echo = bool(body.echo)
        params = [self.sampling(body, m, body.logprobs, echo=echo and body.logprobs is not None, best_of=body.best_of)
                  for m in max_tokens]
        if body.suffix is not None:
            params = [middle_params(self.tokenizer, p) for p in params]
        handles: list[RequestHandle] = []
        try:
            for ids, p in zip(all_ids, params):
                handles.append(self.submit(ids, p))
        except APIError:
            for handle in handles:
                handle.cancel()
            raise
        rid, created, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), params[0].n
        if body.stream:
            if self.filters is not None:
                raise APIError(400, "this server filters answers: stream chat completions, or ask for the whole text "
                                    "completion (stream=false)", param="stream")
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = self.completion_chunks(handles, all_ids, rid, created, n, echo, body.logprobs, include_usage)
            return EventStream(self.sse(chunks), handles)
        completions = await self.collect(handles, request)
        choices = []
        for p, completion in enumerate(completions):
            prompt_text = self.tokenizer.decode(completion.prompt_ids) if echo else ""
            for c in completion.choices:
                logprobs = None
                if body.logprobs is not None:
                    pairs = list(zip(completion.prompt_ids, completion.prompt_logprobs)) if echo else []
                    logprobs, _ = self.legacy_logprobs(pairs + [(e.token_id, e) for e in c.logprobs], 0)
                guards = self.output_guards(1)
                text, finish = self.filtered_choice(guards[0] if guards else None, c.text, c.finish_reason)
                choices.append({"text": prompt_text + text, "index": p * n + c.index, "logprobs": logprobs,
                                "finish_reason": finish})
        return {"id": rid, "object": "text_completion", "created": created, "model": self.card.id,
                "choices": choices, "usage": self.usage(completions)}

    async def completion_chunks(self, handles, all_ids, rid, created, n, echo, logprobs, include_usage):
        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": self.card.id,
                    "choices": choices, **extra}

        offsets: dict[int, int] = {}
        if echo:
            for p, ids in enumerate(all_ids):
                text = self.tokenizer.decode(ids)
                for i in range(n):
                    lp = None
                    if logprobs is not None:  # prompt log-probs are computed with the prefill, not streamed
                        lp, offsets[p * n + i] = self.legacy_logprobs([(t, None) for t in ids], 0)
                    else:
                        offsets[p * n + i] = len(text)
                    yield chunk([{"text": text, "index": p * n + i, "logprobs": lp, "finish_reason": None}])
        async for p, delta in merge(handles):
            index = p * n + delta.index
            lp = None
            if delta.logprobs is not None:
                lp, offsets[index] = self.legacy_logprobs([(e.token_id, e) for e in delta.logprobs],
                                                          offsets.get(index, 0))
            if delta.text or delta.finish_reason or (lp and lp["tokens"]):
                yield chunk([{"text": delta.text, "index": index, "logprobs": lp, "finish_reason": delta.finish_reason}])
        if include_usage:
            yield chunk([], usage=self.usage([h.completion for h in handles]))

    # ---- embeddings ----------------------------------------------------------------------------------------

    async def embeddings(self, body: EmbeddingRequest):
        if self.embedder is None:
            known = body.model == self.card.id
            raise APIError(400 if known else 404,
                           f"The model '{body.model}' {'is a chat model; ' if known else 'does not exist; '}"
                           "this server has no embedding model loaded (start it with --embed_ckpt=DIR).",
                           param="model", code="model_not_supported" if known else "model_not_found")
        self.check_model(body.model, "embedding")
        texts = self.embedding_inputs(body.input)
        if body.dimensions is not None and body.dimensions != self.embedder.dim:
            raise APIError(400, f"this model's embeddings have {self.embedder.dim} dimensions; 'dimensions' must be "
                                f"that or unset (got {body.dimensions})", param="dimensions")
        vectors, tokens = await anyio.to_thread.run_sync(self._embed, texts, body.input_type or "document")
        data = []
        for i, vector in enumerate(vectors):
            if body.encoding_format == "base64":
                value = base64.b64encode(vector.astype("<f4").tobytes()).decode()
            else:
                value = vector.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        return {"object": "list", "data": data, "model": self.embed_card.id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def embedding_inputs(self, value) -> list[str]:
        tokenizer = self.embedder.tokenizer
        if isinstance(value, str):
            items = [value]
        elif value and isinstance(value[0], int):
            items = [value]
        else:
            items = list(value)
        if not items or len(items) > MAX_EMBED_INPUTS:
            raise APIError(400, f"'input' must hold 1 to {MAX_EMBED_INPUTS} items; got {len(items)}", param="input")
        texts = []
        for item in items:
            if isinstance(item, list):
                bad = [t for t in item if not 0 <= t < tokenizer.vocab_size]
                if bad:
                    raise APIError(400, f"token id {bad[0]} is outside the vocabulary", param="input")
                item = tokenizer.decode(item)
            if not item:
                raise APIError(400, "'input' cannot contain an empty string", param="input")
            texts.append(_check_text(item, "input"))
        return texts

    def _embed(self, texts: list[str], role: str) -> tuple[np.ndarray, int]:
        with self._embed_lock:  # one forward at a time: the model is not shared-state safe across threads
            vectors = self.embedder.embed(texts, role=role)
        limit = self.embedder.spec_.max_tokens
        tokens = sum(min(len(self.embedder.tokenizer.encode(t)), limit) for t in texts)
        return vectors, tokens


class ScheduledTurns:
    """What the tool loop needs of an engine, over the server's scheduler: tool turns batch with other requests."""

    def __init__(self, service: OpenAIService):
        self.service, self.tokenizer, self.completions = service, service.tokenizer, []
        self.block_size = service.engine.block_size

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        out = [self.service.submit(ids, params).result() for ids in prompts]
        self.completions += out
        return out


def create_app(scheduler: Scheduler, options: ServeOptions | None = None, store=None, embedder=None,
               card: ModelCard | None = None) -> FastAPI:
    """The FastAPI app: OpenAI routes over ``scheduler``, the feedback routes over ``store`` (if given), the web
    page. Several apps may share one scheduler (one engine, one batch)."""
    options = options or ServeOptions()
    options.validate()
    service = OpenAIService(scheduler, options, embedder, card)
    keys = KeyChecker(options.keys())
    limiter = RateLimiter(options.rate_limit)
    app = FastAPI(title="chatforge", version="1", docs_url=None, redoc_url=None,  # docs pages need a CDN
                  description="OpenAI-compatible API of a chatforge model, and the feedback store of its web page.")
    app.state.service = service
    app.state.store = store
    service.store = store
    errors.install(app)
    bearer = HTTPBearer(auto_error=False, description="an API key, when the server was started with some")

    def client(request: Request, _=Depends(bearer)) -> str:
        return keys.check(request.headers.get("authorization"))

    def limited(request: Request, who: str = Depends(client)) -> str:
        limiter.take(who or f"ip-{request.client.host if request.client else ''}")
        return who

    @app.get("/v1/models", tags=["openai"])
    async def list_models(_: str = Depends(client)):
        return {"object": "list", "data": [c.to_json() for c in service.cards()]}

    @app.get("/v1/models/{model_id}", tags=["openai"])
    async def get_model(model_id: str, _: str = Depends(client)):
        for c in service.cards():
            if c.id == model_id:
                return c.to_json()
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest, request: Request, _: str = Depends(limited)):
        return await service.chat(body, request)

    @app.post("/v1/completions", tags=["openai"])
    async def completions(body: CompletionRequest, request: Request, _: str = Depends(limited)):
        return await service.completions(body, request)

    @app.post("/v1/moderations", tags=["openai"])
    async def moderations(body: ModerationRequest, _: str = Depends(limited)):
        return service.moderations(body)

    @app.post("/v1/edits", tags=["openai"])
    async def edits(body: EditRequest, request: Request, _: str = Depends(limited)):
        return await service.edits(body, request)

    @app.post("/v1/embeddings", tags=["openai"])
    async def embeddings(body: EmbeddingRequest, _: str = Depends(limited)):
        return await service.embeddings(body)

    @app.get("/health", tags=["server"])
    async def health():
        return {"status": "ok", "model": service.card.id, **scheduler.stats()}

    @app.get("/ui/config", tags=["web page"])
    async def ui_config():
        return {"model": service.card.id, "context_length": service.engine.block_size, "compare_k": options.compare_k,
                "max_tokens": service.token_limit, "auth": keys.enabled, "feedback": store is not None}

    if store is not None:
        app.include_router(feedback_router(store, service.card.id, client))

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodySizeLimit, max_bytes=options.max_request_bytes)
    return app
