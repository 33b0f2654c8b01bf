"""The pretraining corpus: sources read, cleaned, de-duplicated (exact and MinHash) and split by hash.

The `chatforge data` stage (chatforge/stages/data.py) runs it and writes the files.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from chatforge import io
from chatforge.data import sources
from chatforge.data.clean import (
    NearDuplicateIndex,
    codex_filter_reason,
    dedup_key,
    normalize_unicode,
    scrub_pii,
    strip_control_chars,
)
from chatforge.data.documents import unit_hash
from chatforge.errors import ChatforgeError

SPLITS = ("train", "val", "test")
HOLDOUT_FILE = "chat_holdout.jsonl"
MANIFEST_FILE = "manifest.json"


def split_of(doc_id: str, cfg) -> str:
    u = unit_hash(cfg.seed, "split", doc_id)
    return "val" if u < cfg.val_fraction else "test" if u < cfg.val_fraction + cfg.test_fraction else "train"


def conversation_group(conversation_id: str) -> str:
    """ShareGPT splits long conversations into parts "<id>_0", "<id>_1", ...: they belong together."""
    base, sep, part = conversation_id.rpartition("_")
    return base if sep and part.isdigit() else conversation_id


class Cleaner:
    """Applies the filters in order to one document at a time and counts what each did."""

    def __init__(self, cfg):
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


def _sharegpt(cfg, cleaner: Cleaner, tally: SourceTally, holdout: list[dict], stats: sources.ShareGPTStats
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
            pretrain.append(
                {
                    "id": f"sharegpt:{conversation['id']}",
                    "text": sources.render_chat_text(conversation["messages"]),
                    "source": "sharegpt",
                    "kind": "chat",
                    "lang": None,
                }
            )
    # the hold-out is reserved first, so pretraining copies of held-out conversations are caught as duplicates
    yield from _capped(pretrain, "sharegpt", cfg.sharegpt_max_chars, cleaner, tally)


def collect(cfg) -> tuple[list[dict], list[dict], dict]:
    """(pretraining documents, held-out conversations, manifest counts)."""
    cleaner, tally, holdout = Cleaner(cfg), SourceTally(), []
    bad = io.BadRecords(cfg.on_bad_record, hint=" (--on_bad_record=skip skips such records and counts them)")
    stats = sources.ShareGPTStats()
    streams: list[Iterable[dict]] = []
    if cfg.sharegpt:
        streams.append(_sharegpt(cfg, cleaner, tally, holdout, stats))
    for spec in cfg.inputs:
        documents = sources.user_documents(spec, bad)
        streams.append(_capped(documents, f"user:{spec}", cfg.inputs_max_chars, cleaner, tally))
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
        counts["sharegpt"] = {
            "complete_conversations": stats.kept,
            "dropped": stats.dropped,
            "held_out": len(holdout),
            "for_pretraining": stats.kept - len(holdout),
        }
    return documents, holdout, counts


def print_summary(manifest: dict, out: Path) -> None:
    print(f"[data] corpus written to {out} in {manifest['seconds']:.0f} s")
    for name, entry in manifest["sources"].items():
        print(f"  {name:<28} read {entry['read']:>7,}  kept {entry['kept']:>7,}  {entry['chars'] / 1e6:7.2f}M chars")
    if "sharegpt" in manifest:
        share = manifest["sharegpt"]
        print(
            f"  sharegpt: {share['complete_conversations']:,} complete conversations, dropped {share['dropped']}, "
            f"{share['held_out']:,} held out for SFT/RLHF"
        )
    bad = manifest["bad_records"]
    if bad["skipped"]:
        print(f"  skipped {bad['skipped']:,} damaged record(s) of --inputs (--on_bad_record=skip):")
        for path, entry in bad["files"].items():
            reasons = ", ".join(f"{reason} {count:,}" for reason, count in entry["skipped"].items())
            print(f"    {path}: {reasons}; first: {entry['first']}")
    print(f"  dropped by filter: {manifest['filters']}")
    print(f"  PII replaced: {manifest['pii_replacements']}")
    print(
        "  splits: "
        + ", ".join(
            f"{k} {v['documents']:,} docs / {v['chars'] / 1e6:.2f}M chars" for k, v in manifest["splits"].items()
        )
    )
