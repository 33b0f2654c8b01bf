"""supervised fine-tuning (SFT) of a GPT on chat demonstrations, loss on assistant tokens only.

    chatforge sft                                        # speedrun default: pretrain checkpoint + sft_data
    chatforge sft --init_from=path/to/hf-gpt2 --train.steps=500
    chatforge sft --resume                               # continue exactly from out_dir's latest checkpoint

Reads ``data_dir``'s ``sft_train.jsonl`` and ``sft_val.jsonl`` (written by ``chatforge sft-data``: lines with
OpenAI-style ``messages``), renders every conversation whole with the one chat template
(``chatforge.chat_template``: role tokens, ``<|end|>`` after each turn) and trains next-token prediction
where only the assistant's tokens (and their closing ``<|end|>``) carry loss. Conversations are cut at the
model's context. The held-out loss on assistant tokens is measured for the starting model before training
(``base_val_loss`` in summary.json) and during training (``val_loss``), so the report card can show what SFT
bought. Starts from a chatforge checkpoint or run directory or a Hugging Face GPT-2 folder (``init_from``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chatforge.config import nested, option
from chatforge.errors import ConfigError
from chatforge.train.sft import SFTTrainConfig, fine_tune_on_conversations, read_conversations


@dataclass
class Config:
    data_dir: str = option("runs/speedrun/sft_data", "the sft-data stage's out_dir (sft_train.jsonl, sft_val.jsonl)")
    init_from: str = option("runs/speedrun/pretrain", "starting weights: checkpoint, run directory or HF GPT-2 folder")
    out_dir: str = option("runs/speedrun/sft", "where checkpoints/, metrics.jsonl, loss.png, summary.json go")
    resume: bool = option(False, "continue from out_dir's latest checkpoint")
    max_val_conversations: int = option(200, "held-out conversations in the validation loss")
    extra_train: list[str] = option([], "more SFT JSONL files mixed into training (e.g. `chatforge tool-data`'s "
                                        "tool_train.jsonl)")
    extra_val: list[str] = option([], "more held-out SFT JSONL files added to the validation set")
    train: SFTTrainConfig = nested(SFTTrainConfig, "the shared training loop")

    def validate(self) -> None:
        if self.max_val_conversations < 1:
            raise ConfigError(f"option 'max_val_conversations' must be >= 1; got {self.max_val_conversations}")
        self.train.validate()


def run(cfg: Config, args: list[str]) -> None:
    cfg.validate()
    data = Path(cfg.data_dir)
    train_set = read_conversations(data / "sft_train.jsonl")
    val_set = read_conversations(data / "sft_val.jsonl")[: cfg.max_val_conversations]
    for path in cfg.extra_train:
        train_set += read_conversations(Path(path))
    for path in cfg.extra_val:
        val_set += read_conversations(Path(path))[: cfg.max_val_conversations]
    fine_tune_on_conversations(
        "sft", cfg, train_set, val_set, {"extra_train": cfg.extra_train} if cfg.extra_train else None
    )
