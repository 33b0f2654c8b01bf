"""fine-tune a chat model to rewrite text by an instruction, then score it per edit type on held-out triples.

    chatforge edit-train                                 # speedrun default: SFT checkpoint + edit_data
    chatforge edit-train --init_from=runs/speedrun/pretrain --train.steps=1000
    chatforge edit --ckpt=runs/speedrun/edit --instruction="Fix the spelling." < draft.txt

Reads ``data_dir``'s ``edit_train.jsonl`` and ``edit_val.jsonl`` (written by ``chatforge edit-data``), renders
every triple with the edit template of the one chat template (``chatforge.chat_template.edit_messages``: a
system prompt, the instruction and the text as the user turn, the output as the assistant turn) and trains
on the assistant tokens like SFT. Triples that do not fit the model's context whole are left out (a cut
output would teach a wrong edit) and counted. At the end the model rewrites the held-out inputs and
summary.json's ``edits`` gives exact match and character error rate per type, next to the error rate of
leaving the input unchanged (``chatforge.evals.edit_eval``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chatforge import io
from chatforge.chat_template import edit_messages
from chatforge.config import nested, option
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.evals.edit_eval import evaluate_edits
from chatforge.infer.loading import EngineOptions, load_engine
from chatforge.model.checkpoint import load_model, tokenizer_path
from chatforge.tokenizer import Tokenizer
from chatforge.train import distributed
from chatforge.train.edit import EditTrainConfig, fitting, read_triples
from chatforge.train.loop import SUMMARY_FILE
from chatforge.train.sft import fine_tune_on_conversations


@dataclass
class Config:
    data_dir: str = option(
        "runs/speedrun/edit_data", "the edit-data stage's out_dir (edit_train.jsonl, edit_val.jsonl)"
    )
    init_from: str = option("runs/speedrun/sft", "starting weights: a chat model (checkpoint or run directory)")
    out_dir: str = option("runs/speedrun/edit", "where checkpoints/, metrics.jsonl, loss.png, summary.json go")
    resume: bool = option(False, "continue from out_dir's latest checkpoint")
    eval: bool = option(True, "score the trained model on the held-out triples per edit type")
    train: EditTrainConfig = nested(EditTrainConfig, "the shared training loop")

    def validate(self) -> None:
        if not self.init_from:
            raise ConfigError("option 'init_from' is required: the edit stage fine-tunes a chat model")
        self.train.validate()


def run(cfg: Config, args: list[str]) -> None:
    cfg.validate()
    data = Path(cfg.data_dir)
    tokenizer = Tokenizer.load(tokenizer_path(cfg.init_from))
    block = load_model(cfg.init_from)[0].config.block_size
    train_all, val_all = read_triples(data / "edit_train.jsonl"), read_triples(data / "edit_val.jsonl")
    train_set, val_set = fitting(train_all, tokenizer, block), fitting(val_all, tokenizer, block)
    too_long = {"train": len(train_all) - len(train_set), "val": len(val_all) - len(val_set)}
    if not val_set:
        raise ChatforgeError(f"none of the {len(val_all)} held-out triples fits the context of {block} tokens")
    print(f"[edit] {len(train_set)} train and {len(val_set)} held-out triples fit the context ({too_long} left out)")
    def conversations(triples):
        return [edit_messages(t["instruction"], t["input"], t["output"]) for t in triples]
    summary = fine_tune_on_conversations(
        "edit", cfg, conversations(train_set), conversations(val_set), {"too_long": too_long}
    )
    job = distributed.init(cfg.train.device)
    if cfg.eval and summary.get("final_val_loss") is not None:  # every rank rewrites its share of the triples
        engine = load_engine(EngineOptions(ckpt=cfg.out_dir, device=job.device))
        summary["edits"] = evaluate_edits(engine, val_set, map_shares=distributed.map_shares)
    if not job.is_main:
        return
    if "edits" in summary:
        for kind, score in summary["edits"].items():
            print(
                f"[edit] {kind:>14}: {score['count']:3d} held out, exact match {score['exact_match']:.1%}, CER "
                f"{score['cer']:.3f} (unchanged input {score['unchanged_cer']:.3f})"
            )
    io.write_json(Path(cfg.out_dir) / SUMMARY_FILE, summary)
