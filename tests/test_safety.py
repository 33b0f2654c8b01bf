"""Content filters: each action on crafted English and Chinese text, streamed cut-offs, the classifier, the API."""

from __future__ import annotations

import json
import re

import httpx
import numpy as np
import openai
import pytest
from serve_helpers import MODEL, tiny_engine

from chatforge.chat_template import prompt_ids
from chatforge.cli import main
from chatforge.errors import ChatforgeError
from chatforge.infer.params import SamplingParams
from chatforge.infer.scheduler import Scheduler
from chatforge.safety.classifier import CharNgrams, SafetyClassifier, fit_logistic, train_classifier
from chatforge.safety.filters import FilterPipeline, Policy, StreamGuard
from chatforge.serve.api import ServeOptions, create_app
from chatforge.serve.feedback import FeedbackStore
from chatforge.serve.server import BackgroundServer
from chatforge.serve.terminal import Conversation

POLICY = {
    "pii": {"action": "redact"},
    "categories": {
        "insults": {"words": ["idiot", "笨蛋"], "regexes": [r"stupid\s+\w+"], "action": "refuse",
                    "message": "Please keep it civil."},
        "brands": {"words": ["Acme"], "action": "redact"},
        "weather": {"words": ["rain", "下雨"], "action": "allow"},
    },
}


@pytest.fixture
def pipeline():
    return FilterPipeline(Policy.from_dict(POLICY))


def test_refuse_redact_and_allow_in_english_and_chinese(pipeline):
    refused = pipeline.check("You are an idiot.")
    assert refused.refused.category == "insults" and refused.message == "Please keep it civil."
    assert pipeline.check("你这个笨蛋").refused is not None  # Chinese words match without spaces around them
    assert pipeline.check("what a stupid   plan").refused.matched == "stupid   plan"
    assert pipeline.check("idiotic idiotsyncrasy").refused is None  # English words match whole words only
    redacted = pipeline.check("Buy ACME now, write to ann@example.com")
    assert redacted.text == "Buy [brands] now, write to <EMAIL>" and redacted.refused is None
    assert {d.category for d in redacted.decisions} == {"brands", "pii"}
    allowed = pipeline.check("It will rain, 明天下雨")
    assert allowed.text == "It will rain, 明天下雨" and [d.action for d in allowed.decisions] == ["allow", "allow"]
    assert pipeline.check("A fine day.").decisions == []


def test_stream_guard_catches_a_word_split_across_deltas_before_sending_it(pipeline):
    guard = StreamGuard(pipeline)
    sent = "".join(guard.feed(d) for d in ["Well, ", "you are an id", "iot and ", "more"]) + guard.finish()
    assert guard.tripped is not None and guard.tripped.category == "insults"
    assert "id" not in sent.replace("Well", "")  # nothing of the insult left the server
    chinese = StreamGuard(pipeline)
    sent = "".join(chinese.feed(d) for d in ["好的，", "你这个笨", "蛋！", "还有"]) + chinese.finish()
    assert chinese.tripped.category == "insults" and "笨" not in sent
    clean = StreamGuard(pipeline)
    text = "x" * 100 + " Acme " + "y" * 100
    out = "".join(clean.feed(text[i:i + 7]) for i in range(0, len(text), 7)) + clean.finish()
    assert out == "x" * 100 + " [brands] " + "y" * 100 and clean.tripped is None


@pytest.mark.parametrize("policy, message", [
    ({"categories": {"x": {"words": ["a"], "action": "delete"}}}, "action must be one of"),
    ({"categories": {"x": {"regexes": ["("]}}}, "does not compile"),
    ({"categories": {"x": {"words": []}}}, "non-empty list"),
    ({"categories": {"x": {"words": ["a"], "colour": "red"}}}, "unknown key"),
    ({"filters": {}}, "unknown section"),
    ({"pii": {"action": "hide"}}, "pii action"),
    ({"pii": "redact"}, "'pii' must be a table"),
    ({"classifier": {"path": "x", "action": "redact"}}, "classifier action must be one of allow, refuse"),
    ({"classifier": {"threshold": "high"}}, "threshold must be a number"),
    ({"classifier": {"threshold": 1.5}}, r"threshold must be in \(0, 1\]"),
    ({"classifier": {"treshold": 0.5}}, "unknown key"),
])
def test_bad_policies_are_clear_errors(policy, message):
    with pytest.raises(ChatforgeError, match=message):
        Policy.from_dict(policy)


def test_policy_files_load_from_toml_yaml_and_json(tmp_path):
    (tmp_path / "p.toml").write_text('[categories.insults]\nwords = ["idiot"]\naction = "refuse"\n')
    (tmp_path / "p.yaml").write_text("categories:\n  insults:\n    words: [idiot]\n")
    (tmp_path / "p.json").write_text(json.dumps({"categories": {"insults": {"words": ["idiot"]}}}))
    for name in ("p.toml", "p.yaml", "p.json"):
        assert FilterPipeline(Policy.load(tmp_path / name)).check("idiot").refused is not None
    (tmp_path / "bad.toml").write_text("[categories\n")
    with pytest.raises(ChatforgeError, match="does not parse"):
        Policy.load(tmp_path / "bad.toml")
    with pytest.raises(ChatforgeError, match="not found"):
        Policy.load(tmp_path / "missing.toml")
    (tmp_path / "p.txt").write_text("idiot")
    with pytest.raises(ChatforgeError, match="use a .toml, .yaml or .json"):
        Policy.load(tmp_path / "p.txt")
    (tmp_path / "bad.yaml").write_text("categories: [idiot\n")
    with pytest.raises(ChatforgeError, match="does not parse"):
        Policy.load(tmp_path / "bad.yaml")
    with pytest.raises(ChatforgeError, match="no safety classifier at"):
        FilterPipeline(Policy.from_dict({"classifier": {"path": str(tmp_path / "nothing")}}))


def test_classifier_learns_a_labeled_set_and_scores_held_out_text():
    rng = np.random.default_rng(0)
    bad = ["hate", "kill", "destroy", "attack", "hurt"]
    good = ["love", "help", "share", "build", "grow"]
    texts = [
        f"I want to {rng.choice(bad if i % 2 else good)} {rng.choice(['them', 'it', 'you'])} today" for i in range(200)
    ]
    labels = np.array([i % 2 == 1 for i in range(200)])
    held_out = np.arange(200) >= 160
    embedder = CharNgrams()
    weights, bias, scores = train_classifier(embedder.embed(texts), labels, held_out, c=1.0)
    assert scores["held_out_accuracy"] >= 0.95 and scores["held_out"] == 40 and scores["majority_class"] == 0.5
    classifier = SafetyClassifier(embedder, weights, bias, {})
    assert classifier.score(["I want to attack you today"])[0] > 0.5 > classifier.score(["I want to help you today"])[0]
    policy = Policy.from_dict({"classifier": {"threshold": 0.5, "action": "refuse"}})
    assert (
        FilterPipeline(policy, classify=classifier.score).check("I want to kill it today").refused.category
        == "classifier"
    )


def test_fit_logistic_reaches_the_regularised_optimum():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 10))
    y = x @ rng.normal(size=10) + rng.normal(size=120) > 0.3
    weights, bias = fit_logistic(x, y, c=2.0)
    p = 1 / (1 + np.exp(-(x @ weights + bias)))
    # first-order conditions of c * sum(log-loss) + |w|^2 / 2: the gradient vanishes at the answer
    assert np.abs(2.0 * x.T @ (p - y) + weights).max() < 1e-6 and abs(np.sum(p - y)) < 1e-6
    assert np.mean((p > 0.5) == y) > 0.8


def _flags(word: str, seen: int, calls: list | None = None):
    """A classifier that reads only the first ``seen`` characters of each text (as embedders truncate)."""

    def classify(texts):
        if calls is not None:
            calls.append(len(texts))
        return np.array([1.0 if word in t[:seen] else 0.0 for t in texts])

    return classify


def test_the_classifier_scores_every_window_of_a_long_text():
    policy = Policy.from_dict({"classifier": {"action": "refuse", "window": 100, "message": "No attacks."}})
    long = "a calm and friendly sentence. " * 40 + "now attack them."
    refused = FilterPipeline(policy, classify=_flags("attack", 100)).check(long)
    assert refused.refused.category == "classifier" and "attack" in refused.refused.matched
    assert refused.message == "No attacks."
    allowed = Policy.from_dict({"classifier": {"action": "allow", "window": 100}})
    checked = FilterPipeline(allowed, classify=_flags("attack", 100)).check(long)
    assert checked.refused is None and [d.action for d in checked.decisions] == ["allow"]


def test_stream_guard_runs_the_classifier_every_half_window_and_sends_only_scored_text():
    calls: list = []
    pipeline = FilterPipeline(
        Policy.from_dict({"classifier": {"action": "refuse", "window": 100}}), classify=_flags("attack", 100, calls)
    )
    text = "a calm and friendly sentence. " * 40 + "now attack them. " + "more calm words. " * 10
    guard, sent = StreamGuard(pipeline), ""
    for char in text:  # one character per delta, the worst case for a per-delta classifier
        sent += guard.feed(char)
        if guard.tripped is None:
            assert len(sent) <= max(guard.classified, 0)
    sent += guard.finish()
    assert guard.tripped.category == "classifier" and "attack" not in sent and text.startswith(sent)
    assert len(calls) <= len(text) // 50 + 1  # every 50 characters, not every delta
    clean = StreamGuard(pipeline)
    calm = "a calm and friendly sentence. " * 10
    assert "".join(clean.feed(c) for c in calm) + clean.finish() == calm and clean.tripped is None


def test_chat_cli_conversation_refuses_redacts_and_cuts_answers(engine):
    params = SamplingParams(temperature=0, max_tokens=30)
    plain = Conversation(engine, params).answer("Hello world")
    blocked = plain[len(plain) // 2 : len(plain) // 2 + 3]
    assert len(plain) > 10 and blocked.strip()
    filters = FilterPipeline(
        Policy.from_dict(
            {
                "categories": {
                    "insults": {"words": ["idiot"], "action": "refuse", "message": "Please keep it civil."},
                    "blocked": {"regexes": [re.escape(blocked)], "action": "refuse"},
                }
            }
        )
    )
    chat = Conversation(engine, params, filters=filters)
    shown: list[str] = []
    assert chat.answer("you idiot", shown.append) == "Please keep it civil." and chat.messages == []
    cut = chat.answer("Hello world", shown.append)
    assert blocked not in cut and plain.startswith(cut) and len(cut) < len(plain)
    assert "".join(shown[1:]).strip() == cut and chat.messages[-1] == {"role": "assistant", "content": cut}
    chat.answer("mail me at ann@example.com")
    assert chat.messages[-2]["content"] == "mail me at <EMAIL>"  # the model never saw the address


def test_chat_cli_checks_its_policy_before_loading_a_model(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["chat", f"--ckpt={tmp_path / 'no-model'}", f"--safety_policy={tmp_path / 'missing.toml'}", "hi"])
    assert "safety policy not found" in capsys.readouterr().err


def _labeled(path, n=160):
    rng = np.random.default_rng(0)
    bad, good = ["hate", "kill", "destroy", "attack", "hurt"], ["love", "help", "share", "build", "grow"]
    rows = [
        {
            "text": f"I want to {rng.choice(bad if i % 2 else good)} {rng.choice(['them', 'it', 'you'])} now {i}",
            "label": "unsafe" if i % 2 else "safe",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_safety_train_stage_saves_a_classifier_the_server_loads_and_uses(engine, tmp_path, capsys):
    out = tmp_path / "clf"
    main(
        [
            "safety-train",
            f"--data={_labeled(tmp_path / 'labeled.jsonl')}",
            f"--out={out}",
            "--embedder=ngrams",
            "--device=cpu",
        ]
    )
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["held_out_accuracy"] >= 0.9 and meta["held_out"] > 10 and meta["embedder"] == "ngrams"
    assert "held-out accuracy" in capsys.readouterr().out
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[classifier]\npath = "{out}"\nthreshold = 0.5\naction = "refuse"\n')
    store = FeedbackStore(tmp_path / "feedback.db")
    with (
        Scheduler(engine) as scheduler,
        BackgroundServer(
            create_app(scheduler, ServeOptions(model_name=MODEL, safety_policy=str(policy)), store=store)
        ) as server,
    ):
        refused = httpx.post(
            server.url + "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "I want to attack you now"}]},
        )
        moderation = httpx.post(server.url + "/v1/moderations", json={"input": "I want to help you now"}).json()
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "content_filter"
    assert (
        moderation["results"][0]["flagged"] is False and moderation["results"][0]["category_scores"]["classifier"] < 0.5
    )
    assert [(d["where"], d["category"], d["action"]) for d in store.filter_decisions()] == [
        ("input", "classifier", "refuse")
    ]
    store.close()


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"text": "a", "label": "safe"}, {"text": "b", "label": "safe"}], "needs exactly two labels"),
        ([{"text": "a", "label": "safe"}, {"body": "b", "label": "unsafe"}], "needs a string 'text'"),
    ],
)
def test_bad_labeled_data_is_a_clear_error(tmp_path, capsys, rows, message):
    data = tmp_path / "labeled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit):
        main(["safety-train", f"--data={data}", "--embedder=minilm"])  # the data is read before any model loads
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(block_size=128, max_batch_size=2)


def test_api_filters_prompts_cuts_streams_logs_decisions_and_moderates(engine, tmp_path):
    hello = [{"role": "user", "content": "Hello world"}]
    whole = engine.generate([prompt_ids(hello, engine.tokenizer)], SamplingParams(temperature=0, max_tokens=40))[0]
    text = whole.choices[0].text
    blocked = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(text) > 10 and blocked.strip()
    policy = tmp_path / "policy.json"
    policy.write_text(
        json.dumps(
            {
                "categories": {
                    "insults": {"words": ["idiot"], "action": "refuse", "message": "Please keep it civil."},
                    "blocked": {"regexes": [re.escape(blocked)], "action": "refuse"},
                }
            }
        )
    )
    store = FeedbackStore(tmp_path / "feedback.db")
    with (
        Scheduler(engine) as scheduler,
        BackgroundServer(
            create_app(scheduler, ServeOptions(model_name=MODEL, safety_policy=str(policy)), store=store)
        ) as server,
    ):
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as excinfo:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "you idiot"}])
        assert excinfo.value.body["code"] == "content_filter" and "civil" in excinfo.value.body["message"]
        chunks = list(
            client.chat.completions.create(model=MODEL, messages=hello, max_tokens=40, temperature=0, stream=True)
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        assert blocked not in streamed and text.startswith(streamed) and len(streamed) < text.index(blocked) + 1
        whole_reply = client.chat.completions.create(model=MODEL, messages=hello, max_tokens=40, temperature=0)
        assert whole_reply.choices[0].finish_reason == "content_filter"
        moderation = httpx.post(
            server.url + "/v1/moderations", json={"input": ["you idiot", "a calm sentence", "mail me: a@b.org"]}
        ).json()
    assert moderation["id"].startswith("modr-") and len(moderation["results"]) == 3
    flagged = [r["flagged"] for r in moderation["results"]]
    assert flagged == [True, False, True] and moderation["results"][0]["categories"]["insults"] is True
    assert moderation["results"][2]["category_scores"]["pii"] == 1.0
    decisions = store.filter_decisions()
    assert {(d["where"], d["category"], d["action"]) for d in decisions} >= {
        ("input", "insults", "refuse"),
        ("output", "blocked", "refuse"),
    }
    store.close()
