"""`chatforge <stage> [--config FILE] [--key=value ...]`.

Each stage lives in its own module, which defines a config dataclass ``Config``, a function
``run(cfg, args) -> None`` and a module docstring whose first line is the stage's one-line summary.
Modules are imported only when their stage runs, so ``chatforge --help`` stays instant.
"""

from __future__ import annotations

import importlib
import sys

from chatforge.config import die, help_text, parse
from chatforge.errors import ChatforgeError

# stage name -> (module, whether the stage takes positional arguments)
STAGES: dict[str, tuple[str, bool]] = {
    "data": ("chatforge.data.pipeline", False),
    "tokenizer": ("chatforge.tokenizer_stage", False),
    "pretrain": ("chatforge.train.pretrain", False),
    "sft-data": ("chatforge.data.sft_data", False),
    "sft": ("chatforge.train.sft", False),
    "rankings": ("chatforge.data.rankings", False),
    "reward": ("chatforge.train.reward", False),
    "ppo": ("chatforge.train.ppo", False),
    "code": ("chatforge.train.code", False),
    "fim": ("chatforge.train.fim", False),
    "edit-data": ("chatforge.data.edit_data", False),
    "edit-train": ("chatforge.train.edit", False),
    "ape": ("chatforge.prompting.ape", False),
    "tool-data": ("chatforge.tools.data", False),
    "safety-train": ("chatforge.safety.classifier", False),
    "embed": ("chatforge.embed.train", False),
    "eval-embed": ("chatforge.embed.evaluate", False),
    "search": ("chatforge.embed.search_stage", True),
    "generate": ("chatforge.infer.generate_stage", True),
    "chat": ("chatforge.infer.chat_stage", True),
    "edit": ("chatforge.infer.edit_stage", True),
    "serve": ("chatforge.serve.stage", False),
    "feedback": ("chatforge.serve.feedback_stage", True),
    "eval": ("chatforge.evals.eval_stage", True),
    "speedrun": ("chatforge.speedrun", False),
}

SUMMARIES = {
    "data": "build the cleaned, de-duplicated, split pretraining corpus and its manifest",
    "tokenizer": "train the byte-level BPE tokenizer and write token shards",
    "pretrain": "pretrain a GPT by next-token prediction on the token shards",
    "sft-data": "curate SFT demonstrations, a held-out SFT split and the RLHF prompt pool (InstructGPT rules)",
    "sft": "supervised fine-tuning on chat demonstrations (loss on assistant tokens only)",
    "rankings": "build K-way ranking data for the reward model (human files + automatic reference > SFT > corrupted)",
    "reward": "train the reward model on K-way rankings (all pairs of a prompt in one batch element)",
    "ppo": "PPO against the reward model with a per-token KL penalty to SFT and a pretraining-loss mix (PPO-ptx)",
    "code": "fine-tune a GPT on filtered, de-duplicated Python code from this machine (Codex recipe)",
    "fim": "continue pretraining with fill-in-the-middle so the model can insert between a prefix and a suffix",
    "edit-data": "build (input, instruction, output) edit triples from the corpus: typos, casing, punctuation, renames, docstrings",
    "edit-train": "fine-tune a chat model to rewrite text by an instruction; scored per edit type on held-out triples",
    "tool-data": "build tool-use SFT conversations (calculator, retrieval) and held-out arithmetic questions",
    "safety-train": "train a content classifier (logistic regression on embeddings) from labeled JSONL for the filters",
    "ape": "Automatic Prompt Engineer: the model proposes instructions for a task, scores and filters them",
    "embed": "train a text/code embedding model from a GPT by contrastive pre-training (CPT), then evaluate it",
    "eval-embed": "evaluate an embedding model on held-out retrieval and a linear probe against MiniLM and a floor",
    "search": "index a folder or JSONL of documents with an embedding model and search it",
    "generate": "generate text from a checkpoint with every decoding control, streamed to the terminal",
    "chat": "chat with a model in the terminal (streamed, multi-turn), or answer stdin for scripts",
    "edit": "rewrite text from stdin by an instruction with an edit model (chatforge edit --instruction=...)",
    "serve": "serve a model: OpenAI-compatible API, web chat page with feedback, store that feeds training",
    "feedback": "export the web page's feedback as training data (feedback export --as sft|rankings --out FILE)",
    "eval": "evaluate a model: HumanEval pass@k in a sandbox (humaneval), in-context learning (icl), chain-of-thought (cot), tool use (tools)",
    "speedrun": "run every stage end to end on the embedded default and write the report card",
}


def _usage() -> str:
    width = max(map(len, STAGES))
    lines = [
        "usage: chatforge <stage> [--config FILE.toml|.yaml] [--key=value ...]",
        "",
        "stages:",
        *(f"  {name.ljust(width)}  {SUMMARIES[name]}" for name in STAGES),
        "",
        "`chatforge <stage> --help` lists every option of a stage with its default.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        die(f"unknown stage '{stage}'. Stages: {', '.join(STAGES)}")
    module_name, takes_positional = STAGES[stage]
    module = importlib.import_module(module_name)
    if "-h" in rest or "--help" in rest:
        doc = (module.__doc__ or SUMMARIES[stage]).strip()
        print(f"usage: chatforge {stage} [--config FILE] [--key=value ...]\n\n{doc}\n\noptions:")
        print(help_text(module.Config))
        return
    try:
        cfg, positional = parse(module.Config, rest, allow_positional=takes_positional)
        module.run(cfg, positional)
    except ChatforgeError as exc:
        die(str(exc))
    except KeyboardInterrupt:
        die("interrupted")


if __name__ == "__main__":
    main()
