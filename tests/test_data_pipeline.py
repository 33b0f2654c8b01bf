"""`chatforge data`: truncated ShareGPT JSON, user inputs, filters counted, deterministic splits, disjoint hold-out."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatforge.cli import main
from chatforge.data.pipeline import conversation_group
from chatforge.data.sources import ShareGPTStats, roff_text, sharegpt_conversations

LOCAL = ["--stdlib=false", "--debian=false"]


def conversation(i: int, question: str | None = None) -> dict:
    return {"id": f"c{i}_0", "conversations": [
        {"from": "human", "value": question or f"Question number {i}: how do I cook recipe {i} well at home?"},
        {"from": "gpt", "value": f"Answer {i}: " + " ".join(f"step{i}x{j}" for j in range(40))}]}


def sharegpt_file(tmp_path, n: int = 60):
    records = [conversation(i) for i in range(n)]
    records.append({"id": "bad", "conversations": [{"from": "human", "value": "only a question, no answer"}]})
    records.append(conversation(n))
    text = json.dumps(records, indent=2)
    cut = text[: text.rindex('"from": "gpt"') + 20]  # cut off inside the last record, as the package's file is
    path = tmp_path / "sharegpt.json"
    path.write_text(cut)
    return path


def test_truncated_json_keeps_complete_conversations(tmp_path):
    path = sharegpt_file(tmp_path, n=5)
    with pytest.raises(json.JSONDecodeError):
        json.loads(path.read_text())
    stats = ShareGPTStats()
    kept = list(sharegpt_conversations(stats, path))
    assert [c["id"] for c in kept] == [f"c{i}_0" for i in range(5)]
    assert kept[0]["messages"][0]["role"] == "user" and kept[0]["messages"][1]["role"] == "assistant"
    assert stats.kept == 5 and stats.dropped == {"no_answer": 1, "truncated": 1}


def run_stage(tmp_path, *extra):
    out = tmp_path / "data"
    main(["data", f"--out_dir={out}", *LOCAL, *extra])
    return out, json.loads((out / "manifest.json").read_text())


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_holdout_is_disjoint_and_splits_are_deterministic(tmp_path):
    path = sharegpt_file(tmp_path)
    # a pretraining copy of every conversation arrives as a user file: held-out ones must be caught as duplicates
    copies = tmp_path / "copies.jsonl"
    copies.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                        for t in conversation(i)["conversations"]
                    ]
                }
            )
            + "\n"
            for i in range(60)
        )
    )
    out, manifest = run_stage(tmp_path, f"--sharegpt_file={path}", "--holdout_fraction=0.3", f"--inputs={copies}")
    holdout = read(out / "chat_holdout.jsonl")
    pretrain = [d for split in ("train", "val", "test") for d in read(out / f"pretrain_{split}.jsonl")]
    assert 5 < len(holdout) < 35 and manifest["chat_holdout"] == len(holdout)
    held_questions = {c["messages"][0]["content"] for c in holdout}
    assert not any(q in d["text"] for q in held_questions for d in pretrain)
    assert manifest["sharegpt"]["dropped"] == {"no_answer": 1, "truncated": 1}
    assert manifest["filters"]["exact_duplicate"] == 60  # each copy duplicates a held-out or a pretraining conversation
    again, _ = run_stage(tmp_path / "again", f"--sharegpt_file={path}", "--holdout_fraction=0.3", f"--inputs={copies}")
    for name in ("pretrain_train.jsonl", "pretrain_val.jsonl", "chat_holdout.jsonl"):
        assert (out / name).read_text() == (again / name).read_text()


def test_user_inputs_of_every_format_and_filters_counted(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    long_text = " ".join(f"The heron number {i} waits in shallow water {i * 7}." for i in range(60))
    (docs / "a.txt").write_text(long_text)
    (docs / "b.md").write_text("# Notes\n\n" + long_text.replace("number 30 ", "number thirty "))
    (docs / "f.txt").write_text("Questions about the survey go to bob.smith@example.org before Friday, thank you.")
    (docs / "c.jsonl").write_text(
        json.dumps({"text": long_text.replace("number 40 ", "number forty ") + " extra"})
        + "\n"
        + json.dumps(
            {"messages": [{"role": "user", "content": "hi " * 20}, {"role": "assistant", "content": "hello " * 20}]}
        )
        + "\n"
    )
    pq.write_table(
        pa.table({"text": ["Parquet rows are read too, with enough words to pass the length filter.", "tiny"]}),
        docs / "d.parquet",
    )
    (docs / "e.txt").write_text(long_text)  # an exact duplicate of a.txt
    out, manifest = run_stage(tmp_path, "--sharegpt=false", f"--inputs={docs}")
    assert manifest["filters"]["exact_duplicate"] == 1 and manifest["filters"]["too_short"] == 1
    assert manifest["filters"]["near_duplicate"] >= 1  # the one-word variants are nearly a.txt
    assert manifest["pii_replacements"] == {"EMAIL": 1}
    texts = [d["text"] for split in ("train", "val", "test") for d in read(out / f"pretrain_{split}.jsonl")]
    assert any("Parquet rows" in t for t in texts) and any(t.startswith("User: hi") for t in texts)
    assert not any("bob.smith" in t for t in texts)


def test_bad_inputs_are_named_and_nothing_is_overwritten(tmp_path, capsys):
    good = tmp_path / "good.txt"
    good.write_text("A perfectly fine document with quite enough words in it to be kept. " * 3)
    out, _ = run_stage(tmp_path, "--sharegpt=false", f"--inputs={good}")
    before = (out / "manifest.json").read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok ok"}\n{"nope": 1}\n')
    for inputs, message in [
        (f"{tmp_path / 'missing.txt'}", "input not found"),
        (f"{bad}", "bad.jsonl:2"),
        (f"{tmp_path / 'x.csv'}", "input not found"),
    ]:
        with pytest.raises(SystemExit):
            main(["data", f"--out_dir={out}", *LOCAL, "--sharegpt=false", f"--inputs={inputs}"])
        assert message in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == before
    with pytest.raises(SystemExit):
        main(["data", f"--out_dir={out}", "--sharegpt=false", "--stdlib=false", "--debian=false"])
    assert "nothing to build a corpus from" in capsys.readouterr().err


def test_damaged_records_stop_the_stage_or_are_skipped_and_counted(tmp_path, capsys):
    good = [json.dumps({"text": f"Document {i} holds a sentence about owls long enough to be kept {i}."}).encode()
            for i in range(6)]
    damaged = [b'{"text": "caf\xe9 is latin-1, not UTF-8"}', b'{"text": "cut off in the mid', b'{"title": "no text"}']
    notes = tmp_path / "notes.jsonl"
    notes.write_bytes(b"\n".join([good[0], damaged[0], good[1], damaged[1], good[2], damaged[2], *good[3:]]) + b"\n")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really parquet")
    inputs = f'--inputs={json.dumps([str(notes), str(broken)])}'
    with pytest.raises(SystemExit):
        main(["data", f"--out_dir={tmp_path / 'out'}", *LOCAL, "--sharegpt=false", inputs])
    err = capsys.readouterr().err
    assert "notes.jsonl:2: not UTF-8" in err and "--on_bad_record=skip" in err
    out, manifest = run_stage(tmp_path, "--sharegpt=false", inputs, "--on_bad_record=skip")
    bad = manifest["bad_records"]
    assert bad["skipped"] == 4
    assert bad["files"][str(notes)]["skipped"] == {"not_utf8": 1, "not_json": 1, "no_text": 1}
    assert bad["files"][str(broken)]["skipped"] == {"unreadable_file": 1}
    assert manifest["sources"][f"user:{notes}"]["kept"] == 6
    printed = capsys.readouterr().out
    assert "skipped 4 damaged record(s)" in printed and "not_utf8 1, not_json 1, no_text 1" in printed


def test_helpers():
    assert conversation_group("abc_3") == "abc" and conversation_group("abc") == "abc"
    assert "NAME" in roff_text('.SH NAME\nls \\- list\n.B bold\n.\\" comment') and "comment" not in roff_text(
        '.\\" comment'
    )
