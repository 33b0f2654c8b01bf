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
from torch.distributed.tensor import DTensor
from torch.optim._muon import _adjust_lr

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
        if any(isinstance(p, DTensor) for group in self.muon.param_groups for p in group["params"]):
            sharded_muon_step(self.muon)
        else:
            batched_muon_step(self.muon)
        self.adamw.step()

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.muon, self.adamw]

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


@torch.no_grad()
def batched_muon_step(muon: torch.optim.Muon) -> None:
    """``muon.step()`` with the Newton–Schulz iterations of same-shaped matrices batched into one ``bmm`` each.

    torch.optim.Muon orthogonalises one matrix at a time: a small model's 24 matrices of three shapes cost 24
    rounds of small matmuls where three batched ones do, and 31 vs 17 ms a step at the speedrun's shape on
    one core. The arithmetic is Muon's own (the same bf16 iterations and coefficients, the same learning-rate
    adjustment per shape, weight decay only when set), and the state is torch.optim.Muon's (a
    ``momentum_buffer`` per parameter), so checkpoints are unchanged.
    """
    for group in muon.param_groups:
        lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
        by_shape: dict[torch.Size, list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.grad is not None:
                by_shape.setdefault(p.shape, []).append(p)
        for shape, params in by_shape.items():
            grads = [p.grad for p in params]
            buffers = [_momentum_buffer(muon, p) for p in params]
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
            orthogonal = _batched_newton_schulz(torch.stack(updates), group["ns_coefficients"], group["ns_steps"],
                                                group["eps"])
            if decay:
                torch._foreach_mul_(params, 1 - lr * decay)
            torch._foreach_add_(params, list(orthogonal.unbind(0)),
                                alpha=-_adjust_lr(lr, group["adjust_lr_fn"], shape))


def _momentum_buffer(muon: torch.optim.Muon, p: torch.Tensor) -> torch.Tensor:
    """``p``'s momentum in torch.optim.Muon's own state layout (zeros the first time), so checkpoints match it."""
    state = muon.state[p]
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(p.grad)
    return state["momentum_buffer"]


def _batched_newton_schulz(updates: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                           eps: float) -> torch.Tensor:
    """torch.optim.Muon's ``_zeropower_via_newtonschulz`` of every matrix of ``updates`` [N, rows, cols] at once."""
    a, b, c = coefficients
    x = updates.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norms at most 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


@torch.no_grad()
def sharded_muon_step(muon: torch.optim.Muon) -> None:
    """``muon.step()`` for matrices sharded by FSDP (``DTensor`` rows split across ranks).

    Newton–Schulz orthogonalises the *whole* matrix: on a shard of rows it would be a different (wrong) update.
    Momentum is elementwise, so each rank keeps and updates only its shard of the buffer; the Nesterov update is
    then gathered whole, orthogonalised (the same computation on every rank, as under DDP), and each rank applies
    its own rows. The state keeps torch.optim.Muon's layout (a ``momentum_buffer`` per parameter), so sharded
    checkpoints and resumes treat it like any optimizer's.
    """
    from torch.optim._muon import _zeropower_via_newtonschulz

    for group in muon.param_groups:
        lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            grad, buf = p.grad.to_local(), _momentum_buffer(muon, p).to_local()
            buf.lerp_(grad, 1 - momentum)
            update = grad.lerp(buf, momentum) if group["nesterov"] else buf
            whole = DTensor.from_local(update, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            orthogonal = _zeropower_via_newtonschulz(whole.full_tensor(), group["ns_coefficients"],
                                                     group["ns_steps"], group["eps"])
            local = p.to_local()
            mine = _local_rows(orthogonal, p)
            local.mul_(1 - lr * decay)
            local.add_(mine.to(local.dtype), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))


def _local_rows(whole: torch.Tensor, p: DTensor) -> torch.Tensor:
    """This rank's rows of ``whole`` as FSDP shards ``p`` (``torch.chunk`` of dim 0 over the mesh)."""
    chunks = whole.chunk(p.device_mesh.size(), dim=0)
    rank = p.device_mesh.get_local_rank()
    mine = chunks[rank] if rank < len(chunks) else whole[:0]
    if mine.shape != p.to_local().shape:
        raise RuntimeError(f"unexpected FSDP shard {tuple(p.to_local().shape)} of a {tuple(p.shape)} matrix")
    return mine


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
