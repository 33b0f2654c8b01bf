"""In-context learning, chain-of-thought and APE: prompts, scorers and the CLI on a tiny model."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
from train_helpers import make_corpus, tiny_pretrain_args

from chatforge.cli import main
from chatforge.evals.cot import cot_prompt, extract_answer, make_problem
from chatforge.evals.icl import Task, built_in_tasks, icl_prompt, score_task
from chatforge.prompting.ape import adaptive_filter


class OracleEngine:
    """Knows each item's answer: generates it only when the prompt holds a demonstration, and gives it the
    highest log-likelihood among candidates; counts the prompts it saw."""

    def __init__(self, answers: dict[str, str]):
        self.answers, self.prompts = answers, []

    def _answer(self, prompt: str) -> str:
        return self.answers[re.findall(r"Input: (.*)\nOutput:$", prompt)[0]]

    def encode(self, text):
        return text.split()

    def generate(self, prompts, params):
        assert [p.max_tokens for p in params] == [len(self._answer(p).split()) + 2 for p in prompts]
        self.prompts += prompts
        texts = [" " + self._answer(p) if p.count("Input:") > 1 else " no idea" for p in prompts]
        return [SimpleNamespace(choices=[SimpleNamespace(text=t)]) for t in texts]

    def score_batch(self, pairs, truncate=False):
        return [[0.0 if c.strip() == self._answer(p) else -3.0, -1.0] for p, c in pairs]


def test_prompts_hold_k_demonstrations_then_the_query():
    assert icl_prompt("Add.", [], "1 + 1") == "Add.\n\nInput: 1 + 1\nOutput:"
    two = icl_prompt("", [("a", "A"), ("b", "B")], "c")
    assert two == "Input: a\nOutput: A\n\nInput: b\nOutput: B\n\nInput: c\nOutput:"


def test_exact_match_needs_demonstrations_and_multiple_choice_picks_the_likeliest():
    items = [(f"q{i}", f"a{i}") for i in range(20)]
    engine = OracleEngine(dict(items))
    results = score_task(engine, Task("toy", "Answer.", items), shots=[0, 1, 3], pool_size=5, seed=0)
    assert results["items"] == 15 and results["chance"] == 0.25
    assert results["0"]["exact_match"] == 0 and results["1"]["exact_match"] == 1 and results["3"]["exact_match"] == 1
    assert all(results[k]["multiple_choice"] == 1 for k in ("0", "1", "3"))
    demos_in = [p.count("Input:") - 1 for p in engine.prompts]
    assert demos_in == [0] * 15 + [1] * 15 + [3] * 15
    # demonstrations come from the pool only: no evaluated item is shown as its own demonstration
    assert all(
        p.count(f"Input: {q}\n") == 1 for p in engine.prompts for q in [re.findall(r"Input: (.*)\nOutput:$", p)[0]]
    )


def test_built_in_tasks_have_correct_answers():
    tasks = {t.name: t for t in built_in_tasks(None, 30, seed=0)}
    assert len(tasks) == 8
    for question, answer in tasks["arithmetic"].items:
        a, op, b = question.split()
        assert int(answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    assert all(out == inp[::-1] for inp, out in tasks["reverse"].items)
    assert all(int(out) == len(inp) for inp, out in tasks["count_letters"].items)
    assert len({out for _, out in tasks["count_letters"].items}) >= 4  # more answers than a coin flip
    assert {out for _, out in tasks["snippet_kind"].items} <= {"code", "prose", "chinese"}


def test_cot_problems_chain_their_steps_and_answers_are_extracted():
    rng = np.random.default_rng(0)
    for _ in range(20):
        problem = make_problem(rng)
        assert problem.steps[-1] == f"{problem.steps[-1].split(' = ')[0]} = {problem.answer}."
        assert extract_answer(problem.reasoning()) == problem.answer == extract_answer(problem.direct())
    assert extract_answer("First 3 + 4 = 7, so 7.") == 7 and extract_answer("no number") is None
    assert extract_answer("The answer is -2. Then 5") == -2
    prompt = cot_prompt([problem], problem, reasoning=True)
    assert prompt.count("Q:") == 2 and prompt.endswith("A:") and " = " in prompt


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompting")
    main(["pretrain", *tiny_pretrain_args(make_corpus(root / "tok"), root / "base", model__block_size=128)])
    return root


def test_eval_icl_and_cot_write_their_results(tiny_ckpt, capsys):
    task = tiny_ckpt / "animals.jsonl"
    task.write_text(
        "".join(
            json.dumps({"input": f"animal {i}", "output": ["cat", "dog"][i % 2], "candidates": ["cat", "dog"]}) + "\n"
            for i in range(10)
        )
    )
    out = tiny_ckpt / "icl"
    main(
        [
            "eval",
            "icl",
            f"--ckpt={tiny_ckpt / 'base'}",
            "--device=cpu",
            "--icl.tasks=copy,arithmetic",
            f"--icl.inputs={task}",
            "--icl.items=10",
            "--icl.pool=4",
            "--icl.shots=0,2",
            f"--out={out}",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]) == {"copy", "arithmetic", "animals"} and summary["shots"] == [0, 2]
    assert summary["results"]["animals"]["chance"] == 0.5 and (out / "icl.png").is_file()
    main(
        [
            "eval",
            "cot",
            f"--ckpt={tiny_ckpt / 'base'}",
            "--device=cpu",
            "--cot.items=3",
            "--cot.shots=1",
            f"--out={tiny_ckpt / 'cot'}",
        ]
    )
    cot = json.loads((tiny_ckpt / "cot" / "summary.json").read_text())
    assert cot["items"] == 3 and 0 <= cot["reasoning"]["accuracy"] <= 1 and 0 <= cot["direct"]["accuracy"] <= 1
    with pytest.raises(SystemExit):
        main(["eval", "icl", f"--ckpt={tiny_ckpt / 'base'}", "--icl.tasks=telepathy"])
    assert "telepathy" in capsys.readouterr().err


def test_adaptive_filtering_keeps_the_best_and_drops_the_worst():
    from chatforge.prompting.ape import adaptive_filter

    quality = {f"instruction {i}": i / 10 for i in range(10)}
    calls = []

    def score(instruction, items):
        calls.append((instruction, len(items)))
        return [quality[instruction] + 0.01 * (hash(x) % 3) for x, _ in items]

    train = [(f"x{i}", f"y{i}") for i in range(40)]
    final, alive = adaptive_filter(
        list(quality), score, train, subset=8, rounds=2, keep=0.5, rng=np.random.default_rng(0)
    )
    assert alive == [10, 5, 3]
    assert "instruction 9" in final and "instruction 0" not in final
    assert all(n == 40 for _, n in final.values()) and max(final, key=lambda c: final[c][0]) == "instruction 9"
    # round subsets are disjoint 8-item chunks; only survivors reach the full set
    assert sum(1 for c, n in calls if n == 40) == 3 and sum(1 for c, n in calls if n == 8) == 15


def test_ape_cli_ranks_instructions_and_compares_the_best_with_baselines(tiny_ckpt):
    out = tiny_ckpt / "ape"
    main(
        [
            "ape",
            f"--ckpt={tiny_ckpt / 'base'}",
            "--insert_ckpt=",
            "--device=cpu",
            "--task=copy",
            "--items=30",
            "--held_out=6",
            "--forward=4",
            "--reverse=0",
            "--subset=4",
            "--rounds=1",
            "--mc_rounds=1",
            "--mc_top=1",
            "--mc_variants=2",
            f"--out_dir={out}",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    ranked = json.loads((out / "ranked.json").read_text())
    assert summary["proposed"] == {"forward": 4} and summary["alive_per_round"][0] == summary["distinct_candidates"]
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    assert summary["best_instruction"] == ranked[0]["instruction"]
    assert set(summary["held_out_score"]) == {"best", "baseline", "none"} and summary["held_out_examples"] == 6


def test_adaptive_filter_cuts_ties_by_share_on_disjoint_subsets():
    quality = {"good": 1.0, "fair": 0.5, **{f"bad{i}": 0.0 for i in range(6)}}
    train = [(f"x{i}", f"y{i}") for i in range(20)]
    seen: dict[str, list[list[str]]] = {}

    def score(instruction, items):
        seen.setdefault(instruction, []).append([x for x, _ in items])
        return [quality[instruction]] * len(items)

    final, alive = adaptive_filter(
        list(quality), score, train, subset=4, rounds=2, keep=0.5, rng=np.random.default_rng(0)
    )
    assert alive == [8, 4, 2] and set(final) == {"good", "fair"}
    assert final["good"] == (1.0, 20) and final["fair"] == (0.5, 20)
    first, second, whole = seen["good"]
    assert len(first) == len(second) == 4 and not set(first) & set(second) and len(whole) == 20
    # ties at the cut: the top half by running mean survives, not everyone equal to the median
    assert sorted(len(seen[f"bad{i}"]) for i in range(6)) == [1, 1, 1, 1, 2, 2]


def test_ape_skips_reverse_proposals_without_an_insert_model_unless_they_are_all_that_was_asked(tiny_ckpt, capsys):
    args = [
        "ape",
        f"--ckpt={tiny_ckpt / 'base'}",
        "--device=cpu",
        "--task=copy",
        "--items=30",
        "--held_out=6",
        "--subset=4",
        "--rounds=1",
        "--mc_rounds=0",
        f"--out_dir={tiny_ckpt / 'ape_skip'}",
    ]
    main(args + ["--forward=2", "--reverse=2", f"--insert_ckpt={tiny_ckpt / 'base'}"])  # a model not trained by `fim`
    assert "reverse proposals skipped" in capsys.readouterr().out
    assert json.loads((tiny_ckpt / "ape_skip" / "summary.json").read_text())["proposed"] == {"forward": 2}
    with pytest.raises(SystemExit):
        main(args + ["--forward=0", "--reverse=2", f"--insert_ckpt={tiny_ckpt / 'nowhere'}"])
    assert "reverse proposals only" in capsys.readouterr().err
