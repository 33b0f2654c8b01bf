"""The decoder-only GPT: token + learned position embeddings, pre-norm blocks of causal self-attention and
an MLP, a final LayerNorm and an output projection tied to the token embedding.

The layout follows GPT-2 exactly (module names included), so Hugging Face GPT-2 checkpoints load into it
without any reshaping beyond Conv1D's transposed weights (see ``chatforge.model.hf``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chatforge.errors import ChatforgeError


@dataclass
class GPTConfig:
    vocab_size: int = 8192
    block_size: int = 256  # longest sequence the position table covers
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 192
    dropout: float = 0.0
    bias: bool = True  # biases in Linear/LayerNorm, as GPT-2; False is slightly faster
    layer_norm_eps: float = 1e-5

    def validate(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ChatforgeError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ChatforgeError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ChatforgeError(f"model.dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


# A family of sizes in the spirit of GPT-3's ada < babbage < curie < davinci, scaled so the smallest trains in
# minutes on a 2-core CPU and "gpt2" matches GPT-2 small (124M) exactly.
PRESETS: dict[str, dict] = {
    "nano": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "ada": dict(n_layer=6, n_head=6, n_embd=192, block_size=256),
    "babbage": dict(n_layer=8, n_head=8, n_embd=384, block_size=512),
    "curie": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "davinci": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
}


def preset_config(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ChatforgeError(f"unknown model preset '{name}'; presets: {', '.join(PRESETS)}")
    cfg = GPTConfig(**{**PRESETS[name], **overrides})
    cfg.validate()
    return cfg


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        if kv_cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            # The cache stores this step's keys/values and returns everything visible so far, with a mask
            # that encodes causality and each row's own length (rows may be at different positions).
            k, v, mask = kv_cache.update(self.layer_idx, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's "gelu_new" is the tanh approximation; matching it keeps imported checkpoints exact.
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), kv_cache))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections keeps the residual stream's variance flat in depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if non_embedding else n

    def hidden_states(self, idx: torch.Tensor, positions: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        """Final (normed) hidden states [B, T, n_embd]; reward, value and embedding heads read these."""
        B, T = idx.shape
        if positions is None:
            if kv_cache is not None:
                positions = kv_cache.positions(T)  # the cache checks its own capacity against block_size
            elif T > self.config.block_size:
                raise ChatforgeError(f"sequence of {T} tokens is longer than the model's context of {self.config.block_size}")
            else:
                positions = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(positions))
        for block in self.h:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.ln_f(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.wte.weight)  # output projection tied to the token embedding

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        kv_cache=None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T, vocab] and, with ``targets``, the mean next-token loss (targets of -1 are ignored)."""
        logits = self.logits(self.hidden_states(idx, positions, kv_cache))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss
