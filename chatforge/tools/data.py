"""Tool-use conversations: arithmetic through the calculator and definitions through retrieval, as SFT data.

The `chatforge tool-data` stage (chatforge/stages/tool_data.py) writes them.
"""

from __future__ import annotations

import numpy as np

from chatforge.tools.calculator import calculate, format_number

PHRASINGS = {
    "*": ["What is {a} times {b}?", "Compute {a} * {b}.", "Multiply {a} by {b}.", "How much is {a} x {b}?"],
    "+": ["What is {a} plus {b}?", "Compute {a} + {b}.", "Add {a} and {b}.", "What is the sum of {a} and {b}?"],
    "-": ["What is {a} minus {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}.", "How much is {a} - {b}?"],
    "%": ["What is {a}% of {b}?", "Compute {a} percent of {b}."],
}


def arithmetic_question(rng: np.random.Generator) -> tuple[str, str, str]:
    """(question, calculator expression, answer)."""
    op = str(rng.choice(list(PHRASINGS)))
    if op == "*":
        a, b = int(rng.integers(12, 1000)), int(rng.integers(12, 100))
    elif op == "%":
        a, b = int(rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 75])), int(rng.integers(20, 2000))
    else:
        a, b = int(rng.integers(100, 10000)), int(rng.integers(100, 10000))
    expression = f"{a} * {b} / 100" if op == "%" else f"{a} {op} {b}"
    question = str(rng.choice(PHRASINGS[op])).format(a=a, b=b)
    return question, expression, format_number(calculate(expression))


def tool_conversation(question: str, call: dict, result: str, answer: str, direct: bool = False) -> list[dict]:
    """The user's question, the call and its result as a tool turn (unless ``direct``), then the answer."""
    steps = (
        []
        if direct
        else [{"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": result}]
    )
    return [{"role": "user", "content": question}, *steps, {"role": "assistant", "content": answer}]


def calculator_conversation(question: str, expression: str, answer: str, direct: bool = False) -> list[dict]:
    return tool_conversation(
        question,
        {"name": "calculator", "arguments": {"expression": expression}},
        answer,
        f"The answer is {answer}.",
        direct,
    )


def definition_conversation(word: str, definition: str, rng: np.random.Generator, direct: bool = False) -> list[dict]:
    question = str(rng.choice(["What does the word '{w}' mean?", "Define {w}.", "What is the meaning of {w}?"])).format(
        w=word
    )
    return tool_conversation(
        question,
        {"name": "retrieval", "arguments": {"query": word}},
        f"[wordnet] {word}: {definition}",
        f"{word.capitalize()} means {definition}.",
        direct,
    )
