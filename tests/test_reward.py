"""`chatforge reward`: K responses per prompt in one batch element, held-out accuracy, normalised rewards."""

from __future__ import annotations

import json

import pytest
import torch

from chatforge.cli import main
from chatforge.data.chat_batches import pad_rows
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.hf import export_hf_gpt2
from chatforge.tokenizer import Tokenizer
from chatforge.train.reward import RewardTask, encode_ranking, load_reward_model

FAST = ["--train.dtype=fp32", "--train.compile=false", "--train.device=cpu", "--train.progress=false",
        "--train.max_minutes=0"]
GOOD = ["a helpful answer", "a kind reply", "a clear answer", "a good reply"]
BAD = ["zzz qqq", "qqq zzz zzz", "zzz", "qqq qqq"]


def ranking(i: int) -> dict:
    # the good answers (mentioning 'answer'/'reply') always beat the junk ones: a pattern a tiny model can learn
    completions = [GOOD[i % 4], GOOD[(i + 1) % 4], BAD[i % 4], BAD[(i + 2) % 4]]
    return {"id": f"r{i}", "prompt": [{"role": "user", "content": f"question {i}"}], "completions": completions,
            "ranking": [[0, 1], [2, 3]], "source": "auto"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    tok = Tokenizer.train(GOOD + BAD + [f"question {i}" for i in range(20)], vocab_size=300)
    tok.save(root / "base")
    torch.manual_seed(0)
    export_hf_gpt2(
        GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32)), root / "base"
    )
    data = root / "rankings"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(ranking(i)) + "\n" for i in range(32)))
    (data / "val.jsonl").write_text("".join(json.dumps(ranking(i)) + "\n" for i in range(100, 108)))
    return root, [f"--rankings_dir={data}", f"--init_from={root / 'base'}", *FAST]


def test_reward_model_learns_the_ranking_and_is_normalised(setup):
    root, args = setup
    out = root / "rm"
    main(
        [
            "reward",
            *args,
            f"--out_dir={out}",
            "--train.steps=30",
            "--train.batch_size=4",
            "--train.lr=3e-3",
            "--train.warmup_steps=3",
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["val_accuracy"] >= 0.9
    model = load_reward_model(out)
    tok = Tokenizer.load(root / "base")
    rows = [r for i in range(32) for r in encode_ranking(ranking(i), tok, 32)[:2]]  # the top-tier answers
    ids, lengths = pad_rows(rows, tok.special_id("<|pad|>"))
    with torch.no_grad():
        assert abs(float(model.score(ids, lengths).mean())) < 1e-3  # references average 0 after normalisation


def test_all_responses_of_a_prompt_stay_in_one_batch_element(setup):
    tok = Tokenizer.load(setup[0] / "base")
    items = [(encode_ranking(ranking(i), tok, 32), [[0, 1], [2, 3]]) for i in range(6)]
    task = RewardTask(items, items, batch_size=2, seed=0, pad_id=0, loss="pairwise")
    (batch, _), (second, _) = task.batch(0, 0, 2, "cpu"), task.batch(0, 1, 2, "cpu")
    assert len(batch) == 1 and len(batch[0][0]) == 4  # a rank's share is whole prompts with all K responses
    assert batch[0] is not second[0]
