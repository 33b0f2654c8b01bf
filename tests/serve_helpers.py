"""A tiny chat-capable model (trained tokenizer with the chat specials, random GPT) shared by the serving tests."""

from __future__ import annotations

import torch

from chatforge.infer.engine import Engine
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.tokenizer import Tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello there!", "def f(x): return x + 1"] * 4
MODEL = "tiny-chat"


def tiny_engine(block_size: int = 64, max_batch_size: int = 4, seed: int = 0) -> Engine:
    tokenizer = Tokenizer.train(TEXTS, vocab_size=300)
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32)
    return Engine(GPT(config).eval(), tokenizer, max_batch_size=max_batch_size)
