"""Encoding speed of tiktoken vs HF tokenizers on the same trained vocabulary, and whether their ids agree.

    .venv/bin/python benchmarks/tokenizer_encode.py [TOKENIZER_DIR] [DOCUMENTS.jsonl] [--max-mb 10] [--threads 2]

Defaults to the speedrun's tokenizer and validation split.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from chatforge.config import die
from chatforge.data.tokenize import compare_encoders, sample_texts
from chatforge.errors import ChatforgeError
from chatforge.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokenizer", nargs="?", default="runs/speedrun/tokenizer")
    parser.add_argument("documents", nargs="?", default="runs/speedrun/data/pretrain_val.jsonl")
    parser.add_argument("--max-mb", type=float, default=10.0, help="encode at most this many MB of text")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    try:
        tok = Tokenizer.load(args.tokenizer)
        if not Path(args.documents).is_file():
            raise ChatforgeError(f"documents not found: {args.documents}")
        texts = sample_texts(Path(args.documents), int(args.max_mb * 1e6))
    except ChatforgeError as exc:
        die(str(exc))
    result = compare_encoders(tok, texts, args.threads)
    print(f"{result['megabytes']} MB in {result['texts']} documents, vocab {tok.vocab_size}, {args.threads} threads")
    print(f"tiktoken        {result['tiktoken_mb_per_s']:8.2f} MB/s")
    print(f"HF tokenizers   {result['hf_tokenizers_mb_per_s']:8.2f} MB/s")
    print(f"speedup         {result['speedup']:8.2f}x")
    print(f"documents with different ids: {result['texts_with_different_ids']}")


if __name__ == "__main__":
    main()
