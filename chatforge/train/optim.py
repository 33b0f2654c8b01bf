"""The optimizers of the training loop and the rules that set their learning rates.

``adamw``: AdamW on everything, weight decay on weight matrices only (not on norms, biases or embeddings).

``muon``: Muon (``torch.optim.Muon``: Nesterov momentum, then the update orthogonalised by Newton–Schulz
iterations) for the 2-D matrices inside the transformer blocks, and AdamW for what is not a hidden linear map:
token and value embeddings, the output head, scalars and heads on top. Muon's update has a fixed scale per
matrix whatever the gradient's, which is what lets hidden matrices take large steps early without diverging.

Learning rates (``muon``) follow scaling rules from a reference of 2^19 tokens per batch and width 768, the
public recipe's: every rate ∝ √(tokens per batch / 2^19) (the noise scale of a gradient estimate), AdamW rates
also ∝ (width / 768)^-½ (wider embeddings need smaller per-coordinate steps). ``lr`` is the Muon rate; the
AdamW groups keep the reference ratios to it (embeddings 15×, head 0.4×, scalars 25×), so one knob moves all.
"""

from __future__ import annotations

import math

import torch
from torch import nn

REFERENCE_BATCH_TOKENS = 2**19
REFERENCE_WIDTH = 768
REFERENCE_MATRIX_LR = 0.02
# AdamW rates relative to Muon's at the reference width
EMBED_RATIO, HEAD_RATIO, SCALAR_RATIO = 0.3 / 0.02, 0.008 / 0.02, 0.5 / 0.02
OPTIMIZERS = ("adamw", "muon")


def scaled_matrix_lr(batch_tokens: int) -> float:
    """Muon's learning rate for a batch of ``batch_tokens`` tokens by the √B rule."""
    return REFERENCE_MATRIX_LR * math.sqrt(batch_tokens / REFERENCE_BATCH_TOKENS)


class MuonWithAdamW:
    """Muon and AdamW stepping together, seen by the loop as one optimizer (groups, step, state)."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ValueError("the saved optimizer state is not Muon + AdamW")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def _adamw(groups: list[dict], cfg, device: str) -> torch.optim.AdamW:
    kwargs = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    groups = [g for g in groups if g["params"]]
    if torch.device(device).type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            pass  # a dtype or device without a fused kernel: fall back to the multi-tensor one
    return torch.optim.AdamW(groups, **kwargs)


def _is_hidden_matrix(name: str, p: nn.Parameter) -> bool:
    """A 2-D weight of a transformer block's linear map (Muon's domain); gates and heads are not."""
    return p.dim() == 2 and (".h." in f".{name}") and "ve_gate" not in name


def make_optimizer(model: nn.Module, cfg, device: str):
    """The optimizer ``cfg.optimizer`` names, each group tagged with ``base_lr`` for the schedule to scale."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    if cfg.optimizer == "adamw":
        decay = [p for _, p in named if p.dim() >= 2 and id(p) not in embeddings]
        rest = [p for _, p in named if p.dim() < 2 or id(p) in embeddings]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr, "base_lr": cfg.lr},
                  {"params": rest, "weight_decay": 0.0, "lr": cfg.lr, "base_lr": cfg.lr}]
        return _adamw(groups, cfg, device)
    width = getattr(getattr(model, "config", None), "n_embd", REFERENCE_WIDTH)
    width_scale = math.sqrt(REFERENCE_WIDTH / width)
    heads = {id(p) for n, p in named if n.endswith("lm_head.weight")}
    matrices = [p for n, p in named if _is_hidden_matrix(n, p)]
    embeds = [p for _, p in named if id(p) in embeddings]
    head = [p for _, p in named if id(p) in heads]
    taken = {id(p) for p in matrices + embeds + head}
    scalars = [p for _, p in named if id(p) not in taken]
    rates = {"embed": cfg.lr * EMBED_RATIO * width_scale, "head": cfg.lr * HEAD_RATIO * width_scale,
             "scalar": cfg.lr * SCALAR_RATIO}
    # torch.optim.Muon one matrix at a time: batching same-shape matrices measured 11.4 vs 13.8 ms a step on
    # the nano model, under 1 % of the step, so the library's optimizer stays
    muon = torch.optim.Muon([{"params": matrices, "lr": cfg.lr, "base_lr": cfg.lr, "muon": True}],
                            lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                            adjust_lr_fn="original")
    adamw = _adamw([{"params": embeds, "lr": rates["embed"], "base_lr": rates["embed"], "weight_decay": 0.0},
                    {"params": head, "lr": rates["head"], "base_lr": rates["head"], "weight_decay": 0.0},
                    {"params": scalars, "lr": rates["scalar"], "base_lr": rates["scalar"], "weight_decay": 0.0}],
                   cfg, device)
    return MuonWithAdamW(muon, adamw)


def muon_momentum_at(step: int, cfg) -> float:
    """Muon's momentum warms up from 0.85 over ``muon_momentum_warmup`` steps: early gradients change fast."""
    if not cfg.muon_momentum_warmup:
        return cfg.muon_momentum
    frac = min(1.0, step / cfg.muon_momentum_warmup)
    return 0.85 + frac * (cfg.muon_momentum - 0.85)


def apply_schedule(optimizer, factor: float, step: int, cfg) -> None:
    """Set every group's rate to its ``base_lr`` × ``factor`` and Muon's momentum for ``step``."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
        if group.get("muon"):
            group["momentum"] = muon_momentum_at(step, cfg)
