"""Chain-of-thought: multi-step arithmetic word problems, few-shot with worked reasoning vs direct answers.

Problems chain two or three additions and subtractions ("Ann has 12 apples. She buys 7 more and gives 5
away. How many apples does she have now?"). Both prompt styles show the same demonstrations; the reasoning
style writes each step ("12 + 7 = 19. 19 - 5 = 14.") before "The answer is 14.", the direct style only the
last sentence. The answer is extracted from the model's text: the number after "answer is", else the last
number written. Accuracy of both styles, with the extraction rate (how often any number was found).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from chatforge.infer.params import SamplingParams

NAMES = ["Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gia", "Hal"]
THINGS = ["apples", "books", "coins", "pens", "stamps", "shells", "cards", "marbles"]
ANSWER = re.compile(r"answer is\s*(-?\d+)")
NUMBER = re.compile(r"-?\d+")


@dataclass
class Problem:
    question: str
    steps: list[str]
    answer: int

    def reasoning(self) -> str:
        return " ".join(self.steps) + f" The answer is {self.answer}."

    def direct(self) -> str:
        return f"The answer is {self.answer}."


def make_problem(rng: np.random.Generator) -> Problem:
    name, thing = str(rng.choice(NAMES)), str(rng.choice(THINGS))
    total = int(rng.integers(5, 30))
    question, steps = [f"{name} has {total} {thing}."], []
    for _ in range(int(rng.integers(2, 4))):
        amount = int(rng.integers(2, 15))
        if rng.random() < 0.5 or amount > total:
            question.append(f"Then {name} gets {amount} more.")
            steps.append(f"{total} + {amount} = {total + amount}.")
            total += amount
        else:
            question.append(f"Then {name} gives {amount} away.")
            steps.append(f"{total} - {amount} = {total - amount}.")
            total -= amount
    question.append(f"How many {thing} does {name} have now?")
    return Problem(" ".join(question), steps, total)


def extract_answer(text: str) -> int | None:
    """The number after "answer is", else the last number in the text; None when there is none."""
    match = ANSWER.search(text)
    if match:
        return int(match.group(1))
    numbers = NUMBER.findall(text)
    return int(numbers[-1]) if numbers else None


def cot_prompt(demos: list[Problem], problem: Problem, reasoning: bool) -> str:
    shown = "".join(f"Q: {d.question}\nA: {d.reasoning() if reasoning else d.direct()}\n\n" for d in demos)
    return shown + f"Q: {problem.question}\nA:"


def evaluate_cot(engine, items: int, shots: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    demos = [make_problem(rng) for _ in range(shots)]
    problems = [make_problem(rng) for _ in range(items)]
    params = SamplingParams(temperature=0.0, max_tokens=64, stop=["\n"], truncate=True)
    results = {"items": items, "shots": shots}
    for style, reasoning in (("reasoning", True), ("direct", False)):
        texts = [
            c.choices[0].text for c in engine.generate([cot_prompt(demos, p, reasoning) for p in problems], params)
        ]
        answers = [extract_answer(t) for t in texts]
        results[style] = {
            "accuracy": round(float(np.mean([a == p.answer for a, p in zip(answers, problems)])), 4),
            "extracted": round(float(np.mean([a is not None for a in answers])), 4),
            "sample": {"question": problems[0].question, "gold": problems[0].answer, "written": texts[0].strip()},
        }
    return results
