"""Wall time of the speedrun's `ppo` and `humaneval` stages: this tree against an earlier revision, same settings.

    .venv/bin/python benchmarks/stage_speed.py --baseline=51f5809 [--run=runs/speedrun] [--seeds=0,1,2,3]
        [--stages=ppo,humaneval] [--ppo_args="--epochs=2 ..."] [--this_tree_ppo_args="..."]
        [--humaneval_args="--max_tokens=128"]

Both trees run the same command on the same checkpoints of a finished speedrun (``--run``): the baseline from a
temporary git worktree of ``--baseline``, each as its own `python -m chatforge.cli` process (so each pays its own
imports, model loading and answer-budget measurement, as a stage of the speedrun does). Runs alternate baseline,
this tree, baseline, ... so drift in a shared machine's speed hits both alike.

PPO's wall time depends on its trajectory: a policy that learns to end its answers early samples and trains on
short ones, one that does not keeps running to the token cap. On a weak speedrun the trajectory is close to a
coin toss per seed, and two trees whose arithmetic rounds differently toss differently. So the comparison is
over several seeds (``--seeds``, passed as ``--train.seed``): the mean wall time of each tree, and, next to it,
each run's response tokens trained on and its final rollout's reward, KL and ended fraction, to check that the
results stay the same in distribution. HumanEval is timed once per seed too (its sampling is seeded by the
problem, so the seed only repeats the measurement).

The last lines are ``RESULT ppo_stage_time_ratio <this tree mean / baseline mean>`` and the same for humaneval.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ppo_command(run: Path, out: Path, seed: int, extra: list[str]) -> list[str]:
    gold = run / "reward_gold"
    return ["ppo", f"--policy={run / 'sft'}", f"--prompts={run / 'sft_data' / 'rl_prompts.jsonl'}",
            f"--reward_model={run / 'reward'}", f"--pretrain_tokens={run / 'tokenizer' / 'tokens' / 'train.bin'}",
            f"--out_dir={out}", f"--train.seed={seed}", "--train.progress=false",
            *([f"--gold_reward_model={gold}"] if gold.is_dir() else []), *extra]


def humaneval_command(run: Path, out: Path, seed: int, extra: list[str]) -> list[str]:
    return ["eval", "humaneval", f"--ckpt={run / 'code'}", f"--out={out}", *extra]


def timed(tree: Path, args: list[str], log: Path) -> float:
    """Seconds of one `python -m chatforge.cli ARGS` run with ``tree`` first on the path; fails loudly."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, "-m", "chatforge.cli", *args], cwd=log.parent, env=env, stdout=out,
                               stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code:
        sys.exit(f"{' '.join(args[:2])} failed in {tree} (exit {code}); see {log}")
    return seconds


def ppo_results(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rollouts = [r for r in rows if "reward" in r]
    last = rollouts[-10:]  # the last rollouts' rows: 8 updates each share a rollout's statistics

    def mean(key: str) -> float | None:
        values = [r[key] for r in last if key in r]
        return statistics.mean(values) if values else None

    return {"tokens": rows[-1].get("tokens"), "reward": mean("reward"), "gold_reward": mean("gold_reward"),
            "kl": mean("kl"), "ended": mean("ended_fraction"), "length": mean("response_length")}


def humaneval_results(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    return {**summary.get("pass@k", {}), "solved": summary.get("solved_problems")}


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare against")
    parser.add_argument("--run", default="runs/speedrun", help="a finished speedrun's directory")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--stages", default="ppo,humaneval")
    parser.add_argument("--ppo_args", default="", help="extra options for both trees' ppo (the same settings)")
    parser.add_argument("--this_tree_ppo_args", default="",
                        help="options only this tree has, set to reproduce the baseline's behaviour "
                             "(e.g. --unfinished_penalty=0 against a revision without that rule)")
    parser.add_argument("--humaneval_args", default="--max_tokens=128")
    parser.add_argument("--work", default="", help="where outputs go (default: a temporary directory)")
    args = parser.parse_args()
    run = Path(args.run).resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    stages = args.stages.split(",")
    work = Path(args.work or tempfile.mkdtemp(prefix="stage_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    baseline_tree = work / "baseline_tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(baseline_tree), args.baseline],
                   check=True, capture_output=True)
    trees = {f"baseline {args.baseline}": baseline_tree, "this tree": ROOT}
    commands = {"ppo": (ppo_command, shlex.split(args.ppo_args), ppo_results),
                "humaneval": (humaneval_command, shlex.split(args.humaneval_args), humaneval_results)}
    try:
        for stage in stages:
            make, extra, results = commands[stage]
            times: dict[str, list[float]] = {name: [] for name in trees}
            print(f"== {stage} on {run} ({' '.join(extra) or 'default settings'})", flush=True)
            for seed in seeds:
                for index, (name, tree) in enumerate(trees.items()):
                    out = work / f"{stage}_{index}_seed{seed}"
                    own = shlex.split(args.this_tree_ppo_args) if stage == "ppo" and tree == ROOT else []
                    seconds = timed(tree, make(run, out, seed, extra + own), work / f"{stage}_{index}_seed{seed}.log")
                    times[name].append(seconds)
                    found = results(out)
                    print(f"  seed {seed}  {name:<24} {seconds:7.1f} s  "
                          + "  ".join(f"{k} {fmt(v)}" for k, v in found.items()), flush=True)
            means = {name: statistics.mean(v) for name, v in times.items()}
            baseline_mean, mean = means[f"baseline {args.baseline}"], means["this tree"]
            print(f"  mean over seeds {seeds}: baseline {baseline_mean:.1f} s, this tree {mean:.1f} s: "
                  f"{mean / baseline_mean:.2f} of the baseline's time")
            print(f"RESULT {stage}_stage_time_ratio {mean / baseline_mean:.3f}", flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline_tree)],
                       capture_output=True)


if __name__ == "__main__":
    main()
