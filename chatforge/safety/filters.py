"""The filter pipeline: what a prompt or an answer is checked for, and what happens when a check trips.

A policy (TOML, YAML or JSON) names categories, each with an action::

    [pii]                       # e-mail addresses, phone numbers, IPs, keys (chatforge.data.clean)
    action = "redact"

    [categories.insults]
    words = ["idiot", "moron", "笨蛋"]       # whole words; Chinese words match anywhere (no spaces to bound them)
    regexes = ["stupid\\\\s+\\\\w+"]
    action = "refuse"                          # allow | redact | refuse
    message = "I can't help with insults."

    [classifier]                # a `chatforge safety-train` model: its positive label is the category
    path = "runs/safety/classifier"
    threshold = 0.5
    action = "refuse"                          # allow | refuse (a score of a whole text has nothing to redact)
    window = 400                               # characters per scored window
    message = "I can't help with that."

``allow`` only records the match; ``redact`` replaces the matched text with ``[category]``; ``refuse`` stops:
a refused prompt is not generated from, a refused answer is cut where the filter tripped. Every decision
is returned for logging (the server writes them to the feedback store). The default policy redacts PII only.
The classifier scores overlapping windows of ``window`` characters and keeps the highest score: embedders
truncate (chatforge-embed at 128 tokens, MiniLM at 256), so one vector of a long text never sees its end.

Output streams are checked incrementally by ``StreamGuard``: the block-lists and PII on every delta, holding
back the last ``HOLD_BACK`` characters so a word split across two deltas is still caught before it is sent
(a match longer than that may be sent in part); the classifier only each time half a window of new text has
come, since embedding the answer again on every token would cost far more than generating it. Text is sent
only once the classifier has scored it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chatforge.config import load_file
from chatforge.data.clean import scrub_pii
from chatforge.errors import ChatforgeError
from chatforge.safety.classifier import SafetyClassifier

ACTIONS = ("allow", "redact", "refuse")
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]")
DEFAULT_MESSAGE = "This request was blocked by the content policy ({category})."
HOLD_BACK = 64  # characters StreamGuard holds back: longer than any block-listed word


@dataclass
class Category:
    name: str
    action: str
    pattern: re.Pattern | None = None
    message: str = ""


@dataclass
class Decision:
    category: str
    action: str
    matched: str
    score: float = 1.0

    def to_json(self) -> dict:
        return {
            "category": self.category,
            "action": self.action,
            "matched": self.matched[:200],
            "score": round(self.score, 4),
        }


@dataclass
class Checked:
    text: str  # after redaction
    decisions: list[Decision] = field(default_factory=list)
    refused: Decision | None = None
    message: str = ""  # what to tell the user when refused
    classifier_score: float | None = None  # P(positive), when the policy has a classifier and it ran


def _word_pattern(word: str) -> str:
    escaped = re.escape(word)
    return escaped if CJK.search(word) else rf"(?<!\w){escaped}(?!\w)"


def _category(name: str, spec: dict, source: str) -> Category:
    if not isinstance(spec, dict):
        raise ChatforgeError(f"{source}: category '{name}' must be a table of words, regexes, action and message")
    unknown = set(spec) - {"words", "regexes", "action", "message"}
    if unknown:
        raise ChatforgeError(f"{source}: category '{name}' has unknown key(s) {', '.join(sorted(unknown))}")
    action = spec.get("action", "refuse")
    if action not in ACTIONS:
        raise ChatforgeError(f"{source}: category '{name}' action must be one of {', '.join(ACTIONS)}; got {action!r}")
    words, regexes = spec.get("words", []), spec.get("regexes", [])
    if not isinstance(words, list) or not isinstance(regexes, list) or not (words or regexes):
        raise ChatforgeError(f"{source}: category '{name}' needs a non-empty list of 'words' or 'regexes'")
    parts = [_word_pattern(str(w)) for w in words if str(w).strip()]
    for regex in regexes:
        try:
            re.compile(regex)
        except re.error as exc:
            raise ChatforgeError(f"{source}: category '{name}' regex {regex!r} does not compile: {exc}") from None
        parts.append(f"(?:{regex})")
    return Category(name, action, re.compile("|".join(parts), re.IGNORECASE), str(spec.get("message", "")))


@dataclass
class Policy:
    categories: list[Category] = field(default_factory=list)
    pii_action: str = "redact"
    classifier_path: str = ""
    classifier_threshold: float = 0.5
    classifier_action: str = "refuse"
    classifier_window: int = 400
    classifier_message: str = ""

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        return cls.from_dict(load_file(path, "safety policy"), str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "safety policy") -> "Policy":
        if not isinstance(raw, dict):
            raise ChatforgeError(f"{source}: the policy must be a table")
        unknown = set(raw) - {"pii", "categories", "classifier"}
        if unknown:
            raise ChatforgeError(
                f"{source}: unknown section(s) {', '.join(sorted(unknown))} (pii, categories, classifier)"
            )
        sections = {
            "pii": raw.get("pii", {}),
            "categories": raw.get("categories", {}),
            "classifier": raw.get("classifier", {}),
        }
        for name, section in sections.items():
            if not isinstance(section, dict):
                raise ChatforgeError(f"{source}: '{name}' must be a table; got {type(section).__name__}")
        classifier = sections["classifier"]
        unknown = set(classifier) - {"path", "threshold", "action", "window", "message"}
        if unknown:
            raise ChatforgeError(f"{source}: classifier has unknown key(s) {', '.join(sorted(unknown))}")
        try:
            threshold, window = float(classifier.get("threshold", 0.5)), int(classifier.get("window", 400))
        except (TypeError, ValueError):
            raise ChatforgeError(f"{source}: classifier threshold must be a number and window an integer") from None
        if not 0 < threshold <= 1 or window < 16:
            raise ChatforgeError(
                f"{source}: classifier threshold must be in (0, 1] and window at least 16 characters; "
                f"got {threshold} and {window}"
            )
        policy = cls(
            [_category(name, spec, source) for name, spec in sections["categories"].items()],
            sections["pii"].get("action", "redact"),
            str(classifier.get("path", "")),
            threshold,
            classifier.get("action", "refuse"),
            window,
            str(classifier.get("message", "")),
        )
        for name, action, allowed in (
            ("pii", policy.pii_action, ACTIONS),
            ("classifier", policy.classifier_action, ("allow", "refuse")),
        ):
            if action not in allowed:
                raise ChatforgeError(f"{source}: {name} action must be one of {', '.join(allowed)}; got {action!r}")
        return policy


class FilterPipeline:
    """Checks text against a policy; ``classify(texts) -> scores`` is the classifier, when the policy has one."""

    def __init__(self, policy: Policy | None = None, classify=None):
        self.policy = policy or Policy()
        self.classify = classify
        if self.policy.classifier_path and classify is None:
            self.classify = SafetyClassifier.load(self.policy.classifier_path).score

    def check(self, text: str, classify: bool = True) -> Checked:
        """Block-lists, then PII, then (with ``classify``) the classifier, on ``text``."""
        checked = Checked(text)
        for category in self.policy.categories:
            matches = list(category.pattern.finditer(checked.text))
            if not matches:
                continue
            checked.decisions += [Decision(category.name, category.action, m.group()) for m in matches]
            if category.action == "refuse":
                return self._refuse(checked, checked.decisions[-len(matches)], category.message)
            if category.action == "redact":
                checked.text = category.pattern.sub(f"[{category.name}]", checked.text)
        scrubbed, counts = scrub_pii(checked.text)
        if counts:
            checked.decisions.append(Decision("pii", self.policy.pii_action, ", ".join(sorted(counts))))
            if self.policy.pii_action == "refuse":
                return self._refuse(checked, checked.decisions[-1], "")
            if self.policy.pii_action == "redact":
                checked.text = scrubbed
        if classify and self.classify is not None:
            self.judge(checked, checked.text)
        return checked

    def classifier_score(self, text: str) -> tuple[float, str]:
        """The classifier's highest P(positive) over windows of ``text`` overlapping by half, and that window."""
        size = self.policy.classifier_window
        windows = [text[start : start + size] for start in range(0, max(len(text) - size, 0) + size // 2, size // 2)]
        windows = [w for w in windows if w.strip()]
        if not windows:
            return 0.0, ""
        scores = np.asarray(self.classify(windows), dtype=np.float64)
        return float(scores.max()), windows[int(scores.argmax())]

    def judge(self, checked: Checked, text: str) -> None:
        """Add the classifier's verdict on ``text`` (part or all of ``checked.text``) to ``checked``."""
        score, window = self.classifier_score(text)
        checked.classifier_score = max(score, checked.classifier_score or 0.0)
        if score >= self.policy.classifier_threshold:
            decision = Decision("classifier", self.policy.classifier_action, window, score)
            checked.decisions.append(decision)
            if decision.action == "refuse":
                self._refuse(checked, decision, self.policy.classifier_message)

    @staticmethod
    def _refuse(checked: Checked, decision: Decision, message: str) -> Checked:
        checked.refused = decision
        checked.message = message or DEFAULT_MESSAGE.format(category=decision.category)
        return checked

    def scores(self, text: str) -> dict[str, float]:
        """Per category, 1.0 when it matched (the classifier's probability for the classifier) else 0.0."""
        checked = self.check(text)
        scores = {c.name: 0.0 for c in self.policy.categories} | {"pii": 0.0}
        if self.classify is not None:
            # a refusal before the classifier ran (a block-list hit) still reports the classifier's own score
            scores["classifier"] = (
                checked.classifier_score if checked.classifier_score is not None else self.classifier_score(text)[0]
            )
        for decision in checked.decisions:
            scores[decision.category] = max(scores.get(decision.category, 0.0), decision.score)
        return scores


def load_filters(policy_path: str) -> FilterPipeline | None:
    """The pipeline of a policy file, or None for no path (no filtering)."""
    return FilterPipeline(Policy.load(policy_path)) if policy_path else None


class StreamGuard:
    """Filters an answer while it streams: ``feed(delta)`` returns the text safe to send now; once a refusing
    filter trips, ``tripped`` holds its decision and nothing more is sent."""

    def __init__(self, pipeline: FilterPipeline):
        self.pipeline, self.raw, self.sent = pipeline, "", 0
        self.tripped: Decision | None = None
        self.decisions: list[Decision] = []
        # how much of the checked text the classifier has scored, and its decisions so far (kept across deltas:
        # a later check runs the block-lists and PII only)
        self.classified = 0 if pipeline.classify is not None else None
        self.judged: list[Decision] = []

    def _release(self, final: bool) -> str:
        checked = self.pipeline.check(self.raw, classify=False)
        stride = self.pipeline.policy.classifier_window // 2
        if (
            checked.refused is None
            and self.classified is not None
            and (len(checked.text) - self.classified >= stride or (final and len(checked.text) > self.classified))
        ):
            verdict = Checked(checked.text)
            # the new text with half a window before it for context
            self.pipeline.judge(verdict, checked.text[max(0, self.classified - stride) :])
            self.judged += verdict.decisions
            self.classified = len(checked.text)
            if verdict.refused is not None:
                checked.refused = verdict.refused
        checked.decisions += self.judged
        self.decisions = checked.decisions
        if checked.refused is not None:
            self.tripped = checked.refused
            return ""
        end = len(checked.text) if final else max(self.sent, len(checked.text) - HOLD_BACK)
        if self.classified is not None:
            end = min(end, max(self.sent, self.classified))
        out, self.sent = checked.text[self.sent : end], end
        return out

    def feed(self, delta: str) -> str:
        if self.tripped is not None:
            return ""
        self.raw += delta
        return self._release(final=False)

    def finish(self) -> str:
        return "" if self.tripped is not None else self._release(final=True)
