"""PPO for language models (InstructGPT step 3): the actor-critic and the PPO loop, ``train_ppo``.

The `chatforge ppo` stage (chatforge/stages/ppo.py) describes the recipe and runs it; the arithmetic is in
``ppo_math``; reward scoring and the curves are in ``chatforge.evals.ppo_eval``, the judging of a trained policy
(``chatforge eval rlhf``) in ``chatforge.evals.rlhf``. ``train_ppo`` drives the shared training loop's pieces
(``chatforge.train.trainer.Trainer``: optimizer, schedule, accumulation, DDP/FSDP, checkpoints, exact resume,
metrics, time budget) from its own rollout → epochs × minibatches loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

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
from chatforge.train.config import TrainConfig
from chatforge.train.head_logprobs import next_token_loss, token_logprobs
from chatforge.train.ppo_math import (
    AdaptiveKL,
    FixedKL,
    gae,
    masked_mean,
    policy_loss,
    token_rewards,
    value_loss,
    whiten,
)
from chatforge.train.trainer import Trainer


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
    # measured on the speedrun's stage (default settings, 2 cores with avx512-bf16): 90-116 s in bf16 against
    # 156-163 s in fp32, with reward/KL curves the same within the spread of 6 seeds each
    eager_bf16_pays: ClassVar[bool] = True


class ActorCritic(nn.Module):
    """The two trained networks as one module, so one optimizer, one checkpoint and DDP cover both."""

    def __init__(self, actor: GPT, critic: ScalarHeadModel):
        super().__init__()
        self.actor, self.critic = actor, critic
        self.config = actor.config

    def forward(self, idx: torch.Tensor, response: tuple[torch.Tensor, torch.Tensor],
                ptx: tuple[torch.Tensor, torch.Tensor] | None = None, entropy: bool = False):
        """The actor's log-probs of the response tokens ``response`` = (positions, tokens) from
        ``response_tokens`` (fp32 [N]) and, with ``entropy``, the entropies there (no gradient, else None); the
        critic's values [B, L] of ``idx`` [B, L]; the actor's next-token loss on ``ptx`` = (inputs, targets), or None.

        Logits are computed only where a response token is predicted, a few rows at a time
        (``chatforge.train.head_logprobs``): never for prompt positions or padding."""
        logprobs, entropies = response_logprobs(self.actor, idx, response, entropy)
        values = self.critic(idx)
        ptx_loss = None
        if ptx is not None:
            inputs, targets = ptx
            ptx_loss = next_token_loss(self.actor, self.actor.hidden_states(inputs).flatten(0, 1), targets.flatten())
        return logprobs, entropies, values, ptx_loss


def response_tokens(ids: torch.Tensor, start: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The N response tokens of ids [B, L] (mask [B, T] marks them; response b starts at start_b) as flat positions
    [N] into ids' B·L positions of the ones that predict them (token start_b + t is predicted at position
    start_b + t − 1), and the tokens [N]; in the row-major order of ``mask``'s true entries."""
    rows, t = mask.bool().nonzero(as_tuple=True)
    at = start[rows] + t - 1
    return rows * ids.size(1) + at, ids[rows, at + 1]


def response_logprobs(model: GPT, idx: torch.Tensor, response: tuple[torch.Tensor, torch.Tensor],
                      entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``model``'s log-probs [N] of the ``response_tokens`` of idx [B, L] (and their entropies, or None)."""
    positions, tokens = response
    return token_logprobs(model, model.hidden_states(idx).flatten(0, 1)[positions], tokens, entropy)


def per_token(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Values [N] of the response tokens (``response_tokens``' order) laid out as [B, T], 0 on padding."""
    return torch.zeros_like(mask, dtype=values.dtype).masked_scatter(mask.bool(), values)


def state_values(values: torch.Tensor, start: torch.Tensor, width: int) -> torch.Tensor:
    """The critic's value [B, width] of the state before each response token."""
    positions = (start.unsqueeze(1) + torch.arange(width, device=values.device) - 1).clamp(0, values.size(1) - 1)
    return values.gather(1, positions)


class PPO:
    """What PPO trains and against what: the actor-critic, the frozen reference and reward model, the prompts, the
    pretraining windows for ptx; and the state a checkpoint keeps (β, and the rollout being trained on, so a run
    resumed inside a rollout continues exactly)."""

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
        self.per_epoch = cfg.rollout_prompts // cfg.train.batch_size  # minibatch updates per pass over a rollout
        self.per_rollout = self.per_epoch * cfg.epochs
        self.kl = AdaptiveKL(cfg.kl.beta, cfg.kl.target, cfg.kl.horizon) if cfg.kl.adaptive else FixedKL(cfg.kl.beta)
        self.pad = tokenizer.special_id(PAD)
        self.end = stop_token_ids(tokenizer)[0]
        self.buffer: dict | None = None  # the rollout being trained on
        self.stop_reason: str | None = None

    def state_dict(self) -> dict:
        return {"beta": self.kl.beta, "buffer": self.buffer}

    def load_state_dict(self, state: dict) -> None:
        self.kl.beta = state["beta"]
        self.buffer = state["buffer"]


def train_ppo(ppo: PPO, out_dir: str | Path, *, resume: bool = False, meta: dict | None = None,
              tokenizer: str | Path | None = None) -> dict:
    """Train ``ppo.policy`` for ``cfg.train.steps`` minibatch updates; returns the shared loop's summary.

    B = rollout_prompts responses per rollout, T = the longest of them, b = train.batch_size per update.
    ``out_dir``, ``resume``, ``meta`` and ``tokenizer`` are as for ``chatforge.train.loop.train``.
    """
    cfg = ppo.cfg
    with Trainer(ppo.policy, cfg.train, out_dir, resume=resume, meta=meta, tokenizer=tokenizer, state=ppo) as trainer:
        device = trainer.device
        sampler = _RolloutActor(ppo.policy, trainer.fsdp, device)
        while not trainer.done:
            rollout = trainer.step // ppo.per_rollout
            if trainer.step % ppo.per_rollout == 0:  # else a resumed run is inside a rollout its checkpoint holds
                # 1. rollout: answers sampled from the actor's full distribution (temperature 1) by the shared
                # engine, seeded by the rollout's number; each process samples its share of the prompts and gets
                # everyone's answers, so the whitening and the KL controller see the whole rollout on every rank
                prompts = [ppo.prompts[i]["messages"] for i in ppo.order.indices(rollout)]
                params = SamplingParams(temperature=1.0, seed=cfg.train.seed * 100_003 + rollout)
                pairs = _sample_shared(ppo, sampler.actor(), prompts, params)  # B × (prompt ids, response ids)
                ids, start, mask = _pack(pairs, ppo.pad, device)  # [B, prompt + response], [B], [B, T]
                width = mask.size(1)  # T
                response = response_tokens(ids, start, mask)
                # in the updates' precision: the first update's ratio is then exactly 1, and the KL to the reference
                # exactly 0 while the weights are equal (bf16 against fp32 log-probs differ by ~1e-2 a token)
                with torch.no_grad(), trainer.autocast():
                    ppo.policy.eval()
                    logprobs, _, values, _ = ppo.policy(ids, response)
                    ppo.policy.train()
                    ref_logprobs, _ = response_logprobs(ppo.reference, ids, response)
                old_logprobs = per_token(logprobs, mask)  # [B, T] log π_old
                ref_logprobs = per_token(ref_logprobs, mask)  # [B, T] log π_ref
                old_values = state_values(values, start, width) * mask  # [B, T] V_old
                # 2. reward-model scores, unfinished answers (no <|end|> within max_tokens) losing unfinished_penalty;
                # in the training precision, like the scoring above (the reward model was trained in it too)
                with trainer.autocast():
                    scores = reward_scores(ppo.reward_model, pairs, ppo.end, ppo.pad, device, cfg.unfinished_penalty)
                    # Gao et al.: the reward the proxy stands for, never optimised
                    gold = (None if ppo.gold_model is None else
                            reward_scores(ppo.gold_model, pairs, ppo.end, ppo.pad, device, cfg.unfinished_penalty))
                # 3. per-token rewards: −β·(log π − log π_ref) at every token, plus the score at the last one
                rewards, kl = token_rewards(old_logprobs, ref_logprobs, scores, mask, ppo.kl.beta)  # [B, T] each
                # 4. GAE advantages (whitened) and returns
                advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)  # [B, T] each
                kl_per_response = float(kl.sum(1).mean())
                stats = {"reward": float(scores.mean()), "kl": kl_per_response, "beta": ppo.kl.beta,
                         "response_length": float(mask.sum(1).mean()),
                         "ended_fraction": sum(ended(r, ppo.end) for _, r in pairs) / len(pairs)}
                if gold is not None:
                    stats["gold_reward"] = float(gold.mean())
                ppo.kl.update(kl_per_response, len(pairs))
                ppo.buffer = {"index": rollout, "ids": ids.cpu(), "start": start.cpu(), "mask": mask.cpu(),
                               "old_logprobs": old_logprobs.cpu(), "old_values": old_values.cpu(),
                               "advantages": whiten(advantages, mask).cpu(), "returns": returns.cpu(), "stats": stats}
                if kl_per_response > cfg.kl.limit:  # the run ends after the next update, whose row shows this KL
                    ppo.stop_reason = (
                        f"KL per response {kl_per_response:.2f} passed kl.limit {cfg.kl.limit} at rollout {rollout}: "
                        "the policy is drifting from the SFT model; lower train.lr or raise kl.beta"
                    )
                    trainer.stop_after_next_step(ppo.stop_reason)
            for epoch in range(cfg.epochs):
                # each epoch visits the rollout's responses in a fresh order fixed by (rollout, epoch)
                order = np.random.default_rng([cfg.train.seed, rollout, epoch]).permutation(cfg.rollout_prompts)
                for minibatch in range(ppo.per_epoch):
                    if rollout * ppo.per_rollout + epoch * ppo.per_epoch + minibatch < trainer.step:
                        continue  # taken before the run was resumed
                    rows = order[minibatch * cfg.train.batch_size : (minibatch + 1) * cfg.train.batch_size]  # b
                    # 5. clipped surrogate + value loss + ptx on this process's parts of the minibatch, one step
                    parts = _minibatch(ppo, rows, trainer.step, device)
                    trainer.optimizer_step(parts, lambda model, part: _ppo_loss(model, part, cfg),
                                           metrics=ppo.buffer["stats"])
                    if trainer.done:
                        break
                if trainer.done:
                    break
        return trainer.finish()


def _ppo_loss(model: nn.Module, part: tuple[dict, tuple | None, float], cfg) -> dict:
    """5. The clipped policy objective + value_coef × clipped value loss + ptx_coef × pretraining loss of a part
    of a minibatch (its token means, times the part's weight) and the metrics of each term."""
    b, ptx, weight = part
    mask = b["mask"]  # [b, T]
    width = mask.size(1)
    # up to the minibatch's longest prompt + response (the rollout's padding beyond is never read: attention is causal)
    ids = b["ids"][:, : int((b["start"] + mask.sum(1).long()).max())]
    logprobs, entropies, values, ptx_loss = model(ids, response_tokens(ids, b["start"], mask), ptx, entropy=True)
    logprobs = per_token(logprobs, mask)  # [b, T] log π_θ
    new_values = state_values(values, b["start"], width)  # [b, T]
    pg, clip_frac = policy_loss(logprobs, b["old_logprobs"], b["advantages"], mask, cfg.clip)
    with torch.no_grad():  # how far this update has already moved from the rollout's policy (k3 estimator)
        log_ratio = (logprobs - b["old_logprobs"]) * mask
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)
    vf = value_loss(new_values, b["old_values"], b["returns"], mask, cfg.value_clip)
    total = (pg + cfg.value_coef * vf) * weight
    out = {"policy_loss": float(pg.detach()), "value_loss": float(vf.detach()), "clip_frac": float(clip_frac),
           "approx_kl": float(approx_kl)}
    out["entropy"] = float(entropies.sum() / max(1, entropies.numel()))  # the mean over the response tokens
    if ptx_loss is not None:
        total = total + cfg.ptx_coef * ptx_loss
        out["ptx_loss"] = float(ptx_loss.detach())
    return {**out, "loss": total, "tokens": int(mask.sum())}


class _RolloutActor:
    """The actor that samples rollouts. Under DDP (or one process) it is the trained module itself. Under FSDP each
    rank holds only shards, and the ranks sample different prompts for different lengths, so a sharded forward
    (which gathers every block from all ranks) cannot serve: before each rollout the actor's full weights are
    gathered into a plain copy on every rank (the policy's optimizer state and gradients stay sharded; the copy
    needs the inference weights, not the training state, to fit one device)."""

    def __init__(self, policy: ActorCritic, fsdp: bool, device: str):
        self.policy, self.fsdp, self.device = policy, fsdp, device
        self.copy: GPT | None = None

    def actor(self) -> GPT:
        if not self.fsdp:
            return self.policy.actor
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.policy, submodules={self.policy.actor},
                                    options=StateDictOptions(full_state_dict=True))  # every rank gets all of it
        weights = {name.removeprefix("actor."): tensor for name, tensor in full.items()}
        if self.copy is None:
            with torch.device(self.device):
                self.copy = GPT(self.policy.actor.config).eval()
            self.copy.requires_grad_(False)
        self.copy.load_state_dict(weights)
        return self.copy


def _sample_shared(ppo: PPO, actor: GPT, prompts: list, params: SamplingParams) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) for every prompt, each process sampling its contiguous share (generation is
    most of PPO's time) with ``actor`` and gathering the others'; seeds follow the prompts' places in the list."""
    return distributed.map_shares(
        lambda share, first: sample_answers(actor, ppo.tokenizer, share, ppo.max_tokens, params, ppo.cfg.inference,
                                            first_index=first),
        prompts,
    )


def _pack(pairs, pad: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + response ids [B, L] padded, where each response starts [B], and the response-token mask [B, T]."""
    ids, _ = pad_rows([p + r for p, r in pairs], pad)
    start = torch.tensor([len(p) for p, _ in pairs], device=device)
    width = max(1, max(len(r) for _, r in pairs))
    lengths = torch.tensor([len(r) for _, r in pairs], device=device)
    mask = (torch.arange(width, device=device).unsqueeze(0) < lengths.unsqueeze(1)).float()
    return ids.to(device), start, mask


def _minibatch(ppo: PPO, rows: np.ndarray, step: int, device: str):
    """The minibatch ``rows`` of the current rollout as ``part(index, parts)``: that part of its responses, a
    pretraining batch for ptx (or None), and the part's weight, its share of the minibatch's tokens × ``parts``
    (the loop averages parts equally): the objective is the minibatch's token mean however it is split."""
    buffer = ppo.buffer

    def part(index: int, parts: int) -> tuple[dict, tuple | None, float]:
        mine = rows[index * len(rows) // parts : (index + 1) * len(rows) // parts]
        picked = {k: v[mine].to(device) for k, v in buffer.items() if isinstance(v, torch.Tensor)}
        ptx = None
        if ppo.cfg.ptx_coef > 0 and ppo.ptx_windows is not None:
            ptx = ppo.ptx_windows.batch(step, ppo.cfg.train.batch_size, index, parts, device)
        weight = parts * float(buffer["mask"][mine].sum()) / float(buffer["mask"][rows].sum())
        return picked, ptx, weight

    return part
