"""The decoder-only GPT, in two architectures behind one interface (``hidden_states``, ``logits``, ``forward``).

``arch="gpt2"`` follows GPT-2 exactly (module names included), so Hugging Face GPT-2 checkpoints load into it
without any reshaping beyond Conv1D's transposed weights (see ``chatforge.model.hf``): token + learned position
embeddings, pre-LayerNorm blocks with biases, GELU MLP, output projection tied to the token embedding.

``arch="modern"`` is the default for training from scratch; every choice buys loss per FLOP at small scale:

* rotary positions (no position table; base 100,000) and RMS-normalised queries and keys (QK-norm), which
  keeps attention logits bounded so high learning rates do not blow them up;
* parameter-free RMSNorm (also right after the embedding), no biases, ReLU² MLP (4× wide);
* untied input embedding and output head; the head's logits soft-capped at ``15·tanh(x/15)``;
* value embeddings: on alternating layers a second token embedding is mixed into the attention values
  through a per-head sigmoid gate (cheap capacity: a table lookup, no FLOPs);
* per-layer learnable scalars on the residual stream and on a copy of the (normed) input embedding ``x0``,
  so a layer can re-read the token identity directly;
* output projections of attention and MLP start at zero, so the network starts as a shallow one and grows;
* grouped-query attention as an option (``n_kv_head < n_head``): fewer key/value heads, a smaller KV cache.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chatforge.device import amx_cpu
from chatforge.errors import ChatforgeError

ARCHS = ("gpt2", "modern")


@dataclass
class GPTConfig:
    vocab_size: int = 8192
    block_size: int = 256  # longest sequence: the position table (gpt2) or the rotary table (modern) covers it
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 192
    dropout: float = 0.0
    bias: bool = True  # gpt2 only: biases in Linear/LayerNorm, as GPT-2; False is slightly faster
    layer_norm_eps: float = 1e-5
    # a config without "arch" is a checkpoint written before modern existed: gpt2
    arch: str = "gpt2"
    n_kv_head: int = 0  # modern only: key/value heads (0 = n_head; fewer is grouped-query attention)
    rope_base: float = 100_000.0
    logit_softcap: float = 15.0  # modern only: logits = softcap * tanh(logits / softcap) (0 = none)
    value_embeds: bool = True  # modern only: value embeddings on alternating layers

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        if self.arch != "modern":
            return self.n_head
        return self.n_kv_head or self.n_head

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise ChatforgeError(f"model.arch must be one of {', '.join(ARCHS)}; got {self.arch!r}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ChatforgeError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ChatforgeError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ChatforgeError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.arch == "modern":
            if self.n_kv_head < 0 or self.n_head % self.kv_heads:
                raise ChatforgeError(f"model.n_kv_head ({self.n_kv_head}) must divide model.n_head ({self.n_head})")
            if self.head_dim % 2:
                raise ChatforgeError(f"rotary positions need an even head size; n_embd / n_head = {self.head_dim}")
            if self.logit_softcap < 0 or self.rope_base <= 0:
                raise ChatforgeError("model.logit_softcap must be >= 0 and model.rope_base > 0")
        elif self.n_kv_head not in (0, self.n_head):
            raise ChatforgeError("grouped-query attention (model.n_kv_head) needs arch=modern")

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
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, arch="gpt2"),
}


def preset_config(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ChatforgeError(f"unknown model preset '{name}'; presets: {', '.join(PRESETS)}")
    cfg = GPTConfig(**{**PRESETS[name], **overrides})
    cfg.validate()
    return cfg


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    if x.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _RMSNorm.apply(x)
    return F.rms_norm(x, (x.size(-1),))


class _RMSNorm(torch.autograd.Function):
    """``F.rms_norm`` (no weight) with a backward of three passes: autograd's derivative of it is nine operations
    (pow, mul, sum, div, ...), each a pass over the activations. Eager training only (a compiler derives its own):
    17 norms of [8, 230, 128] forward + backward, two threads: 7.0 -> 4.7 ms in fp32, 9.9 -> 5.2 ms in bf16."""

    @staticmethod
    def forward(ctx, x):
        y = F.rms_norm(x, (x.size(-1),))
        mean_square = torch.linalg.vector_norm(x, 2, -1, keepdim=True, dtype=torch.float32).square_().div_(x.size(-1))
        # F.rms_norm's default eps: the machine epsilon of the dtype it computes in (fp32 for bf16 inputs)
        eps = torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
        ctx.save_for_backward(y, mean_square.add_(eps).rsqrt_())
        return y

    @staticmethod
    def backward(ctx, grad):
        # y = x · r with r = (mean x² + eps)^-½: dx = r · (g − y · mean(g · y))
        y, r = ctx.saved_tensors
        mean_gy = torch.linalg.vecdot(grad, y).unsqueeze(-1).float().div_(y.size(-1))
        return torch.addcmul(grad, y, mean_gy, value=-1).mul_(r).to(grad.dtype)


# A compiled CPU decode step multiplies one or two rows by each weight. Written as multiply-and-sum, inductor makes
# that product one vectorised loop that converts the weight's dtype as it reads it; aten's matmul is a library
# call that costs more than its arithmetic there (speedrun shape, one row: the tied 8192 x 128 head 95 -> 45 us
# in bf16, a 512 x 128 layer 7 -> 4.5 us in fp32 and 4.3 -> 2.7 us in int8, measured inside compiled graphs).
WRITTEN_OUT_ROWS = 2


def writes_out_product(x: torch.Tensor) -> bool:
    """Whether ``linear`` (and the int8 layers of inference) write ``x``'s product with a weight out."""
    # is_compiling first: eager calls (every training step) stop at one cheap check
    return torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() <= WRITTEN_OUT_ROWS * x.size(-1)


def written_out_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [..., K] @ weight [N, K].T`` in fp32, as multiply-and-sum (for ``writes_out_product`` cases only: eager,
    it would materialise every row's [N, K] product)."""
    rows = x.reshape(-1, 1, x.size(-1)).float()
    # as_strided makes inductor store the rows first; inlined, their producer (a norm) is recomputed per output
    rows = rows.as_strided(rows.shape, rows.stride())
    return (rows * weight.float()).sum(-1).view(*x.shape[:-1], weight.size(0))


# oneDNN's bf16 products on CPUs with AMX sum some rows in another order once a product has more than 32 rows and
# an inner dimension from 512 up (measured on a Xeon: rows of 33- to 1100-row products differ in the last bit from
# the same rows among fewer, at irregular row counts), while products of 2-32 rows agree with one another at every
# shape tried (inner dimensions 64-4096, outputs 128-50257). So an inference product there (bf16 weights, no
# autograd) multiplies at most this many rows at a time: a request's tokens do not depend on the rest of its batch
# (the runner's MIN_PRODUCT_ROWS keeps a product above one row). Pieces cost a library call each (~70 us).
INVARIANT_PRODUCT_ROWS = 32
INVARIANT_PRODUCT_MIN_WIDTH = 512


def multiplies_in_pieces(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear`` multiplies ``x`` by ``weight`` in pieces of at most INVARIANT_PRODUCT_ROWS rows."""
    # the dtypes first: a training step (fp32 parameters, autocast or not) stops there
    return (x.dtype == weight.dtype == torch.bfloat16 and x.size(-1) >= INVARIANT_PRODUCT_MIN_WIDTH
            and x.numel() > INVARIANT_PRODUCT_ROWS * x.size(-1) and x.device.type == "cpu"
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and amx_cpu())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, written out where ``writes_out_product`` says so, in pieces where ``multiplies_in_pieces``."""
    if multiplies_in_pieces(x, weight):
        rows = x.reshape(-1, x.size(-1))
        pieces = rows.tensor_split(-(-rows.size(0) // INVARIANT_PRODUCT_ROWS))  # even sizes: none of one row
        return torch.cat([F.linear(piece, weight, bias) for piece in pieces]).view(*x.shape[:-1], weight.size(0))
    if not writes_out_product(x):
        return F.linear(x, weight, bias)
    y = written_out_product(x, weight)
    return (y if bias is None else y + bias.float()).to(x.dtype)


class Linear(nn.Linear):
    """``nn.Linear`` computed by ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


WRITTEN_OUT_ATTENTION_MAX_T = 512  # its [B, H, T, T] fp32 scores: 8 x 2 x 512^2 x 4 bytes = 16 MB at PPO's size


def causal_attention(q, k, v, dropout: float, gqa: bool) -> torch.Tensor:
    """Causal attention over whole sequences (training, scoring, prefill without a cache).

    Under an eager CPU bf16 autocast the fastest form depends on the CPU: one with AMX takes SDPA's fp32 (flash)
    kernel, the others the written-out form (``written_out_causal_attention``); SDPA on bf16 inputs, what autocast
    alone would run, is the slowest on the Xeon and barely faster than fp32 on the AMD machine. Forward + backward at
    the speedrun's shapes [8, H, 256, D], two threads:

    * AMD Zen 5 (AVX-512 bf16), H=2, D=64: SDPA fp32 7.6 ms, SDPA bf16 7.3 ms, written out 4.2 ms;
    * Intel Xeon with AMX, H=2, D=64: SDPA fp32 9.4-10.0 ms, bf16 13.4-14.9 ms, written out 9.2-11.8 ms; H=4, D=32
      (the GPT-2-shaped speedrun model): fp32 10.9 ms, bf16 21.6 ms, written out 19.9-24.5 ms. There the
      written-out form's [B, H, T, T] scores (which the flash kernel never stores) cost more passes over memory
      than its bf16 products save (a synthetic PPO update at the GPT-2 shape: 837 -> 668 ms with SDPA fp32).
    """
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling():
        if amx_cpu():
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, dropout_p=dropout,
                                                   enable_gqa=gqa)
            return y.to(torch.get_autocast_dtype("cpu"))  # what the written-out form (and autocast's SDPA) return
        if not dropout and q.size(2) <= WRITTEN_OUT_ATTENTION_MAX_T:
            return written_out_causal_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=gqa)


def written_out_causal_attention(q, k, v) -> torch.Tensor:
    """Causal attention of q [B, H, T, D] over k, v [B, Hkv, T, D] as two batched products in the autocast dtype
    with the softmax between them in fp32 (as a fused kernel keeps its scores): the products' rounding is bf16's,
    the normalisation exact. The scale and the causal mask ride in the first product (``baddbmm`` adds a -inf
    bias above the diagonal), which saves three elementwise passes over the [B, H, T, T] scores and their
    gradients (forward + backward at PPO's shape [8, 2, 256, 64], two threads: 3.8-4.7 -> 2.7-3.0 ms)."""
    B, H, T, D = q.shape
    kv_heads = k.size(1)
    group = H // kv_heads  # each key/value head serves H // Hkv queries: their rows go into one product
    queries = q.reshape(B * kv_heads, group * T, D)
    keys = k.reshape(B * kv_heads, T, D).transpose(1, 2)
    future = torch.full((T, T), float("-inf"), device=q.device).triu(1).repeat(group, 1)
    scores = torch.baddbmm(future, queries, keys, alpha=D**-0.5)  # [B·Hkv, group·T, T]
    weights = scores.softmax(-1, dtype=torch.float32)
    return torch.bmm(weights, v.reshape(B * kv_heads, T, D)).view(B, H, T, D)


def attend(q, k, v, kv_cache, layer_idx: int, dropout: float) -> torch.Tensor:
    """Causal attention of q [B, H, T, D] over k, v [B, Hkv, T, D]; with a cache, over everything cached so far."""
    gqa = q.size(1) != k.size(1)
    if kv_cache is None:
        return causal_attention(q, k, v, dropout, gqa)
    # The cache stores this step's keys/values and returns everything visible so far, with a mask that
    # encodes causality and each row's own length (rows may be at different positions).
    k, v, mask = kv_cache.update(layer_idx, k, v)
    if q.size(2) == 1 and q.device.type == "cpu":  # a decode step on the CPU
        if torch.compiler.is_compiling():  # written out, inductor fuses it into the step's own loops
            return one_query_attention(q, k, v, mask).to(q.dtype)
        return batched_one_query_attention(q, k, v, mask).to(q.dtype)
    # an eager CPU engine keeps its cache in fp32 under bf16 weights (see KVCache.for_model)
    y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, enable_gqa=gqa)
    return y.to(q.dtype)


def batched_one_query_attention(q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """``scaled_dot_product_attention`` of one query per row, q [B, H, 1, D] over k, v [B, Hkv, T, D] (``mask``
    [B, 1, 1, T], True = visible), as two batched products (aten's bmm) around a softmax, in the cache's dtype.
    An eager CPU decode step uses it: SDPA's CPU kernel makes two library calls per row and head, so at 64 rows it
    cost more than the step's matmuls (speedrun shape, 96 cached positions: ~0.66 -> ~0.3 ms a layer), and with
    two threads it sums a row's keys in an order that depends on the batch size, where each of bmm's products is
    the same whatever the batch: a request's tokens do not depend on the rest of the batch."""
    B, H, _, D = q.shape
    kv_heads, T = k.size(1), k.size(2)
    queries = q.reshape(B * kv_heads, H // kv_heads, D).to(k.dtype)  # each key/value head serves H // Hkv queries
    keys = k.reshape(B * kv_heads, T, D).transpose(1, 2)
    if mask is None:
        scores = torch.bmm(queries, keys).mul_(D**-0.5)
    else:
        bias = torch.zeros(mask.shape, dtype=k.dtype, device=k.device).masked_fill_(~mask, float("-inf"))
        bias = bias.expand(B, kv_heads, 1, T).reshape(B * kv_heads, 1, T)
        scores = torch.baddbmm(bias, queries, keys, alpha=D**-0.5)
    weights = scores.float().softmax(-1).to(v.dtype)
    return torch.bmm(weights, v.reshape(B * kv_heads, T, D)).view(B, H, 1, D)


def one_query_attention(q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """``scaled_dot_product_attention`` of one query per row, q [B, H, 1, D] over k, v [B, Hkv, T, D] (``mask``
    [B, 1, 1, T], True = visible), written out: compiled for the CPU, inductor fuses it into the decode step's
    own loops, where SDPA's kernel is an opaque call that costs more than its arithmetic (a step at batch 1 with
    256 cached positions: 0.64 -> 0.29 ms, speedrun shape)."""
    B, H, _, D = q.shape
    kv_heads = k.size(1)
    q = q.view(B, kv_heads, H // kv_heads, 1, D).float()  # each key/value head serves H // kv_heads queries
    scores = (q * k[:, :, None].float()).sum(-1) * D**-0.5  # [B, Hkv, H / Hkv, T]
    if mask is not None:
        scores = scores.masked_fill(~mask.view(B, 1, 1, -1), float("-inf"))
    weights = scores.softmax(dim=-1)
    out = (weights[..., None] * v[:, :, None].float()).sum(-2)  # [B, Hkv, H / Hkv, D]
    return out.view(B, H, 1, D).to(v.dtype)


# ---- arch = "gpt2" ---------------------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = cfg.n_head
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = attend(q, k, v, kv_cache, self.layer_idx, self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

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


# ---- arch = "modern" -------------------------------------------------------------------------------------------

GATE_CHANNELS = 32  # the value-embedding gate reads this many leading channels of the block's input


def has_value_embed(cfg: GPTConfig, layer_idx: int) -> bool:
    """Alternating layers, always including the last."""
    return cfg.value_embeds and layer_idx % 2 == (cfg.n_layer - 1) % 2


QK_SCALE = 1.2  # normed queries and keys × 1.2: a sharper softmax than unit norms allow


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x [B, T, H, D] with the tables cos = [c, c], sin = [−s, s] [B or 1, T, 1, D]
    (``GPT.reset_buffers``): (x1, x2) → (x1·c − x2·s, x2·c + x1·s), as x·cos + (x2, x1)·sin in three operations
    (the half-width form takes seven, each with its own backward, in every attention layer of a training step)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((x2, x1), dim=-1), sin)


class ModernAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.n_head, self.n_kv_head, self.head_dim = layer_idx, cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.c_q = Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.c_k = Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=False)
        self.c_v = Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=False)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, bias=False)
        gated = has_value_embed(cfg, layer_idx)
        self.ve_gate = Linear(min(GATE_CHANNELS, cfg.n_embd), cfg.kv_heads, bias=False) if gated else None
        self.dropout = cfg.dropout

    def forward(self, x, rotary, value_embed=None, kv_cache=None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if value_embed is not None:  # [B, T, Hkv*D], gated per head in (0, 2), starting at 1
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))
            v = v + gate.unsqueeze(-1) * value_embed.view(B, T, self.n_kv_head, self.head_dim)
        # QK-norm then × QK_SCALE (folded into the rotary tables), rotary on the normed vectors
        q, k = rotate(rms_norm(q), *rotary), rotate(rms_norm(k), *rotary)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        y = attend(q, k, v, kv_cache, self.layer_idx, self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class ModernMLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class ModernBlock(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = ModernAttention(cfg, layer_idx)
        self.mlp = ModernMLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rotary, value_embed=None, kv_cache=None):
        x = x + self.drop(self.attn(rms_norm(x), rotary, value_embed, kv_cache))
        return x + self.drop(self.mlp(rms_norm(x)))


# ---- the model -------------------------------------------------------------------------------------------------


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.arch == "gpt2":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
            self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
            self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        else:
            self.h = nn.ModuleList(ModernBlock(cfg, i) for i in range(cfg.n_layer))
            kv_dim = cfg.kv_heads * cfg.head_dim
            self.value_embeds = nn.ModuleDict(
                {str(i): nn.Embedding(cfg.vocab_size, kv_dim) for i in range(cfg.n_layer) if has_value_embed(cfg, i)}
            )
            self.resid_lambdas = nn.Parameter(torch.ones(cfg.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(cfg.n_layer))
            self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
            # cos/sin of every position: a buffer derived from the config, never saved in checkpoints
            self.register_buffer("rotary_cos", torch.empty(0), persistent=False)
            self.register_buffer("rotary_sin", torch.empty(0), persistent=False)
        self.reset_buffers()
        self.reset_parameters()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the derived buffers (also after a model built on the meta device gets real storage)."""
        cfg = self.config
        if cfg.arch == "gpt2":
            return
        device = self.wte.weight.device
        dims = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = cfg.rope_base ** -(dims / cfg.head_dim)
        angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32, device=device), inv_freq)
        # full-width tables for ``rotate``, times QK_SCALE: a rotation is linear, so scaling the normed queries and
        # keys first or the tables is the same (and one operation fewer on each)
        cos, sin = angles.cos() * QK_SCALE, angles.sin() * QK_SCALE
        self.rotary_cos, self.rotary_sin = torch.cat((cos, cos), 1), torch.cat((-sin, sin), 1)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        cfg = self.config
        if cfg.arch == "gpt2":
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            # GPT-2's scaled init of the residual projections keeps the residual stream's variance flat in depth.
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
            return
        bound = math.sqrt(3) / math.sqrt(cfg.n_embd)  # uniform with std 1/sqrt(width)
        nn.init.normal_(self.wte.weight, std=0.8)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for embed in self.value_embeds.values():
            nn.init.uniform_(embed.weight, -bound, bound)
        for block in self.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * bound, 0.4 * bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wpe.weight.numel() if self.config.arch == "gpt2" else 0
        return n

    def hidden_states(self, idx: torch.Tensor, positions: torch.Tensor | None = None, kv_cache=None) -> torch.Tensor:
        """Final (normed) hidden states [B, T, n_embd]; reward, value and embedding heads read these."""
        B, T = idx.shape
        if positions is None:
            if kv_cache is not None:
                positions = kv_cache.positions(T)  # the cache checks its own capacity against block_size
            elif T > self.config.block_size:
                raise ChatforgeError(
                    f"sequence of {T} tokens is longer than the model's context of {self.config.block_size}"
                )
            else:
                positions = torch.arange(T, device=idx.device)
        if self.config.arch == "gpt2":
            x = self.drop(self.wte(idx) + self.wpe(positions))
            for block in self.h:
                x = block(x, kv_cache)
            hidden = self.ln_f(x)
        else:
            # positions are [T] (shared) or [B, T] (per row, from the cache): broadcast to [B or 1, T, 1, D/2]
            at = positions if positions.dim() == 2 else positions[None]
            rotary = (self.rotary_cos[at][:, :, None], self.rotary_sin[at][:, :, None])
            x = x0 = self.drop(rms_norm(self.wte(idx)))
            for i, block in enumerate(self.h):
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
                value_embed = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
                x = block(x, rotary, value_embed, kv_cache)
            hidden = rms_norm(x)
        if kv_cache is not None:
            kv_cache.advance(T)
        return hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.arch == "gpt2":
            return linear(hidden, self.wte.weight)  # output projection tied to the token embedding
        logits = self.lm_head(hidden)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits.float() / cap) if cap else logits

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
