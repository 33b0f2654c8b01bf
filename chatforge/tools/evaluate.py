"""Tool-use accuracy: held-out arithmetic answered directly vs through the calculator loop.

Without tools the tool-call token is banned, so the model must answer by itself; with the calculator it
runs the toolset loop (``chatforge.tools.loop``). The answer is the number in the final text ("The answer
is 4512."), compared with the gold answer numerically. Also reported: how often the model called the
calculator, and how often its call's expression evaluated to the gold answer (the call was right even if
the final sentence was not), and the oracle: a perfect caller (``ScriptedTurns`` making the gold call and
repeating its result) through the same loop and scoring, the ceiling a model can reach with the calculator.
"""

from __future__ import annotations

import json
import re

import numpy as np

from chatforge import io
from chatforge.chat_template import END_OF_TURN, TOOL_CALL, prompt_ids
from chatforge.errors import ChatforgeError
from chatforge.infer.outputs import Choice, Completion
from chatforge.infer.params import SamplingParams
from chatforge.tools.calculator import CalculatorError, calculate, format_number
from chatforge.tools.loop import BANNED, answer_with_tools
from chatforge.tools.registry import CALCULATOR

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class ScriptedTurns:
    """Stands in for the engine in the toolset loop: writes the given assistant turns in order (a dict is a
    tool call, a string an answer) and records each prompt with its sampling settings in ``seen``."""

    def __init__(self, tokenizer, turns: list[str | dict], block_size: int = 256):
        self.tokenizer, self.turns, self.block_size, self.seen = tokenizer, list(turns), block_size, []

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        self.seen.append((prompts[0], params))
        turn = self.turns.pop(0)
        if isinstance(turn, dict):
            ids = [self.tokenizer.special_id(TOOL_CALL)] + self.tokenizer.encode(json.dumps(turn))
        else:
            ids = self.tokenizer.encode(turn)
        ids.append(self.tokenizer.special_id(END_OF_TURN))
        return [Completion(prompts[0], [Choice(0, self.tokenizer.decode(ids), ids, "stop")])]


def read_questions(path: str) -> list[dict]:
    rows = []
    for number, row in io.read_jsonl(path, "arithmetic questions (run `chatforge tool-data` first)"):
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) for k in ("question", "expression", "answer")
        ):
            raise ChatforgeError(
                f"{path}:{number}: a question needs string 'question', 'expression' (the call a "
                "perfect caller makes) and 'answer' fields"
            )
        rows.append(row)
    return rows


def same_number(text: str, gold: str) -> bool:
    numbers = NUMBER.findall(text.replace(",", ""))
    return bool(numbers) and abs(float(numbers[-1]) - float(gold)) < 1e-6


def evaluate_tools(engine, questions: list[dict], max_tokens: int = 48, max_calls: int = 2) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    chats = [[{"role": "user", "content": q["question"]}] for q in questions]
    banned = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, logit_bias={engine.tokenizer.special_id(TOOL_CALL): BANNED}
    )
    direct = [c.choices[0].text for c in engine.generate([prompt_ids(m, engine.tokenizer) for m in chats], banned)]
    runs = [answer_with_tools(engine, m, {"calculator": CALCULATOR}, params, max_calls=max_calls) for m in chats]
    oracle = [
        answer_with_tools(
            ScriptedTurns(
                engine.tokenizer,
                [
                    {"name": "calculator", "arguments": {"expression": q["expression"]}},
                    f"The answer is {format_number(calculate(q['expression']))}.",
                ],
                engine.block_size,
            ),
            m,
            {"calculator": CALCULATOR},
            params,
            max_calls=max_calls,
        )
        for m, q in zip(chats, questions)
    ]

    def right_call(run, gold: str) -> bool:
        for call in run.calls:
            try:
                if abs(float(calculate(str((call["arguments"] or {}).get("expression", "")))) - float(gold)) < 1e-6:
                    return True
            except CalculatorError:
                continue
        return False

    return {
        "questions": len(questions),
        "without_tools": round(float(np.mean([same_number(t, q["answer"]) for t, q in zip(direct, questions)])), 4),
        "with_calculator": round(
            float(np.mean([same_number(r.answer, q["answer"]) for r, q in zip(runs, questions)])), 4
        ),
        "called_calculator": round(float(np.mean([bool(r.calls) for r in runs])), 4),
        "right_call": round(float(np.mean([right_call(r, q["answer"]) for r, q in zip(runs, questions)])), 4),
        "oracle": round(float(np.mean([same_number(r.answer, q["answer"]) for r, q in zip(oracle, questions)])), 4),
        "samples": [
            {
                "question": q["question"],
                "gold": q["answer"],
                "direct": d.strip(),
                "calls": r.calls,
                "with_calculator": r.answer,
            }
            for q, d, r in list(zip(questions, direct, runs))[:5]
        ],
    }
