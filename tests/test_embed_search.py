import json

import pytest
import torch

from chatforge.cli import main
from chatforge.embed.index import SearchIndex
from chatforge.embed.model import ChatforgeEmbedder, EmbeddingModel, EmbedSpec
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.tokenizer import Tokenizer

TEXTS = {
    "fruit.txt": "Apples and pears grow on trees in the orchard. " * 6,
    "code/sort.py": "def sort_items(items):\n    return sorted(items)\n" * 4,
    "sea.md": "The ocean has waves, salt water and many fish. " * 6,
}


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory):
    """A saved (untrained) chatforge embedder: search must work end to end whatever the weights are."""
    tokenizer = Tokenizer.train(list(TEXTS.values()) * 5, vocab_size=300)
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    path = tmp_path_factory.mktemp("embed") / "embedder"
    ChatforgeEmbedder(EmbeddingModel(gpt), tokenizer, EmbedSpec(kind="search", max_tokens=48)).save(path)
    return path


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "docs"
    for name, text in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "image.png").write_bytes(b"\x89PNG\x00\xff")  # not an indexed extension
    return root


def test_build_then_query_from_the_cli_and_from_python(embedder_dir, corpus, tmp_path, capsys):
    index_dir = tmp_path / "index"
    main(["search", f"--build={corpus}", f"--index={index_dir}", f"--embedder={embedder_dir}",
          "--chunk_tokens=16", "--overlap=4", "--json", "--k=2", "orchard", "apples"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in rows] == [1, 2] and all(r["query"] == "orchard apples" for r in rows)
    index = SearchIndex.load(index_dir)
    assert set(index.doc_ids) == set(TEXTS) and len(index) > len(TEXTS)  # every file, chunked
    assert [h.doc_id for h in index.search("orchard apples", k=2)] == [r["doc_id"] for r in rows]
    main(["search", f"--index={index_dir}", "ocean"])  # query an existing index
    out = capsys.readouterr().out
    assert out.startswith("query: ocean") and " 1. " in out


def test_index_of_a_jsonl_file(embedder_dir, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": name, "text": text}) + "\n" for name, text in TEXTS.items()))
    main(["search", f"--build={docs}", f"--index={tmp_path / 'index'}", f"--embedder={embedder_dir}"])
    assert set(SearchIndex.load(tmp_path / "index").doc_ids) == set(TEXTS)


@pytest.mark.parametrize("args, message", [
    (["--build={empty}", "--embedder={embedder}"], "no documents to index in"),
    (["--build={corpus}", "--embedder={missing}"], "no embedding model at"),
    (["--index={missing}", "a query"], "no search index at"),
    ([], "nothing to do"),
])
def test_bad_input_is_one_clear_error(args, message, embedder_dir, corpus, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    paths = {"empty": tmp_path / "empty", "embedder": embedder_dir, "corpus": corpus, "missing": tmp_path / "missing"}
    with pytest.raises(SystemExit) as exit_info:
        main(["search", f"--index={tmp_path / 'index'}", *(a.format(**paths) for a in args)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_probe_set_leaves_out_labels_too_small_to_split():
    from collections import Counter

    from chatforge.embed.evaluate import MIN_PROBE_CLASS, build_probe_set

    docs = [{"text": f"code {i}", "source": "stdlib"} for i in range(10)] + \
           [{"text": f"chat {i}", "source": "sharegpt"} for i in range(6)] + [{"text": "lone", "source": "fortunes-zh"}]
    texts, labels = build_probe_set(docs, per_class=8)
    assert Counter(labels) == {"stdlib": 8, "sharegpt": 6}  # capped per class; the lone document's label is dropped
    assert MIN_PROBE_CLASS > 1
