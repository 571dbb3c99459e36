"""Triton kernels of the 4-bit expert MLP: fused SwiGLU and NF4 dequantization.

**SwiGLU**: one pass over the gate/up activations each way.

The expert MLP of Mixtral is ``a = silu(gate) * up`` on a ``[tokens x 2, 2 x 14336]`` tensor,
scaled by the token's routing weight. Written as torch ops that is five elementwise passes
forward and about ten backward over the whole tensor (470 MB per layer at 4 x 1024 tokens), and
it profiled as the largest item after the GEMMs (bench/finetune_mixtral.md). These Triton kernels read the activations once and
write the result once; the backward also reduces the routing-weight gradient
(``sum(grad_a * a)`` per row) and writes the gate/up gradient over the input buffer, so it
needs no second 470 MB tensor.

Without Triton (CPU, tests) the same maths runs as torch ops in row chunks.

**NF4 dequantization** (:func:`dequantize_nf4`): the expert weights are dequantized four times a
training step (2.8 GB of bf16 per layer and pass); bitsandbytes' kernel, plus its separate pass
over the double-quantized block scales, profiled well under the GPU's memory bandwidth
(bench/finetune_mixtral.md has both kernels' rates). This kernel reads the nested scales inline and writes
the same bits (tests compare it with bitsandbytes); elsewhere bitsandbytes' own dequantization runs.

**Gather-sum** (:func:`gather_sum`): each token's ``k`` expert outputs back in token order and
summed, forward and (for the input gradient) backward. As ``index_select`` + ``sum`` that wrote
and reread a ``[tokens x k, hidden]`` copy and ran a slow size-2 reduction, 64 calls a step
(timed in bench/finetune_mixtral.md); one kernel reads each row once and writes the sum.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:  # Triton ships with CUDA builds of torch; CPU builds have none.
    import triton as _triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    _triton = None

_BLOCK = 1024
_DQ_BYTES = 2048  # packed bytes (4,096 weights) per program of the NF4 kernel
_DQ_WARPS = 4
_ROWS = 4096  # row chunk of the torch fallback (bounds its fp32 temporaries)


def _launch(kernel, grid, like: torch.Tensor, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` under ``like``'s device: Triton launches on the current CUDA
    device, and a model split over GPUs (the study's layer split) calls these kernels with
    tensors on another one."""
    with torch.cuda.device(like.device) if like.is_cuda else contextlib.nullcontext():
        kernel[grid](*args, **meta)


def use_triton(x: torch.Tensor) -> bool:
    """CUDA tensors, or any under ``TRITON_INTERPRET=1`` (how the tests run the kernels on a CPU)."""
    return _triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


if _triton is not None:

    @_triton.jit
    def _swiglu_fwd_kernel(h_ptr, w_ptr, a_ptr, inter, split_stride, SPLITS: tl.constexpr, ROUND: tl.constexpr,
                           BLOCK: tl.constexpr):
        """``h`` is ``SPLITS`` partial sums of the gate/up GEMM (split-K, fp32) added here; ``ROUND`` rounds
        their sum to the output dtype first, as a separate sum and cast would have."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        g = tl.zeros((BLOCK,), dtype=tl.float32)
        u = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            base = h_ptr + s * split_stride.to(tl.int64) + row * 2 * inter
            g += tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            u += tl.load(base + inter + cols, mask=mask, other=0.0).to(tl.float32)
        if ROUND:
            g = g.to(a_ptr.dtype.element_ty).to(tl.float32)
            u = u.to(a_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + row)
        a = g * tl.sigmoid(g) * u * w
        tl.store(a_ptr + row * inter + cols, a.to(a_ptr.dtype.element_ty), mask=mask)

    @_triton.jit
    def _swiglu_bwd_kernel(h_ptr, ga_ptr, w_ptr, dw_ptr, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        g = tl.load(h_ptr + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + row * 2 * inter + inter + cols, mask=mask, other=0.0).to(tl.float32)
        ga = tl.load(ga_ptr + row * inter + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + row)
        sig = tl.sigmoid(g)
        silu = g * sig
        tl.atomic_add(dw_ptr + row, tl.sum(ga * silu * u, axis=0))
        gw = ga * w
        d_gate = gw * u * sig * (1.0 + g * (1.0 - sig))
        d_up = gw * silu
        tl.store(h_ptr + row * 2 * inter + cols, d_gate.to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptr + row * 2 * inter + inter + cols, d_up.to(h_ptr.dtype.element_ty), mask=mask)


    @_triton.jit
    def block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blk, mask, NESTED: tl.constexpr,
                    BLOCKS_PER_BLOCK2: tl.constexpr):
        """The absmax of NF4 blocks ``blk``: stored in fp32, or double-quantized as bitsandbytes does
        (``code2[absmax_q] * absmax2[block // 256] + offset``). Shared by every kernel reading NF4."""
        if NESTED:  # one return after the branch: Triton types every return of a function alike
            q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blk // BLOCKS_PER_BLOCK2, mask=mask, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        return scale

    @_triton.jit
    def _dequant_nf4_kernel(packed_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr,
                            n_bytes, NESTED: tl.constexpr, BYTES_PER_BLOCK: tl.constexpr,
                            BLOCKS_PER_BLOCK2: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_bytes
        byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
        blk = offs // BYTES_PER_BLOCK
        scale = block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blk, mask, NESTED, BLOCKS_PER_BLOCK2)
        hi = tl.load(code_ptr + (byte >> 4)) * scale  # high nibble first, as bitsandbytes packs
        lo = tl.load(code_ptr + (byte & 15)) * scale
        out = tl.reshape(tl.join(hi, lo), (2 * BLOCK,))
        out_offs = tl.program_id(0).to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=out_offs < 2 * n_bytes)


if _triton is not None:

    @_triton.jit
    def _gather_sum_kernel(src_ptr, idx_ptr, out_ptr, width, split_stride, K: tl.constexpr, SPLITS: tl.constexpr,
                           ROUND: tl.constexpr, BLOCK: tl.constexpr):
        """``SPLITS``: each source row is the sum of that many fp32 partial rows (split-K); ``ROUND`` rounds it
        to the output dtype before the ``K`` rows are added, as a separate sum and cast would."""
        tok = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(K):
            row = tl.load(idx_ptr + tok * K + j).to(tl.int64)
            v = tl.zeros((BLOCK,), dtype=tl.float32)
            for s in tl.static_range(SPLITS):
                v += tl.load(src_ptr + s * split_stride.to(tl.int64) + row * width + cols, mask=mask,
                             other=0.0).to(tl.float32)
            if ROUND:
                v = v.to(out_ptr.dtype.element_ty).to(tl.float32)
            acc += v
        tl.store(out_ptr + tok * width + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _partials(src: torch.Tensor, out_dtype: torch.dtype) -> dict:
    """The kernels' ``SPLITS`` / ``ROUND`` for ``src``: how many split-K partial sums a ``[splits, rows, width]``
    source holds (1 for a 2-D one), and whether their sum is rounded to ``out_dtype`` (partial sums only)."""
    return {"SPLITS": src.shape[0] if src.dim() == 3 else 1, "ROUND": src.dim() == 3 and src.dtype != out_dtype}


def sum_partials(src: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``[splits, rows, width]`` partial sums -> ``[rows, width]`` in ``dtype`` (torch fallback); 2-D ``src``
    is returned as it is (the kernels round only partial sums)."""
    if src.dim() != 3:
        return src
    return (src[0] if src.shape[0] == 1 else src.sum(0)).to(dtype or src.dtype)


def gather_sum(src: torch.Tensor, index: torch.Tensor, k: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``src.index_select(0, index).view(-1, k, width).sum(1)``: row ``t`` of the result is the sum
    of the ``k`` rows ``src[index[t * k + j]]``, accumulated in fp32 and rounded once.

    ``src`` may also be ``[splits, rows, width]``: a split-K GEMM's fp32 partial sums, added and rounded to
    ``dtype`` here, row by row (the generation path: no separate pass over the partials)."""
    tokens, width = index.numel() // k, src.shape[-1]
    out_dtype = dtype or src.dtype
    if not use_triton(src) or tokens == 0:
        return sum_partials(src, dtype).index_select(0, index).view(tokens, k, width).sum(1).to(out_dtype)
    out = src.new_empty(tokens, width, dtype=out_dtype)
    _launch(_gather_sum_kernel, (tokens, _triton.cdiv(width, _BLOCK)), src,
            src.contiguous(), index.contiguous(), out, width, src.shape[-2] * width, K=k, BLOCK=_BLOCK,
            **_partials(src, out_dtype))
    return out


def dequantize_nf4(packed: torch.Tensor, state, triton: bool = True, block_bytes: int = _DQ_BYTES,
                   warps: int = _DQ_WARPS) -> torch.Tensor:
    """bitsandbytes ``dequantize_4bit(packed, state)`` for NF4/FP4 data: the same values, in one
    Triton pass (nested block scales read inline) where Triton runs, else bitsandbytes itself.
    Nothing is read back to the host (the nested offset stays a device tensor): no sync.

    ``triton=False`` runs bitsandbytes' kernel anyway; ``block_bytes`` (packed bytes a program)
    and ``warps`` are the launch configuration (the benchmark sweeps them)."""
    if not (triton and use_triton(packed)) or state.blocksize % 2:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(packed, state)
    n_bytes = packed.numel()
    out = torch.empty(state.shape, dtype=state.dtype, device=packed.device)
    scales, scale_meta = scale_args(state)
    _launch(_dequant_nf4_kernel, (_triton.cdiv(n_bytes, block_bytes),), packed,
            packed, state.code, *scales, out, n_bytes, BYTES_PER_BLOCK=state.blocksize // 2,
            BLOCK=block_bytes, num_warps=warps, **scale_meta)
    return out


def scale_args(state) -> tuple[tuple, dict]:
    """What every NF4 kernel takes for :func:`block_scale`: the ``(absmax, code2, absmax2, offset)``
    tensors and the ``NESTED`` / ``BLOCKS_PER_BLOCK2`` constants. Plain fp32 scales pass ``absmax``
    where the nested tensors go (never read: ``NESTED`` is a compile-time constant)."""
    if state.nested:
        s2 = state.state2
        return (state.absmax, s2.code, s2.absmax, state.offset), {"NESTED": True, "BLOCKS_PER_BLOCK2": s2.blocksize}
    return (state.absmax, state.code, state.absmax, state.absmax), {"NESTED": False, "BLOCKS_PER_BLOCK2": 1}


def swiglu_forward(h: torch.Tensor, w: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``w[:, None] * silu(gate) * up`` for ``h = [gate | up]`` of shape ``[N, 2I]``; w: ``[N]`` fp32.

    ``h`` may also be ``[splits, N, 2I]``: a split-K GEMM's fp32 partial sums, added and rounded to ``dtype``
    (the result's dtype) in the same pass."""
    n, inter = h.shape[-2], h.shape[-1] // 2
    a = h.new_empty(n, inter, dtype=dtype or h.dtype)
    if n == 0:
        return a
    if use_triton(h):
        _launch(_swiglu_fwd_kernel, (n, _triton.cdiv(inter, _BLOCK)), h, h.contiguous(), w, a, inter,
                n * 2 * inter, BLOCK=_BLOCK, **_partials(h, a.dtype))
        return a
    h = sum_partials(h, a.dtype)
    for s in range(0, n, _ROWS):
        g, u = h[s:s + _ROWS, :inter].float(), h[s:s + _ROWS, inter:].float()
        a[s:s + _ROWS] = (torch.nn.functional.silu(g) * u * w[s:s + _ROWS, None].float()).to(a.dtype)
    return a


def swiglu_backward_(h: torch.Tensor, grad_a: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`swiglu_forward`: returns ``(grad_h, grad_w)``.

    ``grad_a`` is the gradient of the weighted output; ``grad_h`` gets the routing weight applied
    here and ``grad_w[r] = sum(grad_a[r] * silu(gate[r]) * up[r])``. ``grad_h`` overwrites
    ``h`` in place (the activations are not needed afterwards).
    """
    n, inter = h.shape[0], h.shape[1] // 2
    dw = torch.zeros(n, dtype=torch.float32, device=h.device)
    if n == 0:
        return h, dw
    if use_triton(h):
        _launch(_swiglu_bwd_kernel, (n, _triton.cdiv(inter, _BLOCK)), h, h, grad_a, w, dw, inter, BLOCK=_BLOCK)
        return h, dw
    for s in range(0, n, _ROWS):
        g, u = h[s:s + _ROWS, :inter].float(), h[s:s + _ROWS, inter:].float()
        ga, ww = grad_a[s:s + _ROWS].float(), w[s:s + _ROWS, None].float()
        sig = torch.sigmoid(g)
        silu = g * sig
        dw[s:s + _ROWS] = (ga * silu * u).sum(1)
        d_gate, d_up = ga * ww * u * sig * (1 + g * (1 - sig)), ga * ww * silu
        h[s:s + _ROWS, :inter] = d_gate.to(h.dtype)  # both computed before either half is overwritten
        h[s:s + _ROWS, inter:] = d_up.to(h.dtype)
    return h, dw
