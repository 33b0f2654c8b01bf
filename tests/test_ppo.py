"""PPO end to end on a toy task whose reward is known, and the `chatforge ppo` stage on tiny models."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from chatforge.chat_template import prompt_ids, stop_token_ids
from chatforge.data.shards import TokenWindows, write_shard
from chatforge.evals.ppo_eval import reward_scores
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.model.heads import ScalarHeadModel
from chatforge.stages.ppo import Config
from chatforge.tokenizer import Tokenizer
from chatforge.train.loop import TrainConfig, read_metrics
from chatforge.train.ppo import PPO, ActorCritic, KLConfig, per_token, response_tokens, train_ppo
from chatforge.train.ppo_math import masked_mean

FAST = dict(dtype="fp32", compile="false", device="cpu", progress=False, max_minutes=0.0, eval_every=0, ckpt_every=0,
            warmup_steps=0, schedule="constant", weight_decay=0.0)


class EvenTokenReward(nn.Module):
    """Reward = number of even token ids in the response: a target PPO must learn to hit."""

    def __init__(self, block_size: int, prompt_len: int):
        super().__init__()
        self.config = GPTConfig(vocab_size=300, block_size=block_size, n_layer=1, n_head=1, n_embd=8)
        self.prompt_len = prompt_len

    def score(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.size(1)).unsqueeze(0)
        response = (positions >= self.prompt_len) & (positions < lengths.unsqueeze(1) - 1)
        return ((ids % 2 == 0) & response).sum(1).float()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["hello there, general kenobi"] * 5, vocab_size=280)


def tiny(vocab: int, seed: int) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=32, n_layer=1, n_head=2, n_embd=32))


def make_ppo(tok, cfg: Config, ptx=None):
    prompts = [{"id": str(i), "messages": [{"role": "user", "content": "hello"}], "reference": "hi"} for i in range(16)]
    actor, reference = tiny(tok.vocab_size, 0), tiny(tok.vocab_size, 0)
    critic = ScalarHeadModel(tiny(tok.vocab_size, 1))
    prompt_len = len(prompt_ids(prompts[0]["messages"], tok))
    policy = ActorCritic(actor, critic)
    return PPO(
        cfg, policy, reference.eval().requires_grad_(False), EvenTokenReward(32, prompt_len), tok, prompts, ptx
    )


def test_actor_critic_log_probs_equal_the_full_logits_formula_at_the_response_positions():
    """The actor's log-probs of the response tokens, their entropies and the ptx loss, computed only where a
    response token is predicted, equal the formulas over all positions' logits that PPO used before (the token
    at start_b + t is predicted at position start_b + t − 1; padding after a response and prompts are skipped)."""
    torch.manual_seed(0)
    policy = ActorCritic(tiny(50, 0), ScalarHeadModel(tiny(50, 1)))
    start = torch.tensor([3, 7, 1, 5])  # prompt lengths
    lengths = torch.tensor([6, 2, 9, 0])  # response lengths; the last row answered nothing
    ids = torch.randint(0, 50, (4, int((start + lengths).max())))
    mask = (torch.arange(int(lengths.max())) < lengths.unsqueeze(1)).float()  # [B, T]
    ptx = (torch.randint(0, 50, (2, 32)), torch.randint(0, 50, (2, 32)))

    logits, _ = policy.actor(ids)  # before: every position's logits, then a gather at the response positions
    positions = (start.unsqueeze(1) + torch.arange(mask.size(1)) - 1).clamp(0, ids.size(1) - 1)
    logp = torch.log_softmax(logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, 50)).float(), -1)
    tokens = ids.gather(1, (positions + 1).clamp(max=ids.size(1) - 1))
    expected = logp.gather(2, tokens.unsqueeze(-1)).squeeze(-1) * mask
    expected_entropy = masked_mean(-(logp.exp() * logp).sum(-1), mask)
    expected_ptx = policy.actor(*ptx)[1]

    new, entropies, values, ptx_loss = policy(ids, response_tokens(ids, start, mask), ptx, entropy=True)
    assert entropies.shape == (int(lengths.sum()),)
    torch.testing.assert_close(per_token(new, mask), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(entropies.mean(), expected_entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(ptx_loss, expected_ptx, rtol=0, atol=1e-6)
    torch.testing.assert_close(values, policy.critic(ids))
    upstream = torch.randn(mask.shape) * mask
    weights = [p for p in policy.actor.parameters()]
    for got, want in zip(torch.autograd.grad((per_token(new, mask) * upstream).sum() + ptx_loss, weights),
                         torch.autograd.grad((expected * upstream).sum() + expected_ptx, weights)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_ppo_raises_a_known_reward_while_kl_stays_under_its_limit(tok, tmp_path):
    cfg = Config(
        rollout_prompts=16,
        epochs=4,
        max_tokens=8,
        ptx_coef=0.0,
        # the limit is a guard rail, not the target (4): where the KL peaks depends on the sampling stream, and
        # with the engine's counter-based streams (issue 18) this run peaks at 20.4 (fp32 rollouts) or 21.9
        # (bf16), where per-row generators stayed under 20
        kl=KLConfig(beta=0.02, target=4.0, limit=25.0),
        train=TrainConfig(steps=48, batch_size=8, lr=3e-2, min_lr=3e-2, **FAST),
    )
    ppo = make_ppo(tok, cfg)
    train_ppo(ppo, tmp_path / "ppo")
    rows = [r for r in read_metrics(tmp_path / "ppo") if "reward" in r]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout's actor is the reference
    first, last = rows[0]["reward"], np.mean([r["reward"] for r in rows[-16:]])  # first vs last two rollouts
    assert last > first + 1.0, (first, last)  # of at most 8 even tokens; a uniform policy gets ~4
    assert max(r["kl"] for r in rows) < cfg.kl.limit
    assert ppo.stop_reason is None
    assert {"entropy", "clip_frac", "value_loss", "beta", "response_length"} <= set(rows[-1])


def test_bf16_rollouts_score_in_the_updates_precision(tok, tmp_path):
    """Under bf16 autocast the rollout's log-probs and values are taken in the updates' precision: the first update
    of each rollout sees a ratio of exactly 1 (approximate KL 0), and the first rollout's KL to the reference (the
    same weights) is exactly 0. Rollout log-probs in fp32 against bf16 updates gave ~1e-4 at every first update."""
    fast = {**FAST, "dtype": "bf16"}
    cfg = Config(rollout_prompts=16, epochs=1, max_tokens=8, ptx_coef=0.0,
                 train=TrainConfig(steps=4, batch_size=8, lr=1e-2, min_lr=1e-2, **fast))
    train_ppo(make_ppo(tok, cfg), tmp_path / "ppo")
    rows = read_metrics(tmp_path / "ppo")
    firsts = [r for r in rows if "approx_kl" in r and r["step"] % 2 == 1]
    assert len(firsts) == 2 and all(r["approx_kl"] == 0.0 for r in firsts), firsts
    assert [r for r in rows if "kl" in r][0]["kl"] == 0.0


def test_kl_limit_stops_the_run_with_a_message(tok, tmp_path, capsys):
    cfg = Config(
        rollout_prompts=16,
        epochs=2,
        max_tokens=8,
        ptx_coef=0.0,
        kl=KLConfig(beta=0.0, adaptive=False, limit=0.05),
        train=TrainConfig(steps=48, batch_size=8, lr=1e-2, min_lr=1e-2, **FAST),
    )
    ppo = make_ppo(tok, cfg)
    summary = train_ppo(ppo, tmp_path / "ppo")
    assert summary["stopped_by"] == "task" and summary["steps"] < 48
    assert "passed kl.limit" in capsys.readouterr().err + (ppo.stop_reason or "")


def test_ptx_mixes_a_pretraining_loss_into_each_update(tok, tmp_path):
    write_shard(tmp_path / "tokens" / "train.bin", [np.arange(200) % tok.vocab_size], tok.vocab_size)
    ptx = TokenWindows(tmp_path / "tokens" / "train.bin", 32, seed=0)
    cfg = Config(
        rollout_prompts=8,
        epochs=1,
        max_tokens=4,
        ptx_coef=0.5,
        train=TrainConfig(steps=2, batch_size=8, lr=1e-3, min_lr=1e-3, **FAST),
    )
    ppo = make_ppo(tok, cfg, ptx)
    train_ppo(ppo, tmp_path / "ppo")
    rows = [r for r in read_metrics(tmp_path / "ppo") if "ptx_loss" in r]
    assert len(rows) == 2 and all(r["ptx_loss"] > 0 for r in rows)


def test_a_run_resumed_inside_a_rollout_ends_with_the_weights_of_an_uninterrupted_one(tok, tmp_path):
    """Checkpoints at step 3 of 4-update rollouts: the resumed run must take the checkpoint's rollout (not sample
    a new one), skip the updates already taken and draw the same minibatches, ptx batches and dropout."""
    write_shard(tmp_path / "tokens" / "train.bin", [np.arange(200) % tok.vocab_size], tok.vocab_size)
    ptx = TokenWindows(tmp_path / "tokens" / "train.bin", 32, seed=0)
    cfg = Config(
        rollout_prompts=16,
        epochs=2,
        max_tokens=4,
        ptx_coef=0.5,
        train=TrainConfig(steps=6, batch_size=8, micro_batch_size=4, lr=3e-2, min_lr=3e-2, keep_checkpoints=0,
                          **{**FAST, "ckpt_every": 3}),
    )
    whole = make_ppo(tok, cfg, ptx)
    train_ppo(whole, tmp_path / "whole")
    shutil.copytree(tmp_path / "whole" / "checkpoints" / "step_00000003", tmp_path / "resumed" / "checkpoints" /
                    "step_00000003")
    shutil.copy(tmp_path / "whole" / "metrics.jsonl", tmp_path / "resumed" / "metrics.jsonl")
    resumed = make_ppo(tok, cfg, ptx)
    summary = train_ppo(resumed, tmp_path / "resumed", resume=True)
    assert summary["steps"] == 6
    losses = {d: [r["loss"] for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("whole", "resumed")}
    assert len(losses["whole"]) == 6 and losses["resumed"] == losses["whole"]
    for name, value in whole.policy.state_dict().items():
        assert torch.equal(value, resumed.policy.state_dict()[name]), name


def test_unfinished_answers_lose_the_penalty(tok):
    end = stop_token_ids(tok)[0]
    prompt = prompt_ids([{"role": "user", "content": "hello"}], tok)
    judge = EvenTokenReward(32, len(prompt))
    finished, cut = (prompt, [2, 4, end]), (prompt, [2, 4])  # same text; only the first ended by itself
    plain = reward_scores(judge, [finished, cut], end, 0, "cpu")
    assert plain[0] == plain[1] == 2  # read the same way: <|end|> appended to the cut one
    penalised = reward_scores(judge, [finished, cut], end, 0, "cpu", unfinished_penalty=1.5)
    assert penalised.tolist() == [2.0, 0.5]


@pytest.mark.slow
def test_ppo_stage_end_to_end(tmp_path, capsys):
    """sft checkpoint → rankings → proxy and gold reward models → ppo stage: the measured budget, metrics, plot."""
    from chatforge.cli import main
    from chatforge.model.hf import export_hf_gpt2

    tok = Tokenizer.train(["a helpful answer", "zzz qqq", "question"] * 5, vocab_size=290)
    tok.save(tmp_path / "sft")
    torch.manual_seed(0)
    export_hf_gpt2(
        GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=2, n_embd=32)), tmp_path / "sft"
    )
    pool = [
        {"id": f"p{i}", "messages": [{"role": "user", "content": f"question {i}"}], "reference": "a helpful answer"}
        for i in range(24)
    ]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pool))
    fast = [
        "--train.dtype=fp32",
        "--train.compile=false",
        "--train.device=cpu",
        "--train.progress=false",
        "--train.max_minutes=0",
    ]
    main(["rankings", f"--prompts={tmp_path / 'pool.jsonl'}", f"--ckpt={tmp_path / 'sft'}", "--device=cpu",
          f"--out_dir={tmp_path / 'rankings'}", "--held_out_prompts=8", "--samples_per_prompt=1"])
    for name, extra in (("rm", []), ("gold", ["--include_held_out", "--train.steps=8"])):
        main(["reward", f"--rankings_dir={tmp_path / 'rankings'}", f"--init_from={tmp_path / 'sft'}",
              f"--out_dir={tmp_path / name}", "--train.steps=6", "--train.batch_size=4", *fast, *extra])
    manifest = json.loads((tmp_path / "rankings" / "manifest.json").read_text())
    assert manifest["splits"]["held_out"] == 8 and manifest["answer_budget"]["cap"] == 24
    write_shard(tmp_path / "tokens" / "train.bin", [np.arange(500) % tok.vocab_size], tok.vocab_size)
    main(
        [
            "ppo",
            f"--policy={tmp_path / 'sft'}",
            f"--reward_model={tmp_path / 'rm'}",
            f"--prompts={tmp_path / 'pool.jsonl'}",
            f"--pretrain_tokens={tmp_path / 'tokens' / 'train.bin'}",
            f"--out_dir={tmp_path / 'ppo'}",
            f"--gold_reward_model={tmp_path / 'gold'}",
            "--rollout_prompts=8",
            "--held_out_prompts=8",
            "--max_tokens=0",
            "--train.steps=4",
            "--train.batch_size=4",
            *fast,
        ]
    )
    summary = json.loads((tmp_path / "ppo" / "summary.json").read_text())
    # the rollout budget is the SFT model's own, measured on the same prompts and seed as the ranking data's
    assert summary["max_tokens"] == manifest["answer_budget"]["max_tokens"]
    assert summary["max_tokens"] % 8 == 0 and 8 <= summary["max_tokens"] <= 24
    assert summary["final_gold_reward"] is not None and summary["held_out_prompts"] == 8
    assert summary["steps"] == 4 and (tmp_path / "ppo" / "ppo.png").is_file()
    rows = read_metrics(tmp_path / "ppo")
    assert {"approx_kl", "clip_frac", "ended_fraction", "gold_reward"} <= set(rows[-1])
    from chatforge.model.checkpoint import load_model

    actor, info = load_model(tmp_path / "ppo")  # the checkpoint loads as a plain GPT (the actor)
    assert info["stage"] == "ppo" and actor.config.vocab_size == tok.vocab_size
