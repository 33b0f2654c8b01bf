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
from chatforge.chat_template import prompt_ids, stop_token_ids
from chatforge.config import ChatforgeError, ConfigError, nested, option
from chatforge.data.chat_batches import EpochOrder
from chatforge.data.rankings import read_rankings
from chatforge.model.heads import ScalarHeadModel
from chatforge.tokenizer import Tokenizer
from chatforge.train.loop import TrainConfig, train
from chatforge.train.preference import pairwise_accuracy, pairwise_loss, plackett_luce_loss

LOSSES = {"pairwise": pairwise_loss, "plackett_luce": plackett_luce_loss}
OFFSET_FILE = "reward_offset.json"


@dataclass
class RewardTrainConfig(TrainConfig):
    steps: int = option(80, "optimizer steps (held-out accuracy peaks early: ~200 speedrun rankings overfit beyond)")
    batch_size: int = option(8, "prompts per optimizer step (each with all K of its responses)")
    lr: float = option(3e-4, "peak learning rate")
    min_lr: float = option(3e-5, "learning rate at the end of the decay")
    warmup_steps: int = option(10, "steps of linear warm-up")
    eval_every: int = option(50, "steps between validation (loss and pairwise accuracy)")
    ckpt_every: int = option(50, "steps between checkpoints")
    max_minutes: float = option(4.0, "wall-time budget in minutes (0 = none)")


@dataclass
class Config:
    rankings_dir: str = option("runs/speedrun/rankings", "the rankings stage's out_dir (train.jsonl, val.jsonl)")
    init_from: str = option("runs/speedrun/sft", "the SFT model the reward model starts from")
    out_dir: str = option("runs/speedrun/reward", "where checkpoints/, metrics.jsonl, loss.png, summary.json go")
    loss: str = option("pairwise", "pairwise (InstructGPT) or plackett_luce (listwise)")
    resume: bool = option(False, "continue from out_dir's latest checkpoint")
    train: RewardTrainConfig = nested(RewardTrainConfig, "the shared training loop")

    def validate(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"option 'loss' must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        self.train.validate()


def encode_ranking(record: dict, tokenizer: Tokenizer, block_size: int) -> list[list[int]]:
    """The K token sequences prompt + response + <|end|> of a ranking.

    A sequence longer than the context keeps its end (the response and what is closest to it): the reward
    model reads the last token, so that is the part that must be seen.
    """
    prompt = prompt_ids(record["prompt"], tokenizer)
    end = stop_token_ids(tokenizer)[0]
    return [(prompt + tokenizer.encode(c) + [end])[-block_size:] for c in record["completions"]]


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids, torch.tensor([len(r) for r in rows])


class RewardTask:
    """One batch element per prompt; all K responses of every prompt in the micro-batch share one forward pass."""

    def __init__(self, train_set: list[tuple], val_set: list[tuple], batch_size: int, seed: int, pad_id: int, loss: str):
        self.train_set, self.val_set, self.pad_id = train_set, val_set, pad_id
        self.order = EpochOrder(len(train_set), batch_size, seed, what="training rankings")
        self.loss_fn = LOSSES[loss]

    def batch(self, step: int, part: int, parts: int, device: str):
        return [self.train_set[i] for i in self.order.indices(step, part, parts)], device

    def scores(self, model, items: list[tuple], device: str) -> list[torch.Tensor]:
        """The rewards of each prompt's responses, one tensor per prompt."""
        rows = [row for rows, _ in items for row in rows]
        ids, lengths = pad_rows(rows, self.pad_id)
        values = model(ids.to(device))
        flat = values.gather(1, (lengths.to(device) - 1).unsqueeze(1)).squeeze(1)
        return list(flat.split([len(rows) for rows, _ in items]))

    def loss(self, model, batch) -> dict:
        items, device = batch
        per_prompt = self.scores(model, items, device)
        loss = torch.stack([self.loss_fn(s, tiers) for s, (_, tiers) in zip(per_prompt, items)]).mean()
        right, total = map(sum, zip(*(pairwise_accuracy(s.detach(), tiers) for s, (_, tiers) in zip(per_prompt, items))))
        return {"loss": loss, "accuracy": right / total, "tokens": sum(len(r) for rows, _ in items for r in rows)}

    @torch.no_grad()
    def eval_loss(self, model, device: str) -> dict:
        losses, right, total = [], 0, 0
        for start in range(0, len(self.val_set), 8):
            items = self.val_set[start : start + 8]
            for s, (_, tiers) in zip(self.scores(model, items, device), items):
                losses.append(float(self.loss_fn(s, tiers)))
                r, t = pairwise_accuracy(s, tiers)
                right, total = right + r, total + t
        return {"loss": sum(losses) / len(losses), "accuracy": right / max(total, 1)}


def load_rankings(path: Path, tokenizer: Tokenizer, block_size: int) -> list[tuple]:
    if not path.is_file():
        raise ChatforgeError(f"{path} not found (run `chatforge rankings` first, or set --rankings_dir)")
    records = read_rankings(path)
    if not records:
        raise ChatforgeError(f"{path} holds no rankings")
    return [(encode_ranking(r, tokenizer, block_size), r["ranking"]) for r in records]


def load_reward_model(path: str | Path, device: str = "cpu") -> ScalarHeadModel:
    """A trained reward model (eval mode) with its normalising offset applied."""
    from chatforge.train.checkpoint import WEIGHTS_FILE, load_model, read_safetensors, resolve_checkpoint

    folder = resolve_checkpoint(path)
    gpt, info = load_model(folder, device)
    if info.get("stage") != "reward":
        raise ChatforgeError(f"{folder} is not a reward model checkpoint (stage {info.get('stage')!r})")
    model = ScalarHeadModel(gpt).to(device)
    state = read_safetensors(folder / WEIGHTS_FILE, device)
    head = {"weight": state.get("head.weight"), "bias": state.get("head.bias")}
    if any(tensor is None or tensor.shape != getattr(model.head, name).shape for name, tensor in head.items()):
        raise ChatforgeError(f"{folder / WEIGHTS_FILE} holds no reward head that fits its GPT")
    model.head.load_state_dict(head)
    for candidate in (Path(path) / OFFSET_FILE, folder.parent.parent / OFFSET_FILE):  # run dir, or checkpoint's run
        if candidate.is_file():
            offset = io.read_json(candidate, "reward offset").get("offset")
            if isinstance(offset, bool) or not isinstance(offset, (int, float)):
                raise ChatforgeError(f"{candidate}: 'offset' must be a number; got {offset!r}")
            model.head.bias.data -= offset
            break
    return model.eval()


def run(cfg: Config, args: list[str]) -> None:
    from chatforge.train import distributed
    from chatforge.train.checkpoint import load_model, tokenizer_path

    cfg.validate()
    gpt, info = load_model(cfg.init_from)
    tokenizer_file = tokenizer_path(cfg.init_from)
    tokenizer = Tokenizer.load(tokenizer_file)
    block = gpt.config.block_size
    root = Path(cfg.rankings_dir)
    train_set = load_rankings(root / "train.jsonl", tokenizer, block)
    val_set = load_rankings(root / "val.jsonl", tokenizer, block)
    model = ScalarHeadModel(gpt.train())
    task = RewardTask(train_set, val_set, cfg.train.batch_size, cfg.train.seed, tokenizer.special_id("<|pad|>"), cfg.loss)
    print(f"[reward] {len(train_set)} train rankings, {len(val_set)} held out; K = "
          f"{sorted({len(rows) for rows, _ in train_set})}; model from {info['path']}")
    meta = {"stage": "reward", "init_from": str(info["path"]), "model": gpt.config.to_dict(), "model_prefix": "gpt.",
            "loss_kind": cfg.loss, "train_rankings": len(train_set), "val_rankings": len(val_set),
            "stage_config": dataclasses.asdict(cfg)}
    train(model, task, cfg.train, cfg.out_dir, resume=cfg.resume, meta=meta, tokenizer=tokenizer_file)
    job = distributed.init(cfg.train.device)
    if not job.is_main:
        return
    device = job.device
    model.to(device).eval()
    with torch.no_grad():
        held_out = task.eval_loss(model, device)
        train_scores = [s for start in range(0, len(train_set), 8) for s in task.scores(model, train_set[start : start + 8], device)]
    # shift rewards so the reference (top-tier) answers of the training rankings average 0
    offset = float(torch.stack([s[tiers[0]].mean() for s, (_, tiers) in zip(train_scores, train_set)]).mean())
    io.write_json(Path(cfg.out_dir) / OFFSET_FILE, {"offset": offset})
    summary_file = Path(cfg.out_dir) / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    summary.update(val_accuracy=round(held_out["accuracy"], 4), reward_offset=round(offset, 4))
    io.write_json(summary_file, summary)
    print(f"[reward] held-out pairwise accuracy {held_out['accuracy']:.3f}; reward offset {offset:+.4f} "
          "(reference answers now average 0)")
