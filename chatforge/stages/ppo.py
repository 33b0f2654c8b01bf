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
from dataclasses import dataclass
from pathlib import Path

from chatforge import io
from chatforge.config import check_option_bounds, nested, option
from chatforge.data.rankings import held_out_split, read_prompt_pool
from chatforge.data.shards import TokenWindows
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.evals.ppo_eval import plot_ppo
from chatforge.infer.answers import measure_answer_budget
from chatforge.infer.precision import InferenceOptions
from chatforge.model.checkpoint import load_model, tokenizer_path
from chatforge.tokenizer import Tokenizer
from chatforge.train import distributed
from chatforge.train.loop import read_metrics
from chatforge.train.ppo import PPO, ActorCritic, KLConfig, PPOTrainConfig, train_ppo
from chatforge.train.reward import load_reward_model


@dataclass
class Config:
    policy: str = option("runs/speedrun/sft", "the SFT model: the actor's start and the frozen reference")
    reward_model: str = option("runs/speedrun/reward", "the trained reward model (also the critic's start)")
    prompts: str = option("runs/speedrun/sft_data/rl_prompts.jsonl", "the RLHF prompt pool")
    pretrain_tokens: str = option("runs/speedrun/tokenizer/tokens/train.bin", "token shard for PPO-ptx batches")
    out_dir: str = option("runs/speedrun/ppo", "where checkpoints/, metrics.jsonl, ppo.png, summary.json go")
    resume: bool = option(False, "continue from out_dir's latest checkpoint")
    rollout_prompts: int = option(16, "prompts answered per rollout", ge=1)
    epochs: int = option(4, "passes over each rollout", ge=1)
    max_tokens: int = option(0, "longest sampled answer (0 = measured: the 90th percentile of the SFT model's own "
                                "answer lengths, see infer.answers.measure_answer_budget)", ge=0)
    unfinished_penalty: float = option(
        1.0, "taken off the reward of an answer that has not ended (<|end|>) within max_tokens", ge=0
    )
    gold_reward_model: str = option("", "a gold reward model scored on every rollout but never optimised ('' = none)")
    gamma: float = option(1.0, "discount in GAE", ge=0, le=1)
    lam: float = option(0.95, "λ in GAE", ge=0, le=1)
    clip: float = option(0.2, "PPO ratio clip ε", gt=0, lt=1)
    value_clip: float = option(0.2, "clip of the value update around the rollout's values", gt=0)
    value_coef: float = option(0.5, "weight of the value loss", ge=0)
    ptx_coef: float = option(
        1.0, "γ: weight of the pretraining next-token loss mixed into each update (0 = off)", ge=0
    )
    held_out_prompts: int = option(
        200, "the pool's last prompts, kept out of training for `chatforge eval rlhf` (and of the proxy RM's rankings)",
        ge=0,
    )
    kl: KLConfig = nested(KLConfig, "the KL penalty")
    inference: InferenceOptions = nested(InferenceOptions, "how rollouts are generated (dtype, quantize, compile)")
    train: PPOTrainConfig = nested(PPOTrainConfig, "the shared training loop")

    def validate(self) -> None:
        check_option_bounds(self)
        self.train.validate()  # first: it checks train.batch_size >= 1, which the modulo below divides by
        if self.rollout_prompts % self.train.batch_size:
            raise ConfigError(f"option 'rollout_prompts' ({self.rollout_prompts}) must be a multiple of "
                              f"train.batch_size ({self.train.batch_size})")


def run(cfg: Config, args: list[str]) -> None:
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
        raise ChatforgeError(
            f"{cfg.prompts} has {len(pool)} prompts; PPO needs rollout_prompts ({cfg.rollout_prompts}) "
            f"+ held_out_prompts ({cfg.held_out_prompts})"
        )
    train_pool, held_out = held_out_split(pool, cfg.held_out_prompts)
    ptx = None
    if cfg.ptx_coef > 0:
        if not Path(cfg.pretrain_tokens).is_file():
            raise ChatforgeError(
                f"PPO-ptx needs pretraining tokens: {cfg.pretrain_tokens} not found "
                "(set --pretrain_tokens, or --ptx_coef=0 to disable the mix)"
            )
        ptx = TokenWindows(cfg.pretrain_tokens, actor.config.block_size, cfg.train.seed)
    gold = load_reward_model(cfg.gold_reward_model, device).requires_grad_(False) if cfg.gold_reward_model else None
    budget = {"max_tokens": cfg.max_tokens}
    if not cfg.max_tokens:  # measured once and shared, so every process samples to the same budget
        if job.is_main:
            budget = measure_answer_budget(reference, tokenizer, [p["messages"] for p in train_pool], cfg.train.seed,
                                           inference=cfg.inference)
        budget = job.broadcast_object(budget)
    policy = ActorCritic(actor.train(), critic.train())
    ppo = PPO(cfg, policy, reference.eval(), reward_model, tokenizer, train_pool, ptx, gold, budget["max_tokens"])
    if job.is_main:
        print(
            f"[ppo] actor {info['path']} ({actor.num_params() / 1e6:.2f}M), reward model {cfg.reward_model}; "
            f"{len(train_pool)} train prompts, {len(held_out)} held out; {ppo.per_rollout} updates per rollout; "
            f"answers of at most {ppo.max_tokens} tokens ({budget})"
        )
    meta = {
        "stage": "ppo",
        "policy": str(info["path"]),
        "reward_model": cfg.reward_model,
        "model": actor.config.to_dict(),
        "model_prefix": "actor.",
        "stage_config": dataclasses.asdict(cfg),
    }
    summary = train_ppo(ppo, cfg.out_dir, resume=cfg.resume, meta=meta, tokenizer=tokenizer_file)
    if not job.is_main:
        return
    out = Path(cfg.out_dir)
    rows = read_metrics(out)
    plot_ppo(rows, out / "ppo.png")
    last = next((r for r in reversed(rows) if "reward" in r), {})
    summary.update(
        max_tokens=ppo.max_tokens,
        answer_budget=budget,
        unfinished_penalty=cfg.unfinished_penalty,
        held_out_prompts=len(held_out),
        **{f"final_{k}": last.get(k) for k in ("reward", "gold_reward", "kl", "beta", "ended_fraction")},
        stopped_early=ppo.stop_reason,
    )
    io.write_json(out / "summary.json", summary)
    print(f"[ppo] final rollout: proxy reward {last.get('reward')}, gold reward {last.get('gold_reward')}, "
          f"KL {last.get('kl')}; judge the policy with `chatforge eval rlhf`")
