"""Logits processors on hand-set distributions, the sampler, settings validation and the streaming detokenizer."""

import math

import pytest
import torch

from chatforge.errors import ChatforgeError
from chatforge.infer.detokenizer import IncrementalDetokenizer, held_back
from chatforge.infer.params import SamplingParams
from chatforge.infer.sampling import (
    BatchSampler,
    SamplingRow,
    apply_penalties,
    filter_logits,
    greedy_tokens,
    sample_from,
)

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def _kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row > float("-inf")).flatten().tolist() for row in logits]


def _filter(rows: int, top_k=0, top_p=1.0, min_p=0.0):
    logits = PROBS.log().repeat(rows, 1)
    def per_row(v, dtype=torch.float32):
        return torch.tensor(v if isinstance(v, list) else [v] * rows, dtype=dtype)
    return filter_logits(logits, per_row(top_k, torch.long), per_row(top_p), per_row(min_p))


def test_top_p_keeps_exactly_the_nucleus_per_row():
    # nucleus = smallest most-likely set reaching top_p: 0.5 | 0.5+0.3=0.8 | 0.95 | 1.0
    kept = _kept(_filter(5, top_p=[0.4, 0.75, 0.81, 0.96, 1.0]))
    assert kept == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3]]


def test_top_p_boundary_a_nucleus_that_reaches_top_p_exactly_is_complete():
    logits = torch.tensor([0.5, 0.25, 0.125, 0.125]).log()[None]  # exact in binary: cumulative 0.5, 0.75
    def one(v, dtype=torch.float32):
        return torch.tensor([v], dtype=dtype)
    assert _kept(filter_logits(logits, one(0, torch.long), one(0.75), one(0.0))) == [[0, 1]]


def test_top_p_renormalises_the_nucleus():
    probs = _filter(1, top_p=0.75).softmax(-1)[0]
    assert torch.allclose(probs, torch.tensor([0.5 / 0.8, 0.3 / 0.8, 0, 0]), atol=1e-6)


def test_top_k_and_min_p():
    assert _kept(_filter(3, top_k=[1, 2, 0])) == [[0], [0, 1], [0, 1, 2, 3]]
    # min_p=0.35 -> keep p >= 0.175; min_p=0.2 -> keep p >= 0.1
    assert _kept(_filter(2, min_p=[0.35, 0.2])) == [[0, 1], [0, 1, 2]]


def test_penalties_follow_openai_and_ctrl_definitions():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])
    prompt_mask = torch.tensor([[True, False, False, False, False]])  # token 0 in the prompt
    counts = torch.tensor([[0.0, 2.0, 1.0, 0.0, 0.0]])  # token 1 generated twice, token 2 once
    def one(v):
        return torch.tensor([v])
    rep = apply_penalties(logits, prompt_mask, counts, one(2.0), one(0.0), one(0.0))
    assert rep.tolist() == [[1.0, -2.0, 0.25, 3.0, 1.0]]  # positive / 2, negative * 2, unseen unchanged
    presence = apply_penalties(logits, prompt_mask, counts, one(1.0), one(0.5), one(0.0))
    assert presence.tolist() == [[2.0, -1.5, 0.0, 3.0, 1.0]]  # once per generated token, prompt-only token untouched
    frequency = apply_penalties(logits, prompt_mask, counts, one(1.0), one(0.0), one(0.25))
    assert frequency.tolist() == [[2.0, -1.5, 0.25, 3.0, 1.0]]  # count * 0.25


def test_inverse_cdf_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).repeat(5, 1)
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    assert sample_from(probs, u).tolist() == [1, 1, 3, 3, 3]


def _rows(params: SamplingParams, count: int, seed: int) -> list[SamplingRow]:
    return [SamplingRow(params, torch.Generator().manual_seed(seed + i), [0], []) for i in range(count)]


def test_temperature_sampling_follows_the_tempered_distribution():
    sampler = BatchSampler(4, torch.device("cpu"))
    sampler.add_rows(_rows(SamplingParams(temperature=2.0), 20000, seed=0))
    tokens = sampler.sample(PROBS.log().repeat(20000, 1)).tokens
    freq = torch.bincount(tokens, minlength=4).float() / 20000
    expected = PROBS.sqrt() / PROBS.sqrt().sum()  # p ** (1 / T), renormalised
    assert (freq - expected).abs().max() < 0.015
    assert (freq - PROBS).abs().max() > 0.05  # and clearly not the untempered distribution


def test_greedy_rows_and_sampled_rows_share_a_batch():
    sampler = BatchSampler(4, torch.device("cpu"))
    sampler.add_rows(_rows(SamplingParams(temperature=0.0), 1, 0) + _rows(SamplingParams(top_k=1), 1, 0)
                     + _rows(SamplingParams(min_p=0.9, logit_bias={3: 100}), 1, 0))
    step = sampler.sample(PROBS.log().repeat(3, 1))
    assert step.tokens.tolist() == [0, 0, 3]  # the bias makes token 3 dominant; min_p then keeps it alone


@pytest.mark.parametrize("vocab", [8192, 50257, 8191, 40])  # 8191 is prime: no block width divides it
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_are_argmax_with_its_ties_infinities_and_nans(vocab, dtype):
    torch.manual_seed(vocab)
    x = torch.randn(9, vocab + 3).to(dtype)[:, :vocab]  # a column slice, as the engine's padded vocabulary gives
    x[1, 7] = x[1, vocab - 1] = x[1, 30] = 50  # a tie: the first maximum wins, as argmax's
    x[2] = float("-inf")
    x[3, 5:] = float("-inf")
    x[4, vocab // 2] = x[4, vocab - 2] = float("nan")
    x[5, :] = x[5, 0]  # every logit equal
    x[6, vocab - 1] = float("inf")
    x[7] = x[7].round()  # many ties, in every block
    assert torch.equal(greedy_tokens(x), x.argmax(-1))


def test_min_tokens_suppresses_stop_tokens_until_reached():
    sampler = BatchSampler(4, torch.device("cpu"))
    sampler.add_rows([SamplingRow(SamplingParams(temperature=0.0, min_tokens=2), None, [1], stop_ids=[0])])
    logits = PROBS.log()[None]
    first = sampler.sample(logits).tokens
    sampler.observe(first)
    second = sampler.sample(logits).tokens
    sampler.observe(second)
    assert first.tolist() == [1] and second.tolist() == [1] and sampler.sample(logits).tokens.tolist() == [0]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n must be"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"logit_bias": {"5": 200}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"stop": [""]}, "stop"),
        ({"temperature": "hot"}, "temperature"),
        ({"temprature": 0.5}, "unknown sampling parameter.*temprature"),
    ],
)
def test_invalid_settings_are_named(values, message):
    with pytest.raises(ChatforgeError, match=message):
        SamplingParams.from_dict(values)


def test_from_dict_normalises_json_shaped_values():
    params = SamplingParams.from_dict({"stop": "\n", "logit_bias": {"7": -100}, "temperature": 1})
    assert params.stop == ["\n"] and params.logit_bias == {7: -100.0}


# ---- detokenizer -------------------------------------------------------------------------------------------

# token id -> bytes: "你" (e4 bd a0) split across two tokens, "🙂" (f0 9f 99 82) one byte per token
PIECES = [b"Hi ", b"\xe4", b"\xbd\xa0", b"\xf0", b"\x9f", b"\x99", b"\x82", b" ST", b"OP", b"ARS", b" end"]


def _detok(stop=()):
    return IncrementalDetokenizer(lambda ids: b"".join(PIECES[i] for i in ids), stop)


def _stream(detok, ids):
    deltas = []
    for i in ids:
        detok.add(i)
        deltas.append(detok.delta())
        if detok.stopped:
            break
    detok.finish()
    deltas.append(detok.delta())
    return deltas


def test_stream_never_splits_a_multibyte_character():
    deltas = _stream(_detok(), range(7))
    assert deltas == ["Hi ", "", "你", "", "", "", "🙂", ""]
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_spanning_tokens_is_cut_and_never_leaked():
    detok = _detok(stop=["STOP"])
    deltas = _stream(detok, [0, 7, 8, 10])
    assert detok.stopped and detok.text == "Hi  "
    assert "".join(deltas) == "Hi  " and not any("ST" in d for d in deltas)


def test_held_back_prefix_is_released_when_it_does_not_become_a_stop():
    detok = _detok(stop=["STOP"])
    deltas = _stream(detok, [0, 7, 9, 10])
    assert deltas[1] == " "  # "ST" might start "STOP": held back (and later the "S" of "STARS")
    assert deltas[2] == "STAR" and deltas[3] == "S end" and "".join(deltas) == "Hi  STARS end" and not detok.stopped


def test_unfinished_character_at_the_end_becomes_a_replacement_char():
    deltas = _stream(_detok(), [0, 3, 4])
    assert "".join(deltas) == "Hi \ufffd"


def test_held_back_is_the_longest_stop_prefix():
    assert held_back("abc S", ["STOP", "xy"]) == 1
    assert held_back("abc ST", ["STOP", "T"]) == 2
    assert held_back("abc", ["STOP"]) == 0
    assert math.isclose(held_back("aaa", ["aaab"]), 3)


@pytest.mark.parametrize("settings", [
    dict(top_p=0.9), dict(top_p=0.3, min_p=0.05), dict(top_k=5), dict(top_k=40, top_p=0.99), dict(min_p=0.2),
    dict(top_k=100, top_p=0.5), dict(top_p=0.999999),
])
def test_filtering_among_the_likeliest_tokens_equals_sorting_the_vocabulary(settings, monkeypatch):
    """Rows whose kept tokens lie among the first candidates are decided there; the others (a nucleus or a
    top-k reaching past them) fall back to the full sort: either way the same tokens survive."""
    from chatforge.infer import sampling

    torch.manual_seed(0)
    flat_to_peaked = torch.randn(6, 500) * torch.tensor([0.5, 1, 2, 4, 8, 16])[:, None]
    batches = [flat_to_peaked, flat_to_peaked[3:]]  # with rows that need the full sort, and (mostly) without

    def per_row(rows, name, default, dtype=torch.float32):
        return torch.full((rows,), settings.get(name, default), dtype=dtype)

    def filtered(logits):
        rows = len(logits)
        return _kept(filter_logits(logits, per_row(rows, "top_k", 0, torch.long), per_row(rows, "top_p", 1.0),
                                   per_row(rows, "min_p", 0.0)))
    fast = [filtered(logits) for logits in batches]
    monkeypatch.setattr(sampling, "FILTER_CANDIDATES", 10_000)  # more than the vocabulary: always the full sort
    assert fast == [filtered(logits) for logits in batches]
