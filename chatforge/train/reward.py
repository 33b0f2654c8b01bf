"""The reward model: K-way rankings encoded as pairs, the ranking task on the shared loop, and loading a trained one.

The `chatforge reward` stage (chatforge/stages/reward.py) runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from chatforge import io
from chatforge.chat_template import prompt_ids, stop_token_ids
from chatforge.config import option
from chatforge.data.chat_batches import EpochOrder, pad_rows
from chatforge.data.rankings import read_rankings
from chatforge.errors import ChatforgeError
from chatforge.model.checkpoint import WEIGHTS_FILE, load_model, resolve_checkpoint
from chatforge.model.heads import ScalarHeadModel
from chatforge.model.weights import read_safetensors
from chatforge.tokenizer import Tokenizer
from chatforge.train.loop import TrainConfig
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


def encode_ranking(record: dict, tokenizer: Tokenizer, block_size: int) -> list[list[int]]:
    """The K token sequences prompt + response + <|end|> of a ranking.

    A sequence longer than the context keeps its end (the response and what is closest to it): the reward
    model reads the last token, so that is the part that must be seen.
    """
    prompt = prompt_ids(record["prompt"], tokenizer)
    end = stop_token_ids(tokenizer)[0]
    return [(prompt + tokenizer.encode(c) + [end])[-block_size:] for c in record["completions"]]


class RewardTask:
    """One batch element per prompt; all K responses of every prompt in the micro-batch share one forward pass."""

    def __init__(
        self, train_set: list[tuple], val_set: list[tuple], batch_size: int, seed: int, pad_id: int, loss: str
    ):
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
        right, total = map(
            sum, zip(*(pairwise_accuracy(s.detach(), tiers) for s, (_, tiers) in zip(per_prompt, items)))
        )
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
