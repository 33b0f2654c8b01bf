"""Tools the model may call: a name, a description, a JSON schema of the arguments, and what runs.

Built in: ``calculator`` (``chatforge.tools.calculator``: parsed, never executed) and ``retrieval`` (the
best chunks of a ``chatforge search`` index). User tools are ``Tool`` objects (plug-ins in Python) or, in
the chat API, OpenAI ``tools`` entries that the client runs itself. Arguments are checked against the
schema's ``required`` names, property types and enums before a tool runs; a failure comes back to the
model as the tool's result, so it can correct itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from chatforge.embed.index import SearchIndex
from chatforge.errors import ChatforgeError
from chatforge.tools.calculator import CalculatorError, calculate, format_number

JSON_TYPES = {"string": str, "number": (int, float), "integer": int, "boolean": bool, "array": list, "object": dict}


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})
    run: Callable[[dict], str] | None = None  # None: the caller runs it (an API client's function)

    def spec(self) -> dict:
        """The OpenAI ``tools`` entry."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def check_arguments(tool: Tool, arguments: dict) -> None:
    """Raise ChatforgeError naming the first argument that does not fit the tool's schema."""
    properties = tool.parameters.get("properties", {})
    for name in tool.parameters.get("required", []):
        if name not in arguments:
            raise ChatforgeError(f"{tool.name}: missing required argument '{name}'")
    for name, value in arguments.items():
        schema = properties.get(name)
        if schema is None:
            if tool.parameters.get("additionalProperties", True) is False:
                raise ChatforgeError(f"{tool.name}: unknown argument '{name}'")
            continue
        expected = JSON_TYPES.get(schema.get("type", ""))
        if expected and (
            not isinstance(value, expected) or (schema.get("type") != "boolean" and isinstance(value, bool))
        ):
            raise ChatforgeError(f"{tool.name}: argument '{name}' must be of type {schema['type']}")
        if "enum" in schema and value not in schema["enum"]:
            raise ChatforgeError(f"{tool.name}: argument '{name}' must be one of {schema['enum']}")


def run_tool(tool: Tool, arguments: dict) -> str:
    """The tool's result text; a bad call's error message instead (it goes back to the model)."""
    try:
        check_arguments(tool, arguments)
        return tool.run(arguments)
    except ChatforgeError as exc:
        return f"error: {exc}"


def _calculate(arguments: dict) -> str:
    try:
        return format_number(calculate(arguments["expression"]))
    except CalculatorError as exc:
        raise ChatforgeError(str(exc)) from None


CALCULATOR = Tool(
    "calculator",
    "Evaluate an arithmetic expression (+ - * / // % ** and parentheses).",
    {
        "type": "object",
        "properties": {"expression": {"type": "string"}},
        "required": ["expression"],
        "additionalProperties": False,
    },
    _calculate,
)


def retrieval_tool(index, k: int = 2, max_chars: int = 400) -> Tool:
    """Search ``index`` (a chatforge.embed SearchIndex) and return its best chunks."""

    def search(arguments: dict) -> str:
        hits = index.search(arguments["query"], k=k)
        return "\n".join(f"[{h.doc_id}] {h.chunk[:max_chars]}" for h in hits) or "no results"

    return Tool(
        "retrieval",
        "Search the document index for passages about a query.",
        {
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
            "additionalProperties": False,
        },
        search,
    )


def builtin_tools(names: list[str], index_dir: str = "", device: str | None = None) -> dict[str, Tool]:
    """The built-in tools by name; retrieval loads the search index at ``index_dir``."""
    tools = {}
    for name in names:
        if name == "calculator":
            tools[name] = CALCULATOR
        elif name == "retrieval":
            if not index_dir:
                raise ChatforgeError(
                    "the retrieval tool needs a search index: pass --index (built by `chatforge search --build`)"
                )
            tools[name] = retrieval_tool(SearchIndex.load(index_dir, device=device))
        else:
            raise ChatforgeError(f"unknown tool {name!r}; built-in tools: calculator, retrieval")
    return tools
