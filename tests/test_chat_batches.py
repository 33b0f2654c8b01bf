"""Conversation batches for SFT: assistant-only targets, padding, step-determinism, rank shares."""

from __future__ import annotations

import pytest
import torch

from chatforge.chat_template import render
from chatforge.data.chat_batches import IGNORE, ChatBatches, EpochOrder, encode_conversations
from chatforge.errors import ChatforgeError
from chatforge.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["Hello there, how are you? Fine thanks, and you?"] * 10, vocab_size=300)


def conv(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_targets_are_the_assistant_tokens_only(tok):
    messages = conv("Hello there", "Fine thanks") + [{"role": "user", "content": "and you?"},
                                                     {"role": "assistant", "content": "how are you"}]
    encoded = encode_conversations([messages, conv("how", "are you and you")], tok, block_size=64)
    batches = ChatBatches(encoded, pad_id=tok.special_id("<|pad|>"), batch_size=2)
    x, y = batches.rows(torch.tensor([0, 1]).numpy(), "cpu")
    chat = render(messages, tok)
    assert x[0, : len(chat.ids) - 1].tolist() == chat.ids[:-1]
    learned = [t for t in y[0].tolist() if t != IGNORE]
    assert learned == [t for t, m in zip(chat.ids, chat.loss_mask) if m]
    assert (x[1, len(encoded[1][0]) - 1 :] == tok.special_id("<|pad|>")).all()  # the shorter row is padded
    assert (y[1, len(encoded[1][0]) - 1 :] == IGNORE).all()


def test_conversations_without_an_answer_in_the_window_are_left_out(tok):
    long_question = conv("Hello there " * 40, "Fine")
    assert encode_conversations([long_question], tok, block_size=16) == []
    with pytest.raises(ChatforgeError, match="no conversation"):
        ChatBatches([], pad_id=0, batch_size=1)


def test_batches_depend_only_on_the_step_and_split_across_ranks():
    order = EpochOrder(10, batch_size=4, seed=1)
    epoch = list(order.indices(0)) + list(order.indices(1))
    assert len(set(epoch)) == 8
    again = EpochOrder(10, batch_size=4, seed=1)
    assert list(again.indices(7)) == list(order.indices(7))
    assert list(again.indices(3, 0, 2)) + list(again.indices(3, 1, 2)) == list(order.indices(3))
    with pytest.raises(ChatforgeError, match="only 3 items"):
        EpochOrder(3, batch_size=4)
