"""`chatforge sft`: fine-tunes on whole conversations with loss on assistant tokens only, beats the base model."""

from __future__ import annotations

import json

import pytest
import torch

from chatforge.cli import main
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.hf import export_hf_gpt2
from chatforge.tokenizer import Tokenizer

QA = [("What colour is the sky?", "The sky is blue."), ("What is two plus two?", "Two plus two is four."),
      ("Name a fruit.", "An apple is a fruit."), ("Say hello.", "Hello to you too!")]
FAST = ["--train.dtype=fp32", "--train.compile=false", "--train.device=cpu", "--train.progress=false"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    tokenizer = Tokenizer.train([q + " " + a for q, a in QA] * 10, vocab_size=300)
    tokenizer.save(root / "base")
    torch.manual_seed(0)
    export_hf_gpt2(
        GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32)), root / "base"
    )
    data = root / "sft_data"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    rows.append(
        {
            "messages": [
                {"role": "user", "content": "Line\u2028separators"},
                {"role": "assistant", "content": "are text."},
            ]
        }
    )
    # ensure_ascii=False keeps U+2028 raw inside a JSON line, as sft-data writes it: it must not split the line
    (data / "sft_train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows * 4))
    (data / "sft_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, [f"--data_dir={data}", f"--init_from={root / 'base'}", *FAST]


def test_sft_lowers_the_held_out_assistant_loss(setup, capsys):
    root, args = setup
    out = root / "run"
    main(
        [
            "sft",
            *args,
            f"--out_dir={out}",
            "--train.steps=80",
            "--train.batch_size=4",
            "--train.lr=5e-3",
            "--train.warmup_steps=5",
            "--train.max_minutes=0",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_loss"] < summary["base_val_loss"] - 1.0
    assert (out / "loss.png").is_file()
    # the trained model answers through the shared chat template
    main(
        [
            "chat",
            f"--ckpt={out}",
            "--device=cpu",
            "--temperature=0",
            "--top_p=1",
            "--repetition_penalty=1",
            "--max_tokens=12",
            "What colour is the sky?",
        ]
    )
    assert "blue" in capsys.readouterr().out.splitlines()[-1]


def test_missing_data_and_bad_lines_are_named(setup, tmp_path, capsys):
    root, args = setup
    with pytest.raises(SystemExit):
        main(["sft", *args, f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'o'}"])
    assert "not found: " in (err := capsys.readouterr().err) and "sft_train.jsonl" in err
    (tmp_path / "sft_train.jsonl").write_text('{"messages": [{"role": "bot", "content": "x"}]}\n')
    with pytest.raises(SystemExit):
        main(["sft", *args, f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'o'}"])
    assert "sft_train.jsonl:1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
