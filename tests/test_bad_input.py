"""Property-based tests of bad input (hypothesis): every reader of user-supplied files, fed random bytes, truncated
copies of real files and random mutations of valid records, either returns a result or raises a ChatforgeError
naming the file; every stage's options, given random values of the right and wrong types on the command line or in
a config file, either parse or end in a one-line error, never in a traceback.

Each reader is a folder of valid files (built once) and a function reading it whole; one file of the folder is
damaged per example. ``max_examples`` keeps the whole file well under a minute on two cores.
"""

from __future__ import annotations

import gzip
import importlib
import io as stdio
import json
import shutil
import tempfile
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatforge import cli, config
from chatforge.data import sources
from chatforge.data.documents import read_documents
from chatforge.data.edit_data import read_user_triples
from chatforge.data.rankings import read_prompt_pool, read_rankings
from chatforge.data.sft_data import read_conversations as read_chat_file
from chatforge.data.shards import TokenWindows, write_shard
from chatforge.embed.data import read_user_pairs
from chatforge.embed.index import SearchIndex
from chatforge.embed.model import ChatforgeEmbedder, EmbeddingModel, EmbedSpec
from chatforge.errors import ChatforgeError
from chatforge.evals.humaneval import load_problems
from chatforge.evals.icl import user_task
from chatforge.model.checkpoint import load_model, load_trainer_state, save_checkpoint
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.heads import ScalarHeadModel
from chatforge.model.hf import export_hf_gpt2
from chatforge.safety.classifier import SafetyClassifier, read_labeled
from chatforge.safety.filters import Policy
from chatforge.serve.terminal import read_messages
from chatforge.tokenizer import SPECIAL_TOKENS, Tokenizer
from chatforge.tools.evaluate import read_questions
from chatforge.train.edit import read_triples
from chatforge.train.reward import OFFSET_FILE, load_reward_model
from chatforge.train.sft import read_conversations as read_sft_file

EXAMPLES = 12  # per reader and kind of damage: 35 readers x 3 kinds x 12 = 1,260 damaged inputs per run
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

CHAT = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}]
TEXT = "The quick brown fox jumps over the lazy dog. 你好，世界。 def f(x): return x + 1\n" * 3


def jsonl(*rows: Any) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def as_json(value: Any) -> bytes:
    return json.dumps(value, indent=1).encode()


# ---- the valid files each reader starts from ----------------------------------------------------------------


def _tokenizer() -> Tokenizer:
    return Tokenizer.train([TEXT] * 4, vocab_size=256 + len(SPECIAL_TOKENS) + 24)


def _tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=8))


def _files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint_files(root: Path) -> dict[str, bytes]:
    tokenizer_dir = root / "tok"
    _tokenizer().save(tokenizer_dir)
    for step in (1, 2):  # two checkpoints, so damage to the newest can name the previous good one
        save_checkpoint(root / "run", step, _tiny_gpt(step), {"step": step, "rng": torch.arange(4)},
                        {"model": _tiny_gpt().config.to_dict()}, tokenizer=tokenizer_dir, keep=0)
    return _files_of(root / "run")


def reward_files(root: Path) -> dict[str, bytes]:
    gpt = _tiny_gpt()
    save_checkpoint(root / "reward", 1, ScalarHeadModel(gpt), {"step": 1},
                    {"stage": "reward", "model": gpt.config.to_dict(), "model_prefix": "gpt."})
    (root / "reward" / OFFSET_FILE).write_text(json.dumps({"offset": 0.5}))
    return _files_of(root / "reward")


def hf_files(root: Path) -> dict[str, bytes]:
    export_hf_gpt2(_tiny_gpt(), root / "hf")
    return _files_of(root / "hf")


def tokenizer_files(root: Path) -> dict[str, bytes]:
    return {"tokenizer.json": _tokenizer().save(root).read_bytes()}


def parquet_files(root: Path) -> dict[str, bytes]:
    pq.write_table(pa.table({"text": [TEXT, "second document", None], "n": [1, 2, 3]}), root / "x.parquet")
    return {"x.parquet": (root / "x.parquet").read_bytes()}


class WordHash:
    """A deterministic embedder for index files: hashed words, unit length."""

    name, dim = "word-hash", 16

    def embed(self, texts, role="document"):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.split():
                out[i, sum(word.encode()) % self.dim] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    def chunk(self, text, chunk_tokens, overlap):
        return [text]

    def spec(self):
        return {"type": "word-hash"}


def index_files(root: Path, backend: str) -> dict[str, bytes]:
    docs = [("a", "apples and pears"), ("b", "waves of the sea"), ("c", "def sort(items): return items")]
    SearchIndex.build(docs, WordHash(), backend=backend).save(root / "index")
    return _files_of(root / "index")


def embedder_files(root: Path) -> dict[str, bytes]:
    spec = EmbedSpec(max_tokens=32, query_marker="q", document_marker="d")
    model = EmbeddingModel(GPT(GPTConfig(vocab_size=_tokenizer().vocab_size,
                                         block_size=32, n_layer=1, n_head=2, n_embd=8)), spec.pooling, spec.proj_dim)
    ChatforgeEmbedder(model, _tokenizer(), spec).save(root / "embedder")
    return _files_of(root / "embedder")


def classifier_files(root: Path) -> dict[str, bytes]:
    buffer = stdio.BytesIO()
    np.savez(buffer, weights=np.linspace(-1, 1, 4096), bias=np.array(0.25))
    return {"classifier.npz": buffer.getvalue(), "classifier.json": as_json({"embedder": "ngrams", "positive": "bad"})}


def shard_files(root: Path) -> dict[str, bytes]:
    write_shard(root / "train.bin", [np.arange(40) % 50], vocab_size=50)
    return _files_of(root)


# ---- the readers ------------------------------------------------------------------------------------------------


@dataclass
class Reader:
    name: str
    valid: Callable[[Path], dict[str, bytes]]  # writes nothing itself; returns {relative file name: content}
    read: Callable[[Path], Any]  # reads the folder's files whole


def _consume(value: Any) -> Any:
    return list(value) if hasattr(value, "__next__") else value


def _corpus(name: str) -> Callable[[Path], Any]:
    return lambda folder: list(sources.user_documents(str(folder / name)))


HUMANEVAL_ROW = {"task_id": "t/0", "prompt": "def f(x):\n", "test": "assert f(1) == 2\n", "entry_point": "f",
                 "canonical_solution": "    return x + 1\n"}

READERS = [
    Reader("corpus_jsonl", lambda root: {"in.jsonl": jsonl({"text": TEXT}, {"messages": CHAT}, {"text": "x"})},
           _corpus("in.jsonl")),
    Reader("corpus_txt", lambda root: {"in.txt": TEXT.encode()}, _corpus("in.txt")),
    Reader("corpus_md", lambda root: {"in.md": ("# Title\n\n" + TEXT).encode()}, _corpus("in.md")),
    Reader("corpus_parquet", parquet_files, _corpus("x.parquet")),
    Reader("corpus_folder", lambda root: {"d/a.jsonl": jsonl({"text": TEXT}), "d/b.txt": TEXT.encode()},
           _corpus("d")),
    Reader("sharegpt_json", lambda root: {"sharegpt.json": as_json(
        [{"id": "c1", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
         {"id": "c2", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}])},
        lambda folder: list(sources.sharegpt_conversations(sources.ShareGPTStats(), folder / "sharegpt.json"))),
    Reader("sft_data_chat_jsonl", lambda root: {"chats.jsonl": jsonl({"messages": CHAT, "category": "plain"},
                                                                   {"messages": CHAT, "user_id": 3})},
           lambda folder: list(read_chat_file(folder / "chats.jsonl", "user"))),
    Reader("sft_train_jsonl", lambda root: {"sft.jsonl": jsonl({"messages": CHAT}, {"messages": CHAT})},
           lambda folder: read_sft_file(folder / "sft.jsonl")),
    Reader("rankings_jsonl", lambda root: {"rank.jsonl": jsonl(
        {"prompt": CHAT[:1], "completions": ["4", "5", "fish", "x"], "ranking": [[0], [1, 2], [3]]},
        {"prompt": CHAT[:1], "completions": ["4", "four", "5", "6"], "ranking": [0, 1, 2, 3]})},
        lambda folder: read_rankings(folder / "rank.jsonl")),
    Reader("prompt_pool_jsonl", lambda root: {"pool.jsonl": jsonl({"id": "p", "messages": CHAT[:1], "reference": "4"})},
           lambda folder: read_prompt_pool(folder / "pool.jsonl")),
    Reader("edit_triples_user_jsonl", lambda root: {"edits.jsonl": jsonl(
        {"input": "teh cat", "instruction": "Fix the spelling.", "output": "the cat", "type": "spelling"})},
        lambda folder: read_user_triples(str(folder / "edits.jsonl"))),
    Reader("edit_triples_train_jsonl", lambda root: {"edits.jsonl": jsonl(
        {"input": "teh cat", "instruction": "Fix the spelling.", "output": "the cat"})},
        lambda folder: read_triples(folder / "edits.jsonl")),
    Reader("tool_questions_jsonl", lambda root: {"q.jsonl": jsonl(
        {"question": "What is 3*4?", "expression": "3*4", "answer": "12"})},
        lambda folder: read_questions(str(folder / "q.jsonl"))),
    Reader("safety_labeled_jsonl", lambda root: {"labeled.jsonl": jsonl(
        {"text": "you idiot", "label": "bad"}, {"text": "hello there", "label": "ok"})},
        lambda folder: read_labeled(str(folder / "labeled.jsonl"), "bad")),
    Reader("safety_policy_toml", lambda root: {"policy.toml": b'[categories.insults]\nwords = ["idiot"]\n'
                                               b'action = "refuse"\n'},
           lambda folder: Policy.load(folder / "policy.toml")),
    Reader("safety_policy_yaml", lambda root: {"policy.yaml": b"categories:\n  insults:\n    words: [idiot]\n"},
           lambda folder: Policy.load(folder / "policy.yaml")),
    Reader("safety_classifier", classifier_files, lambda folder: SafetyClassifier.load(folder)),
    Reader("documents_jsonl", lambda root: {"docs.jsonl": jsonl({"id": "a", "text": TEXT}, {"text": "b"})},
           lambda folder: list(read_documents(folder / "docs.jsonl"))),
    Reader("embed_pairs_jsonl", lambda root: {"pairs.jsonl": jsonl({"query": "q", "document": "d"},
                                                                   {"text_a": "a", "text_b": "b"})},
           lambda folder: read_user_pairs(folder / "pairs.jsonl")),
    Reader("icl_task_jsonl", lambda root: {"task.jsonl": jsonl(*({"input": str(i), "output": str(i + 1),
                                                                "candidates": ["1", "2"]} for i in range(4)))},
           lambda folder: user_task(str(folder / "task.jsonl"))),
    Reader("humaneval_jsonl", lambda root: {"he.jsonl": jsonl(HUMANEVAL_ROW)},
           lambda folder: load_problems(folder / "he.jsonl", need_canonical=True)),
    Reader("humaneval_jsonl_gz", lambda root: {"he.jsonl.gz": gzip.compress(jsonl(HUMANEVAL_ROW), mtime=0)},
           lambda folder: load_problems(folder / "he.jsonl.gz")),
    Reader("chat_messages_json", lambda root: {"messages.json": as_json({"messages": CHAT})},
           lambda folder: read_messages(str(folder / "messages.json"))),
    Reader("config_toml", lambda root: {"c.toml": b'inputs = ["a.txt"]\nnum_perm = 64\nval_fraction = 0.1\n'},
           lambda folder: config.parse(importlib.import_module("chatforge.stages.data").Config,
                                       ["--config", str(folder / "c.toml")])),
    Reader("config_yaml", lambda root: {"c.yaml": b"model:\n  n_layer: 2\ntrain:\n  steps: 5\n  lr: 0.01\n"},
           lambda folder: config.parse(importlib.import_module("chatforge.stages.pretrain").Config,
                                       ["--config", str(folder / "c.yaml")])),
    Reader("config_json", lambda root: {"c.json": as_json({"temperature": 0.5, "stop": ["\n"], "n": 2})},
           lambda folder: config.parse(importlib.import_module("chatforge.stages.generate").Config,
                                       ["--config", str(folder / "c.json")])),
    Reader("tokenizer_json", tokenizer_files, lambda folder: Tokenizer.load(folder / "tokenizer.json")),
    Reader("checkpoint_model", checkpoint_files, lambda folder: load_model(folder)),
    Reader("checkpoint_trainer_state", checkpoint_files,
           lambda folder: load_trainer_state(folder / "checkpoints" / "step_00000002")),
    Reader("reward_model", reward_files, lambda folder: load_reward_model(folder)),
    Reader("hf_gpt2_folder", hf_files, lambda folder: load_model(folder)),
    Reader("search_index_numpy", lambda root: index_files(root, "numpy"),
           lambda folder: SearchIndex.load(folder, embedder=WordHash()).search("apples", 2)),
    Reader("search_index_hnsw", lambda root: index_files(root, "hnsw"),
           lambda folder: SearchIndex.load(folder, embedder=WordHash()).search("apples", 2)),
    Reader("embedder_folder", embedder_files, lambda folder: ChatforgeEmbedder.load(folder).embed(["hello"])),
    Reader("token_shards", shard_files, lambda folder: TokenWindows(folder / "train.bin", block_size=4)),
]

_VALID: dict[str, dict[str, bytes]] = {}


def valid_files(reader: Reader) -> dict[str, bytes]:
    if reader.name not in _VALID:
        with tempfile.TemporaryDirectory() as root:
            _VALID[reader.name] = reader.valid(Path(root))
    return _VALID[reader.name]


def read_damaged(reader: Reader, name: str, content: bytes) -> None:
    """Write the reader's valid files with ``name`` replaced by ``content`` and read them: a result or a
    ChatforgeError naming the damaged file (or, for a reader of a folder, that folder) are the only outcomes."""
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "input"
        for relative, data in valid_files(reader).items():
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (folder / relative).write_bytes(content if relative == name else data)
        try:
            _consume(reader.read(folder))
        except ChatforgeError as exc:
            message = str(exc)
            named = str(folder / name) in message or (len(valid_files(reader)) > 1 and str(folder) in message)
            assert named, f"{reader.name}: the error does not name {folder / name}: {message}"
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def test_every_reader_reads_its_valid_files():
    """The damage below starts from files the readers accept, so a failure there is the damage's doing."""
    for reader in READERS:
        with tempfile.TemporaryDirectory() as root:
            folder = Path(root)
            for relative, data in valid_files(reader).items():
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                (folder / relative).write_bytes(data)
            assert _consume(reader.read(folder)) is not None, reader.name


# ---- kinds of damage -------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON value, as the keys/indexes leading to it."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, prefix + (index,))
    return found


@st.composite
def mutated_json(draw, value: Any) -> Any:
    """``value`` with one place replaced by a random JSON value, or removed from its object or list."""
    value = json.loads(json.dumps(value))
    path = draw(st.sampled_from(_paths(value)))
    if not path:
        return draw(json_values)
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values)
    return value


@st.composite
def mutated_bytes(draw, data: bytes) -> bytes:
    """``data`` with a few bytes overwritten, inserted or deleted."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        action = draw(st.sampled_from(["overwrite", "insert", "delete"]))
        if action == "insert" or not data:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "overwrite":
            data[at] = draw(st.integers(0, 255))
        else:
            del data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


@st.composite
def mutated_record(draw, name: str, data: bytes) -> bytes:
    """A structural mutation of a JSON file or of one JSONL line, else byte-level damage."""
    if name.endswith(".jsonl"):
        lines = data.decode().splitlines()
        index = draw(st.integers(0, len(lines) - 1))
        lines[index] = json.dumps(draw(mutated_json(json.loads(lines[index]))), ensure_ascii=draw(st.booleans()))
        return ("\n".join(lines) + "\n").encode()
    if name.endswith(".json"):
        return json.dumps(draw(mutated_json(json.loads(data)))).encode()
    return draw(mutated_bytes(data))


def _file_of(reader: Reader):
    return st.sampled_from(sorted(valid_files(reader)))


@pytest.mark.parametrize("reader", READERS, ids=lambda r: r.name)
@PROPERTY
@given(data=st.data())
def test_random_bytes_give_a_result_or_an_error_naming_the_file(reader, data):
    name = data.draw(_file_of(reader))
    read_damaged(reader, name, data.draw(st.binary(max_size=600)))


def test_a_yaml_key_that_is_not_a_name_is_an_error_naming_the_file():
    """Found by the property above in CI: YAML's bare "?" is a mapping with a null key, which crashed the policy
    reader's list of unknown sections."""
    reader = next(r for r in READERS if r.name == "safety_policy_yaml")
    read_damaged(reader, "policy.yaml", b"?")


@pytest.mark.parametrize("reader", READERS, ids=lambda r: r.name)
@PROPERTY
@given(data=st.data())
def test_truncated_files_give_a_result_or_an_error_naming_the_file(reader, data):
    name = data.draw(_file_of(reader))
    content = valid_files(reader)[name]
    read_damaged(reader, name, content[: data.draw(st.integers(0, max(len(content) - 1, 0)))])


@pytest.mark.parametrize("reader", READERS, ids=lambda r: r.name)
@PROPERTY
@given(data=st.data())
def test_mutated_records_give_a_result_or_an_error_naming_the_file(reader, data):
    name = data.draw(_file_of(reader))
    read_damaged(reader, name, data.draw(mutated_record(name, valid_files(reader)[name])))


def test_a_damaged_checkpoint_names_the_previous_good_one(tmp_path):
    files = checkpoint_files(tmp_path / "valid")
    run = tmp_path / "run"
    for relative, data in files.items():
        (run / relative).parent.mkdir(parents=True, exist_ok=True)
        (run / relative).write_bytes(data)
    weights = run / "checkpoints" / "step_00000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # a copy cut short
    with pytest.raises(ChatforgeError, match="truncated") as caught:
        load_model(run)
    assert "is damaged" in str(caught.value) and str(run / "checkpoints" / "step_00000001") in str(caught.value)
    data = bytearray(files["checkpoints/step_00000002/model.safetensors"])
    data[-1] ^= 0xFF  # one flipped bit in a weight: only the recorded hash sees it
    weights.write_bytes(bytes(data))
    with pytest.raises(ChatforgeError, match="SHA-256"):
        load_model(run)
    assert load_model(run / "checkpoints" / "step_00000001")[1]["step"] == 1


# ---- every stage's options ---------------------------------------------------------------------------------------


def stage_module(stage: str):
    return importlib.import_module(f"chatforge.stages.{stage.replace('-', '_')}")


def _flat_keys(stage: str) -> list[str]:
    return config._flat_keys(stage_module(stage).Config)


option_values = st.one_of(
    st.text(max_size=12),
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(repr),
    st.sampled_from(["true", "false", "none", "", "nan", "-inf", "1e400", "[1, 2]", '{"1": 2}', "a,b", "0x10"]),
    st.lists(st.integers(-5, 5).map(str) | st.text(max_size=4), max_size=3).map(",".join),
)


def run_cli(stage: str, argv: list[str]) -> tuple[bool, str]:
    """``chatforge <stage> argv`` with the stage's work replaced by nothing: (parsed, stderr). Any exception but
    the CLI's clean exit (status 2, one line) propagates and fails the test."""
    module = stage_module(stage)
    stderr = stdio.StringIO()
    with mock.patch.object(module, "run", lambda cfg, args: None), redirect_stderr(stderr):
        try:
            cli.main([stage, *argv])
        except SystemExit as exc:
            assert exc.code == 2 and stderr.getvalue().startswith("chatforge: error: "), stderr.getvalue()
            assert len(stderr.getvalue().strip().splitlines()) == 1
            return False, stderr.getvalue()
    return True, ""


@pytest.mark.parametrize("stage", cli.stage_names())
@settings(max_examples=25, deadline=None, database=None)
@given(data=st.data())
def test_stage_options_parse_or_fail_with_one_line(stage, data):
    keys = _flat_keys(stage)
    key = data.draw(st.sampled_from(keys) | st.text(min_size=1, max_size=8))
    value = data.draw(option_values)
    parsed, error = run_cli(stage, [f"--{key}={value}"])
    if not parsed and key in keys and "must be" in error:
        assert key.rsplit(".", 1)[-1].rstrip("_") in error


@pytest.mark.parametrize("stage", cli.stage_names())
@settings(max_examples=10, deadline=None, database=None)
@given(data=st.data(), suffix=st.sampled_from([".toml", ".yaml", ".json"]))
def test_stage_config_files_parse_or_fail_naming_the_file(stage, data, suffix):
    keys = _flat_keys(stage)
    section = st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), json_values, max_size=4)
    values = data.draw(section)
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / f"stage{suffix}"
        text = json.dumps(values) if suffix != ".toml" else _toml(values)
        path.write_text(text, encoding="utf-8")
        parsed, error = run_cli(stage, ["--config", str(path)])
        if not parsed:
            assert str(path) in error or "option" in error, error


def _toml(values: dict) -> str:
    """JSON values as TOML (JSON's null has no TOML form: such keys are left out)."""

    def render(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return {float("inf"): "inf", float("-inf"): "-inf"}.get(value, repr(value))
        if isinstance(value, list):
            return "[" + ", ".join(render(v) for v in value if v is not None) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {render(v)}" for k, v in value.items() if v is not None) + "}"
        return json.dumps(value)

    return "".join(f"{json.dumps(key)} = {render(value)}\n" for key, value in values.items() if value is not None)


def test_option_bounds_are_checked_where_options_are_parsed():
    data_config = importlib.import_module("chatforge.stages.data").Config
    with pytest.raises(ChatforgeError, match="'num_perm' must be >= 1; got 0"):
        config.parse(data_config, ["--num_perm=0"])
    with pytest.raises(ChatforgeError, match="'min_chars' must be >= 0; got -1"):
        config.parse(data_config, ["--min_chars=-1"])
    with pytest.raises(ChatforgeError, match="'near_dup_threshold' must be a finite number"):
        config.parse(data_config, ["--near_dup_threshold=nan"])
    with pytest.raises(ChatforgeError, match="'seed' expects int"):
        config.parse(data_config, ["--seed=1e400"])
    assert config.parse(data_config, ["--val_fraction=0.5"])[0].val_fraction == 0.5
    assert ">= 1" in config.help_text(data_config)
