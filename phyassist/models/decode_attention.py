"""Attention of one decode step over a static KV cache in one Triton kernel: the keys each sequence may attend, not
the whole cache, and each group of query heads that share a KV head over one read of its keys and values.

Why: in the captured decode step of the 4-bit Mixtral at batch 64 (512-token prompts), PyTorch's SDPA (cuDNN) took
79 us a layer plus a 7.5 us gap before it, 2.5 ms of a 34 ms step
(bench/generation_mixtral/profile_before_b64_s1.2.txt).
It reads the whole static cache, whose length :mod:`phyassist.models.generation` rounds up to 256 (768 slots for
576 tokens), masked; and transformers' SDPA wrapper reshapes the query for grouped heads around it. Here each program
takes one sequence and one KV head, finds from the sequence's mask row the span of keys it may attend (the cache
slots past the current token are never read), and runs the online softmax over that span in blocks, the group's query
heads as the rows of one tensor-core product.

The maths is SDPA's with a boolean mask (True: attend): ``softmax(q k^T * scaling) v`` per query head, keys the mask
hides left out, scores and softmax in fp32, the probabilities rounded to the value dtype before their product with the
values (as flash-attention kernels round them), one rounding of the output. A sequence whose mask hides every key gets
zeros, as SDPA's math path gives (its safe softmax); generation never asks it (each step attends its own token).

:func:`sdpa_decode_function` wraps transformers' SDPA attention function: one query token, a boolean mask of one row per
sequence (or none), 16-bit inputs, CUDA (or Triton's CPU interpreter), no dropout, softcap, attention sinks, position
bias or paged cache; everything else goes to the function it wraps. :func:`static_layer_update` wraps the static cache
layer's update the same way: one token's key and value written at the cache's length (read on the GPU) in one kernel.
:func:`phyassist.models.fused_decode.fused_decode` installs both while a decode step is captured (its part
``attention``).
"""

from __future__ import annotations

import math

import torch

from phyassist.models.mixtral4bit.kernels import _launch, use_triton
from phyassist.models.mixtral4bit.kernels import _triton as triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, L, qk_scale, sq_b, sq_h, sk_b, sk_h, sk_l,
                                 sv_b, sv_h, sv_l, sm_b, so_b, so_h, GROUP: tl.constexpr, G_POW2: tl.constexpr,
                                 D: tl.constexpr, BLOCK_L: tl.constexpr, L_POW2: tl.constexpr,
                                 HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr):
        """Sequence ``program_id(0)``, KV head ``program_id(1)``: the ``GROUP`` query heads that share it (rows of a
        ``G_POW2``-row tile, the rest zero), keys and values of the span from the first key the mask lets it attend
        to the last, ``BLOCK_L`` at a time. ``qk_scale`` is the score scale times log2(e) (``exp2`` below).
        ``DOT_F32`` (the CPU interpreter, whose ``tl.dot`` misreads 16-bit tiles) multiplies in fp32."""
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        if HAS_MASK:
            ls = tl.arange(0, L_POW2)
            row = tl.load(mask_ptr + b * sm_b + ls, mask=ls < L, other=0) != 0
            end = tl.max(tl.where(row, ls + 1, 0), axis=0)
            start = tl.min(tl.where(row, ls, L_POW2), axis=0) // BLOCK_L * BLOCK_L
        else:
            end = L
            start = 0
        g = tl.arange(0, G_POW2)
        gmask = g < GROUP
        heads = kvh * GROUP + g
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=gmask[:, None], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        m_i = tl.full((G_POW2,), -1.0e30, tl.float32)  # finite: a block the mask hides whole adds nothing
        l_i = tl.zeros((G_POW2,), tl.float32)
        acc = tl.zeros((G_POW2, D), tl.float32)
        for l0 in range(start, end, BLOCK_L):
            ks = l0 + tl.arange(0, BLOCK_L)
            kin = ks < end
            if HAS_MASK:
                kin = kin & (tl.load(mask_ptr + b * sm_b + ks, mask=kin, other=0) != 0)
            k = tl.load(k_ptr + b * sk_b + kvh * sk_h + ks[:, None] * sk_l + d[None, :], mask=kin[:, None], other=0.0)
            v = tl.load(v_ptr + b * sv_b + kvh * sv_h + ks[:, None] * sv_l + d[None, :], mask=kin[:, None], other=0.0)
            if DOT_F32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            s = tl.where(kin[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            p = p.to(v_ptr.dtype.element_ty)
            if DOT_F32:
                p, v = p.to(tl.float32), v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v)
            m_i = m_new
        out = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)  # no key attended: zeros, not 0 / 0
        tl.store(o_ptr + b * so_b + heads[:, None] * so_h + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=gmask[:, None])

    @triton.jit
    def _cache_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, len_ptr, L, sk_b, sk_h, sv_b, sv_h, skc_b, skc_h, skc_l,
                            svc_b, svc_h, svc_l, D: tl.constexpr):
        """Sequence ``program_id(0)``, KV head ``program_id(1)``: its new key and value into the cache at the
        cache's length, read on the GPU (a slot past the cache is not written)."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        at = tl.load(len_ptr).to(tl.int64)
        d = tl.arange(0, D)
        keep = (at + d * 0) < L
        k = tl.load(k_ptr + b * sk_b + h * sk_h + d)
        v = tl.load(v_ptr + b * sv_b + h * sv_h + d)
        tl.store(kc_ptr + b * skc_b + h * skc_h + at * skc_l + d, k, mask=keep)
        tl.store(vc_ptr + b * svc_b + h * svc_h + at * svc_l + d, v, mask=keep)

    # keys a step, warps, pipeline stages: chosen by measurement once per shape, during the warm-up before a capture
    _TILES = [(bl, w, st) for bl in (32, 64, 128) for w in (4, 8) for st in (2, 3)]
    _decode_attention_tuned = triton.autotune(
        [triton.Config({"BLOCK_L": bl}, num_warps=w, num_stages=st) for bl, w, st in _TILES],
        key=["L_POW2", "GROUP", "D", "HAS_MASK"], restore_value=[])(_decode_attention_kernel)  # L_POW2: tuned once
    # for the cache lengths up to a power of two, not again for each length generation rounds to (256 apart)

INTERPRETER_BLOCK_L = 64  # the interpreter's one tile (a cache of 150 slots spans three)
# Programs are (sequence, KV head) pairs and each walks its whole span: below this many a call leaves most of an H200's
# 132 SMs idle (batch 1 of Mixtral: 8 programs), where SDPA splits the keys; those calls stay on SDPA.
MIN_PROGRAMS = 128
# Each program reads its sequence's mask row as one tile to find its span: longer caches stay on SDPA.
MAX_KEYS = 16384


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float | None = None) -> torch.Tensor:
    """One query token's attention: ``query`` ``[B, H, 1, D]``, ``key`` / ``value`` ``[B, Hkv, L, D]`` (``H`` a multiple
    of ``Hkv``: grouped heads), ``mask`` ``[B or 1, 1, 1, L]`` boolean (True: attend) or None (every key); returns
    ``[B, 1, H, D]`` in the query's dtype (transformers' attention functions' layout)."""
    B, H, _, D = query.shape
    Hkv, L = key.shape[1], key.shape[2]
    group = H // Hkv
    out = torch.empty(B, 1, H, D, dtype=query.dtype, device=query.device)
    scale = (1.0 / math.sqrt(D) if scaling is None else float(scaling)) * math.log2(math.e)
    m = mask.view(torch.uint8) if mask is not None else query  # unread without a mask
    sm_b = m.stride(0) if mask is not None and mask.shape[0] > 1 else 0
    kernel, tile = ((_decode_attention_tuned, {}) if query.is_cuda
                    else (_decode_attention_kernel, {"BLOCK_L": INTERPRETER_BLOCK_L, "num_warps": 4}))
    _launch(kernel, (B, Hkv), query, query, key, value, m, out, L, scale, query.stride(0), query.stride(1),
            key.stride(0), key.stride(1), key.stride(2), value.stride(0), value.stride(1), value.stride(2), sm_b,
            out.stride(0), out.stride(2), GROUP=group, G_POW2=max(16, triton.next_power_of_2(group)), D=D,
            L_POW2=triton.next_power_of_2(L), HAS_MASK=mask is not None, DOT_F32=not query.is_cuda, **tile)
    return out


def cache_write(keys: torch.Tensor, values: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                length: torch.Tensor) -> None:
    """``keys[:, :, length] = key[:, :, 0]`` and the same for the values, then ``length += 1``: a static cache
    layer's update by one token in two kernels (transformers' takes seven: an arange, two adds, two index copies and
    their copies, 0.43 ms of a 34 ms step at batch 64, bench/generation_mixtral/profile_before_b64_s1.2.txt). The
    length is read on the GPU, so a full cache is not checked here: the write is dropped where transformers' update
    raises; generation sizes the cache for the prompt and every new token, so its steps never ask it."""
    B, H, L, D = keys.shape
    _launch(_cache_write_kernel, (B, H), key, key, value, keys, values, length, L, key.stride(0), key.stride(1),
            value.stride(0), value.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0),
            values.stride(1), values.stride(2), D=D, num_warps=1)
    length.add_(1)


def cache_write_fits(layer, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether :func:`cache_write` does what transformers' ``StaticLayer.update`` would: one new token of a
    batch as large as the cache's, its dtype, a power-of-two head size, the last dimension contiguous, the cache
    initialized on the token's device with its length a one-element tensor there, no autograd."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    length = getattr(layer, "cumulative_length", None)
    if (not getattr(layer, "is_initialized", False) or not isinstance(keys, torch.Tensor)
            or not isinstance(values, torch.Tensor) or not isinstance(length, torch.Tensor)):
        return False
    D = key.shape[-1] if key.dim() == 4 else 0
    return (key.dim() == 4 and key.shape[2] == 1 and use_triton(key) and not torch.is_grad_enabled()
            and key.shape == value.shape and keys.dim() == 4 and keys.shape == values.shape
            and key.shape[:2] == keys.shape[:2] and D == keys.shape[3] and D >= 16 and not D & (D - 1)
            and key.dtype == keys.dtype and value.dtype == values.dtype
            and key.device == keys.device == values.device == value.device == length.device and length.numel() == 1
            and key.stride(-1) == 1 and value.stride(-1) == 1 and keys.stride(-1) == 1 and values.stride(-1) == 1)


def static_layer_update(original):
    """transformers' ``StaticLayer.update`` ``original`` with a one-token update in :func:`cache_write` wherever
    :func:`cache_write_fits`."""

    def update(self, key_states, value_states, *args, **kwargs):
        if args or kwargs or not cache_write_fits(self, key_states, value_states):
            return original(self, key_states, value_states, *args, **kwargs)
        cache_write(self.keys, self.values, key_states, value_states, self.cumulative_length)
        return self.keys, self.values
    update.phyassist_wraps = original
    return update


def decode_attention_fits(query, key, value, mask, dropout=0.0, **kwargs) -> bool:
    """Whether :func:`decode_attention` computes what transformers' SDPA function would for these arguments: one
    query token, 16-bit inputs of one dtype on one device, on a GPU at least :data:`MIN_PROGRAMS` (sequence, KV head)
    pairs, at most :data:`MAX_KEYS` cache slots, grouped heads, a head size that is a power of two from 16 to 256, the
    last dimension contiguous, a boolean mask of one row per sequence (or shared, or none), no autograd, dropout,
    softcap, attention sinks, position bias, paged cache or attention weights asked for."""
    if (query.dim() != 4 or key.dim() != 4 or value.dim() != 4 or query.shape[2] != 1 or not use_triton(query)
            or torch.is_grad_enabled() or dropout):
        return False
    if any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "sinks", "position_bias", "cache")):
        return False
    if kwargs.get("output_attentions"):
        return False
    B, H, _, D = query.shape
    if (query.is_cuda and B * key.shape[1] < MIN_PROGRAMS) or key.shape[2] > MAX_KEYS:
        return False
    if (query.dtype not in (torch.bfloat16, torch.float16) or key.dtype != query.dtype or value.dtype != query.dtype
            or key.device != query.device or value.device != query.device or key.shape != value.shape
            or key.shape[0] != B or key.shape[3] != D or H % key.shape[1] or D < 16 or D > 256 or D & (D - 1)
            or query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1):
        return False
    if mask is None:
        return True
    return (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[0] in (1, B) and mask.shape[1] == 1
            and mask.shape[2] == 1 and mask.shape[3] == key.shape[2] and mask.stride(-1) == 1
            and mask.device == query.device)


def sdpa_decode_function(original):
    """transformers' SDPA attention function ``original`` with one query token's attention in
    :func:`decode_attention` wherever :func:`decode_attention_fits`."""

    def sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if not decode_attention_fits(query, key, value, attention_mask, dropout, **kwargs):
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        return decode_attention(query, key, value, attention_mask, scaling), None
    sdpa_attention_forward.phyassist_wraps = original
    return sdpa_attention_forward
