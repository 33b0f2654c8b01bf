"""run every stage end to end on the embedded default and write the report card.

data → tokenizer → pretrain → sft-data → sft → rankings → reward (the proxy) → reward-gold → ppo → code →
humaneval → fim (and its left-to-right twin) → edit-data → edit → icl → cot → ape → tool-data → tools →
tools-eval → embed → samples → report card, all under ``run_dir``. Each stage's options are nested
(``--pretrain.train.max_minutes=5``, ``--tokenizer.vocab_size=4096``); the directories are placed under
``run_dir`` by the speedrun. A stage whose outputs exist and whose options are unchanged since it finished is
skipped unless a stage it reads from ran again, so a rerun after an interruption continues where it stopped
(training resumes from its last checkpoint); ``--force`` redoes everything, ``--only=STAGE`` runs one stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from chatforge.config import nested, option
from chatforge.data.tokenize import REPORT_FILE
from chatforge.errors import ConfigError
from chatforge.report import write_report
from chatforge.speedrun import CHAT_PROMPTS, TEXT_PROMPTS, Step, run_steps, train_resuming, write_samples
from chatforge.stages import ape as ape_stage
from chatforge.stages import code as code_stage
from chatforge.stages import data as data_stage
from chatforge.stages import edit_data as edit_data_stage
from chatforge.stages import edit_train as edit_stage
from chatforge.stages import embed as embed_stage
from chatforge.stages import eval as eval_stage
from chatforge.stages import fim as fim_stage
from chatforge.stages import ppo as ppo_stage
from chatforge.stages import pretrain as pretrain_stage
from chatforge.stages import rankings as rankings_stage
from chatforge.stages import reward as reward_stage
from chatforge.stages import sft as sft_stage
from chatforge.stages import sft_data as sft_data_stage
from chatforge.stages import tokenizer as tokenizer_stage
from chatforge.stages import tool_data as tool_data_stage
from chatforge.train.reward import RewardTrainConfig
from chatforge.train.sft import SFTTrainConfig


@dataclass
class HumanEvalOptions(eval_stage.Config):
    max_tokens: int | None = option(128, "most tokens per completion (short: a speedrun-sized model rarely needs more)")
    progress: bool = option(False, "show progress bars")


@dataclass
class ToolTrainOptions(SFTTrainConfig):
    # measured: 600 steps taught the call format but garbled numbers (1 % right); 1000 steps reached 63 %
    steps: int = option(1200, "optimizer steps: the schedule's length (max_minutes may fit it shorter)")
    max_minutes: float = option(8.0, "wall-time budget in minutes (0 = none)")
    eval_every: int = option(200, "steps between validation losses (0 = only at the start and the end)")
    ckpt_every: int = option(200, "steps between checkpoints (0 = only at the end)")


@dataclass
class ToolSFTOptions(sft_stage.Config):
    train: ToolTrainOptions = nested(ToolTrainOptions, "the shared training loop")


@dataclass
class GoldRewardTrainOptions(RewardTrainConfig):
    steps: int = option(240, "optimizer steps (more data than the proxy's, trained longer)")
    max_minutes: float = option(8.0, "wall-time budget in minutes (0 = none)")


@dataclass
class GoldRewardOptions(reward_stage.Config):
    include_held_out: bool = option(True, "train on the held-out prompts' rankings too (the gold model may)")
    train: GoldRewardTrainOptions = nested(GoldRewardTrainOptions, "the shared training loop")


@dataclass
class Config:
    run_dir: str = option("runs/speedrun", "every stage writes under this directory")
    force: bool = option(False, "redo every stage even when its outputs are up to date")
    only: str = option(
        "",
        "run just this stage (data, tokenizer, pretrain, sft-data, sft, rankings, reward, reward-gold, ppo, code, "
        "humaneval, fim, fim-baseline, edit-data, edit, icl, cot, ape, tool-data, tools, "
        "tools-eval, embed, samples)",
    )
    sample_tokens: int = option(48, "tokens generated per sample prompt")
    device: str = option("auto", "device for sampling: auto, cpu, cuda, cuda:N")
    data: data_stage.Config = nested(data_stage.Config, "the data stage")
    tokenizer: tokenizer_stage.Config = nested(tokenizer_stage.Config, "the tokenizer stage")
    pretrain: pretrain_stage.Config = nested(pretrain_stage.Config, "the pretrain stage")
    sft_data: sft_data_stage.Config = nested(sft_data_stage.Config, "the sft-data stage")
    sft: sft_stage.Config = nested(sft_stage.Config, "the sft stage")
    rankings: rankings_stage.Config = nested(rankings_stage.Config, "the rankings stage")
    reward: reward_stage.Config = nested(reward_stage.Config, "the reward stage (the proxy reward model PPO optimises)")
    reward_gold: GoldRewardOptions = nested(
        GoldRewardOptions, "the gold reward model: all rankings, trained longer; judges PPO, never optimised"
    )
    ppo: ppo_stage.Config = nested(ppo_stage.Config, "the ppo stage")
    code: code_stage.Config = nested(code_stage.Config, "the code stage (Codex-style fine-tuning on Python)")
    humaneval: HumanEvalOptions = nested(HumanEvalOptions, "`eval humaneval` of the code model")
    fim: fim_stage.Config = nested(fim_stage.Config, "the fim stage (fill-in-the-middle continued pretraining)")
    fim_baseline: fim_stage.Config = nested(
        fim_stage.Config, "the fim stage's left-to-right twin (fim_rate forced to 0)"
    )
    edit_data: edit_data_stage.Config = nested(edit_data_stage.Config, "the edit-data stage (edit triples)")
    edit: edit_stage.Config = nested(edit_stage.Config, "the edit-train stage (instruction-driven edits)")
    icl: eval_stage.Config = nested(eval_stage.Config, "`eval icl` of the pretrained model (its icl.* options)")
    cot: eval_stage.Config = nested(eval_stage.Config, "`eval cot` of the pretrained model (its cot.* options)")
    ape: ape_stage.Config = nested(ape_stage.Config, "the ape stage (instructions proposed and scored by the model)")
    tool_data: tool_data_stage.Config = nested(tool_data_stage.Config, "the tool-data stage (tool-use conversations)")
    tools: ToolSFTOptions = nested(ToolSFTOptions, "SFT of the SFT model on its data plus the tool-use conversations")
    tools_eval: eval_stage.Config = nested(eval_stage.Config, "`eval tools` of that model (its tools.* options)")
    embed: embed_stage.Config = nested(embed_stage.Config, "the embed stage (contrastive text/code embeddings)")

    def place(self) -> None:
        """Point every stage's directories into run_dir, so stages find each other's outputs."""
        run = Path(self.run_dir)
        self.data.out_dir = str(run / "data")
        self.tokenizer.data_dir = str(run / "data")
        self.tokenizer.out_dir = str(run / "tokenizer")
        self.pretrain.tokenizer_dir = str(run / "tokenizer")
        self.pretrain.out_dir = str(run / "pretrain")
        self.sft_data.holdout = str(run / "data" / "chat_holdout.jsonl")
        self.sft_data.out_dir = self.sft.data_dir = str(run / "sft_data")
        self.sft.init_from = str(run / "pretrain")
        self.sft.out_dir = self.rankings.ckpt = self.reward.init_from = self.ppo.policy = str(run / "sft")
        self.rankings.prompts = self.ppo.prompts = str(run / "sft_data" / "rl_prompts.jsonl")
        self.rankings.out_dir = self.reward.rankings_dir = str(run / "rankings")
        self.reward.out_dir = self.ppo.reward_model = str(run / "reward")
        self.reward_gold.rankings_dir, self.reward_gold.init_from = self.reward.rankings_dir, self.reward.init_from
        self.reward_gold.out_dir = self.ppo.gold_reward_model = str(run / "reward_gold")
        self.ppo.pretrain_tokens = str(run / "tokenizer" / "tokens" / "train.bin")
        self.ppo.out_dir = str(run / "ppo")
        self.code.init_from = str(run / "pretrain")
        self.code.out_dir = self.humaneval.ckpt = str(run / "code")
        self.humaneval.out = str(run / "eval" / "humaneval")
        for fim, folder in ((self.fim, "fim"), (self.fim_baseline, "fim_baseline")):
            fim.init_from, fim.data_dir, fim.out_dir = str(run / "pretrain"), str(run / "data"), str(run / folder)
        self.fim_baseline.fim_rate = 0.0
        self.edit_data.data_dir = str(run / "data")
        self.edit_data.out_dir = self.edit.data_dir = str(run / "edit_data")
        self.edit.init_from, self.edit.out_dir = str(run / "sft"), str(run / "edit")
        for evaluation, task in ((self.icl, "icl"), (self.cot, "cot")):
            evaluation.ckpt, evaluation.out = str(run / "pretrain"), str(run / "eval" / task)
            evaluation.icl.data_dir = str(run / "data")
        self.ape.ckpt, self.ape.insert_ckpt = str(run / "pretrain"), str(run / "fim")
        self.ape.data_dir = str(run / "data")
        self.ape.out_dir = str(run / "ape")
        self.tool_data.data_dir, self.tool_data.out_dir = str(run / "data"), str(run / "tool_data")
        self.tools.data_dir = str(run / "sft_data")
        self.tools.init_from, self.tools.out_dir = str(run / "sft"), str(run / "tools")
        self.tools.extra_train = [str(run / "tool_data" / "tool_train.jsonl")]
        self.tools.extra_val = [str(run / "tool_data" / "tool_val.jsonl")]
        self.tools_eval.ckpt, self.tools_eval.out = str(run / "tools"), str(run / "eval" / "tools")
        self.tools_eval.tools.questions = str(run / "tool_data" / "arithmetic_eval.jsonl")
        self.embed.init_from = str(run / "pretrain")
        self.embed.data_dir = str(run / "data")
        self.embed.out_dir = str(run / "embed")

    def steps(self) -> list[Step]:
        run = Path(self.run_dir)
        samples = {"tokens": self.sample_tokens, "text": TEXT_PROMPTS, "chat": CHAT_PROMPTS}
        return [
            Step("data", self.data, run / "data" / "manifest.json", lambda: data_stage.run(self.data, [])),
            Step("tokenizer", self.tokenizer, run / "tokenizer" / REPORT_FILE,
                 lambda: tokenizer_stage.run(self.tokenizer, []), ("data",)),
            Step("pretrain", self.pretrain, run / "pretrain" / "summary.json",
                 lambda: train_resuming(pretrain_stage, self.pretrain), ("tokenizer",), every_rank=True),
            Step("sft-data", self.sft_data, run / "sft_data" / "manifest.json",
                 lambda: sft_data_stage.run(self.sft_data, []), ("data",)),
            Step("sft", self.sft, run / "sft" / "summary.json",
                 lambda: train_resuming(sft_stage, self.sft), ("pretrain", "sft-data"), every_rank=True),
            Step("rankings", self.rankings, run / "rankings" / "manifest.json",
                 lambda: rankings_stage.run(self.rankings, []), ("sft-data", "sft")),
            Step("reward", self.reward, run / "reward" / "summary.json",
                 lambda: train_resuming(reward_stage, self.reward), ("sft", "rankings"), every_rank=True),
            Step("reward-gold", self.reward_gold, run / "reward_gold" / "summary.json",
                 lambda: train_resuming(reward_stage, self.reward_gold), ("sft", "rankings"), every_rank=True),
            Step("ppo", self.ppo, run / "ppo" / "summary.json",
                 lambda: train_resuming(ppo_stage, self.ppo), ("tokenizer", "sft-data", "sft", "reward", "reward-gold"),
                 every_rank=True),
            Step("code", self.code, run / "code" / "summary.json",
                 lambda: train_resuming(code_stage, self.code), ("pretrain",), every_rank=True),
            Step("humaneval", self.humaneval, run / "eval" / "humaneval" / "summary.json",
                 lambda: eval_stage.run(self.humaneval, ["humaneval"]), ("code",)),
            Step("fim", self.fim, run / "fim" / "summary.json",
                 lambda: train_resuming(fim_stage, self.fim), ("data", "pretrain"), every_rank=True),
            Step("fim-baseline", self.fim_baseline, run / "fim_baseline" / "summary.json",
                 lambda: train_resuming(fim_stage, self.fim_baseline), ("data", "pretrain"), every_rank=True),
            Step("edit-data", self.edit_data, run / "edit_data" / "manifest.json",
                 lambda: edit_data_stage.run(self.edit_data, []), ("data",)),
            Step("edit", self.edit, run / "edit" / "summary.json",
                 lambda: train_resuming(edit_stage, self.edit), ("sft", "edit-data"), every_rank=True),
            Step("icl", self.icl, run / "eval" / "icl" / "summary.json",
                 lambda: eval_stage.run(self.icl, ["icl"]), ("data", "pretrain")),
            Step("cot", self.cot, run / "eval" / "cot" / "summary.json",
                 lambda: eval_stage.run(self.cot, ["cot"]), ("pretrain",)),
            Step("ape", self.ape, run / "ape" / "summary.json",
                 lambda: ape_stage.run(self.ape, []), ("data", "pretrain", "fim")),
            Step("tool-data", self.tool_data, run / "tool_data" / "arithmetic_eval.jsonl",
                 lambda: tool_data_stage.run(self.tool_data, []), ("data",)),
            Step("tools", self.tools, run / "tools" / "summary.json",
                 lambda: train_resuming(sft_stage, self.tools), ("sft-data", "sft", "tool-data"), every_rank=True),
            Step("tools-eval", self.tools_eval, run / "eval" / "tools" / "summary.json",
                 lambda: eval_stage.run(self.tools_eval, ["tools"]), ("tools",)),
            Step("embed", self.embed, run / "embed" / "summary.json",
                 lambda: train_resuming(embed_stage, self.embed), ("data", "pretrain"), every_rank=True),
            Step("samples", samples, run / "samples.json",
                 lambda: write_samples(run, self.sample_tokens, self.device), ("pretrain", "code", "sft", "ppo")),
        ]


def run(cfg: Config, args: list[str]) -> None:
    cfg.place()
    run_dir = Path(cfg.run_dir)
    steps = cfg.steps()
    if cfg.only and cfg.only not in {s.name for s in steps}:
        raise ConfigError(f"option 'only' must be one of {', '.join(s.name for s in steps)}; got {cfg.only!r}")
    started = time.perf_counter()
    timings = run_steps(steps, run_dir, cfg.only, cfg.force)
    report = write_report(run_dir, timings=timings)
    print(f"[speedrun] finished in {time.perf_counter() - started:.0f} s this run; report card: {report}")
    print(f"[speedrun] talk to the model:  chatforge chat --ckpt={run_dir / 'ppo'}   (or --ckpt={run_dir / 'sft'})")
    print(f"[speedrun] serve it:           chatforge serve --ckpt={run_dir / 'ppo'}")
