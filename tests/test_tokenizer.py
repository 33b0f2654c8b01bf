"""The BPE tokenizer (tiktoken ids == HF ids, exact round trips, special tokens) and the `chatforge tokenizer` stage."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from chatforge.config import parse
from chatforge.data import tokenize
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.stages.tokenizer import Config, run
from chatforge.tokenizer import END_OF_TEXT, SPECIAL_TOKENS, Tokenizer

ENGLISH = "The quick brown fox jumps over the lazy dog. It's 2024; we'll see 12345 apples, don't you think?"
CHINESE = "今天天气很好，我们去公园散步吧。机器学习是人工智能的一个分支。"
EMOJI = "Party time 🎉🎉 👩‍👩‍👧 ok 😀!"
CODE = "def add(a, b):\n\treturn a + b\n\n\nclass Foo:\n    x = 1  # comment\n        \n\t\t  y = [1,2,3]\r\n"
SAMPLES = [ENGLISH, CHINESE, EMOJI, CODE, "", " ", "\n\n\n", "   leading and trailing   ", "a<|user|>b <|endoftext|>"]


def corpus(repeat: int = 20) -> list[str]:
    return [ENGLISH, CHINESE, EMOJI, CODE] * repeat + [f"Sentence number {i} about topic {i % 7}." for i in range(200)]


def random_unicode(rng: random.Random, length: int) -> str:
    """Characters from ASCII, Latin, CJK, emoji and anywhere in Unicode (surrogates excluded)."""
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0, 0xD7FF), (0xE000, 0x10FFFF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(length))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(corpus(), vocab_size=400)


def test_tiktoken_gives_the_same_ids_as_hf_tokenizers(tok):
    rng = random.Random(0)
    texts = SAMPLES + [random_unicode(rng, rng.randint(1, 60)) for _ in range(500)]
    texts += ["".join(rng.choice(SAMPLES) for _ in range(5)) for _ in range(100)]
    for text in texts:
        assert tok.encode(text) == tok.hf.encode(text, add_special_tokens=False).ids, repr(text)


def test_encoding_uses_merges_and_batch_matches_single(tok):
    ids = tok.encode(ENGLISH)
    assert len(ids) < 0.6 * len(ENGLISH.encode())  # the merges learned from the corpus compress it
    assert tok.encode_batch(SAMPLES, num_threads=2) == [tok.encode(t) for t in SAMPLES]


def test_any_utf8_round_trips_exactly(tok):
    rng = random.Random(1)
    for text in SAMPLES + [random_unicode(rng, rng.randint(0, 80)) for _ in range(300)]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode("utf-8")
        assert b"".join(tok.id_to_token_bytes(i) for i in ids) == text.encode("utf-8")


def test_decode_of_a_cut_character_replaces_it_but_bytes_keep_it(tok):
    ids = tok.encode("你")  # not in the training corpus, so one token per UTF-8 byte
    assert len(ids) == 3
    assert tok.decode_bytes(ids[:1]) == "你".encode()[:1]
    assert tok.decode(ids[:1]) == "\ufffd"


def test_special_tokens_take_the_top_ids_in_declared_order(tok):
    ids = [tok.special_id(name) for name in SPECIAL_TOKENS]
    assert ids == list(range(tok.vocab_size - len(SPECIAL_TOKENS), tok.vocab_size))
    assert tok.eot_id == tok.special_id(END_OF_TEXT)
    assert tok.decode([tok.special_id("<|user|>")]) == "<|user|>"


def test_special_token_text_in_ordinary_input_is_plain_text(tok):
    text = "<|user|>hi<|end|><|endoftext|>"
    ids = tok.encode(text)
    assert not set(ids) & {tok.special_id(name) for name in SPECIAL_TOKENS}
    assert tok.decode(ids) == text


def test_unknown_special_token_and_bad_ids_raise(tok):
    with pytest.raises(ChatforgeError, match="<|nope|>"):
        tok.special_id("<|nope|>")
    for bad in (tok.vocab_size, -1):
        with pytest.raises(ChatforgeError, match=str(bad)):
            tok.decode([1, bad])


def test_save_and_load_give_the_same_tokenizer(tok, tmp_path):
    path = tok.save(tmp_path)
    for loaded in (Tokenizer.load(tmp_path), Tokenizer.load(path)):
        assert loaded.hash == tok.hash
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.token_bytes == tok.token_bytes
        assert loaded.specials == tok.specials
        assert [loaded.encode(t) for t in SAMPLES] == [tok.encode(t) for t in SAMPLES]


def test_training_reaches_the_requested_vocab_size_and_is_deterministic():
    first, second = Tokenizer.train(corpus(), 300), Tokenizer.train(corpus(), 300)
    assert first.vocab_size == 300
    assert first.hash == second.hash


def test_training_rejects_tiny_vocab_and_empty_corpus():
    with pytest.raises(ChatforgeError, match="vocab_size=100"):
        Tokenizer.train(corpus(), 100)
    with pytest.raises(ChatforgeError, match="no text"):
        Tokenizer.train([], 400)


def test_load_rejects_missing_and_malformed_files(tmp_path):
    with pytest.raises(ChatforgeError, match="not found"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ChatforgeError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path)


def test_load_rejects_ids_that_are_not_merge_ranks(tok, tmp_path):
    """tiktoken treats an id as a merge's priority; a file whose ids disagree with its merge order is refused."""
    spec = json.loads(tok.hf.to_str())
    vocab = spec["model"]["vocab"]
    first, second = ("".join(m) for m in spec["model"]["merges"][:2])
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ChatforgeError, match="merge 1 .* does not create the next token id"):
        Tokenizer.load(tmp_path)


def test_loads_a_gpt2_style_tokenizer_file(tmp_path):
    """GPT-2's tokenizer.json splits inside ByteLevel(use_regex=True) and has only <|endoftext|>."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=350, initial_alphabet=alphabet, show_progress=False)
    hf.train_from_iterator(corpus(), trainer)
    hf.add_special_tokens([END_OF_TEXT])
    hf.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.load(tmp_path)
    for text in SAMPLES:
        assert loaded.encode(text) == loaded.hf.encode(text, add_special_tokens=False).ids
        assert loaded.decode(loaded.encode(text)) == text
    assert loaded.eot_id == loaded.vocab_size - 1 == 350
    with pytest.raises(ChatforgeError, match="no special token '<\\|user\\|>'"):
        loaded.special_id("<|user|>")


# ---- the stage -----------------------------------------------------------------------------------------------


def write_docs(path, docs):
    path.write_text(
        "".join(json.dumps({"id": str(i), "source": "t", **d}, ensure_ascii=False) + "\n" for i, d in enumerate(docs))
    )


def make_data(data_dir, with_chinese=True):
    data_dir.mkdir(parents=True, exist_ok=True)
    english = [{"kind": "text", "text": f"{ENGLISH} Number {i}."} for i in range(30)]
    code = [{"kind": "code", "text": CODE.replace("add", f"add{i}")} for i in range(30)]
    chinese = [{"kind": "text", "text": CHINESE * 2} for _ in range(10)] if with_chinese else []
    chat = [{"kind": "chat", "text": "<|user|>hello<|end|><|assistant|>hi there<|end|>"}]
    write_docs(data_dir / "pretrain_train.jsonl", english + code + chinese + chat)
    write_docs(data_dir / "pretrain_val.jsonl", english[:3] + code[:2] + chinese[:2] + chat)
    write_docs(data_dir / "pretrain_test.jsonl", english[3:5] + code[2:3])
    return data_dir


def run_stage(data_dir, out_dir, **overrides):
    cfg, _ = parse(
        Config,
        [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--vocab_size=400", "--num_threads=2"]
        + [f"--{k}={v}" for k, v in overrides.items()],
    )
    run(cfg, [])
    return json.loads((out_dir / "tokenizer_report.json").read_text())


def test_stage_writes_tokenizer_shards_and_report(tmp_path):
    data_dir = make_data(tmp_path / "data")
    out = tmp_path / "tok"
    report = run_stage(data_dir, out)
    tok = Tokenizer.load(out)
    meta = json.loads((out / "tokens" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.vocab_size == 400
    assert meta["tokenizer_hash"] == report["tokenizer_hash"] == tok.hash
    docs = [json.loads(line)["text"] for line in (data_dir / "pretrain_val.jsonl").read_text().splitlines()]
    val = np.fromfile(out / "tokens" / "val.bin", dtype=np.uint16).tolist()
    assert val == [t for d in docs for t in (*tok.encode(d), tok.eot_id)]
    assert meta["splits"]["val"]["tokens"] == len(val) == report["splits"]["val"]["shard_tokens"]
    assert set(meta["splits"]) == {"train", "val", "test"}
    heldout = report["bytes_per_token_heldout"]
    assert heldout["english"]["documents"] == 4  # 3 English texts and the ASCII chat
    assert heldout["chinese"]["documents"] == 2 and heldout["code"]["documents"] == 2
    assert all(v["bytes_per_token"] > 1 for v in heldout.values())
    assert report["encoder_comparison"]["texts_with_different_ids"] == 0
    assert not list(out.glob(".staging-*"))


def test_stage_reports_missing_chinese_as_null(tmp_path):
    report = run_stage(make_data(tmp_path / "data", with_chinese=False), tmp_path / "tok")
    assert report["bytes_per_token_heldout"]["chinese"] is None
    assert any("no chinese" in note for note in report["notes"])


def test_stage_names_missing_or_empty_inputs(tmp_path):
    with pytest.raises(ChatforgeError, match="data directory not found"):
        run_stage(tmp_path / "absent", tmp_path / "tok")
    data_dir = make_data(tmp_path / "data")
    (data_dir / "pretrain_test.jsonl").write_text("\n")
    with pytest.raises(ChatforgeError, match="pretrain_test.jsonl holds no documents"):
        run_stage(data_dir, tmp_path / "tok")
    (data_dir / "pretrain_val.jsonl").unlink()
    with pytest.raises(ChatforgeError, match="pretrain_val.jsonl not found"):
        run_stage(data_dir, tmp_path / "tok")


def test_failed_run_keeps_the_previous_outputs(tmp_path):
    data_dir = make_data(tmp_path / "data")
    out = tmp_path / "tok"
    run_stage(data_dir, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with open(data_dir / "pretrain_test.jsonl", "a") as fh:
        fh.write("{broken\n")
    with pytest.raises(ChatforgeError, match="pretrain_test.jsonl:4: not valid JSON"):
        run_stage(data_dir, out, vocab_size=300)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="vocab_size"):
        parse(Config, ["--vocab_size=200"])
    with pytest.raises(ConfigError, match="num_threads"):
        parse(Config, ["--num_threads=0"])


def test_language_buckets():
    bucket = tokenize.language_bucket
    assert bucket({"kind": "code", "text": CHINESE}) == "code"
    assert bucket({"kind": "text", "text": CHINESE + " some ascii"}) == "chinese"
    assert bucket({"kind": "chat", "text": ENGLISH}) == "english"
    assert bucket({"kind": "text", "text": "Ça coûte très cher à Montréal, où l'été est déjà fini."}) is None
