"""Beam search on hand-built bigram "models" whose probabilities are set by hand."""

import math

import pytest
import torch
from torch import nn

from chatforge.errors import ChatforgeError
from chatforge.infer.engine import Engine
from chatforge.infer.params import SamplingParams
from chatforge.model.gpt import GPTConfig


class BigramLM(nn.Module):
    """P(next | previous token) from a table; speaks the engine's forward/kv_cache protocol."""

    def __init__(self, table: dict[int, dict[int, float]], vocab_size: int):
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab_size, block_size=32, n_layer=1, n_head=1, n_embd=1)
        logits = torch.full((vocab_size, vocab_size), -50.0)  # unlisted transitions: probability ~0
        for prev, nexts in table.items():
            for token, p in nexts.items():
                logits[prev, token] = math.log(p)
        self.table = nn.Parameter(logits, requires_grad=False)

    def forward(self, idx, positions=None, kv_cache=None):
        if kv_cache is not None:
            kv_cache.positions(idx.size(1))
            kv_cache.advance(idx.size(1))
        return self.table[idx], None


S, A, B, C, D, END = range(6)
# greedy takes A (0.6) then C (0.55): 0.33; the best sequence starts with the less likely B: 0.4 * 0.9 = 0.36
GARDEN_PATH = {S: {A: 0.6, B: 0.4}, A: {C: 0.55, D: 0.45}, B: {C: 0.9, D: 0.1}, C: {END: 1.0}, D: {END: 1.0}}


@pytest.fixture()
def garden():
    return Engine(BigramLM(GARDEN_PATH, 6), tokenizer=None)


def test_beam_search_finds_the_most_likely_sequence_that_greedy_misses(garden):
    greedy = garden.generate([[S]], SamplingParams(temperature=0.0, max_tokens=5, stop_token_ids=[END]))[0]
    assert greedy.choices[0].token_ids == [A, C, END]
    beams = garden.beam_search([S], width=2, max_tokens=5, n=2, stop_token_ids=[END])
    assert [b.token_ids for b in beams] == [[B, C, END], [A, C, END]]
    assert [b.logprob for b in beams] == pytest.approx([math.log(0.36), math.log(0.33)], abs=1e-5)
    assert beams[0].score == pytest.approx(math.log(0.36) / 3, abs=1e-5) and beams[0].finished


def test_beam_width_one_is_greedy(garden):
    assert garden.beam_search([S], width=1, max_tokens=5, stop_token_ids=[END])[0].token_ids == [A, C, END]
    # a runner-up stop is not considered once the one beam is taken, even if it would outscore the greedy path
    runner_up_stop = Engine(BigramLM({S: {A: 0.6, END: 0.4}, A: {B: 0.5, C: 0.5}, B: {END: 1.0}}, 6), tokenizer=None)
    beam = runner_up_stop.beam_search([S], width=1, max_tokens=5, length_penalty=0.0, stop_token_ids=[END])
    assert beam[0].token_ids == [A, B, END]


# [END]: log .37 = -0.99 over 1 token; [A, END]: -1.37 over 2; [A, B, END]: -1.5 over 3 (-0.5 per token)
LENGTHS = {S: {END: 0.37, A: 0.63}, A: {B: 0.595, END: 0.405}, B: {END: 0.595, A: 0.405}}


@pytest.mark.parametrize(
    "length_penalty, early_stopping, best",
    # early stopping ends once two hypotheses are finished, before [A, B, END] is reached
    [(0.0, False, [END]), (1.0, False, [A, B, END]), (1.0, True, [A, END])],
)
def test_length_penalty_and_early_stopping(length_penalty, early_stopping, best):
    engine = Engine(BigramLM(LENGTHS, 6), tokenizer=None)
    beams = engine.beam_search([S], width=2, max_tokens=8, length_penalty=length_penalty,
                               early_stopping=early_stopping, n=2, stop_token_ids=[END])
    assert beams[0].token_ids == best
    assert beams[0].score >= beams[1].score
    assert all(b.score == pytest.approx(b.logprob / len(b.token_ids) ** length_penalty) for b in beams)


def test_beams_that_run_out_of_tokens_are_returned_unfinished(garden):
    beams = garden.beam_search([S], width=2, max_tokens=2, n=2, stop_token_ids=[END])
    assert [b.token_ids for b in beams] == [[B, C], [A, C]] and not any(b.finished for b in beams)


def test_bad_beam_settings_are_named(garden):
    with pytest.raises(ChatforgeError, match="n <= width"):
        garden.beam_search([S], width=2, n=3)
