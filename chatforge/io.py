"""Atomic file writes (a crash or kill mid-write never leaves a half-written file in place) and the checked readers
of saved files (every failure a ChatforgeError naming the file and, where it has one, the record)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import tempfile
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from chatforge.errors import ChatforgeError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Any) -> int:
    """Write an iterable of dicts as JSON lines; returns how many rows were written."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


@contextlib.contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield an empty staging directory next to ``directory``; on success it replaces ``directory`` whole.

    An existing ``directory`` is moved aside, the staging one renamed into place, then the old one removed, so
    a reader sees the old or the new directory and never a half-written one. On failure nothing changes.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield staging
        old = None
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.rmdir(old)
            os.replace(directory, old)
        os.replace(staging, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class BadRecords:
    """What a reader does with a damaged record (a line, a row, an unreadable file) of a corpus-scale input.

    Policy ``error`` raises the record's ChatforgeError; ``skip`` counts it per file and per reason, keeps the
    first message of each file as an example, and lets the reader go on. ``hint`` ends the error's message (say,
    how to skip instead).
    """

    POLICIES = ("error", "skip")

    def __init__(self, policy: str = "error", hint: str = ""):
        if policy not in self.POLICIES:
            raise ValueError(f"bad-record policy must be one of {self.POLICIES}; got {policy!r}")
        self.policy, self.hint = policy, hint
        self.counts: dict[str, dict[str, int]] = {}
        self.examples: dict[str, str] = {}

    def found(self, path: str | Path, reason: str, message: str) -> None:
        """Raise ``message`` (it names the file and the record) or count it under ``reason``."""
        if self.policy == "error":
            raise ChatforgeError(message + self.hint)
        per_file = self.counts.setdefault(str(path), {})
        per_file[reason] = per_file.get(reason, 0) + 1
        self.examples.setdefault(str(path), message)

    @property
    def total(self) -> int:
        return sum(sum(reasons.values()) for reasons in self.counts.values())

    def as_dict(self) -> dict:
        return {path: {"skipped": reasons, "first": self.examples[path]} for path, reasons in self.counts.items()}


RAISE = BadRecords("error")  # the policy of readers of small, curated files: any damage is an error


def read_lines(path: str | Path, what: str = "file", bad: BadRecords = RAISE) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line of a UTF-8 file (gzip-compressed when it ends in .gz); a missing
    or unreadable file is a ChatforgeError, a line that is not UTF-8 goes to ``bad`` (reason ``not_utf8``), and so
    does the rest of a damaged .gz file (reason ``damaged_gzip``). Lines end only at "\n": JSON text may hold U+2028
    and friends, which ``str.splitlines`` would split."""
    path = Path(path)
    if not path.is_file():
        raise ChatforgeError(f"{what} not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    number = 0
    try:
        with opener(path, "rb") as fh:
            for number, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    bad.found(path, "not_utf8", f"{path}:{number}: not UTF-8 text (byte {exc.start + 1} of the line)")
                    continue
                if line.strip():
                    yield number, line
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        bad.found(path, "damaged_gzip", f"{path}: damaged gzip data after line {number} ({exc})")
    except OSError as exc:
        raise ChatforgeError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def read_jsonl(path: str | Path, what: str = "file", bad: BadRecords = RAISE) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSONL file (gzip-compressed when it ends in .gz); a
    missing file is a ChatforgeError, a line that is not UTF-8 or not JSON goes to ``bad`` (reasons ``not_utf8``,
    ``not_json``), naming the file and line."""
    for number, line in read_lines(path, what, bad):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.found(path, "not_json", f"{path}:{number}: not valid JSON ({exc.msg})")
            continue
        except RecursionError:
            bad.found(path, "not_json", f"{path}:{number}: JSON nested too deeply")
            continue
        yield number, value


def file_record(path: str | Path) -> dict:
    """Size and SHA-256 of a file, recorded when it is written so that damage is recognised when it is read."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def record_mismatch(path: str | Path, expected: dict) -> str | None:
    """How ``path`` differs from its ``file_record`` taken at write time (None when it matches)."""
    size = Path(path).stat().st_size
    if size != expected.get("bytes"):
        return f"{path}: {size} bytes, but {expected.get('bytes')} were written"
    if file_record(path)["sha256"] != expected.get("sha256"):
        return f"{path}: its SHA-256 differs from the one recorded when it was written"
    return None


def read_text(path: str | Path, what: str = "file") -> str:
    """A whole UTF-8 text file; a missing, unreadable or non-UTF-8 file is a ChatforgeError naming it (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise ChatforgeError(f"{what} not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ChatforgeError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ChatforgeError(f"{path}:{line}: not UTF-8 text (byte {exc.start} of the file)") from None


def read_array(path: str | Path, what: str = "array") -> Any:
    """A ``.npy`` array or ``.npz`` archive saved by numpy (never unpickled); a damaged one is a ChatforgeError."""
    path = Path(path)
    if not path.is_file():
        raise ChatforgeError(f"{what} not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {name: loaded[name] for name in loaded.files}
        return loaded
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, MemoryError, SyntaxError,
            tokenize.TokenError) as exc:  # numpy parses a damaged header with Python's own tokenizer
        raise ChatforgeError(f"{what} {path} is damaged: {exc}") from None


def read_json(path: str | Path, what: str = "file") -> dict:
    """The JSON object of a file; a missing, unreadable, non-UTF-8 or non-object file is a ChatforgeError naming it."""
    path = Path(path)
    try:
        value = json.loads(read_text(path, what))
    except json.JSONDecodeError as exc:
        raise ChatforgeError(f"{what} {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except RecursionError:
        raise ChatforgeError(f"{what} {path}: JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise ChatforgeError(f"{what} {path} must hold a JSON object; got {type(value).__name__}")
    return value
