"""train the byte-level BPE tokenizer and write token shards.

Reads the data stage's ``pretrain_{train,val,test}.jsonl`` documents (one JSON object with a "text" per line),
trains BPE on the train split (the first ``max_train_chars`` characters), then encodes every split with
tiktoken into ``tokens/{split}.bin`` (each document followed by <|endoftext|>) plus ``tokens/meta.json``.

Outputs in ``out_dir``: ``tokenizer.json``, ``tokens/``, and ``tokenizer_report.json`` with training time,
encoding throughput (tiktoken, and HF tokenizers on a sample of the validation split, with a check that both
give the same ids) and bytes per token on held-out English, Chinese and code. Everything is built in a staging
directory and moved into place only when all of it succeeded, so a failed run leaves the previous outputs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from chatforge import io
from chatforge.config import option
from chatforge.data.documents import read_documents
from chatforge.data.shards import write_shard
from chatforge.data.tokenize import (
    HF_SAMPLE_BYTES,
    REPORT_FILE,
    SPLITS,
    TOKENS_DIR,
    EncodeRun,
    build_report,
    check_inputs,
    compare_encoders,
    print_summary,
    sample_texts,
    split_path,
    staged_output,
    token_chunks,
    training_texts,
)
from chatforge.errors import ConfigError
from chatforge.tokenizer import SPECIAL_TOKENS, Tokenizer


@dataclass
class Config:
    data_dir: str = option("runs/speedrun/data", "directory with the data stage's pretrain_{train,val,test}.jsonl")
    out_dir: str = option("runs/speedrun/tokenizer", "where tokenizer.json, tokenizer_report.json and tokens/ go")
    vocab_size: int = option(8192, "vocabulary size including the 256 byte tokens and the special tokens")
    max_train_chars: int = option(50_000_000, "train BPE on at most this many characters of the train split")
    num_threads: int = option(os.cpu_count() or 1, "threads used to encode the corpus")

    def validate(self) -> None:
        smallest = 256 + len(SPECIAL_TOKENS) + 1
        if not smallest <= self.vocab_size <= 1 << 32:
            raise ConfigError(f"option 'vocab_size' must be between {smallest} and 2**32; got {self.vocab_size}")
        if self.max_train_chars < 1:
            raise ConfigError(f"option 'max_train_chars' must be positive; got {self.max_train_chars}")
        if self.num_threads < 1:
            raise ConfigError(f"option 'num_threads' must be at least 1; got {self.num_threads}")


def run(cfg: Config, args: list[str]) -> None:
    data_dir, out_dir = Path(cfg.data_dir), Path(cfg.out_dir)
    check_inputs(data_dir)

    counter = {"chars": 0}
    start = time.perf_counter()
    tok = Tokenizer.train(training_texts(split_path(data_dir, "train"), cfg.max_train_chars, counter), cfg.vocab_size)
    train_seconds = time.perf_counter() - start
    print(
        f"tokenizer: {tok.vocab_size} tokens trained on {counter['chars'] / 1e6:.1f}M characters in "
        f"{train_seconds:.1f}s"
    )

    with staged_output(out_dir) as staging:
        tok.save(staging)
        runs: dict[str, EncodeRun] = {}
        for split in SPLITS:
            runs[split] = EncodeRun()
            docs = read_documents(split_path(data_dir, split))
            chunks = token_chunks(tok, docs, cfg.num_threads, runs[split])
            write_shard(staging / TOKENS_DIR / f"{split}.bin", chunks, tok.vocab_size, tok.hash)
            tally = runs[split].tally
            print(
                f"tokenizer: {split}: {tally.documents} documents, {tally.bytes / 1e6:.1f} MB -> "
                f"{tally.tokens + tally.documents} tokens"
            )
        encode_bytes = sum(r.tally.bytes for r in runs.values())
        encode_seconds = sum(r.seconds for r in runs.values())
        comparison = compare_encoders(tok, sample_texts(split_path(data_dir, "val"), HF_SAMPLE_BYTES), cfg.num_threads)
        report = build_report(cfg, tok, counter["chars"], train_seconds, runs, encode_bytes, encode_seconds, comparison)
        io.write_json(staging / REPORT_FILE, report)
    print_summary(report, out_dir)
