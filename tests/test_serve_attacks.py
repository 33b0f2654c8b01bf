"""The server tried as a hostile client would (issue 20): one request never hurts another user's, the
keyless server stays local, filters cover every path, slow or abandoned requests cost nothing for long, and
errors are clean 4xx/5xx that say nothing of the server's internals."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import httpx
import pytest
from serve_helpers import MODEL, tiny_engine

from chatforge.cli import main
from chatforge.infer.params import SamplingParams
from chatforge.infer.scheduler import Scheduler
from chatforge.serve.api import ServeOptions, create_app
from chatforge.serve.feedback import FeedbackStore
from chatforge.serve.server import BackgroundServer

HELLO = [{"role": "user", "content": "Hello world"}]
KEY = "sk-attack-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(block_size=128, max_batch_size=4)


@pytest.fixture(scope="module")
def scheduler(engine):
    with Scheduler(engine) as scheduler:
        yield scheduler


@pytest.fixture
def slow(engine):
    hook = engine.model.register_forward_hook(lambda *_: time.sleep(0.01))
    yield
    hook.remove()


def _server(scheduler, store=None, **options):
    return BackgroundServer(create_app(scheduler, ServeOptions(model_name=MODEL, **options), store=store))


def _stream(url: str, out: dict, headers=None, **body) -> None:
    """Read a whole streamed chat completion into out (its text, finish reason and any error event)."""
    request = {"model": MODEL, "messages": HELLO, "max_tokens": 60, "stream": True, "ignore_eos": True,
               "temperature": 0, **body}
    with httpx.stream("POST", url + "/v1/chat/completions", json=request, headers=headers, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["error"] = chunk["error"]
                for choice in chunk.get("choices", []):
                    out["text"] = out.get("text", "") + (choice["delta"].get("content") or "")
                    out["finish"] = choice["finish_reason"] or out.get("finish")


HOSTILE = [
    ({"top_k": 2**63}, "top_k"),
    ({"top_k": 100_000}, "top_k"),  # in range for the schema, above this vocabulary
    ({"logit_bias": {"99999999": 5}}, "logit_bias"),
    ({"logit_bias": {"5": 1e30}}, "logit_bias"),
    ({"logit_bias": {"-1": 5}}, "logit_bias"),
    ({"seed": 2**70}, "seed"),
    ({"presence_penalty": 1e308}, "presence_penalty"),
    ({"repetition_penalty": 1e308}, "repetition_penalty"),
    ({"temperature": 1e-300}, None),  # tiny but valid: decoded greedily instead of overflowing the logits
    ({"stop": ["x" * 5000]}, "stop"),
    ({"min_tokens": 2**40}, "min_tokens"),
    ({"n": 2**62}, "n"),
]


def test_hostile_values_are_refused_while_another_stream_completes(scheduler, engine, slow):
    with _server(scheduler) as server:
        expected = {}
        _stream(server.url, expected)
        other: dict = {}
        thread = threading.Thread(target=_stream, args=(server.url, other))
        thread.start()
        for values, param in HOSTILE:
            reply = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                               json={"model": MODEL, "messages": HELLO, "max_tokens": 4, **values})
            if param is None:
                assert reply.status_code == 200, reply.text
            else:
                assert reply.status_code == 400 and reply.json()["error"]["param"] == param, (values, reply.text)
        thread.join(60)
    assert other == expected and other["finish"] == "length" and "error" not in other


def test_a_request_that_fails_inside_the_batch_fails_alone(engine):
    """Defence in depth: a value that slipped past every check fails its own request, not the batch."""
    with Scheduler(engine) as scheduler:
        hook = engine.model.register_forward_hook(lambda *_: time.sleep(0.01))
        try:
            other = scheduler.submit("Hello", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
            hostile = SamplingParams(max_tokens=4)
            real_prepare = engine.prepare
            prepared = real_prepare("Hi", hostile)
            prepared.params.top_k = 2**63  # as if validation had missed it
            engine.prepare = lambda *a, **k: prepared
            try:
                bad = scheduler.submit("Hi", hostile)
            finally:
                del engine.prepare
            with pytest.raises(ValueError, match="Overflow"):
                bad.result(timeout=60)
            completion = other.result(timeout=60)
        finally:
            hook.remove()
    assert completion.choices[0].finish_reason == "length" and len(completion.choices[0].token_ids) == 40


def test_keyless_server_answers_only_local_hosts_and_keeps_browsers_apart(scheduler, tmp_path):
    store = FeedbackStore(tmp_path / "feedback.db")
    with _server(scheduler, store=store) as server:
        rebound = httpx.get(server.url + "/feedback/conversations", headers={"Host": "evil.example:8000"})
        assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "host_not_allowed"
        alice, bob = httpx.Client(base_url=server.url), httpx.Client(base_url=server.url)
        conv = alice.post("/feedback/conversations", json={"title": "alice's"}).json()
        assert [c["id"] for c in alice.get("/feedback/conversations").json()["data"]] == [conv["id"]]
        assert bob.get("/feedback/conversations").json()["data"] == []
        assert bob.get(f"/feedback/conversations/{conv['id']}").status_code == 404
        page = alice.get("/")
        for header in ("content-security-policy", "x-content-type-options", "x-frame-options"):
            assert header in page.headers
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
    with _server(scheduler, allowed_hosts=["chat.example"]) as server:
        assert httpx.get(server.url + "/health", headers={"Host": "chat.example"}).status_code == 200
    store.close()


def test_serve_refuses_an_exposed_keyless_address_and_a_bad_port(capsys):
    for args, message in ((["--host=0.0.0.0"], "without API keys"), (["--port=70000"], "1..65535"),
                          (["--port=0"], "1..65535")):
        with pytest.raises(SystemExit):
            main(["serve", "--ckpt=/nonexistent", *args])
        assert message in capsys.readouterr().err
    from chatforge.serve.server import check_listen

    check_listen("0.0.0.0", 8000, keyed=False, insecure=True)
    check_listen("0.0.0.0", 8000, keyed=True, insecure=False)
    check_listen("::1", 8000, keyed=False, insecure=False)


def test_filters_cover_edits_token_prompts_and_logprobs(scheduler, engine, tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"categories": {"insults": {"words": ["idiot"], "action": "refuse"}}}))
    with _server(scheduler, safety_policy=str(policy)) as server:
        edit = httpx.post(server.url + "/v1/edits", json={"model": MODEL, "input": "you idiot",
                                                          "instruction": "Fix it.", "max_tokens": 4})
        assert edit.status_code == 400 and edit.json()["error"]["code"] == "content_filter"
        ids = engine.tokenizer.encode("you idiot")
        by_ids = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": ids, "max_tokens": 4})
        assert by_ids.status_code == 400 and by_ids.json()["error"]["code"] == "content_filter"
        for path, body in (("/v1/chat/completions", {"messages": HELLO, "logprobs": True}),
                           ("/v1/completions", {"prompt": "Hello", "logprobs": 2})):
            reply = httpx.post(server.url + path, json={"model": MODEL, "max_tokens": 4, **body})
            assert reply.status_code == 400 and reply.json()["error"]["param"] == "logprobs"
        fine = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": ids[:1], "max_tokens": 2})
        assert fine.status_code == 200


LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}


def test_tool_requests_are_cancelled_by_disconnect_and_deadline(scheduler, engine):
    long_turn = {"model": MODEL, "messages": HELLO, "tools": [LOOKUP], "max_tokens": 40, "ignore_eos": True}
    hook = engine.model.register_forward_hook(lambda *_: time.sleep(0.05))  # a 40-token turn takes 2 s or more
    with hook, _server(scheduler) as server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json=long_turn, timeout=0.3)
        deadline = time.monotonic() + 5
        while scheduler.stats()["active"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert scheduler.stats()["active"] == 0  # the abandoned tool turn was cancelled, not decoded to the end
    hook = engine.model.register_forward_hook(lambda *_: time.sleep(0.05))
    with hook, _server(scheduler, request_timeout=0.3) as server:
        late = httpx.post(server.url + "/v1/chat/completions", json=long_turn, timeout=30)
        assert late.status_code == 504 and late.json()["error"]["code"] == "timeout"
        plain = {k: v for k, v in long_turn.items() if k != "tools"}
        assert httpx.post(server.url + "/v1/chat/completions", json=plain, timeout=30).status_code == 504
        streamed: dict = {}
        _stream(server.url, streamed, max_tokens=40)
        assert streamed["error"]["code"] == "timeout" and streamed.get("finish") is None
    deadline = time.monotonic() + 5
    while scheduler.stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert scheduler.stats()["active"] == 0  # every request past its deadline was cancelled


def test_admission_counts_sequences_tokens_and_running_requests(scheduler, engine, slow, monkeypatch):
    with _server(scheduler, max_waiting=8) as server:
        monkeypatch.setattr(scheduler, "stats", lambda: {"active": 4, "waiting": 5, "slots": 4})
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
        assert httpx.post(server.url + "/v1/completions", json={**body, "n": 4}).status_code == 503  # 5 + 4 > 8
        two_prompts = {**body, "prompt": ["a", "b"], "n": 2}
        assert httpx.post(server.url + "/v1/completions", json=two_prompts).status_code == 503
        monkeypatch.undo()
    with _server(scheduler, api_keys=[KEY], token_rate_limit=100) as server:
        first = httpx.post(server.url + "/v1/completions", headers=AUTH,
                           json={"model": MODEL, "prompt": "Hi", "max_tokens": 30, "n": 2})
        assert first.status_code == 200
        second = httpx.post(server.url + "/v1/completions", headers=AUTH,
                            json={"model": MODEL, "prompt": "Hi", "max_tokens": 30, "n": 2})
        assert second.status_code == 429 and "tokens per minute" in second.json()["error"]["message"]
    with _server(scheduler, api_keys=[KEY], max_concurrent=1) as server:
        out: dict = {}
        thread = threading.Thread(target=_stream, args=(server.url, out, AUTH), kwargs={"max_tokens": 100})
        thread.start()
        deadline = time.monotonic() + 10
        while not scheduler.stats()["active"] and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = httpx.post(server.url + "/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": "Hi",
                                                                              "max_tokens": 1})
        thread.join(60)
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "too_many_concurrent_requests"
        after = httpx.post(server.url + "/v1/completions", headers=AUTH, json={"model": MODEL, "prompt": "Hi",
                                                                               "max_tokens": 1})
        assert after.status_code == 200 and out["finish"] == "length"


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sent before closing the connection (fails if it is still open after ``seconds``)."""
    sock.settimeout(seconds)
    received = b""
    while True:
        data = sock.recv(4096)  # socket.timeout here means the server held the connection open
        if not data:
            return received
        received += data


def test_slow_clients_are_cut_off(scheduler):
    with _server(scheduler, header_timeout=0.5, body_timeout=0.5, keep_alive_timeout=0.5) as server:
        address = ("127.0.0.1", server.port)
        idle = socket.create_connection(address)
        partial_headers = socket.create_connection(address)
        partial_headers.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        partial_body = socket.create_connection(address)
        partial_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000\r\n\r\n{\"model\": ")
        assert _closed_within(idle, 5) == b""
        assert _closed_within(partial_headers, 5) == b""
        assert b" 408 " in _closed_within(partial_body, 5).split(b"\r\n")[0] + b" "
        for sock in (idle, partial_headers, partial_body):
            sock.close()


def test_small_findings(scheduler, tmp_path, monkeypatch):
    store = FeedbackStore(tmp_path / "feedback.db")
    with _server(scheduler, store=store) as server:
        client = httpx.Client(base_url=server.url)
        conv = client.post("/feedback/conversations", json={}).json()["id"]
        huge_index = client.post("/feedback/messages", json={"conversation_id": conv, "role": "user", "content": "x",
                                                             "compare_index": 2**64})
        assert huge_index.status_code == 400 and huge_index.json()["error"]["param"] == "compare_index"
        long_model = client.post("/v1/chat/completions", json={"model": "m" * 300, "messages": HELLO})
        assert long_model.status_code == 400 and long_model.json()["error"]["param"] == "model"
        nul = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user",
                                                                                     "content": "a\x00b"}]})
        assert nul.status_code == 400 and nul.json()["error"]["param"] == "messages.0.content"
        no_type = client.post("/v1/completions", content=json.dumps({"model": MODEL, "prompt": "Hi"}),
                              headers={"Content-Type": ""})
        assert no_type.status_code == 400  # not parsed as JSON: no cross-site form can post to a keyless server

        from chatforge.serve import edits, feedback

        def broken(*args, **kwargs):
            raise RuntimeError("secret internal detail /etc/passwd")

        monkeypatch.setattr(edits.ModerationServing, "create", broken)
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.request("POST", "/v1/moderations", body=json.dumps({"input": "hi"}),
                           headers={"Content-Type": "application/json"})
        failed = connection.getresponse()
        body = json.loads(failed.read())
        assert failed.status == 500 and "secret" not in body["error"]["message"]
        connection.request("GET", "/health")  # the same connection: kept alive after the 500
        assert connection.getresponse().status == 200
        connection.close()

        def unreachable(*args, **kwargs):
            from sqlalchemy.exc import OperationalError

            raise OperationalError("SELECT", {}, Exception("database is locked"))

        monkeypatch.setattr(feedback.FeedbackStore, "list_conversations", unreachable)
        down = client.get("/feedback/conversations")
        assert down.status_code == 503 and down.json()["error"]["code"] == "database_unavailable"

        from chatforge.infer import scheduler as scheduler_module

        def failing_iter(self):
            raise RuntimeError("secret internal detail in a stream")
            yield

        monkeypatch.setattr(scheduler_module.RequestHandle, "__aiter__", failing_iter)
        out: dict = {}
        _stream(server.url, out, max_tokens=2)
        assert "generation failed" in out["error"]["message"] and "secret" not in out["error"]["message"]
    store.close()
