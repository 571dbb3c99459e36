"""Fused kernels for the captured decode step: RMSNorm, rotary embedding and LoRA products in one kernel each.

Why: a decode step of the 4-bit Mixtral at batch 1 is about 70 kernels a layer, and most of them are a few
microseconds of casts, powers, means, slices, concatenations and small GEMVs around the real work
(bench/generation_mixtral/profile_decode.txt: the routed experts took half of the step, hundreds of small kernels
most of the rest). In a replayed CUDA graph each kernel still costs its launch and its ramp; an RMSNorm is eight
of them, a rotary embedding ten, a LoRA product on a 4-bit projection seven besides the projection itself.

What: :func:`fused_decode` is a context manager that, while it is open, runs those three through one Triton
kernel each: the RMSNorm modules of the Llama family (Llama, Mistral, Mixtral, Qwen2: the same formula), the
family's ``apply_rotary_pos_emb``, and the forward of PEFT's LoRA layers (one plain adapter active: its two
products and the scaled add into the base layer's output in two kernels). :class:`~phyassist.models.generation
.StaticDecoder` opens it around the capture of a decode step, so the graph holds the fused kernels; the prefill,
CPUs, autograd and every case outside these (several adapters, DoRA, dropout, merged weights) run the modules'
own code. The maths is the modules': the RMSNorm and the rotary embedding round where they round (bit-equal up
to the order of a sum); the LoRA path sums its products in fp32 and rounds once (the modules round each product
to the adapter's dtype first: a difference within bf16's rounding).
"""

from __future__ import annotations

import contextlib
import sys

import torch

from phyassist.models.mixtral4bit.kernels import _launch, use_triton
from phyassist.models.mixtral4bit.kernels import _triton as triton

# RMSNorm classes whose forward is HF's ``weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)``
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm")
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
    def _lora_b_add_kernel(t_ptr, b_ptr, y_ptr, N, R, scale, R_POW2: tl.constexpr, BLOCK_N: tl.constexpr):
        """``y[row, n] += scale * t[row] @ B[n].T`` for a tile of ``n``, in fp32, rounded once to ``y``'s dtype."""
        row, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = ns < N
        rs = tl.arange(0, R_POW2)
        rmask = rs < R
        t = tl.load(t_ptr + row * R + rs, mask=rmask, other=0.0)
        bt = tl.load(b_ptr + ns[:, None] * R + rs[None, :], mask=nmask[:, None] & rmask[None, :], other=0.0)
        acc = tl.sum(bt.to(tl.float32) * t[None, :], axis=1)
        y = tl.load(y_ptr + row * N + ns, mask=nmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * N + ns, (y + scale * acc).to(y_ptr.dtype.element_ty), mask=nmask)


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


def lora_add_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``y += scale * (x @ a.T) @ b.T`` in place, two kernels (``a``: ``[r, K]``, ``b``: ``[N, r]``, ``y``
    contiguous ``[..., N]``)."""
    K, R, N = x.shape[-1], a.shape[0], y.shape[-1]
    xc = x.contiguous()
    rows = xc.numel() // K
    t = torch.empty(rows, R, dtype=torch.float32, device=x.device)
    # two ranks a program, all of K in one step up to 4,096: every load of a program in flight at once
    block_r = min(2, triton.next_power_of_2(R))
    _launch(_lora_a_kernel, (rows, triton.cdiv(R, block_r)), x, xc, a.contiguous(), t, K, R, BLOCK_R=block_r,
            BLOCK_K=min(4096, triton.next_power_of_2(K)), num_warps=4)
    _launch(_lora_b_add_kernel, (rows, triton.cdiv(N, 128)), x, t, b.contiguous(), y, N, R, float(scale),
            R_POW2=max(16, triton.next_power_of_2(R)), BLOCK_N=128, num_warps=4)
    return y


def _fusable(x: torch.Tensor) -> bool:
    return use_triton(x) and not torch.is_grad_enabled()


def _norm_forward(module):
    original = module.forward

    def forward(hidden_states):
        if not _fusable(hidden_states) or hidden_states.shape[-1] > 16384:
            return original(hidden_states)
        return rms_norm(hidden_states, module.weight, module.variance_epsilon)
    return forward


def _plain_adapter(module, x, args, kwargs):
    """The one active adapter of a PEFT LoRA layer if its forward is the plain ``y + s * B(A(x))`` (no dropout, or
    dropout in eval mode, where it passes its input through; no DoRA or other variant, no bias, not merged or
    disabled, no per-row adapter names), else None."""
    if args or kwargs or module.disable_adapters or module.merged or not _fusable(x):
        return None
    names = [a for a in module.active_adapters if a in module.lora_A]
    if len(names) != 1:
        return None
    name = names[0]
    a, b = module.lora_A[name], module.lora_B[name]
    drop = module.lora_dropout[name]
    no_dropout = isinstance(drop, torch.nn.Identity) or (isinstance(drop, torch.nn.Dropout)
                                                         and (not drop.training or drop.p == 0))
    if (name in getattr(module, "lora_variant", {}) or not no_dropout or not isinstance(a, torch.nn.Linear)
            or not isinstance(b, torch.nn.Linear) or b.bias is not None):
        return None
    return name


def _lora_forward(module):
    original = module.forward

    def forward(x, *args, **kwargs):
        name = _plain_adapter(module, x, args, kwargs)
        if name is None:
            return original(x, *args, **kwargs)
        y = module.base_layer(x)
        if not y.is_contiguous():
            y = y.contiguous()
        return lora_add_(y, x, module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name])
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


@contextlib.contextmanager
def fused_decode(model):
    """While open, ``model``'s Llama-family RMSNorms, rotary embedding and plain LoRA layers run the fused kernels
    (on CUDA without autograd; elsewhere their own code). Nothing is patched without Triton, nor modules carrying an
    accelerate hook (a model dispatched over devices: the hook moves their inputs; their children, reached after it
    moved them, are patched). A module's own ``forward`` attribute is what the fused forward falls back to and what
    it gets back on exit; nested use restores each level (contexts must close in the reverse order of opening, as
    ``with`` blocks in one thread do). The rotary function is patched in its modeling module, for
    the whole process while open (the fused version is the same maths, and runs only for CUDA tensors without
    autograd)."""
    if triton is None:
        yield model
        return
    patched, originals = [], {}
    lora = _lora_linear_classes()
    try:
        for m in model.modules():
            fused = (_norm_forward(m) if type(m).__name__ in RMS_NORMS and hasattr(m, "variance_epsilon")
                     else _lora_forward(m) if isinstance(m, lora) and isinstance(m.get_base_layer(), torch.nn.Linear)
                     else None)
            if fused is not None and not hasattr(m, "_hf_hook"):  # accelerate moves such a module's inputs
                patched.append((m, m.__dict__.get("forward")))  # the instance's own forward, if it had one
                m.forward = fused
            name = type(m).__module__
            if name in ROTARY_MODULES and name in sys.modules and sys.modules[name] not in originals:
                mod = sys.modules[name]
                originals[mod] = mod.apply_rotary_pos_emb
                mod.apply_rotary_pos_emb = _rotary_function(originals[mod])
        yield model
    finally:
        for mod, fn in originals.items():
            mod.apply_rotary_pos_emb = fn
        for m, own in reversed(patched):
            if own is None:
                m.__dict__.pop("forward", None)  # the class's forward again
            else:
                m.forward = own
