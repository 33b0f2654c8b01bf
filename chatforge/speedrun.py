"""run every stage end to end on the embedded default and write the report card.

data → tokenizer → pretrain → sft-data → sft → rankings → reward → ppo → code → humaneval → fim (and its
left-to-right twin) → edit-data → edit → icl → cot → ape → tool-data → tools → tools-eval → embed → samples →
report card, all under ``run_dir``. Each stage's options are nested (``--pretrain.train.max_minutes=5``,
``--tokenizer.vocab_size=4096``); the directories are placed under ``run_dir`` by the speedrun. A stage whose
outputs exist and whose options are unchanged since it finished is skipped unless a stage it reads from ran
again, so a rerun after an interruption continues where it stopped (training resumes from its last
checkpoint); ``--force`` redoes everything, ``--only=STAGE`` runs one stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from chatforge import io, tokenizer_stage
from chatforge.config import nested, option
from chatforge.data import edit_data as edit_data_stage
from chatforge.data import pipeline as data_stage
from chatforge.data import rankings as rankings_stage
from chatforge.data import sft_data as sft_data_stage
from chatforge.embed import train as embed_stage
from chatforge.errors import ConfigError
from chatforge.evals import eval_stage
from chatforge.prompting import ape as ape_stage
from chatforge.tools import data as tool_data_stage
from chatforge.train import code as code_stage
from chatforge.train import edit as edit_stage
from chatforge.train import fim as fim_stage
from chatforge.train import ppo as ppo_stage
from chatforge.train import pretrain as pretrain_stage
from chatforge.train import reward as reward_stage
from chatforge.train import sft as sft_stage

STATE_FILE = "speedrun_state.json"
TEXT_PROMPTS = ["The meaning of life is", "def fibonacci(n):", "In 1492, Columbus", "今天天气"]
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for learning to cook.",
    "Explain what a neural network is in one sentence.",
    "请用一句话介绍一下你自己。",
    "如何学习编程？",
]


@dataclass
class HumanEvalOptions(eval_stage.Config):
    max_tokens: int | None = option(128, "most tokens per completion (short: a speedrun-sized model rarely needs more)")
    progress: bool = option(False, "show progress bars")


@dataclass
class ToolTrainOptions(sft_stage.SFTTrainConfig):
    # measured: 600 steps taught the call format but garbled numbers (1 % right); 1000 steps reached 63 %
    steps: int = option(1200, "optimizer steps: the schedule's length (max_minutes may fit it shorter)")
    max_minutes: float = option(8.0, "wall-time budget in minutes (0 = none)")


@dataclass
class ToolSFTOptions(sft_stage.Config):
    train: ToolTrainOptions = nested(ToolTrainOptions, "the shared training loop")


@dataclass
class Config:
    run_dir: str = option("runs/speedrun", "every stage writes under this directory")
    force: bool = option(False, "redo every stage even when its outputs are up to date")
    only: str = option("", "run just this stage (data, tokenizer, pretrain, sft-data, sft, rankings, reward, ppo, code, "
                           "humaneval, fim, fim-baseline, edit-data, edit, icl, cot, ape, tool-data, tools, "
                           "tools-eval, embed, samples)")
    sample_tokens: int = option(48, "tokens generated per sample prompt")
    device: str = option("auto", "device for sampling: auto, cpu, cuda, cuda:N")
    data: data_stage.Config = nested(data_stage.Config, "the data stage")
    tokenizer: tokenizer_stage.Config = nested(tokenizer_stage.Config, "the tokenizer stage")
    pretrain: pretrain_stage.Config = nested(pretrain_stage.Config, "the pretrain stage")
    sft_data: sft_data_stage.Config = nested(sft_data_stage.Config, "the sft-data stage")
    sft: sft_stage.Config = nested(sft_stage.Config, "the sft stage")
    rankings: rankings_stage.Config = nested(rankings_stage.Config, "the rankings stage")
    reward: reward_stage.Config = nested(reward_stage.Config, "the reward stage")
    ppo: ppo_stage.Config = nested(ppo_stage.Config, "the ppo stage")
    code: code_stage.Config = nested(code_stage.Config, "the code stage (Codex-style fine-tuning on Python)")
    humaneval: HumanEvalOptions = nested(HumanEvalOptions, "`eval humaneval` of the code model")
    fim: fim_stage.Config = nested(fim_stage.Config, "the fim stage (fill-in-the-middle continued pretraining)")
    fim_baseline: fim_stage.Config = nested(fim_stage.Config, "the fim stage's left-to-right twin (fim_rate forced to 0)")
    edit_data: edit_data_stage.Config = nested(edit_data_stage.Config, "the edit-data stage (edit triples)")
    edit: edit_stage.Config = nested(edit_stage.Config, "the edit-train stage (instruction-driven edits)")
    icl: eval_stage.Config = nested(eval_stage.Config, "`eval icl` of the pretrained model (its icl.* options)")
    cot: eval_stage.Config = nested(eval_stage.Config, "`eval cot` of the pretrained model (its cot.* options)")
    ape: ape_stage.Config = nested(ape_stage.Config, "the ape stage (instructions proposed and scored by the model)")
    tool_data: tool_data_stage.Config = nested(tool_data_stage.Config, "the tool-data stage (tool-use conversations)")
    tools: ToolSFTOptions = nested(ToolSFTOptions, "SFT of the SFT model on its data plus the tool-use conversations")
    tools_eval: eval_stage.Config = nested(eval_stage.Config, "`eval tools` of that model (its tools.* options)")
    embed: embed_stage.Config = nested(embed_stage.Config, "the embed stage (contrastive text/code embeddings)")


@dataclass
class Step:
    name: str
    options: object  # the stage's config, hashed to tell whether finished outputs are still up to date
    done_marker: Path
    action: Callable[[], None]
    needs: tuple[str, ...] = ()  # stages whose outputs it reads: when one of them ran again, so must it


def _place(cfg: Config) -> None:
    """Point every stage's directories into run_dir, so stages find each other's outputs."""
    run = Path(cfg.run_dir)
    cfg.data.out_dir = str(run / "data")
    cfg.tokenizer.data_dir = str(run / "data")
    cfg.tokenizer.out_dir = str(run / "tokenizer")
    cfg.pretrain.tokenizer_dir = str(run / "tokenizer")
    cfg.pretrain.out_dir = str(run / "pretrain")
    cfg.sft_data.holdout = str(run / "data" / "chat_holdout.jsonl")
    cfg.sft_data.out_dir = cfg.sft.data_dir = str(run / "sft_data")
    cfg.sft.init_from = str(run / "pretrain")
    cfg.sft.out_dir = cfg.rankings.ckpt = cfg.reward.init_from = cfg.ppo.policy = str(run / "sft")
    cfg.rankings.prompts = cfg.ppo.prompts = str(run / "sft_data" / "rl_prompts.jsonl")
    cfg.rankings.out_dir = cfg.reward.rankings_dir = str(run / "rankings")
    cfg.reward.out_dir = cfg.ppo.reward_model = str(run / "reward")
    cfg.ppo.pretrain_tokens = str(run / "tokenizer" / "tokens" / "train.bin")
    cfg.ppo.out_dir = str(run / "ppo")
    cfg.code.init_from = str(run / "pretrain")
    cfg.code.out_dir = cfg.humaneval.ckpt = str(run / "code")
    cfg.humaneval.out = str(run / "eval" / "humaneval")
    for fim, folder in ((cfg.fim, "fim"), (cfg.fim_baseline, "fim_baseline")):
        fim.init_from, fim.data_dir, fim.out_dir = str(run / "pretrain"), str(run / "data"), str(run / folder)
    cfg.fim_baseline.fim_rate = 0.0
    cfg.edit_data.data_dir = str(run / "data")
    cfg.edit_data.out_dir = cfg.edit.data_dir = str(run / "edit_data")
    cfg.edit.init_from, cfg.edit.out_dir = str(run / "sft"), str(run / "edit")
    for evaluation, task in ((cfg.icl, "icl"), (cfg.cot, "cot")):
        evaluation.ckpt, evaluation.out, evaluation.icl.data_dir = str(run / "pretrain"), str(run / "eval" / task), str(run / "data")
    cfg.ape.ckpt, cfg.ape.insert_ckpt, cfg.ape.data_dir = str(run / "pretrain"), str(run / "fim"), str(run / "data")
    cfg.ape.out_dir = str(run / "ape")
    cfg.tool_data.data_dir, cfg.tool_data.out_dir = str(run / "data"), str(run / "tool_data")
    cfg.tools.data_dir, cfg.tools.init_from, cfg.tools.out_dir = str(run / "sft_data"), str(run / "sft"), str(run / "tools")
    cfg.tools.extra_train = [str(run / "tool_data" / "tool_train.jsonl")]
    cfg.tools.extra_val = [str(run / "tool_data" / "tool_val.jsonl")]
    cfg.tools_eval.ckpt, cfg.tools_eval.out = str(run / "tools"), str(run / "eval" / "tools")
    cfg.tools_eval.tools.questions = str(run / "tool_data" / "arithmetic_eval.jsonl")
    cfg.embed.init_from = str(run / "pretrain")
    cfg.embed.data_dir = str(run / "data")
    cfg.embed.out_dir = str(run / "embed")


def _fingerprint(options: object) -> str:
    values = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else options
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def _steps(cfg: Config) -> list[Step]:
    run = Path(cfg.run_dir)
    return [
        Step("data", cfg.data, run / "data" / "manifest.json", lambda: data_stage.run(cfg.data, [])),
        Step("tokenizer", cfg.tokenizer, run / "tokenizer" / tokenizer_stage.REPORT_FILE,
             lambda: tokenizer_stage.run(cfg.tokenizer, []), ("data",)),
        Step("pretrain", cfg.pretrain, run / "pretrain" / "summary.json", lambda: _trained(pretrain_stage, cfg.pretrain),
             ("tokenizer",)),
        Step("sft-data", cfg.sft_data, run / "sft_data" / "manifest.json", lambda: sft_data_stage.run(cfg.sft_data, []),
             ("data",)),
        Step("sft", cfg.sft, run / "sft" / "summary.json", lambda: _trained(sft_stage, cfg.sft), ("pretrain", "sft-data")),
        Step("rankings", cfg.rankings, run / "rankings" / "manifest.json", lambda: rankings_stage.run(cfg.rankings, []),
             ("sft-data", "sft")),
        Step("reward", cfg.reward, run / "reward" / "summary.json", lambda: _trained(reward_stage, cfg.reward),
             ("sft", "rankings")),
        Step("ppo", cfg.ppo, run / "ppo" / "summary.json", lambda: _trained(ppo_stage, cfg.ppo),
             ("tokenizer", "sft-data", "sft", "reward")),
        Step("code", cfg.code, run / "code" / "summary.json", lambda: _trained(code_stage, cfg.code), ("pretrain",)),
        Step("humaneval", cfg.humaneval, run / "eval" / "humaneval" / "summary.json",
             lambda: eval_stage.run(cfg.humaneval, ["humaneval"]), ("code",)),
        Step("fim", cfg.fim, run / "fim" / "summary.json", lambda: _trained(fim_stage, cfg.fim), ("data", "pretrain")),
        Step("fim-baseline", cfg.fim_baseline, run / "fim_baseline" / "summary.json",
             lambda: _trained(fim_stage, cfg.fim_baseline), ("data", "pretrain")),
        Step("edit-data", cfg.edit_data, run / "edit_data" / "manifest.json",
             lambda: edit_data_stage.run(cfg.edit_data, []), ("data",)),
        Step("edit", cfg.edit, run / "edit" / "summary.json", lambda: _trained(edit_stage, cfg.edit),
             ("sft", "edit-data")),
        Step("icl", cfg.icl, run / "eval" / "icl" / "summary.json", lambda: eval_stage.run(cfg.icl, ["icl"]),
             ("data", "pretrain")),
        Step("cot", cfg.cot, run / "eval" / "cot" / "summary.json", lambda: eval_stage.run(cfg.cot, ["cot"]), ("pretrain",)),
        Step("ape", cfg.ape, run / "ape" / "summary.json", lambda: ape_stage.run(cfg.ape, []), ("data", "pretrain", "fim")),
        Step("tool-data", cfg.tool_data, run / "tool_data" / "arithmetic_eval.jsonl",
             lambda: tool_data_stage.run(cfg.tool_data, []), ("data",)),
        Step("tools", cfg.tools, run / "tools" / "summary.json", lambda: _trained(sft_stage, cfg.tools),
             ("sft-data", "sft", "tool-data")),
        Step("tools-eval", cfg.tools_eval, run / "eval" / "tools" / "summary.json",
             lambda: eval_stage.run(cfg.tools_eval, ["tools"]), ("tools",)),
        Step("embed", cfg.embed, run / "embed" / "summary.json", lambda: _trained(embed_stage, cfg.embed),
             ("data", "pretrain")),
        Step("samples", {"tokens": cfg.sample_tokens, "text": TEXT_PROMPTS, "chat": CHAT_PROMPTS}, run / "samples.json",
             lambda: write_samples(run, cfg.sample_tokens, cfg.device), ("pretrain", "code", "sft", "ppo")),
    ]


def _trained(stage, options) -> None:
    """Run a training stage; an interrupted run continues from its last checkpoint instead of starting over."""
    import shutil

    from chatforge.model.checkpoint import latest_checkpoint

    out_dir = Path(options.out_dir)
    options.resume = latest_checkpoint(out_dir) is not None
    if options.resume and (out_dir / "summary.json").exists():
        shutil.rmtree(out_dir)  # finished before with other options (else the speedrun would have skipped it): redo
        options.resume = False
    stage.run(options, [])


def write_samples(run_dir: Path, max_tokens: int, device: str) -> None:
    """Greedy continuations of fixed text prompts by the pretrained model, and answers to fixed chat prompts
    (English and Chinese) by the SFT and PPO models; printed and saved to samples.json for the report card."""
    from chatforge.chat_template import prompt_ids
    from chatforge.device import resolve_device
    from chatforge.infer.engine import Engine
    from chatforge.infer.params import SamplingParams
    from chatforge.model.checkpoint import latest_checkpoint, load_model, tokenizer_path
    from chatforge.tokenizer import Tokenizer

    models = [("pretrained", run_dir / "pretrain", False), ("code", run_dir / "code", False), ("sft", run_dir / "sft", True),
              ("ppo", run_dir / "ppo", True)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, repetition_penalty=1.2)
    samples = []
    for label, ckpt, chat in models:
        if latest_checkpoint(ckpt) is None:
            continue
        model, _ = load_model(ckpt, device=resolve_device(device))
        tokenizer = Tokenizer.load(tokenizer_path(ckpt))
        prompts = CHAT_PROMPTS if chat else TEXT_PROMPTS
        inputs = [prompt_ids([{"role": "user", "content": p}], tokenizer) for p in prompts] if chat else prompts
        for prompt, completion in zip(prompts, Engine(model, tokenizer).generate(inputs, params)):
            text = completion.choices[0].text.strip() if chat else completion.choices[0].text
            samples.append({"model": label, "prompt": prompt, "completion": text})
            print(f"--- {label} | {prompt}\n{text if chat else prompt + text}\n")
    io.write_json(run_dir / "samples.json", samples)


def _load_state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def run(cfg: Config, args: list[str]) -> None:
    from chatforge.report import write_report

    _place(cfg)
    run_dir = Path(cfg.run_dir)
    steps = _steps(cfg)
    if cfg.only and cfg.only not in {s.name for s in steps}:
        raise ConfigError(f"option 'only' must be one of {', '.join(s.name for s in steps)}; got {cfg.only!r}")
    state = _load_state(run_dir)
    timings = state.get("seconds", {})
    started = time.perf_counter()
    ran: set[str] = set()
    for step in steps:
        if cfg.only and step.name != cfg.only:
            continue
        fingerprint = _fingerprint(step.options)
        up_to_date = step.done_marker.exists() and state.get("fingerprints", {}).get(step.name) == fingerprint
        if up_to_date and not cfg.force and not ran.intersection(step.needs):
            print(f"[speedrun] {step.name}: up to date, skipped ({step.done_marker})")
            continue
        print(f"[speedrun] {step.name} ...", flush=True)
        t0 = time.perf_counter()
        step.action()
        ran.add(step.name)
        timings[step.name] = round(time.perf_counter() - t0, 1)
        state.setdefault("fingerprints", {})[step.name] = fingerprint
        state["seconds"] = timings
        io.write_json(run_dir / STATE_FILE, state)  # after each stage, so an interruption loses only the current one
        print(f"[speedrun] {step.name} done in {timings[step.name]:.0f} s", flush=True)
    report = write_report(run_dir, timings=timings)
    print(f"[speedrun] finished in {time.perf_counter() - started:.0f} s this run; report card: {report}")
    print(f"[speedrun] talk to the model:  chatforge chat --ckpt={run_dir / 'ppo'}   (or --ckpt={run_dir / 'sft'})")
    print(f"[speedrun] serve it:           chatforge serve --ckpt={run_dir / 'ppo'}")
