"""`chatforge reward`: K responses per prompt in one batch element, held-out accuracy, normalised rewards."""

from __future__ import annotations

import json

import pytest
import torch

from chatforge.cli import main
from chatforge.data.chat_batches import pad_rows
from chatforge.data.signal_rewards import read_signal_rewards
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.hf import export_hf_gpt2
from chatforge.serve.feedback import FeedbackStore
from chatforge.tokenizer import Tokenizer
from chatforge.train.reward import RewardTask, encode_ranking, load_reward_model, load_signal_rewards

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


def signal_rewards(indices) -> str:
    """Exported user-signal rewards: the good answers were copied (+1), the junk ones re-asked (-1)."""
    lines = []
    for i in indices:
        prompt = [{"role": "user", "content": f"question {i}"}]
        for j, (text, reward) in enumerate(((GOOD[i % 4], 1.0), (BAD[i % 4], -1.0))):
            lines.append({"id": f"s{i}-{j}", "prompt": prompt, "completion": text, "reward": reward,
                          "signals": ["copied", "continued"] if reward > 0 else ["asked_again"], "source": "feedback"})
    return "".join(json.dumps(line) + "\n" for line in lines)


def test_reward_model_learns_user_signals_alone_and_beside_rankings(setup):
    root, args = setup
    signals = root / "signals.jsonl"
    signals.write_text(signal_rewards(range(40)))
    steps = ["--train.steps=30", "--train.batch_size=4", "--train.lr=3e-3", "--train.warmup_steps=3"]
    main(["reward", *args, "--rankings_dir=", f"--signals={signals}", f"--out_dir={root / 'rm_signals'}", *steps])
    summary = json.loads((root / "rm_signals" / "summary.json").read_text())
    assert summary["val_signal_accuracy"] >= 0.9 and "val_accuracy" not in summary
    assert summary["reward_offset"] == 0 and summary["train_rankings"] == 0 and summary["val_signals"] > 0
    model = load_reward_model(root / "rm_signals")
    tok = Tokenizer.load(root / "base")
    rows = [r for i in range(100, 108) for r in encode_ranking(ranking(i), tok, 32)]  # unseen prompts
    ids, lengths = pad_rows(rows, tok.special_id("<|pad|>"))
    with torch.no_grad():
        scores = model.score(ids, lengths).view(-1, 4)
    assert (scores[:, :2].min(1).values > scores[:, 2:].max(1).values).float().mean() >= 0.75  # good > junk

    main(["reward", *args, f"--signals={signals}", f"--out_dir={root / 'rm_mixed'}", *steps])
    summary = json.loads((root / "rm_mixed" / "summary.json").read_text())
    assert summary["val_accuracy"] >= 0.9 and summary["val_signal_accuracy"] >= 0.9
    assert summary["train_rankings"] == 32 and summary["train_signals"] + summary["val_signals"] == 80
    rows = [json.loads(line) for line in (root / "rm_mixed" / "metrics.jsonl").read_text().splitlines()]
    assert {"ranking_loss", "signal_loss", "signal_accuracy"} <= set(next(r for r in rows if "loss" in r))


def test_signal_reward_options_are_checked(setup, capsys):
    root, args = setup
    few = root / "few.jsonl"
    few.write_text(signal_rewards(range(1)).splitlines(keepends=True)[0])  # one answer: one side stays empty
    for extra, message in (
        (["--rankings_dir="], "nothing to train on"),
        (["--rankings_dir=", f"--signals={few}"], "to hold out"),
        ([f"--signals={root / 'absent.jsonl'}"], "absent.jsonl"),
        ([f"--signals={few}", "--signals_val_fraction=1"], "signals_val_fraction"),
    ):
        with pytest.raises(SystemExit):
            main(["reward", *args, *extra, f"--out_dir={root / 'never'}"])
        assert message in capsys.readouterr().err


def test_signal_rewards_split_alike_whatever_ids_the_store_gave_the_answers(setup, tmp_path):
    """The feedback store's ids are random (uuid4), so the same feedback recorded twice (simulated users rerun)
    exports the same answers under other ids; they must still split alike, or every rerun trains another reward
    model (split by id, reruns of test_user_signals held out 15-19 of its 86 answers and its PPO figure varied).
    Copies of an answer (the same answer to the same question) are held out together, never on both sides."""
    tok = Tokenizer.load(setup[0] / "base")
    splits, ids = [], []
    for run in ("a", "b"):
        store = FeedbackStore(tmp_path / run / "feedback.db")
        for i in range(40):
            conv = store.create_conversation("m1")["id"]
            q = store.add_message(conv, "user", f"question {i % 10}")
            good = i % 3 > 0
            a = store.add_message(conv, "assistant", (GOOD if good else BAD)[i % 4], parent_id=q["id"], model_id="m1")
            store.add_signal(a["id"], "copied" if good else "regenerated")
        store.export("rewards", tmp_path / run / "rewards.jsonl")
        store.close()
        ids.append([r["id"] for r in read_signal_rewards(tmp_path / run / "rewards.jsonl")])
        splits.append(load_signal_rewards([str(tmp_path / run / "rewards.jsonl")], tok, 32, 0.3, seed=0))
    assert len(ids[0]) == 40 and not set(ids[0]) & set(ids[1])
    assert splits[0] == splits[1]
    train, val = splits[0]
    assert val and not {tuple(row) for row, _ in train} & {tuple(row) for row, _ in val}
