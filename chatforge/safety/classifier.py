"""train a content classifier (logistic regression on text embeddings) from your labeled JSONL.

    chatforge safety-train --data=labeled.jsonl --positive=toxic                # MiniLM features
    chatforge safety-train --data=labeled.jsonl --embedder=runs/speedrun/embed --out=runs/safety/chatforge
    chatforge safety-train --data=labeled.jsonl --embedder=ngrams --out=runs/safety/ngrams   # no model
    chatforge serve --safety_policy=policy.toml      # whose [classifier] path names the trained model

``data`` has one {"text", "label"} object per line with two labels; ``positive`` is the one the filter acts
on. Texts are embedded by all-MiniLM-L6-v2 (offline), a ``chatforge embed`` model, or turned into hashed
character n-grams (``ngrams``: no model, surface forms only, but the one choice that reads Chinese well:
MiniLM is an English model; see benchmarks/safety_classifier.py). A hash-chosen share is held out, and an L2-regularised logistic regression (Newton's method in numpy, the objective of
scikit-learn's ``LogisticRegression(C=c)``) is fitted on the rest. The weights are saved as plain arrays
(``classifier.npz``) with ``classifier.json`` (embedder, labels, held-out accuracy), never as a pickle, and
scored with numpy at serving time.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chatforge import io
from chatforge.config import ChatforgeError, ConfigError, option
from chatforge.data.documents import unit_hash

WEIGHTS, META = "classifier.npz", "classifier.json"


@dataclass
class Config:
    data: str = option("", "JSONL of {text, label} with two labels (required)")
    positive: str = option("unsafe", "the label the filter acts on")
    embedder: str = option("minilm", "features: 'minilm', 'ngrams' or a `chatforge embed` output directory")
    out: str = option("runs/safety/classifier", "where classifier.npz and classifier.json go")
    val_fraction: float = option(0.2, "share of the texts held out for the accuracy")
    # embeddings are unit vectors, so C = 1 keeps the logits too small to fit: held-out accuracy of MiniLM
    # features on benchmarks/safety_classifier.py's requests set, 5 random splits, was 0.81 at C = 1, 0.87 at 10
    c: float = option(10.0, "inverse regularisation strength of the logistic regression")
    device: str = option("auto", "device of the embedder")

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("option 'data' is required: a JSONL file of {\"text\", \"label\"} lines")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"option 'val_fraction' must be in (0, 1); got {self.val_fraction}")
        if self.c <= 0:
            raise ConfigError(f"option 'c' must be > 0; got {self.c}")


def read_labeled(path: str, positive: str) -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    for number, row in io.read_jsonl(path, "labeled data"):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or "label" not in row:
            raise ChatforgeError(f"{path}:{number}: a labeled example needs a string 'text' and a 'label'")
        texts.append(row["text"])
        labels.append(str(row["label"]))
    kinds = sorted(set(labels))
    if len(kinds) != 2 or positive not in kinds:
        raise ChatforgeError(f"{path}: needs exactly two labels, one of them '{positive}' (--positive); found {kinds}")
    return texts, np.array([label == positive for label in labels])


class CharNgrams:
    """Hashed character 1-3-grams, L2-normalised: features without a model (and without meaning: an unseen
    word is unknown), for any script, since Chinese has no spaces to split words on."""

    name, dims = "char-ngrams", 4096

    def embed(self, texts: list[str], role: str = "document") -> np.ndarray:
        out = np.zeros((len(texts), self.dims), dtype=np.float32)
        for i, text in enumerate(texts):
            for n in (1, 2, 3):
                for j in range(len(text) - n + 1):
                    out[i, zlib.crc32(text[j:j + n].lower().encode()) % self.dims] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def open_features(name: str, device: str | None = None):
    """The embedder behind a classifier: ``ngrams``, ``minilm`` or a ``chatforge embed`` directory."""
    from chatforge.embed.search_stage import open_embedder

    return CharNgrams() if name == "ngrams" else open_embedder(name, device)


class SafetyClassifier:
    """Logistic regression over an embedder's vectors: ``score(texts)`` is P(positive) per text."""

    def __init__(self, embedder, weights: np.ndarray, bias: float, meta: dict):
        self.embedder, self.weights, self.bias, self.meta = embedder, weights, bias, meta

    def score(self, texts: list[str]) -> np.ndarray:
        logits = self.embedder.embed(texts) @ self.weights + self.bias
        return 1 / (1 + np.exp(-logits))

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None) -> "SafetyClassifier":
        folder = Path(directory)
        if not (folder / WEIGHTS).is_file():
            raise ChatforgeError(f"no safety classifier at {folder} (train one with `chatforge safety-train`)")
        meta = io.read_json(folder / META, "safety classifier metadata")
        arrays = io.read_array(folder / WEIGHTS, "safety classifier weights")
        if not isinstance(meta.get("embedder"), str):
            raise ChatforgeError(f"{folder / META}: 'embedder' must name the classifier's embedder")
        if not isinstance(arrays, dict) or {"weights", "bias"} - set(arrays):
            raise ChatforgeError(f"{folder / WEIGHTS} is damaged: expected arrays 'weights' and 'bias'")
        weights, bias = arrays["weights"], arrays["bias"]
        if weights.ndim != 1 or weights.dtype.kind != "f" or bias.shape != () or bias.dtype.kind != "f":
            raise ChatforgeError(f"{folder / WEIGHTS} is damaged: 'weights' must be a float vector, 'bias' a float")
        embedder = open_features(meta["embedder"], device)
        if getattr(embedder, "dims", getattr(embedder, "dim", len(weights))) != len(weights):
            raise ChatforgeError(f"{folder / WEIGHTS} holds {len(weights)} weights for a {meta['embedder']} embedder")
        return cls(embedder, weights, float(bias), meta)


def fit_logistic(features: np.ndarray, labels: np.ndarray, c: float, max_iter: int = 100) -> tuple[np.ndarray, float]:
    """Minimise ``c * sum(log-loss) + |w|^2 / 2`` (the bias unpenalised) by Newton steps with backtracking.

    Exact second-order steps need no learning rate and converge in a few dozen iterations at the sizes a
    user labels by hand (thousands of texts, a few hundred embedding dimensions).
    """
    x = np.hstack([features.astype(np.float64), np.ones((len(features), 1))])
    y = labels.astype(np.float64)
    penalty = np.ones(x.shape[1])
    penalty[-1] = 0.0

    def loss(theta: np.ndarray) -> float:
        z = x @ theta
        return c * float(np.sum(np.logaddexp(0, z) - y * z)) + 0.5 * float(penalty @ theta**2)

    theta, current = np.zeros(x.shape[1]), loss(np.zeros(x.shape[1]))
    for _ in range(max_iter):
        p = 1 / (1 + np.exp(-(x @ theta)))
        gradient = c * x.T @ (p - y) + penalty * theta
        hessian = c * (x.T * (p * (1 - p))) @ x + np.diag(penalty) + 1e-10 * np.eye(x.shape[1])
        step = np.linalg.solve(hessian, gradient)
        size = 1.0
        while (new := loss(theta - size * step)) > current and size > 1e-8:
            size /= 2
        theta, previous, current = theta - size * step, current, new
        if previous - current <= 1e-10 * max(1.0, abs(current)):
            break
    return theta[:-1], float(theta[-1])


def train_classifier(features: np.ndarray, labels: np.ndarray, held_out: np.ndarray, c: float) -> tuple[np.ndarray, float, dict]:
    if held_out.all() or not held_out.any():
        raise ChatforgeError("the split left no training or no held-out examples; add data or change --val_fraction")
    if len(set(labels[~held_out])) < 2:
        raise ChatforgeError("the training split has only one label; add examples of both")
    weights, bias = fit_logistic(features[~held_out], labels[~held_out], c)
    predicted = features[held_out] @ weights + bias > 0
    accuracy = float(np.mean(predicted == labels[held_out]))
    majority = float(max(labels[held_out].mean(), 1 - labels[held_out].mean()))
    return weights, bias, {"held_out_accuracy": round(accuracy, 4), "majority_class": round(majority, 4),
                           "train": int((~held_out).sum()), "held_out": int(held_out.sum())}


def run(cfg: Config, args: list[str]) -> None:
    from chatforge.device import resolve_device

    cfg.validate()
    texts, labels = read_labeled(cfg.data, cfg.positive)
    embedder = open_features(cfg.embedder, str(resolve_device(cfg.device)))
    held_out = np.array([unit_hash("safety", t) < cfg.val_fraction for t in texts])
    weights, bias, scores = train_classifier(embedder.embed(texts), labels, held_out, cfg.c)
    out = Path(cfg.out)
    with io.atomic_path(out / WEIGHTS) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, weights=weights, bias=np.array(bias))
    meta = {"embedder": cfg.embedder, "positive": cfg.positive, "data": cfg.data, **scores}
    io.write_json(out / META, meta)
    print(f"[safety] {scores['train']} train / {scores['held_out']} held-out texts, features from {cfg.embedder}: "
          f"held-out accuracy {scores['held_out_accuracy']:.1%} (majority class {scores['majority_class']:.1%}); wrote {out}")
