"""train the reward model on K-way rankings (InstructGPT step 2).

    chatforge reward                                    # speedrun default: SFT checkpoint + rankings
    chatforge reward --loss=plackett_luce --train.steps=200
    chatforge reward --signals=runs/serve/feedback_rewards.jsonl                      # rankings + user signals
    chatforge reward --signals=a.jsonl,b.jsonl --rankings_dir= --out_dir=runs/rm_signals  # user signals alone

The SFT transformer with a scalar head (``chatforge.model.heads.ScalarHeadModel``) read at the last token of
prompt + response. Each batch element is one prompt with all its K responses: they are forwarded together
and the loss is −log σ(r_w − r_l) averaged over all of the prompt's known-order pairs (``--loss=pairwise``,
InstructGPT's) or the Plackett–Luce likelihood of the ranking (``--loss=plackett_luce``). Validation reports
the pairwise accuracy on the held-out rankings. After training the rewards are shifted so the top-ranked
(reference) answers of the training rankings average 0; the shift is stored in the checkpoint's folder as
``reward_offset.json`` and ``load_reward_model`` applies it.

``--signals`` adds rewards from what users did with answers (``chatforge feedback export --as rewards``: copied,
continued, regenerated, asked again, mapped to [-1, 1] by ``chatforge.data.signal_rewards``) with a pointwise
loss, the binary cross-entropy of σ(r) against (reward + 1) / 2 (``chatforge.train.reward.SignalRewardTask``
says why), weighted by ``signals_weight`` beside the rankings' loss, or alone with ``--rankings_dir=``. A hash of
each answer's prompt and completion (not its id: the feedback store's ids are random, and the same answer can be
given many times) holds out ``signals_val_fraction`` of them; validation reports the sign agreement of r with
their rewards (``val_signal_accuracy``). Trained on signals alone the rewards keep the loss's own zero (σ(r) =
1/2: as likely kept as rejected), so no offset is applied.
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
from chatforge.train.reward import (
    EVAL_CHUNK,
    LOSSES,
    OFFSET_FILE,
    MixedRewardTask,
    RewardTask,
    RewardTrainConfig,
    SignalRewardTask,
    load_rankings,
    load_signal_rewards,
)


@dataclass
class Config:
    rankings_dir: str = option("runs/speedrun/rankings", "the rankings stage's out_dir (train.jsonl, val.jsonl); "
                               "empty to train on --signals alone")
    init_from: str = option("runs/speedrun/sft", "the SFT model the reward model starts from")
    out_dir: str = option("runs/speedrun/reward", "where checkpoints/, metrics.jsonl, loss.png, summary.json go")
    loss: str = option("pairwise", "pairwise (InstructGPT) or plackett_luce (listwise)")
    include_held_out: bool = option(
        False, "also train on held_out.jsonl, the rankings of the prompts PPO holds out: for a gold reward model "
        "that judges PPO's policy (Gao et al.), never for the proxy PPO optimises",
    )
    signals: list[str] = option([], "user-signal reward files (`chatforge feedback export --as rewards`, "
                                    "comma-separated) trained with a pointwise loss")
    signals_weight: float = option(1.0, "weight of the signals' pointwise loss beside the rankings' loss", gt=0)
    signals_val_fraction: float = option(0.1, "share of the signal-rewarded answers held out", gt=0, lt=1)
    resume: bool = option(False, "continue from out_dir's latest checkpoint")
    train: RewardTrainConfig = nested(RewardTrainConfig, "the shared training loop")

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"option 'loss' must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        if not self.rankings_dir and not self.signals:
            raise ConfigError("nothing to train on: set --rankings_dir, --signals or both")
        self.train.validate()


def run(cfg: Config, args: list[str]) -> None:
    cfg.validate()
    gpt, info = load_model(cfg.init_from)
    tokenizer_file = tokenizer_path(cfg.init_from)
    tokenizer = Tokenizer.load(tokenizer_file)
    block = gpt.config.block_size
    pad, batch, seed = tokenizer.special_id(PAD), cfg.train.batch_size, cfg.train.seed
    rankings = signals = None
    if cfg.rankings_dir:
        root = Path(cfg.rankings_dir)
        train_set = load_rankings(root / "train.jsonl", tokenizer, block)
        if cfg.include_held_out:
            train_set += load_rankings(root / "held_out.jsonl", tokenizer, block)
        val_set = load_rankings(root / "val.jsonl", tokenizer, block)
        rankings = RewardTask(train_set, val_set, batch, seed, pad, cfg.loss)
        print(
            f"[reward] {len(train_set)} train rankings, {len(val_set)} held out; K = "
            f"{sorted({len(rows) for rows, _ in train_set})}; model from {info['path']}"
        )
    if cfg.signals:
        signals = SignalRewardTask(*load_signal_rewards(cfg.signals, tokenizer, block, cfg.signals_val_fraction, seed),
                                   batch, seed, pad)
        print(f"[reward] {len(signals.train_set)} signal-rewarded answers to train on, {len(signals.val_set)} held "
              f"out; model from {info['path']}")
    model = ScalarHeadModel(gpt.train())
    task = MixedRewardTask(rankings, signals, cfg.signals_weight) if rankings and signals else rankings or signals
    meta = {
        "stage": "reward",
        "init_from": str(info["path"]),
        "model": gpt.config.to_dict(),
        "model_prefix": "gpt.",
        "loss_kind": cfg.loss,
        "train_rankings": len(rankings.train_set) if rankings else 0,
        "val_rankings": len(rankings.val_set) if rankings else 0,
        "train_signals": len(signals.train_set) if signals else 0,
        "val_signals": len(signals.val_set) if signals else 0,
        "stage_config": dataclasses.asdict(cfg),
    }
    train(model, task, cfg.train, cfg.out_dir, resume=cfg.resume, meta=meta, tokenizer=tokenizer_file)
    job = distributed.init(cfg.train.device)
    device = job.device  # every rank scores its share of the held-out and training items (eval_loss, map_shared)
    model.to(device).eval()
    results, offset = {}, 0.0
    with torch.no_grad():
        if signals:
            results["val_signal_accuracy"] = round(signals.eval_loss(model, device)["accuracy"], 4)
        if rankings:
            results["val_accuracy"] = round(rankings.eval_loss(model, device)["accuracy"], 4)
            train_set = rankings.train_set

            def reference_scores(index: int) -> list[float]:
                items = train_set[index * EVAL_CHUNK : (index + 1) * EVAL_CHUNK]
                scores = rankings.scores(model, items, device)
                return [float(s[tiers[0]].mean()) for s, (_, tiers) in zip(scores, items)]

            # shift rewards so the reference (top-tier) answers of the training rankings average 0
            means = [m for chunk in distributed.map_shared(reference_scores, -(-len(train_set) // EVAL_CHUNK))
                     for m in chunk]
            offset = sum(means) / len(means)
    if not job.is_main:
        return
    io.write_json(Path(cfg.out_dir) / OFFSET_FILE, {"offset": offset})
    summary_file = Path(cfg.out_dir) / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    summary.update(results, reward_offset=round(offset, 4))
    io.write_json(summary_file, summary)
    figures = {"val_accuracy": "held-out pairwise accuracy", "val_signal_accuracy": "held-out signal sign agreement"}
    print(f"[reward] {'; '.join(f'{figures[k]} {v:.3f}' for k, v in results.items())}; reward offset {offset:+.4f}"
          + (" (reference answers now average 0)" if rankings else " (signals alone: σ(r) = 1/2 stays at 0)"))
