"""The fast decode path on both architectures: the static-shape step, batched prefill, counter-based sampling
streams, bf16/int8 inference copies and the compiled step."""

import dataclasses

import pytest
import torch
from test_model import CONFIGS, MODERN, TINY, randomized
from torch import nn

from chatforge import device
from chatforge.config import parse
from chatforge.errors import ChatforgeError
from chatforge.infer import precision, runner
from chatforge.infer.engine import Engine
from chatforge.infer.loading import EngineOptions
from chatforge.infer.params import SamplingParams
from chatforge.infer.precision import InferenceOptions, Int8Linear, inference_model
from chatforge.infer.runner import decode_step
from chatforge.infer.sampling import counter_uniforms
from chatforge.model import gpt
from chatforge.model.gpt import GPT, GPTConfig, batched_one_query_attention, one_query_attention
from chatforge.model.kv_cache import KVCache

PROMPTS = [[5, 17, 60, 3], [9], [44, 61, 2, 8, 30, 31, 7], [70, 70]]


def recomputed(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens by a full forward pass per token: no cache at all."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    return ids[len(prompt):]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


@CONFIGS
def test_batched_static_decode_equals_full_recompute(config):
    model = randomized(config)
    engine = Engine(model, max_batch_size=2)  # 4 prompts of different lengths through 2 slots: rows refill
    outs = engine.generate(PROMPTS, greedy(10))
    assert [o.choices[0].token_ids for o in outs] == [recomputed(model, p, 10) for p in PROMPTS]


@CONFIGS
def test_static_decode_step_matches_the_dynamic_cache_path(config):
    model = randomized(config)
    static, dynamic = KVCache.for_model(model, 2, 16), KVCache.for_model(model, 2, 16)
    prompts = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]])
    with torch.no_grad():
        for cache in (static, dynamic):
            model(prompts, kv_cache=cache)
            cache.lengths.copy_(torch.tensor([4, 2]))  # the second row's prompt was right-padded
        tokens = torch.tensor([11, 12])
        ours = decode_step(model, tokens, static, torch.ones(2, dtype=torch.long))
        theirs = model(tokens[:, None], kv_cache=dynamic)[0][:, -1]
    torch.testing.assert_close(ours, theirs)
    assert static.lengths.tolist() == [5, 3] == dynamic.lengths.tolist()


@CONFIGS
def test_a_bf16_decode_step_writes_and_reads_its_cache_like_a_full_forward(config):
    """Eager bf16 steps write an fp32 cache and attend in fp32: the logits of each step equal a full forward of the
    bf16 model over the whole sequence (up to bf16's own rounding), row by row."""
    model = inference_model(randomized(config), InferenceOptions(dtype="bf16"))
    rows = [[3, 4, 5, 6], [7, 8]]
    cache = KVCache.for_model(model, 2, 16)
    assert cache.k.dtype == torch.float32 and KVCache.for_model(model, 2, 16, compiled=True).k.dtype == torch.bfloat16
    with torch.no_grad():
        model(torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]]), kv_cache=cache)
        cache.lengths.copy_(torch.tensor([4, 2]))
        for token in (11, 12, 13):
            logits = decode_step(model, torch.tensor([token, token]), cache, torch.ones(2, dtype=torch.long))
            for row, ids in enumerate(rows):
                ids.append(token)
                full = model(torch.tensor([ids]))[0][0, -1]
                # bf16 rounds the two orders of summation apart by ~0.05 in a logit; a misplaced key moves it by ~1
                torch.testing.assert_close(logits[row].float(), full.float(), atol=0.15, rtol=0.05)


def test_prefill_groups_trade_padding_against_calls(monkeypatch):
    monkeypatch.setattr(runner, "PREFILL_CALL_POSITIONS", 32)
    assert runner.prefill_groups([]) == []
    assert runner.prefill_groups([7]) == [slice(0, 1)]
    assert runner.prefill_groups([10, 11, 12]) == [slice(0, 3)]  # a call costs more than 3 positions of padding
    assert runner.prefill_groups([3, 3, 3, 100]) == [slice(0, 3), slice(3, 4)]  # 291 padded positions saved
    lengths = sorted(torch.randint(8, 41, (64,), generator=torch.Generator().manual_seed(0)).tolist())
    groups = runner.prefill_groups(lengths)
    assert [g.start for g in groups[1:]] == [g.stop for g in groups[:-1]] and groups[-1].stop == 64
    padded = sum((g.stop - g.start) * lengths[g.stop - 1] for g in groups)
    assert padded + 32 * len(groups) < 64 * 40 + 32 and len(groups) > 1


def test_a_grouped_prefill_gives_each_prompt_its_tokens_alone(monkeypatch):
    monkeypatch.setattr(runner, "PREFILL_CALL_POSITIONS", 1)  # one group per distinct padded length
    model = randomized(dataclasses.replace(TINY, block_size=128))
    prompts = [[9], [44, 61, 2, 8, 30, 31, 7], list(range(1, 41)), [70, 70], [(3 * i) % 90 for i in range(70)]]
    calls = []
    real = runner.BatchRunner._prefill
    monkeypatch.setattr(runner.BatchRunner, "_prefill", lambda self, r, row: calls.append(len(r)) or real(self, r, row))
    together = Engine(model, max_batch_size=8).generate(prompts, greedy(5))
    assert len(calls) > 1  # the admitted prompts were prefilled in several groups
    assert [o.choices[0].token_ids for o in together] == [recomputed(model, p, 5) for p in prompts]


def test_an_inactive_slot_keeps_its_length():
    model = randomized(MODERN)
    cache = KVCache.for_model(model, 2, 8)
    with torch.no_grad():
        decode_step(model, torch.tensor([1, 2]), cache, torch.tensor([1, 0]))
    assert cache.lengths.tolist() == [1, 0]


def test_counter_uniforms_depend_only_on_the_row_and_look_uniform():
    keys = torch.randint(2**62, (20000,), generator=torch.Generator().manual_seed(0))
    u = counter_uniforms(keys, torch.zeros_like(keys))
    assert 0 <= float(u.min()) and float(u.max()) < 1
    # Kolmogorov-Smirnov against U(0, 1): 1.63 / sqrt(n) is the 1% critical value
    ks = (u.sort().values - torch.arange(1, 20001, dtype=torch.float64) / 20000).abs().max()
    assert ks < 1.63 / 20000**0.5
    along = counter_uniforms(torch.full((20000,), 12345), torch.arange(20000)).sort().values  # one row's stream
    assert (along - torch.arange(1, 20001, dtype=torch.float64) / 20000).abs().max() < 1.63 / 20000**0.5
    alone = counter_uniforms(keys[7:8], torch.tensor([3]))
    assert alone.item() == counter_uniforms(keys, torch.full_like(keys, 3))[7].item()
    assert counter_uniforms(keys[:1], torch.tensor([1])).item() != u[0].item()  # the stream moves on


def test_seeded_samples_do_not_depend_on_the_rest_of_the_batch():
    model = randomized(MODERN)
    engine = Engine(model, max_batch_size=4)
    params = SamplingParams(max_tokens=8, seed=11, temperature=1.0, ignore_eos=True)
    alone = engine.generate([PROMPTS[0]], params)[0].choices[0].token_ids
    crowd = engine.generate(PROMPTS[1:] + [PROMPTS[0]], [SamplingParams(max_tokens=5, seed=1)] * 3 + [params])
    assert crowd[-1].choices[0].token_ids == alone


def test_a_prompt_that_breaks_the_batched_prefill_fails_alone():
    model = randomized(MODERN)
    engine = Engine(model, max_batch_size=4)
    poison = 66

    def refuse(_, args):
        if args[0].size(1) > 1 and (args[0] == poison).any():  # a prefill holding the poison token
            raise RuntimeError("this prompt breaks the forward")

    expected = engine.generate([PROMPTS[0], PROMPTS[2]], greedy(5))
    hook = model.wte.register_forward_pre_hook(refuse)  # the prefill may skip forward() for hidden_states()
    try:
        runner = engine.new_runner()
        with engine.inference():
            good, bad, other = (runner.add(engine.prepare(p, dataclasses.replace(greedy(5), n=2)))
                                for p in (PROMPTS[0], [3, poison, 4], PROMPTS[2]))
            failures = []
            while runner.busy:
                runner.step()
                failures += runner.take_failures()
    finally:
        hook.remove()
    assert [(request, str(exc)) for request, exc in failures] == [(bad, "this prompt breaks the forward")]
    assert bad.completion is None and not runner.waiting
    for request, completion in ((good, expected[0]), (other, expected[1])):
        assert [c.token_ids for c in request.completion.choices] == [completion.choices[0].token_ids] * 2


def test_auto_dtype_is_bf16_wherever_the_cpu_has_it(monkeypatch):
    monkeypatch.setattr(device, "native_bf16", lambda kind: True)
    monkeypatch.setattr(device, "compile_supported", lambda kind: True)
    assert InferenceOptions(dtype="auto").torch_dtype("cpu") == torch.bfloat16
    assert InferenceOptions(dtype="auto", compile="true").torch_dtype("cpu") == torch.bfloat16
    assert InferenceOptions(dtype="fp32").torch_dtype("cpu") == torch.float32
    model = randomized(TINY)
    assert Engine(model, options=InferenceOptions(dtype="fp32")).model is model  # fp32: the model itself
    monkeypatch.setattr(device, "native_bf16", lambda kind: False)
    assert InferenceOptions(dtype="auto").torch_dtype("cpu") == torch.float32
    assert InferenceOptions(dtype="auto", compile="true").torch_dtype("cpu") == torch.float32


@pytest.mark.skipif(not device.native_bf16("cpu"), reason="needs a CPU with native bf16")
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_tokens_do_not_depend_on_the_rest_of_the_batch(threads):
    """In bf16 (the default on such CPUs) a request's greedy and seeded tokens are the same alone and among others
    of other lengths. Without padding prefills and the cache to multiples of POSITION_ALIGN, products of at least
    MIN_PRODUCT_ROWS rows (the MLP's 1536 -> 384 product sums one row in another order), on an AMX CPU products
    of at most gpt.INVARIANT_PRODUCT_ROWS rows, and, with two threads,
    one-query attention written out (SDPA's sums depend on the batch size there), rows differed."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8192, block_size=128, n_layer=4, n_head=6, n_embd=384)).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(8192, (int(n),), generator=generator).tolist()
               for n in torch.randint(3, 41, (16,), generator=generator)]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        engine = Engine(model, max_batch_size=16, options=InferenceOptions(dtype="bf16"))
        for params in (greedy(24), SamplingParams(max_tokens=24, seed=5, temperature=1.0, ignore_eos=True)):
            params = dataclasses.replace(params, logprobs=0)  # the chosen tokens' log-probs show any logit's last bit

            def seen(choice):
                return choice.token_ids, choice.token_logprobs

            alone = [seen(engine.generate([p], params)[0].choices[0]) for p in prompts]
            together = [seen(o.choices[0]) for o in engine.generate(prompts, params)]
            assert together == alone
    finally:
        torch.set_num_threads(before)


def test_inference_products_on_amx_multiply_at_most_32_rows_at_a_time(monkeypatch):
    """On an AMX CPU a bf16 inference product of many rows and a wide inner dimension is taken in even pieces of
    2-32 rows (where oneDNN sums each row alike: see gpt.INVARIANT_PRODUCT_ROWS); training products, fp32 ones and
    narrow ones stay one call."""
    monkeypatch.setattr(gpt, "amx_cpu", lambda: True)
    calls = []
    product = torch.nn.functional.linear

    def counted(x, weight, bias=None):
        calls.append(x.reshape(-1, x.size(-1)).size(0))
        return product(x, weight, bias)

    monkeypatch.setattr(gpt.F, "linear", counted)
    weight = torch.randn(96, 512).bfloat16()
    x = torch.randn(3, 33, 512).bfloat16()
    with torch.no_grad():
        y = gpt.linear(x, weight)
        assert calls == [25, 25, 25, 24]
        rows = x.reshape(99, 512)
        assert torch.equal(y.reshape(99, 96), torch.cat([product(rows[i:i + 25], weight) for i in (0, 25, 50)]
                                                        + [product(rows[75:], weight)]))
        calls.clear()
        gpt.linear(x.float(), weight.float())  # fp32
        gpt.linear(x[..., :384], weight[:, :384])  # narrow
    gpt.linear(x, weight.requires_grad_())  # training
    assert calls == [99, 99, 99]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("heads, kv_heads", [(6, 6), (6, 2)])
def test_one_query_attention_of_a_row_does_not_depend_on_the_batch(threads, heads, kv_heads):
    """An eager CPU decode step's attention gives a row bit-identical output alone, in 2 rows or in 16, also with
    two threads, where SDPA's kernel sums in an order that depends on the batch size (this check fails with SDPA
    there)."""

    class Cache:  # hands attend the cached keys and values, as KVCache.decode_view does
        def __init__(self, k, v, mask):
            self.k, self.v, self.mask = k, v, mask

        def update(self, layer, k, v):
            return self.k, self.v, self.mask

    torch.manual_seed(0)
    q = torch.randn(16, heads, 1, 64)
    k, v = torch.randn(16, kv_heads, 128, 64), torch.randn(16, kv_heads, 128, 64)
    mask = (torch.arange(128)[None, :] <= torch.randint(5, 100, (16,))[:, None])[:, None, None]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        full = gpt.attend(q, k[:, :, :1], v[:, :, :1], Cache(k, v, mask), 0, 0.0)
        for size in (1, 2):
            parts = [gpt.attend(q[i : i + size], k[i : i + size, :, :1], v[i : i + size, :, :1],
                                Cache(k[i : i + size], v[i : i + size], mask[i : i + size]), 0, 0.0)
                     for i in range(0, 16, size)]
            assert torch.equal(torch.cat(parts), full)
    finally:
        torch.set_num_threads(before)


def test_int8_linear_is_close_to_the_float_layer():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(5, 64)
    quantized = Int8Linear(linear)
    assert quantized.weight.dtype == torch.int8
    with torch.no_grad():
        error = (quantized(x) - linear(x)).abs().max() / linear(x).abs().max()
    assert error < 0.02


@CONFIGS
@pytest.mark.parametrize("dtype, quantize", [("bf16", "none"), ("fp32", "int8")])
def test_reduced_precision_copies_decode_like_fp32(config, dtype, quantize):
    model = randomized(config)
    engine = Engine(model, max_batch_size=4, options=InferenceOptions(dtype=dtype, quantize=quantize))
    assert engine.model is not model and next(model.parameters()).dtype == torch.float32  # the source is kept
    with torch.no_grad():
        ids = torch.tensor([PROMPTS[2]])
        ours, theirs = engine.model(ids)[0].float().softmax(-1), model(ids)[0].softmax(-1)
    assert (ours - theirs).abs().max() < 0.1  # close distributions; exact agreement is measured on real weights
    outs = engine.generate(PROMPTS, greedy(6))
    assert all(len(o.choices[0].token_ids) == 6 for o in outs)


def test_fp32_uses_the_model_itself_and_refresh_follows_new_weights():
    model = randomized(TINY)
    assert Engine(model).model is model
    engine = Engine(model, options=InferenceOptions(dtype="bf16"))
    before = engine.generate([PROMPTS[0]], greedy(6))[0].choices[0].token_ids
    with torch.no_grad():
        model.wte.weight.mul_(-1)  # PPO changed the weights
    engine.refresh()
    after = engine.generate([PROMPTS[0]], greedy(6))[0].choices[0].token_ids
    assert after != before and inference_model(model, InferenceOptions(dtype="fp32")) is model


def test_engine_options_come_from_the_command_line():
    cfg, _ = parse(EngineOptions, ["--dtype=bf16", "--quantize=int8"])
    assert dataclasses.asdict(cfg.inference()) == {"dtype": "bf16", "quantize": "int8", "compile": "false"}
    with pytest.raises(ChatforgeError, match="option 'dtype'"):
        parse(EngineOptions, ["--dtype=fp16"])
    with pytest.raises(ChatforgeError, match="option 'quantize'"):
        parse(EngineOptions, ["--quantize=int4"])


@pytest.mark.slow
@CONFIGS
def test_the_compiled_step_decodes_the_same_tokens(config, monkeypatch):
    """Compiled, a chunk of steps over rows that fill the cache runs as one call; it gives the eager tokens."""
    monkeypatch.setattr(runner, "CHUNK_STEPS", 2)  # the logic of any chunk length, in a graph quicker to compile
    model = randomized(config)
    compiled = Engine(model, max_batch_size=2, options=InferenceOptions(dtype="fp32", compile="true"))
    assert compiled._decode_chunk is not None
    eager = Engine(model, max_batch_size=2)
    assert _choices(compiled.generate(PROMPTS[:2], greedy(6))) == _choices(eager.generate(PROMPTS[:2], greedy(6)))


@pytest.mark.slow
def test_a_compiled_chunk_samples_and_stops_like_single_steps(monkeypatch):
    """The sampler runs inside a compiled chunk (temperature, penalties, logit bias, min_tokens, a stop token
    drawn mid-chunk) and draws the eager engine's tokens; a nucleus filter (it reads back to the host) steps one
    compiled step at a time, also with the eager tokens."""
    monkeypatch.setattr(runner, "CHUNK_STEPS", 4)
    model = randomized(MODERN)
    compiled = Engine(model, max_batch_size=1, options=InferenceOptions(dtype="fp32", compile="true"))
    eager = Engine(model, max_batch_size=1)
    sampled = SamplingParams(max_tokens=20, seed=6, temperature=0.9, min_tokens=3, repetition_penalty=1.2,
                             presence_penalty=0.3, logit_bias={3: 2.0}, stop_token_ids=list(range(0, 97, 6)))
    nucleus = SamplingParams(max_tokens=6, seed=3, top_p=0.8)
    for params in (sampled, nucleus):
        assert _choices(compiled.generate(PROMPTS[:1], params)) == _choices(eager.generate(PROMPTS[:1], params))
    stopped = eager.generate(PROMPTS[:1], sampled)[0].choices[0]
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) % 4 != 1  # it stopped inside a chunk


@pytest.mark.slow
def test_written_out_products_of_one_row_equal_the_library_matmuls(monkeypatch):
    """A compiled CPU step multiplies one row by each weight as multiply-and-sum (fp32, bf16 and int8 weights);
    it gives the library's product, to rounding."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 96)
    int8 = Int8Linear(layer)
    written, original = [], gpt.written_out_product

    def spy(x, weight):
        written.append(weight.dtype)
        return original(x, weight)

    monkeypatch.setattr(gpt, "written_out_product", spy)
    monkeypatch.setattr(precision, "written_out_product", spy)

    @torch.compile(fullgraph=True, dynamic=False)
    def products(x):
        return gpt.linear(x, layer.weight, layer.bias), gpt.linear(x.bfloat16(), layer.weight.bfloat16()), int8(x)

    x = torch.randn(1, 64)
    fp32, bf16, quantized = products(x)
    assert written == [torch.float32, torch.bfloat16, torch.int8]
    assert torch.allclose(fp32, nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)
    assert torch.allclose(bf16.float(), nn.functional.linear(x.bfloat16(), layer.weight.bfloat16()).float(), atol=2e-2)
    assert torch.allclose(quantized, int8(x), atol=2e-2)


def _choices(completions) -> list:
    return [[(c.token_ids, c.text, c.finish_reason, c.token_logprobs) for c in comp.choices] for comp in completions]


CHUNK_MIX = [
    greedy(9),
    SamplingParams(max_tokens=7, seed=5, temperature=0.9, top_k=30, repetition_penalty=1.2, logprobs=2),
    SamplingParams(max_tokens=11, seed=6, n=2, min_tokens=3, stop_token_ids=list(range(0, 97, 4))),
    SamplingParams(max_tokens=3, seed=7, frequency_penalty=0.5, ignore_eos=True),
]


@CONFIGS
def test_chunks_of_steps_give_the_tokens_of_single_steps(config, monkeypatch):
    """Several steps per host read (rows finishing by budget or by a stop token mid-chunk, rows refilled between
    chunks) give exactly the tokens, texts, finish reasons and log-probs of one step per host read."""
    model = randomized(config)
    engine = Engine(model, max_batch_size=3)
    chunked = engine.generate(PROMPTS, CHUNK_MIX)
    monkeypatch.setattr(runner, "CHUNK_STEPS", 1)
    single = engine.generate(PROMPTS, CHUNK_MIX)
    assert _choices(chunked) == _choices(single)
    stopped = [c for comp in chunked for c in comp.choices if c.finish_reason == "stop"]
    assert stopped and all(c.token_ids[-1] in CHUNK_MIX[2].stop_token_ids for c in stopped)


def test_a_seeded_request_ignores_companions_that_finish_mid_chunk():
    model = randomized(MODERN)
    engine = Engine(model, max_batch_size=4)
    params = SamplingParams(max_tokens=20, seed=11, temperature=1.0, ignore_eos=True)
    alone = engine.generate([PROMPTS[0]], params)[0].choices[0].token_ids
    # companions of 1, 2 and 5 tokens leave in the middle of the first chunks; rows move to fill their slots
    short = [SamplingParams(max_tokens=k, seed=k, ignore_eos=True) for k in (1, 2, 5)]
    crowd = engine.generate(PROMPTS[1:] + [PROMPTS[0]], short + [params])
    assert crowd[-1].choices[0].token_ids == alone


def test_a_stop_string_inside_a_chunk_ends_the_sample_at_its_token():
    model = randomized(TINY)
    decode = {t: bytes([97 + t % 26]) for t in range(TINY.vocab_size)}  # every token is one letter

    class Letters:
        vocab_size, specials = TINY.vocab_size, {}

        def decode_bytes(self, ids):
            return b"".join(decode[t] for t in ids)

    engine = Engine(model, Letters(), max_batch_size=2)
    full = engine.generate([PROMPTS[2]], greedy(12))[0].choices[0]
    stop = full.text[3:5]  # completed by the 5th token, in the middle of the first chunk
    first = full.text.index(stop)
    stopped = engine.generate([PROMPTS[2]], dataclasses.replace(greedy(12), stop=[stop]))[0].choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == full.text[:first]
    assert stopped.token_ids == full.token_ids[: first + len(stop)]  # nothing the chunk drew after the stop


@CONFIGS
def test_attention_over_the_occupied_part_of_the_cache_equals_the_whole(config):
    model = randomized(config)
    cache = KVCache.for_model(model, 2, 32)
    with torch.no_grad():
        model(torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]]), kv_cache=cache)
        cache.lengths.copy_(torch.tensor([4, 2]))
        tokens, active = torch.tensor([11, 12]), torch.ones(2, dtype=torch.long)
        whole = decode_step(model, tokens, cache, active)
        cache.lengths.sub_(1)
        part = decode_step(model, tokens, cache, active, visible=8)
    torch.testing.assert_close(part, whole)


def test_a_stream_shows_the_prefills_token_before_decoding_a_chunk():
    engine = Engine(randomized(MODERN), max_batch_size=2)
    deltas = list(engine.stream(PROMPTS[0], greedy(12)))
    assert [len(d.token_ids) for d in deltas] == [1, runner.CHUNK_STEPS, 11 - runner.CHUNK_STEPS]
    assert sum((d.token_ids for d in deltas), []) == recomputed(engine.model, PROMPTS[0], 12)


def test_a_waiting_request_ends_the_chunk_after_one_step_and_joins():
    """A request arriving mid-chunk (the scheduler's ``arrivals``) ends the chunk after the current step, is
    admitted next, and every answer is still what it would be alone."""
    engine = Engine(randomized(MODERN), max_batch_size=4)
    alone = [engine.generate([p], greedy(12))[0].choices[0].token_ids for p in PROMPTS[:2]]
    runner_ = engine.new_runner()
    with engine.inference():
        first = runner_.add(engine.prepare(PROMPTS[0], greedy(12)))
        runner_.admit()  # the prefill's token
        runner_.decode(arrivals=lambda: False)  # a whole chunk
        assert len(first.sequences[0].tokens) == 1 + runner.CHUNK_STEPS
        late = runner_.add(engine.prepare(PROMPTS[1], greedy(12)))
        runner_.decode(arrivals=lambda: bool(runner_.waiting))
        assert len(first.sequences[0].tokens) == 2 + runner.CHUNK_STEPS  # one step, then the late one's turn
        runner_.admit()
        assert len(late.sequences[0].tokens) == 1
        while runner_.busy:
            runner_.step()
    assert [first.completion.choices[0].token_ids, late.completion.choices[0].token_ids] == alone


@pytest.mark.parametrize("heads, kv_heads", [(2, 2), (4, 2), (6, 1)])
def test_one_query_attention_equals_sdpa(heads, kv_heads):
    """The attention of a compiled CPU decode step (written out) and of an eager one (batched products) equal SDPA,
    with grouped heads and a mask that leaves rows different lengths (one row sees only its first key)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, heads, 1, 16), torch.randn(3, kv_heads, 10, 16), torch.randn(3, kv_heads, 10, 16)
    mask = (torch.arange(10)[None, :] <= torch.tensor([3, 9, 0])[:, None])[:, None, None]
    gqa = heads != kv_heads
    for m in (mask, None):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=gqa)
        assert torch.allclose(one_query_attention(q, k, v, m), expected, atol=1e-6)
        assert torch.allclose(batched_one_query_attention(q, k, v, m), expected, atol=1e-6)


def test_a_decode_step_reads_the_positions_its_rows_need():
    """An eager step reads the next multiple of POSITION_ALIGN (a server's cache spans the whole context, so 72
    positions needed must not read 128), a compiled one the next of the few sizes it has graphs for, and neither
    reads past the cache."""
    assert runner.visible_positions(72, 256, compiled=False) == 96
    assert runner.visible_positions(72, 256, compiled=True) == 128
    assert runner.visible_positions(250, 256, compiled=False) == 256
    assert runner.visible_positions(33, 40, compiled=True) == 40
