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

import sys
from dataclasses import dataclass

from chatforge.config import option
from chatforge.errors import ChatforgeError
from chatforge.infer.loading import EngineOptions, load_engine
from chatforge.infer.params import BOUNDS
from chatforge.safety.filters import load_filters
from chatforge.serve.terminal import Conversation, interactive, read_messages
from chatforge.tools.registry import builtin_tools


@dataclass
class Config(EngineOptions):
    ckpt: str = option("runs/speedrun/sft", "checkpoint directory, run directory or Hugging Face GPT-2 directory")
    max_tokens: int | None = option(256, "most tokens per answer")
    temperature: float = option(0.7, "sampling temperature; 0 = greedy", **BOUNDS["temperature"].field_kwargs())
    top_p: float = option(0.9, "nucleus sampling threshold (1 = off)", **BOUNDS["top_p"].field_kwargs())
    repetition_penalty: float = option(
        1.1, "CTRL/HF repetition penalty (1 = off)", **BOUNDS["repetition_penalty"].field_kwargs()
    )
    system: str = option("", "system prompt")
    messages_file: str = option("", "JSON file with a conversation ({'messages': [...]} or a list) to continue")
    tools: list[str] = option([], "built-in tools the model may call: calculator, retrieval")
    index: str = option("", "search index for the retrieval tool (built by `chatforge search --build`)")
    max_tool_calls: int = option(3, "tool calls allowed per answer")
    safety_policy: str = option("", "content-filter policy (TOML/YAML/JSON) for questions and answers; empty = none")


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
        tools = builtin_tools(cfg.tools, cfg.index, cfg.device)
    chat = Conversation(load_engine(cfg), params, cfg.system, tools, cfg.max_tool_calls, filters)
    chat.messages += [m for m in history if not (m["role"] == "system" and chat.messages)]
    if not args:
        interactive(chat)
        return
    for message in args:  # positional arguments are successive user turns of one conversation
        print(chat.answer(message))
