"""pretrain a GPT by next-token prediction on the token shards.

    chatforge pretrain                                   # the speedrun default: a 7-minute budget picks the size
    chatforge pretrain --budget_minutes=30               # a bigger model for a longer budget
    chatforge pretrain --model.depth=6 --train.steps=2000 --budget_minutes=0 --out_dir=runs/d6
    chatforge pretrain --model.arch=gpt2 --model.preset=nano --train.optimizer=adamw   # the GPT-2 recipe
    chatforge pretrain --resume                          # continue exactly from out_dir's latest checkpoint
    torchrun --nproc_per_node=2 -m chatforge.cli pretrain  # the same run as 2 data-parallel processes

Reads ``tokenizer_dir``'s ``tokenizer.json`` and ``tokens/{train,val}.bin`` (written by ``chatforge tokenizer``)
and trains on random windows of ``block_size + 1`` tokens from the train shard (a pure function of the step,
so resumes are exact), with the validation loss on fixed windows of the val shard. Writes to ``out_dir``:
``checkpoints/`` (with a copy of the tokenizer), ``metrics.jsonl``, ``loss.png`` and ``summary.json``.
Any ``chatforge generate --ckpt=<out_dir>`` or ``checkpoint.load_model(out_dir)`` then uses the latest
checkpoint. ``init_from`` starts from other weights (a checkpoint, run directory or Hugging Face GPT-2
folder) instead of a random initialisation. The recipe (architecture, optimizers, schedule, the size dial
and the time budget) is described in ``chatforge.train.pretrain`` and the README.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from chatforge.config import nested, option
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.model.checkpoint import load_model
from chatforge.model.gpt import ARCHS, GPT, PRESETS
from chatforge.train import distributed
from chatforge.train.loop import train
from chatforge.train.pretrain import (
    ModelConfig,
    PretrainTask,
    PretrainTrainConfig,
    choose_shape,
    open_shards,
    scaled_lr,
)


@dataclass
class Config:
    tokenizer_dir: str = option("runs/speedrun/tokenizer", "the tokenizer stage's out_dir (tokenizer.json, tokens/)")
    out_dir: str = option("runs/speedrun/pretrain", "where checkpoints/, metrics.jsonl, loss.png, summary.json go")
    init_from: str = option(
        "", "start from these weights (checkpoint, run directory or HF GPT-2 folder) instead of random ones"
    )
    resume: bool = option(False, "continue from out_dir's latest checkpoint (exactly, including data order)")
    eval_batches: int = option(20, "validation batches per evaluation (of batch_size windows each)")
    budget_minutes: float = option(7.0, "time budget: sets train.max_minutes and, unless the options fix the size, "
                                        "picks the depth expected to give the lowest loss in it (0 = no budget)")
    model: ModelConfig = nested(ModelConfig, "the GPT (ignored with init_from, which brings its own shape)")
    train: PretrainTrainConfig = nested(PretrainTrainConfig, "the shared training loop")

    def validate(self) -> None:
        if self.model.preset and self.model.preset not in PRESETS:
            raise ConfigError(f"option 'model.preset' must be one of {', '.join(PRESETS)}; got {self.model.preset!r}")
        if self.model.arch and self.model.arch not in ARCHS:
            raise ConfigError(f"option 'model.arch' must be one of {', '.join(ARCHS)}; got {self.model.arch!r}")
        if self.eval_batches < 1:
            raise ConfigError(f"option 'eval_batches' must be >= 1; got {self.eval_batches}")
        if self.budget_minutes < 0:
            raise ConfigError(f"option 'budget_minutes' must be >= 0; got {self.budget_minutes}")
        if self.budget_minutes and not self.train.max_minutes:
            self.train.max_minutes = self.budget_minutes
        if not self.train.lr:
            block = self.model.block_size or PRESETS.get(self.model.preset, {}).get("block_size", 256)
            self.train.lr = scaled_lr(self.train.batch_size * block, self.train.optimizer)
        self.train.validate()


def run(cfg: Config, args: list[str]) -> None:
    cfg.validate()
    model = None
    if cfg.init_from:
        model, info = load_model(cfg.init_from)
        if cfg.model.arch and cfg.model.arch != model.config.arch:
            raise ChatforgeError(f"init_from {cfg.init_from} is arch={model.config.arch} (Hugging Face GPT-2 "
                                 f"checkpoints load only as arch=gpt2) and cannot become arch={cfg.model.arch}; drop "
                                 f"--model.arch or set --model.arch={model.config.arch}")
        model.train()
        origin = f"initialised from {info['path']}"
    block_size = model.config.block_size if model else cfg.model.build(vocab_size=1).block_size
    tokenizer_file, train_windows, val_windows = open_shards(cfg.tokenizer_dir, block_size, cfg.train.seed)
    if model is None:
        config, origin = choose_shape(cfg, train_windows.vocab_size, distributed.init(cfg.train.device).device)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every rerun
        # fsdp: built without storage; the loop initialises each rank's shards after sharding
        with torch.device("meta" if cfg.train.parallel == "fsdp" else "cpu"):
            model = GPT(config)
    elif model.config.vocab_size != train_windows.vocab_size:
        raise ChatforgeError(f"init_from {cfg.init_from} has a vocabulary of {model.config.vocab_size} tokens but "
                             f"the token shards use {train_windows.vocab_size}; pretrain with the tokenizer it was "
                             "trained with")
    shape = model.config
    print(f"[pretrain] model ({origin}): {shape.n_layer} layers, {shape.n_head} heads, {shape.n_embd} dims, context "
          f"{shape.block_size}, vocabulary {shape.vocab_size}: {model.num_params() / 1e6:.2f}M parameters")
    print(f"[pretrain] data: {train_windows.num_tokens / 1e6:.2f}M train tokens, "
          f"{val_windows.num_tokens / 1e6:.2f}M val tokens")
    # evaluation walks eval_batches * batch_size fixed windows in micro-batch sized chunks, so the validation set
    # is the same whatever the micro-batch size or the number of processes
    chunk = cfg.train.micro_batch_size or cfg.train.batch_size
    task = PretrainTask(train_windows, val_windows, cfg.train.batch_size,
                        cfg.eval_batches * cfg.train.batch_size // chunk, chunk)
    meta = {
        "stage": "pretrain",
        "preset": None if cfg.init_from else cfg.model.preset or None,
        "depth": None if cfg.init_from else shape.n_layer,
        "init_from": cfg.init_from or None,
        "block_size": shape.block_size,
        "train_tokens_available": train_windows.num_tokens,
        "model": shape.to_dict(),
        "stage_config": dataclasses.asdict(cfg),
    }
    train(model, task, cfg.train, cfg.out_dir, resume=cfg.resume, meta=meta, tokenizer=tokenizer_file)
