"""The content classifier: labeled JSONL, features (an embedder or hashed character n-grams), logistic
regression fitted in numpy, saved as plain arrays. `chatforge safety-train` (chatforge/stages/safety_train.py)
trains one; the filters score with it.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from chatforge import io
from chatforge.embed.index import open_embedder
from chatforge.errors import ChatforgeError

WEIGHTS, META = "classifier.npz", "classifier.json"


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
                    out[i, zlib.crc32(text[j : j + n].lower().encode()) % self.dims] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def open_features(name: str, device: str | None = None):
    """The embedder behind a classifier: ``ngrams``, ``minilm`` or a ``chatforge embed`` directory."""
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


def train_classifier(
    features: np.ndarray, labels: np.ndarray, held_out: np.ndarray, c: float
) -> tuple[np.ndarray, float, dict]:
    if held_out.all() or not held_out.any():
        raise ChatforgeError("the split left no training or no held-out examples; add data or change --val_fraction")
    if len(set(labels[~held_out])) < 2:
        raise ChatforgeError("the training split has only one label; add examples of both")
    weights, bias = fit_logistic(features[~held_out], labels[~held_out], c)
    predicted = features[held_out] @ weights + bias > 0
    accuracy = float(np.mean(predicted == labels[held_out]))
    majority = float(max(labels[held_out].mean(), 1 - labels[held_out].mean()))
    return (
        weights,
        bias,
        {
            "held_out_accuracy": round(accuracy, 4),
            "majority_class": round(majority, 4),
            "train": int((~held_out).sum()),
            "held_out": int(held_out.sum()),
        },
    )
