"""How a PPO policy is judged: reward-model scores of its answers, win rates over the SFT model by the reward
model and by a judge no stage trained (MiniLM similarity to reference answers), and the training curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from chatforge import io
from chatforge.chat_template import stop_token_ids
from chatforge.data.chat_batches import pad_rows
from chatforge.embed.minilm import MiniLMEmbedder
from chatforge.infer.answers import ended, sample_answers
from chatforge.infer.params import SamplingParams
from chatforge.model.gpt import GPT
from chatforge.model.heads import ScalarHeadModel
from chatforge.tokenizer import PAD


def reward_scores(reward_model: ScalarHeadModel, pairs, end_id: int, pad_id: int, device: str,
                  unfinished_penalty: float = 0.0) -> torch.Tensor:
    """Scores of prompt + response under the unfinished-answer rule: the reward model reads every answer with
    <|end|> after it (it was trained on finished answers; a sequence longer than the context keeps its end),
    and an answer that ran out of tokens before its own <|end|> loses ``unfinished_penalty``. The ranking
    builder applies the same rule by ranking unfinished samples with the corrupted answers."""
    block = reward_model.config.block_size
    rows = [(p + r + ([] if ended(r, end_id) else [end_id]))[-block:] for p, r in pairs]
    ids, lengths = pad_rows(rows, pad_id)
    unfinished = torch.tensor([not ended(r, end_id) for _, r in pairs], dtype=torch.float32, device=device)
    with torch.no_grad():
        return reward_model.score(ids.to(device), lengths.to(device)).float() - unfinished_penalty * unfinished


PLOTTED = ("reward", "gold_reward", "kl", "beta", "clip_frac", "approx_kl", "entropy", "value_loss",
           "response_length", "ended_fraction", "ptx_loss")


def plot_ppo(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 4, figsize=(16, 9))
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


def win_rates(
    policy: GPT,
    baseline: GPT,
    reward_model: ScalarHeadModel,
    tokenizer,
    held_out: list[dict],
    max_tokens: int,
    device: str,
    seed: int,
) -> dict:
    """How often the policy's answer beats the baseline's on held-out prompts, judged by the reward model and
    by a judge no stage trained: cosine similarity to the held-out reference answer under all-MiniLM-L6-v2."""
    prompts = [item["messages"] for item in held_out]
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=seed)
    answers = {
        name: sample_answers(model, tokenizer, prompts, max_tokens, params)
        for name, model in (("policy", policy), ("baseline", baseline))
    }
    end, pad = stop_token_ids(tokenizer)[0], tokenizer.special_id(PAD)
    rm = {name: reward_scores(reward_model, pairs, end, pad, device) for name, pairs in answers.items()}
    texts = {
        name: [tokenizer.decode([t for t in r if t not in stop_token_ids(tokenizer)]) for _, r in pairs]
        for name, pairs in answers.items()
    }
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
        "examples": [
            {"prompt": p[-1]["content"], "policy": texts["policy"][i], "baseline": texts["baseline"][i]}
            for i, p in enumerate(prompts[:3])
        ],
    }
