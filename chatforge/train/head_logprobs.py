"""Log-probs and next-token losses read straight off final hidden states, a few rows of logits at a time.

``GPT.logits`` turns every position's hidden state into a [.., vocab] row; a loss then takes a log-softmax of the
whole [B, T, vocab] tensor and autograd keeps it, and its gradient, for backward. At PPO's shapes (8 rows of 256
positions, a vocabulary of 8192) those passes over 16.7M floats cost about as much as the output layer's matrix
products, and the CPU's log-softmax backward is slow (~100 ms for [2048, 8192] fp32, ~15 ms its forward). Here the
output layer is applied to ``CHUNK_ELEMENTS // vocab`` rows at a time, and each piece takes one softmax kernel (the
targets' log-probs read off it, ``_softmax_and_logsumexp``) and one conversion of p − onehot to the product's dtype:

* ``token_logprobs(model, hidden, targets)``: log p(target) of each row, [N] (and, without gradient, the entropy of
  each row's distribution). Backward reads the probabilities kept by the forward when they are at most
  ``KEEP_ELEMENTS`` (PPO's response tokens: a few hundred rows), else recomputes each piece's logits (one more
  [rows, n_embd] × [n_embd, vocab] product) rather than hold [N, vocab] tensors between forward and backward.
* ``next_token_loss(model, hidden, targets)``: the mean next-token cross-entropy (targets of -1 ignored). Its
  gradient is computed piece by piece in the forward pass (the loss is a scalar: backward only scales it).

Both compute what ``GPT.logits`` followed by a log-softmax computes: ``next_token_loss`` in the same precision
(under autocast the products run in the autocast dtype, as ``lm_head`` does), ``token_logprobs`` with fp32
products in its forward (see there) and its gradient's in the autocast dtype; the softmax arithmetic is fp32 (as
the callers' ``.float()`` did). Rows are independent; only the weight gradient's sum over pieces is ordered
differently.
"""

from __future__ import annotations

import torch

from chatforge.model.gpt import GPT

CHUNK_ELEMENTS = 1 << 21  # logits per piece: 256 rows of an 8192 vocabulary, 8 MB in fp32
KEEP_ELEMENTS = 1 << 24  # token_logprobs keeps up to this many probabilities (64 MB) for backward


def output_layer(model: GPT) -> tuple[torch.Tensor, float]:
    """``model``'s output projection [vocab, n_embd] and logit soft-cap (0 = none), as ``GPT.logits`` applies them."""
    if model.config.arch == "gpt2":
        return model.wte.weight, 0.0  # tied to the token embedding
    return model.lm_head.weight, float(model.config.logit_softcap)


def _pieces(rows: int, vocab: int):
    step = max(1, CHUNK_ELEMENTS // vocab)
    return (slice(i, min(rows, i + step)) for i in range(0, rows, step))


def _logits(h: torch.Tensor, w: torch.Tensor, softcap: float) -> torch.Tensor:
    """Logits [rows, vocab] of hidden rows ``h`` as ``GPT.logits`` computes them: the product in h's dtype, then
    the soft-cap (in fp32); without a cap they stay in h's dtype (the softmax kernels below read them as fp32)."""
    z = torch.mm(h, w.t())
    if softcap:
        z = z.float().div_(softcap).tanh_().mul_(softcap)
    return z


def _softmax_and_logsumexp(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(z) in fp32 [rows, vocab] and log Σ exp z [rows], with one exponential a logit (a log-softmax followed
    by exp takes two, and that second pass over [rows, vocab] was the dearest elementwise one here).

    The softmax's largest entry is exactly exp(0) / Σ exp(z − max z), so log Σ exp z = max z − log max p, which
    cannot underflow (max p ≥ 1 / vocab); then log p_t = z_t − log Σ exp z and the entropy is
    log Σ exp z − Σ p·z, one dot product a row instead of a log over [rows, vocab]."""
    p = torch.softmax(z, 1, dtype=torch.float32)
    return p, z.amax(1).float().sub_(p.amax(1).log_())


def _target_logits(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return z[torch.arange(z.size(0), device=z.device), targets].float()


def _logit_gradient(p: torch.Tensor, z: torch.Tensor | None, targets: torch.Tensor, softcap: float) -> torch.Tensor:
    """p − onehot(targets), times the soft-cap's slope 1 − (z / cap)² when there is one: the gradient of
    −log p(targets) with respect to the product before the cap, where p = softmax(z) (fp32, overwritten)."""
    p[torch.arange(p.size(0), device=p.device), targets] -= 1  # in fp32: p − 1 loses nothing where p is near 1
    if softcap:
        p.mul_(torch.addcmul(torch.ones((), device=p.device), z, z, value=-1 / softcap**2))
    return p


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap: float, entropy: bool, grads: bool, grad_dtype: torch.dtype):
        h, w = hidden.float(), weight.float()  # fp32 products: see token_logprobs
        logprobs = torch.empty(h.size(0), dtype=torch.float32, device=h.device)
        ent = torch.empty_like(logprobs) if entropy else None
        # keep the probabilities for backward when they are small enough (and the cap's slope is not needed): one
        # product with the output layer fewer than recomputing them
        keep = grads and not softcap and h.size(0) * w.size(0) <= KEEP_ELEMENTS
        kept = []
        for piece in _pieces(h.size(0), w.size(0)):
            z = _logits(h[piece], w, softcap)
            p, log_total = _softmax_and_logsumexp(z)
            logprobs[piece] = _target_logits(z, targets[piece]) - log_total
            if entropy:
                ent[piece] = log_total - torch.linalg.vecdot(p, z.float())
            if keep:
                kept.append(p)
        ctx.save_for_backward(h, w, targets, *kept)
        ctx.softcap, ctx.dtypes, ctx.grad_dtype = softcap, (hidden.dtype, weight.dtype), grad_dtype
        if entropy:
            ctx.mark_non_differentiable(ent)
        return logprobs, ent

    @staticmethod
    def backward(ctx, grad, _grad_entropy):
        h, w, targets, *kept = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        # the gradient's products in the autocast dtype, as every other layer's backward runs: the forward's fp32
        # is for the ratio exp(log p − log p_old), which rounding would move; a gradient rounds like any other
        low_h, low_w = h.to(ctx.grad_dtype), w.to(ctx.grad_dtype)
        for i, piece in enumerate(_pieces(h.size(0), w.size(0))):
            g = grad[piece].float().neg().unsqueeze(1)
            if kept:  # kept by the forward and left as they are (a second backward would need them again)
                dz = kept[i] * g  # g · (p − onehot) with g = −grad: g·p, then −g at the targets (in fp32)
                dz[torch.arange(dz.size(0), device=dz.device), targets[piece]] -= g.squeeze(1)
            else:  # recomputed: the same product as the forward's
                z = _logits(h[piece], w, ctx.softcap)
                dz = _logit_gradient(torch.softmax(z, 1, dtype=torch.float32), z, targets[piece], ctx.softcap).mul_(g)
            dz = dz.to(ctx.grad_dtype)
            if need_h:
                grad_h[piece] = torch.mm(dz, low_w)
            if need_w:
                grad_w += torch.mm(dz.t(), low_h[piece])
        return (grad_h.to(ctx.dtypes[0]) if need_h else None, grad_w.to(ctx.dtypes[1]) if need_w else None,
                None, None, None, None, None)


class _NextTokenLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap: float, dtype: torch.dtype, grads: bool):
        h, w = hidden.to(dtype), weight.to(dtype)
        valid = (targets != -1).float()
        count = valid.sum()  # 0 gives nan, as F.cross_entropy's mean does
        safe = targets.clamp(min=0)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if grads else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if grads else None
        for piece in _pieces(h.size(0), w.size(0)):
            z = _logits(h[piece], w, softcap)
            p, log_total = _softmax_and_logsumexp(z)
            logp = _target_logits(z, safe[piece]) - log_total
            mine = valid[piece].unsqueeze(1)
            total -= torch.dot(logp, valid[piece])
            if grads:  # of the summed loss −Σ valid · log p; the mean's 1 / count is applied once, at the end
                dz = _logit_gradient(p, z, safe[piece], softcap).to(h.dtype)
                # ignored rows are zeroed on the narrow side of each product (h's rows, the result's rows), exactly
                grad_h[piece] = torch.mm(dz, w).mul_(mine)
                grad_w += torch.mm(dz.t(), h[piece] * mine.to(h.dtype))
        if grads:
            ctx.save_for_backward(grad_h.div_(count), grad_w.div_(count))
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad):
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        return ((grad_h * grad).to(ctx.dtypes[0]) if need_h else None,
                (grad_w * grad).to(ctx.dtypes[1]) if need_w else None, None, None, None, None)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``lm_head`` would compute in: the autocast dtype when autocast is on for x's device."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def token_logprobs(model: GPT, hidden: torch.Tensor, targets: torch.Tensor, entropy: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets[r]) of each row of ``hidden`` [N, n_embd] under ``model``'s output layer, fp32 [N]; and with
    ``entropy`` each row's entropy (fp32 [N], no gradient), else None.

    The forward's product is fp32 even under autocast: PPO's ratio exp(log p - log p_old) is where rounding hurts,
    and its rows are few (the response tokens). With bf16 products the second update of a rollout measured an
    approximate KL of 3.4e-4 from rounding that moves with the weights, 2.6e-4 with this, 1.1e-4 all in fp32. The
    gradient's two products run in the autocast dtype, as the rest of the network's backward does."""
    weight, softcap = output_layer(model)
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    grad_dtype = _compute_dtype(hidden)
    with torch.autocast(hidden.device.type, enabled=False):
        return _TokenLogprobs.apply(hidden, weight, targets, softcap, entropy, grads, grad_dtype)


def next_token_loss(model: GPT, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy of ``targets`` [N] (-1 = ignored) under ``model``'s output layer applied to ``hidden``
    [N, n_embd]: ``GPT.forward``'s loss, without materialising the logits."""
    weight, softcap = output_layer(model)
    dtype = _compute_dtype(hidden)
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(hidden.device.type, enabled=False):
        return _NextTokenLoss.apply(hidden, weight, targets, softcap, dtype, grads)
