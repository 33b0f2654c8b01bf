"""Tools: the calculator's parser, tool calls in the chat template, the toolset loop, schemas, tool data."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from chatforge.chat_template import TOOL_CALL, parse_tool_calls, render
from chatforge.cli import main
from chatforge.config import ChatforgeError
from chatforge.infer.params import SamplingParams
from chatforge.tokenizer import Tokenizer
from chatforge.tools.calculator import CalculatorError, calculate, format_number
from chatforge.tools.evaluate import same_number
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


class ScriptedEngine:
    """Writes the scripted assistant turns in order; records every prompt and its sampling settings."""

    block_size = 256

    def __init__(self, tokenizer, turns: list[str | dict]):
        self.tokenizer, self.turns, self.seen = tokenizer, list(turns), []

    def generate(self, prompts, params):
        self.seen.append((prompts[0], params))
        turn = self.turns.pop(0)
        if isinstance(turn, dict):
            ids = [self.tokenizer.special_id(TOOL_CALL)] + self.tokenizer.encode(json.dumps(turn))
        else:
            ids = self.tokenizer.encode(turn)
        ids.append(self.tokenizer.special_id("<|end|>"))
        return [SimpleNamespace(choices=[SimpleNamespace(token_ids=ids, finish_reason="stop")])]


def test_loop_runs_the_calculator_then_the_model_answers(tokenizer):
    engine = ScriptedEngine(tokenizer, [{"name": "calculator", "arguments": {"expression": "12 * 7"}}, "It is 84."])
    run = answer_with_tools(engine, [{"role": "user", "content": "What is 12 times 7?"}], {"calculator": CALCULATOR},
                            SamplingParams(temperature=0))
    assert run.answer == "It is 84." and run.calls == [{"name": "calculator", "arguments": {"expression": "12 * 7"},
                                                       "result": "84"}]
    assert [m["role"] for m in run.messages] == ["user", "assistant", "tool", "assistant"]
    # the second prompt holds the tool result as a tool turn
    assert tokenizer.special_id("<|tool_result|>") in engine.seen[1][0]


def test_calls_are_capped_then_the_call_token_is_banned(tokenizer):
    call = {"name": "calculator", "arguments": {"expression": "1 + 1"}}
    engine = ScriptedEngine(tokenizer, [call, call, "Done."])
    run = answer_with_tools(engine, [{"role": "user", "content": "add"}], {"calculator": CALCULATOR},
                            SamplingParams(temperature=0), max_calls=2)
    assert len(run.calls) == 2 and run.answer == "Done."
    marker = tokenizer.special_id(TOOL_CALL)
    assert [params.logit_bias.get(marker) for _, params in engine.seen] == [None, None, BANNED]


def test_unknown_tools_bad_arguments_and_client_tools(tokenizer):
    engine = ScriptedEngine(tokenizer, [{"name": "weather", "arguments": {}},
                                        {"name": "calculator", "arguments": {"expr": "1"}}, "ok"])
    run = answer_with_tools(engine, [{"role": "user", "content": "hi"}], {"calculator": CALCULATOR},
                            SamplingParams(temperature=0))
    assert "no tool named 'weather'" in run.calls[0]["result"]
    assert "missing required argument 'expression'" in run.calls[1]["result"]
    lookup = Tool("lookup", "Look a name up.", {"type": "object", "properties": {"name": {"type": "string"}},
                                                "required": ["name"]})
    engine = ScriptedEngine(tokenizer, [{"name": "lookup", "arguments": {"name": "Ada"}}])
    run = answer_with_tools(engine, [{"role": "user", "content": "who"}], {"lookup": lookup}, SamplingParams(temperature=0))
    assert run.finish_reason == "tool_calls" and run.pending == [{"name": "lookup", "arguments": {"name": "Ada"}}]


def test_schema_checks_types_enums_and_unknown_arguments():
    tool = Tool("t", "", {"type": "object", "properties": {"n": {"type": "integer"}, "mode": {"enum": ["a", "b"]}},
                          "required": ["n"], "additionalProperties": False}, lambda a: "ran")
    check_arguments(tool, {"n": 3, "mode": "a"})
    for arguments, message in (({"n": "3"}, "type integer"), ({"n": True}, "type integer"), ({"n": 1, "mode": "c"}, "one of"),
                               ({"n": 1, "x": 2}, "unknown argument"), ({}, "missing")):
        with pytest.raises(ChatforgeError, match=message):
            check_arguments(tool, arguments)
    assert run_tool(tool, {"n": 1}) == "ran" and run_tool(tool, {}).startswith("error:")


def test_tool_data_answers_are_right_and_held_out_questions_are_new(tmp_path):
    main(["tool-data", f"--out_dir={tmp_path}", "--arithmetic=50", "--definitions=0", "--eval_questions=20",
          "--data_dir="])
    rows = [json.loads(line) for line in (tmp_path / "tool_train.jsonl").read_text().splitlines()]
    for row in rows:
        call = row["messages"][1]["tool_calls"][0]
        assert row["messages"][2]["content"] == format_number(calculate(call["arguments"]["expression"]))
    trained = {r["messages"][0]["content"] for r in rows}
    held = [json.loads(line) for line in (tmp_path / "arithmetic_eval.jsonl").read_text().splitlines()]
    assert len(held) == 20 and not trained & {q["question"] for q in held}
    assert same_number("The answer is 4,512.", "4512") and not same_number("no idea", "3")


def test_chat_conversation_uses_the_loop_and_remembers_calls(tokenizer, capsys):
    from chatforge.infer.chat_stage import Conversation

    engine = ScriptedEngine(tokenizer, [{"name": "calculator", "arguments": {"expression": "6 * 7"}}, "42."])
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
