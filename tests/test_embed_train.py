"""`chatforge embed`: contrastive training on the shared loop, saved for search, exact resume, both kinds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chatforge.cli import main
from chatforge.embed.model import ChatforgeEmbedder
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.hf import export_hf_gpt2
from chatforge.tokenizer import Tokenizer

FAST = ["--train.device=cpu", "--train.progress=false", "--train.max_minutes=0", "--pairs.wordnet_pairs=0",
        "--evaluate=false", "--chunk_size=4", "--embedding.max_tokens=32"]
ANIMALS = ["cat", "dog", "horse", "sheep", "goat", "duck", "owl", "fox", "bear", "wolf", "hare", "frog"]


def docs(offset: int) -> list[dict]:
    out = []
    for i, animal in enumerate(ANIMALS):
        text = (
            f"The {animal} number {i + offset} lives in the {animal} house. " * 3 + f"Everyone loves the {animal}. " * 3
        )
        out.append({"id": f"d{i}", "text": text, "kind": "text"})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    data = root / "data"
    data.mkdir()
    for split, offset in (("train", 0), ("val", 100)):
        (data / f"pretrain_{split}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs(offset)))
    tok = Tokenizer.train([d["text"] for d in docs(0)], vocab_size=300)
    tok.save(root / "gpt")
    torch.manual_seed(0)
    export_hf_gpt2(
        GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32)), root / "gpt"
    )
    return root, [f"--init_from={root / 'gpt'}", f"--data_dir={data}", "--pairs.span_chars=60", *FAST]


def test_contrastive_training_learns_and_saves_a_searchable_model(setup):
    root, args = setup
    out = root / "search"
    main(
        [
            "embed",
            *args,
            f"--out_dir={out}",
            "--train.steps=30",
            "--train.batch_size=8",
            "--train.lr=3e-3",
            "--train.warmup_steps=3",
            "--train.eval_every=30",
            "--val_pairs=12",
        ]
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    assert val[-1]["val_loss"] < val[0]["val_loss"]  # held-out InfoNCE falls
    embedder = ChatforgeEmbedder.load(out, device="cpu")
    vectors = embedder.embed(["The fox lives here.", "The owl lives here."], role="document")
    assert vectors.shape == (2, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert embedder.spec_.kind == "search"


def test_resume_is_exact_and_similarity_kind_has_no_markers(setup):
    root, args = setup
    common = [*args, "--embedding.kind=similarity", "--train.batch_size=8", "--train.steps=6", "--train.warmup_steps=1"]
    main(["embed", *common, f"--out_dir={root / 'straight'}"])
    main(["embed", *common, f"--out_dir={root / 'split'}", "--train.ckpt_every=3"])
    def losses(d):
        return [
            r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r
        ]
    # the split run is cut after step 3 by removing its later checkpoint and metrics, then resumed
    import shutil

    split = root / "split"
    shutil.rmtree(split / "checkpoints" / "step_00000006")
    (split / "checkpoints" / "latest").write_text("step_00000003\n")
    main(["embed", *common, f"--out_dir={split}", "--train.ckpt_every=3", "--resume"])
    assert losses(split)[3:] == pytest.approx(losses(root / "straight")[3:], rel=1e-6)
    assert ChatforgeEmbedder.load(split, device="cpu").spec_.marker("query") == ""
