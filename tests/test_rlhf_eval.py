"""The honest RLHF evaluation: intervals, best-of-n at known KL, KL measured by teacher forcing, and
`chatforge eval rlhf` end to end on tiny models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from chatforge.errors import ChatforgeError
from chatforge.evals.rlhf import (
    at_kl,
    best_of_n,
    best_of_n_kl,
    mean_interval,
    response_logprob_sums,
    training_curve,
    win_rate,
)
from chatforge.model.gpt import GPT, GPTConfig


def test_all_wins_give_rate_one_with_a_tight_interval():
    result = win_rate([2.0] * 200, [1.0] * 200)
    assert result == {"rate": 1.0, "low": 1.0, "high": 1.0, "prompts": 200}


def test_even_split_gives_an_interval_around_one_half_about_seven_points_wide():
    ours = [1.0, 0.0] * 100
    result = win_rate(ours, [0.5] * 200)
    assert result["rate"] == 0.5 and result["low"] < 0.5 < result["high"]
    # s = 0.5025 for 200 outcomes of 0/1, so the half-width is 1.96·0.5025/√200 = 0.0696
    assert result["high"] - 0.5 == pytest.approx(0.0696, abs=1e-3)


def test_ties_count_half_a_win():
    assert win_rate([1.0, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0])["rate"] == 0.5
    assert win_rate([1.0, 1.0], [1.0, 1.0]) == {"rate": 0.5, "low": 0.5, "high": 0.5, "prompts": 2}


def test_mean_interval_on_known_values():
    result = mean_interval([1, 2, 3, 4, 5])  # s = √2.5 = 1.5811; 1.96·1.5811/√5 = 1.3859
    assert result["mean"] == 3.0 and result["prompts"] == 5
    assert (result["low"], result["high"]) == pytest.approx((3 - 1.3859, 3 + 1.3859), abs=1e-3)
    with pytest.raises(ChatforgeError, match="at least one prompt"):
        mean_interval([])
    with pytest.raises(ChatforgeError, match="paired"):
        win_rate([1.0, 2.0], [1.0])


def test_best_of_n_kl_formula():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)  # 0.1931
    assert best_of_n_kl(16) == pytest.approx(1.8351, abs=1e-4)
    assert [round(best_of_n_kl(n), 3) for n in (4, 8)] == [0.636, 1.204]
    with pytest.raises(ChatforgeError):
        best_of_n_kl(0)


def test_best_of_n_keeps_the_proxy_favourite_among_the_first_n_samples():
    # prompt 0: the proxy's favourite is the gold model's worst (over-optimisation in miniature)
    proxy = np.array([[0.0, 1.0, 3.0, 2.0], [1.0, 0.0, 0.0, 5.0]])
    gold = np.array([[1.0, 2.0, -4.0, 0.0], [0.5, 9.0, 9.0, 1.5]])
    points = best_of_n(proxy, gold, [1, 2, 4])
    assert [p["n"] for p in points] == [1, 2, 4]
    assert [p["proxy_reward"] for p in points] == [0.5, 1.0, 4.0]
    assert [p["gold_reward"] for p in points] == [0.75, 1.25, -1.25]
    assert points[2]["kl"] == round(best_of_n_kl(4), 4)
    with pytest.raises(ChatforgeError, match="best-of-8 needs 8 samples"):
        best_of_n(proxy, gold, [8])


def test_best_of_n_curve_read_at_a_kl_interpolates_in_root_kl_and_refuses_to_extrapolate():
    points = [{"kl": 0.0, "gold_reward": 0.0}, {"kl": 1.0, "gold_reward": 1.0}, {"kl": 4.0, "gold_reward": 3.0}]
    assert at_kl(points, 1.0, "gold_reward") == 1.0
    assert at_kl(points, 2.25, "gold_reward") == 2.0  # √2.25 = 1.5: halfway between √1 and √4
    assert at_kl(points, 9.0, "gold_reward") is None


def test_response_log_probs_match_token_by_token_scoring():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    pairs = [([1, 2, 3], [4, 5]), ([6], [7, 8, 9]), ([1, 2, 3, 4, 5, 6], [7, 8, 9])]  # the last exceeds the context

    def by_hand(prompt, response):
        row = (prompt + response)[-8:]
        start = len(row) - len(response)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([row]))[0][0].float(), -1)
        return sum(float(logp[t - 1, row[t]]) for t in range(start, len(row)))

    sums = response_logprob_sums(model, pairs, pad_id=0, device="cpu")
    assert sums.tolist() == pytest.approx([by_hand(p, r) for p, r in pairs], abs=1e-4)
    assert all(s < 0 for s in sums.tolist())


def test_training_curve_keeps_one_point_per_rollout_and_tolerates_rows_without_gold():
    rows = [{"step": 1, "kl": 0.0, "reward": 0.1}, {"step": 2, "kl": 0.0, "reward": 0.1},
            {"step": 3, "kl": 0.5, "reward": 0.3, "gold_reward": 0.2}, {"step": 4, "loss": 1.0},
            {"step": 5, "kl": 0.5, "reward": 0.3, "gold_reward": 0.2}]
    curve = training_curve(rows)
    assert [p["step"] for p in curve] == [1, 3]
    assert curve[0]["gold_reward"] is None and curve[1]["gold_reward"] == 0.2


def tiny_gpt(vocab: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=48, n_layer=1, n_head=2, n_embd=32)).eval()


def test_a_policy_identical_to_sft_ties_everywhere_at_zero_kl(tmp_path):
    """Policy and SFT share seeds, so the same model gives the same answers: every judge ties, the KL is 0."""
    from chatforge.evals.rlhf import evaluate_rlhf, plot_rlhf
    from chatforge.model.heads import ScalarHeadModel
    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.train(["a helpful answer", "zzz qqq", "question"] * 5, vocab_size=290)
    sft = tiny_gpt(tok.vocab_size, 0)
    proxy, gold = (ScalarHeadModel(tiny_gpt(tok.vocab_size, seed)).eval() for seed in (1, 2))
    held_out = [{"messages": [{"role": "user", "content": f"question {i}"}], "reference": "a helpful answer"}
                for i in range(6)]

    def judge(texts):  # letter counts, normalised: any fixed embedding will do for a tie
        vectors = np.array([[t.count(c) + 1.0 for c in "aehlpqz "] for t in texts])
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    summary, rows = evaluate_rlhf(sft, sft, proxy, gold, tok, held_out, 5, judge, best_of=(1, 2, 4),
                                  unfinished_penalty=0.5)
    assert summary["policy"]["kl"]["mean"] == pytest.approx(0.0, abs=1e-5)
    for key in ("win_rate_gold", "win_rate_minilm", "win_rate_proxy"):
        assert summary[key] == {"rate": 0.5, "low": 0.5, "high": 0.5, "prompts": 6}
    assert summary["gold_reward_difference"]["mean"] == 0.0
    assert summary["best_of_n"][0]["gold_reward"] == summary["sft"]["gold_reward"]["mean"]
    assert summary["best_of_n_gold_at_policy_kl"] == summary["sft"]["gold_reward"]["mean"]
    assert [r["policy_answer"] for r in rows] == [r["sft_answer"] for r in rows]
    plot_rlhf(summary, [{"step": 1, "kl": 0.0, "reward": 0.1}], tmp_path / "rlhf.png")
    assert (tmp_path / "rlhf.png").stat().st_size > 1000


@pytest.mark.slow
def test_eval_rlhf_end_to_end_on_tiny_models(tmp_path, capsys):
    """Rankings → proxy and gold reward models → `eval rlhf` of a PPO run directory: summary, answers, plot."""
    from chatforge.cli import main
    from chatforge.model.hf import export_hf_gpt2
    from chatforge.tokenizer import Tokenizer

    tok = Tokenizer.train(["a helpful answer", "zzz qqq", "question"] * 5, vocab_size=290)
    for name, seed in (("sft", 0), ("ppo", 1)):  # a "policy" that differs from SFT everywhere
        tok.save(tmp_path / name)
        export_hf_gpt2(tiny_gpt(tok.vocab_size, seed), tmp_path / name)
    # what a PPO run leaves beside its policy: the summary's settings and per-rollout metrics (gold from step 3)
    (tmp_path / "ppo" / "summary.json").write_text(json.dumps(
        {"max_tokens": 6, "held_out_prompts": 8, "unfinished_penalty": 0.5}))
    (tmp_path / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": i, "kl": 0.1 * i, "reward": 0.05 * i, **({"gold_reward": 0.02 * i} if i > 2 else {})}) + "\n"
        for i in range(1, 12)))
    pool = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"question {i}"}],
             "reference": "a helpful answer" if i % 2 else "zzz qqq"} for i in range(20)]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pool))
    train = [f"--train.{k}" for k in ("dtype=fp32", "compile=false", "device=cpu", "progress=false", "max_minutes=0",
                                      "batch_size=4")]
    main(["rankings", f"--prompts={tmp_path / 'pool.jsonl'}", "--ckpt=", f"--out_dir={tmp_path / 'rankings'}",
          "--held_out_prompts=8"])
    for name, steps, held_out in (("proxy", 3, "false"), ("gold", 6, "true")):
        main(["reward", f"--rankings_dir={tmp_path / 'rankings'}", f"--init_from={tmp_path / 'sft'}",
              f"--out_dir={tmp_path / name}", f"--train.steps={steps}", f"--include_held_out={held_out}", *train])
    capsys.readouterr()
    main(["eval", "rlhf", f"--ckpt={tmp_path / 'ppo'}", f"--rlhf.baseline={tmp_path / 'sft'}",
          f"--rlhf.reward_model={tmp_path / 'proxy'}", f"--rlhf.gold_reward_model={tmp_path / 'gold'}",
          f"--rlhf.prompts={tmp_path / 'pool.jsonl'}", "--rlhf.best_of=1,2,4", f"--out={tmp_path / 'eval'}",
          "--device=cpu"])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    # budget, held-out count and penalty are the PPO run's
    assert (summary["prompts"], summary["max_tokens"], summary["unfinished_penalty"]) == (8, 6, 0.5)
    for key in ("win_rate_gold", "win_rate_minilm"):
        rate = summary[key]
        assert rate["prompts"] == 8 and 0 <= rate["low"] <= rate["rate"] <= rate["high"] <= 1
    assert [p["n"] for p in summary["best_of_n"]] == [1, 2, 4]
    # best-of-1 is the SFT answer itself: same samples, same scores
    assert summary["best_of_n"][0]["gold_reward"] == summary["sft"]["gold_reward"]["mean"]
    proxy_curve = [p["proxy_reward"] for p in summary["best_of_n"]]
    assert proxy_curve == sorted(proxy_curve)  # more candidates never lower the proxy's pick
    assert summary["policy"]["kl"]["mean"] > 0  # two unrelated models: the measured KL is far from 0
    assert len((tmp_path / "eval" / "answers.jsonl").read_text().splitlines()) == 8
    assert (tmp_path / "eval" / "rlhf.png").stat().st_size > 1000
    assert "win rate over SFT on 8 prompts" in capsys.readouterr().out
