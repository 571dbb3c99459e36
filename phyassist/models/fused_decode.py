"""Fused kernels for the captured decode step: RMSNorm, rotary embedding, LoRA products, the router, and the
attention projections' 4-bit GEMV, one or two kernels each.

Why: a decode step of the 4-bit Mixtral at batch 1 is about 70 kernels a layer, and most of them are a few
microseconds of casts, powers, means, slices, concatenations and small GEMVs around the real work
(bench/generation_mixtral/profile_decode.txt: the routed experts took half of the step, hundreds of small kernels
most of the rest). In a replayed CUDA graph each kernel still costs its launch and its ramp; an RMSNorm is eight
of them, a rotary embedding ten, a LoRA product on a 4-bit projection seven besides the projection itself, the router
with its adapter about ten (PEFT rebuilds the adapted weight every call, then softmax, top-k, renormalization). And
bitsandbytes' 4-bit GEMV read the attention projections at about 0.59 TB/s there (dequantizing the whole weight
above batch 1).

What: :func:`fused_decode` is a context manager that, while it is open, runs these through Triton kernels: the
RMSNorm modules of the Llama family (Llama, Mistral, Mixtral, Qwen2: the same formula), the family's
``apply_rotary_pos_emb``, the forward of PEFT's LoRA layers (one plain adapter active: its two products and the scaled
add into the base layer's output in two kernels), Mixtral's router (logits, softmax, top-k and renormalization in one
kernel; with PEFT's adapter on its weight, one more kernel builds the adapted weight) and bitsandbytes' NF4
``Linear4bit`` (the routed expert kernel of :mod:`phyassist.models.mixtral4bit.decode` with one expert; under a LoRA
layer its split-K partial sums are added in the adapter's second kernel), and one query token's attention over the
static cache with the cache's update (:mod:`phyassist.models.decode_attention`). :class:`~phyassist.models.generation
.StaticDecoder` opens it around the capture of a decode step, so the graph holds the fused kernels; the prefill,
CPUs, autograd and every case outside these (several adapters, DoRA, dropout in training mode, merged weights, a
bias) run the modules' own code. The maths is the modules': the RMSNorm and the rotary embedding round where they round
(bit-equal up to the order of a sum); the LoRA path sums its products in fp32 and rounds once (the modules round each
product to the adapter's dtype first: a difference within bf16's rounding); the 4-bit GEMV scales each quant block's
dot product instead of rounding each weight (within bf16's rounding, :func:`~phyassist.models.mixtral4bit.decode
.nf4_moe_matmul`); the router rounds its logits and the adapted weight as ``F.linear`` and PEFT do (PEFT with fp32
adapters), so its choice of experts differs only where two are within a rounding of each other. A router whose class
forward was replaced is left alone, unless that forward declares Mixtral's maths plus a ``logit_bias`` (the
benchmarks' skewed router), which the kernel then adds.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import torch

from phyassist.models.mixtral4bit.decode import DENSE_MIN_ROWS, nf4_linear_partials
from phyassist.models.mixtral4bit.kernels import _launch, sum_partials, use_triton
from phyassist.models.mixtral4bit.kernels import _triton as triton

# RMSNorm classes whose forward is HF's ``weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)``
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm")
# routers whose forward is Mixtral's: logits = x @ W.T, softmax in fp32, top-k, the k probabilities renormalized
ROUTERS = ("MixtralTopKRouter",)
# what fused_decode can patch (its ``parts``): the norms, the rotary embedding, the LoRA products, the router, the
# 4-bit linear layers' GEMV, one query token's attention and static cache update (phyassist.models.decode_attention)
FUSED_PARTS = ("norm", "rotary", "lora", "router", "nf4", "attention")
# modeling modules whose apply_rotary_pos_emb is HF's ``q * cos + rotate_half(q) * sin`` (cos, sin unsqueezed at 1)
ROTARY_MODULES = tuple(f"transformers.models.{m}.modeling_{m}" for m in ("llama", "mistral", "mixtral", "qwen2"))

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, eps, BLOCK: tl.constexpr):
        """One row: the fp32 mean of squares, the normalized row rounded to the input dtype, times the weight,
        rounded to the output dtype (the two roundings of HF's forward)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        h = (x * inv).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * D + cols, (w * h).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, S, HQ, sq_b, sq_h, sq_s, sk_b, sk_h, sk_s,
                       sc_b, sc_s, D: tl.constexpr):
        """One head vector of ``q`` (heads ``[0, HQ)``) or ``k`` (the rest) at one (batch, position):
        ``round(round(x * cos) + round(rotate_half(x) * sin))``, as three bf16 ops would round; the outputs have the
        inputs' strides."""
        bs, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
        b, s = bs // S, bs % S
        i = tl.arange(0, D)
        partner = tl.where(i < D // 2, i + D // 2, i - D // 2)
        sign = tl.where(i < D // 2, -1.0, 1.0)
        c = tl.load(cos_ptr + b * sc_b + s * sc_s + i).to(tl.float32)
        sn = tl.load(sin_ptr + b * sc_b + s * sc_s + i).to(tl.float32)
        if head < HQ:
            off = b * sq_b + head.to(tl.int64) * sq_h + s * sq_s
            src, dst = q_ptr + off, qo_ptr + off
        else:
            off = b * sk_b + (head - HQ).to(tl.int64) * sk_h + s * sk_s
            src, dst = k_ptr + off, ko_ptr + off
        x = tl.load(src + i).to(tl.float32)
        xr = tl.load(src + partner).to(tl.float32) * sign
        out_t = dst.dtype.element_ty
        y = (x * c).to(out_t).to(tl.float32) + (xr * sn).to(out_t).to(tl.float32)
        tl.store(dst + i, y.to(out_t))

    @triton.jit
    def _lora_a_kernel(x_ptr, a_ptr, t_ptr, K, R, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """``t[row, r0:r0 + BLOCK_R] = x[row] @ A[r0:r0 + BLOCK_R].T`` in fp32 (the input rounded to A's dtype
        first, as PEFT casts it)."""
        row, pid_r = tl.program_id(0).to(tl.int64), tl.program_id(1)
        rs = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rs < R
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            x = tl.load(x_ptr + row * K + ks, mask=kmask, other=0.0).to(a_ptr.dtype.element_ty).to(tl.float32)
            a = tl.load(a_ptr + rs[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            acc += a.to(tl.float32) * x[None, :]
        tl.store(t_ptr + row * R + rs, tl.sum(acc, axis=1), mask=rmask)

    @triton.jit
    def _lora_b_add_kernel(t_ptr, b_ptr, y_ptr, base_ptr, N, R, ROWS, scale, SPLITS: tl.constexpr,
                           R_POW2: tl.constexpr, BLOCK_N: tl.constexpr):
        """``y[row, n] = base + scale * t[row] @ B[n].T`` for a tile of ``n``, in fp32, rounded once to ``y``'s dtype.
        ``SPLITS`` 0: the base is ``y`` itself (in place); else the sum of the base layer's ``SPLITS`` split-K partial
        sums ``base[s, row, n]``, rounded to ``y``'s dtype first, as the base layer rounds its output."""
        row, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = ns < N
        rs = tl.arange(0, R_POW2)
        rmask = rs < R
        t = tl.load(t_ptr + row * R + rs, mask=rmask, other=0.0)
        bt = tl.load(b_ptr + ns[:, None] * R + rs[None, :], mask=nmask[:, None] & rmask[None, :], other=0.0)
        acc = tl.sum(bt.to(tl.float32) * t[None, :], axis=1)
        if SPLITS == 0:
            y = tl.load(y_ptr + row * N + ns, mask=nmask, other=0.0).to(tl.float32)
        else:
            y = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for s in tl.static_range(SPLITS):
                y += tl.load(base_ptr + (s * ROWS + row) * N + ns, mask=nmask, other=0.0).to(tl.float32)
            y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + row * N + ns, (y + scale * acc).to(y_ptr.dtype.element_ty), mask=nmask)

    @triton.jit
    def _router_weight_kernel(w_ptr, a_ptr, b_ptr, out_ptr, K, R, scale, E: tl.constexpr, R_POW2: tl.constexpr,
                              BLOCK_K: tl.constexpr):
        """``out[e, k] = W[e, k] + round(scale * B[e] @ A[:, k])`` for a tile of ``k``: PEFT's parameter wrapper's
        ``W + (B @ A * scale).to(W.dtype)`` (products in fp32; the delta rounded to ``W``'s dtype, then the sum)."""
        ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = ks < K
        rs = tl.arange(0, R_POW2)
        rmask = rs < R
        a = tl.load(a_ptr + rs[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        a = a.to(tl.float32)
        for e in tl.static_range(E):
            b = tl.load(b_ptr + e * R + rs, mask=rmask, other=0.0).to(tl.float32)
            delta = (tl.sum(b[:, None] * a, axis=0) * scale).to(out_ptr.dtype.element_ty).to(tl.float32)
            w = tl.load(w_ptr + e * K + ks, mask=kmask, other=0.0).to(tl.float32)
            tl.store(out_ptr + e * K + ks, (w + delta).to(out_ptr.dtype.element_ty), mask=kmask)

    @triton.jit
    def _router_top_k_kernel(x_ptr, w_ptr, bias_ptr, logit_ptr, value_ptr, index_ptr, K, E: tl.constexpr,
                             E_POW2: tl.constexpr, TOP_K: tl.constexpr, K_POW2: tl.constexpr, BIAS: tl.constexpr,
                             BLOCK_K: tl.constexpr):
        """One token: the router's logits ``x @ W.T`` (fp32 sums rounded to ``x``'s dtype, as ``F.linear``; with
        ``BIAS`` plus the per-expert bias rounded to that dtype, the sum rounded again), their softmax in fp32, the
        ``TOP_K`` largest (the lower expert first on a tie; a row of NaNs picks experts in order, never one past
        ``E``) divided by their sum."""
        row = tl.program_id(0).to(tl.int64)
        es = tl.arange(0, E_POW2)
        emask = es < E
        acc = tl.zeros((E_POW2, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            x = tl.load(x_ptr + row * K + ks, mask=kmask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + es[:, None] * K + ks[None, :], mask=emask[:, None] & kmask[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
        logits = tl.sum(acc, axis=1).to(logit_ptr.dtype.element_ty)
        if BIAS:
            b = tl.load(bias_ptr + es, mask=emask, other=0.0).to(logit_ptr.dtype.element_ty)
            logits = (logits.to(tl.float32) + b.to(tl.float32)).to(logit_ptr.dtype.element_ty)
        tl.store(logit_ptr + row * E + es, logits, mask=emask)
        z = tl.where(emask, logits.to(tl.float32), float("-inf"))
        p = tl.exp(z - tl.max(z, axis=0))
        p = p / tl.sum(p, axis=0)
        taken = es >= E  # experts chosen so far (and the padding past E)
        left = tl.where(taken, -1.0, p)
        slots = tl.arange(0, K_POW2)
        top = tl.zeros((K_POW2,), dtype=tl.float32)
        idx = tl.zeros((K_POW2,), dtype=tl.int64)
        for j in tl.static_range(TOP_K):
            best = tl.max(left, axis=0)
            pick = tl.min(tl.where((left == best) & ~taken, es, E_POW2), axis=0)
            # NaN probabilities match nothing: the first expert not yet taken, never one past E
            pick = tl.where(pick < E, pick, tl.min(tl.where(taken, E_POW2, es), axis=0))
            top = tl.where(slots == j, tl.sum(tl.where(es == pick, p, 0.0), axis=0), top)
            idx = tl.where(slots == j, pick.to(tl.int64), idx)
            taken = taken | (es == pick)
            left = tl.where(taken, -1.0, left)
        smask = slots < TOP_K
        top = top / tl.sum(tl.where(smask, top, 0.0), axis=0)
        tl.store(value_ptr + row * TOP_K + slots, top, mask=smask)
        tl.store(index_ptr + row * TOP_K + slots, idx, mask=smask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's Llama-family RMSNorm of ``x`` over its last dimension in one kernel."""
    d = x.shape[-1]
    xc = x.contiguous()
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _launch(_rms_norm_kernel, (xc.numel() // d,), x, xc, weight.contiguous(), y, d, float(eps),
            BLOCK=triton.next_power_of_2(d), num_warps=4 if d <= 4096 else 8)
    return y


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """HF's ``apply_rotary_pos_emb(q, k, cos, sin)`` (``q``, ``k``: ``[batch, heads, seq, head_dim]`` of any
    strides, the last one 1; ``cos``, ``sin``: ``[batch, seq, head_dim]``) in one kernel."""
    b, hq, s, d = q.shape
    hk = k.shape[1]
    cos, sin = cos.expand(b, s, d).contiguous(), sin.expand(b, s, d).contiguous()
    qo = torch.empty_like(q, dtype=torch.promote_types(q.dtype, cos.dtype))
    ko = torch.empty_like(k, dtype=torch.promote_types(k.dtype, cos.dtype))
    if qo.stride() != q.stride() or ko.stride() != k.stride():  # one set of strides per tensor in the kernel
        q, k = q.contiguous(), k.contiguous()
        qo, ko = torch.empty_like(q, dtype=qo.dtype), torch.empty_like(k, dtype=ko.dtype)
    _launch(_rotary_kernel, (b * s, hq + hk), q, q, k, cos, sin, qo, ko, s, hq, q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2), cos.stride(0), cos.stride(1), D=d, num_warps=1)
    return qo, ko


def _lora_a(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``x @ a.T`` in fp32, ``[rows, r]`` (two ranks a program, all of K in one step up to 4,096: every load of a
    program in flight at once)."""
    K, R = x.shape[-1], a.shape[0]
    xc = x.contiguous()
    rows = xc.numel() // K
    t = torch.empty(rows, R, dtype=torch.float32, device=x.device)
    block_r = min(2, triton.next_power_of_2(R))
    _launch(_lora_a_kernel, (rows, triton.cdiv(R, block_r)), x, xc, a.contiguous(), t, K, R, BLOCK_R=block_r,
            BLOCK_K=min(4096, triton.next_power_of_2(K)), num_warps=4)
    return t


def _lora_b_add(t, b, y, base, scale, splits):
    rows, R = t.shape
    N = y.shape[-1]
    _launch(_lora_b_add_kernel, (rows, triton.cdiv(N, 128)), y, t, b.contiguous(), y, base, N, R, rows, float(scale),
            SPLITS=splits, R_POW2=max(16, triton.next_power_of_2(R)), BLOCK_N=128, num_warps=4)
    return y


def lora_add_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``y += scale * (x @ a.T) @ b.T`` in place, two kernels (``a``: ``[r, K]``, ``b``: ``[N, r]``, ``y``
    contiguous ``[..., N]``)."""
    return _lora_b_add(_lora_a(x, a), b, y, y, scale, 0)


def lora_add_partials(partial: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
                      dtype: torch.dtype) -> torch.Tensor:
    """``round(sum(partial)) + scale * (x @ a.T) @ b.T`` in ``dtype``, ``[..., N]`` as ``x`` is ``[..., K]``: a 4-bit
    base layer's split-K partial sums (:func:`phyassist.models.mixtral4bit.decode.nf4_linear_partials`,
    ``[splits, rows, N]``) added, rounded as the base layer rounds its output, and its adapter's product added, in
    the adapter's second kernel: no pass of its own over the partials."""
    n = partial.shape[-1]
    y = torch.empty(*x.shape[:-1], n, dtype=dtype, device=x.device)
    return _lora_b_add(_lora_a(x, a), b, y, partial.contiguous(), scale, partial.shape[0])


def router_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """PEFT's parameter wrapper's adapted router weight ``W + (B @ A * scale).to(W.dtype)`` in one kernel (``w``:
    ``[E, K]``, ``a``: ``[r, K]``, ``b``: ``[E, r]``); computed every step, as PEFT does, so a captured graph sees an
    adapter whose weights change in place. Rounded as PEFT rounds fp32 adapters (the study's); with 16-bit adapters
    PEFT also rounds ``B @ A`` before scaling, which this kernel does not (a rounding step apart)."""
    E, K = w.shape
    R = a.shape[0]
    out = torch.empty_like(w)
    _launch(_router_weight_kernel, (triton.cdiv(K, 256),), w, w.contiguous(), a.contiguous(), b.contiguous(), out, K,
            R, float(scale), E=E, R_POW2=max(16, triton.next_power_of_2(R)), BLOCK_K=256, num_warps=4)
    return out


def router_top_k(x: torch.Tensor, w: torch.Tensor, top_k: int, bias: torch.Tensor | None = None):
    """Mixtral's router (``MixtralTopKRouter.forward``) in one kernel: ``(logits, weights, experts)``, the logits in
    ``x``'s dtype, the top-``k`` softmax probabilities renormalized (fp32) and their experts (int64). ``bias``: a
    per-expert logit bias added as ``logits + bias.to(logits.dtype)`` (a router's ``logit_bias``, see
    :func:`_router_maths`)."""
    E, K = w.shape
    xc = x.reshape(-1, K).contiguous()
    rows = xc.shape[0]
    logits = torch.empty(rows, E, dtype=x.dtype, device=x.device)
    values = torch.empty(rows, top_k, dtype=torch.float32, device=x.device)
    index = torch.empty(rows, top_k, dtype=torch.int64, device=x.device)
    if rows:
        _launch(_router_top_k_kernel, (rows,), x, xc, w.contiguous(), w if bias is None else bias.contiguous(),
                logits, values, index, K, E=E, E_POW2=max(2, triton.next_power_of_2(E)), TOP_K=top_k,
                K_POW2=max(2, triton.next_power_of_2(top_k)), BIAS=bias is not None,
                BLOCK_K=min(1024, triton.next_power_of_2(K)), num_warps=8)
    return logits, values, index


def _fusable(x: torch.Tensor) -> bool:
    return use_triton(x) and not torch.is_grad_enabled()


def _norm_forward(module):
    original = module.forward

    def forward(hidden_states):
        if not _fusable(hidden_states) or hidden_states.shape[-1] > 16384:
            return original(hidden_states)
        return rms_norm(hidden_states, module.weight, module.variance_epsilon)
    return forward


def _one_adapter(module, x, args, kwargs):
    """The name of a PEFT LoRA layer's one active adapter where the fused path may run: no extra arguments (such as
    per-row adapter names), not disabled or merged, a fusable input, exactly one active adapter; else None."""
    if args or kwargs or module.disable_adapters or module.merged or not _fusable(x):
        return None
    names = [a for a in module.active_adapters if a in module.lora_A]
    return names[0] if len(names) == 1 else None


def _plain_adapter(module, x, args, kwargs):
    """The one active adapter of a PEFT LoRA layer if its forward is the plain ``y + s * B(A(x))`` (no dropout, or
    dropout in eval mode, where it passes its input through; no DoRA or other variant, no bias, not merged or
    disabled, no per-row adapter names), else None."""
    name = _one_adapter(module, x, args, kwargs)
    if name is None:
        return None
    a, b = module.lora_A[name], module.lora_B[name]
    drop = module.lora_dropout[name]
    no_dropout = isinstance(drop, torch.nn.Identity) or (isinstance(drop, torch.nn.Dropout)
                                                         and (not drop.training or drop.p == 0))
    if (name in getattr(module, "lora_variant", {}) or not no_dropout or not isinstance(a, torch.nn.Linear)
            or not isinstance(b, torch.nn.Linear) or b.bias is not None):
        return None
    return name


def _nf4_ready(base, x: torch.Tensor) -> bool:
    """Whether the dense NF4 kernel can stand in for bitsandbytes' ``Linear4bit`` ``base`` on ``x``: at least
    :data:`~phyassist.models.mixtral4bit.decode.DENSE_MIN_ROWS` rows (at one, bitsandbytes' GEMV is faster), NF4 in
    blocks of 64 in the layout bitsandbytes' GPU path reads (not repacked for CPUs), no bias, ``x`` already in the
    layer's 16-bit compute dtype (the layer's own cast would be a no-op) on the weight's device, its scales there too,
    no hooks on the layer (under a LoRA layer the kernel reads the base layer's weight without calling it)."""
    w = getattr(base, "weight", None)
    state = getattr(w, "quant_state", None)
    return (state is not None and base.bias is None and state.quant_type == "nf4" and state.blocksize == 64
            and x.numel() >= DENSE_MIN_ROWS * x.shape[-1]
            and not getattr(state, "packing_format_for_cpu", False) and w.dtype == torch.uint8
            and x.dtype in (torch.bfloat16, torch.float16) and getattr(base, "compute_dtype", None) == x.dtype
            and len(state.shape) == 2 and state.shape[1] % 64 == 0 and x.shape[-1] == state.shape[1]
            and x.device == w.device and state.absmax.device == w.device  # nothing to move while a graph captures
            and not (base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook")))


def _nf4_forward(module):
    original = module.forward

    def forward(x, *args, **kwargs):
        if args or kwargs or not _fusable(x) or not _nf4_ready(module, x):
            return original(x, *args, **kwargs)
        partial = nf4_linear_partials(x, module.weight.data, module.weight.quant_state)
        return sum_partials(partial, x.dtype).view(*x.shape[:-1], partial.shape[-1])
    return forward


def _lora_forward(module, nf4_class):
    original = module.forward

    def forward(x, *args, **kwargs):
        name = _plain_adapter(module, x, args, kwargs)
        if name is None:
            return original(x, *args, **kwargs)
        a, b, scale = module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]
        base = module.get_base_layer()
        if nf4_class is not None and isinstance(base, nf4_class) and _nf4_ready(base, x):
            partial = nf4_linear_partials(x, base.weight.data, base.weight.quant_state)
            return lora_add_partials(partial, x, a, b, scale, x.dtype)
        y = module.base_layer(x)
        if not y.is_contiguous():
            y = y.contiguous()
        return lora_add_(y, x, a, b, scale)
    return forward


def _router_maths(router) -> bool:
    """Whether ``router``'s forward is Mixtral's (transformers' ``MixtralTopKRouter.forward``), or one that declares
    itself that maths plus the router's per-expert ``logit_bias`` (``_phyassist_logit_bias``: the benchmarks'
    skewed router, bench/router_skew.py): a forward patched otherwise is not replaced."""
    fn = getattr(type(router), "forward", None)
    if fn is None or hasattr(fn, "__wrapped__"):  # a wrapper copies the name (and marker) of what it wraps
        return False
    if getattr(fn, "_phyassist_logit_bias", False):
        return True
    code = getattr(fn, "__code__", None)
    return (type(router).__name__ in ROUTERS and getattr(fn, "__qualname__", "") == "MixtralTopKRouter.forward"
            and code is not None and code.co_filename.endswith("modeling_mixtral.py") and hasattr(router, "top_k")
            and getattr(router, "weight", None) is not None)


def _router_bias(router):
    """The per-expert logit bias a router's declared forward adds (:func:`_router_maths`), else None."""
    declared = getattr(type(router).forward, "_phyassist_logit_bias", False)
    return getattr(router, "logit_bias", None) if declared else None


def _bias_fits(bias, w: torch.Tensor) -> bool:
    """A logit bias the kernel can add: none, or one value per expert on the weight's device."""
    return bias is None or (isinstance(bias, torch.Tensor) and bias.numel() == w.shape[0] and bias.device == w.device)


def _router_forward(module):
    original = module.forward

    def forward(hidden_states, *args, **kwargs):
        w = module.weight  # under PEFT's parameter wrapper: the adapted weight, as the original forward reads it
        bias = _router_bias(module)
        if (args or kwargs or not _fusable(hidden_states) or hidden_states.dtype != w.dtype
                or not _bias_fits(bias, w)):
            return original(hidden_states, *args, **kwargs)
        return router_top_k(hidden_states, w, module.top_k, bias)
    return forward


def _router_adapter(module, x, args, kwargs):
    """The one active adapter of PEFT's parameter wrapper around a router if its adapted weight is the plain
    ``W + B @ A * s`` (not merged or disabled, no variant, a 2-D weight), else None."""
    name = _one_adapter(module, x, args, kwargs)
    if name is None or module.parameter_name != "weight" or getattr(module, "fan_in_fan_out", False):
        return None
    a, b = module.lora_A[name], module.lora_B[name]
    w = module.get_base_layer().weight
    if (name in getattr(module, "lora_variant", {}) or getattr(module, "num_experts", 1) != 1 or w.dim() != 2
            or not isinstance(a, torch.nn.Linear) or not isinstance(b, torch.nn.Linear) or b.bias is not None
            or a.weight.shape[1] != w.shape[1] or b.weight.shape[0] != w.shape[0] or x.dtype != w.dtype):
        return None
    return name


def _router_lora_forward(module):
    original = module.forward

    def forward(x, *args, **kwargs):
        name = _router_adapter(module, x, args, kwargs)
        if name is None:
            return original(x, *args, **kwargs)
        router = module.get_base_layer()
        bias = _router_bias(router)
        if not _bias_fits(bias, router.weight):
            return original(x, *args, **kwargs)
        w = router_weight(router.weight, module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name])
        return router_top_k(x, w, router.top_k, bias)
    return forward


def _rotary_function(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if (args or kwargs or not _fusable(q) or q.dim() != 4 or cos.dim() != 3 or q.stride(-1) != 1
                or k.stride(-1) != 1 or q.shape[-1] & (q.shape[-1] - 1)):
            return original(q, k, cos, sin, *args, **kwargs)
        return apply_rotary(q, k, cos, sin)
    return apply_rotary_pos_emb


def _lora_linear_classes() -> tuple:
    """PEFT's LoRA layers over a linear layer (plain, and bitsandbytes 4-bit where PEFT has it), whose forward is
    ``base(x) + s * B(A(x))``; not the parameter wrappers (the router's adapter), whose base returns the router's
    tuple."""
    from peft.tuners.lora.layer import Linear

    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # PEFT without bitsandbytes
        return (Linear,)
    return Linear, Linear4bit


def _nf4_linear_class():
    """bitsandbytes' ``Linear4bit``, or None without bitsandbytes."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return None
    return Linear4bit


def _fused_forward(m, parts, lora, wrapper, nf4):
    """The fused forward for module ``m`` among ``parts``, or None where none applies."""
    name = type(m).__name__
    nf4 = nf4 if "nf4" in parts else None
    if name in RMS_NORMS and hasattr(m, "variance_epsilon"):
        return _norm_forward(m) if "norm" in parts else None
    if isinstance(m, lora) and isinstance(m.get_base_layer(), torch.nn.Linear):
        return _lora_forward(m, nf4) if "lora" in parts else None
    if isinstance(m, wrapper) and _router_maths(m.get_base_layer()):
        return _router_lora_forward(m) if "router" in parts else None
    if _router_maths(m):
        return _router_forward(m) if "router" in parts else None
    if nf4 is not None and isinstance(m, nf4):
        return _nf4_forward(m)
    return None


def fused_parts(setting) -> tuple:
    """The parts a setting names (``model.phyassist_fused_decode``, which the benchmark sets): True all of
    :data:`FUSED_PARTS`, False none, else an iterable of their names (checked), in :data:`FUSED_PARTS`' order."""
    if setting is True or setting is False:
        return FUSED_PARTS if setting else ()
    if isinstance(setting, str) or not hasattr(setting, "__iter__"):
        raise ValueError(f"fused decode parts {setting!r}: True, False or a list of {', '.join(FUSED_PARTS)}")
    names = set(setting)
    unknown = names - set(FUSED_PARTS)
    if unknown:
        raise ValueError(f"fused decode parts {sorted(unknown)}: each is one of {', '.join(FUSED_PARTS)}")
    return tuple(p for p in FUSED_PARTS if p in names)


def _patch_attention():
    """Install :mod:`phyassist.models.decode_attention`'s wrappers around transformers' SDPA attention function (this
    process's attention-function table's own entry, which overrides the library-wide one) and the static cache layer's
    update; returns what puts both back."""
    from transformers.cache_utils import StaticLayer
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from phyassist.models.decode_attention import sdpa_decode_function, static_layer_update

    table = ALL_ATTENTION_FUNCTIONS._local_mapping
    had, own = "sdpa" in table, table.get("sdpa")
    update = StaticLayer.__dict__["update"]
    attention, cache_update = sdpa_decode_function(ALL_ATTENTION_FUNCTIONS["sdpa"]), static_layer_update(update)
    ALL_ATTENTION_FUNCTIONS["sdpa"], StaticLayer.update = attention, cache_update  # both wrappers built: nothing fails

    def undo():
        StaticLayer.update = update
        if had:
            table["sdpa"] = own
        else:
            table.pop("sdpa", None)
    return undo


# Held while a fused_decode context is open: the process-wide patches (attention, cache update, rotary) are undone by
# the context that made them, so contexts in several threads take turns rather than interleave (the app captures a
# graph under its own lock; a benchmark or a second model in another thread waits for the capture, a few seconds).
_PATCHING = threading.RLock()


@contextlib.contextmanager
def fused_decode(model, parts=FUSED_PARTS):
    """While open, ``model``'s Llama-family RMSNorms, rotary embedding, plain LoRA layers, Mixtral routers (with or
    without PEFT's adapter on their weight) and bitsandbytes NF4 linear layers run the fused kernels (on CUDA without
    autograd; elsewhere their own code), and so do one query token's SDPA attention and static cache update (for the
    whole process while open, as the rotary function: :mod:`phyassist.models.decode_attention`); ``parts``
    (:data:`FUSED_PARTS`, or True / False) limits it to some of them. Nothing is patched without Triton, nor modules
    carrying an accelerate hook (a model dispatched over devices: the hook moves their inputs; their children, reached
    after it moved them, are patched). A module's own ``forward`` attribute is what the fused forward falls back to
    and what it gets back on exit; nested use restores each level (contexts in one thread close in the reverse order
    of opening, as ``with`` blocks do; a context in another thread waits for them to close). The rotary function is
    patched in its modeling module, for the whole process while open (the fused version is the same maths, and runs
    only for CUDA tensors without autograd)."""
    if triton is None:
        yield model
        return
    from peft.tuners.lora.layer import ParamWrapper

    parts = fused_parts(parts)
    patched, originals = [], {}
    lora, nf4 = _lora_linear_classes(), _nf4_linear_class()
    undo = lambda: None  # noqa: E731  (what the finally runs if patching fails half-way)
    _PATCHING.acquire()
    try:
        if "attention" in parts:
            undo = _patch_attention()
        for m in model.modules():
            fused = _fused_forward(m, parts, lora, ParamWrapper, nf4)
            if fused is not None and not hasattr(m, "_hf_hook"):  # accelerate moves such a module's inputs
                patched.append((m, m.__dict__.get("forward")))  # the instance's own forward, if it had one
                m.forward = fused
            name = type(m).__module__
            if ("rotary" in parts and name in ROTARY_MODULES and name in sys.modules
                    and sys.modules[name] not in originals):
                mod = sys.modules[name]
                originals[mod] = mod.apply_rotary_pos_emb
                mod.apply_rotary_pos_emb = _rotary_function(originals[mod])
        yield model
    finally:
        try:
            undo()
            for mod, fn in originals.items():
                mod.apply_rotary_pos_emb = fn
            for m, own in reversed(patched):
                if own is None:
                    m.__dict__.pop("forward", None)  # the class's forward again
                else:
                    m.forward = own
        finally:
            _PATCHING.release()
