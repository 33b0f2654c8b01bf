"""build (input, instruction, output) edit triples from the corpus: prose and code, held-out split per type.

    chatforge edit-data                                  # speedrun default: from runs/speedrun/data
    chatforge edit-data --inputs=my_edits.jsonl          # plus your own triples
    chatforge edit-data --max_per_type=1000 --types=spelling,rename

Every triple is made by damaging or changing real text, so the embedded default needs nothing extra:

* ``spelling``: typos injected into a sentence (letters swapped, dropped or doubled) -> "fix the spelling"
* ``capitalization``: the sentence lower-cased -> "restore the capitalization"
* ``punctuation``: the sentence without its punctuation -> "restore the punctuation"
* ``rename``: a Python function with a parameter renamed everywhere it is a name (by the ``tokenize`` module,
  so strings and comments are left alone) -> "rename x to y"
* ``docstring``: a Python function with its docstring removed -> "add a docstring" (the reverse of the
  standard library's own)

Sentences come from the data stage's prose and chat documents, functions from its code documents. Training
triples come from ``pretrain_train.jsonl`` and held-out ones from ``pretrain_{val,test}.jsonl``, so no held-out
sentence or function was seen in training. User triples (JSONL with "input", "instruction", "output" and an
optional "type", default "user") are split by a hash of their input. Writes ``edit_train.jsonl``,
``edit_val.jsonl`` and ``manifest.json`` (counts per type and split) to ``out_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chatforge import io
from chatforge.config import option
from chatforge.data.documents import read_documents, unit_hash
from chatforge.data.edit_data import TYPES, counts, make_triples, read_user_triples
from chatforge.errors import ChatforgeError, ConfigError


@dataclass
class Config:
    data_dir: str = option("runs/speedrun/data", "the data stage's out_dir (pretrain_train.jsonl, pretrain_val.jsonl)")
    out_dir: str = option("runs/speedrun/edit_data", "where edit_train.jsonl, edit_val.jsonl, manifest.json go")
    inputs: list[str] = option([], "also these JSONL files of your own triples (input, instruction, output[, type])")
    types: list[str] = option(list(TYPES), f"edit types to build ({', '.join(TYPES)})")
    max_per_type: int = option(2000, "training triples per type (at most)")
    val_per_type: int = option(40, "held-out triples per type (at most)")
    max_chars: int = option(240, "longest input or output in characters (both must fit the model's context)")
    user_val_fraction: float = option(0.1, "share of user triples held out")
    seed: int = option(0, "makes the damage and the sampling reproducible")

    def validate(self) -> None:
        unknown = sorted(set(self.types) - set(TYPES))
        if unknown or not self.types:
            raise ConfigError(
                f"option 'types' must name some of {', '.join(TYPES)}; got {', '.join(self.types) or 'none'}"
            )
        for name in ("max_per_type", "val_per_type", "max_chars"):
            if getattr(self, name) < 1:
                raise ConfigError(f"option '{name}' must be >= 1; got {getattr(self, name)}")
        if not 0 <= self.user_val_fraction < 1:
            raise ConfigError(f"option 'user_val_fraction' must be in [0, 1); got {self.user_val_fraction}")


def run(cfg: Config, args: list[str]) -> None:
    cfg.validate()
    data = Path(cfg.data_dir)
    rng = np.random.default_rng(cfg.seed)
    train_docs = list(read_documents(data / "pretrain_train.jsonl"))
    val_docs = [doc for split in ("val", "test") for doc in read_documents(data / f"pretrain_{split}.jsonl")]
    train = make_triples(train_docs, cfg.types, cfg.max_per_type, cfg.max_chars, rng)
    val = make_triples(val_docs, cfg.types, cfg.val_per_type, cfg.max_chars, rng)
    for path in cfg.inputs:
        for triple in read_user_triples(path):
            (val if unit_hash("edit", triple["input"]) < cfg.user_val_fraction else train).append(triple)
    empty = [t for t in cfg.types if not any(x["type"] == t for x in val)]
    if not train:
        raise ChatforgeError(f"no edit triples could be built from {data}; run `chatforge data` first or pass --inputs")
    out = Path(cfg.out_dir)
    io.write_jsonl(out / "edit_train.jsonl", train)
    io.write_jsonl(out / "edit_val.jsonl", val)
    manifest = {
        "train": counts(train),
        "val": counts(val),
        "types_without_held_out": empty,
        "inputs": cfg.inputs,
        "seed": cfg.seed,
    }
    io.write_json(out / "manifest.json", manifest)
    print(
        f"[edit-data] train {manifest['train']}; held out {manifest['val']}"
        + (f"; no held-out triples for {', '.join(empty)}" if empty else "")
        + f"; wrote {out}"
    )
