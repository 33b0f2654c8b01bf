"""chat with a model in the terminal: streamed answers, multi-turn memory, decoding options.

    chatforge chat                                  # talks to runs/speedrun/sft
    chatforge chat --ckpt=runs/speedrun/pretrain --temperature=0.7 --system="You are terse."
    echo "What is Python?" | chatforge chat         # one answer to stdout, for scripts
    chatforge chat --ckpt=runs/speedrun/tools --tools=calculator         # the model may call the calculator
    chatforge chat --tools=calculator,retrieval --index=runs/search/index
    chatforge chat --safety_policy=policy.toml      # content filters on questions and streamed answers

Interactive commands: ``/reset`` forgets the conversation (keeps the system prompt), ``/system TEXT`` sets
the system prompt, ``/save FILE`` writes the conversation as JSON (OpenAI ``messages``), ``/quit`` ends.
When the conversation outgrows the model's context the oldest turns are dropped, never the system prompt.
Without a terminal on stdin, all of stdin is one user message (or, with ``--messages_file``, a JSON file of
``messages`` is continued) and the answer goes to stdout. With ``--tools`` each answer runs the toolset loop
(``chatforge.tools.loop``): the calls and their results are printed, then the model's answer. With
``--safety_policy`` (the policy file ``chatforge serve`` takes, see ``chatforge.safety.filters``) a refused
question is answered with the policy's message and not remembered, a redacted one reaches the model redacted,
and an answer is cut where a refusing filter trips, with a note on stderr.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass

from chatforge import io
from chatforge.chat_template import fit_to_context, prompt_ids, validate_messages
from chatforge.config import ChatforgeError, option
from chatforge.infer.engine import Engine
from chatforge.infer.loading import EngineOptions, load_engine
from chatforge.infer.params import SamplingParams
from chatforge.safety.filters import FilterPipeline, StreamGuard, load_filters

HELP = "commands: /reset, /system TEXT, /save FILE, /quit"


@dataclass
class Config(EngineOptions):
    ckpt: str = option("runs/speedrun/sft", "checkpoint directory, run directory or Hugging Face GPT-2 directory")
    max_tokens: int | None = option(256, "most tokens per answer")
    temperature: float = option(0.7, "sampling temperature; 0 = greedy", ge=0)
    top_p: float = option(0.9, "nucleus sampling threshold (1 = off)", gt=0, le=1)
    repetition_penalty: float = option(1.1, "CTRL/HF repetition penalty (1 = off)", gt=0)
    system: str = option("", "system prompt")
    messages_file: str = option("", "JSON file with a conversation ({'messages': [...]} or a list) to continue")
    tools: list[str] = option([], "built-in tools the model may call: calculator, retrieval")
    index: str = option("", "search index for the retrieval tool (built by `chatforge search --build`)")
    max_tool_calls: int = option(3, "tool calls allowed per answer")
    safety_policy: str = option("", "content-filter policy (TOML/YAML/JSON) for questions and answers; empty = none")


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
            from chatforge.tools.loop import answer_with_tools

            run = answer_with_tools(self.engine, self.messages, self.tools, self.params, self.max_tool_calls,
                                    on_call=lambda c: print(f"[{c['name']}({json.dumps(c['arguments'])}) -> {c['result']}]",
                                                            file=sys.stderr))
            self.messages, answer = run.messages, run.answer
            if guard is not None:
                answer = guard.feed(answer) + guard.finish()
                self.messages[-1] = {**self.messages[-1], "content": answer}
                _note_cut(guard)
            if on_text is not None:
                on_text(answer)
            return answer
        ids = prompt_ids(self.messages, self.engine.tokenizer)
        stream = self.engine.stream(ids, dataclasses.replace(self.params, max_tokens=min(
            self.params.max_tokens or self.engine.block_size, self.engine.block_size - len(ids))))
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


def _interactive(chat: Conversation) -> None:
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


def run(cfg: Config, args: list[str]) -> None:
    params = cfg.sampling()
    history = read_messages(cfg.messages_file) if cfg.messages_file else []
    if not sys.stdin.isatty() and not args:
        user_text = sys.stdin.read().strip()
        if not user_text:
            raise ChatforgeError("no message on stdin")
        args = [user_text]
    filters = load_filters(cfg.safety_policy)  # before the model loads: a bad policy fails at once
    tools = {}
    if cfg.tools:
        from chatforge.tools.registry import builtin_tools

        tools = builtin_tools(cfg.tools, cfg.index, cfg.device)
    chat = Conversation(load_engine(cfg), params, cfg.system, tools, cfg.max_tool_calls, filters)
    chat.messages += [m for m in history if not (m["role"] == "system" and chat.messages)]
    if not args:
        _interactive(chat)
        return
    for message in args:  # positional arguments are successive user turns of one conversation
        print(chat.answer(message))
