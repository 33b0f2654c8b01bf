"""curate the SFT demonstrations, the held-out SFT eval split and the RLHF prompt pool (InstructGPT-style).

Inputs, read in this order (so the conversation cap and the common-prefix rule favour your own data): user
files in the OpenAI chat format (``--inputs``), the serving layer's feedback exports (``--feedback``), then
the ShareGPT hold-out of the data stage (``--holdout``). Every line is a JSON object::

    {"id": "...", "messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...],
     "user_id": "...", "category": "plain"|"few-shot"|"user-based", "source": "..."}

where only ``messages`` is required. A line that is not JSON, has a bad role or a message without string
content stops the stage with an error naming ``file:line``.

Curation, each rule counted in ``manifest.json`` (in the order applied to a conversation):
turns after the last assistant turn are trimmed (no assistant turn, or no user turn: dropped); dropped when an
assistant turn is empty, cut off (see ``cutoff_reason``) or not in ``languages`` (see ``language_id``);
personal information scrubbed (counted by kind); later turns dropped to fit ``max_chars``; exact duplicate
conversations dropped; prompts whose first user turn starts with the same ``prefix_chars`` characters as an
earlier kept prompt dropped; at most ``max_per_user`` prompts per user id; at most ``max_conversations`` kept.

Outputs in ``out_dir``: ``sft_train.jsonl`` and ``sft_val.jsonl`` (whole conversations) and
``rl_prompts.jsonl`` ({"id", "messages" up to and excluding the last assistant answer, "reference": that
answer, ...}), disjoint by conversation, split by ranking a hash of each conversation's content and the
seed (see ``split``); and ``manifest.json`` with the counts. Each file is written atomically, the manifest last.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from chatforge import io
from chatforge.config import option
from chatforge.data.sft_data import LANGUAGES, MANIFEST, SPLIT_FILES, curate, split
from chatforge.errors import ChatforgeError, ConfigError


@dataclass
class Config:
    holdout: str = option(
        "runs/speedrun/data/chat_holdout.jsonl", "ShareGPT hold-out written by `chatforge data` ('' = none)"
    )
    inputs: list[str] = option([], "user JSONL files in the OpenAI chat format (optional user_id, category)")
    feedback: list[str] = option([], "feedback exports of the serving layer (`chatforge feedback export --as sft`)")
    out_dir: str = option("runs/speedrun/sft_data", "writes sft_train/sft_val/rl_prompts.jsonl and manifest.json")
    max_per_user: int = option(200, "at most this many prompts per user id (InstructGPT's cap)")
    prefix_chars: int = option(
        64, "drop a prompt whose first user turn starts with the same this-many characters as a kept one"
    )
    languages: list[str] = option(["en", "zh"], "allowed languages of the assistant turns (en, zh, other)")
    cutoff_min_chars: int = option(400, "an answer this long that stops mid-sentence counts as cut off")
    max_chars: int = option(12_000, "keep at most this many characters of a conversation (whole turns)")
    max_conversations: int = option(5_000, "stop after keeping this many conversations (0 = no cap)")
    val_fraction: float = option(0.05, "share of conversations held out as sft_val", ge=0, lt=1)
    rl_fraction: float = option(0.4, "share of conversations turned into the RLHF prompt pool", ge=0, lt=1)
    rl_history_chars: int = option(
        400, "an RL prompt ends before its conversation's latest answer whose history fits this many characters "
        "(else before the first answer; 0 = before the last answer), so the question fits the models' context", ge=0
    )
    seed: int = option(0, "seed of the split hash")

    def validate(self) -> None:
        for name in ("max_per_user", "prefix_chars", "cutoff_min_chars", "max_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option '{name}' must be positive; got {getattr(self, name)}")
        if self.max_conversations < 0:
            raise ConfigError(f"option 'max_conversations' must be ≥ 0; got {self.max_conversations}")
        unknown = [lang for lang in self.languages if lang not in LANGUAGES]
        if unknown or not self.languages:
            raise ConfigError(f"option 'languages' takes some of {', '.join(LANGUAGES)}; got {self.languages}")
        for name in ("val_fraction", "rl_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"option '{name}' must be in [0, 1); got {getattr(self, name)}")
        if self.val_fraction + self.rl_fraction >= 1:
            raise ConfigError("options 'val_fraction' + 'rl_fraction' must leave some conversations for training")


def run(cfg: Config, args: list[str]) -> None:
    start = time.perf_counter()
    curator, inputs = curate(cfg)
    if not curator.kept:
        raise ChatforgeError(f"no conversation survived curation: {curator.counts()['dropped']}")
    splits = split(curator.kept, cfg)
    out = Path(cfg.out_dir)
    files = {}
    for name, rows in splits.items():
        path = out / SPLIT_FILES[name]
        io.write_jsonl(path, rows)
        files[SPLIT_FILES[name]] = {"rows": len(rows), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    manifest = {
        "inputs": inputs,
        "stopped_at_cap": curator.full,
        "counts": curator.counts(),
        "files": files,
        "by_source": dict(Counter(c.source for c in curator.kept).most_common()),
        "by_category": dict(Counter(c.category for c in curator.kept).most_common()),
        "by_language": dict(Counter(c.language for c in curator.kept).most_common()),
        "seconds": round(time.perf_counter() - start, 3),
        "config": asdict(cfg),
    }
    io.write_json(out / MANIFEST, manifest)
    counts = manifest["counts"]
    dropped = ", ".join(f"{k} {v}" for k, v in counts["dropped"].items() if v)
    print(f"sft-data: read {sum(i['read'] for i in inputs)}, kept {counts['kept']} "
          f"(train {files[SPLIT_FILES['train']]['rows']}, val {files[SPLIT_FILES['val']]['rows']}, "
          f"rl prompts {files[SPLIT_FILES['rl']]['rows']}); dropped: {dropped or 'none'}; "
          f"{manifest['seconds']:.1f}s -> {out}")
