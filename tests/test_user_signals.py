"""User signals as reward, proven with simulated users: people who keep the answers that start "Sure" (they copy
them and go on talking) and re-ask the question when they get anything else. Their conversations go into the
feedback store the way the server stores them (every answer by reference to its recorded generation), then
`feedback export --as rewards` → `reward --signals` → `ppo` must make the policy give "Sure" answers
measurably more often on prompts none of the stages saw."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from chatforge.chat_template import prompt_ids
from chatforge.cli import main
from chatforge.data.signal_rewards import read_signal_rewards
from chatforge.infer.engine import Engine
from chatforge.infer.params import SamplingParams
from chatforge.model.checkpoint import load_model
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.hf import export_hf_gpt2
from chatforge.serve.chat import prompt_digest
from chatforge.serve.feedback import FeedbackStore
from chatforge.tokenizer import Tokenizer

KEPT, OTHER = "Sure, here you go.", "Well, that is hard to say."
TOPICS = ["cats", "dogs", "rain", "tea", "maps", "ships", "bread", "music", "stars", "trees", "paint", "boats"]
FRESH = ["clocks", "kites", "rivers", "books"]  # prompts for the before/after measurement only
MODEL, USER = "tiny-sft", "key-simulated"
MAX_TOKENS = 16
FAST = ["--train.dtype=fp32", "--train.compile=false", "--train.device=cpu", "--train.progress=false",
        "--train.max_minutes=0"]


def question(topic: str) -> str:
    return f"Tell me about {topic}."


def kept(answer: str) -> bool:
    return answer.strip().startswith("Sure")


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """A tiny SFT model that answers "Sure, ..." about 30 % of the time and "Well, ..." otherwise, whatever the
    topic: a property it produces sometimes, so PPO can find it."""
    root = tmp_path_factory.mktemp("signals")
    tokenizer = Tokenizer.train([question(t) + " " + KEPT + " " + OTHER for t in TOPICS + FRESH] * 10, vocab_size=300)
    tokenizer.save(root / "base")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=32)
    export_hf_gpt2(GPT(config), root / "base")
    rng = random.Random(0)
    data = root / "sft_data"
    data.mkdir()
    for split, count in (("train", 400), ("val", 40)):
        rows = [{"messages": [{"role": "user", "content": question(rng.choice(TOPICS))},
                              {"role": "assistant", "content": KEPT if rng.random() < 0.3 else OTHER}]}
                for _ in range(count)]
        (data / f"sft_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["sft", f"--data_dir={data}", f"--init_from={root / 'base'}", f"--out_dir={root / 'sft'}",
          "--train.steps=100", "--train.batch_size=8", "--train.lr=1e-2", "--train.warmup_steps=5", *FAST])
    return root, tokenizer


def answers(ckpt, tokenizer, questions: list[str], seed: int) -> list[tuple[str, str]]:
    """(text as the server shows it, finish reason) of one sampled answer per question, each with its own seed."""
    model, _ = load_model(ckpt)
    engine = Engine(model.eval(), tokenizer, max_batch_size=len(questions))
    outs = engine.generate(
        [prompt_ids([{"role": "user", "content": q}], tokenizer) for q in questions],
        [SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=seed * 100_003 + i) for i in range(len(questions))
         ],
    )
    return [(o.choices[0].text, o.choices[0].finish_reason) for o in outs]


def simulate_users(store: FeedbackStore, ckpt, tokenizer, conversations: int, seed: int) -> dict[str, int]:
    """Each user asks about a topic; an answer that starts "Sure" is copied and replied to, anything else makes
    the user ask the same question again (up to three times, then they give up). Answers are stored as the
    server stores them: its record of the generation, then the conversation's reference to it."""
    waiting = [(store.create_conversation(MODEL, USER)["id"], TOPICS[i % len(TOPICS)]) for i in range(conversations)]
    counts = {"kept": 0, "re-asked": 0}
    for attempt in range(3):
        questions = [store.add_message(conv, "user", question(topic), user_id=USER) for conv, topic in waiting]
        sampled = answers(ckpt, tokenizer, [question(topic) for _, topic in waiting], seed * 10 + attempt)
        still_waiting = []
        for i, ((conv, topic), asked, (text, finish)) in enumerate(zip(waiting, questions, sampled)):
            completion_id = f"chatcmpl-sim-{attempt}-{i}"
            store.record_generation(completion_id, USER, MODEL, prompt_digest([("user", question(topic))]),
                                    [(0, text, finish)])
            answer = store.add_generated_answer(conv, completion_id, 0, asked["id"], prompt_digest, user_id=USER)
            if kept(answer["content"]):
                store.add_signal(answer["id"], "copied", USER)
                store.add_message(conv, "user", "Thanks! Tell me more.", parent_id=answer["id"], user_id=USER)
                counts["kept"] += 1
            else:
                still_waiting.append((conv, topic))
                counts["re-asked"] += attempt < 2  # the third miss is left without a signal: the user gave up
        waiting = still_waiting
    return counts


def kept_frequency(ckpt, tokenizer, samples: int, seed: int) -> float:
    fresh = [question(f"{FRESH[i % len(FRESH)]} {i}") for i in range(samples)]
    return float(np.mean([kept(text) for text, _ in answers(ckpt, tokenizer, fresh, seed)]))


@pytest.mark.slow
def test_ppo_on_simulated_users_signals_raises_how_often_the_policy_gives_kept_answers(sft, tmp_path, capsys):
    root, tokenizer = sft
    store = FeedbackStore(tmp_path / "serve" / "feedback.db")
    counts = simulate_users(store, root / "sft", tokenizer, conversations=48, seed=1)
    store.close()

    rewards = tmp_path / "rewards.jsonl"
    main(["feedback", "export", "--as=rewards", f"--run_dir={tmp_path / 'serve'}", f"--out={rewards}"])
    records = read_signal_rewards(rewards)
    assert len(records) == counts["kept"] + counts["re-asked"]
    assert all(r["reward"] == (1.0 if kept(r["completion"]) else -1.0) for r in records)  # copied + continued: +1

    main(["reward", f"--signals={rewards}", "--rankings_dir=", f"--init_from={root / 'sft'}",
          f"--out_dir={tmp_path / 'rm'}", "--signals_val_fraction=0.2", "--train.steps=40", "--train.batch_size=8",
          "--train.lr=3e-3", "--train.warmup_steps=5", *FAST])
    assert json.loads((tmp_path / "rm" / "summary.json").read_text())["val_signal_accuracy"] >= 0.9

    pool = [{"id": f"p{i}", "messages": [{"role": "user", "content": question(TOPICS[i % len(TOPICS)])}],
             "reference": KEPT} for i in range(40)]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pool))
    main(["ppo", f"--policy={root / 'sft'}", f"--reward_model={tmp_path / 'rm'}",
          f"--prompts={tmp_path / 'pool.jsonl'}", f"--out_dir={tmp_path / 'ppo'}", "--ptx_coef=0",
          f"--max_tokens={MAX_TOKENS}", "--unfinished_penalty=0", "--gold_reward_model=", "--rollout_prompts=16",
          "--held_out_prompts=8", "--epochs=2", "--kl.beta=0.2", "--kl.adaptive=false", "--train.steps=40",
          "--train.batch_size=8", "--train.lr=1e-3", "--train.min_lr=1e-3", *FAST])

    before = kept_frequency(root / "sft", tokenizer, samples=200, seed=7)
    after = kept_frequency(tmp_path / "ppo", tokenizer, samples=200, seed=7)
    with capsys.disabled():
        print(f"\n[simulated users] {counts}; {len(records)} rewards; answers starting 'Sure' on 200 fresh prompts: "
              f"SFT {before:.3f} -> PPO {after:.3f}")
    # 200 samples each: the difference's standard error is ~0.045; measured SFT 0.280 -> PPO 0.865 (seed 7). The
    # chain is deterministic, but its seeds must not be lucky ones: with β = 0.02 the KL hardly told "Sure, here you
    # go." from garbled versions of it ("Su you go.", which the reward model scores alike but users do not keep),
    # PPO drifted into those at random, and 2 of 13 seed sets (users, reward model, PPO) ended at 0.33-0.40; with
    # β = 0.2 all 26 seed sets tried ended at 0.835-0.975 (and a policy PPO barely moves stays at ~0.28: it fails)
    assert after - before >= 0.2, (before, after)
