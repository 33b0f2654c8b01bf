"""A Python code corpus from this machine's own installation, filtered and de-duplicated the Codex way.

Sources: the standard library without its tests, optionally site-packages (also without tests) and folders
the user names. Each file goes through, in order: size (> ``max_bytes`` is never even read), UTF-8
decoding, the Codex rules of ``chatforge.data.clean.codex_filter_reason`` (auto-generated, mean line
length > 100, any line > 1000, low alphanumeric share), exact duplicates (case/whitespace-insensitive
hash) and near-duplicates (MinHash LSH over word 5-grams). Every drop is counted under its reason.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from chatforge.data.clean import NearDuplicateIndex, codex_filter_reason, dedup_key
from chatforge.errors import ChatforgeError

# Directories that hold tests, caches or other installations rather than library code.
SKIP_DIRS = {"test", "tests", "testing", "idle_test", "__pycache__", "site-packages", "dist-packages", ".git"}


def is_test_file(name: str) -> bool:
    return name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py"


def python_files(root: str | Path) -> Iterator[Path]:
    """``.py`` files below ``root`` (sorted, symlinked directories not followed), tests and caches skipped."""
    root = Path(root)
    if root.is_file():
        yield root
        return
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS and not d.endswith((".dist-info", ".egg-info")))
        for name in sorted(files):
            if name.endswith(".py") and not is_test_file(name):
                yield Path(directory) / name


def default_sources(stdlib: bool, site_packages: bool, folders: Iterable[str]) -> list[tuple[str, Path]]:
    """(source name, directory) pairs; folders must exist."""
    sources = []
    if stdlib:
        sources.append(("stdlib", Path(sysconfig.get_paths()["stdlib"])))
    if site_packages:
        paths = sysconfig.get_paths()
        for path in dict.fromkeys((paths["purelib"], paths["platlib"])):
            sources.append(("site-packages", Path(path)))
    for folder in folders:
        path = Path(folder).expanduser()
        if not path.exists():
            raise ChatforgeError(f"code folder not found: {folder}")
        sources.append((f"folder:{folder}", path))
    if not sources:
        raise ChatforgeError("no code sources: enable stdlib or site_packages, or name folders")
    return sources


@dataclass
class CodeCorpus:
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # files by outcome: kept, or the reason for the drop
    by_source: dict[str, Counter] = field(default_factory=dict)
    kept_bytes: int = 0

    def summary(self) -> dict:
        files = sum(self.counts.values())
        return {
            "files_seen": files,
            "files_kept": self.counts["kept"],
            "kept_bytes": self.kept_bytes,
            "dropped": {k: v for k, v in sorted(self.counts.items()) if k != "kept"},
            "train_files": len(self.train),
            "val_files": len(self.val),
            "by_source": {name: dict(sorted(c.items())) for name, c in self.by_source.items()},
        }


def _unit_interval(key: bytes) -> float:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2**64


def build_corpus(sources: list[tuple[str, Path]], *, max_bytes: int = 1_000_000, near_dup_threshold: float = 0.8,
                 val_fraction: float = 0.05, max_files: int = 0) -> CodeCorpus:
    """Read, filter, de-duplicate and split the sources' Python files (files split by a hash of their content).

    ``max_files`` > 0 keeps a pseudo-random (hash-ordered, so reproducible) subset of the candidate files,
    for quick runs. ``near_dup_threshold`` 0 checks exact duplicates only.
    """
    candidates: list[tuple[str, Path]] = []
    seen_paths: set[Path] = set()
    for name, root in sources:
        for path in python_files(root):
            real = path.resolve()
            if real not in seen_paths:  # the same file reached twice (a folder inside the stdlib, symlinks)
                seen_paths.add(real)
                candidates.append((name, path))
    if max_files:
        candidates = sorted(candidates, key=lambda c: _unit_interval(str(c[1]).encode()))[:max_files]
    corpus = CodeCorpus()
    exact: set[bytes] = set()
    near = NearDuplicateIndex(threshold=near_dup_threshold) if near_dup_threshold > 0 else None
    for name, path in candidates:
        outcome, text = _check_file(path, max_bytes)
        if outcome is None:
            key = dedup_key(text)
            if key in exact:
                outcome = "exact_duplicate"
            else:
                exact.add(key)
                if near is not None and near.add(str(path), text) is not None:
                    outcome = "near_duplicate"
        outcome = outcome or "kept"
        corpus.counts[outcome] += 1
        corpus.by_source.setdefault(name, Counter())[outcome] += 1
        if outcome == "kept":
            corpus.kept_bytes += len(text.encode("utf-8"))
            (corpus.val if _unit_interval(key) < val_fraction else corpus.train).append(text)
    return corpus


def _check_file(path: Path, max_bytes: int) -> tuple[str | None, str]:
    """(reason the file is dropped or None, its text)."""
    try:
        if path.stat().st_size > max_bytes:
            return "too_large", ""
        raw = path.read_bytes()
    except OSError:
        return "unreadable", ""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not_utf8", ""
    text = text.replace("\r\n", "\n")
    if not text.strip():
        return "empty", ""
    return codex_filter_reason(text, max_bytes=max_bytes), text
