"""optimise the SFT policy against the reward model with PPO, a per-token KL penalty and PPO-ptx.

    chatforge ppo                                       # speedrun default: SFT + reward model + RL prompts
    chatforge ppo --ptx_coef=0 --kl.adaptive=false --kl.beta=0.05

InstructGPT step 3. Four models: the actor (initialised from SFT, trained), the critic (a separate GPT with a
scalar head, initialised from the reward model and trained: its own network, so value-loss gradients never
pull on the policy's features, and initialising it from the RM gives it a head start at judging answers as
InstructGPT does), the frozen reference (SFT) and the frozen reward model.

Each rollout samples answers to ``rollout_prompts`` prompts through the shared inference engine from the
actor's full distribution (temperature 1, no top-k/top-p/min-p/min-length: the KL term assumes the policy's
own distribution, and truncating it makes the KL estimate go negative). The per-token reward is
−β·(log π − log π_ref), plus the reward model's score at the last token; β adapts toward ``kl.target``
(or stays fixed). Advantages come from GAE and are whitened; the policy takes the clipped surrogate
(ε = ``clip``), the critic a clipped value loss; ``epochs`` passes of minibatches per rollout. PPO-ptx adds
``ptx_coef`` × the next-token loss on a pretraining batch to every update (0 disables it). The rollout buffer
is part of the checkpoint, so a resumed run continues exactly. A run whose KL passes ``kl.limit`` stops with
a message. Every step logs reward, KL, β, entropy, clip fraction, value loss, response length and ptx loss
(metrics.jsonl, ppo.png).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chatforge import io
from chatforge.chat_template import prompt_ids, stop_token_ids
from chatforge.config import ChatforgeError, ConfigError, check_option_bounds, nested, option
from chatforge.data.chat_batches import EpochOrder
from chatforge.model.gpt import GPT
from chatforge.model.heads import ScalarHeadModel
from chatforge.infer.params import SamplingParams
from chatforge.train.loop import TrainConfig, train
from chatforge.train.reward import pad_rows
from chatforge.train.ppo_math import AdaptiveKL, FixedKL, entropy, gae, masked_mean, policy_loss, token_rewards, value_loss, whiten


@dataclass
class KLConfig:
    beta: float = option(0.05, "initial KL coefficient β", ge=0)
    adaptive: bool = option(True, "move β toward the target KL (Ziegler et al.); false keeps it fixed")
    target: float = option(3.0, "target KL per response (nats), for the adaptive controller", gt=0)
    horizon: int = option(2000, "adaptive controller horizon in samples", ge=1)
    limit: float = option(30.0, "stop the run when the KL per response exceeds this (nats)", gt=0)


@dataclass
class PPOTrainConfig(TrainConfig):
    steps: int = option(240, "optimizer updates (rollouts × epochs × minibatches per rollout)")
    batch_size: int = option(8, "responses per minibatch update, summed over processes")
    lr: float = option(2e-5, "peak learning rate")
    min_lr: float = option(2e-5, "learning rate at the end of the decay")
    schedule: str = option("constant", "decay after warm-up: cosine, linear or constant")
    warmup_steps: int = option(0, "steps of linear warm-up")
    weight_decay: float = option(0.0, "AdamW weight decay of weight matrices")
    eval_every: int = option(0, "PPO evaluates after training (win rates); 0 = only at start and end")
    ckpt_every: int = option(48, "steps between checkpoints (best a multiple of the updates per rollout)")
    max_minutes: float = option(6.0, "wall-time budget in minutes (0 = none)")
    compile: str = option("false", "torch.compile (off by default: rollouts switch between shapes constantly)")


@dataclass
class Config:
    policy: str = option("runs/speedrun/sft", "the SFT model: the actor's start and the frozen reference")
    reward_model: str = option("runs/speedrun/reward", "the trained reward model (also the critic's start)")
    prompts: str = option("runs/speedrun/sft_data/rl_prompts.jsonl", "the RLHF prompt pool")
    pretrain_tokens: str = option("runs/speedrun/tokenizer/tokens/train.bin", "token shard for PPO-ptx batches")
    out_dir: str = option("runs/speedrun/ppo", "where checkpoints/, metrics.jsonl, ppo.png, summary.json go")
    resume: bool = option(False, "continue from out_dir's latest checkpoint")
    rollout_prompts: int = option(16, "prompts answered per rollout", ge=1)
    epochs: int = option(2, "passes over each rollout", ge=1)
    max_tokens: int = option(48, "longest sampled answer", ge=1)
    gamma: float = option(1.0, "discount in GAE", ge=0, le=1)
    lam: float = option(0.95, "λ in GAE", ge=0, le=1)
    clip: float = option(0.2, "PPO ratio clip ε", gt=0, lt=1)
    value_clip: float = option(0.2, "clip of the value update around the rollout's values", gt=0)
    value_coef: float = option(0.5, "weight of the value loss", ge=0)
    ptx_coef: float = option(1.0, "γ: weight of the pretraining next-token loss mixed into each update (0 = off)",
                             ge=0)
    held_out_prompts: int = option(48, "prompts in the win-rate evaluation after training", ge=1)
    kl: KLConfig = nested(KLConfig, "the KL penalty")
    train: PPOTrainConfig = nested(PPOTrainConfig, "the shared training loop")

    def validate(self) -> None:
        check_option_bounds(self)
        self.train.validate()  # first: it checks train.batch_size >= 1, which the modulo below divides by
        if self.rollout_prompts % self.train.batch_size:
            raise ConfigError(f"option 'rollout_prompts' ({self.rollout_prompts}) must be a multiple of "
                              f"train.batch_size ({self.train.batch_size})")


class ActorCritic(nn.Module):
    """The two trained networks as one module, so one optimizer, one checkpoint and DDP cover both."""

    def __init__(self, actor: GPT, critic: ScalarHeadModel):
        super().__init__()
        self.actor, self.critic = actor, critic
        self.config = actor.config

    def forward(self, idx: torch.Tensor, ptx: tuple[torch.Tensor, torch.Tensor] | None = None):
        logits, _ = self.actor(idx)
        values = self.critic(idx)
        ptx_loss = self.actor(*ptx)[1] if ptx is not None else None
        return logits, values, ptx_loss


def response_logits(logits: torch.Tensor, start: torch.Tensor, width: int) -> torch.Tensor:
    """[B, width, vocab] logits that predicted each response token (the token at start_b + t is predicted at
    position start_b + t − 1); rows shorter than ``width`` repeat their last position (masked out later)."""
    positions = (start.unsqueeze(1) + torch.arange(width, device=logits.device) - 1).clamp(0, logits.size(1) - 1)
    return logits.gather(1, positions.unsqueeze(-1).expand(-1, -1, logits.size(-1)))


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, start: torch.Tensor, width: int) -> torch.Tensor:
    """Log-probs [B, width] of the response tokens ids[b, start_b + t]."""
    positions = (start.unsqueeze(1) + torch.arange(width, device=ids.device)).clamp(max=ids.size(1) - 1)
    logp = torch.log_softmax(response_logits(logits, start, width).float(), -1)
    return logp.gather(2, ids.gather(1, positions).unsqueeze(-1)).squeeze(-1)


def state_values(values: torch.Tensor, start: torch.Tensor, width: int) -> torch.Tensor:
    """The critic's value [B, width] of the state before each response token."""
    positions = (start.unsqueeze(1) + torch.arange(width, device=values.device) - 1).clamp(0, values.size(1) - 1)
    return values.gather(1, positions)


def sample_answers(model: GPT, tokenizer, prompts: list[list[dict]], max_tokens: int, params) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids incl. a final stop token) for each conversation, through the shared engine."""
    from chatforge.infer.engine import Engine

    engine = Engine(model, tokenizer, max_batch_size=len(prompts))
    # one seed per request: equal prompts must still get independent samples
    settings = [dataclasses.replace(params, max_tokens=max_tokens, truncate=True, n=1,
                                    seed=None if params.seed is None else params.seed * 10_007 + i) for i in range(len(prompts))]
    outs = engine.generate([prompt_ids(p, tokenizer) for p in prompts], settings)
    return [(o.prompt_ids, list(o.choices[0].token_ids)) for o in outs]


def reward_scores(reward_model: ScalarHeadModel, pairs, end_id: int, pad_id: int, device: str) -> torch.Tensor:
    """Scores of prompt + response, with <|end|> appended to answers that ran out of tokens (the reward model
    was trained on finished answers), keeping each sequence's end when it exceeds the context."""
    block = reward_model.config.block_size
    rows = [(p + r + ([] if r and r[-1] == end_id else [end_id]))[-block:] for p, r in pairs]
    ids, lengths = pad_rows(rows, pad_id)
    with torch.no_grad():
        return reward_model.score(ids.to(device), lengths.to(device)).float()


class PPOTask:
    """Step ``s`` is minibatch ``s % per_rollout`` of rollout ``s // per_rollout``; a rollout is generated (by
    the shared engine, with a seed fixed by its index) the first time one of its minibatches is drawn."""

    def __init__(self, cfg: Config, policy: ActorCritic, reference: GPT, reward_model: ScalarHeadModel, tokenizer,
                 prompts: list[dict], ptx_windows=None):
        self.cfg, self.policy, self.reference, self.reward_model = cfg, policy, reference, reward_model
        self.tokenizer, self.prompts, self.ptx_windows = tokenizer, prompts, ptx_windows
        self.order = EpochOrder(len(prompts), cfg.rollout_prompts, cfg.train.seed, what="RL prompts")
        self.per_epoch = cfg.rollout_prompts // cfg.train.batch_size
        self.per_rollout = self.per_epoch * cfg.epochs
        self.kl = AdaptiveKL(cfg.kl.beta, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive else FixedKL(cfg.kl.beta)
        self.pad = tokenizer.special_id("<|pad|>")
        self.end = stop_token_ids(tokenizer)[0]
        self.buffer: dict | None = None
        self.stop_reason: str | None = None

    # ---- rollouts ----------------------------------------------------------------------------------------

    def answer(self, prompts: list[list[dict]], seed: int) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, response ids) sampled from the actor's full distribution by the shared engine."""
        return sample_answers(self.policy.actor, self.tokenizer, prompts, self.cfg.max_tokens,
                              SamplingParams(temperature=1.0, seed=seed))

    def score(self, pairs: list[tuple[list[int], list[int]]], device: str) -> torch.Tensor:
        return reward_scores(self.reward_model, pairs, self.end, self.pad, device)

    @torch.no_grad()
    def rollout(self, index: int, device: str) -> dict:
        chosen = [self.prompts[i]["messages"] for i in self.order.indices(index)]
        pairs = self.answer(chosen, seed=self.cfg.train.seed * 100_003 + index)
        ids, _ = pad_rows([p + r for p, r in pairs], self.pad)
        ids = ids.to(device)
        start = torch.tensor([len(p) for p, _ in pairs], device=device)
        width = max(1, max(len(r) for _, r in pairs))
        mask = (torch.arange(width, device=device).unsqueeze(0) < torch.tensor([len(r) for _, r in pairs], device=device).unsqueeze(1)).float()
        self.policy.eval()
        logits, values, _ = self.policy(ids)
        self.policy.train()
        old_logprobs = token_logprobs(logits, ids, start, width) * mask
        ref_logprobs = token_logprobs(self.reference(ids)[0], ids, start, width) * mask
        old_values = state_values(values, start, width) * mask
        scores = self.score(pairs, device)
        rewards, kl = token_rewards(old_logprobs, ref_logprobs, scores, mask, self.kl.beta)
        advantages, returns = gae(rewards, old_values, mask, self.cfg.gamma, self.cfg.lam)
        kl_per_response = float(kl.sum(1).mean())
        stats = {"reward": float(scores.mean()), "kl": kl_per_response, "beta": self.kl.beta,
                 "response_length": float(mask.sum(1).mean())}
        self.kl.update(kl_per_response, len(pairs))
        if kl_per_response > self.cfg.kl.limit:
            self.stop_reason = (f"KL per response {kl_per_response:.2f} passed kl.limit {self.cfg.kl.limit} at rollout "
                                f"{index}: the policy is drifting from the SFT model; lower train.lr or raise kl.beta")
        return {"index": index, "ids": ids.cpu(), "start": start.cpu(), "mask": mask.cpu(), "old_logprobs": old_logprobs.cpu(),
                "old_values": old_values.cpu(), "advantages": whiten(advantages, mask).cpu(), "returns": returns.cpu(),
                "stats": stats}

    # ---- the loop's Task protocol ------------------------------------------------------------------------

    def batch(self, step: int, part: int, parts: int, device: str):
        index, within = divmod(step, self.per_rollout)
        if self.buffer is None or self.buffer["index"] != index:
            self.buffer = self.rollout(index, device)  # every process makes the same rollout and takes its part
        minibatch = within % self.per_epoch
        # each epoch visits the rollout's responses in a fresh order fixed by (rollout, epoch)
        order = np.random.default_rng([self.cfg.train.seed, index, within // self.per_epoch]).permutation(self.cfg.rollout_prompts)
        size = self.cfg.train.batch_size
        rows = order[minibatch * size : (minibatch + 1) * size]
        rows = rows[part * len(rows) // parts : (part + 1) * len(rows) // parts]
        picked = {k: v[rows].to(device) for k, v in self.buffer.items() if isinstance(v, torch.Tensor)}
        ptx = None
        if self.cfg.ptx_coef > 0 and self.ptx_windows is not None:
            ptx = self.ptx_windows.batch(step, self.cfg.train.batch_size, part, parts, device)
        return picked, ptx

    def loss(self, model, batch) -> dict:
        b, ptx = batch
        mask = b["mask"]
        width = mask.size(1)
        ids = b["ids"][:, : int((b["start"] + width).max())]
        logits, values, ptx_loss = model(ids, ptx)
        logprobs = token_logprobs(logits, ids, b["start"], width)
        new_values = state_values(values, b["start"], width)
        pg, clip_frac = policy_loss(logprobs, b["old_logprobs"], b["advantages"], mask, self.cfg.clip)
        vf = value_loss(new_values, b["old_values"], b["returns"], mask, self.cfg.value_clip)
        total = pg + self.cfg.value_coef * vf
        out = {"policy_loss": float(pg.detach()), "value_loss": float(vf.detach()), "clip_frac": float(clip_frac), **self.buffer["stats"]}
        with torch.no_grad():
            out["entropy"] = float(entropy(response_logits(logits, b["start"], width), mask))
        if ptx_loss is not None:
            total = total + self.cfg.ptx_coef * ptx_loss
            out["ptx_loss"] = float(ptx_loss.detach())
        out["loss"] = total
        out["tokens"] = int(mask.sum())
        return out

    def state_dict(self) -> dict:
        return {"beta": self.kl.beta, "buffer": self.buffer}

    def load_state_dict(self, state: dict) -> None:
        self.kl.beta = state["beta"]
        self.buffer = state["buffer"]

    def should_stop(self) -> str | None:
        return self.stop_reason


PLOTTED = ("reward", "kl", "beta", "entropy", "clip_frac", "value_loss", "response_length", "ptx_loss")


def plot_ppo(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(16, 6))
    for ax, key in zip(axes.flat, PLOTTED):
        points = [(r["step"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points))
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def win_rates(policy: GPT, baseline: GPT, reward_model: ScalarHeadModel, tokenizer, held_out: list[dict],
              max_tokens: int, device: str, seed: int) -> dict:
    """How often the policy's answer beats the baseline's on held-out prompts, judged by the reward model and
    by a judge no stage trained: cosine similarity to the held-out reference answer under all-MiniLM-L6-v2."""
    from chatforge.embed.minilm import MiniLMEmbedder

    prompts = [item["messages"] for item in held_out]
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=seed)
    answers = {name: sample_answers(model, tokenizer, prompts, max_tokens, params)
               for name, model in (("policy", policy), ("baseline", baseline))}
    end, pad = stop_token_ids(tokenizer)[0], tokenizer.special_id("<|pad|>")
    rm = {name: reward_scores(reward_model, pairs, end, pad, device) for name, pairs in answers.items()}
    texts = {name: [tokenizer.decode([t for t in r if t not in stop_token_ids(tokenizer)]) for _, r in pairs]
             for name, pairs in answers.items()}
    judge = MiniLMEmbedder(device=device)
    references = judge.embed([item["reference"] for item in held_out])
    similarity = {name: (judge.embed(t) * references).sum(1) for name, t in texts.items()}

    def rate(a, b) -> float:
        a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        return float(((a > b) + 0.5 * (a == b)).mean())

    return {
        "win_rate_rm": round(rate(rm["policy"].cpu(), rm["baseline"].cpu()), 4),
        "win_rate_minilm": round(rate(similarity["policy"], similarity["baseline"]), 4),
        "held_out_prompts": len(held_out),
        "mean_reward_policy": round(float(rm["policy"].mean()), 4),
        "mean_reward_baseline": round(float(rm["baseline"].mean()), 4),
        "mean_similarity_policy": round(float(similarity["policy"].mean()), 4),
        "mean_similarity_baseline": round(float(similarity["baseline"].mean()), 4),
        "examples": [{"prompt": p[-1]["content"], "policy": texts["policy"][i], "baseline": texts["baseline"][i]}
                     for i, p in enumerate(prompts[:3])],
    }


def run(cfg: Config, args: list[str]) -> None:
    from chatforge.data.rankings import read_prompt_pool
    from chatforge.data.shards import TokenWindows
    from chatforge.tokenizer import Tokenizer
    from chatforge.train import distributed
    from chatforge.train.checkpoint import load_model, tokenizer_path
    from chatforge.train.loop import read_metrics
    from chatforge.train.reward import load_reward_model

    cfg.validate()
    job = distributed.init(cfg.train.device)
    device = job.device
    actor, info = load_model(cfg.policy, device)
    reference, _ = load_model(cfg.policy, device)
    reference.requires_grad_(False)
    reward_model = load_reward_model(cfg.reward_model, device).requires_grad_(False)
    critic = load_reward_model(cfg.reward_model, device)
    if critic.config.vocab_size != actor.config.vocab_size:
        raise ChatforgeError(f"the reward model's vocabulary ({critic.config.vocab_size}) differs from the policy's "
                             f"({actor.config.vocab_size}); train both from the same SFT model")
    tokenizer_file = tokenizer_path(cfg.policy)
    tokenizer = Tokenizer.load(tokenizer_file)
    pool = read_prompt_pool(cfg.prompts)
    if len(pool) < cfg.held_out_prompts + cfg.rollout_prompts:
        raise ChatforgeError(f"{cfg.prompts} has {len(pool)} prompts; PPO needs rollout_prompts ({cfg.rollout_prompts}) "
                             f"+ held_out_prompts ({cfg.held_out_prompts})")
    train_pool, held_out = pool[: -cfg.held_out_prompts], pool[-cfg.held_out_prompts :]
    ptx = None
    if cfg.ptx_coef > 0:
        if not Path(cfg.pretrain_tokens).is_file():
            raise ChatforgeError(f"PPO-ptx needs pretraining tokens: {cfg.pretrain_tokens} not found "
                                 "(set --pretrain_tokens, or --ptx_coef=0 to disable the mix)")
        ptx = TokenWindows(cfg.pretrain_tokens, actor.config.block_size, cfg.train.seed)
    policy = ActorCritic(actor.train(), critic.train())
    task = PPOTask(cfg, policy, reference.eval(), reward_model, tokenizer, train_pool, ptx)
    if job.is_main:
        print(f"[ppo] actor {info['path']} ({actor.num_params() / 1e6:.2f}M), reward model {cfg.reward_model}; "
              f"{len(train_pool)} train prompts, {len(held_out)} held out; {task.per_rollout} updates per rollout")
    meta = {"stage": "ppo", "policy": str(info["path"]), "reward_model": cfg.reward_model, "model": actor.config.to_dict(),
            "model_prefix": "actor.", "stage_config": dataclasses.asdict(cfg)}
    summary = train(policy, task, cfg.train, cfg.out_dir, resume=cfg.resume, meta=meta, tokenizer=tokenizer_file)
    if not job.is_main:
        return
    out = Path(cfg.out_dir)
    rows = read_metrics(out)
    plot_ppo(rows, out / "ppo.png")
    baseline, _ = load_model(cfg.policy, device)
    rates = win_rates(actor, baseline, reward_model, tokenizer, held_out, cfg.max_tokens, device, cfg.train.seed)
    last = next((r for r in reversed(rows) if "reward" in r), {})
    summary.update({k: v for k, v in rates.items() if k != "examples"},
                   final_reward=last.get("reward"), final_kl=last.get("kl"), final_beta=last.get("beta"),
                   stopped_early=task.stop_reason)
    io.write_json(out / "summary.json", summary)
    io.write_json(out / "win_rate_examples.json", rates["examples"])
    print(f"[ppo] win rate over SFT on {len(held_out)} held-out prompts: reward model {rates['win_rate_rm']:.2f}, "
          f"MiniLM similarity to the reference {rates['win_rate_minilm']:.2f}")
