"""Supervised fine-tuning: conversations read and batched with the loss on assistant tokens only, on the shared loop.

The `chatforge sft` stage (chatforge/stages/sft.py) runs it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from chatforge import io
from chatforge.chat_template import validate_messages
from chatforge.config import option
from chatforge.data.chat_batches import IGNORE, ChatBatches, encode_conversations
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.model.checkpoint import load_model, tokenizer_path
from chatforge.tokenizer import PAD, Tokenizer
from chatforge.train import distributed
from chatforge.train.loop import TrainConfig, lm_loss, train


@dataclass
class SFTTrainConfig(TrainConfig):
    # measured on the speedrun (depth-4 modern base, ~900 conversations of ~200 assistant tokens): held-out loss
    # 3.90 → 3.71 at step 200, then rising to 3.74 at 600 (with 750 conversations: best 3.73 at 100, 3.82 at 500);
    # Muon at 6e-3 overfit far worse (3.73 at 100 → 4.86 at 600), so SFT keeps AdamW
    steps: int = option(200, "optimizer steps: the schedule's length (max_minutes may fit it shorter)")
    batch_size: int = option(16, "conversations per optimizer step, summed over all processes")
    lr: float = option(1e-3, "peak learning rate, reached at the end of warm-up")
    min_lr: float = option(1e-4, "learning rate at the end of the decay")
    warmup_steps: int = option(20, "steps of linear warm-up from 0 to lr")
    eval_every: int = option(50, "steps between validation losses (0 = only at the start and the end)")
    ckpt_every: int = option(50, "steps between checkpoints (0 = only at the end)")
    max_minutes: float = option(4.0, "wall-time budget in minutes (0 = none)")


def read_conversations(path: Path) -> list[list[dict]]:
    """The ``messages`` of each line of an SFT JSONL file; errors name the file and line."""
    conversations = []
    for number, row in io.read_jsonl(path, "SFT data (run `chatforge sft-data` first, or set --data_dir)"):
        try:
            messages = row["messages"]
            validate_messages(messages)
        except (KeyError, TypeError, ChatforgeError) as exc:
            raise ChatforgeError(f"{path}:{number}: not a conversation with 'messages' ({exc})") from None
        conversations.append(messages)
    if not conversations:
        raise ChatforgeError(f"{path} holds no conversations")
    return conversations


class SFTTask:
    """Whole conversations in step-indexed batches; validation = mean loss per assistant token of the held-out set.

    The step's loss is the mean over every assistant token of the global batch, whatever the split into
    processes and micro-batches: a micro-batch's mean is weighted by its share of the step's tokens (the loop
    averages the parts equally), so 1 and N processes compute the same gradient.
    """

    def __init__(self, train_batches: ChatBatches, val_batches: ChatBatches, eval_batch_size: int):
        self.train_batches, self.val_batches, self.eval_batch_size = train_batches, val_batches, eval_batch_size

    def _step_tokens(self, step: int) -> int:
        """Assistant tokens (targets) in the whole global batch of ``step``."""
        return sum(sum(self.train_batches.encoded[i][1][1:]) for i in self.train_batches.order.indices(step))

    def batch(self, step: int, part: int, parts: int, device: str):
        x, y = self.train_batches.batch(step, part, parts, device)
        return x, y, parts / self._step_tokens(step)

    def loss(self, model, batch) -> dict:
        x, y, weight_per_token = batch
        out = lm_loss(model, (x, y))
        tokens = int((y != IGNORE).sum())  # throughput in learned tokens, not padding
        out["loss"] = out["loss"] * (tokens * weight_per_token)
        out["tokens"] = tokens
        return out

    @torch.no_grad()
    def eval_loss(self, model, device: str) -> float:
        """Summed over every held-out assistant token, each rank computing its share of the batches."""
        total, count = 0.0, 0
        for index, counted in distributed.eval_share(self.val_batches.eval_batch_count(self.eval_batch_size)):
            x, y = self.val_batches.eval_batch(index, self.eval_batch_size, device)
            logits, _ = model(x)
            if counted:
                total += float(
                    F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
                )
                count += int((y != IGNORE).sum())
        total, count = distributed.sum_over_ranks([total, count], device)
        return total / max(count, 1)


def fine_tune_on_conversations(
    stage: str,
    cfg,
    train_conversations: list[list[dict]],
    val_conversations: list[list[dict]],
    meta: dict | None = None,
) -> dict:
    """Fine-tune ``cfg.init_from`` on whole conversations, loss on assistant tokens; the SFT stage and the edit
    stage both run through here. ``cfg`` needs init_from, out_dir, resume and train. Returns the loop's summary."""
    if not cfg.init_from:
        raise ConfigError(f"option 'init_from' is required: {stage} fine-tunes a pretrained model")
    model, info = load_model(cfg.init_from)
    tokenizer_file = tokenizer_path(cfg.init_from)
    tokenizer = Tokenizer.load(tokenizer_file)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ChatforgeError(
            f"{tokenizer_file} has {tokenizer.vocab_size} tokens but {cfg.init_from} only {model.config.vocab_size}"
        )
    block = model.config.block_size
    train_set = encode_conversations(train_conversations, tokenizer, block)
    val_set = encode_conversations(val_conversations, tokenizer, block)
    pad = tokenizer.special_id(PAD)
    task = SFTTask(
        ChatBatches(train_set, pad, cfg.train.batch_size, cfg.train.seed),
        ChatBatches(val_set, pad, 1),
        cfg.train.micro_batch_size or cfg.train.batch_size,
    )
    learned = sum(sum(mask) for _, mask in train_set)
    print(
        f"[{stage}] {len(train_set)} train conversations ({learned / 1e3:.0f}k assistant tokens), {len(val_set)} held "
        f"out; model from {info['path']}: {model.num_params() / 1e6:.2f}M parameters, context {block}"
    )
    device = distributed.init(cfg.train.device).device  # this rank's own GPU, not every rank on cuda:0
    base_val_loss = task.eval_loss(model.to(device).eval(), device)
    print(f"[{stage}] held-out assistant-token loss of the starting model: {base_val_loss:.4f}")
    model.train()
    meta = {
        "stage": stage,
        "init_from": str(info["path"]),
        "base_val_loss": round(base_val_loss, 4),
        "train_conversations": len(train_set),
        "val_conversations": len(val_set),
        **(meta or {}),
        "model": model.config.to_dict(),
        "stage_config": dataclasses.asdict(cfg),
    }
    summary = train(model, task, cfg.train, cfg.out_dir, resume=cfg.resume, meta=meta, tokenizer=tokenizer_file)
    if summary.get("final_val_loss") is not None:
        print(f"[{stage}] held-out assistant-token loss: base {base_val_loss:.4f} -> {summary['final_val_loss']:.4f}")
    return summary
