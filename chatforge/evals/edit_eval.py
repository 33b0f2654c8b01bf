"""Edit quality on held-out triples: exact match and character error rate per edit type.

The model rewrites each held-out input by its instruction (the edit template of ``chatforge.chat_template``,
greedy). Character error rate is the Levenshtein distance from the written text to the reference output over
the reference's length. ``unchanged_cer`` is the same rate for returning the input untouched: an edit model
is worth something on a type only when its CER is below that floor.
"""

from __future__ import annotations

import numpy as np
from rapidfuzz.distance import Levenshtein

from chatforge.evals.shares import MapShares, whole
from chatforge.infer.edits import apply_edits


def cer(written: str, reference: str) -> float:
    return Levenshtein.distance(written, reference) / max(len(reference), 1)


def evaluate_edits(engine, triples: list[dict], map_shares: MapShares = whole) -> dict:
    """Per type: count, exact match, CER and the unchanged-input CER; plus a few samples per type. ``map_shares``
    runs the rewriting over the triples (under torchrun: each rank its share, see ``chatforge.evals.shares``)."""
    written = map_shares(lambda share, _: apply_edits(engine, share), [(t["instruction"], t["input"]) for t in triples])
    results: dict = {}
    for kind in dict.fromkeys(t["type"] for t in triples):
        rows = [(t, w) for t, w in zip(triples, written) if t["type"] == kind]
        results[kind] = {
            "count": len(rows),
            "exact_match": round(float(np.mean([w.strip() == t["output"].strip() for t, w in rows])), 4),
            "cer": round(float(np.mean([cer(w, t["output"]) for t, w in rows])), 4),
            "unchanged_cer": round(float(np.mean([cer(t["input"], t["output"]) for t, _ in rows])), 4),
            "samples": [{"instruction": t["instruction"], "input": t["input"], "output": t["output"], "written": w}
                        for t, w in rows[:3]],
        }
    return results
