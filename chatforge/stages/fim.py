"""continue pretraining with fill-in-the-middle, so the model can insert text between a prefix and a suffix.

    chatforge fim                                        # speedrun default: pretrain checkpoint + the corpus
    chatforge fim --fim_rate=0 --out_dir=runs/speedrun/fim_baseline   # the same training without FIM
    chatforge fim --fim_rate=0.9 --spm_rate=0.5 --train.steps=1000
    chatforge generate --ckpt=runs/speedrun/fim --suffix=' return a + b' 'def add(a, b):'

Reads the data stage's documents (``data_dir``/pretrain_{train,val}.jsonl), cuts them into chunks of about a
context's length at line boundaries, and rewrites ``fim_rate`` of the training chunks in FIM order
(``chatforge.data.fim``: prefix/middle/suffix at random character positions; SPM order for ``spm_rate`` of
them, else PSM), the rest left to right, every chunk ending in ``<|endoftext|>``. Training is the pretrain
task on the shared loop (``chatforge.train.continued``); the validation loss is plain left-to-right on the
held-out chunks, so FIM's cost to ordinary modelling shows directly. The checkpoints record ``"fim": true``
when fim_rate > 0, which lets ``chatforge serve`` accept ``suffix``. At the end the model is evaluated on
held-out chunks with a removed span (``chatforge.evals.fim_eval``: middle loss and exact match, PSM and SPM,
and the left-to-right middle loss) into summary.json's ``insertion``. Train a ``--fim_rate=0`` twin with the
same options to see what FIM buys: the speedrun does, and the report card sets the two side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chatforge import io
from chatforge.config import nested, option
from chatforge.errors import ConfigError
from chatforge.train import distributed
from chatforge.train.continued import continue_training
from chatforge.train.fim import FIMTrainConfig, describe, evaluate, fim_corpus
from chatforge.train.loop import SUMMARY_FILE


@dataclass
class Config:
    init_from: str = option("runs/speedrun/pretrain", "starting weights: checkpoint, run directory or HF GPT-2 folder")
    data_dir: str = option("runs/speedrun/data", "the data stage's out_dir (pretrain_train.jsonl, pretrain_val.jsonl)")
    out_dir: str = option("runs/speedrun/fim", "where data/, checkpoints/, metrics.jsonl, loss.png, summary.json go")
    resume: bool = option(False, "continue from out_dir's latest checkpoint (reuses out_dir/data)")
    fim_rate: float = option(
        0.5, "share of training chunks rewritten in FIM order (0 = an ordinary left-to-right twin)", ge=0, le=1
    )
    spm_rate: float = option(
        0.5, "share of the FIM chunks in suffix-prefix-middle order (the rest prefix-suffix-middle)", ge=0, le=1
    )
    chunk_chars: int = option(0, "characters per chunk, cut at line ends (0 = 3 per token of the model's context)")
    max_train_chars: int = option(8_000_000, "a seeded random subset of the training chunks up to this many characters")
    eval_examples: int = option(200, "held-out chunks with a removed span for the insertion evaluation (0 = skip it)")
    eval_batches: int = option(20, "validation batches per evaluation (of batch_size windows each)")
    train: FIMTrainConfig = nested(FIMTrainConfig, "the shared training loop")

    def validate(self) -> None:
        for name in ("fim_rate", "spm_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"option '{name}' must be in [0, 1]; got {getattr(self, name)}")
        for name, low in (("chunk_chars", 0), ("max_train_chars", 1), ("eval_examples", 0), ("eval_batches", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"option '{name}' must be >= {low}; got {getattr(self, name)}")
        self.train.validate()


def run(cfg: Config, args: list[str]) -> None:
    cfg.validate()
    summary, base_val_loss = continue_training(
        "fim", cfg, fim_corpus(cfg), describe, {"fim": cfg.fim_rate > 0, "fim_rate": cfg.fim_rate}
    )
    summary["left_to_right_loss"] = {"before": round(base_val_loss, 4), "after": summary.get("final_val_loss")}
    if cfg.eval_examples and summary.get("final_val_loss") is not None:
        summary["insertion"] = evaluate(cfg, summary["corpus"]["chunk_chars"])  # every rank scores its share
    if not distributed.init(cfg.train.device).is_main:
        return
    if "insertion" in summary:
        ins = summary["insertion"]
        print(
            f"[fim] insertion on {ins['examples']} held-out spans: middle loss PSM {ins['psm']['middle_loss']:.3f} / "
            f"SPM {ins['spm']['middle_loss']:.3f} (left to right {ins['left_to_right_middle_loss']:.3f}); exact match "
            f"PSM {ins['psm']['exact_match']:.1%} / SPM {ins['spm']['exact_match']:.1%}"
        )
    io.write_json(Path(cfg.out_dir) / SUMMARY_FILE, summary)
    print(f"[fim] held-out left-to-right loss: {base_val_loss:.4f} before -> {summary.get('final_val_loss')} after")
