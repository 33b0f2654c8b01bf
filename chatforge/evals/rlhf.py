"""The honest evaluation of a PPO policy, in the set-up of Gao et al.'s reward-model over-optimisation study.

PPO optimised a *proxy* reward model; a *gold* reward model (trained longer, on all the ranking data) stands in
for the true preference, and a judge no stage trained (all-MiniLM-L6-v2 cosine similarity to the held-out
reference answer) checks both. On every held-out prompt the policy and the SFT model answer once; the gold RM,
the proxy RM and the judge score both answers; win rates over SFT (ties count ½) and the mean paired gold-reward
difference come with 95 % intervals. Best-of-n from the SFT model is the baseline at matched KL: n SFT answers
per prompt, the proxy RM's favourite kept, its KL to SFT known in closed form (log n − (n − 1)/n).

Sampling is temperature 1 from each model's full distribution (no top-k/top-p) for both models: the
distribution PPO's KL penalty, its rollouts and the best-of-n KL formula are all defined on. Intervals are the
normal approximation on per-prompt outcomes, mean ± 1.96·s/√n.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from chatforge import io
from chatforge.chat_template import stop_token_ids
from chatforge.data.chat_batches import pad_rows
from chatforge.errors import ChatforgeError
from chatforge.evals.ppo_eval import reward_scores
from chatforge.infer.answers import ended, sample_answers
from chatforge.infer.params import SamplingParams
from chatforge.infer.precision import InferenceOptions
from chatforge.model.gpt import GPT
from chatforge.model.heads import ScalarHeadModel
from chatforge.tokenizer import PAD

Z95 = statistics.NormalDist().inv_cdf(0.975)
INTERVAL_METHOD = "95 % normal approximation on per-prompt values: mean ± 1.96·s/√n"
SAMPLING = "temperature 1, the full distribution (no top-k/top-p), same seeds for policy and SFT"
SCORED_TOGETHER = 32  # sequences per forward pass of a reward model or a log-prob pass (bounds the memory)

Pairs = list[tuple[list[int], list[int]]]


def mean_interval(values: Sequence[float]) -> dict:
    """Mean of per-prompt values with its 95 % interval (normal approximation) and the prompt count."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ChatforgeError("no values to average: the evaluation needs at least one prompt")
    half = Z95 * x.std(ddof=1) / math.sqrt(x.size) if x.size > 1 else 0.0
    return {"mean": round(float(x.mean()), 4), "low": round(float(x.mean() - half), 4),
            "high": round(float(x.mean() + half), 4), "prompts": int(x.size)}


def win_rate(ours: Sequence[float], theirs: Sequence[float]) -> dict:
    """How often ``ours`` beats ``theirs`` prompt by prompt (a tie is half a win), with its 95 % interval."""
    a, b = np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float)
    if a.shape != b.shape:
        raise ChatforgeError(f"win rate needs paired scores; got {a.size} and {b.size}")
    result = mean_interval((a > b) + 0.5 * (a == b))
    return {"rate": result["mean"], "low": max(0.0, result["low"]), "high": min(1.0, result["high"]),
            "prompts": result["prompts"]}


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ base) = log n − (n − 1)/n nats (Stiennon et al. 2020; Gao et al. 2022)."""
    if n < 1:
        raise ChatforgeError(f"best-of-n needs n >= 1; got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n(proxy: np.ndarray, gold: np.ndarray, ns: Sequence[int]) -> list[dict]:
    """Per n: the mean proxy and gold score of the proxy's favourite among each prompt's first n samples.

    ``proxy`` and ``gold`` are [prompts, samples]; taking prefixes of one set of samples makes every n cheap and
    the points comparable (a larger n only ever adds candidates)."""
    rows = np.arange(proxy.shape[0])
    points = []
    for n in ns:
        if n > proxy.shape[1]:
            raise ChatforgeError(f"best-of-{n} needs {n} samples per prompt; got {proxy.shape[1]}")
        chosen = proxy[:, :n].argmax(1)
        points.append({"n": n, "kl": round(best_of_n_kl(n), 4),
                       "proxy_reward": round(float(proxy[rows, chosen].mean()), 4),
                       "gold_reward": round(float(gold[rows, chosen].mean()), 4)})
    return points


def at_kl(points: list[dict], kl: float, key: str) -> float | None:
    """``key`` of the best-of-n curve at ``kl``, linear in √KL between its points; None beyond its last one."""
    xs = [math.sqrt(p["kl"]) for p in points]
    if not xs or not xs[0] <= math.sqrt(max(kl, 0.0)) <= xs[-1]:
        return None
    return round(float(np.interp(math.sqrt(max(kl, 0.0)), xs, [p[key] for p in points])), 4)


def response_logprob_sums(model: GPT, pairs: Pairs, pad_id: int, device: str) -> torch.Tensor:
    """Σ over each response's tokens of log p(token | what precedes it) under ``model`` (teacher forcing), [N].
    A sequence longer than the context keeps its end, as the engine's truncation does."""
    block, sums = model.config.block_size, []
    for first in range(0, len(pairs), SCORED_TOGETHER):
        chunk = pairs[first:first + SCORED_TOGETHER]
        rows = [(p + r)[-block:] for p, r in chunk]
        ids, lengths = pad_rows(rows, pad_id)
        ids, lengths = ids.to(device), lengths.to(device)
        starts = lengths - torch.tensor([min(len(r), len(row) - 1) for (_, r), row in zip(chunk, rows)], device=device)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids)[0][:, :-1].float(), -1).gather(2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        predicted = torch.arange(1, ids.size(1), device=device).unsqueeze(0)  # the position each logit predicts
        mask = (predicted >= starts.unsqueeze(1)) & (predicted < lengths.unsqueeze(1))
        sums.append((logp * mask).sum(1))
    return torch.cat(sums) if sums else torch.zeros(0)


def scores(reward_model: ScalarHeadModel, pairs: Pairs, end_id: int, pad_id: int, device: str,
           unfinished_penalty: float) -> np.ndarray:
    """``reward_scores`` (the unfinished-answer rule) in chunks, as a float array."""
    return torch.cat([reward_scores(reward_model, pairs[i:i + SCORED_TOGETHER], end_id, pad_id, device,
                                    unfinished_penalty).cpu()
                      for i in range(0, len(pairs), SCORED_TOGETHER)]).numpy().astype(float)


def evaluate_rlhf(
    policy: GPT,
    baseline: GPT,
    proxy: ScalarHeadModel,
    gold: ScalarHeadModel,
    tokenizer,
    held_out: list[dict],
    max_tokens: int,
    judge: Callable[[list[str]], np.ndarray],
    best_of: Sequence[int] = (1, 2, 4, 8, 16),
    seed: int = 0,
    device: str = "cpu",
    inference: InferenceOptions | None = None,
    unfinished_penalty: float = 0.0,
) -> tuple[dict, list[dict]]:
    """The summary (module docstring) and one row per held-out prompt.

    ``judge`` embeds texts into unit vectors (e.g. ``MiniLMEmbedder.embed``); ``held_out`` items carry
    ``messages`` and a ``reference`` answer. The SFT model's first sample per prompt is both its answer in the
    win rates and best-of-1, so best-of-n at KL 0 is the SFT baseline itself."""
    if not held_out:
        raise ChatforgeError("no held-out prompts to evaluate")
    prompts = [item["messages"] for item in held_out]
    end, pad = stop_token_ids(tokenizer)[0], tokenizer.special_id(PAD)
    params = SamplingParams(temperature=1.0, seed=seed)
    draws = max(best_of)
    # draw j of prompt i is item j·P + i of one long list: its seed does not depend on how the list is chunked
    sft = [sample_answers(baseline, tokenizer, prompts, max_tokens, params, inference, first_index=j * len(prompts))
           for j in range(draws)]
    answers = {"policy": sample_answers(policy, tokenizer, prompts, max_tokens, params, inference), "sft": sft[0]}
    every_sft = [pair for draw in sft for pair in draw]

    def score(model: ScalarHeadModel, pairs: Pairs) -> np.ndarray:
        return scores(model, pairs, end, pad, device, unfinished_penalty)

    proxy_all = score(proxy, every_sft).reshape(draws, -1).T  # [prompts, draws]
    gold_all = score(gold, every_sft).reshape(draws, -1).T
    rm = {"proxy": {"policy": score(proxy, answers["policy"]), "sft": proxy_all[:, 0]},
          "gold": {"policy": score(gold, answers["policy"]), "sft": gold_all[:, 0]}}
    texts = {name: [tokenizer.decode([t for t in r if t not in stop_token_ids(tokenizer)]) for _, r in pairs]
             for name, pairs in answers.items()}
    references = judge([item["reference"] for item in held_out])
    similarity = {name: (judge(t) * references).sum(1) for name, t in texts.items()}
    kl = (response_logprob_sums(policy, answers["policy"], pad, device)
          - response_logprob_sums(baseline, answers["policy"], pad, device)).cpu().numpy()
    curve = best_of_n(proxy_all, gold_all, sorted(set(best_of)))
    policy_kl = float(kl.mean())

    def model_summary(name: str) -> dict:
        return {"gold_reward": mean_interval(rm["gold"][name]), "proxy_reward": mean_interval(rm["proxy"][name]),
                "similarity": round(float(np.mean(similarity[name])), 4),
                "response_length": round(float(np.mean([len(r) for _, r in answers[name]])), 2),
                "ended_fraction": round(float(np.mean([ended(r, end) for _, r in answers[name]])), 4)}

    bon_gold = at_kl(curve, policy_kl, "gold_reward")
    summary = {
        "prompts": len(held_out),
        "max_tokens": max_tokens,
        "unfinished_penalty": unfinished_penalty,
        "sampling": SAMPLING,
        "seed": seed,
        "intervals": INTERVAL_METHOD,
        "policy": {**model_summary("policy"), "kl": mean_interval(kl)},
        "sft": model_summary("sft"),
        "win_rate_gold": win_rate(rm["gold"]["policy"], rm["gold"]["sft"]),
        "win_rate_minilm": win_rate(similarity["policy"], similarity["sft"]),
        "win_rate_proxy": win_rate(rm["proxy"]["policy"], rm["proxy"]["sft"]),
        "gold_reward_difference": mean_interval(rm["gold"]["policy"] - rm["gold"]["sft"]),
        "best_of_n": curve,
        "best_of_n_gold_at_policy_kl": bon_gold,
        "policy_minus_best_of_n_gold": None if bon_gold is None else round(float(rm["gold"]["policy"].mean())
                                                                            - bon_gold, 4),
    }
    rows = [{"id": item.get("id"), "prompt": item["messages"][-1]["content"], "reference": item["reference"],
             **{f"{name}_answer": texts[name][i] for name in answers},
             **{f"{name}_{judge_name}": round(float(values[name][i]), 4)
                for judge_name, values in (("gold", rm["gold"]), ("proxy", rm["proxy"]), ("similarity", similarity))
                for name in answers},
             "policy_kl": round(float(kl[i]), 4)} for i, item in enumerate(held_out)]
    return summary, rows


def training_curve(rows: list[dict]) -> list[dict]:
    """One point per PPO rollout from metrics.jsonl (the loop repeats a rollout's figures on each of its updates)."""
    points, last = [], None
    for row in rows:
        if "kl" not in row or "reward" not in row:
            continue
        key = (row["kl"], row["reward"], row.get("gold_reward"))
        if key != last:
            points.append({"step": row.get("step"), "kl": row["kl"], "reward": row["reward"],
                           "gold_reward": row.get("gold_reward")})
        last = key
    return points


def plot_rlhf(summary: dict, ppo_rows: list[dict], path: Path) -> None:
    """Gold and proxy reward against √KL: PPO's training rollouts, best-of-n from SFT and PPO's final policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = training_curve(ppo_rows)
    bon = summary["best_of_n"]
    final = summary["policy"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in zip(axes, ("gold_reward", "proxy_reward"), ("gold reward model", "proxy reward model")):
        ppo_key = "reward" if key == "proxy_reward" else key
        trained = [(math.sqrt(max(p["kl"], 0.0)), p[ppo_key]) for p in curve if p.get(ppo_key) is not None]
        if trained:
            ax.plot(*zip(*trained), ".", alpha=0.35, color="tab:blue", label="PPO rollouts (training prompts)")
            window = max(1, len(trained) // 10)  # a running mean: one rollout's mean reward is noisy
            ax.plot(*(np.convolve(axis, np.ones(window) / window, mode="valid") for axis in zip(*trained)), "-",
                    color="tab:blue")
        ax.plot([math.sqrt(p["kl"]) for p in bon], [p[key] for p in bon], "o-", color="tab:orange",
                label="best-of-n from SFT (held out)")
        for p in bon:
            ax.annotate(f"n={p['n']}", (math.sqrt(p["kl"]), p[key]), textcoords="offset points", xytext=(4, -10),
                        fontsize=7)
        kl = final["kl"]["mean"]
        ax.errorbar([math.sqrt(max(kl, 0.0))], [final[key]["mean"]],
                    yerr=[[final[key]["mean"] - final[key]["low"]], [final[key]["high"] - final[key]["mean"]]],
                    fmt="*", markersize=12, color="tab:red", label="PPO final policy (held out)")
        ax.set_title(title)
        ax.set_xlabel("√KL to SFT (nats)")
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
