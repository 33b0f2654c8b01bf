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
from chatforge.data.rankings import read_prompt_pool
from chatforge.data.shards import TokenWindows
from chatforge.errors import ChatforgeError, ConfigError
from chatforge.evals.ppo_eval import plot_ppo, win_rates
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
    epochs: int = option(2, "passes over each rollout", ge=1)
    max_tokens: int = option(48, "longest sampled answer", ge=1)
    gamma: float = option(1.0, "discount in GAE", ge=0, le=1)
    lam: float = option(0.95, "λ in GAE", ge=0, le=1)
    clip: float = option(0.2, "PPO ratio clip ε", gt=0, lt=1)
    value_clip: float = option(0.2, "clip of the value update around the rollout's values", gt=0)
    value_coef: float = option(0.5, "weight of the value loss", ge=0)
    ptx_coef: float = option(
        1.0, "γ: weight of the pretraining next-token loss mixed into each update (0 = off)", ge=0
    )
    held_out_prompts: int = option(48, "prompts in the win-rate evaluation after training", ge=1)
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
    train_pool, held_out = pool[: -cfg.held_out_prompts], pool[-cfg.held_out_prompts :]
    ptx = None
    if cfg.ptx_coef > 0:
        if not Path(cfg.pretrain_tokens).is_file():
            raise ChatforgeError(
                f"PPO-ptx needs pretraining tokens: {cfg.pretrain_tokens} not found "
                "(set --pretrain_tokens, or --ptx_coef=0 to disable the mix)"
            )
        ptx = TokenWindows(cfg.pretrain_tokens, actor.config.block_size, cfg.train.seed)
    policy = ActorCritic(actor.train(), critic.train())
    ppo = PPO(cfg, policy, reference.eval(), reward_model, tokenizer, train_pool, ptx)
    if job.is_main:
        print(
            f"[ppo] actor {info['path']} ({actor.num_params() / 1e6:.2f}M), reward model {cfg.reward_model}; "
            f"{len(train_pool)} train prompts, {len(held_out)} held out; {ppo.per_rollout} updates per rollout"
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
    baseline, _ = load_model(cfg.policy, device)
    rates = win_rates(actor, baseline, reward_model, tokenizer, held_out, cfg.max_tokens, device, cfg.train.seed)
    last = next((r for r in reversed(rows) if "reward" in r), {})
    summary.update(
        {k: v for k, v in rates.items() if k != "examples"},
        final_reward=last.get("reward"),
        final_kl=last.get("kl"),
        final_beta=last.get("beta"),
        stopped_early=ppo.stop_reason,
    )
    io.write_json(out / "summary.json", summary)
    io.write_json(out / "win_rate_examples.json", rates["examples"])
    print(
        f"[ppo] win rate over SFT on {len(held_out)} held-out prompts: reward model {rates['win_rate_rm']:.2f}, "
        f"MiniLM similarity to the reference {rates['win_rate_minilm']:.2f}"
    )
