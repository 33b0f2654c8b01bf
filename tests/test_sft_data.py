import json
import random

import pytest

from chatforge import cli
from chatforge.data.sft_data import (
    DROP_REASONS,
    Conversation,
    Curator,
    parse_row,
    read_conversations,
    rl_prompt,
    split,
)
from chatforge.data.sft_rules import cutoff_reason, fit_max_chars, language_id
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.stages.sft_data import Config

LONG_ANSWER = (
    "The answer depends on how the data is stored, which index is used and how often it changes. " * 6
).strip()


def chat(prompt, answer="Sure, here is a short and complete answer.", **extra):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], **extra}


def curate(rows, **options):
    curator = Curator(Config(**options))
    reasons = [curator.add(parse_row(row, f"t.jsonl:{i}", "user")) for i, row in enumerate(rows, 1)]
    return curator, reasons


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


# --- rules ---------------------------------------------------------------------------------------------------


def test_per_user_cap_counts_only_kept_prompts_of_each_user():
    rows = [chat(f"Question {i} from the first user?", user_id="u1") for i in range(4)]
    rows += [chat("A question from someone else?", user_id="u2"), chat("A question with no user id?")]
    curator, reasons = curate(rows, max_per_user=2)
    assert reasons == [None, None, "user_cap", "user_cap", None, None]
    assert curator.counts()["dropped"]["user_cap"] == 2


def test_common_prefix_drops_prompts_that_start_like_an_earlier_kept_one():
    rows = [
        chat("Write a poem about cats", answer="x" * 500 + " and"),  # cut off: dropped, so its prefix is not taken
        chat("Write a poem about dogs"),
        chat("Write a poem about mice"),  # same first 10 characters as the kept dog prompt
        chat("Write a po"),  # the whole prompt equals that 10-character prefix
        chat("Write a p"),  # shorter than the prefix: its first 9 characters are all it has, and differ
        chat("Explain recursion"),
    ]
    curator, reasons = curate(rows, prefix_chars=10)
    assert reasons == ["cut_off", None, "common_prefix", "common_prefix", None, None]
    assert curator.counts()["dropped"]["common_prefix"] == 2
    # a longer prefix tells them apart
    _, reasons = curate(rows, prefix_chars=20)
    assert reasons.count("common_prefix") == 0


def test_pii_is_scrubbed_and_counted_by_kind():
    rows = [
        chat(
            "Mail jane.doe@example.com or call +1 415 555 0100 about the order",
            answer="I will mail jane.doe@example.com.",
        ),
        chat("No personal data here"),
    ]
    curator, reasons = curate(rows)
    assert reasons == [None, None]
    text = json.dumps(curator.kept[0].messages)
    assert "jane.doe@example.com" not in text and "415 555" not in text
    counts = curator.counts()
    assert counts["pii_by_kind"]["EMAIL"] == 2 and counts["pii_by_kind"]["PHONE"] == 1
    assert counts["modified"]["pii_scrubbed"] == 1


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("   ", "empty_assistant"),
        ("\u200b...", "empty_assistant"),
        (LONG_ANSWER + " For example, the", "cut_off"),
        ("Too many requests in 1 hour. Try again later.", "cut_off"),
        (
            "Para mejorar la experiencia de usuario, es importante que la interfaz sea clara y que los pasos "
            "sean pocos.",
            "language",
        ),
        ("Конечно, вот короткий и полный ответ на ваш вопрос.", "language"),
        ("もちろんです。これは短い答えです。", "language"),
        ("Sure, here is a short and complete answer.", None),
        ("当然可以。这是一个简短而完整的回答。", None),
    ],
)
def test_bad_assistant_turns_drop_the_conversation(answer, reason):
    curator, reasons = curate([chat("Tell me something", answer=answer)])
    assert reasons == [reason]
    if reason:
        assert curator.counts()["dropped"][reason] == 1


def test_allowed_languages_are_configurable():
    spanish = chat("Hola", answer="Claro que sí, para eso estoy: dime qué necesitas y lo vemos juntos.")
    chinese = chat("你好", answer="你好！有什么可以帮你的吗？")
    assert curate([spanish, chinese])[1] == ["language", None]
    assert curate([spanish, chinese], languages=["en", "other"])[1] == [None, "language"]


def test_a_cut_off_earlier_turn_drops_the_whole_conversation():
    messages = [
        {"role": "user", "content": "Write an essay"},
        {"role": "assistant", "content": LONG_ANSWER + " In conclusion, we"},
        {"role": "user", "content": "continue"},
        {"role": "assistant", "content": "can see that it depends."},
    ]
    curator, reasons = curate([{"messages": messages}])
    assert reasons == ["cut_off"] and curator.cut_off == {"mid_sentence": 1}


def test_trimming_to_the_last_assistant_turn_and_conversations_without_one():
    ends_with_user = chat("First question")
    ends_with_user["messages"].append({"role": "user", "content": "and a follow-up nobody answered"})
    no_answer = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    no_user = {"messages": [{"role": "assistant", "content": "Hello! How can I help you today?"}]}
    curator, reasons = curate([ends_with_user, no_answer, no_user])
    assert reasons == [None, "no_assistant_turn", "no_user_turn"]
    assert [m["role"] for m in curator.kept[0].messages] == ["user", "assistant"]
    assert curator.counts()["modified"]["trimmed_to_last_assistant"] == 1


def test_exact_duplicates_are_dropped_ignoring_case_and_spacing():
    rows = [
        chat("What is 2 + 2?", answer="It is 4."),
        chat("what is  2 + 2?", answer="It is\n4."),
        chat("What is 2 + 2?", answer="Four."),
    ]
    curator, reasons = curate(rows)
    # the third differs in its answer, so it is no duplicate; its prompt is, so the prefix rule takes it
    assert reasons == [None, "duplicate", "common_prefix"]


def test_max_chars_keeps_whole_leading_exchanges():
    messages = []
    for i in range(4):
        messages += [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "A" * 90 + "."}]
    fitted = fit_max_chars(messages, 250)  # each exchange is 11 + 91 characters
    assert len(fitted) == 4 and fitted[-1]["role"] == "assistant"
    assert fit_max_chars(messages, 50) == []
    curator, reasons = curate([{"messages": messages}, chat("Short question", answer="B" * 300 + ".")], max_chars=250)
    assert reasons == [None, "too_long"]
    assert curator.counts()["modified"]["truncated_to_max_chars"] == 1


def test_category_is_kept_normalised_or_unknown():
    rows = [
        chat("One", category="plain"),
        chat("Two", category="Few_Shot"),
        chat("Three", category="user based"),
        chat("Four"),
    ]
    curator, _ = curate(rows)
    assert [c.category for c in curator.kept] == ["plain", "few-shot", "user-based", "unknown"]
    with pytest.raises(ChatforgeError, match=r"t\.jsonl:1: category 'fancy'"):
        curate([chat("Five", category="fancy")])


def test_counts_cover_every_conversation():
    rows = [
        chat(
            f"Prompt number {i % 7}",
            answer=random.Random(i).choice(["ok.", "", LONG_ANSWER + " and"]),
            user_id=str(i % 3),
        )
        for i in range(60)
    ]
    curator, reasons = curate(rows, max_per_user=2)
    counts = curator.counts()
    assert counts["kept"] + sum(counts["dropped"].values()) == 60
    assert set(counts["dropped"]) == set(DROP_REASONS)


# --- heuristics ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, reason",
    [
        ("Paris", None),  # short answers need no full stop
        (LONG_ANSWER, None),
        (LONG_ANSWER + "\n\n```python\nprint('hi')\n```", None),
        (LONG_ANSWER + "\n\n| a | b |\n| 1 | 2 |", None),
        (LONG_ANSWER + "\n\nBest regards,\nJane Doe", None),  # a short last line: a signature, heading, list item
        (LONG_ANSWER + "\n\n10. Mongolian English Immersion and Cultural Exchange Center", None),
        (LONG_ANSWER + " 🙂", None),
        (LONG_ANSWER + "\n\n总之，这取决于具体情况。", None),
        (LONG_ANSWER + " The next step is to open the settings page and pick the right", "mid_sentence"),
        (LONG_ANSWER + " This is how it works in", "mid_sentence"),
        (LONG_ANSWER + " For example,", "mid_sentence"),
        (LONG_ANSWER + " Here is the code:", "mid_sentence"),
        (
            LONG_ANSWER + "\n\n* Description: a small mole-like creature with a brown and grey body and two",
            "mid_sentence",
        ),
        (
            LONG_ANSWER
            + "\n\n首先，我们需要打开设置页面，然后在列表里选择正确的选项，以便完成后续的配置工作，接着再检查网络和",
            "mid_sentence",
        ),
        (LONG_ANSWER + "\n\n```python\ndef f(x):\n    return x +", "open_code_block"),
        ("Here is the first part of the file. [truncated]", "marker"),
        ("The log ends here (truncated at 1000 lines)", "marker"),
        ("!Too many requests in 1 hour. Try again later.", "error_message"),
        ("network error", "error_message"),
    ],
)
def test_cutoff_heuristic(text, reason):
    assert cutoff_reason(text, min_chars=400) == reason


@pytest.mark.parametrize(
    "text, language",
    [
        ("Sure! Here is how you can do it. First, open the file and read the data.", "en"),
        ("Yes.", "en"),
        ("当然可以。首先打开文件，然后使用 pandas 的 read_csv 函数读取数据。", "zh"),
        ("Python 是一种编程语言，它的 list 和 dict 很好用。", "zh"),
        ("もちろんです。まずファイルを開いて、データを読み込みます。", "other"),
        ("물론입니다. 먼저 파일을 열고 데이터를 읽으세요.", "other"),
        ("Конечно, вот как это сделать: откройте файл и прочитайте данные.", "other"),
        ("Claro que sí. Primero abre el archivo y luego lee los datos para que funcione.", "other"),
        ("Bien sûr, voici une routine pour les débutants qui sont pressés.", "other"),
        ("Natürlich, das ist nicht schwer: öffne die Datei und lies die Daten ein.", "other"),
        ("Here are the options:\n\n* Pullout\n* Wingtips\n* Wind\n* Boat\n* Crowd\n* Gulls\n* Path", "en"),
        ("Here it is:\n```python\ndef lire(fichier):\n    return pour_que_des_une(fichier)\n```", "en"),
    ],
)
def test_language_id(text, language):
    assert language_id(text) == language


def test_language_of_a_code_only_answer_comes_from_the_prompt():
    code = "```python\nprint(sum(range(10)))\n```"
    assert language_id(code) == "other"
    assert language_id(code, fallback="Write Python that sums the numbers below ten.") == "en"
    assert language_id(code, fallback="写一段 Python 代码，计算十以内的数字之和。") == "zh"


# --- input validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"text": "hi"}', "no 'messages'"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', "role 'bot'"),
        ('{"messages": [{"role": "user"}]}', "string content"),
        ('{"messages": [{"role": "user", "content": null}]}', "string content"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}', "system message"),
        ('{"messages": [{"role": "user", "content": "a"}], "user_id": [1]}', "'user_id'"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(chat("fine")) + "\n\n" + line + "\n")
    with pytest.raises(ChatforgeError) as info:
        list(read_conversations(path, "user"))
    assert f"{path}:3: " in str(info.value) and message in str(info.value)


def test_config_is_validated():
    with pytest.raises(ConfigError, match="languages"):
        Config(languages=["en", "fr"]).validate()
    with pytest.raises(ConfigError, match="training"):
        Config(val_fraction=0.5, rl_fraction=0.5).validate()
    with pytest.raises(ConfigError, match="prefix_chars"):
        Config(prefix_chars=0).validate()


# --- splits --------------------------------------------------------------------------------------------------


def _many(n, offset=0):
    rows = []
    for i in range(offset, offset + n):
        messages = [{"role": "system", "content": "Be helpful."}] if i % 5 == 0 else []
        messages += [
            {"role": "user", "content": f"Question {i}: what is {i} squared?"},
            {"role": "assistant", "content": f"{i} squared is {i * i}."},
        ]
        if i % 3 == 0:
            messages += [
                {"role": "user", "content": "And plus one?"},
                {"role": "assistant", "content": f"That makes {i * i + 1}."},
            ]
        rows.append({"id": f"c{i}", "messages": messages})
    return rows


def _split_ids(rows, **options):
    cfg = Config(**options)
    curator, _ = curate(rows, **options)
    return {name: [r["id"] for r in part] for name, part in split(curator.kept, cfg).items()}, split(curator.kept, cfg)


def test_splits_are_disjoint_sized_and_deterministic():
    rows = _many(400)
    ids, parts = _split_ids(rows, val_fraction=0.1, rl_fraction=0.2)
    sets = {name: set(v) for name, v in ids.items()}
    assert len(sets["val"]) == 40 and len(sets["rl"]) == 80 and len(sets["train"]) == 280
    assert not (sets["val"] & sets["rl"] or sets["val"] & sets["train"] or sets["rl"] & sets["train"])
    # same splits whatever the input order; a different seed gives different ones
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    again, _ = _split_ids(shuffled, val_fraction=0.1, rl_fraction=0.2)
    assert {name: set(v) for name, v in again.items()} == sets
    other, _ = _split_ids(rows, val_fraction=0.1, rl_fraction=0.2, seed=1)
    assert set(other["val"]) != sets["val"]
    # adding data moves few conversations between splits
    grown, _ = _split_ids(rows + _many(40, offset=400), val_fraction=0.1, rl_fraction=0.2)
    moved = sum(1 for name in sets for i in sets[name] if i not in set(grown[name]))
    assert moved < 0.1 * len(rows)
    # RL prompts stop before the last answer, which becomes the reference
    by_id = {row["id"]: row["messages"] for row in rows}
    for prompt in parts["rl"]:
        assert prompt["messages"] == by_id[prompt["id"]][:-1] and prompt["messages"][-1]["role"] == "user"
        assert prompt["reference"] == by_id[prompt["id"]][-1]["content"]


def test_rl_prompts_end_before_the_latest_answer_whose_history_fits():
    def conv(first_question):
        return parse_row({"messages": [
            {"role": "user", "content": first_question}, {"role": "assistant", "content": "First answer."},
            {"role": "user", "content": "A follow-up question. " * 30}, {"role": "assistant", "content": "Second."},
            {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "Third answer."},
        ]}, "t.jsonl:1", "user")

    short = conv("What is a hash index?")
    fits = rl_prompt(short, history_chars=400)
    assert [m["content"] for m in fits["messages"]] == ["What is a hash index?"]
    assert fits["reference"] == "First answer."
    # a history that never fits still gives the first exchange, the shortest question the conversation has
    long_first = rl_prompt(conv("Explain this code: " + "x = 1; " * 100), history_chars=400)
    assert len(long_first["messages"]) == 1 and long_first["reference"] == "First answer."
    # a budget that takes the whole history gives the last answer, as history_chars=0 always does
    for everything in (rl_prompt(short, history_chars=10_000), rl_prompt(short, history_chars=0)):
        assert len(everything["messages"]) == 5 and everything["reference"] == "Third answer."


def test_split_needs_enough_conversations():
    curator, _ = curate(_many(3))
    with pytest.raises(ChatforgeError, match="only 3 conversations"):
        split(curator.kept, Config(val_fraction=0.5, rl_fraction=0.4))
    # a tiny set still gets one conversation in each non-empty split
    curator, _ = curate(_many(5))
    parts = split(curator.kept, Config(val_fraction=0.01, rl_fraction=0.01))
    assert [len(parts[name]) for name in ("train", "val", "rl")] == [3, 1, 1]


def test_duplicate_ids_are_renamed_not_merged():
    curator, reasons = curate([chat("First", id="same"), chat("Second", id="same")])
    assert reasons == [None, None]
    assert curator.kept[0].id == "same" and curator.kept[1].id == "same@t.jsonl:2"
    assert curator.counts()["modified"]["renamed_duplicate_id"] == 1


# --- the stage -----------------------------------------------------------------------------------------------


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_stage_end_to_end(tmp_path, capsys):
    holdout = write_jsonl(
        tmp_path / "chat_holdout.jsonl",
        [dict(row, source="sharegpt") for row in _many(60)] + [chat("Tell me", answer="")],
    )
    mine = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            chat("Question 1: what is 1 squared? Please answer.", answer="It is 1.", user_id="ann", category="plain"),
            chat("My own prompt about sorting lists", user_id="ann", category="few-shot"),
        ],
    )
    feedback = write_jsonl(
        tmp_path / "feedback.jsonl",
        [
            chat(
                "Corrected: how do I reverse a list in Python?",
                answer="Use reversed(xs) or xs[::-1].",
                source="feedback",
                id="fb-1",
            ),
        ],
    )
    out = tmp_path / "sft"
    args = [f"--holdout={holdout}", f"--inputs={mine}", f"--feedback={feedback}", f"--out_dir={out}"]
    args += ["--prefix_chars=20", "--val_fraction=0.1", "--rl_fraction=0.2"]
    cli.main(["sft-data", *args])
    assert "kept 62" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert [i["read"] for i in manifest["inputs"]] == [2, 1, 61]
    assert counts["kept"] == 62
    # the user's prompt came first, so the hold-out conversation sharing its first 20 characters is dropped
    assert counts["dropped"]["common_prefix"] == 1 and counts["dropped"]["empty_assistant"] == 1
    assert manifest["by_source"] == {"sharegpt": 59, "user": 2, "feedback": 1}
    assert manifest["by_category"] == {"unknown": 60, "plain": 1, "few-shot": 1}
    rows = {name: _read(out / name) for name in ("sft_train.jsonl", "sft_val.jsonl", "rl_prompts.jsonl")}
    assert {name: len(r) for name, r in rows.items()} == {
        "sft_train.jsonl": 44,
        "sft_val.jsonl": 6,
        "rl_prompts.jsonl": 12,
    }
    assert all(manifest["files"][name]["rows"] == len(r) for name, r in rows.items())
    ids = [r["id"] for part in rows.values() for r in part]
    assert len(ids) == len(set(ids)) == 62
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows["sft_train.jsonl"] + rows["sft_val.jsonl"])
    users = [r for part in rows.values() for r in part if r["source"] == "user"]
    assert [(r["user_id"], r["language"]) for r in users] == [("ann", "en")] * 2
    # the same run again writes byte-identical files
    before = {name: (out / name).read_bytes() for name in rows}
    cli.main(["sft-data", *args])
    assert {name: (out / name).read_bytes() for name in rows} == before


def test_stage_errors_leave_earlier_outputs(tmp_path, capsys):
    good = write_jsonl(tmp_path / "h.jsonl", _many(30))
    out = tmp_path / "sft"
    cli.main(["sft-data", f"--holdout={good}", f"--out_dir={out}"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(chat("ok")) + "\n" + '{"messages": [{"role": "user", "content": 3}]}\n')
    with pytest.raises(SystemExit) as info:
        cli.main(["sft-data", f"--holdout={good}", f"--inputs={bad}", f"--out_dir={out}"])
    assert info.value.code == 2
    assert f"{bad}:2: message 0 (user) must have string content" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(SystemExit):
        cli.main(["sft-data", f"--holdout={tmp_path / 'missing.jsonl'}", f"--out_dir={out}"])
    assert "run `chatforge data` first" in capsys.readouterr().err


def test_cap_stops_reading(tmp_path):
    holdout = write_jsonl(tmp_path / "h.jsonl", _many(50))
    out = tmp_path / "sft"
    cli.main(["sft-data", f"--holdout={holdout}", f"--out_dir={out}", "--max_conversations=20"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["kept"] == 20 and manifest["stopped_at_cap"]
    assert manifest["inputs"][0]["read"] == 20


def test_conversation_record_round_trips():
    conv = Conversation(id="x", messages=[{"role": "user", "content": "hi"}], source="user", language="en")
    assert conv.record() == {
        "id": "x",
        "messages": [{"role": "user", "content": "hi"}],
        "source": "user",
        "category": "unknown",
        "language": "en",
    }
