"""evaluate embedders on held-out data: retrieval (MRR@10, recall@1/10) and a linear probe.

Retrieval sets are built from the val/test splits, so no text was trained on: neighbouring spans, docstring
-> function and comment -> code over held-out standard-library files, first sentence -> rest of a text
document, and user turn -> assistant answer of a conversation. In each set query i's one relevant document is
document i; every other document of the set is a distractor. The linear probe (logistic regression on frozen
embeddings, as the CPT paper evaluates) predicts a document's source from its embedding, trained on one half
of a labelled set and scored on the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chatforge.config import nested, option
from chatforge.embed.evaluate import EvalConfig, compare
from chatforge.embed.model import ChatforgeEmbedder
from chatforge.model.checkpoint import load_model


@dataclass
class Config:
    embedder: str = option("runs/speedrun/embed", "the embedding model (a `chatforge embed` output directory)")
    data_dir: str = option("runs/speedrun/data", "directory with the data stage's pretrain_<split>.jsonl files")
    out_dir: str = option("", "where summary.json/.md and retrieval.png go (empty = <embedder>/eval)")
    eval: EvalConfig = nested(EvalConfig, "evaluation sets")
    device: str = option("", "torch device (empty = cuda if available, else cpu)")


def run(cfg: Config, args: list[str]) -> None:
    trained = ChatforgeEmbedder.load(cfg.embedder, device=cfg.device or None)
    base_path = trained.info.get("base")
    base = None
    if base_path and Path(base_path).exists():
        base, _ = load_model(base_path, device=str(trained.device))
    compare(trained, base, cfg.data_dir, cfg.eval, cfg.out_dir or Path(trained.path) / "eval")
