"""Ranking data: the automatic builder's order, human files validated line by line, the stage's splits."""

from __future__ import annotations

import json
import random

import pytest

from chatforge.cli import main
from chatforge.data.rankings import automatic_rankings, concise, read_rankings

POOL = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"question {i}?"}],
         "reference": f"A careful answer number {i} with several words in it."} for i in range(40)]


def test_reference_beats_samples_beat_corruptions():
    records = automatic_rankings(
        POOL[:3], [[("sampled a", True), ("sampled b", True)] for _ in POOL[:3]], random.Random(0)
    )
    first = records[0]
    assert first["completions"][0] == POOL[0]["reference"]
    assert first["completions"][1:3] == ["sampled a", "sampled b"]
    assert first["ranking"] == [[0], [1, 2], [3, 4, 5, 6, 7]]
    corrupted = first["completions"][3:]
    assert corrupted[0] in {p["reference"] for p in POOL[1:3]}  # another prompt's answer
    assert len(corrupted[1]) < len(POOL[0]["reference"])  # truncated
    assert sorted(corrupted[2].split()) == sorted(POOL[0]["reference"].split())  # shuffled
    assert corrupted[4] == "sampled a"  # the model's answer to another prompt, ranked as off topic
    assert first["source"] == "auto" and 4 <= len(first["completions"]) <= 9


def test_unfinished_samples_rank_with_the_corruptions():
    (record,) = automatic_rankings(POOL[:1], [[("ended", True), ("cut off mid", False)]], random.Random(0))
    completions, ranking = record["completions"], record["ranking"]
    assert ranking[0] == [0] and [completions[i] for i in ranking[1]] == ["ended"]
    assert "cut off mid" in [completions[i] for i in ranking[2]] and len(ranking[2]) == 5


def test_concise_reference_ranks_between_reference_and_samples():
    item = {"id": "c", "messages": [{"role": "user", "content": "q?"}],
            "reference": "First point here. Second point follows! Third one is much longer than the budget allows."}
    fits = lambda text: len(text.split()) <= 6  # noqa: E731
    assert concise(item["reference"], fits) == "First point here. Second point follows!"
    assert concise("One sentence only.", fits) is None  # nothing shorter than the whole reference
    (record,) = automatic_rankings([item], [[("sampled", True)]], random.Random(0), fits)
    completions, ranking = record["completions"], record["ranking"]
    assert [completions[i] for i in ranking[1]] == ["First point here. Second point follows!"]
    assert [completions[i] for i in ranking[2]] == ["sampled"] and len(completions) <= 9


def test_human_rankings_are_validated_with_file_and_line(tmp_path):
    good = {
        "prompt": [{"role": "user", "content": "hi"}],
        "completions": ["a", "b", "c", "d"],
        "ranking": [[1], [0, 2]],
    }
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "completions": ["a", "b"]}) + "\n")
    with pytest.raises(Exception, match=r"r.jsonl:2: 2 completions"):
        read_rankings(path)
    path.write_text(json.dumps(good) + "\n")
    (record,) = read_rankings(path)
    assert record["ranking"] == [[1], [0, 2]] and record["source"] == "human"


def test_stage_writes_disjoint_splits_and_counts_sources(tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(p) + "\n" for p in POOL))
    human = tmp_path / "human.jsonl"
    human.write_text(
        json.dumps({"prompt": [{"role": "user", "content": "x"}], "completions": list("abcd"), "ranking": [0, 1, 2, 3]})
        + "\n"
    )
    out = tmp_path / "rankings"
    main(["rankings", f"--prompts={pool}", "--ckpt=", f"--inputs={human}", f"--out_dir={out}", "--val_fraction=0.3",
          "--held_out_prompts=10"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"] == {"auto": 40, "human": 1}
    train, val, held_out = (
        [json.loads(line)["id"] for line in (out / f"{split}.jsonl").read_text().splitlines()]
        for split in ("train", "val", "held_out")
    )
    assert not set(train) & set(val) and len(train) + len(val) == 31
    # the prompts PPO holds out for evaluation reach only the gold reward model's file
    assert held_out == [p["id"] for p in POOL[-10:]] and not set(held_out) & (set(train) | set(val))


def test_missing_reference_is_named(tmp_path, capsys):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"id": "x", "messages": [{"role": "user", "content": "q"}]}) + "\n")
    with pytest.raises(SystemExit):
        main(["rankings", f"--prompts={pool}", "--ckpt=", f"--out_dir={tmp_path / 'o'}"])
    assert "no 'reference' answer" in capsys.readouterr().err


def test_rankings_split_by_their_prompt_not_their_id(tmp_path):
    """Feedback exports carry random ids: the same rankings under new ids split the same way, and every ranking of
    one question sits on one side."""
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(p) + "\n" for p in POOL))
    questions = [f"question {i}" for i in range(30)]

    def export(name: str, ids) -> dict[str, str]:
        path = tmp_path / f"{name}.jsonl"
        rows = [{"id": f"{next(ids)}", "prompt": [{"role": "user", "content": q}], "completions": list("abcd"),
                 "ranking": [0, 1, 2, 3]} for q in questions + questions[:10]]  # 10 questions ranked twice
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = tmp_path / f"out_{name}"
        main(["rankings", f"--prompts={pool}", "--ckpt=", f"--inputs={path}", f"--out_dir={out}",
              "--val_fraction=0.3", "--held_out_prompts=10"])
        sides: dict[str, set] = {}
        for split in ("train", "val"):
            for line in (out / f"{split}.jsonl").read_text().splitlines():
                record = json.loads(line)
                if record["source"] == "human":
                    sides.setdefault(record["prompt"][0]["content"], set()).add(split)
        return sides

    first = export("first", iter(range(1000)))
    second = export("second", iter(range(5000, 6000)))
    assert first == second and len(first) == 30
    assert all(len(s) == 1 for s in first.values())  # both rankings of a question ranked twice on one side
    assert {"train"} in first.values() and {"val"} in first.values()


def test_a_small_export_still_gets_a_validation_question():
    from chatforge.data.rankings import prompt_key, split_by_prompt, split_score

    records = [{"prompt": [{"role": "user", "content": f"q{i}"}]} for i in range(5)]
    seed = next(s for s in range(1000) if all(split_score(prompt_key(r), s) >= 0.1 for r in records))
    splits = split_by_prompt(records, seed, 0.1)  # the hash alone would put every question in train
    assert len(splits["val"]) == 1 and len(splits["train"]) == 4
    assert splits["val"][0] is min(records, key=lambda r: split_score(prompt_key(r), seed))
    assert split_by_prompt(records[:1], seed, 0.1)["val"] == []  # one question cannot be split
