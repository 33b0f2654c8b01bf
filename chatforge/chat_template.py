"""The one chat template: tokenizer, SFT, engine, chat CLI, server and tools all render conversations here.

A conversation becomes::

    <|endoftext|> [<|system|> text <|end|>] <|user|> text <|end|> <|assistant|> text <|end|> ...

Role markers are special tokens, never text, so a user typing "<|assistant|>" cannot forge a turn. The
leading end-of-text token puts every conversation at a document boundary, as pretraining saw documents.
An assistant turn may end in tool calls: each is ``<|tool_call|>`` followed by the JSON
``{"name": ..., "arguments": {...}}``; the runtime runs the tool and appends a ``tool`` turn
(``<|tool_result|>`` + the result), and the model writes the next assistant turn, which may call again or
answer the user (``chatforge.tools``)::

    <|assistant|> <|tool_call|> {"name": "calculator", "arguments": {"expression": "12*7"}} <|end|>
    <|tool_result|> 84 <|end|> <|assistant|> 12 times 7 is 84. <|end|>
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from chatforge.errors import ChatforgeError
from chatforge.tokenizer import ASSISTANT, END_OF_TEXT, END_OF_TURN, SYSTEM, TOOL_CALL, TOOL_RESULT, USER

ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "tool": TOOL_RESULT}


@dataclass
class RenderedChat:
    ids: list[int]
    loss_mask: list[int]  # 1 where the token is assistant output the model should learn to produce


def validate_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatforgeError("a conversation needs a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatforgeError(f"message {i} must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in ROLE_TOKENS:
            raise ChatforgeError(f"message {i} has role {role!r}; roles are {', '.join(ROLE_TOKENS)}")
        if not isinstance(content, str):
            raise ChatforgeError(f"message {i} ({role}) must have string content")
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise ChatforgeError(f"message {i}: 'tool_calls' must be a list")
        if calls and role != "assistant":
            raise ChatforgeError(f"message {i}: only assistant messages make tool calls")
        for call in calls:
            if (
                not isinstance(call, dict)
                or not isinstance(call.get("name"), str)
                or not isinstance(call.get("arguments"), dict)
            ):
                raise ChatforgeError(f"message {i}: a tool call needs a string 'name' and an object 'arguments'")
        if role == "system" and i != 0:
            raise ChatforgeError(f"message {i}: a system message may only come first")


def render(messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> RenderedChat:
    """Token ids of a conversation, with the mask of assistant tokens (their text and closing <|end|>).

    With ``add_generation_prompt`` the ids end in ``<|assistant|>``, ready for the model to answer.
    """
    validate_messages(messages)
    end = tokenizer.special_id(END_OF_TURN)
    ids, mask = [tokenizer.special_id(END_OF_TEXT)], [0]
    call = tokenizer.special_id(TOOL_CALL)
    for message in messages:
        body = tokenizer.encode(message["content"])
        for tool_call in message.get("tool_calls") or []:
            body += [call] + tokenizer.encode(
                json.dumps({"name": tool_call["name"], "arguments": tool_call["arguments"]}, ensure_ascii=False)
            )
        body.append(end)
        learn = 1 if message["role"] == "assistant" else 0
        ids += [tokenizer.special_id(ROLE_TOKENS[message["role"]])] + body
        mask += [0] + [learn] * len(body)
    if add_generation_prompt:
        ids.append(tokenizer.special_id(ROLE_TOKENS["assistant"]))
        mask.append(0)
    return RenderedChat(ids, mask)


def prompt_ids(messages: list[dict], tokenizer) -> list[int]:
    """The ids a model continues to write the next assistant turn."""
    return render(messages, tokenizer, add_generation_prompt=True).ids


def parse_tool_calls(tokenizer, token_ids: list[int]) -> tuple[str, list[dict]]:
    """(text, tool calls) of a generated assistant turn; a call whose JSON does not parse is kept as
    ``{"name": None, "error": ...}`` so the runtime can tell the model."""
    call = tokenizer.special_id(TOOL_CALL)
    stops = set(stop_token_ids(tokenizer))
    ids = [t for t in token_ids if t not in stops]
    parts, current = [], []
    for token in ids:
        if token == call:
            parts.append(current)
            current = []
        else:
            current.append(token)
    parts.append(current)
    calls = []
    for part in parts[1:]:
        raw = tokenizer.decode(part).strip()
        try:
            value = json.loads(raw)
            if not isinstance(value, dict) or not isinstance(value.get("name"), str):
                raise ValueError("not an object with a 'name'")
            arguments = value.get("arguments", {})
            if not isinstance(arguments, dict):
                raise ValueError("'arguments' is not an object")
            calls.append({"name": value["name"], "arguments": arguments})
        except ValueError as exc:
            calls.append({"name": None, "error": f"the tool call {raw[:80]!r} is not valid JSON of a call: {exc}"})
    return tokenizer.decode(parts[0]), calls


def stop_token_ids(tokenizer) -> list[int]:
    """Tokens that end an assistant turn."""
    return [tokenizer.special_id(END_OF_TURN), tokenizer.special_id(END_OF_TEXT)]


def fit_to_context(messages: list[dict], tokenizer, max_tokens: int) -> list[dict]:
    """Drop the oldest turns (never the system prompt, never the last message) until the prompt fits."""
    kept = list(messages)
    system = kept[:1] if kept and kept[0]["role"] == "system" else []
    turns = kept[len(system) :]
    while len(turns) > 1 and len(prompt_ids(system + turns, tokenizer)) > max_tokens:
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":  # a conversation restarts at a user turn
            turns = turns[1:]
    fitted = system + turns
    if len(prompt_ids(fitted, tokenizer)) > max_tokens:
        raise ChatforgeError(f"the last message alone does not fit the context of {max_tokens} tokens")
    return fitted


EDIT_SYSTEM = "Rewrite the text as the instruction says. Reply with the rewritten text only."


def edit_messages(instruction: str, text: str, output: str | None = None) -> list[dict]:
    """An edit request in the chat format (the edit stage's training data, `chatforge edit`, `/v1/edits`)."""
    if not instruction.strip():
        raise ChatforgeError("an edit needs a non-empty instruction")
    messages = [{"role": "system", "content": EDIT_SYSTEM}, {"role": "user", "content": f"{instruction}\n\n{text}"}]
    return messages + ([{"role": "assistant", "content": output}] if output is not None else [])
