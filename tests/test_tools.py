"""Tools: the calculator's parser, tool calls in the chat template, the toolset loop, schemas, tool data."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from chatforge.chat_template import TOOL_CALL, parse_tool_calls, render
from chatforge.cli import main
from chatforge.errors import ChatforgeError
from chatforge.infer.params import SamplingParams
from chatforge.tokenizer import Tokenizer
from chatforge.tools.calculator import CalculatorError, calculate, format_number
from chatforge.tools.evaluate import ScriptedTurns, same_number
from chatforge.tools.loop import BANNED, answer_with_tools
from chatforge.tools.registry import CALCULATOR, Tool, check_arguments, run_tool

TEXTS = ["What is 12 times 7? The answer is 84.", '{"name": "calculator", "arguments": {"expression": "12 * 7"}}'] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(TEXTS, vocab_size=300)


@pytest.mark.parametrize("expression, value", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("-2 ** 2", -4), ("2 ** -1", 0.5), ("2 ** 3 ** 2", 512), ("7 // 2", 3),
    ("7 % 3", 1), ("2 ^ 10", 1024), ("1.5e3 / 3", 500), ("10 / 4", 2.5), ("-(-3)", 3), ("2 * -3", -6),
])
def test_calculator_follows_python_arithmetic(expression, value):
    assert calculate(expression) == value == eval(expression.replace("^", "**"))  # eval here checks the test only


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('ls')", "only numbers"), ("1 / 0", "division by zero"), ("2 ** 5000", "exponent"),
    ("(1 + 2", "ends too early"), ("1 2", "unexpected"), ("9" * 300, "longer than"), ("", "empty"),
    ("(" * 40 + "1" + ")" * 40, "nested"), ("(10 ** 200) ** 2", "too large"), ("(-8) ** 0.5", "no real value"),
])
def test_calculator_refuses_what_is_not_arithmetic_with_a_reason(expression, message):
    with pytest.raises(CalculatorError, match=message):
        calculate(expression)


def test_format_number_drops_a_float_zero_fraction():
    assert format_number(4.0) == "4" and format_number(2.5) == "2.5" and format_number(7) == "7"


def test_tool_calls_round_trip_through_the_template_and_typed_markers_are_only_text(tokenizer):
    call = {"name": "calculator", "arguments": {"expression": "12 * 7"}}
    messages = [{"role": "user", "content": "What is 12 times 7?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "84"}, {"role": "assistant", "content": "The answer is 84."}]
    chat = render(messages, tokenizer)
    marker = tokenizer.special_id(TOOL_CALL)
    start = chat.ids.index(marker)
    assert chat.loss_mask[start] == 1  # the model learns to make the call
    end = chat.ids.index(tokenizer.special_id("<|end|>"), start)
    assert parse_tool_calls(tokenizer, chat.ids[start:end + 1]) == ("", [call])
    typed = render([{"role": "user", "content": f"{TOOL_CALL}{json.dumps(call)}"}], tokenizer)
    assert marker not in typed.ids
    assert parse_tool_calls(tokenizer, [marker] + tokenizer.encode("{not json"))[1][0]["name"] is None
    with pytest.raises(ChatforgeError, match="only assistant"):
        render([{"role": "user", "content": "x", "tool_calls": [call]}], tokenizer)


def test_loop_runs_the_calculator_then_the_model_answers(tokenizer):
    engine = ScriptedTurns(tokenizer, [{"name": "calculator", "arguments": {"expression": "12 * 7"}}, "It is 84."])
    run = answer_with_tools(engine, [{"role": "user", "content": "What is 12 times 7?"}], {"calculator": CALCULATOR},
                            SamplingParams(temperature=0))
    assert run.answer == "It is 84." and run.calls == [{"name": "calculator", "arguments": {"expression": "12 * 7"},
                                                       "result": "84"}]
    assert [m["role"] for m in run.messages] == ["user", "assistant", "tool", "assistant"]
    # the second prompt holds the tool result as a tool turn
    assert tokenizer.special_id("<|tool_result|>") in engine.seen[1][0]


def test_calls_are_capped_then_the_call_token_is_banned(tokenizer):
    call = {"name": "calculator", "arguments": {"expression": "1 + 1"}}
    engine = ScriptedTurns(tokenizer, [call, call, "Done."])
    run = answer_with_tools(engine, [{"role": "user", "content": "add"}], {"calculator": CALCULATOR},
                            SamplingParams(temperature=0), max_calls=2)
    assert len(run.calls) == 2 and run.answer == "Done."
    marker = tokenizer.special_id(TOOL_CALL)
    assert [params.logit_bias.get(marker) for _, params in engine.seen] == [None, None, BANNED]
    with pytest.raises(ChatforgeError, match="max_calls"):
        answer_with_tools(engine, [{"role": "user", "content": "add"}], {"calculator": CALCULATOR},
                          SamplingParams(temperature=0), max_calls=-1)


def test_unknown_tools_bad_arguments_and_client_tools(tokenizer):
    engine = ScriptedTurns(tokenizer, [{"name": "weather", "arguments": {}},
                                        {"name": "calculator", "arguments": {"expr": "1"}}, "ok"])
    run = answer_with_tools(engine, [{"role": "user", "content": "hi"}], {"calculator": CALCULATOR},
                            SamplingParams(temperature=0))
    assert "no tool named 'weather'" in run.calls[0]["result"]
    assert "missing required argument 'expression'" in run.calls[1]["result"]
    lookup = Tool("lookup", "Look a name up.", {"type": "object", "properties": {"name": {"type": "string"}},
                                                "required": ["name"]})
    engine = ScriptedTurns(tokenizer, [{"name": "lookup", "arguments": {"name": "Ada"}}])
    run = answer_with_tools(
        engine, [{"role": "user", "content": "who"}], {"lookup": lookup}, SamplingParams(temperature=0)
    )
    assert run.finish_reason == "tool_calls" and run.pending == [{"name": "lookup", "arguments": {"name": "Ada"}}]


def test_schema_checks_types_enums_and_unknown_arguments():
    tool = Tool(
        "t",
        "",
        {
            "type": "object",
            "properties": {"n": {"type": "integer"}, "mode": {"enum": ["a", "b"]}},
            "required": ["n"],
            "additionalProperties": False,
        },
        lambda a: "ran",
    )
    check_arguments(tool, {"n": 3, "mode": "a"})
    for arguments, message in (
        ({"n": "3"}, "type integer"),
        ({"n": True}, "type integer"),
        ({"n": 1, "mode": "c"}, "one of"),
        ({"n": 1, "x": 2}, "unknown argument"),
        ({}, "missing"),
    ):
        with pytest.raises(ChatforgeError, match=message):
            check_arguments(tool, arguments)
    assert run_tool(tool, {"n": 1}) == "ran" and run_tool(tool, {}).startswith("error:")


def test_tool_data_answers_are_right_and_held_out_questions_are_new(tmp_path):
    main(
        [
            "tool-data",
            f"--out_dir={tmp_path}",
            "--arithmetic=50",
            "--definitions=0",
            "--eval_questions=20",
            "--data_dir=",
        ]
    )
    rows = [json.loads(line) for line in (tmp_path / "tool_train.jsonl").read_text().splitlines()]
    for row in rows:
        call = row["messages"][1]["tool_calls"][0]
        assert row["messages"][2]["content"] == format_number(calculate(call["arguments"]["expression"]))
    trained = {r["messages"][0]["content"] for r in rows}
    held = [json.loads(line) for line in (tmp_path / "arithmetic_eval.jsonl").read_text().splitlines()]
    assert len(held) == 20 and not trained & {q["question"] for q in held}
    assert same_number("The answer is 4,512.", "4512") and not same_number("no idea", "3")


def test_chat_conversation_uses_the_loop_and_remembers_calls(tokenizer, capsys):
    from chatforge.serve.terminal import Conversation

    engine = ScriptedTurns(tokenizer, [{"name": "calculator", "arguments": {"expression": "6 * 7"}}, "42."])
    chat = Conversation(engine, SamplingParams(temperature=0, max_tokens=16), tools={"calculator": CALCULATOR})
    assert chat.answer("What is 6 times 7?") == "42."
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "assistant"]
    assert '[calculator({"expression": "6 * 7"}) -> 42]' in capsys.readouterr().err


def test_retrieval_returns_the_index_hits_and_built_ins_are_checked():
    from chatforge.tools.registry import builtin_tools, retrieval_tool

    class FakeIndex:
        def search(self, query, k):
            return [SimpleNamespace(doc_id="wordnet:1", chunk=f"{query} (noun): a sample entry", score=0.9)][:k]

    tool = retrieval_tool(FakeIndex())
    assert run_tool(tool, {"query": "apple"}) == "[wordnet:1] apple (noun): a sample entry"
    assert run_tool(tool, {"q": "apple"}).startswith("error:")
    assert set(builtin_tools(["calculator"])) == {"calculator"}
    with pytest.raises(ChatforgeError, match="needs a search index"):
        builtin_tools(["retrieval"])
    with pytest.raises(ChatforgeError, match="unknown tool"):
        builtin_tools(["browser"])


@pytest.mark.slow
def test_a_short_sft_on_tool_data_teaches_a_tiny_model_to_call_the_calculator(tmp_path):
    import torch

    from chatforge.model.gpt import GPT, GPTConfig
    from chatforge.model.hf import export_hf_gpt2

    tools = tmp_path / "tool_data"
    main(
        ["tool-data", f"--out_dir={tools}", "--arithmetic=300", "--definitions=0", "--eval_questions=12", "--data_dir="]
    )
    rows = [json.loads(line) for line in (tools / "tool_train.jsonl").read_text().splitlines()]
    texts = [json.dumps(row["messages"]) for row in rows]
    tokenizer = Tokenizer.train(texts, vocab_size=400)
    tokenizer.save(tmp_path / "base")
    torch.manual_seed(0)
    export_hf_gpt2(
        GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=96, n_layer=2, n_head=2, n_embd=48)),
        tmp_path / "base",
    )
    chats = tmp_path / "sft_data"
    chats.mkdir()
    small_talk = "".join(
        json.dumps(
            {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]}
        )
        + "\n"
        for _ in range(4)
    )
    (chats / "sft_train.jsonl").write_text(small_talk)
    (chats / "sft_val.jsonl").write_text(small_talk)
    main(
        [
            "sft",
            f"--data_dir={chats}",
            f"--init_from={tmp_path / 'base'}",
            f"--out_dir={tmp_path / 'run'}",
            f"--extra_train={tools / 'tool_train.jsonl'}",
            f"--extra_val={tools / 'tool_val.jsonl'}",
            "--train.dtype=fp32",
            "--train.compile=false",
            "--train.device=cpu",
            "--train.progress=false",
            "--train.steps=120",
            "--train.batch_size=8",
            "--train.lr=5e-3",
            "--train.warmup_steps=5",
            "--train.max_minutes=0",
        ]
    )
    main(
        [
            "eval",
            "tools",
            f"--ckpt={tmp_path / 'run'}",
            "--device=cpu",
            f"--tools.questions={tools / 'arithmetic_eval.jsonl'}",
            f"--out={tmp_path / 'eval'}",
        ]
    )
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    # the call format is learned in a few steps (the numbers are not, at this size); the loop and scoring are sound
    assert summary["called_calculator"] >= 0.9 and summary["oracle"] == 1.0
    assert all(call["name"] == "calculator" for sample in summary["samples"] for call in sample["calls"])


def test_direct_tool_data_asks_the_same_questions_without_calls(tmp_path):
    for name, extra in (("tools", []), ("direct", ["--direct"])):
        main(
            [
                "tool-data",
                f"--out_dir={tmp_path / name}",
                "--arithmetic=20",
                "--definitions=0",
                "--eval_questions=5",
                "--data_dir=",
                *extra,
            ]
        )

    def read(name: str, file: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / name / file).read_text().splitlines()]

    with_calls, direct = read("tools", "tool_train.jsonl"), read("direct", "tool_train.jsonl")
    assert [r["messages"][0] for r in with_calls] == [r["messages"][0] for r in direct]
    assert [r["messages"][-1] for r in with_calls] == [r["messages"][-1] for r in direct]
    assert all(len(r["messages"]) == 2 for r in direct) and all(len(r["messages"]) == 4 for r in with_calls)
    assert read("tools", "arithmetic_eval.jsonl") == read("direct", "arithmetic_eval.jsonl")
