"""A skewed Mixtral router for the speed benchmarks (issue 22): random weights route tokens almost evenly
(each expert ~1/8 of the rows), a trained Mixtral does not, and the MoE paths' speed depends on the load.

``set_skew(model, alpha)`` adds a fixed per-expert logit bias ``-alpha * log(rank)`` to every
``MixtralTopKRouter`` (a Zipf-like load; ``alpha = 1.2`` gives measured shares of about 0.35, 0.21, 0.14,
0.10, 0.07, 0.05, 0.04, 0.03); ``alpha = 0`` removes it. The bias tensor (the router's ``logit_bias``) is updated in
place, so CUDA graphs captured before still read it; the skewed forward declares itself transformers' maths plus that
bias (``_phyassist_logit_bias``), so the kit's fused router kernel (``phyassist.models.fused_decode``) adds it too. ``expert_shares(model)`` is the share of rows each expert got in the last
forward, summed over layers. Used by ``generation_mixtral.py`` (decode) and ``finetune_mixtral.py``
(``+skewA``: the training step).
"""

from __future__ import annotations


def set_skew(model, alpha: float) -> None:
    """Fixed per-expert router logit bias ``-alpha * log(rank)`` on every router of ``model`` (0 removes it).
    The router's forward is transformers' (``MixtralTopKRouter.forward``) plus the bias, and it records the
    chosen experts for :func:`expert_shares`."""
    import torch

    for m in model.modules():
        if type(m).__name__ != "MixtralTopKRouter":
            continue
        e = m.weight.shape[0]
        bias = -alpha * torch.log(torch.arange(1, e + 1, device=m.weight.device, dtype=torch.float32))
        if getattr(m, "logit_bias", None) is None:
            m.logit_bias = bias
        else:  # in place: captured CUDA graphs read this very tensor
            m.logit_bias.copy_(bias)
        cls = type(m)
        if not hasattr(cls, "_phy_plain_forward"):  # patched once per process (class-wide), original kept
            cls._phy_plain_forward = cls.forward
            cls.forward = _skewed_forward


def _skewed_forward(self, hidden_states):
    import torch
    import torch.nn.functional as F

    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    logits = F.linear(hidden_states, self.weight)
    if getattr(self, "logit_bias", None) is not None:
        logits = logits + self.logit_bias.to(logits.dtype)
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, self.top_k, dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    self.last_index = idx.detach()
    return logits, top, idx


_skewed_forward._phyassist_logit_bias = True  # transformers' router maths plus ``logit_bias`` (fused_decode reads it)


def expert_shares(model) -> list[float]:
    """Share of the (token, expert) rows each expert got in the last forward, over all layers."""
    import torch

    counts = None
    for m in model.modules():
        if type(m).__name__ == "MixtralTopKRouter" and getattr(m, "last_index", None) is not None:
            c = torch.bincount(m.last_index.flatten(), minlength=m.weight.shape[0]).float()
            counts = c if counts is None else counts + c
    return [round(float(x), 3) for x in (counts / counts.sum()).tolist()] if counts is not None else []
