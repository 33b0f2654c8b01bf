"""`chatforge generate` end to end on a tiny exported checkpoint and a tiny tokenizer made here."""

import io
import json

import pytest
import torch

from chatforge.cli import main
from chatforge.infer.engine import Engine
from chatforge.infer.loading import unescape
from chatforge.infer.params import SamplingParams
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.hf import export_hf_gpt2
from chatforge.tokenizer import Tokenizer

# the stage loads checkpoints through chatforge.model.checkpoint (an HF GPT-2 directory is one of its formats)
pytest.importorskip("chatforge.model.checkpoint")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello there!"] * 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    tokenizer = Tokenizer.train(TEXTS, vocab_size=300)
    tokenizer.save(root / "tok")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    export_hf_gpt2(model, root / "ckpt")
    args = [f"--ckpt={root / 'ckpt'}", f"--tokenizer={root / 'tok'}", "--device=cpu"]
    return Engine(model, tokenizer), args, root


def _greedy_text(engine, prompt, max_tokens=8):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return engine.generate([prompt], params)[0].choices[0].text


def test_streams_the_greedy_completion_of_a_positional_prompt(setup, capsys):
    engine, args, _ = setup
    main(["generate", "The quick", *args, "--temperature=0", "--max_tokens=8"])
    assert capsys.readouterr().out == _greedy_text(engine, "The quick") + "\n"


def test_prompts_file_batch_mode_and_jsonl_output(setup, capsys):
    engine, args, root = setup
    (root / "prompts.txt").write_text("The quick\n\nHello world\n")
    out = root / "out.jsonl"
    main(["generate", *args, f"--prompts_file={root / 'prompts.txt'}", "--temperature=0", "--max_tokens=8",
          "--stream=false", f"--output={out}"])
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The quick", "Hello world"]
    assert [r["choices"][0]["text"] for r in rows] == [
        _greedy_text(engine, "The quick"),
        _greedy_text(engine, "Hello world"),
    ]
    assert "=== prompt 1 ===" in printed and "=== prompt 2 ===" in printed


def test_reads_the_prompt_from_stdin_and_prints_logprobs(setup, capsys, monkeypatch):
    engine, args, _ = setup
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello world\n"))
    main(["generate", *args, "--temperature=0", "--max_tokens=4", "--logprobs=2", "--echo"])
    printed = capsys.readouterr().out
    assert printed.startswith("Hello world" + _greedy_text(engine, "Hello world", 4) + "\n")
    assert "[log-probs of the generated tokens]" in printed and "[log-probs of the prompt]" in printed


def test_samples_and_beams(setup, capsys):
    _, args, _ = setup
    main(["generate", "The", *args, "--n=2", "--seed=1", "--max_tokens=5"])
    assert "sample 2 ===" in capsys.readouterr().out
    main(["generate", "The", *args, "--beam_width=3", "--n=2", "--max_tokens=5"])
    printed = capsys.readouterr().out
    assert "beam 1: score" in printed and "beam 2: score" in printed and "beam 3" not in printed


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temperature=-1"], "option 'temperature' must be >= 0; got -1.0"),
        (["--top_p=0"], "option 'top_p' must be > 0; got 0.0"),
        (["--temprature=0.5"], "unknown option 'temprature'"),
        (["--prompts_file=/nonexistent/prompts.txt"], "prompts file not found"),
        (["--beam_width=2", "--n=3"], "cannot exceed 'beam_width'"),
        (["--max_tokens=62"], "exceeds the model's context of 64"),
    ],
)
def test_bad_settings_are_one_clear_error_line(setup, capsys, extra, message):
    _, args, _ = setup
    prompt = [] if any(e.startswith("--prompts_file") for e in extra) else ["The quick"]
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *prompt, *args, *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_missing_checkpoint_is_named(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "x", "--ckpt=/nonexistent/ckpt"])
    assert "checkpoint not found: /nonexistent/ckpt" in capsys.readouterr().err


def test_stop_strings_understand_backslash_escapes():
    assert unescape("\\n\\n") == "\n\n"
    assert unescape("你好\\t🙂") == "你好\t🙂"
    assert unescape("plain") == "plain"
