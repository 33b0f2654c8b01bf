"""The engine on a tiny random GPT and a tiny trained tokenizer: the KV cache, batching, seeds, stops,
streaming, context limits, log-probs, and continuous batching through the scheduler."""

import asyncio
import threading

import pytest
import torch
from torch import nn

from chatforge.errors import ChatforgeError
from chatforge.infer.engine import Engine
from chatforge.infer.params import SamplingParams
from chatforge.infer.scheduler import Scheduler
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.tokenizer import Tokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello there! 你好，世界 🙂", "A stop sign."] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.fixture()
def engine(model, tokenizer):
    return Engine(model, tokenizer, max_batch_size=3)


def greedy(max_tokens=12, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


PROMPTS = ["The quick", "Hello world, hello there!", "A", [5, 17, 200, 3, 9, 44, 61]]


def test_greedy_with_kv_cache_equals_full_recompute(engine, model, tokenizer):
    for prompt in PROMPTS:
        ids = engine.encode(prompt)
        expected = []
        with torch.no_grad():
            for _ in range(12):
                logits, _ = model(torch.tensor([ids + expected]))
                expected.append(int(logits[0, -1].argmax()))
        assert engine.generate([prompt], greedy())[0].choices[0].token_ids == expected


def test_temperature_zero_top_k_one_and_beam_width_one_all_equal_greedy(engine):
    for prompt in PROMPTS:
        base = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10))[0].choices[0].token_ids
        top1 = engine.generate([prompt], SamplingParams(top_k=1, seed=3, max_tokens=10))[0].choices[0].token_ids
        beam = engine.beam_search(prompt, width=1, max_tokens=10)[0].token_ids
        assert base == top1 == beam


MIXED = [
    greedy(),
    SamplingParams(max_tokens=12, seed=1, top_p=0.9, ignore_eos=True),
    SamplingParams(max_tokens=8, seed=2, temperature=0.7, top_k=20, repetition_penalty=1.3, presence_penalty=0.5,
                   frequency_penalty=0.3, logprobs=2),
    SamplingParams(max_tokens=10, seed=3, n=2, min_p=0.05, logit_bias={50: 5.0}, ignore_eos=True),
]


def _samples(completions):
    return [[(c.token_ids, c.text) for c in comp.choices] for comp in completions]


def test_a_batch_gives_the_same_results_as_one_by_one(engine):
    # 4 prompts x mixed settings = 5 sequences through 3 slots: sequences join as others finish
    batch = engine.generate(PROMPTS, MIXED)
    alone = [engine.generate([p], s)[0] for p, s in zip(PROMPTS, MIXED)]
    assert _samples(batch) == _samples(alone)
    assert [len(c.choices) for c in batch] == [1, 1, 1, 2]


def test_the_same_seed_gives_the_same_samples(engine):
    params = SamplingParams(max_tokens=15, seed=42, n=3, ignore_eos=True)
    first, again = engine.generate(["The quick"], params)[0], engine.generate(["The quick"], params)[0]
    other = engine.generate(["The quick"], SamplingParams(max_tokens=15, seed=43, n=3, ignore_eos=True))[0]
    assert _samples([first]) == _samples([again])
    assert _samples([first]) != _samples([other])
    assert len({tuple(c.token_ids) for c in first.choices}) == 3  # the n samples differ from each other


def test_a_stop_string_spanning_two_tokens_stops_and_is_cut(engine, tokenizer):
    full = engine.generate(["The quick"], greedy(20))[0].choices[0]
    pieces = [tokenizer.decode([t]) for t in full.token_ids]
    k = next(i for i in range(2, len(pieces) - 1) if pieces[i].isprintable() and pieces[i + 1].isprintable()
             and pieces[i] and pieces[i + 1])
    stop = pieces[k][-1] + pieces[k + 1][0]  # ends one token, starts the next
    text = "".join(pieces)
    stopped = engine.generate(["The quick"], greedy(20, stop=[stop]))[0].choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.index(stop)]
    assert len(stopped.token_ids) < len(full.token_ids)
    streamed = list(engine.stream("The quick", greedy(20, stop=[stop])))
    assert "".join(d.text for d in streamed) == stopped.text
    assert streamed[-1].finish_reason == "stop"


class PositionLM(nn.Module):
    """A "model" whose logits depend only on the absolute position: ``table[p]`` predicts the token after p."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.config = GPTConfig(vocab_size=table.size(1), block_size=table.size(0), n_layer=1, n_head=1, n_embd=1)
        self.table = nn.Parameter(table, requires_grad=False)

    def forward(self, idx, positions=None, kv_cache=None):
        T = idx.size(1)
        if positions is None:
            positions = kv_cache.positions(T) if kv_cache is not None else torch.arange(T)[None]
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.table[positions].expand(idx.size(0), -1, -1), None


def scripted(script: list[int], vocab_size: int) -> PositionLM:
    """Writes ``script`` after a one-token prompt, whatever it is fed."""
    table = torch.full((64, vocab_size), -10.0)
    table[torch.arange(len(script)), torch.tensor(script)] = 10.0
    return PositionLM(table)


def test_streaming_never_splits_a_character_nor_leaks_a_stop_prefix(tokenizer):
    byte_id = {b: tokenizer.token_bytes.index(bytes([b])) for b in range(256)}
    text = "你好🙂 ok STOP never"
    script = [byte_id[b] for b in text.encode()]  # after the one-token prompt, one byte per token
    engine = Engine(scripted(script, tokenizer.vocab_size), tokenizer)
    deltas = [d.text for d in engine.stream([0], greedy(30, stop=["STOP"]))]
    assert "".join(deltas) == "你好🙂 ok "
    assert all("\ufffd" not in d for d in deltas)
    assert not any("S" in d for d in deltas)
    assert deltas[0] == ""  # the prefill's token is the first of a character's three bytes: nothing to show


def test_stop_tokens_end_generation_and_add_no_text(tokenizer):
    end = tokenizer.special_id("<|end|>")
    script = tokenizer.encode("Hello") + [end] + tokenizer.encode(" more")
    engine = Engine(scripted(script, tokenizer.vocab_size), tokenizer)
    choice = engine.generate([[0]], SamplingParams(temperature=0.0, max_tokens=20))[0].choices[0]
    assert choice.text == "Hello" and choice.token_ids[-1] == end and choice.finish_reason == "stop"
    ignoring = engine.generate([[0]], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                                      skip_special_tokens=False))[0].choices[0]
    assert ignoring.text.startswith("Hello<|end|> more") and ignoring.finish_reason == "length"
    custom = engine.generate([[0]], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                                    stop_token_ids=[tokenizer.encode(" more")[0]]))[0].choices[0]
    assert custom.text == "Hello" and custom.finish_reason == "stop"


@pytest.mark.parametrize(
    "penalty, expected",
    [
        ({}, [0, 0, 0, 0, 0]),
        ({"presence_penalty": 1.5}, [0, 1, 0, 0, 0]),  # 3 - 1.5 still beats 2 - 1.5 and 1
        ({"frequency_penalty": 1.5}, [0, 1, 0, 2, 1]),  # each repeat costs another 1.5
        ({"repetition_penalty": 2.0}, [0, 1, 0, 0, 0]),  # 3 / 2 = 1.5 < 2, then 2 / 2 = 1 < 1.5
    ],
)
def test_penalties_steer_generation_as_defined(penalty, expected):
    engine = Engine(PositionLM(torch.tensor([3.0, 2.0, 1.0, 0.0]).repeat(64, 1)), tokenizer=None)
    params = SamplingParams(temperature=0.0, max_tokens=5, **penalty)
    assert engine.generate([[3]], params)[0].choices[0].token_ids == expected


def test_context_window_is_a_clear_error_or_left_truncation(engine):
    long_prompt = list(range(1, 61))
    with pytest.raises(ChatforgeError, match="exceeds the model's context of 64"):
        engine.generate([long_prompt], greedy(10))
    completion = engine.generate([long_prompt], greedy(10, truncate=True))[0]
    assert completion.prompt_ids == long_prompt[-54:] and len(completion.choices[0].token_ids) == 10
    until_full = engine.generate(["The quick"], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True))[0]
    assert len(until_full.prompt_ids) + len(until_full.choices[0].token_ids) == 64


def test_invalid_requests_are_rejected_before_decoding(engine):
    with pytest.raises(ChatforgeError, match="temperature"):
        engine.generate(["x"], SamplingParams(temperature=-1))
    with pytest.raises(ChatforgeError, match="logit_bias: token id 9999"):
        engine.generate(["x"], SamplingParams(logit_bias={9999: 1.0}))
    with pytest.raises(ChatforgeError, match="prompt: token id -3"):
        engine.generate([[1, -3]], greedy())


def test_logprobs_are_the_models_and_agree_with_scoring(engine, model):
    prompt = engine.encode("Hello world")
    params = SamplingParams(max_tokens=8, seed=5, logprobs=3, echo=True, ignore_eos=True)
    completion = engine.generate([prompt], params)[0]
    choice = completion.choices[0]
    # PPO's need: the log-probs returned while sampling equal a fresh scoring pass of the same tokens
    scored = engine.score(prompt, choice.token_ids)
    assert choice.token_logprobs == pytest.approx(scored, abs=1e-4)
    assert choice.cumulative_logprob == pytest.approx(sum(scored), abs=1e-3)
    with torch.no_grad():
        logp = model(torch.tensor([prompt + choice.token_ids]))[0][0].log_softmax(-1)
    top = choice.logprobs[0].top
    assert [t for t, _ in top] == logp[len(prompt) - 1].topk(3).indices.tolist()
    assert completion.prompt_logprobs[0] is None
    assert [lp.logprob for lp in completion.prompt_logprobs[1:]] == pytest.approx(
        engine.score(prompt[:1], prompt[1:]), abs=1e-4
    )


def test_generation_leaves_a_training_model_in_training_mode(engine, model):
    model.train()
    try:
        engine.generate(["The quick"], greedy(3))
        assert model.training and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    finally:
        model.eval()


def test_score_batch_matches_one_pair_at_a_time(engine):
    pairs = [("The quick", " brown fox"), ([1, 2, 3, 4, 5, 6], [7]), ("A", " stop sign.")]
    assert engine.score_batch(pairs) == [pytest.approx(engine.score(p, c), abs=1e-5) for p, c in pairs]


def test_best_of_keeps_the_sample_with_the_highest_mean_logprob(engine):
    drawn = engine.generate(["The"], SamplingParams(max_tokens=6, seed=9, n=4, logprobs=0))[0].choices
    best = engine.generate(["The"], SamplingParams(max_tokens=6, seed=9, n=1, best_of=4))[0].choices
    means = [c.cumulative_logprob / len(c.token_ids) for c in drawn]
    assert len(best) == 1 and best[0].token_ids == drawn[means.index(max(means))].token_ids


# ---- continuous batching -------------------------------------------------------------------------------------

REQUESTS = [
    ("The quick", greedy(12)),
    ("Hello", greedy(5)),
    ("A stop", greedy(9)),
    ([7, 8, 9], greedy(14)),
    ("brown fox", greedy(3)),
    ("The lazy dog", greedy(11)),
    ("Hello there", SamplingParams(max_tokens=10, seed=4, n=2, ignore_eos=True)),
]


def test_requests_from_several_threads_complete_as_if_run_alone(engine):
    alone = [engine.generate([p], s)[0] for p, s in REQUESTS]
    results = [None] * len(REQUESTS)
    with Scheduler(engine, max_batch_size=3) as scheduler:

        def client(indices):
            for i in indices:  # each client submits its next request while the others' still run
                results[i] = scheduler.submit(*REQUESTS[i]).result(timeout=60)

        threads = [threading.Thread(target=client, args=(range(k, len(REQUESTS), 3),)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert scheduler.stats()["active"] == 0
    assert _samples(results) == _samples(alone)


def test_a_cancelled_request_frees_its_slot(engine):
    with Scheduler(engine, max_batch_size=1) as scheduler:
        hog = scheduler.submit("The quick", SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True))
        first = next(iter(hog))  # it is decoding in the only slot
        waiting = scheduler.submit("Hello", greedy(4))
        assert scheduler.stats()["active"] == 1
        hog.cancel()
        done = waiting.result(timeout=60)  # could never run if the slot stayed taken
        assert hog.result(timeout=60).choices[0].finish_reason == "cancelled"
        assert len(hog.completion.choices[0].token_ids) < 60
        assert done.choices[0].token_ids == engine.generate(["Hello"], greedy(4))[0].choices[0].token_ids
        assert first.token_ids
        assert scheduler.stats() == {"active": 0, "waiting": 0, "slots": 1}


def test_async_iteration_streams_the_same_deltas(engine):
    expected = [d.text for d in engine.stream("The quick", greedy(10))]

    async def consume(scheduler):
        return [d.text async for d in scheduler.submit("The quick", greedy(10))]

    with Scheduler(engine) as scheduler:
        assert asyncio.run(consume(scheduler)) == expected


def test_leaving_a_stream_early_cancels_the_request(engine):
    with Scheduler(engine, max_batch_size=1) as scheduler:
        handle = scheduler.submit("The quick", SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True))
        for _ in handle:
            break
        assert scheduler.submit("Hello", greedy(3)).result(timeout=60).choices[0].finish_reason == "length"


def test_a_failing_step_fails_its_requests_but_not_the_scheduler(engine, monkeypatch):
    with Scheduler(engine, max_batch_size=2) as scheduler:
        runner_class = type(scheduler._runner)
        real_decode = runner_class.decode
        monkeypatch.setattr(runner_class, "decode",
                            lambda self, arrivals=None: (_ for _ in ()).throw(RuntimeError("device lost")))
        with pytest.raises(RuntimeError, match="device lost"):
            scheduler.submit("Hello", greedy(3)).result(timeout=60)
        monkeypatch.setattr(runner_class, "decode", real_decode)
        assert scheduler.submit("Hello", greedy(3)).result(timeout=60).choices[0].finish_reason == "length"
