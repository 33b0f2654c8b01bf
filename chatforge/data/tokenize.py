"""Tokenizer training data and token shards: the corpus read for BPE, encoded in parallel, and the report
(bytes per token by language, tiktoken vs HF agreement). The `chatforge tokenizer` stage runs it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from chatforge.data.documents import read_documents
from chatforge.errors import ChatforgeError
from chatforge.tokenizer import SPLIT_PATTERN, TOKENIZER_FILE, Tokenizer

SPLITS = ("train", "val", "test")
REPORT_FILE = "tokenizer_report.json"
TOKENS_DIR = "tokens"
ENCODE_CHUNK_DOCS = 1024  # documents per encode_batch call: enough to keep every thread busy
HF_SAMPLE_BYTES = 2_000_000  # validation text also encoded with HF tokenizers, for the speed ratio and id check
# A document counts as Chinese when Han characters are at least this share of its non-space characters
CJK_SHARE = 0.3
# ... and as English when it is text/chat with at most this share of non-ASCII characters
NON_ASCII_SHARE = 0.02
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]")
_NON_SPACE = re.compile(r"\S")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def split_path(data_dir: str | Path, split: str) -> Path:
    """Where the data stage writes a split's documents."""
    return Path(data_dir) / f"pretrain_{split}.jsonl"


def check_inputs(data_dir: Path) -> None:
    if not data_dir.is_dir():
        raise ChatforgeError(f"data directory not found: {data_dir} (run `chatforge data` first)")
    for split in SPLITS:
        path = split_path(data_dir, split)
        if not path.is_file():
            raise ChatforgeError(f"{path} not found (run `chatforge data` first)")
        if next(read_documents(path), None) is None:
            raise ChatforgeError(f"{path} holds no documents")


def training_texts(path: Path, max_chars: int, counter: dict) -> Iterator[str]:
    for doc in read_documents(path):
        if counter["chars"] >= max_chars:
            return
        text = doc["text"][: max_chars - counter["chars"]]
        counter["chars"] += len(text)
        yield text


def language_bucket(doc: dict) -> str | None:
    """'code', 'chinese' or 'english' for the bytes-per-token report; None for anything else."""
    if doc.get("kind") == "code":
        return "code"
    text = doc["text"]
    visible = len(_NON_SPACE.findall(text)) or 1
    if len(_HAN.findall(text)) >= CJK_SHARE * visible:
        return "chinese"
    if doc.get("kind") in ("text", "chat") and len(_NON_ASCII.findall(text)) <= NON_ASCII_SHARE * len(text):
        return "english"
    return None


@dataclass
class _Tally:
    documents: int = 0
    bytes: int = 0
    tokens: int = 0

    def add(self, text: str, ids: list[int]) -> None:
        self.documents += 1
        self.bytes += len(text.encode("utf-8"))
        self.tokens += len(ids)

    def summary(self) -> dict | None:
        if not self.documents:
            return None
        return {**asdict(self), "bytes_per_token": round(self.bytes / max(self.tokens, 1), 3)}


@dataclass
class EncodeRun:
    """What encoding one split produced and how long tiktoken took."""

    tally: _Tally = field(default_factory=_Tally)
    by_language: dict[str, _Tally] = field(
        default_factory=lambda: {k: _Tally() for k in ("english", "chinese", "code")}
    )
    seconds: float = 0.0


def token_chunks(tok: Tokenizer, docs: Iterable[dict], num_threads: int, run: EncodeRun) -> Iterator[np.ndarray]:
    """Encoded documents, each followed by <|endoftext|>, one array per chunk of documents."""
    eot = tok.eot_id
    iterator = iter(docs)
    while chunk := list(itertools.islice(iterator, ENCODE_CHUNK_DOCS)):
        texts = [doc["text"] for doc in chunk]
        start = time.perf_counter()
        encoded = tok.encode_batch(texts, num_threads)
        run.seconds += time.perf_counter() - start
        flat: list[int] = []
        for doc, text, ids in zip(chunk, texts, encoded):
            run.tally.add(text, ids)
            bucket = language_bucket(doc)
            if bucket:
                run.by_language[bucket].add(text, ids)
            flat += ids
            flat.append(eot)
        yield np.asarray(flat, dtype=np.int64)


def compare_encoders(tok: Tokenizer, texts: list[str], num_threads: int) -> dict:
    """Encode ``texts`` with tiktoken and with HF tokenizers: MB/s of each and how many texts got different ids."""
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    start = time.perf_counter()
    fast = tok.encode_batch(texts, num_threads)
    middle = time.perf_counter()
    slow = [e.ids for e in tok.hf.encode_batch(texts, add_special_tokens=False)]
    end = time.perf_counter()
    tiktoken_rate, hf_rate = megabytes / max(middle - start, 1e-9), megabytes / max(end - middle, 1e-9)
    return {
        "megabytes": round(megabytes, 3),
        "tiktoken_mb_per_s": round(tiktoken_rate, 2),
        "hf_tokenizers_mb_per_s": round(hf_rate, 2),
        "speedup": round(tiktoken_rate / hf_rate, 2),
        "texts": len(texts),
        "texts_with_different_ids": sum(a != b for a, b in zip(fast, slow)),
    }


def sample_texts(path: Path, max_bytes: int) -> list[str]:
    """Texts of the first documents of ``path``, stopping once ``max_bytes`` of UTF-8 are collected."""
    texts, size = [], 0
    for doc in read_documents(path):
        if size >= max_bytes:
            break
        texts.append(doc["text"])
        size += len(doc["text"].encode("utf-8"))
    return texts


@contextlib.contextmanager
def staged_output(out_dir: Path) -> Iterator[Path]:
    """A scratch directory inside ``out_dir`` whose files replace their counterparts in ``out_dir`` on success."""
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        yield staging
        # shards before tokenizer.json: a crash between renames never pairs a new tokenizer with old shards
        produced = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: p.name == TOKENIZER_FILE)
        for source in produced:
            target = out_dir / source.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_report(
    cfg,
    tok: Tokenizer,
    train_chars: int,
    train_seconds: float,
    runs: dict[str, EncodeRun],
    encode_bytes: int,
    encode_seconds: float,
    comparison: dict,
) -> dict:
    heldout = {name: tally.summary() for name, tally in runs["val"].by_language.items()}
    notes = [
        f"the val split has no {name} documents; its bytes per token is null"
        for name, v in heldout.items()
        if v is None
    ]
    if comparison["texts_with_different_ids"]:
        notes.append(f"tiktoken and HF tokenizers disagreed on {comparison['texts_with_different_ids']} sampled texts")
    return {
        "tokenizer_hash": tok.hash,
        "vocab_size_requested": cfg.vocab_size,
        "vocab_size": tok.vocab_size,
        "special_tokens": dict(tok.specials),
        "split_pattern": SPLIT_PATTERN,
        "train_chars": train_chars,
        "train_seconds": round(train_seconds, 2),
        "num_threads": cfg.num_threads,
        "encode_seconds": round(encode_seconds, 2),
        "encode_mb_per_s": round(encode_bytes / 1e6 / max(encode_seconds, 1e-9), 2),
        "encoder_comparison": comparison,
        "splits": {
            split: {**r.tally.summary(), "shard_tokens": r.tally.tokens + r.tally.documents}
            for split, r in runs.items()
        },
        "bytes_per_token_heldout": heldout,
        "bucket_rules": (
            f"code: kind == 'code'; chinese: Han characters >= {CJK_SHARE:.0%} of non-space characters; "
            f"english: kind text/chat with <= {NON_ASCII_SHARE:.0%} non-ASCII characters"
        ),
        "notes": notes,
    }


def print_summary(report: dict, out_dir: Path) -> None:
    comparison = report["encoder_comparison"]
    print(
        f"tokenizer: encoded at {report['encode_mb_per_s']} MB/s with tiktoken ({report['num_threads']} threads); "
        f"sample: tiktoken {comparison['tiktoken_mb_per_s']} MB/s vs HF {comparison['hf_tokenizers_mb_per_s']} MB/s "
        f"(x{comparison['speedup']}), {comparison['texts_with_different_ids']} of {comparison['texts']} texts differ"
    )
    for name, stats in report["bytes_per_token_heldout"].items():
        figure = (
            f"{stats['bytes_per_token']} bytes/token over {stats['documents']} documents" if stats else "none in val"
        )
        print(f"tokenizer: held-out {name}: {figure}")
    for note in report["notes"]:
        print(f"tokenizer: note: {note}")
    print(f"tokenizer: wrote {out_dir / TOKENIZER_FILE}, {out_dir / TOKENS_DIR}/, {out_dir / REPORT_FILE}")
