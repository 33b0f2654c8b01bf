"""build tool-use SFT conversations offline: arithmetic through the calculator, definitions through retrieval.

    chatforge tool-data                                  # speedrun default: runs/speedrun/tool_data
    chatforge tool-data --arithmetic=4000 --definitions=1000
    chatforge sft --extra_train=runs/speedrun/tool_data/tool_train.jsonl   # add them to SFT
    chatforge tool-data --direct --out_dir=runs/tools/direct_data        # the same questions answered without tools

Arithmetic questions (multi-digit products, sums, differences, percentages, in several phrasings) are
answered by a ``calculator`` call whose result the answer repeats. Definition questions are answered by a
``retrieval`` call whose result is the dictionary entry (WordNet documents of the data stage's corpus).
Every conversation is in the one chat template's message format with ``tool_calls`` and ``tool`` turns.
``--direct`` writes the same questions (same seed, same held-out set) answered directly, without calls: the
no-tool baseline, fine-tuned on the same questions and answers, that the tool model is compared with.
Writes ``tool_train.jsonl`` and ``tool_val.jsonl`` (SFT data) and ``arithmetic_eval.jsonl`` (held-out
questions with their answers, for ``chatforge eval tools``) to ``out_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chatforge import io
from chatforge.config import option
from chatforge.errors import ConfigError
from chatforge.evals.icl import dictionary
from chatforge.tools.data import arithmetic_question, calculator_conversation, definition_conversation


@dataclass
class Config:
    data_dir: str = option("runs/speedrun/data", "the data stage's out_dir (WordNet entries for definition questions)")
    out_dir: str = option("runs/speedrun/tool_data", "where tool_train.jsonl, tool_val.jsonl, arithmetic_eval.jsonl go")
    arithmetic: int = option(3000, "arithmetic conversations (calculator)")
    definitions: int = option(1000, "definition conversations (retrieval), as many as the corpus has entries")
    val_fraction: float = option(0.05, "share held out as SFT validation")
    eval_questions: int = option(200, "held-out arithmetic questions with answers for `chatforge eval tools`")
    seed: int = option(0, "makes the questions reproducible")
    direct: bool = option(False, "answer directly without calling a tool (the baseline for the same questions)")

    def validate(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"option 'val_fraction' must be in (0, 1); got {self.val_fraction}")
        for name in ("arithmetic", "definitions", "eval_questions"):
            if getattr(self, name) < 0:
                raise ConfigError(f"option '{name}' must be >= 0; got {getattr(self, name)}")


def run(cfg: Config, args: list[str]) -> None:
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    conversations = [calculator_conversation(*arithmetic_question(rng), cfg.direct) for _ in range(cfg.arithmetic)]
    entries = dictionary(cfg.data_dir, limit=cfg.definitions) if cfg.definitions else []
    conversations += [definition_conversation(w, d, rng, cfg.direct) for w, d in entries[: cfg.definitions]]
    order = rng.permutation(len(conversations))
    cut = max(1, int(len(conversations) * cfg.val_fraction))
    rows = [{"messages": conversations[i]} for i in order]
    seen = {c[0]["content"] for c in conversations}
    held_out = []
    while len(held_out) < cfg.eval_questions:
        question, expression, answer = arithmetic_question(rng)
        if question not in seen:  # never a question the model was trained on
            seen.add(question)
            held_out.append({"question": question, "expression": expression, "answer": answer})
    out = Path(cfg.out_dir)
    io.write_jsonl(out / "tool_train.jsonl", rows[cut:])
    io.write_jsonl(out / "tool_val.jsonl", rows[:cut])
    io.write_jsonl(out / "arithmetic_eval.jsonl", held_out)
    how = "answered directly" if cfg.direct else "through the calculator / retrieval"
    print(
        f"[tool-data] {cfg.arithmetic} arithmetic and {min(len(entries), cfg.definitions)} definition "
        f"conversations {how}: "
        f"{len(rows) - cut} train, {cut} val; {len(held_out)} held-out arithmetic questions; wrote {out}"
    )
