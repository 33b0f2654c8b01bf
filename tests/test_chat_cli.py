"""`chatforge chat`: answers through the shared chat template, multi-turn memory, context trimming, commands."""

from __future__ import annotations

import io as stdio
import json

import pytest
import torch

from chatforge.chat_template import prompt_ids
from chatforge.cli import main
from chatforge.infer.engine import Engine
from chatforge.infer.params import SamplingParams
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.hf import export_hf_gpt2
from chatforge.serve.terminal import Conversation
from chatforge.tokenizer import Tokenizer

pytest.importorskip("chatforge.model.checkpoint")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello there!"] * 4
GREEDY = ["--temperature=0", "--top_p=1", "--repetition_penalty=1", "--max_tokens=6"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tokenizer = Tokenizer.train(TEXTS, vocab_size=300)
    tokenizer.save(root / "tok")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    export_hf_gpt2(model, root / "ckpt")
    args = [f"--ckpt={root / 'ckpt'}", f"--tokenizer={root / 'tok'}", "--device=cpu", *GREEDY]
    return Engine(model, tokenizer), args, root


def _expected_answer(engine, messages):
    ids = prompt_ids(messages, engine.tokenizer)
    return engine.generate([ids], SamplingParams(temperature=0, max_tokens=6))[0].choices[0].text.strip()


def test_stdin_message_is_answered_through_the_chat_template(setup, capsys, monkeypatch):
    engine, args, _ = setup
    monkeypatch.setattr("sys.stdin", stdio.StringIO("Hello world\n"))
    main(["chat", *args, "--system=Be brief."])
    expected = _expected_answer(
        engine, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    )
    assert capsys.readouterr().out == expected + "\n"


def test_positional_messages_are_one_conversation(setup, capsys):
    engine, args, _ = setup
    main(["chat", *args, "Hello", "The quick"])
    first = _expected_answer(engine, [{"role": "user", "content": "Hello"}])
    second = _expected_answer(
        engine,
        [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "The quick"},
        ],
    )
    assert capsys.readouterr().out.splitlines() == [first, second]


def test_memory_drops_oldest_turns_but_keeps_the_system_prompt(setup):
    engine, _, _ = setup
    chat = Conversation(engine, SamplingParams(temperature=0, max_tokens=6), system="Be brief.")
    for i in range(12):  # 12 turns of ~10 tokens overflow the 64-token context
        chat.answer(f"Hello world number {i}")
    assert chat.messages[0] == {"role": "system", "content": "Be brief."}
    assert chat.messages[1]["role"] == "user" and chat.messages[1]["content"] != "Hello world number 0"
    assert chat.messages[-2]["content"] == "Hello world number 11"
    assert len(prompt_ids(chat.messages[:-1], engine.tokenizer)) <= engine.block_size - 6


def test_interactive_commands(setup, capsys, monkeypatch, tmp_path):
    _, args, _ = setup
    saved = tmp_path / "conv.json"
    lines = iter(["/system Be kind.", "Hello", f"/save {saved}", "/reset", "/bogus", "/quit"])
    monkeypatch.setattr("sys.stdin.isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    main(["chat", *args])
    out = capsys.readouterr().out
    assert "(system prompt set)" in out and "unknown command /bogus" in out
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]


def test_bad_messages_file_is_named(setup, capsys, tmp_path):
    _, args, _ = setup
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}))
    with pytest.raises(SystemExit):
        main(["chat", *args, f"--messages_file={bad}", "hi"])
    assert "role 'robot'" in capsys.readouterr().err


def test_a_max_tokens_as_long_as_the_context_still_leaves_the_prompt_room():
    """The chat defaults (max_tokens 256) on a 256-token model: the answer gets at most half the context."""
    from serve_helpers import tiny_engine

    from chatforge.infer.params import SamplingParams
    from chatforge.serve.terminal import Conversation

    engine = tiny_engine(block_size=64)
    chat = Conversation(engine, SamplingParams(temperature=0, max_tokens=64))
    for _ in range(3):  # the conversation outgrows the context and is trimmed, never refused
        assert isinstance(chat.answer("Hello world, hello there! " * 2), str)
    assert chat.messages[-1]["role"] == "assistant"
