"""How PPO's answers are scored (reward-model scores under the unfinished-answer rule) and its training curves
are drawn; the judgement of the trained policy is ``chatforge.evals.rlhf``."""

from __future__ import annotations

from pathlib import Path

import torch

from chatforge import io
from chatforge.data.chat_batches import pad_rows
from chatforge.infer.answers import ended
from chatforge.model.heads import ScalarHeadModel


def reward_scores(reward_model: ScalarHeadModel, pairs, end_id: int, pad_id: int, device: str,
                  unfinished_penalty: float = 0.0) -> torch.Tensor:
    """Scores of prompt + response under the unfinished-answer rule: the reward model reads every answer with
    <|end|> after it (it was trained on finished answers; a sequence longer than the context keeps its end),
    and an answer that ran out of tokens before its own <|end|> loses ``unfinished_penalty``. The ranking
    builder applies the same rule by ranking unfinished samples with the corrupted answers."""
    block = reward_model.config.block_size
    finished = [ended(r, end_id) for _, r in pairs]
    rows = [(p + r + ([] if done else [end_id]))[-block:] for (p, r), done in zip(pairs, finished)]
    ids, lengths = pad_rows(rows, pad_id)
    unfinished = torch.tensor([not done for done in finished], dtype=torch.float32, device=device)
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

