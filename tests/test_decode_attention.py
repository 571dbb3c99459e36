"""One decode step's attention kernel (phyassist.models.decode_attention) against the same maths in fp64 and against
transformers' SDPA function it stands in for: Triton's CPU interpreter (``make test``) and a GPU (``gpu``)."""

import math

import pytest
import torch
from conftest import run_in_triton_interpreter


def _reference(q, k, v, mask, scaling=None):
    """``softmax(q k^T * scaling) v`` per query head in fp64, grouped KV heads, keys the boolean mask hides left out."""
    B, H, _, D = q.shape
    group = H // k.shape[1]
    kk = k.double().repeat_interleave(group, 1)
    vv = v.double().repeat_interleave(group, 1)
    s = (q.double() @ kk.transpose(-1, -2)) * (1 / math.sqrt(D) if scaling is None else scaling)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) @ vv).transpose(1, 2)  # [B, 1, H, D]


def _check_close(got, want, v, what):
    """Within two steps of the dtype's rounding of the largest value of the head's values: the probabilities are
    rounded to the value dtype before their product with the values (a step at most of each term, and the terms
    are a convex combination), the output once (the interpreter truncates: a step each)."""
    assert got.shape == want.shape and got.dtype == v.dtype, (what, got.shape, want.shape, got.dtype)
    bound = 2.5 * torch.finfo(v.dtype).eps * v.float().abs().amax(dim=(2, 3)).double()  # [B, Hkv]
    group = got.shape[2] // v.shape[1]
    bound = bound.repeat_interleave(group, 1)[:, None, :, None]
    err = (got.double() - want).abs()
    assert torch.isfinite(got).all(), what
    assert (err <= bound).all(), (what, (err / bound).max().item())


def _masks(B, L, g):
    """Left padding and the cache's empty tail (row 0), every slot (row 1), holes of more than a block in the middle
    (row 2), one key (row 3)."""
    mask = torch.zeros(B, 1, 1, L, dtype=torch.bool)
    mask[0, ..., 20:100] = True
    mask[1] = True
    mask[2, ..., :L - 7] = torch.rand(L - 7, generator=g) > 0.3
    mask[2, ..., 30:130] = False
    mask[3, ..., 57] = True
    return mask


def check_kernel(device="cpu"):
    """Grouped heads (4 query heads a KV head, as Mixtral; 32, two row tiles of the product; and one a head), bf16 and
    fp16, a cache length past a block, per-sequence, shared and no masks, the query a transposed view (as the
    projections give it), keys and values a view of a longer cache (their strides not their shapes'), the
    interpreter's block of 64 keys and of 32, and a scaling of its own; then the keys past each sequence's last
    attendable one and in its holes filled with NaN (SDPA reads them; this kernel must not); and a sequence whose mask
    hides every key (zeros, as SDPA's math path)."""
    import phyassist.models.decode_attention as da

    g = torch.Generator().manual_seed(0)
    block = da.INTERPRETER_BLOCK_L
    cases = ((4, 8, 2, 64, 150, torch.bfloat16, 64), (4, 4, 4, 32, 70, torch.float16, 64),
             (4, 32, 1, 16, 140, torch.bfloat16, 32))
    try:
        for B, H, Hkv, D, L, dtype, da.INTERPRETER_BLOCK_L in cases:
            what = (B, H, Hkv, D, L, dtype, da.INTERPRETER_BLOCK_L)
            q = torch.randn(B, 1, H * D, generator=g).to(device, dtype).view(B, 1, H, D).transpose(1, 2)
            k = torch.randn(B, Hkv, L + 9, D, generator=g).to(device, dtype)[:, :, 9:]
            v = torch.randn(B, Hkv, L + 5, D, generator=g).to(device, dtype)[:, :, :L]
            mask = _masks(B, L, g).to(device)
            for m, scaling in ((mask, None), (mask[1:2], 0.3), (None, None)):
                got = da.decode_attention(q, k, v, m, scaling)
                _check_close(got, _reference(q, k, v, m, scaling), v, what + (m is None, scaling))
            hidden = ~mask[:, 0, 0, None, :, None]  # [B, 1, L, 1]: the keys each sequence may not attend
            k_nan = k.masked_fill(hidden, float("nan"))
            v_nan = v.masked_fill(hidden, float("nan"))
            got = da.decode_attention(q, k_nan, v_nan, mask)
            _check_close(got, _reference(q, k, v, mask), v, ("NaN in hidden keys",) + what)
            none = mask.clone()
            none[3] = False
            got = da.decode_attention(q, k, v, none)
            assert torch.equal(got[3], torch.zeros_like(got[3])), ("no key attended",) + what
            _check_close(got[:3], _reference(q[:3], k[:3], v[:3], none[:3]), v[:3], ("beside no key",) + what)
    finally:
        da.INTERPRETER_BLOCK_L = block


class _Attention(torch.nn.Module):
    """What transformers' attention functions read from the module."""

    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups, self.is_causal, self.training = groups, True, False


def check_wrapper(device="cpu"):
    """transformers' SDPA function and the wrapper agree on what the wrapper computes (one query token, a boolean
    mask); what it does not compute goes to the function it wraps, with its arguments. (A batch this small stays on
    SDPA on a GPU, :data:`~phyassist.models.decode_attention.MIN_PROGRAMS`: lifted here, checked in the GPU test.)"""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    import phyassist.models.decode_attention as da

    min_programs, da.MIN_PROGRAMS = da.MIN_PROGRAMS, 0
    try:
        _check_wrapper(device, sdpa_attention_forward, da.sdpa_decode_function)
    finally:
        da.MIN_PROGRAMS = min_programs


def _check_wrapper(device, sdpa_attention_forward, sdpa_decode_function):

    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return sdpa_attention_forward(*args, **kwargs)

    fn = sdpa_decode_function(spy)
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, D, L = 4, 8, 2, 64, 130
    q = torch.randn(B, H, 1, D, generator=g).to(device, torch.bfloat16)
    k = torch.randn(B, Hkv, L, D, generator=g).to(device, torch.bfloat16)
    v = torch.randn(B, Hkv, L, D, generator=g).to(device, torch.bfloat16)
    mask = _masks(B, L, g).to(device)
    module = _Attention(H // Hkv)
    with torch.no_grad():
        got, weights = fn(module, q, k, v, mask, dropout=0.0, scaling=D ** -0.5, sliding_window=None)
        want, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=D ** -0.5)
        assert weights is None and not calls
        _check_close(got, _reference(q, k, v, mask), v, "wrapper")
        assert (got.float() - want.float()).abs().max() <= 4 * 2 ** -7 * v.float().abs().max(), "wrapper vs SDPA"
        q2 = torch.randn(B, H, 2, D, generator=g).to(device, torch.bfloat16)
        for args, kwargs in (((q2, k, v, mask[..., :1, :].expand(B, 1, 2, L)), {}),  # two query tokens
                             ((q, k, v, torch.zeros(B, 1, 1, L, device=device)), {}),  # an additive float mask
                             ((q, k, v, mask), {"softcap": 30.0}), ((q, k.float(), v, mask), {})):
            calls.clear()
            try:
                fn(module, *args, dropout=0.0, scaling=0.1, **kwargs)
            except (ValueError, RuntimeError):
                pass  # SDPA's own refusal (softcap; mixed dtypes): the call reached it
            assert len(calls) == 1 and calls[0]["scaling"] == 0.1, kwargs
    with torch.enable_grad():  # autograd: the kernel has no backward
        calls.clear()
        fn(module, q, k, v, mask, dropout=0.0, scaling=0.1)
        assert len(calls) == 1


def check_cache_write(device="cpu"):
    """A static cache layer's one-token update: the same cache and length as transformers' ``StaticLayer.update``
    (the new key a transposed view, as the projections give it; bf16 and fp16), several steps in a row; what it does
    not do (several tokens, autograd) goes to the update it wraps."""
    from transformers.cache_utils import StaticLayer

    from phyassist.models.decode_attention import static_layer_update

    update = static_layer_update(StaticLayer.update)
    g = torch.Generator().manual_seed(3)
    for B, H, D, dtype in ((3, 2, 64, torch.bfloat16), (1, 4, 32, torch.float16)):
        ours, theirs = StaticLayer(max_cache_len=9), StaticLayer(max_cache_len=9)
        prompt = torch.randn(B, H, 4, D, generator=g).to(device, dtype)
        with torch.no_grad():
            for layer in (ours, theirs):
                update(layer, prompt, prompt * 2)  # four tokens: the update it wraps
            for _ in range(3):
                key = torch.randn(B, 1, H * D, generator=g).to(device, dtype).view(B, 1, H, D).transpose(1, 2)
                value = torch.randn(B, H, 1, D, generator=g).to(device, dtype)
                got = update(ours, key, value)
                want = StaticLayer.update(theirs, key, value)
                assert got[0] is ours.keys and got[1] is ours.values
                assert torch.equal(ours.keys, want[0]) and torch.equal(ours.values, want[1]), (B, H, D, dtype)
                assert int(ours.cumulative_length) == int(theirs.cumulative_length)
        assert int(ours.cumulative_length) == 7
    calls = []
    spy = static_layer_update(lambda *a, **k: calls.append(a) or "original")
    layer = StaticLayer(max_cache_len=9)
    with torch.no_grad():
        StaticLayer.update(layer, prompt, prompt)
        assert spy(layer, prompt[:, :, :2], prompt[:, :, :2]) == "original"  # two tokens
    key = prompt[:, :, :1]
    with torch.enable_grad():
        assert spy(layer, key, key) == "original" and len(calls) == 2


def test_decode_attention_matches_the_maths_in_triton_interpreter():
    run_in_triton_interpreter("import tests.test_decode_attention as t; t.check_kernel(); t.check_wrapper(); "
                              "t.check_cache_write()")


def test_decode_attention_declines_cpu_tensors_without_the_interpreter():
    """On a CPU without Triton's interpreter the wrapper is the SDPA function itself (the test runs without
    TRITON_INTERPRET)."""
    from phyassist.models.decode_attention import decode_attention_fits

    q = torch.randn(1, 8, 1, 64, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 10, 64, dtype=torch.bfloat16)
    assert not decode_attention_fits(q, k, k, None)


@pytest.mark.gpu
def test_gpu_decode_attention_matches_the_maths(has_gpu):
    check_kernel("cuda")
    check_wrapper("cuda")
    check_cache_write("cuda")
    # Mixtral's shapes at batch 64: 32 query heads on 8 KV heads of 128, the static cache of 768 slots, prompts
    # of 512 tokens left-padded by up to 100, 40 tokens decoded
    g = torch.Generator().manual_seed(2)
    from phyassist.models.decode_attention import decode_attention

    B, H, Hkv, D, L = 64, 32, 8, 128, 768
    q = torch.randn(B, H, 1, D, generator=g).to("cuda", torch.bfloat16)
    k = torch.randn(B, Hkv, L, D, generator=g).to("cuda", torch.bfloat16)
    v = torch.randn(B, Hkv, L, D, generator=g).to("cuda", torch.bfloat16)
    pad = torch.randint(0, 100, (B,), generator=g)
    slots = torch.arange(L)
    mask = ((slots[None] >= pad[:, None]) & (slots[None] < 552)).view(B, 1, 1, L).to("cuda")
    _check_close(decode_attention(q, k, v, mask), _reference(q, k, v, mask), v, "Mixtral shapes")
    from phyassist.models.decode_attention import MAX_KEYS, MIN_PROGRAMS, decode_attention_fits

    with torch.no_grad():  # the fused path is for inference only
        assert decode_attention_fits(q, k, v, mask) and B * Hkv >= MIN_PROGRAMS
        assert not decode_attention_fits(q[:1], k[:1], v[:1], mask[:1])  # batch 1: 8 programs, SDPA's split keys
        long = MAX_KEYS + 1  # the mask row is one tile: longer caches stay on SDPA
        k_long = k[:, :, :1].expand(B, Hkv, long, D)
        assert not decode_attention_fits(q, k_long, k_long, mask[..., :1].expand(B, 1, 1, long).contiguous())
