"""train a text/code embedding model from a GPT by contrastive pre-training (CPT), then evaluate it.

    chatforge embed                                        # speedrun default: pretrain checkpoint + corpus
    chatforge embed --embedding.kind=similarity --train.batch_size=128 --chunk_size=16

Starts from a chatforge GPT checkpoint (``init_from``). Positive pairs come from the data stage's train
split (``chatforge.embed.data``): neighbouring spans of a document, docstring ↔ function body and comment ↔
code from code documents, user turn ↔ answer from conversations, WordNet lemma ↔ gloss when installed, and
user JSONL pairs. Every other example of the batch is a negative (symmetric InfoNCE, learnable
temperature). The batch is embedded in chunks of ``chunk_size`` texts with gradient caching, so a large
batch — the method's many negatives — costs the memory of one chunk. Under ``torchrun`` each process
embeds its share of the batch and the embeddings are gathered, so negatives span the whole batch. Runs on the
shared training loop (resume, metrics, plots); the model is saved to ``out_dir/embedder`` for
``chatforge search``, ``chatforge serve --embed_ckpt`` and ``chatforge eval-embed``, which then runs on the
held-out splits (``--evaluate=false`` skips it).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

from chatforge import io
from chatforge.config import nested, option
from chatforge.data.documents import read_documents
from chatforge.embed.data import PairBatches, PairConfig, build_pairs
from chatforge.embed.evaluate import EvalConfig, compare
from chatforge.embed.model import ChatforgeEmbedder, EmbeddingModel, EmbedSpec
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.model.checkpoint import load_model, tokenizer_path
from chatforge.tokenizer import Tokenizer
from chatforge.train import distributed
from chatforge.train.embedding import EMBEDDER_DIR, ContrastiveTask, EmbedTrainConfig
from chatforge.train.loop import train


@dataclass
class Config:
    init_from: str = option("runs/speedrun/pretrain", "the GPT checkpoint (or run directory) to start from")
    data_dir: str = option("runs/speedrun/data", "the data stage's output (pretrain_train.jsonl for pairs)")
    out_dir: str = option(
        "runs/speedrun/embed", "checkpoints/, metrics.jsonl, loss.png, summary.json, embedder/, eval/"
    )
    resume: bool = option(False, "continue from out_dir's latest checkpoint")
    max_documents: int = option(4000, "training documents sampled for pairs (0 = all)")
    val_pairs: int = option(128, "held-out pairs (from the val split) for the validation loss")
    chunk_size: int = option(16, "texts embedded per forward pass (gradient caching); memory, not results")
    evaluate: bool = option(True, "run eval-embed on the held-out splits after training")
    minilm: bool = option(True, "compare with all-MiniLM-L6-v2 in the evaluation")
    embedding: EmbedSpec = nested(EmbedSpec, "how texts become vectors")
    pairs: PairConfig = nested(PairConfig, "where positive pairs come from")
    train: EmbedTrainConfig = nested(EmbedTrainConfig, "the shared training loop")

    def validate(self) -> None:
        if self.chunk_size < 1 or self.val_pairs < 2:
            raise ConfigError("options 'chunk_size' must be >= 1 and 'val_pairs' >= 2")
        self.embedding.validate()
        self.pairs.validate()
        self.train.validate()


def run(cfg: Config, args: list[str]) -> None:
    cfg.validate()
    gpt, info = load_model(cfg.init_from)
    tokenizer_file = tokenizer_path(cfg.init_from)
    tokenizer = Tokenizer.load(tokenizer_file)
    data = Path(cfg.data_dir)
    documents = list(read_documents(data / "pretrain_train.jsonl"))
    if cfg.max_documents and len(documents) > cfg.max_documents:
        # a seeded sample, not the first N: the corpus file is ordered by source, code after conversations
        documents = random.Random(cfg.train.seed).sample(documents, cfg.max_documents)
    train_pairs = build_pairs(documents, cfg.pairs, cfg.train.seed)
    no_extras = dataclasses.replace(
        cfg.pairs, wordnet_pairs=0, user_pairs=[]
    )  # held-out pairs come from val documents only
    val_pairs = build_pairs(read_documents(data / "pretrain_val.jsonl"), no_extras, cfg.train.seed)[: cfg.val_pairs]
    if len(val_pairs) < 2:
        raise ChatforgeError(
            f"{data / 'pretrain_val.jsonl'} yields {len(val_pairs)} held-out pairs; at least 2 are needed"
        )
    kinds = {}
    for pair in train_pairs:
        kinds[pair.kind] = kinds.get(pair.kind, 0) + 1
    model = EmbeddingModel(gpt.train(), cfg.embedding.pooling, cfg.embedding.proj_dim)
    task = ContrastiveTask(
        PairBatches(train_pairs, cfg.train.batch_size, cfg.train.seed),
        val_pairs,
        tokenizer,
        cfg.embedding,
        gpt.config.block_size,
        cfg.chunk_size,
    )
    job = distributed.init(cfg.train.device)
    if job.is_main:
        print(
            f"[embed] {len(train_pairs):,} training pairs {kinds}, {len(val_pairs)} held out; "
            f"{cfg.embedding.kind} model from {info['path']}"
        )
    meta = {
        "stage": "embed",
        "init_from": str(info["path"]),
        "model": gpt.config.to_dict(),
        "model_prefix": "gpt.",
        "kind": cfg.embedding.kind,
        "train_pairs": len(train_pairs),
        "pair_kinds": kinds,
        "stage_config": dataclasses.asdict(cfg),
    }
    summary = train(model, task, cfg.train, cfg.out_dir, resume=cfg.resume, meta=meta, tokenizer=tokenizer_file)
    if not job.is_main:
        return
    out = Path(cfg.out_dir)
    embedder = ChatforgeEmbedder(
        model.eval(),
        tokenizer,
        cfg.embedding,
        info={"base": str(info["path"]), "steps": summary["steps"], "pairs": len(train_pairs)},
    )
    embedder.save(out / EMBEDDER_DIR)
    print(f"[embed] embedding model saved to {out / EMBEDDER_DIR}")
    if cfg.evaluate:
        base, _ = load_model(cfg.init_from, device=str(embedder.device))
        results = compare(embedder, base, data, EvalConfig(minilm=cfg.minilm, seed=cfg.train.seed), out / "eval")
        summary["evaluation"] = str(out / "eval" / "summary.md")
        summary["eval_seconds"] = results.get("seconds")
        io.write_json(out / "summary.json", summary)
