"""fine-tune a GPT on Python code from this machine's installation (the Codex recipe, in small).

    chatforge code                                       # speedrun default: pretrain checkpoint + the stdlib
    chatforge code --site_packages --folders=~/src,~/projects --train.steps=1000
    chatforge code --resume                              # continue exactly from out_dir's latest checkpoint

Builds the corpus (``chatforge.data.code_corpus``: the standard library without tests, optionally
site-packages and your folders; the Codex filters, files over 1 MB, exact and near duplicates, every drop
counted), holds out a hash-chosen share of the files, tokenizes both parts with the checkpoint's tokenizer
into token shards exactly as the tokenizer stage does (each file followed by ``<|endoftext|>``), and
fine-tunes with the pretrain stage's task on the shared training loop. Writes to ``out_dir``: ``data/``
(tokenizer.json, tokens/, corpus.json with the counts), checkpoints/, metrics.jsonl, loss.png and
summary.json, whose ``held_out_code_loss`` gives the held-out loss of the starting model and of the
fine-tuned one for the report card. Evaluate the result with ``chatforge eval humaneval --ckpt=<out_dir>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chatforge import io
from chatforge.config import nested, option
from chatforge.errors import ConfigError
from chatforge.train.code import code_corpus, describe
from chatforge.train.continued import ContinuedTrainConfig, continue_training
from chatforge.train.loop import SUMMARY_FILE


@dataclass
class Config:
    init_from: str = option("runs/speedrun/pretrain", "starting weights: checkpoint, run directory or HF GPT-2 folder")
    out_dir: str = option("runs/speedrun/code", "where data/, checkpoints/, metrics.jsonl, loss.png, summary.json go")
    resume: bool = option(False, "continue from out_dir's latest checkpoint (reuses out_dir/data)")
    stdlib: bool = option(True, "the standard library's Python files (tests left out)")
    site_packages: bool = option(False, "also the installed packages' Python files (tests left out)")
    folders: list[str] = option([], "also the Python files of these folders (comma-separated)")
    max_files: int = option(0, "use a reproducible pseudo-random subset of this many candidate files (0 = all)")
    max_bytes: int = option(1_000_000, "files larger than this are dropped (Codex: 1 MB)")
    near_dup_threshold: float = option(0.8, "MinHash Jaccard above which a file is a near-duplicate (0 = exact only)")
    val_fraction: float = option(0.05, "share of the files held out for the code loss")
    eval_batches: int = option(20, "validation batches per evaluation (of batch_size windows each)")
    train: ContinuedTrainConfig = nested(ContinuedTrainConfig, "the shared training loop")

    def validate(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"option 'val_fraction' must be in (0, 1); got {self.val_fraction}")
        if not 0 <= self.near_dup_threshold < 1:
            raise ConfigError(f"option 'near_dup_threshold' must be in [0, 1); got {self.near_dup_threshold}")
        for name in ("max_files", "max_bytes", "eval_batches"):
            if getattr(self, name) < (1 if name != "max_files" else 0):
                raise ConfigError(
                    f"option '{name}' must be >= {1 if name != 'max_files' else 0}; got {getattr(self, name)}"
                )
        self.train.validate()


def run(cfg: Config, args: list[str]) -> None:
    cfg.validate()
    summary, base_val_loss = continue_training("code", cfg, code_corpus(cfg), describe)
    summary["held_out_code_loss"] = {"before": round(base_val_loss, 4), "after": summary.get("final_val_loss")}
    io.write_json(Path(cfg.out_dir) / SUMMARY_FILE, summary)
    if summary.get("final_val_loss") is not None:
        print(f"[code] held-out code loss: {base_val_loss:.4f} before -> {summary['final_val_loss']:.4f} after")
