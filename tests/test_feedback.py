"""The feedback store: what it records, the implicit signals it derives, its HTTP routes, and its exports in
exactly the formats the SFT-data and reward stages read."""

from __future__ import annotations

import json
import os
import sqlite3

import httpx
import pytest
from serve_helpers import MODEL, tiny_engine

from chatforge.cli import main
from chatforge.data.rankings import read_rankings
from chatforge.errors import ChatforgeError
from chatforge.infer.scheduler import Scheduler
from chatforge.serve.api import ServeOptions, create_app
from chatforge.serve.feedback import FeedbackStore, NotFound
from chatforge.serve.security import client_id
from chatforge.serve.server import BackgroundServer


@pytest.fixture
def store(tmp_path):
    store = FeedbackStore(tmp_path / "run" / "feedback.db")
    yield store
    store.close()


def _turn(store, conv, question, answer, parent=None, model="m1", user=""):
    q = store.add_message(conv, "user", question, parent_id=parent, user_id=user)
    a = store.add_message(conv, "assistant", answer, parent_id=q["id"], model_id=model, user_id=user)
    return q, a


def _signals(store, conv_id):
    return {m["content"]: m["signals"] for m in store.get_conversation(conv_id)["messages"]}


def test_store_keeps_a_message_tree_with_ratings_edits_and_derived_signals(store, tmp_path):
    conv = store.create_conversation("m1")["id"]
    q, first = _turn(store, conv, "What is 2+2?", "5")
    second = store.add_message(conv, "assistant", "4", parent_id=q["id"], model_id="m1")  # regenerate
    store.rate(second["id"], 1)
    store.add_signal(second["id"], "copied")
    q2, a2 = _turn(store, conv, "And 3+3?", "7", parent=second["id"])  # the person went on: "continued"
    store.add_message(conv, "user", "And 3 + 3, exactly?", parent_id=second["id"])  # re-asked: "asked_again"
    store.edit_message(a2["id"], "6")
    signals = _signals(store, conv)
    assert signals["5"] == ["regenerated"]
    assert signals["4"] == ["continued", "copied"]
    assert signals["6"] == ["asked_again"]
    data = store.get_conversation(conv)
    assert data["title"] == "What is 2+2?"
    by_content = {m["content"]: m for m in data["messages"]}
    assert by_content["4"]["rating"] == 1 and by_content["6"]["edited"] and by_content["5"]["rating"] == 0
    assert by_content["And 3+3?"]["parent_id"] == second["id"]

    db = sqlite3.connect(tmp_path / "run" / "feedback.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for table in ("ratings", "edits", "signals"):
        rows = db.execute(f"SELECT model_id, created_at FROM {table}").fetchall()
        assert rows and all(model == "m1" and created for model, created in rows), table
    assert db.execute("SELECT before, after FROM edits").fetchall() == [("7", "6")]
    assert db.execute("SELECT count(*) FROM messages WHERE created_at IS NULL").fetchone()[0] == 0


def test_bad_feedback_is_refused(store):
    conv = store.create_conversation("m1")["id"]
    other = store.create_conversation("m1")["id"]
    q, a = _turn(store, conv, "hi", "hello")
    _, b = _turn(store, other, "hi", "hey")
    with pytest.raises(NotFound):
        store.add_message("nope", "user", "x")
    with pytest.raises(ChatforgeError, match="another conversation"):
        store.add_message(other, "user", "x", parent_id=a["id"])
    with pytest.raises(ChatforgeError, match="only answers"):
        store.rate(q["id"], 1)
    with pytest.raises(ChatforgeError, match="rating"):
        store.rate(a["id"], 5)
    with pytest.raises(ChatforgeError, match="signal"):
        store.add_signal(a["id"], "liked")
    with pytest.raises(ChatforgeError, match="same question"):
        store.add_ranking([a["id"], b["id"]], [0, 1])
    with pytest.raises(ChatforgeError, match="each index once"):
        store.add_ranking([a["id"], a["id"] + "x"], [0, 0])
    with pytest.raises(NotFound):  # someone else's conversation is invisible
        store.get_conversation(conv, user_id="key-other")


def test_sft_export_keeps_endorsed_answers_and_drops_rejected_paths(store, tmp_path):
    a = store.create_conversation("m1", user_id="key-a")["id"]  # rated down, then regenerated and rated up
    q, bad = _turn(store, a, "Name a colour.", "Dog.", user="key-a")
    store.rate(bad["id"], -1, user_id="key-a")
    good = store.add_message(a, "assistant", "Blue.", parent_id=q["id"], model_id="m1", user_id="key-a")
    store.rate(good["id"], 1, user_id="key-a")
    b = store.create_conversation("m1")["id"]  # two endorsed turns on one path: only the whole path
    _, b1 = _turn(store, b, "Hi", "Hello!")
    store.rate(b1["id"], 1)
    _, b2 = _turn(store, b, "How are you?", "Fine, thanks.", parent=b1["id"])
    store.rate(b2["id"], 1)
    c = store.create_conversation("m1")["id"]  # rated down but fixed by a person: the fix is a demonstration
    _, c1 = _turn(store, c, "2+2?", "5")
    store.rate(c1["id"], -1)
    store.edit_message(c1["id"], "4")
    d = store.create_conversation("m1")["id"]  # a good answer after a bad, unfixed one: left out
    _, d1 = _turn(store, d, "Capital of France?", "Berlin.")
    store.rate(d1["id"], -1)
    _, d2 = _turn(store, d, "Sure?", "Paris.", parent=d1["id"])
    store.rate(d2["id"], 1)
    e = store.create_conversation("m1")["id"]  # only copied: an implicit endorsement
    _, e1 = _turn(store, e, "Write hi", "hi")
    store.add_signal(e1["id"], "copied")

    def dialogues(records):
        return [[m["content"] for m in r["messages"]] for r in records]

    explicit = store.sft_records()
    assert dialogues(explicit) == [["Name a colour.", "Blue."], ["Hi", "Hello!", "How are you?", "Fine, thanks."],
                                   ["2+2?", "4"]]
    assert explicit[0]["user_id"] == "key-a" and "user_id" not in explicit[1]
    assert all(r["source"] == "feedback" and r["model"] == "m1" for r in explicit)
    assert dialogues(store.sft_records(include_implicit=True))[-1] == ["Write hi", "hi"]

    sft_data = pytest.importorskip("chatforge.data.sft_data")
    out = tmp_path / "sft.jsonl"
    assert store.export("sft", out) == (3, 0)
    parsed = list(sft_data.read_conversations(out, default_source="other"))
    assert [c.source for c in parsed] == ["feedback"] * 3
    assert [c.user_id for c in parsed] == ["key-a", None, None]
    assert [[m["role"] for m in c.messages] for c in parsed][1] == ["user", "assistant", "user", "assistant"]


def _compare_turn(store, conv, k, parent=None):
    q = store.add_message(conv, "user", f"Rank {k} answers", parent_id=parent)
    answers = [store.add_message(conv, "assistant", f"answer {i}", parent_id=q["id"], model_id="m1",
                                 compare_group=f"g{k}", compare_index=i) for i in range(k)]
    return q, answers


def test_rankings_export_is_what_the_reward_stage_reads(store, tmp_path):
    conv = store.create_conversation("m1")["id"]
    _, first = _turn(store, conv, "Hello", "Hi there")
    q, answers = _compare_turn(store, conv, 4, parent=first["id"])
    store.add_ranking([m["id"] for m in answers], [2, 0, 3, 1])
    store.edit_message(answers[2]["id"], "a better answer")  # edits are demonstrations; the ranking keeps the sample
    _, pair = _compare_turn(store, store.create_conversation("m1")["id"], 2)
    store.add_ranking([m["id"] for m in pair], [1, 0])
    assert not any("regenerated" in s for s in _signals(store, conv).values())  # compare answers are not redos

    out = tmp_path / "rankings.jsonl"
    assert store.export("rankings", out) == (1, 1)  # the 2-answer ranking is below the reward data's K >= 4
    (line,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["prompt"] == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"},
                              {"role": "user", "content": "Rank 4 answers"}]
    assert line["completions"] == ["answer 0", "answer 1", "answer 2", "answer 3"]
    assert line["ranking"] == [2, 0, 3, 1] and line["source"] == "feedback"
    (record,) = read_rankings(out)
    assert record["ranking"] == [[2], [0], [3], [1]]
    reward = pytest.importorskip("chatforge.train.reward")
    engine = tiny_engine(block_size=128)
    ((encoded, tiers),) = reward.load_rankings(out, engine.tokenizer, engine.block_size)
    assert tiers == [[2], [0], [3], [1]] and len(encoded) == 4


def test_feedback_export_command(store, tmp_path, capsys):
    conv = store.create_conversation("m1")["id"]
    _, answers = _compare_turn(store, conv, 5)
    store.add_ranking([m["id"] for m in answers], [4, 3, 2, 1, 0])
    db = tmp_path / "run" / "feedback.db"
    out = tmp_path / "exports" / "rankings.jsonl"
    main(["feedback", "export", "--as", "rankings", "--out", str(out), f"--run_dir={tmp_path / 'run'}"])
    assert "wrote 1 rankings records" in capsys.readouterr().out
    assert len(read_rankings(out)) == 1
    main(["feedback", "export", "--as=sft", f"--db={db}", f"--out={tmp_path / 'sft.jsonl'}"])
    (demo,) = [json.loads(x) for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert demo["messages"][-1] == {"role": "assistant", "content": "answer 4"}  # the answer ranked best
    for bad, message in ((["feedback", "export", "--as=votes"], "option 'as'"),
                         (["feedback", "export", f"--run_dir={tmp_path / 'empty'}"], "no feedback database"),
                         (["feedback", "import"], "usage: chatforge feedback export")):
        with pytest.raises(SystemExit):
            main(bad)
        assert message in capsys.readouterr().err


def test_feedback_routes_are_per_api_key(tmp_path):
    engine = tiny_engine()
    store = FeedbackStore(tmp_path / "feedback.db")
    with Scheduler(engine) as scheduler:
        app = create_app(scheduler, ServeOptions(model_name=MODEL, api_keys=["k1", "k2"]), store=store)
        with BackgroundServer(app) as server:
            one = httpx.Client(base_url=server.url, headers={"Authorization": "Bearer k1"})
            two = httpx.Client(base_url=server.url, headers={"Authorization": "Bearer k2"})
            conv = one.post("/feedback/conversations", json={}).json()
            message = {"conversation_id": conv["id"], "role": "user", "content": "hi"}
            q = one.post("/feedback/messages", json=message).json()
            a = one.post(
                "/feedback/messages",
                json={"conversation_id": conv["id"], "role": "assistant", "content": "hello", "parent_id": q["id"]},
            ).json()
            assert a["model"] == MODEL
            assert one.post(f"/feedback/messages/{a['id']}/rating", json={"value": -1}).json()["rating"] == -1
            assert one.post(f"/feedback/messages/{a['id']}/signal", json={"kind": "copied"}).status_code == 200
            assert one.post(f"/feedback/messages/{a['id']}/edit", json={"content": "hey"}).json()["edited"]
            assert [c["id"] for c in one.get("/feedback/conversations").json()["data"]] == [conv["id"]]
            assert two.get("/feedback/conversations").json()["data"] == []
            hidden = two.get(f"/feedback/conversations/{conv['id']}")
            assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "not_found"
            for path, body in (
                (f"/feedback/messages/{a['id']}/rating", {"value": 5}),
                (f"/feedback/messages/{a['id']}/signal", {"kind": "regenerated"}),
                ("/feedback/rankings", {"message_ids": [a["id"], q["id"]], "ranking": [0, 1]}),
            ):
                response = one.post(path, json=body)
                assert response.status_code == 400 and set(response.json()["error"]) == {
                    "message",
                    "type",
                    "param",
                    "code",
                }
            assert httpx.get(server.url + "/feedback/conversations").status_code == 401
            assert one.delete(f"/feedback/conversations/{conv['id']}").status_code == 200
            assert one.get("/feedback/conversations").json()["data"] == []
    assert store.list_conversations(client_id("k1")) == []
    store.close()


@pytest.mark.skipif(
    not os.environ.get("CHATFORGE_TEST_POSTGRES_URL"),
    reason="set CHATFORGE_TEST_POSTGRES_URL=postgresql+psycopg://... to test against PostgreSQL",
)
def test_postgresql_store():
    store = FeedbackStore(os.environ["CHATFORGE_TEST_POSTGRES_URL"])
    conv = store.create_conversation("m1")["id"]
    try:
        q, answers = _compare_turn(store, conv, 4)
        ranking = store.add_ranking([m["id"] for m in answers], [3, 2, 1, 0])
        store.rate(answers[3]["id"], 1)
        store.edit_message(answers[3]["id"], "better")
        assert ranking["id"] in [r["id"] for r in store.ranking_records()[0]]
        assert [m["content"] for m in store.sft_records()[-1]["messages"]] == ["Rank 4 answers", "better"]
    finally:
        store.delete_conversation(conv)
        store.close()
