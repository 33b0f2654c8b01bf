"""The reward model: K-way rankings encoded as pairs, the ranking task on the shared loop, the pointwise task on
user-signal rewards (alone or mixed with rankings), and loading a trained one.

The `chatforge reward` stage (chatforge/stages/reward.py) runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from chatforge import io
from chatforge.chat_template import prompt_ids, stop_token_ids
from chatforge.config import option
from chatforge.data.chat_batches import EpochOrder, pad_rows
from chatforge.data.rankings import assign_split, read_rankings
from chatforge.data.signal_rewards import answer_key, read_signal_rewards
from chatforge.errors import ChatforgeError
from chatforge.model.checkpoint import WEIGHTS_FILE, load_model, resolve_checkpoint
from chatforge.model.heads import ScalarHeadModel
from chatforge.model.weights import read_safetensors
from chatforge.tokenizer import Tokenizer
from chatforge.train import distributed
from chatforge.train.loop import TrainConfig
from chatforge.train.preference import pairwise_accuracy, pairwise_loss, plackett_luce_loss

LOSSES = {"pairwise": pairwise_loss, "plackett_luce": plackett_luce_loss}
OFFSET_FILE = "reward_offset.json"


@dataclass
class RewardTrainConfig(TrainConfig):
    steps: int = option(80, "optimizer steps (held-out accuracy peaks early: ~200 speedrun rankings overfit beyond)")
    batch_size: int = option(8, "prompts per optimizer step (each with all K of its responses); with --signals "
                                "also this many signal-rewarded answers")
    lr: float = option(3e-4, "peak learning rate")
    min_lr: float = option(3e-5, "learning rate at the end of the decay")
    warmup_steps: int = option(10, "steps of linear warm-up")
    eval_every: int = option(50, "steps between validation (loss and pairwise accuracy)")
    ckpt_every: int = option(50, "steps between checkpoints")
    max_minutes: float = option(4.0, "wall-time budget in minutes (0 = none)")


def encode_answers(
    prompt: list[dict], completions: list[str], tokenizer: Tokenizer, block_size: int
) -> list[list[int]]:
    """The token sequences prompt + response + <|end|> of each completion.

    A sequence longer than the context keeps its end (the response and what is closest to it): the reward
    model reads the last token, so that is the part that must be seen.
    """
    ids = prompt_ids(prompt, tokenizer)
    end = stop_token_ids(tokenizer)[0]
    return [(ids + tokenizer.encode(c) + [end])[-block_size:] for c in completions]


def encode_ranking(record: dict, tokenizer: Tokenizer, block_size: int) -> list[list[int]]:
    """The K token sequences prompt + response + <|end|> of a ranking."""
    return encode_answers(record["prompt"], record["completions"], tokenizer, block_size)


def last_token_scores(model, rows: list[list[int]], pad_id: int, device: str) -> torch.Tensor:
    """The model's value at the last token of each row, all rows in one forward pass."""
    ids, lengths = pad_rows(rows, pad_id)
    values = model(ids.to(device))
    return values.gather(1, (lengths.to(device) - 1).unsqueeze(1)).squeeze(1)


class _ScoredAnswersTask:
    """What the ranking and the signal tasks share: batches drawn in epoch order, and a loss that scores a batch's
    rows in one forward pass and hands the scores to the task's ``objective``."""

    def __init__(self, train_set: list[tuple], val_set: list[tuple], batch_size: int, seed: int, pad_id: int,
                 what: str):
        self.train_set, self.val_set, self.pad_id = train_set, val_set, pad_id
        self.order = EpochOrder(len(train_set), batch_size, seed, what=what)

    def batch(self, step: int, part: int, parts: int, device: str):
        return [self.train_set[i] for i in self.order.indices(step, part, parts)], device

    def loss(self, model, batch) -> dict:
        items, device = batch
        return {**self.objective(self.scores(model, items, device), items),
                "tokens": sum(len(r) for r in self.rows(items))}


class RewardTask(_ScoredAnswersTask):
    """One batch element per prompt; all K responses of every prompt in the micro-batch share one forward pass."""

    def __init__(
        self, train_set: list[tuple], val_set: list[tuple], batch_size: int, seed: int, pad_id: int, loss: str
    ):
        super().__init__(train_set, val_set, batch_size, seed, pad_id, "training rankings")
        self.loss_fn = LOSSES[loss]

    @staticmethod
    def rows(items: list[tuple]) -> list[list[int]]:
        return [row for rows, _ in items for row in rows]

    def split(self, flat: torch.Tensor, items: list[tuple]) -> list[torch.Tensor]:
        """Flat scores of ``rows(items)`` as one tensor per prompt."""
        return list(flat.split([len(rows) for rows, _ in items]))

    def scores(self, model, items: list[tuple], device: str) -> list[torch.Tensor]:
        """The rewards of each prompt's responses, one tensor per prompt."""
        return self.split(last_token_scores(model, self.rows(items), self.pad_id, device), items)

    def objective(self, per_prompt: list[torch.Tensor], items: list[tuple]) -> dict:
        loss = torch.stack([self.loss_fn(s, tiers) for s, (_, tiers) in zip(per_prompt, items)]).mean()
        right, total = map(
            sum, zip(*(pairwise_accuracy(s.detach(), tiers) for s, (_, tiers) in zip(per_prompt, items)))
        )
        return {"loss": loss, "accuracy": right / total}

    @torch.no_grad()
    def eval_loss(self, model, device: str) -> dict:
        """Mean loss per held-out prompt and accuracy over all their pairs, each rank scoring its share."""
        loss, right, total = 0.0, 0, 0
        for items, counted in _eval_chunks(self.val_set):
            scores = self.scores(model, items, device)
            for s, (_, tiers) in zip(scores, items if counted else []):
                loss += float(self.loss_fn(s, tiers))
                r, t = pairwise_accuracy(s, tiers)
                right, total = right + r, total + t
        loss, right, total = distributed.sum_over_ranks([loss, right, total], device)
        return {"loss": loss / len(self.val_set), "accuracy": right / max(total, 1)}


class SignalRewardTask(_ScoredAnswersTask):
    """Pointwise: each answer's user-signal reward y in [-1, 1] is a soft label (y + 1) / 2 that the answer is
    good, and the loss is the binary cross-entropy of σ(r) against it.

    Why this loss: σ(r) is the probability the Bradley–Terry ranking loss already reads rewards as, so mixed
    with rankings both losses put rewards on one logit scale (a squared error would pin r to [-1, 1] while
    rankings pull it wider), and a neutral answer (y = 0) is taught r = 0. Accuracy is sign agreement, sign(r)
    = sign(y), over the answers whose reward is not 0.
    """

    def __init__(self, train_set: list[tuple], val_set: list[tuple], batch_size: int, seed: int, pad_id: int):
        super().__init__(train_set, val_set, batch_size, seed, pad_id, "signal-rewarded answers")

    @staticmethod
    def rows(items: list[tuple]) -> list[list[int]]:
        return [row for row, _ in items]

    def scores(self, model, items: list[tuple], device: str) -> torch.Tensor:
        return last_token_scores(model, self.rows(items), self.pad_id, device)

    @staticmethod
    def objective(scores: torch.Tensor, items: list[tuple]) -> dict:
        rewards = torch.tensor([reward for _, reward in items], device=scores.device)
        loss = F.binary_cross_entropy_with_logits(scores.float(), (rewards + 1) / 2)
        signed = rewards != 0
        agree = (scores.detach() > 0) == (rewards > 0)
        return {"loss": loss, "accuracy": int((agree & signed).sum()) / max(int(signed.sum()), 1)}

    @torch.no_grad()
    def eval_loss(self, model, device: str) -> dict:
        """Loss and sign agreement over the held-out answers (weighted by answer, not by batch)."""
        loss, right, signed = 0.0, 0.0, 0
        for items, counted in _eval_chunks(self.val_set):
            out = self.objective(self.scores(model, items, device), items)
            if counted:
                count = sum(reward != 0 for _, reward in items)
                loss += float(out["loss"]) * len(items)
                right += out["accuracy"] * count
                signed += count
        loss, right, signed = distributed.sum_over_ranks([loss, right, signed], device)
        return {"loss": loss / len(self.val_set), "accuracy": right / max(signed, 1)}


class MixedRewardTask:
    """Rankings and signal rewards in every step, scored in one forward pass: the ranking loss +
    ``signal_weight`` × the pointwise loss. ``accuracy`` is the rankings' pairwise accuracy, ``signal_accuracy``
    the signals' sign agreement."""

    def __init__(self, rankings: RewardTask, signals: SignalRewardTask, signal_weight: float):
        self.rankings, self.signals, self.signal_weight = rankings, signals, signal_weight

    def batch(self, step: int, part: int, parts: int, device: str):
        (ranked, _), (rewarded, _) = (task.batch(step, part, parts, device) for task in (self.rankings, self.signals))
        return ranked, rewarded, device

    def combine(self, ranking: dict, signal: dict) -> dict:
        return {"loss": ranking["loss"] + self.signal_weight * signal["loss"], "accuracy": ranking["accuracy"],
                "ranking_loss": _value(ranking["loss"]), "signal_loss": _value(signal["loss"]),
                "signal_accuracy": signal["accuracy"]}

    def loss(self, model, batch) -> dict:
        ranked, rewarded, device = batch
        rows = self.rankings.rows(ranked) + self.signals.rows(rewarded)
        flat = last_token_scores(model, rows, self.rankings.pad_id, device)
        split = len(rows) - len(rewarded)
        ranking = self.rankings.objective(self.rankings.split(flat[:split], ranked), ranked)
        signal = self.signals.objective(flat[split:], rewarded)
        return {**self.combine(ranking, signal), "tokens": sum(len(r) for r in rows)}

    @torch.no_grad()
    def eval_loss(self, model, device: str) -> dict:
        return self.combine(self.rankings.eval_loss(model, device), self.signals.eval_loss(model, device))


EVAL_CHUNK = 8  # held-out items scored per forward pass


def _eval_chunks(items: list) -> list[tuple[list, bool]]:
    """This rank's chunks of ``items`` to score, and whether each counts (see ``distributed.eval_share``)."""
    return [(items[index * EVAL_CHUNK : (index + 1) * EVAL_CHUNK], counted)
            for index, counted in distributed.eval_share(-(-len(items) // EVAL_CHUNK))]


def _value(loss) -> float:
    """A loss as a number to log (training gives tensors with a graph, evaluation plain floats)."""
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


def load_signal_rewards(paths: list[str], tokenizer: Tokenizer, block_size: int, val_fraction: float,
                        seed: int) -> tuple[list[tuple], list[tuple]]:
    """(training, held-out) (token ids, reward) items of the answers in ``paths`` (``chatforge feedback export
    --as rewards`` files), split by a hash of each answer's prompt and completion (``answer_key``), so an answer
    stays on its side as files grow, whatever ids it was exported with, and copies of it are on one side."""
    split: dict[str, list[tuple]] = {"train": [], "val": []}
    for path in paths:
        records = read_signal_rewards(path)
        if not records:
            raise ChatforgeError(f"{path} holds no rewards")
        for r in records:
            (ids,) = encode_answers(r["prompt"], [r["completion"]], tokenizer, block_size)
            split[assign_split(answer_key(r), seed, val_fraction)].append((ids, r["reward"]))
    if not split["train"] or not split["val"]:
        raise ChatforgeError(
            f"{sum(map(len, split.values()))} signal-rewarded answers give {len(split['train'])} to train on and "
            f"{len(split['val'])} to hold out (signals_val_fraction {val_fraction}); both need some: export more "
            "feedback or change signals_val_fraction"
        )
    return split["train"], split["val"]


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
