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
from chatforge.data.signal_rewards import read_signal_rewards, signal_reward
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
            reply = one.post(
                "/v1/chat/completions",
                json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
            ).json()
            a = one.post(
                "/feedback/messages",
                json={
                    "conversation_id": conv["id"],
                    "role": "assistant",
                    "parent_id": q["id"],
                    "completion_id": reply["id"],
                },
            ).json()
            assert a["model"] == MODEL and a["author"] == "model"
            assert a["content"] == reply["choices"][0]["message"]["content"]
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


def _ask(client, conv_id, question, parent=None, **extra):
    """A stored question, and the server's chat completion of the conversation up to it."""
    q = client.post(
        "/feedback/messages",
        json={"conversation_id": conv_id, "role": "user", "content": question, "parent_id": parent},
    ).json()
    path = [m for m in client.get(f"/feedback/conversations/{conv_id}").json()["messages"]]
    messages = [{"role": m["role"], "content": m["content"]} for m in path if m["id"] in _ancestors(path, q["id"])]
    reply = client.post(
        "/v1/chat/completions", json={"model": MODEL, "max_tokens": 4, "messages": messages, **extra}
    ).json()
    return q, reply


def _ancestors(messages, message_id):
    by_id = {m["id"]: m for m in messages}
    ids = []
    while message_id is not None:
        ids.append(message_id)
        message_id = by_id[message_id]["parent_id"]
    return ids


def test_answers_are_only_what_the_server_generated_and_exports_say_who_wrote_them(tmp_path):
    engine = tiny_engine(block_size=128)
    store = FeedbackStore(tmp_path / "feedback.db")
    with Scheduler(engine) as scheduler:
        app = create_app(
            scheduler,
            ServeOptions(model_name=MODEL, api_keys=["k1", "k2"], compare_k=4, feedback_writes_per_minute=60),
            store=store,
        )
        with BackgroundServer(app) as server:
            one = httpx.Client(base_url=server.url, headers={"Authorization": "Bearer k1"})
            two = httpx.Client(base_url=server.url, headers={"Authorization": "Bearer k2"})
            conv = one.post("/feedback/conversations", json={}).json()["id"]
            # seeded: the random tiny model may sample a NUL byte, which the protocol refuses once this answer is
            # sent back in the conversation below (the unseeded draw did with the counter-based sampling streams)
            q, reply = _ask(one, conv, "Hello world", seed=1)
            forged = one.post(
                "/feedback/messages",
                json={
                    "conversation_id": conv,
                    "role": "assistant",
                    "model": "gpt-9",
                    "content": "I am a forged demonstration",
                    "parent_id": q["id"],
                },
            )
            assert forged.status_code == 400 and forged.json()["error"]["param"] == "model"  # no model stamps
            answer = {"conversation_id": conv, "role": "assistant", "parent_id": q["id"], "completion_id": reply["id"]}
            stolen = two.post("/feedback/conversations", json={}).json()["id"]
            q2 = two.post(
                "/feedback/messages", json={"conversation_id": stolen, "role": "user", "content": "Hello world"}
            ).json()
            taken = two.post("/feedback/messages", json={**answer, "conversation_id": stolen, "parent_id": q2["id"]})
            assert taken.status_code == 404  # another key's completion cannot be referenced
            other_q, _ = _ask(one, conv, "Another question", parent=None)
            moved = one.post("/feedback/messages", json={**answer, "parent_id": other_q["id"]})
            assert moved.status_code == 400 and "other messages" in moved.json()["error"]["message"]
            stored = one.post("/feedback/messages", json=answer).json()
            assert stored["author"] == "model" and stored["content"] == reply["choices"][0]["message"]["content"]
            assert one.post("/feedback/messages", json=answer).status_code == 400  # stored once
            one.post(f"/feedback/messages/{stored['id']}/rating", json={"value": 1})
            human = one.post(
                "/feedback/messages",
                json={
                    "conversation_id": conv,
                    "role": "assistant",
                    "content": "A person's answer.",
                    "parent_id": q["id"],
                },
            ).json()
            assert human["author"] == "human" and human["model"] is None
            one.post(f"/feedback/messages/{human['id']}/rating", json={"value": 1})
            q3, reply3 = _ask(one, conv, "Rank these", parent=stored["id"], n=4, temperature=1.0)
            group = [
                one.post(
                    "/feedback/messages",
                    json={
                        "conversation_id": conv,
                        "role": "assistant",
                        "parent_id": q3["id"],
                        "completion_id": reply3["id"],
                        "choice_index": i,
                        "compare_group": "g",
                        "compare_index": i,
                    },
                ).json()
                for i in range(4)
            ]
            bad_rank = one.post(
                "/feedback/rankings", json={"message_ids": [stored["id"], human["id"]], "ranking": [0, 1]}
            )
            assert bad_rank.status_code == 400 and "generated" in bad_rank.json()["error"]["message"]
            assert (
                one.post(
                    "/feedback/rankings", json={"message_ids": [m["id"] for m in group], "ranking": [3, 2, 1, 0]}
                ).status_code
                == 200
            )
            one.post(f"/feedback/messages/{group[3]['id']}/edit", json={"content": "An improved answer."})
            too_many = [
                one.post(f"/feedback/messages/{stored['id']}/signal", json={"kind": "copied"}).status_code
                for _ in range(60)
            ]
            assert 429 in too_many  # feedback writes are rate-limited per key
    provenance = {r["messages"][-1]["content"]: r["provenance"] for r in store.sft_records()}
    assert provenance == {"A person's answer.": "human-written", "An improved answer.": "human-edited"}
    assert store.sft_records()[-1]["messages"][1]["content"] == stored["content"]
    (ranking,), _ = store.ranking_records()
    assert ranking["provenance"] == "model-generated"
    assert ranking["completions"] == [m["content"] for m in group[:3]] + [group[3]["content"]]
    store.close()


def test_schema_versions_upgrade_known_refuse_unknown_and_the_file_is_private(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)  # a version-1 database: no schema_version table, answers' text from clients
    db.executescript("""
        CREATE TABLE conversations (id VARCHAR(32) PRIMARY KEY, user_id VARCHAR(64), title TEXT, model_id VARCHAR(200),
                                    created_at DATETIME, updated_at DATETIME);
        CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, id VARCHAR(32) UNIQUE,
                               conversation_id VARCHAR(32), parent_id VARCHAR(32), role VARCHAR(16), content TEXT,
                               model_id VARCHAR(200),
                               finish_reason VARCHAR(32), compare_group VARCHAR(32), compare_index INTEGER,
                               created_at DATETIME);
        CREATE TABLE ratings (id INTEGER PRIMARY KEY AUTOINCREMENT, message_id VARCHAR(32), model_id VARCHAR(200),
                              created_at DATETIME, value INTEGER);
        INSERT INTO conversations VALUES ('c1', '', 'old', 'm1', '2026-01-01', '2026-01-01');
        INSERT INTO messages VALUES (1, 'q1', 'c1', NULL, 'user', 'Hi', NULL, NULL, NULL, NULL, '2026-01-01');
        INSERT INTO messages VALUES (2, 'a1', 'c1', 'q1', 'assistant', 'Hello', 'm1', 'stop', NULL, NULL, '2026-01-01');
        INSERT INTO ratings VALUES (1, 'a1', 'm1', '2026-01-01', 1);
    """)
    db.close()
    store = FeedbackStore(path)
    (record,) = store.sft_records()
    assert record["provenance"] == "unverified" and record["messages"][-1]["content"] == "Hello"
    store.close()
    db = sqlite3.connect(path)
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(ChatforgeError, match="schema version 99"):
        FeedbackStore(path)
    fresh = FeedbackStore(tmp_path / "new" / "feedback.db")
    fresh.create_conversation("m1")
    assert os.stat(tmp_path / "new" / "feedback.db").st_mode & 0o777 == 0o600
    fresh.close()


def test_rewards_export_turns_signals_into_one_reward_per_generated_answer(store, tmp_path, capsys):
    conv = store.create_conversation("m1")["id"]
    q, first = _turn(store, conv, "What is 2+2?", "5")
    second = store.add_message(conv, "assistant", "4", parent_id=q["id"], model_id="m1")  # first: regenerated
    for _ in range(3):  # copied three times is one copy
        store.add_signal(second["id"], "copied")
    q2, third = _turn(store, conv, "And 3+3?", "7", parent=second["id"])  # second: continued
    store.add_message(conv, "user", "And 3 + 3, exactly?", parent_id=second["id"])  # third: asked again
    store.edit_message(second["id"], "Four.")  # the reward is for the answer as the model wrote it
    other = store.create_conversation("m1")["id"]
    q3, mixed = _turn(store, other, "Name a number.", "6")
    store.add_signal(mixed["id"], "copied")
    store.add_message(other, "assistant", "six", parent_id=q3["id"], model_id="m1")  # mixed: copied, regenerated
    _, quiet = _turn(store, store.create_conversation("m1")["id"], "Hi", "Hello")  # no signal: no line
    by_person = store.create_conversation("m1")["id"]
    q4 = store.add_message(by_person, "user", "Hi")
    human = store.add_message(by_person, "assistant", "A person's hello.", parent_id=q4["id"], author="human")
    store.add_signal(human["id"], "copied")  # a person's answer is no reward for the model

    records, skipped = store.reward_records()
    by_id = {r["id"]: r for r in records}
    assert skipped == 1 and quiet["id"] not in by_id and human["id"] not in by_id
    assert {by_id[m["id"]]["completion"]: (by_id[m["id"]]["reward"], by_id[m["id"]]["signals"])
            for m in (first, second, third, mixed)} == {
        "5": (-1.0, ["regenerated"]),
        "4": (1.0, ["continued", "copied"]),  # +1.5 clipped
        "7": (-1.0, ["asked_again"]),
        "6": (0.0, ["copied", "regenerated"]),
    }
    assert by_id[third["id"]]["prompt"] == [{"role": "user", "content": "What is 2+2?"},
                                            {"role": "assistant", "content": "Four."},
                                            {"role": "user", "content": "And 3+3?"}]
    assert all(r["source"] == "feedback" and r["model"] == "m1" and r["provenance"] == "model-generated"
               for r in records)

    out = tmp_path / "rewards.jsonl"
    main(["feedback", "export", "--as=rewards", f"--run_dir={tmp_path / 'run'}", f"--out={out}"])
    assert "wrote 4 rewards records" in capsys.readouterr().out
    assert [r["reward"] for r in read_signal_rewards(out)] == [r["reward"] for r in records]
    main(["feedback", "export", "--as=rankings", f"--run_dir={tmp_path / 'run'}", f"--out={tmp_path / 'r.jsonl'}"])
    assert (tmp_path / "r.jsonl").read_text() == ""  # the other exports are unchanged by signals


def test_signal_rule_and_bad_reward_files(tmp_path):
    assert signal_reward(["continued"]) == 0.5 and signal_reward(["continued", "asked_again"]) == -0.5
    assert signal_reward(["copied", "continued", "copied"]) == 1.0 and signal_reward([]) == 0.0
    with pytest.raises(ChatforgeError, match="unknown signal"):
        signal_reward(["liked"])
    good = {"prompt": [{"role": "user", "content": "hi"}], "completion": "hello", "reward": 1, "signals": ["copied"]}
    for change, message in (
        ({"reward": 2.0}, "within"),
        ({"reward": "1"}, "must be a number"),
        ({"reward": True}, "must be a number"),
        ({"completion": None}, "'completion' must be a string"),
        ({"signals": ["liked"]}, "'signals' must be a list"),
        ({"prompt": [{"role": "assistant", "content": "hi"}]}, "end with the user's question"),
        ({"prompt": []}, "non-empty list"),
    ):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **change}) + "\n")
        with pytest.raises(ChatforgeError, match=message) as caught:
            read_signal_rewards(path)
        assert f"{path}:2" in str(caught.value)
    path.write_text(json.dumps({"prompt": good["prompt"], "reward": 0.5}) + "\n")
    with pytest.raises(ChatforgeError, match="missing field 'completion'"):
        read_signal_rewards(path)
    with pytest.raises(ChatforgeError, match="not found|no such|does not exist"):
        read_signal_rewards(tmp_path / "absent.jsonl")


def test_exports_follow_the_order_things_were_stored_when_timestamps_tie(store, tmp_path):
    """Conversations started within one clock tick (a fast loop) export in the order they were stored, so every
    export of a store is the same file (the order of rewards is the order the reward model learns them in)."""
    for i in range(6):
        _, answer = _turn(store, store.create_conversation("m1")["id"], f"Question {i}?", f"Answer {i}.")
        store.add_signal(answer["id"], "copied")
        store.rate(answer["id"], 1)
    db = sqlite3.connect(tmp_path / "run" / "feedback.db")
    db.execute("UPDATE conversations SET created_at = (SELECT MIN(created_at) FROM conversations)")
    db.commit()
    db.close()
    for kind in ("rewards", "sft"):
        first, second = tmp_path / f"{kind}-1.jsonl", tmp_path / f"{kind}-2.jsonl"
        store.export(kind, first)
        store.export(kind, second)
        assert first.read_bytes() == second.read_bytes()
    completions = [r["completion"] for r in read_signal_rewards(tmp_path / "rewards-1.jsonl")]
    assert completions == [f"Answer {i}." for i in range(6)]
