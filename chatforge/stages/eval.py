"""evaluate a model: HumanEval pass@k in a sandbox, in-context learning, chain-of-thought, tool use, RLHF.

    chatforge eval icl --ckpt=runs/speedrun/pretrain --icl.shots=0,1,4      # zero-, one- and few-shot
    chatforge eval icl --icl.tasks=arithmetic,copy --icl.inputs=my_task.jsonl
    chatforge eval cot --ckpt=runs/speedrun/pretrain --cot.items=100         # worked reasoning vs direct answers
    chatforge eval tools --ckpt=runs/speedrun/tools                          # arithmetic with vs without the calculator
    chatforge eval rlhf --ckpt=runs/speedrun/ppo --out=runs/speedrun/eval/rlhf  # PPO vs SFT and best-of-n
    chatforge eval humaneval --ckpt=runs/speedrun/code --n=10 --temperature=0.2
    chatforge eval humaneval --n=200 --temperature=0.8            # pass@100 as Codex reports it
    chatforge eval humaneval --mode=canonical                      # proves the harness: must be 100 %
    chatforge eval humaneval --mode=empty                          # must be 0 %
    chatforge eval humaneval --problems=my_problems.jsonl --mode=canonical

Each problem's prompt is completed ``n`` times (nucleus sampling, stop sequences "\nclass", "\ndef", "\n#",
"\nif", "\nprint"), and every completion runs with the problem's unit tests in the sandbox
(docs/sandbox.md). pass@k (k = 1, 10, 100 where k <= n) uses the unbiased estimator. Writes
``results.jsonl`` (one row per problem with every sample, its status and error) and ``summary.json`` to
``--out`` (default runs/eval/humaneval-<mode>). ``--mode=canonical`` and ``--mode=empty`` need no model and
run one sample per problem (their completions are fixed).

``icl`` scores the task suite of ``chatforge.evals.icl`` for every k of ``--icl.shots`` by exact match and by
multiple choice (log-likelihood of the gold answer among candidates), and writes summary.json, summary.md
and icl.png (accuracy vs k). ``cot`` compares few-shot prompts with worked reasoning against direct answers
on multi-step arithmetic (``chatforge.evals.cot``). Both decode greedily; the sampling options above are
HumanEval's.

``rlhf`` judges the PPO policy at ``--ckpt`` (a PPO run directory: its summary.json gives the answer budget, the
held-out count and the unfinished-answer penalty, its metrics.jsonl the training curve) against the SFT model
on the prompt pool's held-out prompts, by the gold reward model, the proxy it optimised and MiniLM similarity
to the reference answers, and against best-of-n from SFT at matched KL (``chatforge.evals.rlhf``: temperature
1 for every model, 95 % intervals by the normal approximation). Writes summary.json, answers.jsonl (one row
per prompt) and rlhf.png (gold and proxy reward against √KL) to ``--out`` (default runs/eval/rlhf).
"""

from __future__ import annotations

from dataclasses import dataclass

from chatforge.config import nested, option
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.evals.humaneval import DEFAULT_K, STOP_SEQUENCES
from chatforge.evals.sandbox import SandboxLimits
from chatforge.evals.suite import MODES, RUNNERS, CoTOptions, ICLOptions, RLHFOptions, ToolsOptions, run_rlhf
from chatforge.infer.loading import EngineOptions
from chatforge.infer.params import BOUNDS
from chatforge.train.loop import read_metrics
from chatforge.train.reward import load_reward_model


@dataclass
class Config(EngineOptions):
    # decoding defaults as Codex evaluated (temperature 0.2 for pass@1; use 0.8 with large n for pass@100)
    max_tokens: int | None = option(256, "most tokens per completion")
    temperature: float = option(
        0.2, "sampling temperature (Codex: 0.2 for pass@1, 0.8 for pass@100)", **BOUNDS["temperature"].field_kwargs()
    )
    top_p: float = option(0.95, "nucleus sampling", **BOUNDS["top_p"].field_kwargs())
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
    rlhf: RLHFOptions = nested(RLHFOptions, "`eval rlhf`: a PPO policy vs SFT and best-of-n, by gold and proxy RMs")

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
            raise ConfigError(
                f"option 'icl.shots' must list numbers from 0 to icl.pool ({self.icl.pool}); got {self.icl.shots}"
            )
        if self.icl.items <= self.icl.pool:
            raise ConfigError(f"option 'icl.items' ({self.icl.items}) must exceed 'icl.pool' ({self.icl.pool})")
        if self.cot.items < 1 or self.cot.shots < 0:
            raise ConfigError(
                f"options 'cot.items' must be >= 1 and 'cot.shots' >= 0; got {self.cot.items}, {self.cot.shots}"
            )


def run(cfg: Config, args: list[str]) -> None:
    tasks = [*RUNNERS, "rlhf"]
    if len(args) != 1 or args[0] not in tasks:
        raise ChatforgeError(f"name one task to evaluate: {', '.join(tasks)} (got {' '.join(args) or 'none'})")
    if args[0] == "rlhf":  # it reads reward models and a training run's metrics: the training layer's files
        run_rlhf(cfg, load_reward_model, read_metrics)
    else:
        RUNNERS[args[0]](cfg)
