"""The OpenAI-compatible API, driven over HTTP on localhost by the official `openai` client, unchanged."""

from __future__ import annotations

import json
import math
import time

import httpx
import numpy as np
import openai
import pytest
import torch
from serve_helpers import MODEL, tiny_engine

from chatforge.chat_template import edit_messages, prompt_ids, stop_token_ids
from chatforge.data.fim import middle_params
from chatforge.infer.params import SamplingParams
from chatforge.infer.scheduler import Scheduler
from chatforge.serve.api import ServeOptions, create_app
from chatforge.serve.server import BackgroundServer

KEY = "sk-test-key"
HELLO = [{"role": "user", "content": "Hello world"}]
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(block_size=128, max_batch_size=4)


@pytest.fixture(scope="module")
def scheduler(engine):
    with Scheduler(engine) as scheduler:
        yield scheduler


def _server(scheduler, **options):
    return BackgroundServer(create_app(scheduler, ServeOptions(model_name=MODEL, api_keys=[KEY], **options)))


@pytest.fixture(scope="module")
def server(scheduler):
    with _server(scheduler, max_request_bytes=64_000) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def _engine_answer(engine, messages, **params):
    ids = prompt_ids(messages, engine.tokenizer)
    settings = SamplingParams(stop_token_ids=stop_token_ids(engine.tokenizer), **params)
    return ids, engine.generate([ids], settings)[0]


def test_models_lists_the_served_model(client, engine):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert card.context_length == engine.block_size and card.fim is False
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_answer_is_the_engines_greedy_answer_through_the_chat_template(client, engine):
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    ids, expected = _engine_answer(engine, HELLO, max_tokens=8, temperature=0)
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.choices[0].text
    assert reply.choices[0].finish_reason == expected.choices[0].finish_reason
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == len(expected.choices[0].token_ids)


def test_streamed_chat_equals_the_whole_answer_and_ends_with_done(client, server):
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed, not one blob
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    raw = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": MODEL, "messages": HELLO, "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.endswith("data: [DONE]\n\n")


def test_n_seeded_samples_are_distinct_choices_and_reproducible(client):
    def ask():
        return client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=1.0, n=3, seed=7)

    first, again = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert len(set(texts)) > 1
    assert texts == [c.message.content for c in again.choices]


def test_chat_logprobs_are_the_models(client, engine):
    reply = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0, logprobs=True,
                                           top_logprobs=3)
    _, expected = _engine_answer(engine, HELLO, max_tokens=6, temperature=0, logprobs=3)
    entries = reply.choices[0].logprobs.content
    visible = [lp for lp in expected.choices[0].logprobs if lp.token_id not in engine.special_ids]
    assert len(entries) == len(visible) > 0
    for got, want in zip(entries, visible):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert len(got.top_logprobs) == 3
        assert got.top_logprobs[0].logprob >= got.logprob - 1e-6  # greedy picks the most likely token


def test_completion_echo_and_logprobs_match_scoring(client, engine):
    reply = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=5, temperature=0, logprobs=2,
                                      echo=True)
    choice = reply.choices[0]
    assert choice.text.startswith("Hello world")
    lp = choice.logprobs
    prompt = engine.tokenizer.encode("Hello world")
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    generated = engine.generate([prompt], SamplingParams(max_tokens=5, temperature=0))[0].choices[0].token_ids
    generated = [t for t in generated if t not in engine.special_ids]
    scored = engine.score(prompt, generated)
    assert lp.token_logprobs[len(prompt):] == pytest.approx(scored, abs=1e-4)
    assert lp.token_logprobs[1:len(prompt)] == pytest.approx(engine.score(prompt[:1], prompt[1:]), abs=1e-4)


def test_completion_batch_of_prompts_streams_every_choice(client):
    chunks = list(client.completions.create(model=MODEL, prompt=["Hello", "The quick"], n=2, max_tokens=4,
                                            temperature=1.0, seed=1, stream=True))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert set(finished) == {0, 1, 2, 3}


def test_best_of_returns_n_choices(client):
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, best_of=3, n=2, temperature=1.0,
                                      seed=3)
    assert [c.index for c in reply.choices] == [0, 1]


def _error(excinfo, status: int) -> dict:
    assert excinfo.value.status_code == status
    assert set(excinfo.value.body) == ERROR_FIELDS  # OpenAI's error shape, which the client unpacked
    return excinfo.value.body


@pytest.mark.parametrize("overrides, status, param, code", [
    ({"model": "gpt-4"}, 404, "model", "model_not_found"),
    ({"max_tokens": "ten"}, 400, "max_tokens", "invalid_type"),
    ({"temperature": "hot"}, 400, "temperature", "invalid_type"),
    ({"temperature": 5}, 400, "temperature", "invalid_value"),
    ({"n": 1.5}, 400, "n", "invalid_type"),
    ({"stream": 1}, 400, "stream", "invalid_type"),
    ({"max_tokens": 100_000}, 400, "max_tokens", "max_tokens_exceeded"),
    ({"messages": [{"role": "user", "content": "hello " * 300}]}, 400, "messages", "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 126}, 400, "messages", "context_length_exceeded"),
    ({"messages": []}, 400, "messages", "invalid_value"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]}, 400, "messages", None),
    ({"messages": [{"role": "user"}]}, 400, "messages.0.content", "missing_required_parameter"),
    ({"logit_bias": {"999999": 5}}, 400, "logit_bias", None),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({"n": 1000}, 400, "n", None),
    ({"extra_body": {"response_format": {"type": "json_object"}}}, 400, "response_format", "unknown_parameter"),
    ({"extra_body": {"tools": [{"type": "function"}]}}, 400, "tools.0.function", "missing_required_parameter"),
])
def test_bad_chat_requests_are_4xx_in_openai_shape(client, overrides, status, param, code):
    request = {"model": MODEL, "messages": HELLO, "max_tokens": 4, **overrides}
    with pytest.raises(openai.APIStatusError) as excinfo:
        client.chat.completions.create(**request)
    body = _error(excinfo, status)
    assert body["param"] == param and body["code"] == code and body["message"]


def test_legacy_edit_is_the_chat_models_answer_to_the_edit_template(server, engine):
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "input": "Helo wrld", "instruction": "Fix the spelling.", "max_tokens": 6, "temperature": 0}
    reply = httpx.post(server.url + "/v1/edits", json=body, headers=auth).json()
    ids, expected = _engine_answer(engine, edit_messages("Fix the spelling.", "Helo wrld"), max_tokens=6, temperature=0)
    assert reply["object"] == "edit" and reply["choices"][0]["text"] == expected.choices[0].text
    assert reply["usage"]["prompt_tokens"] == len(ids)
    empty = httpx.post(server.url + "/v1/edits", json={**body, "instruction": "  "}, headers=auth)
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "instruction"


def test_bad_completion_and_embedding_requests(client):
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.completions.create(model=MODEL, prompt="def f(", suffix="return x", max_tokens=4)
    assert _error(excinfo, 400)["code"] == "suffix_not_supported"
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.completions.create(model=MODEL, prompt=[299, 100_000], max_tokens=4)
    assert "outside the vocabulary" in _error(excinfo, 400)["message"]
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.completions.create(model=MODEL, prompt="hi", best_of=3, stream=True)
    assert _error(excinfo, 400)["param"] == "best_of"
    with pytest.raises(openai.BadRequestError) as excinfo:
        client.embeddings.create(model=MODEL, input="hello")
    assert "no embedding model" in _error(excinfo, 400)["message"]


def test_malformed_json_oversized_body_and_unknown_route(client, server):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body, code in ((b'{"model": ', "invalid_json"), (b"[1, 2]", "invalid_body"), (b"", "invalid_body")):
        response = httpx.post(server.url + "/v1/chat/completions", content=body, headers=auth)
        assert response.status_code == 400 and response.json()["error"]["code"] == code
    with pytest.raises(openai.APIStatusError) as excinfo:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 100_000}])
    assert _error(excinfo, 413)["code"] == "request_too_large"
    response = httpx.get(server.url + "/v1/nothing", headers=auth)
    assert response.status_code == 404 and set(response.json()["error"]) == ERROR_FIELDS


def test_api_keys_are_required(server):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as excinfo:
        wrong.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert _error(excinfo, 401)["code"] == "invalid_api_key"
    response = httpx.get(server.url + "/v1/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_rate_limit_per_key(scheduler):
    with _server(scheduler, rate_limit=3) as limited:
        client = openai.OpenAI(base_url=limited.url + "/v1", api_key=KEY, max_retries=0)
        for _ in range(3):
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
        with pytest.raises(openai.RateLimitError) as excinfo:
            client.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
        assert _error(excinfo, 429)["code"] == "rate_limit_exceeded"
        assert int(excinfo.value.response.headers["retry-after"]) >= 1


def test_rate_limiter_refills_and_forgets_idle_clients(monkeypatch):
    from chatforge.serve import security
    from chatforge.serve.errors import APIError

    now = [0.0]
    limiter = security.RateLimiter(2, clock=lambda: now[0])
    limiter.take("a")
    limiter.take("a")
    with pytest.raises(APIError) as excinfo:
        limiter.take("a")
    assert excinfo.value.status == 429 and excinfo.value.headers == {"Retry-After": "30"}
    now[0] += 30  # one request's worth refilled
    limiter.take("a")
    monkeypatch.setattr(security, "MAX_TRACKED_CLIENTS", 3)
    for client in "bcd":
        limiter.take(client)
    now[0] += 120
    limiter.take("e")
    assert list(limiter._buckets) == ["e"]


@pytest.fixture
def slow_requests(engine, scheduler, monkeypatch):
    """Handles of the requests submitted meanwhile, with every decode step slowed so a request outlives its
    client by far."""
    handles = []
    submit = scheduler.submit

    def recording_submit(*args, **kwargs):
        handles.append(submit(*args, **kwargs))
        return handles[-1]

    monkeypatch.setattr(scheduler, "submit", recording_submit)
    hook = engine.model.register_forward_hook(lambda *_: time.sleep(0.02))
    yield handles
    hook.remove()


def _wait_cancelled(handle, scheduler, max_tokens: int) -> None:
    completion = handle.result(timeout=10)
    assert completion.choices[0].finish_reason == "cancelled"
    assert len(completion.choices[0].token_ids) < max_tokens
    deadline = time.monotonic() + 5
    while scheduler.stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.stats()["active"] == 0


def test_stream_client_disconnect_frees_the_slot(client, scheduler, slow_requests):
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100, stream=True,
                                            extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices[0].delta.content:
            break
    stream.close()
    (handle,) = slow_requests
    _wait_cancelled(handle, scheduler, 100)


def test_waiting_client_disconnect_cancels_the_request(server, scheduler, slow_requests):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", timeout=0.3, headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": MODEL, "prompt": "Hello", "max_tokens": 100, "ignore_eos": True})
    (handle,) = slow_requests
    _wait_cancelled(handle, scheduler, 100)


def test_openapi_spec_is_served(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        assert path in spec["paths"]
    assert "ChatCompletionRequest" in spec["components"]["schemas"]


def test_insertion_with_a_fim_model_and_embeddings_with_an_embedding_model(scheduler, engine):
    from chatforge.embed.model import ChatforgeEmbedder, EmbeddingModel, EmbedSpec
    from chatforge.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=engine.tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))
    embedder = ChatforgeEmbedder(EmbeddingModel(gpt).eval(), engine.tokenizer, EmbedSpec(), name="tiny-embed")
    app = create_app(scheduler, ServeOptions(model_name=MODEL, fim=True), embedder=embedder)
    with BackgroundServer(app) as fim_server:
        client = openai.OpenAI(base_url=fim_server.url + "/v1", api_key="unused", max_retries=0)
        assert {m.id: m.kind for m in client.models.list().data} == {MODEL: "chat", "tiny-embed": "embedding"}
        middle = client.completions.create(model=MODEL, prompt="def f(x):", suffix="    return y", max_tokens=5,
                                           temperature=0)
        pre, suf, mid = (engine.tokenizer.special_id(t) for t in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"))
        ids = [pre] + engine.tokenizer.encode("def f(x):") + [suf] + engine.tokenizer.encode("    return y") + [mid]
        params = middle_params(engine.tokenizer, SamplingParams(max_tokens=5, temperature=0))
        expected = engine.generate([ids], params)[0]
        assert middle.choices[0].text == expected.choices[0].text
        assert middle.usage.prompt_tokens == len(ids)

        texts = ["Hello world", "def f(x): return x + 1"]
        vectors = client.embeddings.create(model="tiny-embed", input=texts)  # the client asks for base64
        floats = client.embeddings.create(model="tiny-embed", input=texts, encoding_format="float")
        want = embedder.embed(texts)
        for got in (vectors, floats):
            array = np.array([d.embedding for d in got.data])
            assert array.shape == want.shape and np.allclose(array, want, atol=1e-5)
            assert math.isclose(float(np.linalg.norm(array[0])), 1.0, abs_tol=1e-4)
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="tiny-embed", input="x", dimensions=3)
        with pytest.raises(openai.BadRequestError):
            client.embeddings.create(model="tiny-embed", input="")


def test_serve_command_serves_a_checkpoint(tmp_path, engine, capsys):
    import socket
    import subprocess
    import sys

    from chatforge.cli import main
    from chatforge.model.hf import export_hf_gpt2

    export_hf_gpt2(engine.model, tmp_path / "tiny-ckpt")
    engine.tokenizer.save(tmp_path / "tok")
    (tmp_path / "keys.txt").write_text(f"\n{KEY}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chatforge.cli",
            "serve",
            f"--ckpt={tmp_path / 'tiny-ckpt'}",
            f"--tokenizer={tmp_path / 'tok'}",
            "--device=cpu",
            f"--port={port}",
            f"--run_dir={tmp_path / 'run'}",
            f"--api_keys_file={tmp_path / 'keys.txt'}",
            "--log_level=warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                models = client.models.list().data
                break
            except openai.APIConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, "chatforge serve did not start"
                time.sleep(0.2)
        assert [m.id for m in models] == ["tiny-ckpt"]
        reply = client.chat.completions.create(model="tiny-ckpt", messages=HELLO, max_tokens=5, temperature=0)
        assert (
            reply.choices[0].message.content
            == _engine_answer(engine, HELLO, max_tokens=5, temperature=0)[1].choices[0].text
        )
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    assert "serving 'tiny-ckpt'" in output and "API keys on" in output
    assert (tmp_path / "run" / "feedback.db").is_file()
    with pytest.raises(SystemExit):
        main(["serve", "--compare_k=3"])
    assert "compare_k" in capsys.readouterr().err


def _scripted_turns(monkeypatch, engine, turns: list):
    """Replace the model's turns in the server's tool loop by scripted ones (a dict is a tool call)."""
    import json as _json

    from chatforge.infer.outputs import Choice, Completion
    from chatforge.serve import chat

    script = list(turns)
    tok = engine.tokenizer

    def generate(self, prompts, params):
        turn = script.pop(0)
        ids = (
            ([tok.special_id("<|tool_call|>")] + tok.encode(_json.dumps(turn)))
            if isinstance(turn, dict)
            else tok.encode(turn)
        )
        ids.append(tok.special_id("<|end|>"))
        done = [Completion(prompts[0], [Choice(0, tok.decode(ids), ids, "stop")])]
        self.completions += done
        return done

    monkeypatch.setattr(chat.ScheduledTurns, "generate", generate)
    return script


LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Find a person.",
        "parameters": {"type": "object", "properties": {"name": {"type": "string"}}},
    },
}


def test_client_tools_end_in_tool_calls_and_the_result_is_sent_back(client, engine, monkeypatch):
    _scripted_turns(monkeypatch, engine, [{"name": "lookup", "arguments": {"name": "Ada"}}, "Ada was a mathematician."])
    first = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Who was Ada?"}], tools=[LOOKUP], temperature=0
    )
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "lookup"
    assert json.loads(call.function.arguments) == {"name": "Ada"} and call.id.startswith("call_")
    second = client.chat.completions.create(
        model=MODEL,
        tools=[LOOKUP],
        temperature=0,
        messages=[
            {"role": "user", "content": "Who was Ada?"},
            first.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": "Ada Lovelace, 1815-1852, mathematician"},
        ],
    )
    assert second.choices[0].message.content == "Ada was a mathematician." and second.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HELLO, tools=[LOOKUP], n=2)


def test_built_in_calculator_runs_on_the_server(scheduler, engine, monkeypatch):
    _scripted_turns(monkeypatch, engine, [{"name": "calculator", "arguments": {"expression": "12 * 7"}}, "It is 84."])
    with _server(scheduler, tools=["calculator"]) as server:
        reply = httpx.post(
            server.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": MODEL, "messages": [{"role": "user", "content": "12 times 7?"}]},
        ).json()
    assert reply["choices"][0]["message"]["content"] == "It is 84."
    assert reply["tool_runs"] == [{"name": "calculator", "arguments": {"expression": "12 * 7"}, "result": "84"}]


def test_streamed_tool_calls_assemble_in_the_openai_stream_helper(client, engine, monkeypatch):
    _scripted_turns(monkeypatch, engine, [{"name": "lookup", "arguments": {"name": "Ada"}}])
    with client.beta.chat.completions.stream(
        model=MODEL, messages=[{"role": "user", "content": "Who was Ada?"}], tools=[LOOKUP], temperature=0
    ) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in final.message.tool_calls] == [
        ("lookup", {"name": "Ada"})
    ]


def test_an_answer_written_after_a_tool_call_goes_through_the_output_filters(scheduler, engine, monkeypatch, tmp_path):
    _scripted_turns(
        monkeypatch, engine, [{"name": "calculator", "arguments": {"expression": "12 * 7"}}, "It is 84, you idiot."]
    )
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"categories": {"insults": {"words": ["idiot"], "action": "refuse"}}}))
    with _server(scheduler, tools=["calculator"], safety_policy=str(policy)) as server:
        reply = httpx.post(
            server.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": MODEL, "messages": [{"role": "user", "content": "12 times 7?"}]},
        ).json()
    choice = reply["choices"][0]
    assert (
        choice["finish_reason"] == "content_filter" and not choice["message"]["content"]
    )  # a short answer is held back whole


def test_tool_results_shown_to_users_go_through_the_output_filters(scheduler, engine, monkeypatch, tmp_path):
    _scripted_turns(monkeypatch, engine, [{"name": "calculator", "arguments": {"expression": "12 * 7"}}, "Done."])
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"categories": {"numbers": {"regexes": ["84"], "action": "redact"}}}))
    with _server(scheduler, tools=["calculator"], safety_policy=str(policy)) as server:
        reply = httpx.post(
            server.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": MODEL, "messages": [{"role": "user", "content": "12 times 7?"}]},
        ).json()
    (run,) = reply["tool_runs"]
    assert "84" not in run["result"] and "[numbers]" in run["result"]
