"""Edits: triples built from the corpus, the edit-train stage with per-type scores, `chatforge edit`."""

from __future__ import annotations

import ast
import io
import json

import numpy as np
import pytest
from rapidfuzz.distance import Levenshtein
from train_helpers import make_corpus, tiny_pretrain_args

from chatforge.cli import main
from chatforge.data.edit_data import add_typos, make_triples, rename, without_docstring
from chatforge.evals.edit_eval import apply_edits, cer
from chatforge.infer.loading import EngineOptions, load_engine

FUNCTION = '''def scale(x, factor):
    """Multiply x by factor."""
    # x is the input
    y = x * factor
    return y, "x"
'''
SENTENCE = "However, the committee decided to postpone the meeting until Friday."


def test_typos_are_small_and_renames_touch_only_names():
    rng = np.random.default_rng(0)
    for _ in range(20):
        damaged = add_typos(SENTENCE, rng)
        assert damaged != SENTENCE and 1 <= Levenshtein.distance(damaged, SENTENCE) <= 4
    renamed = rename(FUNCTION, "x", "value")
    assert "def scale(value, factor):" in renamed and "y = value * factor" in renamed
    assert '"""Multiply x by factor."""' in renamed and "# x is the input" in renamed and '"x"' in renamed


def test_docstring_removal_keeps_a_valid_function_and_refuses_a_docstring_only_one():
    node = ast.parse(FUNCTION).body[0]
    stripped = without_docstring(FUNCTION, node)
    assert '"""' not in stripped and ast.parse(stripped).body[0].name == "scale"
    only_doc = 'def f():\n    """Nothing else."""\n'
    assert without_docstring(only_doc, ast.parse(only_doc).body[0]) is None


def test_every_type_is_built_from_prose_and_code_documents():
    docs = [{"text": SENTENCE + " " + SENTENCE.replace("Friday", "Monday"), "kind": "text"},
            {"text": FUNCTION + "\n\n" + FUNCTION.replace("scale", "shift").replace("*", "+"), "kind": "code"}] * 5
    triples = make_triples(docs, ["spelling", "capitalization", "punctuation", "rename", "docstring"], 3, 240,
                           np.random.default_rng(0))
    kinds = {t["type"] for t in triples}
    assert kinds == {"spelling", "capitalization", "punctuation", "rename", "docstring"}
    assert all(t["input"] != t["output"] for t in triples)
    rename_triple = next(t for t in triples if t["type"] == "rename")
    old, new = rename_triple["instruction"].rstrip(".").split()[-3::2]
    assert rename(rename_triple["input"], old, new) == rename_triple["output"]


def test_cer_is_levenshtein_over_reference_length():
    assert cer("abc", "abc") == 0 and cer("abd", "abc") == pytest.approx(1 / 3) and cer("", "abcd") == 1


def _docs(root):
    (root / "pretrain_train.jsonl").write_text(
        "\n".join(json.dumps({"text": f"Line {i}, with commas. " + SENTENCE, "kind": "text"}) for i in range(30)) + "\n"
    )
    (root / "pretrain_val.jsonl").write_text(json.dumps({"text": FUNCTION, "kind": "code"}) + "\n")
    (root / "pretrain_test.jsonl").write_text(json.dumps({"text": "Hello, there. " + SENTENCE, "kind": "text"}) + "\n")
    return root


def test_edit_data_writes_splits_with_user_triples_and_names_a_bad_line(tmp_path, capsys):
    data = _docs(tmp_path)
    user = tmp_path / "mine.jsonl"
    user.write_text(
        "".join(
            json.dumps({"input": f"colour {i}", "instruction": "Use US spelling.", "output": f"color {i}"}) + "\n"
            for i in range(20)
        )
    )
    main(
        [
            "edit-data",
            f"--data_dir={data}",
            f"--out_dir={tmp_path / 'out'}",
            f"--inputs={user}",
            "--user_val_fraction=0.3",
        ]
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["train"]["user"] + manifest["val"]["user"] == 20 and manifest["val"]["user"] >= 1
    assert (
        manifest["train"]["capitalization"] >= 1
        and manifest["val"].get("rename", 0) + manifest["val"].get("docstring", 0) >= 1
    )
    user.write_text('{"input": "x", "instruction": "", "output": "y"}\n')
    with pytest.raises(SystemExit):
        main(["edit-data", f"--data_dir={data}", f"--out_dir={tmp_path / 'out2'}", f"--inputs={user}"])
    assert "mine.jsonl:1" in capsys.readouterr().err


WORDS = ["the cat sat", "a dog ran", "we like tea", "it is cold", "you can go", "they ate"]


def _triples(path, count: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        text = str(rng.choice(WORDS))
        rows.append({"type": "capitalization", "instruction": "Capitalize.", "input": text, "output": text.upper()})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow
def test_edit_train_lowers_held_out_loss_scores_each_type_and_edit_cli_uses_the_model(tmp_path, capsys, monkeypatch):
    base = tmp_path / "base"
    main(["pretrain", *tiny_pretrain_args(make_corpus(tmp_path / "tok"), base, model__block_size=160)])
    data = tmp_path / "edit_data"
    data.mkdir()
    _triples(data / "edit_train.jsonl", 64, 0)
    _triples(data / "edit_val.jsonl", 6, 1)
    out = tmp_path / "edit"
    main(
        [
            "edit-train",
            f"--data_dir={data}",
            f"--init_from={base}",
            f"--out_dir={out}",
            "--train.steps=40",
            "--train.batch_size=8",
            "--train.lr=5e-3",
            "--train.warmup_steps=4",
            "--train.max_minutes=0",
            "--train.dtype=fp32",
            "--train.compile=false",
            "--train.device=cpu",
            "--train.progress=false",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_loss"] < summary["base_val_loss"] - 1.0
    score = summary["edits"]["capitalization"]
    held_out = [json.loads(line) for line in (data / "edit_val.jsonl").read_text().splitlines()]
    unchanged = np.mean([cer(t["input"], t["output"]) for t in held_out])
    assert (
        score["count"] == 6
        and 0 <= score["exact_match"] <= 1
        and score["unchanged_cer"] == pytest.approx(unchanged, abs=1e-4)
    )
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("we like tea\n"))
    main(["edit", f"--ckpt={out}", "--instruction=Capitalize.", "--device=cpu"])
    engine = load_engine(EngineOptions(ckpt=str(out), device="cpu"))
    assert capsys.readouterr().out == apply_edits(engine, [("Capitalize.", "we like tea")])[0] + "\n"
    with pytest.raises(SystemExit):
        main(["edit", f"--ckpt={out}", "--device=cpu"])
    assert "instruction" in capsys.readouterr().err
