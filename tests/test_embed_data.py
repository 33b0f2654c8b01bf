import json
import random
import textwrap

import pytest

from chatforge.embed.data import (
    Pair,
    PairBatches,
    PairConfig,
    build_pairs,
    chat_pairs,
    comment_pairs,
    dedupe,
    docstring_pairs,
    read_user_pairs,
    span_pairs,
    split_spans,
    wordnet_pairs,
)
from chatforge.errors import ChatforgeError

CODE = textwrap.dedent('''\
    """Module docstring is not a function docstring."""
    import os


    def area(width, height):
        """Compute the area of a rectangle.

        Longer explanation that is not part of the query.
        """
        return width * height


    class Stack:
        def push(self, item):
            """Push an item on top of the stack."""
            self.items.append(item)

        def todo(self):
            """Not written yet, nothing to find."""
            raise NotImplementedError

        def short(self): "One line docstring with code"; return 1


    # Walk the tree and collect every file name below the root.
    # Symbolic links are not followed.
    for root, dirs, files in os.walk("."):
        names = list(files)

    x = 1  # trailing comment is not a block header
    s = "# this is a string, not a comment at all"
    # noqa
    y = 2
''')


def test_docstring_pairs_take_the_summary_and_the_code_without_docstring():
    pairs = docstring_pairs(CODE)
    by_query = {p.query: p.document for p in pairs}
    assert set(by_query) == {"Compute the area of a rectangle.", "Push an item on top of the stack."}
    assert by_query["Compute the area of a rectangle."] == "def area(width, height):\n    return width * height"
    assert by_query["Push an item on top of the stack."] == "def push(self, item):\n    self.items.append(item)"
    assert all(p.kind == "docstring" for p in pairs)


def test_docstring_pairs_skip_code_that_does_not_parse():
    assert docstring_pairs("def broken(:\n    pass\n") == []


def test_comment_pairs_find_whole_line_comment_blocks_and_the_code_under_them():
    pairs = comment_pairs(CODE)
    assert [p.query for p in pairs] == [
        "Walk the tree and collect every file name below the root. Symbolic links are not followed."
    ]
    assert pairs[0].document == 'for root, dirs, files in os.walk("."):\n    names = list(files)'


def test_comment_pairs_skip_commented_out_code():
    assert comment_pairs("# result = compute(a, b)\nz = 3\n") == []


def test_split_spans_cuts_at_whitespace_and_keeps_all_words():
    text = " ".join(f"word{i}" for i in range(200))
    spans = split_spans(text, 100)
    assert all(len(s) <= 100 for s in spans)
    assert " ".join(spans).split() == text.split()


def test_span_pairs_are_neighbours_and_capped():
    text = "\n".join(f"line {i} of the document" for i in range(100))
    spans = split_spans(text, 60)
    pairs = span_pairs(text, 60, 3, random.Random(0))
    assert len(pairs) == 3
    for pair in pairs:
        i = spans.index(pair.query)
        assert spans[i + 1] == pair.document


def test_chat_pairs_from_messages_and_from_role_lines():
    doc = {"kind": "chat", "text": "", "messages": [
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
        {"role": "user", "content": "Thanks"}]}
    assert chat_pairs(doc) == [Pair("What is 2+2?", "4.", "chat")]
    text_doc = {"kind": "chat", "text": "User: hello there\nAssistant: hi, how can I help?\nUser: bye"}
    assert chat_pairs(text_doc) == [Pair("hello there", "hi, how can I help?", "chat")]


def test_wordnet_pairs_parse_lemmas_definitions_and_examples(tmp_path):
    (tmp_path / "data.noun").write_text(
        "  1 This software and database is being provided to you, the LICENSEE\n"
        "02084071 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis; "
        '"the dog barked all night"\n'
    )
    pairs = wordnet_pairs(tmp_path, 100, random.Random(0))
    assert Pair("dog, domestic dog", "a member of the genus Canis", "wordnet") in pairs
    assert Pair("a member of the genus Canis", "the dog barked all night", "wordnet") in pairs
    assert wordnet_pairs(tmp_path / "missing", 100, random.Random(0)) == []


def test_user_pairs_accept_both_key_styles_and_name_bad_lines(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"query": "q", "document": "d"}, {"text_a": "a", "text_b": "b"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert read_user_pairs(path) == [Pair("q", "d", "user"), Pair("a", "b", "user")]
    path.write_text(json.dumps({"query": "only a query"}) + "\n")
    with pytest.raises(ChatforgeError, match=r"pairs.jsonl:1: a pair needs"):
        read_user_pairs(path)
    with pytest.raises(ChatforgeError, match="not found"):
        read_user_pairs(tmp_path / "nope.jsonl")


def test_dedupe_drops_repeated_sides():
    pairs = [Pair("a", "b", "x"), Pair("a", "c", "x"), Pair("d", "b", "x"), Pair("e", "e", "x"), Pair("f", "g", "x")]
    assert dedupe(pairs) == [Pair("a", "b", "x"), Pair("f", "g", "x")]


def test_build_pairs_mixes_every_kind(tmp_path):
    user = tmp_path / "u.jsonl"
    user.write_text(json.dumps({"query": "my query", "document": "my document"}) + "\n")
    docs = [
        {"id": "c", "kind": "code", "text": CODE},
        {"id": "t", "kind": "text", "text": "A sentence about cats. " * 80},
        {"id": "h", "kind": "chat", "text": "User: hello there\nAssistant: hi, how can I help?"},
    ]
    cfg = PairConfig(span_chars=200, wordnet_dir=str(tmp_path / "no-wordnet"), user_pairs=[str(user)])
    kinds = {p.kind for p in build_pairs(docs, cfg)}
    assert kinds == {"span", "docstring", "comment", "chat", "user"}


def test_pair_batches_are_a_function_of_the_step_and_split_across_ranks():
    pairs = [Pair(f"q{i}", f"d{i}", "x") for i in range(10)]
    batches = PairBatches(pairs, batch_size=4, seed=3)
    first_epoch = batches.batch(0) + batches.batch(1)
    assert len(set(first_epoch)) == 8  # no pair twice within an epoch
    assert batches.batch(2) != batches.batch(0)  # epoch 2 is a new permutation
    again = PairBatches(pairs, batch_size=4, seed=3)
    assert again.batch(5) == batches.batch(5)  # resuming at step 5 draws the same batch
    assert again.batch(5, rank=0, world=2) + again.batch(5, rank=1, world=2) == batches.batch(5)
    with pytest.raises(ChatforgeError, match="only 10 training pairs"):
        PairBatches(pairs, batch_size=11)
