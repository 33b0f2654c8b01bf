"""Fill-in-the-middle: the PSM/SPM transform, the fim stage against its left-to-right twin, and generate --suffix."""

from __future__ import annotations

import json

import numpy as np
import pytest
from train_helpers import TEXTS, make_corpus, tiny_pretrain_args

from chatforge.cli import main
from chatforge.data.fim import fim_example, insertion_ids, middle_params, transform
from chatforge.evals.fim_eval import make_examples, remove_span
from chatforge.infer.engine import Engine
from chatforge.infer.params import SamplingParams
from chatforge.model.checkpoint import load_model, tokenizer_path, trained_for_fim
from chatforge.tokenizer import Tokenizer
from chatforge.train.fim import chunk_text

TEXT = "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(TEXTS, vocab_size=300)


def _parts(ids: list[int], tokenizer) -> dict[str, list[int]]:
    """The segments between the FIM markers, by the marker that opens them."""
    names = {tokenizer.special_id(f"<|fim_{n}|>"): n for n in ("prefix", "suffix", "middle")}
    parts, current = {}, None
    for token in ids:
        if token in names:
            current = names[token]
            parts[current] = []
        elif current is not None:
            parts[current].append(token)
    return parts


def test_psm_and_spm_reorder_the_document_and_end_the_middle_with_end_of_text(tokenizer):
    rng = np.random.default_rng(0)
    for order, spm_rate in (("psm", 0.0), ("spm", 1.0)):
        for _ in range(20):
            ids = transform(TEXT, tokenizer, rng, fim_rate=1.0, spm_rate=spm_rate)
            assert ids[-1] == tokenizer.eot_id
            parts = _parts(ids[:-1], tokenizer)
            if order == "psm":
                prefix, middle = tokenizer.decode(parts["prefix"]), tokenizer.decode(parts["middle"])
                assert ids[0] == tokenizer.special_id("<|fim_prefix|>")
            else:
                assert ids[:2] == [tokenizer.special_id("<|fim_prefix|>"), tokenizer.special_id("<|fim_suffix|>")]
                assert parts["prefix"] == []
                prefix_and_middle = tokenizer.decode(parts["middle"])
                prefix, middle = prefix_and_middle, ""
            assert prefix + middle + tokenizer.decode(parts["suffix"]) == TEXT


def test_fim_rate_is_the_share_of_rewritten_documents(tokenizer):
    rng = np.random.default_rng(1)
    marker = tokenizer.special_id("<|fim_middle|>")
    rewritten = [marker in transform(TEXT, tokenizer, rng, fim_rate=0.3, spm_rate=0.5) for _ in range(1000)]
    assert 0.25 < np.mean(rewritten) < 0.35
    assert transform(TEXT, tokenizer, rng, fim_rate=0.0, spm_rate=0.5) == tokenizer.encode(TEXT) + [tokenizer.eot_id]


def test_the_insertion_prompt_is_the_training_sequence_up_to_the_middle(tokenizer):
    for order in ("psm", "spm"):
        ids, start = fim_example(tokenizer, "def f(x):\n", "    y = x\n", "    return y\n", order)
        assert ids[:start] == insertion_ids(tokenizer, "def f(x):\n", "    return y\n", order)
        assert tokenizer.decode(ids[start:-1]) == "    y = x\n"


def test_chunks_cut_at_line_ends_and_spans_are_lines_or_words():
    text = "".join(f"line number {i}\n" for i in range(40))
    chunks = chunk_text(text, 100)
    assert "".join(chunks) == text and all(len(c) <= 100 and c.endswith("\n") for c in chunks)
    rng = np.random.default_rng(0)
    code = remove_span(TEXT, "code", rng)
    assert code.middle.endswith("\n") and code.prefix + code.middle + code.suffix == TEXT
    words = remove_span("one two three four five six seven eight nine ten", "text", rng)
    assert 1 <= len(words.middle.split()) <= 4 and words.prefix and words.suffix
    assert len(make_examples([(TEXT, "code")] * 5, count=3, seed=0)) == 3


def _data_dir(root):
    """Documents whose second half copies the first: a span removed from the first half is written in the
    suffix, which only a model trained with FIM can read."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]
    halves = [" ".join(rng.choice(words, size=5)) for _ in range(300)]
    docs = [f"{h} = {h}\n" for h in halves]
    for split, part in (("train", docs[:280]), ("val", docs[280:])):
        (root / f"pretrain_{split}.jsonl").write_text(
            "".join(json.dumps({"text": d, "kind": "text"}) + "\n" for d in part)
        )
    return root


@pytest.mark.slow
def test_fim_stage_beats_its_left_to_right_twin_at_inserting_and_generate_uses_suffix(tmp_path, capsys):
    base = tmp_path / "base"
    main(["pretrain", *tiny_pretrain_args(make_corpus(tmp_path / "tok"), base, model__block_size=64)])
    data = _data_dir(tmp_path)
    common = [
        f"--init_from={base}",
        f"--data_dir={data}",
        "--eval_examples=20",
        "--eval_batches=2",
        "--train.steps=800",
        "--train.batch_size=8",
        "--train.lr=5e-3",
        "--train.warmup_steps=5",
        "--train.max_minutes=0",
        "--train.dtype=fp32",
        "--train.compile=false",
        "--train.device=cpu",
        "--train.progress=false",
    ]
    main(["fim", *common, f"--out_dir={tmp_path / 'fim'}", "--fim_rate=0.9"])
    main(["fim", *common, f"--out_dir={tmp_path / 'twin'}", "--fim_rate=0"])
    fim = json.loads((tmp_path / "fim" / "summary.json").read_text())
    twin = json.loads((tmp_path / "twin" / "summary.json").read_text())
    assert fim["insertion"]["examples"] == twin["insertion"]["examples"] == 20
    # inserting, the FIM model beats its twin given the same prompt, and beats the twin reading the prefix alone
    assert fim["insertion"]["psm"]["middle_loss"] < twin["insertion"]["psm"]["middle_loss"] - 0.3
    assert fim["insertion"]["psm"]["middle_loss"] < twin["insertion"]["left_to_right_middle_loss"] - 0.1
    assert trained_for_fim(tmp_path / "fim") and not trained_for_fim(tmp_path / "twin")
    capsys.readouterr()

    main(
        [
            "generate",
            f"--ckpt={tmp_path / 'fim'}",
            "alpha beta",
            "--suffix=gamma\\n",
            "--temperature=0",
            "--max_tokens=6",
            "--stream=false",
            "--device=cpu",
        ]
    )
    engine = Engine(load_model(tmp_path / "fim")[0], Tokenizer.load(tokenizer_path(tmp_path / "fim")))
    expected = (
        engine.generate(
            [insertion_ids(engine.tokenizer, "alpha beta", "gamma\n")],
            middle_params(engine.tokenizer, SamplingParams(temperature=0, max_tokens=6)),
        )[0]
        .choices[0]
        .text
    )
    assert capsys.readouterr().out == expected + "\n"
    with pytest.raises(SystemExit):
        main(["generate", f"--ckpt={tmp_path / 'twin'}", "alpha", "--suffix=x", "--device=cpu"])
    assert "not trained for insertion" in capsys.readouterr().err
