"""``POST /v1/chat/completions``: prompts rendered by THE chat template, streamed or whole, with the request's
functions (the client runs them) and the server's built-in tools (run here, inside the answer).

Every answer this endpoint sends is recorded in the feedback store (when there is one) under the
completion's id, as it was shown (after the output filters), so the web page stores answers by reference
and nobody can make the store say the model wrote something it did not."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from typing import AsyncIterator

import anyio
from sqlalchemy.exc import SQLAlchemyError

from chatforge.chat_template import ROLE_TOKENS, fit_to_context, prompt_ids, stop_token_ids
from chatforge.errors import ChatforgeError
from chatforge.infer.outputs import Completion, TokenLogprob
from chatforge.infer.params import SamplingParams
from chatforge.infer.scheduler import RequestHandle
from chatforge.serve import errors
from chatforge.serve.errors import APIError
from chatforge.serve.protocol import ChatCompletionRequest
from chatforge.serve.serving import Call, EventStream, RequestAborted, ServerState, Serving, merge, token_text
from chatforge.tools.loop import answer_with_tools
from chatforge.tools.registry import Tool, builtin_tools


def prompt_digest(messages: list[tuple[str, str]]) -> str:
    """What an answer was an answer to: (role, text) of the prompt's messages, hashed (the store checks a
    recorded answer is attached under the same conversation)."""
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False).encode()).hexdigest()


class Shown:
    """The text of each choice as the client was shown it, and how each ended."""

    def __init__(self, n: int):
        self.texts, self.finish = [""] * n, [None] * n


class ScheduledTurns:
    """What the tool loop needs of an engine, over the server's scheduler: tool turns batch with other requests,
    and ``stop`` (set when the client leaves or the deadline passes) cancels the turn running and every later one."""

    def __init__(self, serving: "ChatServing"):
        self.serving, self.tokenizer, self.completions = serving, serving.tokenizer, []
        self.block_size = serving.engine.block_size
        self.stop = threading.Event()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        out = []
        for ids in prompts:
            if self.stop.is_set():
                raise RequestAborted()
            handle = self.serving.submit(ids, params)
            while not handle.wait(0.05):
                if self.stop.is_set():
                    handle.cancel()
            out.append(handle.result())
        self.completions += out
        return out


class ChatServing(Serving):
    def __init__(self, state: ServerState):
        super().__init__(state)
        specials = getattr(self.tokenizer, "specials", {})
        self.chat_ready = all(token in specials for token in ROLE_TOKENS.values())
        self.builtin_tools = builtin_tools(self.options.tools, self.options.index) if self.options.tools else {}

    def chat_prompt(self, body: ChatCompletionRequest) -> tuple[list[dict], list[int], int]:
        if not self.chat_ready:
            raise APIError(400, f"The model '{self.card.id}' has no chat-template tokens (its tokenizer lacks "
                                "<|user|>/<|assistant|>); use /v1/completions.", param="model")
        try:
            messages = [m.as_template() for m in body.messages]
        except ValueError as exc:
            raise APIError(400, f"a tool call's arguments are not a JSON object: {exc}", param="messages") from None
        for i, m in enumerate(messages):
            if m["role"] in ("user", "system", "tool"):
                m["content"] = self.filter_prompt(m["content"], f"messages.{i}.content")
        requested = body.max_completion_tokens or body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        self.check_requested(requested, param)
        try:
            if body.truncate:
                room = self.engine.block_size - self.reserved_tokens(requested)
                messages = fit_to_context(messages, self.tokenizer, room)
            ids = prompt_ids(messages, self.tokenizer)
        except ChatforgeError as exc:
            code = "context_length_exceeded" if "context" in str(exc) else None
            raise APIError(400, str(exc), param="messages", code=code) from None
        return messages, ids, self.resolve_max_tokens(requested, len(ids), param, "messages")

    async def create(self, body: ChatCompletionRequest, call: Call):
        self.check_model(body.model, "chat")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        self.check_logprobs_allowed(bool(body.logprobs), "logprobs")
        messages, ids, max_tokens = self.chat_prompt(body)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        stop_ids = [] if body.ignore_eos else stop_token_ids(self.tokenizer)
        params = self.sampling(body, max_tokens, logprobs, stop_ids, names={"logprobs": "top_logprobs"})
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        tools = self.request_tools(body)
        if tools:
            return await self.with_tools(body, messages, tools, params, call, rid, created)
        (handle,) = self.submit_all(call.limit_key, [ids], [params])
        record = self.recorder(rid, body, call.who, params.n)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = EventStream(self.sse(self.chunks(handle, rid, created, params.n, include_usage, record[0]), call),
                                 [handle])
            stream.on_close.append(record[1])
            return stream
        try:
            (completion,) = await self.collect([handle], call)
            guards = self.output_guards(len(completion.choices))
            choices = []
            for c in completion.choices:
                text, finish = self.filtered_choice(guards[c.index] if guards else None, c.text, c.finish_reason)
                record[0].texts[c.index], record[0].finish[c.index] = text, finish
                choices.append({"index": c.index, "message": {"role": "assistant", "content": text},
                                "logprobs": self.logprobs(c.logprobs), "finish_reason": finish})
        finally:
            await record[1]()
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.card.id,
                "choices": choices, "usage": self.usage([completion])}

    def recorder(self, rid: str, body: ChatCompletionRequest, who: str, n: int):
        """(what was shown, an async function storing it under ``rid``): called once the answer is final (it
        must be, or the web page's reference to ``rid`` waits for it in vain)."""
        shown = Shown(n)
        store = self.state.store
        if store is None:
            async def nothing() -> None:
                return None
            return shown, nothing
        done = self.state.recording[rid] = threading.Event()
        digest = prompt_digest([(m.role, m.text()) for m in body.messages])

        def write() -> None:
            choices = [(i, text, finish or "cancelled") for i, (text, finish) in enumerate(zip(shown.texts,
                                                                                                shown.finish))]
            try:
                store.record_generation(rid, who, self.card.id, digest, choices)
            except SQLAlchemyError as exc:  # the client has its answer; only storing it by reference is lost
                errors.log.error("could not record completion %s in the feedback store: %s", rid, exc)
            finally:
                done.set()
                self.state.recording.pop(rid, None)

        async def record() -> None:
            await anyio.to_thread.run_sync(write)
        return shown, record

    def request_tools(self, body: ChatCompletionRequest) -> dict[str, Tool]:
        """The server's built-in tools and the request's functions (the client runs those), unless tool_choice
        is none."""
        if body.tool_choice == "none":
            return {}
        tools = dict(self.builtin_tools)
        for spec in body.tools or []:
            if spec.function.name in tools:
                raise APIError(400, f"tool name '{spec.function.name}' is taken (built-in tools: "
                                    f"{', '.join(self.builtin_tools)})", param="tools")
            tools[spec.function.name] = Tool(spec.function.name, spec.function.description or "",
                                             spec.function.parameters or {"type": "object", "properties": {}})
        return tools

    async def with_tools(self, body: ChatCompletionRequest, messages: list[dict], tools: dict[str, Tool],
                         params: SamplingParams, call: Call, rid: str, created: int):
        """The toolset loop over the scheduler: built-in calls run here; a call of a client's function ends the
        answer with ``tool_calls`` (finish_reason "tool_calls") for the client to run and send back. The
        client leaving or the deadline passing cancels the loop, whichever turn it is in."""
        if params.num_samples != 1 or params.logprobs is not None:
            raise APIError(400, "with tools, a request returns one choice without logprobs (n = 1)", param="tools")
        self.admit(call.limit_key, [0], [params])
        record = self.recorder(rid, body, call.who, params.n)
        turns = ScheduledTurns(self)
        try:
            run = await self.watched(anyio.to_thread.run_sync(
                lambda: answer_with_tools(turns, messages, tools, params, self.options.max_tool_calls)),
                call, turns.stop.set)
            guards = self.output_guards(1)
            content, finish_reason = self.filtered_choice(guards[0] if guards else None, run.messages[-1]["content"],
                                                          run.finish_reason)
            record[0].texts[0], record[0].finish[0] = content, finish_reason
        finally:
            await record[1]()
        message: dict = {"role": "assistant", "content": content or None}
        if run.pending and finish_reason != "content_filter":
            message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                      "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
                                     for c in run.pending]
        # chatforge: the server-side calls behind the answer; their results are shown, so they are filtered too
        extra = {"tool_runs": [{**c, "result": self.filtered_text(str(c["result"]))} for c in run.calls]}
        if body.stream:
            # streamed calls carry their position: the openai client's stream helpers assemble calls by index
            delta = {"content": message["content"]}
            if "tool_calls" in message:
                delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]

            async def chunks() -> AsyncIterator[dict]:
                for part, finish in (({"role": "assistant", "content": ""}, None), (delta, None), ({}, finish_reason)):
                    yield {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.card.id,
                           "choices": [{"index": 0, "delta": part, "logprobs": None, "finish_reason": finish}]}
            return EventStream(self.sse(chunks(), call), [])
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.card.id,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
                "usage": self.usage(turns.completions), **extra}

    async def chunks(self, handle: RequestHandle, rid: str, created: int, n: int, include_usage: bool,
                     shown: Shown) -> AsyncIterator[dict]:
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
            logprobs = self.logprobs(delta.logprobs)
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
            shown.texts[delta.index] += text
            shown.finish[delta.index] = finish
            yield chunk([{"index": delta.index, "delta": {"content": text} if text else {},
                          "logprobs": logprobs, "finish_reason": finish}])
            if len(cut) == n:
                break
        if include_usage:
            yield chunk([], usage=self.usage([handle.completion]))

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        if entries is None:
            return None

        def item(token_id: int, logprob: float) -> dict:
            text, raw = token_text(self.tokenizer, token_id)
            return {"token": text, "logprob": logprob, "bytes": raw}

        return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                            for e in entries if e.token_id not in self.hidden_ids], "refusal": None}
