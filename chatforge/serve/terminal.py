"""Terminal chat: a multi-turn conversation with streamed answers, tools and safety filters, and its commands.

The `chatforge chat` stage (chatforge/stages/chat.py) describes the options.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from chatforge import io
from chatforge.chat_template import fit_to_context, prompt_ids, validate_messages
from chatforge.errors import ChatforgeError
from chatforge.infer.engine import Engine
from chatforge.infer.params import SamplingParams
from chatforge.safety.filters import FilterPipeline, StreamGuard
from chatforge.tools.loop import answer_with_tools

HELP = "commands: /reset, /system TEXT, /save FILE, /quit"


class Conversation:
    """The messages so far, trimmed to what fits the model's context before each answer."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str = "", tools: dict | None = None,
                 max_tool_calls: int = 3, filters: FilterPipeline | None = None):
        self.engine = engine
        self.filters = filters
        self.params = params
        self.tools, self.max_tool_calls = tools or {}, max_tool_calls
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def set_system(self, text: str) -> None:
        turns = [m for m in self.messages if m["role"] != "system"]
        self.messages = ([{"role": "system", "content": text}] if text else []) + turns

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]

    def answer(self, user_text: str, on_text=None) -> str:
        """Add the user's message, stream the assistant's answer through ``on_text``, remember and return it."""
        guard = StreamGuard(self.filters) if self.filters is not None else None
        if guard is not None:
            checked = self.filters.check(user_text)
            if checked.refused is not None:
                if on_text is not None:
                    on_text(checked.message)
                return checked.message
            user_text = checked.text
        self.messages.append({"role": "user", "content": user_text})
        # the answer may take at most half the context, so a long max_tokens never leaves the prompt no room
        room = min(self.params.max_tokens or self.engine.block_size, self.engine.block_size // 2)
        self.messages = fit_to_context(self.messages, self.engine.tokenizer, self.engine.block_size - room)
        if self.tools:
            run = answer_with_tools(
                self.engine,
                self.messages,
                self.tools,
                self.params,
                self.max_tool_calls,
                on_call=lambda c: print(
                    f"[{c['name']}({json.dumps(c['arguments'])}) -> {c['result']}]", file=sys.stderr
                ),
            )
            self.messages, answer = run.messages, run.answer
            if guard is not None:
                answer = guard.feed(answer) + guard.finish()
                self.messages[-1] = {**self.messages[-1], "content": answer}
                _note_cut(guard)
            if on_text is not None:
                on_text(answer)
            return answer
        ids = prompt_ids(self.messages, self.engine.tokenizer)
        stream = self.engine.stream(
            ids,
            dataclasses.replace(
                self.params,
                max_tokens=min(self.params.max_tokens or self.engine.block_size, self.engine.block_size - len(ids)),
            ),
        )
        sent = []
        for delta in stream:
            sent.append(delta.text if guard is None else guard.feed(delta.text))
            if on_text is not None:
                on_text(sent[-1])
            if guard is not None and guard.tripped is not None:
                break  # leaving the stream stops its decoding
        if guard is not None:
            sent.append(guard.finish())
            if on_text is not None:
                on_text(sent[-1])
            _note_cut(guard)
        text = "".join(sent).strip()
        self.messages.append({"role": "assistant", "content": text})
        return text


def _note_cut(guard: StreamGuard) -> None:
    if guard.tripped is not None:
        print(f"\n[answer cut by the content filter: {guard.tripped.category}]", file=sys.stderr)


def _print_stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def read_messages(path: str) -> list[dict]:
    try:
        data = json.loads(io.read_text(path, "messages file"))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ChatforgeError(f"{path}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
    messages = data.get("messages") if isinstance(data, dict) else data
    try:
        validate_messages(messages)
    except ChatforgeError as exc:
        raise ChatforgeError(f"{path}: {exc}") from None
    return messages


def interactive(chat: Conversation) -> None:
    print(f"chatforge chat — {HELP}")
    while True:
        try:
            line = input("\nyou> ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command == "/quit":
            return
        if command == "/reset":
            chat.reset()
            print("(conversation forgotten)")
        elif command == "/system":
            chat.set_system(rest.strip())
            print("(system prompt set)" if rest.strip() else "(system prompt cleared)")
        elif command == "/save":
            if not rest.strip():
                print("usage: /save FILE")
                continue
            io.write_json(rest.strip(), {"messages": chat.messages})
            print(f"(saved {len(chat.messages)} messages to {rest.strip()})")
        elif command.startswith("/"):
            print(f"unknown command {command}; {HELP}")
        else:
            print("assistant> ", end="")
            chat.answer(line, _print_stream)
            print()
