"""Beam search: keep the ``width`` most likely partial sequences, finish them at a stop token.

Scoring follows Hugging Face: a finished hypothesis scores sum(log-probs) / length**length_penalty (length
= generated tokens, the stop token included). With ``early_stopping`` the search ends as soon as ``width``
hypotheses are finished; otherwise when no running beam, scored at its current length, beats the worst of
them. Beams that reach ``max_new_tokens`` are ranked with the finished ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chatforge.model.kv_cache import KVCache


@dataclass
class Beam:
    token_ids: list[int]  # generated tokens, the final stop token included when ``finished``
    logprob: float  # sum of the tokens' log-probs
    score: float  # logprob / len(token_ids) ** length_penalty
    finished: bool  # ended at a stop token rather than at max_new_tokens
    text: str = ""  # filled in by Engine.beam_search


def _beam(tokens: list[int], logprob: float, length_penalty: float, finished: bool) -> Beam:
    return Beam(tokens, logprob, logprob / len(tokens) ** length_penalty, finished)


def beam_search(model, prompt_ids: list[int], width: int, max_new_tokens: int, length_penalty: float,
                early_stopping: bool, stop_ids: list[int], vocab_size: int) -> list[Beam]:
    """All finished (and, if the budget ran out, running) hypotheses, best first (at most ``width``)."""
    cache = KVCache.for_model(model, width, len(prompt_ids) + max_new_tokens)
    device = cache.k.device
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    logits = model(prompt, kv_cache=cache.rows(0, 1))[0][:, -1, :vocab_size].expand(width, -1)
    for row in range(1, width):
        cache.copy_row(0, row)
    # every row holds the same prompt; only row 0 may expand at first, or the beams would be duplicates
    scores = torch.full((width,), float("-inf"), device=device)
    scores[0] = 0.0
    running: list[list[int]] = [[] for _ in range(width)]
    finished: list[Beam] = []
    stops = set(stop_ids)
    for step in range(max_new_tokens):
        candidates = (scores[:, None] + logits.float().log_softmax(dim=-1)).view(-1)
        top_scores, top_index = candidates.topk(min(2 * width, candidates.numel()))
        origins, tokens, new_scores = [], [], []
        for score, index in zip(top_scores.tolist(), top_index.tolist()):
            if score == float("-inf") or len(tokens) == width:
                break
            origin, token = divmod(index, vocab_size)
            if token in stops:
                finished.append(_beam(running[origin] + [token], score, length_penalty, True))
                continue
            origins.append(origin)
            tokens.append(token)
            new_scores.append(score)
        finished = sorted(finished, key=lambda b: b.score, reverse=True)[:width]
        length = step + 1
        if not tokens:
            break
        running = [running[o] + [t] for o, t in zip(origins, tokens)]
        if len(finished) == width and (early_stopping or finished[-1].score >= new_scores[0] / length**length_penalty):
            running = []
            break
        if step == max_new_tokens - 1:
            break
        pad = width - len(tokens)  # fewer live candidates than beams: fill with dead copies
        origins += [origins[0]] * pad
        tokens += [tokens[0]] * pad
        running += [running[0]] * pad
        scores = torch.tensor(new_scores + [float("-inf")] * pad, device=device)
        cache.reorder_rows(torch.tensor(origins, dtype=torch.long, device=device))
        logits = model(torch.tensor(tokens, device=device)[:, None], kv_cache=cache)[0][:, -1, :vocab_size]
    alive = [_beam(seq, s, length_penalty, False) for seq, s in zip(running, new_scores) if s > float("-inf")]
    return sorted(finished + alive, key=lambda b: b.score, reverse=True)[:width]
