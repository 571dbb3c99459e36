"""An elementwise optimizer run on one flat tensor per parameter group instead of one per LoRA tensor.

The study's LoRA is 320 small tensors on Mixtral (r=32 on q/k/v/o and the router of 32 layers).
bitsandbytes' paged AdamW updates them one at a time, a Python call and a kernel launch each,
and the GPU sits idle waiting for those launches (measured with ``--timeline`` of
bench/finetune_mixtral.py: bench/finetune_mixtral.md). Here the trainable tensors become views into one
flat buffer per (group, device, dtype), so the same optimizer class with the same arguments
updates all of them in one call.

The update is the same only for optimizers that treat every element alone (Adam/AdamW, SGD, 32-bit
bitsandbytes states without ``max_unorm`` or percentile clipping): a per-tensor norm (LAMB, LARS),
a factored state (Adafactor) or blockwise 8-bit states would see other tensors. Hence the
config's allow-list (``phyassist.train.schema.ELEMENTWISE``).
"""

from __future__ import annotations

import torch
from torch import nn


def _buckets(params: list[torch.Tensor]) -> dict:
    out: dict = {}
    for p in params:
        out.setdefault((p.device, p.dtype), []).append(p)
    return out


def _views(flat: torch.Tensor, members: list[torch.Tensor]):
    """``(member, its slice of flat)`` in order: the layout both the build and the re-attach walk."""
    offset = 0
    for p in members:
        yield p, flat.data[offset:offset + p.numel()]
        offset += p.numel()


class _Flat:
    """Mixin before an optimizer class: gathers the members' gradients into the flat parameter
    before each step; the members are views of it, so the update lands in them."""

    _members: list  # [(flat parameter, [member tensors])]

    def _reattach(self) -> None:
        """Members whose storage was replaced (a loader assigning new tensors) are copied in and
        viewed again, so the flat buffer always holds the model's current weights."""
        for flat, members in self._members:
            for p, view in _views(flat, members):
                if p.data_ptr() != view.data_ptr():
                    view.copy_(p.detach().reshape(-1))
                    p.data = view.view_as(p)

    @torch.no_grad()
    def _gather_grads(self) -> None:
        for flat, members in self._members:
            flat.grad = torch.cat([p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel())
                                   for p in members])

    def step(self, closure=None):
        self._reattach()
        self._gather_grads()
        try:
            return super().step(closure)
        finally:
            for flat, _ in self._members:
                flat.grad = None


def flat_optimizer(cls, param_groups: list[dict], **kwargs) -> torch.optim.Optimizer:
    """``cls`` (an optimizer class) over ``param_groups`` and ``kwargs`` as given, but each group's
    trainable tensors are first made views of one flat tensor per device and dtype.

    A member that gets no gradient in a step is updated with a zero gradient (a per-tensor
    optimizer would skip it); LoRA gives every member a gradient every step.
    """
    groups, members = [], []
    for group in param_groups:
        params = [p for p in group["params"] if p.requires_grad]
        for bucket in _buckets(params).values():
            flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in bucket]))
            for p, view in _views(flat, bucket):
                p.data = view.view_as(p)
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [flat]})
            members.append((flat, bucket))
    if not groups:
        raise ValueError("flat_optimizer: no trainable parameters")
    opt = type(f"Flat{cls.__name__}", (_Flat, cls), {})(groups, **kwargs)
    opt._members = members
    return opt
