"""The toolset loop (LaMDA's TS turns): the model calls tools until it answers the user itself.

Each step renders the conversation with the one chat template and lets the model write an assistant turn.
A turn that contains tool calls (``chatforge.chat_template``) is answered by running the tools and
appending their results as ``tool`` turns; the model then writes again and decides on its own whether to
call once more or answer. After ``max_calls`` calls the tool-call token is banned, so the next turn is an
answer. A call of a tool without a local runner (a function an API client defined) stops the loop and is
handed back as ``pending`` for the caller to run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from chatforge.chat_template import TOOL_CALL, parse_tool_calls, prompt_ids
from chatforge.errors import ChatforgeError
from chatforge.infer.params import SamplingParams
from chatforge.tools.registry import Tool, run_tool

BANNED = -100.0  # OpenAI's logit_bias floor: the token is never sampled


@dataclass
class ToolRun:
    messages: list[dict]  # the conversation with every call, result and the final answer appended
    answer: str
    calls: list[dict] = field(default_factory=list)  # {"name", "arguments", "result"} in order
    pending: list[dict] = field(default_factory=list)  # calls for the caller to run; the loop stopped for them
    finish_reason: str = "stop"


def answer_with_tools(engine, messages: list[dict], tools: dict[str, Tool], params: SamplingParams,
                      max_calls: int = 3, on_call: Callable[[dict], None] | None = None) -> ToolRun:
    if max_calls < 0:
        raise ChatforgeError(f"max_calls (tool calls per answer) must be >= 0; got {max_calls}")
    if params.num_samples != 1:
        raise ChatforgeError("tool use decodes one sample per turn (n = 1, no best_of)")
    tokenizer = engine.tokenizer
    call_id = tokenizer.special_id(TOOL_CALL)
    run = ToolRun(list(messages), "")
    while True:
        ids = prompt_ids(run.messages, tokenizer)
        room = engine.block_size - len(ids)
        if room < 1:
            raise ChatforgeError(
                f"the conversation with its tool results ({len(ids)} tokens) fills the model's context "
                f"of {engine.block_size}; lower max_calls or start a new conversation"
            )
        settings = dataclasses.replace(params, max_tokens=min(params.max_tokens or room, room))
        if len(run.calls) >= max_calls or not tools:
            settings = dataclasses.replace(settings, logit_bias={**params.logit_bias, call_id: BANNED})
        choice = engine.generate([ids], settings)[0].choices[0]
        text, calls = parse_tool_calls(tokenizer, choice.token_ids)
        if not calls:
            run.answer, run.finish_reason = text.strip(), choice.finish_reason
            run.messages.append({"role": "assistant", "content": run.answer})
            return run
        valid = [c for c in calls if c["name"] is not None]
        run.messages.append({"role": "assistant", "content": text.strip(), "tool_calls": valid})
        pending = [c for c in valid if c["name"] in tools and tools[c["name"]].run is None]
        if pending:
            run.pending, run.finish_reason = pending, "tool_calls"
            return run
        for call in calls:
            if call["name"] is None:
                result = f"error: {call['error']}"
            elif call["name"] not in tools:
                result = f"error: there is no tool named {call['name']!r}; tools: {', '.join(tools) or 'none'}"
            else:
                result = run_tool(tools[call["name"]], call["arguments"])
            record = {"name": call["name"], "arguments": call.get("arguments"), "result": result}
            run.calls.append(record)
            run.messages.append({"role": "tool", "content": result})
            if on_call is not None:
                on_call(record)
