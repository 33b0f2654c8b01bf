"""Codex-style fine-tuning: the filtered, de-duplicated Python corpus from this machine for `chatforge code`.
"""

from __future__ import annotations

from chatforge.data.code_corpus import build_corpus, default_sources
from chatforge.errors import ChatforgeError
from chatforge.train.continued import Build


def code_corpus(cfg) -> Build:
    """The corpus builder for ``continue_training``: each file followed by ``<|endoftext|>``."""

    def build(tokenizer, block_size: int) -> tuple[dict, dict]:
        corpus = build_corpus(default_sources(cfg.stdlib, cfg.site_packages, cfg.folders), max_bytes=cfg.max_bytes,
                              near_dup_threshold=cfg.near_dup_threshold, val_fraction=cfg.val_fraction,
                              max_files=cfg.max_files)
        if not corpus.train or not corpus.val:
            raise ChatforgeError(
                f"the code corpus left {len(corpus.train)} train and {len(corpus.val)} held-out files; "
                "add sources (--site_packages, --folders) or change --val_fraction"
            )
        splits = {
            split: (ids + [tokenizer.eot_id] for ids in tokenizer.encode_batch(texts))
            for split, texts in (("train", corpus.train), ("val", corpus.val))
        }
        return splits, corpus.summary()

    return build


def describe(counts: dict) -> str:
    return (
        f"{counts['files_kept']} of {counts['files_seen']} files kept ({counts['kept_bytes'] / 1e6:.1f} MB; dropped "
        f"{counts['dropped']}); {counts['train_files']} train files ({counts['train_tokens'] / 1e6:.2f}M tokens), "
        f"{counts['val_files']} held out ({counts['val_tokens'] / 1e3:.0f}k tokens)"
    )
