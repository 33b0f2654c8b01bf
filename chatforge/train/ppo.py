"""PPO for language models (InstructGPT step 3): the actor-critic, the rollout and the PPO task on the shared loop.

The `chatforge ppo` stage (chatforge/stages/ppo.py) describes the recipe and runs it; the arithmetic is in
``ppo_math``; the win rates and curves are in ``chatforge.evals.ppo_eval``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from chatforge.chat_template import stop_token_ids
from chatforge.config import option
from chatforge.data.chat_batches import EpochOrder, pad_rows
from chatforge.evals.ppo_eval import reward_scores
from chatforge.infer.answers import ended, sample_answers
from chatforge.infer.params import SamplingParams
from chatforge.model.gpt import GPT
from chatforge.model.heads import ScalarHeadModel
from chatforge.tokenizer import PAD
from chatforge.train import distributed
from chatforge.train.loop import TrainConfig
from chatforge.train.ppo_math import (
    AdaptiveKL,
    FixedKL,
    entropy,
    gae,
    masked_mean,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)


@dataclass
class KLConfig:
    beta: float = option(0.1, "initial KL coefficient β", ge=0)
    adaptive: bool = option(True, "move β toward the target KL (Ziegler et al.); false keeps it fixed")
    # measured: ending an answer the SFT model would have continued costs ~5 nats at its <|end|> token alone,
    # so a policy that learns to finish its answers sits near 5-6 nats whatever β is
    target: float = option(6.0, "target KL per response (nats), for the adaptive controller", gt=0)
    horizon: int = option(128, "adaptive controller horizon in samples (a few rollouts: β must move within a run "
                               "of ~30 rollouts of 16)", ge=1)
    limit: float = option(30.0, "stop the run when the KL per response exceeds this (nats)", gt=0)


@dataclass
class PPOTrainConfig(TrainConfig):
    steps: int = option(240, "optimizer updates (rollouts × epochs × minibatches per rollout)")
    batch_size: int = option(8, "responses per minibatch update, summed over processes")
    # measured on the speedrun's 4.8M-parameter policy: 2e-5 never clipped (clip fraction 0, approximate KL
    # 1e-5 per update); 1e-4 clipped ~1 %; 3e-4 clips ~10 % with an approximate KL of ~0.008 per update
    lr: float = option(3e-4, "peak learning rate")
    min_lr: float = option(3e-4, "learning rate at the end of the decay")
    schedule: str = option("constant", "decay after warm-up: cosine, linear or constant")
    warmup_steps: int = option(0, "steps of linear warm-up")
    weight_decay: float = option(0.0, "AdamW weight decay of weight matrices")
    eval_every: int = option(0, "PPO evaluates after training (win rates); 0 = only at start and end")
    ckpt_every: int = option(48, "steps between checkpoints (best a multiple of the updates per rollout)")
    max_minutes: float = option(6.0, "wall-time budget in minutes (0 = none)")
    compile: str = option("false", "torch.compile (off by default: rollouts switch between shapes constantly)")


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


class PPOTask:
    """PPO on the shared training loop (its optimizer, schedule, checkpoints, DDP and time budget).

    The loop asks for step ``s``; PPO's structure is the arithmetic of ``s``:

        for rollout in 0, 1, ...:                        # rollout = s // per_rollout
            1-4. make the rollout (``rollout``)           # sample → score → KL-shaped rewards → GAE
            for epoch in range(cfg.epochs):              # epoch = (s % per_rollout) // per_epoch
                for minibatch in range(per_epoch):       # a fresh order per (rollout, epoch)
                    5. clipped objective + value loss + ptx, one optimizer step (``loss``)

    A rollout is made the first time one of its minibatches is drawn, with a seed fixed by its index, so a
    resumed run (the buffer is in the checkpoint) continues exactly.
    """

    def __init__(
        self,
        cfg,
        policy: ActorCritic,
        reference: GPT,
        reward_model: ScalarHeadModel,
        tokenizer,
        prompts: list[dict],
        ptx_windows=None,
        gold_model: ScalarHeadModel | None = None,
        max_tokens: int | None = None,
    ):
        self.cfg, self.policy, self.reference, self.reward_model = cfg, policy, reference, reward_model
        self.gold_model = gold_model
        self.max_tokens = max_tokens or cfg.max_tokens  # the stage measures it when cfg.max_tokens is 0
        self.tokenizer, self.prompts, self.ptx_windows = tokenizer, prompts, ptx_windows
        self.order = EpochOrder(len(prompts), cfg.rollout_prompts, cfg.train.seed, what="RL prompts")
        self.per_epoch = cfg.rollout_prompts // cfg.train.batch_size
        self.per_rollout = self.per_epoch * cfg.epochs
        self.kl = AdaptiveKL(cfg.kl.beta, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive else FixedKL(cfg.kl.beta)
        self.pad = tokenizer.special_id(PAD)
        self.end = stop_token_ids(tokenizer)[0]
        self.buffer: dict | None = None
        self.stop_reason: str | None = None

    @torch.no_grad()
    def rollout(self, index: int, device: str) -> dict:
        """Steps 1-4 for rollout ``index``; B = rollout_prompts, T = the longest response."""
        # 1. rollout: answers sampled from the actor's full distribution (temperature 1) by the shared engine
        # Under torchrun each process samples its share of the prompts (generation is most of PPO's time) and
        # the answers are gathered: every process then scores the whole rollout, so the whitening and the KL
        # controller see the global batch and agree on every rank.
        chosen = [self.prompts[i]["messages"] for i in self.order.indices(index)]
        params = SamplingParams(temperature=1.0, seed=self.cfg.train.seed * 100_003 + index)
        ranks = distributed.init(self.cfg.train.device)
        first, last = (len(chosen) * r // ranks.world_size for r in (ranks.rank, ranks.rank + 1))
        mine = sample_answers(self.policy.actor, self.tokenizer, chosen[first:last], self.max_tokens, params,
                              self.cfg.inference, first_index=first)
        pairs = [pair for share in ranks.gather_object(mine) for pair in share]
        ids, _ = pad_rows([p + r for p, r in pairs], self.pad)
        ids = ids.to(device)  # [B, prompt + response]
        start = torch.tensor([len(p) for p, _ in pairs], device=device)  # [B] where each response begins
        width = max(1, max(len(r) for _, r in pairs))  # T
        lengths = torch.tensor([len(r) for _, r in pairs], device=device)
        mask = (torch.arange(width, device=device).unsqueeze(0) < lengths.unsqueeze(1)).float()  # [B, T]
        self.policy.eval()
        logits, values, _ = self.policy(ids)
        self.policy.train()
        old_logprobs = token_logprobs(logits, ids, start, width) * mask  # [B, T] log π_old
        ref_logprobs = token_logprobs(self.reference(ids)[0], ids, start, width) * mask  # [B, T] log π_ref
        old_values = state_values(values, start, width) * mask  # [B, T] V_old
        # 2. reward-model scores, unfinished answers (no <|end|> within max_tokens) losing unfinished_penalty
        scores = reward_scores(self.reward_model, pairs, self.end, self.pad, device, self.cfg.unfinished_penalty)
        # 3. per-token rewards: −β·(log π − log π_ref) at every token, plus the score at the last one
        rewards, kl = token_rewards(old_logprobs, ref_logprobs, scores, mask, self.kl.beta)  # [B, T] each
        # 4. GAE advantages (whitened) and returns
        advantages, returns = gae(rewards, old_values, mask, self.cfg.gamma, self.cfg.lam)  # [B, T] each
        kl_per_response = float(kl.sum(1).mean())
        stats = {
            "reward": float(scores.mean()),
            "kl": kl_per_response,
            "beta": self.kl.beta,
            "response_length": float(mask.sum(1).mean()),
            "ended_fraction": sum(ended(r, self.end) for _, r in pairs) / len(pairs),
        }
        if self.gold_model is not None:  # Gao et al.: the reward the proxy is meant to stand for, never optimised
            stats["gold_reward"] = float(
                reward_scores(self.gold_model, pairs, self.end, self.pad, device, self.cfg.unfinished_penalty).mean()
            )
        self.kl.update(kl_per_response, len(pairs))
        if kl_per_response > self.cfg.kl.limit:
            self.stop_reason = (
                f"KL per response {kl_per_response:.2f} passed kl.limit {self.cfg.kl.limit} at rollout "
                f"{index}: the policy is drifting from the SFT model; lower train.lr or raise kl.beta"
            )
        return {
            "index": index,
            "ids": ids.cpu(),
            "start": start.cpu(),
            "mask": mask.cpu(),
            "old_logprobs": old_logprobs.cpu(),
            "old_values": old_values.cpu(),
            "advantages": whiten(advantages, mask).cpu(),
            "returns": returns.cpu(),
            "stats": stats,
        }

    # ---- the shared loop's Task protocol -----------------------------------------------------------------

    def batch(self, step: int, part: int, parts: int, device: str):
        """The minibatch of step ``step`` (this process's ``part`` of it) and a pretraining batch for ptx."""
        index, within = divmod(step, self.per_rollout)  # rollout, position inside its epochs × minibatches
        epoch, minibatch = divmod(within, self.per_epoch)
        if self.buffer is None or self.buffer["index"] != index:
            self.buffer = self.rollout(index, device)  # every process holds the whole rollout and takes its part
        # each epoch visits the rollout's responses in a fresh order fixed by (rollout, epoch)
        order = np.random.default_rng([self.cfg.train.seed, index, epoch]).permutation(self.cfg.rollout_prompts)
        size = self.cfg.train.batch_size
        minibatch_rows = order[minibatch * size : (minibatch + 1) * size]
        rows = minibatch_rows[part * len(minibatch_rows) // parts : (part + 1) * len(minibatch_rows) // parts]
        picked = {k: v[rows].to(device) for k, v in self.buffer.items() if isinstance(v, torch.Tensor)}
        ptx = None
        if self.cfg.ptx_coef > 0 and self.ptx_windows is not None:
            ptx = self.ptx_windows.batch(step, self.cfg.train.batch_size, part, parts, device)
        # the part's token means weighted by its share of the minibatch's tokens (the loop averages parts
        # equally), so the objective is the minibatch's token mean however it is split across processes
        weight = parts * float(self.buffer["mask"][rows].sum()) / float(self.buffer["mask"][minibatch_rows].sum())
        return picked, ptx, weight

    def loss(self, model, batch) -> dict:
        """5. Clipped policy objective + value_coef × clipped value loss + ptx_coef × pretraining loss."""
        b, ptx, weight = batch
        mask = b["mask"]  # [b, T]
        width = mask.size(1)
        ids = b["ids"][:, : int((b["start"] + width).max())]
        logits, values, ptx_loss = model(ids, ptx)  # [b, L, vocab], [b, L], scalar or None
        logprobs = token_logprobs(logits, ids, b["start"], width)  # [b, T] log π_θ
        new_values = state_values(values, b["start"], width)  # [b, T]
        pg, clip_frac = policy_loss(logprobs, b["old_logprobs"], b["advantages"], mask, self.cfg.clip)
        with torch.no_grad():  # how far this update has already moved from the rollout's policy (k3 estimator)
            log_ratio = (logprobs - b["old_logprobs"]) * mask
            approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
        vf = value_loss(new_values, b["old_values"], b["returns"], mask, self.cfg.value_clip)
        total = (pg + self.cfg.value_coef * vf) * weight
        out = {
            "policy_loss": float(pg.detach()),
            "value_loss": float(vf.detach()),
            "clip_frac": float(clip_frac),
            "approx_kl": float(approx_kl),
            **self.buffer["stats"],
        }
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
