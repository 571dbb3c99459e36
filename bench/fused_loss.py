"""Chunked fused LM-head + cross-entropy (the idea of Liger's fused linear CE, written here).

The stock loss materializes ``tokens x vocab`` logits in bf16, upcasts them to fp32 and keeps
both plus their gradient: ~1.2 GiB at 4 x 1024 tokens and Mixtral's 32k vocabulary. Here the
logits of one chunk of tokens exist at a time; the gradient with respect to the hidden states
(and the head weight, when it trains) is computed in the forward pass, so the backward pass is
a multiplication by the incoming scalar gradient.
"""

from __future__ import annotations

import torch

IGNORE = -100


class _FusedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        n = hidden.shape[0]
        valid = (labels != IGNORE)
        count = valid.sum().clamp(min=1)
        loss = hidden.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        for s in range(0, n, chunk):
            h, y = hidden[s:s + chunk], labels[s:s + chunk]
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            ok = y != IGNORE
            tgt = torch.where(ok, y, 0)
            picked = logits.gather(1, tgt[:, None]).squeeze(1)
            loss += ((lse - picked) * ok).sum()
            g = torch.softmax(logits, dim=-1)
            g[torch.arange(len(y), device=g.device), tgt] -= 1.0
            g *= (ok.float() / count)[:, None]
            g = g.to(hidden.dtype)
            grad_h[s:s + chunk] = g @ weight
            if grad_w is not None:
                grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h, *(() if grad_w is None else (grad_w.to(weight.dtype),)))
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, *gw = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), (gw[0] * grad_loss if gw else None), None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               chunk: int = 1024, shift: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy of ``hidden @ weight.T`` against ``labels`` (-100 ignored).

    hidden: [B, S, H]; labels: [B, S] (shifted here when ``shift``, as transformers does).
    """
    if shift:
        labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)
    return _FusedLinearCE.apply(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), chunk)
