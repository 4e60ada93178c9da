"""Next-token loss without materializing the logits: the lm_head matmul and the cross-entropy,
fused and chunked over tokens.

The usual path computes logits [tokens, vocab] in the compute dtype, upcasts them to fp32 for
the softmax, keeps the log-softmax for backward, and in backward builds a gradient of the same
size again: at a 32k vocabulary and 2 x 256 tokens that is ~65 MB per copy in fp32, at a 128k
vocabulary and 2,048 tokens ~1 GB each. Here the tokens go through the head in chunks; for each
chunk the forward computes the logits, the loss and at once the gradient with respect to the
hidden states (softmax - one_hot, times the head's weight), then drops the chunk's logits. What
is kept for backward is one hidden-sized gradient, so the peak holds a single chunk of logits.
The arithmetic is the same as the unfused path (fp32 softmax, the head's matmuls in the compute
dtype), and no matmul is recomputed.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from .data import IGNORE_INDEX

# Model types whose causal-LM forward is exactly `logits = lm_head(hidden_states)` (no soft-capping,
# no logit scaling): for these the fused loss gives the same numbers as the model's own logits.
FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "gemma"})

CHUNK_BYTES = 32 * 2 ** 20       # fp32 logits held per chunk


def architecture_fuses(model_type: str | None, setting) -> bool:
    """Whether the fused loss reproduces this architecture's logits: a known model type, and no
    logit soft-capping or scaling (``setting(key)`` reads the model config)."""
    return model_type in FUSED_MODEL_TYPES and not any(
        setting(k) for k in ("final_logit_softcapping", "logit_scale"))


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over labeled rows of cross_entropy(hidden @ weight.T + bias, labels), gradients computed
    in forward chunk by chunk (the loss is a graph leaf's last op, so its output gradient is a scalar
    that only scales them in backward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_rows, want_grad):
        ctx.w_dtype = weight.dtype
        need_h, need_w = want_grad and hidden.requires_grad, want_grad and weight.requires_grad
        need_b = want_grad and bias is not None and bias.requires_grad
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        any_grad = need_h or need_w or need_b
        for start in range(0, hidden.shape[0], chunk_rows):
            h, y = hidden[start:start + chunk_rows], labels[start:start + chunk_rows]
            logits = torch.nn.functional.linear(h, weight, bias).float()          # (n, vocab) fp32
            valid = y != IGNORE_INDEX
            y0 = torch.where(valid, y, 0)
            target = logits.gather(1, y0[:, None]).squeeze(1)
            m = logits.amax(dim=1, keepdim=True)
            logits.sub_(m).exp_()                                               # exp(logits - max)
            s = logits.sum(dim=1, keepdim=True)
            lse = (m + s.log()).squeeze(1)
            total += torch.where(valid, lse - target, 0.0).sum()
            if not any_grad:
                continue
            # d loss / d logits = softmax - one_hot(label) on labeled rows, 0 elsewhere
            logits.div_(s)
            logits.scatter_add_(1, y0[:, None], torch.full_like(target, -1.0)[:, None])
            logits.mul_(valid[:, None])
            g = logits.to(hidden.dtype)
            del logits
            if need_h:
                grad_h[start:start + chunk_rows] = g @ weight
            if need_w:
                grad_w.addmm_(g.t().float(), h.float())
            if need_b:
                grad_b += g.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_out).to(ctx.w_dtype),
                None if grad_b is None else (grad_b * grad_out).to(ctx.w_dtype),
                None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor, chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Sum of cross_entropy(hidden @ weight.T + bias, labels) over rows whose label is not
    IGNORE_INDEX, in fp32, without a [rows, vocab] tensor; hidden [rows, d], labels [rows]."""
    rows = max(1, chunk_bytes // (4 * weight.shape[0]))
    want_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, rows, want_grad)


def fused_head(model: nn.Module):
    """(owner module, attribute name, head) when the fused loss applies to this model: a known
    architecture whose output head is a plain nn.Linear; None otherwise (the caller then uses logits)."""
    owner = getattr(model, "module", model)        # DDP / accelerate wrappers keep the model in .module
    cfg = getattr(owner, "config", None)
    if cfg is None or not architecture_fuses(getattr(cfg, "model_type", None), lambda k: getattr(cfg, k, None)):
        return None
    head = owner.get_output_embeddings() if hasattr(owner, "get_output_embeddings") else None
    if type(head) is not nn.Linear:                # adapted, quantized or custom heads: use the logits
        return None
    for name, child in owner.named_children():
        if child is head:
            return owner, name, head
    return None


class _Hidden(nn.Module):
    """Stands in for the head during a forward, so the model returns its last hidden states."""

    def forward(self, x):
        return x


@contextmanager
def head_removed(owner: nn.Module, name: str):
    head = getattr(owner, name)
    setattr(owner, name, _Hidden())
    try:
        yield head
    finally:
        setattr(owner, name, head)
