"""train a content classifier (logistic regression on text embeddings) from your labeled JSONL.

    chatforge safety-train --data=labeled.jsonl --positive=toxic                # MiniLM features
    chatforge safety-train --data=labeled.jsonl --embedder=runs/speedrun/embed --out=runs/safety/chatforge
    chatforge safety-train --data=labeled.jsonl --embedder=ngrams --out=runs/safety/ngrams   # no model
    chatforge serve --safety_policy=policy.toml      # whose [classifier] path names the trained model

``data`` has one {"text", "label"} object per line with two labels; ``positive`` is the one the filter acts
on. Texts are embedded by all-MiniLM-L6-v2 (offline), a ``chatforge embed`` model, or turned into hashed
character n-grams (``ngrams``: no model, surface forms only, but the one choice that reads Chinese well:
MiniLM is an English model; see benchmarks/safety_classifier.py). A hash-chosen share is held out, and an
L2-regularised logistic regression (Newton's method in numpy, the objective of
scikit-learn's ``LogisticRegression(C=c)``) is fitted on the rest. The weights are saved as plain arrays
(``classifier.npz``) with ``classifier.json`` (embedder, labels, held-out accuracy), never as a pickle, and
scored with numpy at serving time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chatforge import io
from chatforge.config import option
from chatforge.data.documents import unit_hash
from chatforge.device import resolve_device
from chatforge.errors import ConfigError
from chatforge.safety.classifier import META, WEIGHTS, open_features, read_labeled, train_classifier


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
            raise ConfigError('option \'data\' is required: a JSONL file of {"text", "label"} lines')
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"option 'val_fraction' must be in (0, 1); got {self.val_fraction}")
        if self.c <= 0:
            raise ConfigError(f"option 'c' must be > 0; got {self.c}")


def run(cfg: Config, args: list[str]) -> None:
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
    print(
        f"[safety] {scores['train']} train / {scores['held_out']} held-out texts, features from {cfg.embedder}: "
        f"held-out accuracy {scores['held_out_accuracy']:.1%} (majority class {scores['majority_class']:.1%}); "
        f"wrote {out}"
    )
