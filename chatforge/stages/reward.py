"""train the reward model on K-way rankings (InstructGPT step 2).

    chatforge reward                                    # speedrun default: SFT checkpoint + rankings
    chatforge reward --loss=plackett_luce --train.steps=200

The SFT transformer with a scalar head (``chatforge.model.heads.ScalarHeadModel``) read at the last token of
prompt + response. Each batch element is one prompt with all its K responses: they are forwarded together
and the loss is −log σ(r_w − r_l) averaged over all of the prompt's known-order pairs (``--loss=pairwise``,
InstructGPT's) or the Plackett–Luce likelihood of the ranking (``--loss=plackett_luce``). Validation reports
the pairwise accuracy on the held-out rankings. After training the rewards are shifted so the top-ranked
(reference) answers of the training rankings average 0; the shift is stored in the checkpoint's folder as
``reward_offset.json`` and ``load_reward_model`` applies it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from chatforge import io
from chatforge.config import nested, option
from chatforge.errors import ConfigError
from chatforge.model.checkpoint import load_model, tokenizer_path
from chatforge.model.heads import ScalarHeadModel
from chatforge.tokenizer import PAD, Tokenizer
from chatforge.train import distributed
from chatforge.train.loop import train
from chatforge.train.reward import LOSSES, OFFSET_FILE, RewardTask, RewardTrainConfig, load_rankings


@dataclass
class Config:
    rankings_dir: str = option("runs/speedrun/rankings", "the rankings stage's out_dir (train.jsonl, val.jsonl)")
    init_from: str = option("runs/speedrun/sft", "the SFT model the reward model starts from")
    out_dir: str = option("runs/speedrun/reward", "where checkpoints/, metrics.jsonl, loss.png, summary.json go")
    loss: str = option("pairwise", "pairwise (InstructGPT) or plackett_luce (listwise)")
    include_held_out: bool = option(
        False, "also train on held_out.jsonl, the rankings of the prompts PPO holds out: for a gold reward model "
        "that judges PPO's policy (Gao et al.), never for the proxy PPO optimises",
    )
    resume: bool = option(False, "continue from out_dir's latest checkpoint")
    train: RewardTrainConfig = nested(RewardTrainConfig, "the shared training loop")

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"option 'loss' must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        self.train.validate()


def run(cfg: Config, args: list[str]) -> None:
    cfg.validate()
    gpt, info = load_model(cfg.init_from)
    tokenizer_file = tokenizer_path(cfg.init_from)
    tokenizer = Tokenizer.load(tokenizer_file)
    block = gpt.config.block_size
    root = Path(cfg.rankings_dir)
    train_set = load_rankings(root / "train.jsonl", tokenizer, block)
    if cfg.include_held_out:
        train_set += load_rankings(root / "held_out.jsonl", tokenizer, block)
    val_set = load_rankings(root / "val.jsonl", tokenizer, block)
    model = ScalarHeadModel(gpt.train())
    task = RewardTask(
        train_set, val_set, cfg.train.batch_size, cfg.train.seed, tokenizer.special_id(PAD), cfg.loss
    )
    print(
        f"[reward] {len(train_set)} train rankings, {len(val_set)} held out; K = "
        f"{sorted({len(rows) for rows, _ in train_set})}; model from {info['path']}"
    )
    meta = {
        "stage": "reward",
        "init_from": str(info["path"]),
        "model": gpt.config.to_dict(),
        "model_prefix": "gpt.",
        "loss_kind": cfg.loss,
        "train_rankings": len(train_set),
        "val_rankings": len(val_set),
        "stage_config": dataclasses.asdict(cfg),
    }
    train(model, task, cfg.train, cfg.out_dir, resume=cfg.resume, meta=meta, tokenizer=tokenizer_file)
    job = distributed.init(cfg.train.device)
    if not job.is_main:
        return
    device = job.device
    model.to(device).eval()
    with torch.no_grad():
        held_out = task.eval_loss(model, device)
        train_scores = [
            s for start in range(0, len(train_set), 8) for s in task.scores(model, train_set[start : start + 8], device)
        ]
    # shift rewards so the reference (top-tier) answers of the training rankings average 0
    offset = float(torch.stack([s[tiers[0]].mean() for s, (_, tiers) in zip(train_scores, train_set)]).mean())
    io.write_json(Path(cfg.out_dir) / OFFSET_FILE, {"offset": offset})
    summary_file = Path(cfg.out_dir) / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    summary.update(val_accuracy=round(held_out["accuracy"], 4), reward_offset=round(offset, 4))
    io.write_json(summary_file, summary)
    print(
        f"[reward] held-out pairwise accuracy {held_out['accuracy']:.3f}; reward offset {offset:+.4f} "
        "(reference answers now average 0)"
    )
