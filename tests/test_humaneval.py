"""HumanEval harness: the pass@k estimator, problem files, canonical = 100 % and empty = 0 %, the eval stage."""

from __future__ import annotations

import itertools
import json
import re
from fractions import Fraction
from math import comb

import pytest
import torch

from chatforge.cli import main
from chatforge.errors import ChatforgeError
from chatforge.evals.humaneval import STOP_SEQUENCES, Problem, evaluate, load_problems, pass_at_k, truncate_at_stop
from chatforge.evals.sandbox import Sandbox, SandboxLimits

ADD = {"task_id": "mine/add", "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n",
       "canonical_solution": "    return a + b\n", "entry_point": "add",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}
WRONG = {"task_id": "mine/wrong", "prompt": "def neg(x):\n", "canonical_solution": "    return x\n",
         "entry_point": "neg", "test": "def check(candidate):\n    assert candidate(2) == -2\n"}


def _brute_force(n: int, c: int, k: int) -> Fraction:
    """Share of the k-subsets of n samples (c of them correct) that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return Fraction(sum(any(s) for s in subsets), len(subsets))


def test_pass_at_k_matches_brute_force_combinatorics():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_brute_force(n, c, k)), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_where_binomials_are_huge():
    # n = 200 as in Codex: C(200, 100) ~ 9e58, yet the product form agrees with exact rational arithmetic
    for c, k in [(1, 1), (3, 10), (17, 100), (150, 100), (0, 100), (200, 1)]:
        exact = 1 - Fraction(comb(200 - c, k), comb(200, k))
        assert pass_at_k(200, c, k) == pytest.approx(float(exact), rel=1e-9, abs=1e-12)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 6)


def test_truncate_at_the_first_stop_sequence():
    body = "    return x\n"
    for stop in STOP_SEQUENCES:
        assert truncate_at_stop(body + stop + " rest\n") == body
    assert truncate_at_stop("    if x:\n        return 1\n") == "    if x:\n        return 1\n"  # indented if stays


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxLimits(timeout=10))


def test_canonical_scores_100_and_empty_scores_0_on_humaneval_problems(sandbox):
    problems = load_problems()[:6]
    rows, summary = evaluate(problems, [[p.canonical_solution] for p in problems], sandbox, progress=False)
    assert summary["pass@k"] == {"pass@1": 1.0} and all(r["correct"] == 1 for r in rows)
    rows, summary = evaluate(problems, [[""] for _ in problems], sandbox, progress=False)
    assert summary["pass@k"] == {"pass@1": 0.0} and summary["statuses"] == {"failed": 6}
    assert all(r["samples"][0]["error"] for r in rows)  # each failure names its error


def test_humaneval_ships_164_problems():
    problems = load_problems()
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    assert len({p.task_id for p in problems}) == 164 and all(p.canonical_solution for p in problems)


@pytest.mark.slow
def test_all_164_canonical_solutions_pass_and_empty_ones_fail(tmp_path, capsys):
    for mode, expected in (("canonical", 1.0), ("empty", 0.0)):
        main(["eval", "humaneval", f"--mode={mode}", f"--out={tmp_path / mode}", "--progress=false"])
        summary = json.loads((tmp_path / mode / "summary.json").read_text())
        assert summary["problems"] == 164 and summary["pass@k"]["pass@1"] == expected
        assert len((tmp_path / mode / "results.jsonl").read_text().splitlines()) == 164


def test_pass_at_k_over_several_samples(sandbox):
    problems = [Problem(**ADD)]
    completions = [["    return a + b\n", "    return a - b\n", "    return b + a\n", "    while True: pass\n"]]
    rows, summary = evaluate(problems, completions, Sandbox(SandboxLimits(timeout=2)),
                             ks=(1, 2, 10), progress=False)
    assert rows[0]["correct"] == 2 and [s["passed"] for s in rows[0]["samples"]] == [True, False, True, False]
    assert rows[0]["samples"][3]["status"] == "timeout"
    assert summary["pass@k"] == {"pass@1": 0.5, "pass@2": pytest.approx(1 - 1 / 6)}  # k = 10 > n is left out


class CountingSandbox(Sandbox):
    def __init__(self):
        super().__init__(SandboxLimits(timeout=2))
        self.ran = []

    def run_many(self, programs, **kwargs):
        self.ran += programs
        return super().run_many(programs, **kwargs)


def test_a_repeated_sample_runs_once_and_counts_every_time():
    sandbox = CountingSandbox()
    completions = [["    return a + b\n", "    return a - b\n", "    return a + b\n"], ["    return -x\n"] * 3]
    rows, summary = evaluate([Problem(**ADD), Problem(**WRONG)], completions, sandbox, ks=(1,), progress=False)
    assert len(sandbox.ran) == 3 and summary["programs_run"] == 3 and summary["samples"] == 6
    assert [r["correct"] for r in rows] == [2, 3]
    assert summary["pass@k"] == {"pass@1": pytest.approx((2 / 3 + 1) / 2)}


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_users_problem_file_through_the_stage(tmp_path, capsys):
    problems = _write_jsonl(tmp_path / "mine.jsonl", [ADD, "", WRONG])
    out = tmp_path / "out"
    main(["eval", "humaneval", "--mode=canonical", f"--problems={problems}", f"--out={out}", "--progress=false"])
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert summary["problems"] == 2 and summary["pass@k"]["pass@1"] == 0.5
    assert [(r["task_id"], r["correct"]) for r in rows] == [("mine/add", 1), ("mine/wrong", 0)]
    assert "AssertionError" in rows[1]["samples"][0]["error"]
    assert "pass@1 50.00%" in capsys.readouterr().out


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({k: v for k, v in ADD.items() if k != "test"}), "missing field(s) test"),
    (json.dumps({**ADD, "entry_point": "not an identifier"}), "not a Python identifier"),
    (json.dumps({**ADD, "prompt": 3}), "'prompt' must be a string"),
    (json.dumps(ADD), "task_id 'mine/add' already used on line 1"),
])
def test_problem_file_errors_name_the_line(tmp_path, line, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", [ADD, "", line])
    with pytest.raises(ChatforgeError, match=rf"bad\.jsonl:3: .*{re.escape(message)}"):
        load_problems(path)


def test_canonical_mode_needs_canonical_solutions(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{k: v for k, v in ADD.items() if k != "canonical_solution"}])
    assert load_problems(path)[0].canonical_solution is None  # fine for sampling a model
    with pytest.raises(ChatforgeError, match=r"p\.jsonl:1: missing field\(s\) canonical_solution"):
        load_problems(path, need_canonical=True)


def test_stage_rejects_unknown_tasks_and_missing_files(tmp_path, capsys):
    for argv in (["eval"], ["eval", "mbpp"], ["eval", "humaneval", f"--problems={tmp_path / 'none.jsonl'}"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "name one task" in err and "problems file not found" in err


def _sample_tiny_model(tmp_path, out, *options: str) -> None:
    """``eval humaneval`` of a tiny random model on two problems, 3 samples each, into ``out``."""
    pytest.importorskip("chatforge.model.checkpoint")
    from chatforge.model.gpt import GPT, GPTConfig
    from chatforge.model.hf import export_hf_gpt2
    from chatforge.tokenizer import Tokenizer

    if not (tmp_path / "ckpt").exists():
        tokenizer = Tokenizer.train([ADD["prompt"] + ADD["canonical_solution"], WRONG["prompt"]] * 4, vocab_size=300)
        tokenizer.save(tmp_path / "tok")
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
        export_hf_gpt2(model, tmp_path / "ckpt")
    problems = _write_jsonl(tmp_path / "mine.jsonl", [ADD, WRONG])
    main(["eval", "humaneval", f"--ckpt={tmp_path / 'ckpt'}", f"--tokenizer={tmp_path / 'tok'}", "--device=cpu",
          f"--problems={problems}", "--n=3", "--max_tokens=12", "--temperature=0.8", f"--out={out}",
          "--progress=false", *options])


def test_model_mode_samples_n_completions_per_problem(tmp_path, capsys):
    out = tmp_path / "out"
    _sample_tiny_model(tmp_path, out)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert [len(r["samples"]) for r in rows] == [3, 3]
    assert all(not any(stop in s["completion"] for stop in STOP_SEQUENCES) for r in rows for s in r["samples"])
    assert set(summary["pass@k"]) == {"pass@1"} and summary["samples"] == 6  # k = 10, 100 exceed n = 3
    assert summary["mode"] == "model" and summary["temperature"] == 0.8 and summary["top_p"] == 0.95


def test_the_samples_do_not_depend_on_how_many_decode_together(tmp_path):
    """Problems share the engine's slots (a problem's samples may decode beside another's), yet each problem's
    samples are those it gets alone: seeds are per problem and per sample."""
    _sample_tiny_model(tmp_path, tmp_path / "one", "--max_batch_size=1")
    _sample_tiny_model(tmp_path, tmp_path / "many", "--max_batch_size=4")
    one, many = ([[s["completion"] for s in json.loads(line)["samples"]]
                  for line in (tmp_path / d / "results.jsonl").read_text().splitlines()] for d in ("one", "many"))
    assert one == many and len({c for problem in one for c in problem}) > 1
