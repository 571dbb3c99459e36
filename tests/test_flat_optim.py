"""train.flat_optimizer: bitsandbytes' paged AdamW over one flat tensor gives the per-tensor update."""

import pytest
import torch

from phyassist.config import load_config
from phyassist.train.flat_optim import flat_optimizer

KW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, optim_bits=32, is_paged=True)


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5, 3), (1000,), (33,)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ps.append(torch.nn.Parameter(torch.randn(4, 6, generator=gen).to(torch.bfloat16)))  # a second bucket
    return ps


def _groups(ps):
    return [{"params": ps[:3], "weight_decay": 0.01}, {"params": ps[3:], "weight_decay": 0.0}]


def _steps(opts_and_params, n, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        grads = None
        for opt, ps in opts_and_params:
            if grads is None:
                grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in ps]
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
            for p in ps:
                p.grad = None


def test_flat_paged_adamw_equals_the_per_tensor_update_and_resumes():
    import bitsandbytes as bnb

    ref, flat = _params(), _params()
    a = bnb.optim.AdamW(_groups(ref), **KW)
    b = flat_optimizer(bnb.optim.AdamW, _groups(flat), **KW)
    assert len(b.param_groups) == 3  # two groups, the second split by dtype
    _steps([(a, ref), (b, flat)], 3, seed=1)
    for p, q in zip(ref, flat):
        assert torch.equal(p, q) and p.shape == q.shape and p.dtype == q.dtype
    # a checkpoint of the flat optimizer restores it: continuing equals never stopping
    state = b.state_dict()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in flat]
    c = flat_optimizer(bnb.optim.AdamW, _groups(resumed), **KW)
    c.load_state_dict(state)
    _steps([(a, ref), (c, resumed)], 2, seed=2)
    for p, q in zip(ref, resumed):
        assert torch.equal(p, q)


def test_a_member_given_new_storage_is_copied_back_into_the_flat_buffer():
    ps = _params()[:3]
    opt = flat_optimizer(torch.optim.SGD, [{"params": ps}], lr=0.5)
    new = torch.full((5, 3), 2.0)
    ps[1].data = new  # as a loader assigning tensors instead of copying into them
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    assert torch.equal(ps[1], torch.full((5, 3), 1.5))  # updated from the new values
    flat = opt.param_groups[0]["params"][0]
    assert ps[1].data_ptr() == flat[35:50].data_ptr()  # a view of the flat buffer again


def test_flat_optimizer_is_refused_for_per_tensor_optimizers():
    with pytest.raises(Exception, match="flat_optimizer needs an elementwise train.optim"):
        load_config("smoke", {"train.flat_optimizer": True, "train.optim": "adafactor"})
    assert load_config("paper").train.flat_optimizer
