"""Edit training: the edit triples as chat conversations and the loop options of `chatforge edit-train`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from chatforge import io
from chatforge.chat_template import edit_messages, render
from chatforge.config import option
from chatforge.errors import ChatforgeError
from chatforge.train.continued import ContinuedTrainConfig


@dataclass
class EditTrainConfig(ContinuedTrainConfig):
    # held-out loss after 500 steps from the speedrun's SFT model: AdamW 1e-3 0.782, Muon 2e-3 0.744, Muon 6e-3 0.668
    steps: int = option(500, "optimizer steps: the schedule's length (max_minutes may fit it shorter)")
    batch_size: int = option(16, "triples per optimizer step, summed over all processes")
    max_minutes: float = option(3.0, "wall-time budget in minutes (0 = none)")


def read_triples(path: Path) -> list[dict]:
    triples = []
    for number, row in io.read_jsonl(path, "edit triples (run `chatforge edit-data` first, or set --data_dir)"):
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) for k in ("input", "instruction", "output")
        ):
            raise ChatforgeError(f"{path}:{number}: an edit triple needs string 'input', 'instruction' and 'output'")
        triples.append({**row, "type": str(row.get("type") or "user")})
    if not triples:
        raise ChatforgeError(f"{path} holds no edit triples")
    return triples


def fitting(triples: list[dict], tokenizer, block_size: int) -> list[dict]:
    """The triples whose whole rendering fits the context (input + target window of block_size + 1 tokens)."""
    return [
        t
        for t in triples
        if len(render(edit_messages(t["instruction"], t["input"], t["output"]), tokenizer).ids) <= block_size + 1
    ]
