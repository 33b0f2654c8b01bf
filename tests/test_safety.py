"""Content filters: each action on crafted English and Chinese text, streamed cut-offs, the classifier, the API."""

from __future__ import annotations

import json
import re

import httpx
import numpy as np
import openai
import pytest

from chatforge.chat_template import prompt_ids
from chatforge.config import ChatforgeError
from chatforge.infer.params import SamplingParams
from chatforge.infer.scheduler import Scheduler
from chatforge.safety.classifier import SafetyClassifier, train_classifier
from chatforge.safety.filters import FilterPipeline, Policy, StreamGuard
from chatforge.serve.api import ServeOptions, create_app
from chatforge.serve.feedback import FeedbackStore
from chatforge.serve.server import BackgroundServer
from serve_helpers import MODEL, tiny_engine

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


class HashEmbedder:
    """Bag of hashed words: separable enough for a linear classifier, no model needed."""

    def embed(self, texts, role="document"):
        out = np.zeros((len(texts), 64))
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                out[i, sum(word.encode()) % 64] += 1
        return out


def test_classifier_learns_a_labeled_set_and_scores_held_out_text():
    rng = np.random.default_rng(0)
    bad = ["hate", "kill", "destroy", "attack", "hurt"]
    good = ["love", "help", "share", "build", "grow"]
    texts = [f"I want to {rng.choice(bad if i % 2 else good)} {rng.choice(['them', 'it', 'you'])} today" for i in range(200)]
    labels = np.array([i % 2 == 1 for i in range(200)])
    held_out = np.arange(200) >= 160
    embedder = HashEmbedder()
    weights, bias, scores = train_classifier(embedder.embed(texts), labels, held_out, c=1.0)
    assert scores["held_out_accuracy"] >= 0.95 and scores["held_out"] == 40 and scores["majority_class"] == 0.5
    classifier = SafetyClassifier(embedder, weights, bias, {})
    assert classifier.score(["I want to attack you today"])[0] > 0.5 > classifier.score(["I want to help you today"])[0]
    policy = Policy.from_dict({"classifier": {"threshold": 0.5, "action": "refuse"}})
    assert FilterPipeline(policy, classify=classifier.score).check("I want to kill it today").refused.category == "classifier"


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(block_size=128, max_batch_size=2)


def test_api_filters_prompts_cuts_streams_logs_decisions_and_moderates(engine, tmp_path):
    hello = [{"role": "user", "content": "Hello world"}]
    whole = engine.generate([prompt_ids(hello, engine.tokenizer)], SamplingParams(temperature=0, max_tokens=40))[0]
    text = whole.choices[0].text
    blocked = text[len(text) // 2: len(text) // 2 + 3]
    assert len(text) > 10 and blocked.strip()
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"categories": {
        "insults": {"words": ["idiot"], "action": "refuse", "message": "Please keep it civil."},
        "blocked": {"regexes": [re.escape(blocked)], "action": "refuse"}}}))
    store = FeedbackStore(tmp_path / "feedback.db")
    with Scheduler(engine) as scheduler, BackgroundServer(create_app(
            scheduler, ServeOptions(model_name=MODEL, safety_policy=str(policy)), store=store)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as excinfo:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "you idiot"}])
        assert excinfo.value.body["code"] == "content_filter" and "civil" in excinfo.value.body["message"]
        chunks = list(client.chat.completions.create(model=MODEL, messages=hello, max_tokens=40, temperature=0,
                                                     stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        assert blocked not in streamed and text.startswith(streamed) and len(streamed) < text.index(blocked) + 1
        whole_reply = client.chat.completions.create(model=MODEL, messages=hello, max_tokens=40, temperature=0)
        assert whole_reply.choices[0].finish_reason == "content_filter"
        moderation = httpx.post(server.url + "/v1/moderations",
                                json={"input": ["you idiot", "a calm sentence", "mail me: a@b.org"]}).json()
    assert moderation["id"].startswith("modr-") and len(moderation["results"]) == 3
    flagged = [r["flagged"] for r in moderation["results"]]
    assert flagged == [True, False, True] and moderation["results"][0]["categories"]["insults"] is True
    assert moderation["results"][2]["category_scores"]["pii"] == 1.0
    decisions = store.filter_decisions()
    assert {(d["where"], d["category"], d["action"]) for d in decisions} >= {("input", "insults", "refuse"),
                                                                             ("output", "blocked", "refuse")}
    store.close()
