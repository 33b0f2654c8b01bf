"""Pretraining recipe: the GPT-2 recipe against chatforge's default recipe, same shards, same wall-clock.

    .venv/bin/python benchmarks/pretrain_recipe.py [--minutes 7] [--tokenizer_dir runs/speedrun/tokenizer]
                                                   [--out runs/recipe_bench] [--eval_every 100] [--seed 0]

Both runs are ``chatforge pretrain`` in a fresh process on the token shards of ``--tokenizer_dir`` (those of
the speedrun: ``chatforge speedrun --only=tokenizer`` writes them), each for ``--minutes`` of wall-clock
(compilation, evaluations and checkpoints included), each scored on the same held-out windows of the val
shard every ``--eval_every`` steps and at the end.

* GPT-2 recipe: the nano preset (4 layers × 128, 4 heads) in ``arch=gpt2`` (learned positions, LayerNorm,
  GELU, tied embeddings, biases), AdamW at 3e-3 with cosine decay to 3e-4 over the budget, 50 warm-up
  steps: the speedrun's recipe before this one.
* default recipe: whatever ``chatforge pretrain`` does with no options but the budget (``arch=modern``,
  the size its time budget picks, Muon + AdamW, warm-up → flat → linear warm-down).

Printed: both held-out losses and tokens/s, and the training time (evaluation time excluded) the default
recipe took to reach the GPT-2 recipe's final loss, interpolated between evaluations. The last line is
``RESULT recipe_time_to_loss_speedup <GPT-2 recipe's training time ÷ the default's time to the same loss>``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

GPT2_RECIPE = ["--model.preset=nano", "--model.n_head=4", "--model.arch=gpt2", "--model.bias=true",
               "--train.optimizer=adamw", "--train.lr=3e-3", "--train.min_lr=3e-4", "--train.schedule=cosine",
               "--train.warmup_steps=50", "--train.beta1=0.9", "--train.beta2=0.95", "--train.eps=1e-8",
               "--train.weight_decay=0.1"]


def pretrain(name: str, recipe: list[str], args) -> Path:
    out = Path(args.out) / name
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "chatforge.cli", "pretrain", f"--tokenizer_dir={args.tokenizer_dir}",
               f"--out_dir={out}", f"--budget_minutes={args.minutes}",
               f"--train.eval_every={args.eval_every}", "--train.ckpt_every=0", "--train.progress=false",
               f"--train.seed={args.seed}", *recipe]
    print(f"[bench] {name}: {' '.join(command[3:])}", flush=True)
    subprocess.run(command, check=True)
    return out


def curve(out: Path) -> tuple[list[tuple[float, float]], dict]:
    """(training seconds, val loss) at each evaluation, evaluation time taken out of the clock, and the summary."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    elapsed = {r["step"]: r["elapsed_s"] for r in rows if "loss" in r}
    points, eval_total = [], 0.0
    for row in rows:
        if "val_loss" in row:
            points.append((elapsed.get(row["step"], 0.0) - eval_total, row["val_loss"]))
            eval_total += row.get("eval_s", 0.0)
    return points, json.loads((out / "summary.json").read_text())


def time_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """First training time at which the val curve reaches ``target``, linear between evaluations."""
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if l1 <= target:
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1) if l0 > target else t0
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=7.0)
    parser.add_argument("--tokenizer_dir", default="runs/speedrun/tokenizer")
    parser.add_argument("--out", default="runs/recipe_bench")
    parser.add_argument("--eval_every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (Path(args.tokenizer_dir) / "tokens" / "train.bin").is_file():
        sys.exit(f"no token shards in {args.tokenizer_dir}; run `chatforge speedrun --only=tokenizer` first")
    results = {}
    for name, recipe in (("gpt2_recipe", GPT2_RECIPE), ("default_recipe", [])):
        results[name] = curve(pretrain(name, recipe, args))
    (gpt2_points, gpt2), (default_points, _) = results["gpt2_recipe"], results["default_recipe"]
    print(f"\n{'recipe':<16} {'params':>8} {'steps':>6} {'tokens':>8} {'tokens/s':>9} {'held-out loss':>14}")
    for name, (_, s) in results.items():
        print(f"{name:<16} {s['params'] / 1e6:7.2f}M {s['steps']:>6} {s['tokens_seen'] / 1e6:7.2f}M "
              f"{s['tokens_per_s']:>9,.0f} {s['final_val_loss']:>14.4f}")
    target, gpt2_time = gpt2["final_val_loss"], gpt2_points[-1][0]
    reached = time_to_reach(default_points, target)
    if reached is None:
        print(f"the default recipe never reached the GPT-2 recipe's {target:.4f}")
        speedup = 0.0
    else:
        speedup = gpt2_time / max(reached, 1e-9)
        print(f"the default recipe reached the GPT-2 recipe's final {target:.4f} after {reached:.0f} s of training "
              f"(the GPT-2 recipe trained {gpt2_time:.0f} s)")
    print(f"RESULT recipe_time_to_loss_speedup {speedup:.2f}")


if __name__ == "__main__":
    main()
