"""Generation-time expert MLP: read only the routed experts' NF4 bytes, never dequantize a whole layer.

Why: the training path (:class:`~phyassist.models.mixtral4bit.experts.Quant4bitExperts`' autograd node)
dequantizes all eight experts of a layer to bf16 before its grouped GEMM: 2.8 GB written and read
again per Mixtral-8x7B layer. For a training batch of thousands of tokens that cost is shared by every
token; for one token per sequence it is the whole cost of the step (bench/generation_mixtral.md).

What: :func:`nf4_moe_matmul` multiplies each routed row by its expert's weights straight from the
packed NF4 bytes: one program per row, tile of output columns and chunk of K loads exactly those bytes
(and the double-quantized block scales beside them), dequantizes them in registers and accumulates
with CUDA-core FMAs. A batch-1 step thus reads 2 of 8 experts. The expert of each row is found on
the GPU: nothing waits for the host, so a whole decode step can be captured in a CUDA graph
(:mod:`phyassist.models.generation`). A tensor-core variant (rows of one expert sharing a tile) was
measured too and lost to dequantizing the layer once at every row count (bench/generation_mixtral.md),
so past a few rows the training path's dequantization serves.

:func:`routed_experts` is the MLP built on it: gate/up, fused SwiGLU with the routing weight, down,
gather-sum back to token order. Without Triton (CPU builds of torch) the same maths runs on the
dequantized experts.

The packed layout is bitsandbytes' (``quantize_4bit`` of the whole ``[E, N, K]`` tensor, blocks of
64 consecutive values along ``K``, the first value of a byte in its high nibble), so these kernels
read the very tensors that training uses.
"""

from __future__ import annotations

import torch

from phyassist.models.mixtral4bit.kernels import _launch, gather_sum, swiglu_forward, use_triton
from phyassist.models.mixtral4bit.kernels import _triton as triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _nf4_moe_gemv_kernel(x_ptr, tok_ptr, row_expert_ptr, packed_ptr, code_ptr, absmax_ptr, code2_ptr,
                             absmax2_ptr, offset_ptr, y_ptr, N, K, ROWS, CHUNK, NESTED: tl.constexpr,
                             GATHER: tl.constexpr, BLOCKS_PER_BLOCK2: tl.constexpr, QBLOCK: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
        """One row, one tile of output columns, one ``CHUNK`` of packed bytes along K: FMAs on the CUDA
        cores, the weights dequantized in registers byte by byte as the dequantization kernel does. Even
        and odd inputs meet the high and low nibbles, so no value is ever interleaved. Splitting K keeps
        enough programs in flight to hide the chain of dependent loads (byte, code, nested scale); the
        fp32 partial sums go to ``y[split, row, col]``."""
        r, pid_n, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2).to(tl.int64)
        e = tl.load(row_expert_ptr + r).to(tl.int64)
        src = r
        if GATHER:
            src = tl.load(tok_ptr + r).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < N
        byte_row = (e * N * K + cols * K) // 2  # first packed byte of each output column
        acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
        for b0 in range(split * CHUNK, split * CHUNK + CHUNK, BLOCK_B):
            bs = b0 + tl.arange(0, BLOCK_B)
            x_even = tl.load(x_ptr + src * K + 2 * bs).to(tl.float32)
            x_odd = tl.load(x_ptr + src * K + 2 * bs + 1).to(tl.float32)
            addr = byte_row[:, None] + bs[None, :]
            byte = tl.load(packed_ptr + addr, mask=cmask[:, None], other=0).to(tl.int32)
            blk = addr // (QBLOCK // 2)
            if NESTED:
                q = tl.load(absmax_ptr + blk, mask=cmask[:, None], other=0).to(tl.int32)
                scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blk // BLOCKS_PER_BLOCK2,
                                                         mask=cmask[:, None], other=0.0)
                scale = scale + tl.load(offset_ptr)
            else:
                scale = tl.load(absmax_ptr + blk, mask=cmask[:, None], other=0.0)
            # round each weight to the compute dtype first, as the dequantized reference does
            hi = (tl.load(code_ptr + (byte >> 4)) * scale).to(x_ptr.dtype.element_ty).to(tl.float32)
            lo = (tl.load(code_ptr + (byte & 15)) * scale).to(x_ptr.dtype.element_ty).to(tl.float32)
            acc += hi * x_even[None, :] + lo * x_odd[None, :]
        tl.store(y_ptr + (split * ROWS + r) * N + cols, tl.sum(acc, axis=1), mask=cmask)

    _GEMV_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_B": bb}, num_warps=w)
                     for bn, bb, w in [(16, 64, 4), (32, 64, 4), (16, 128, 4), (8, 128, 2), (32, 128, 8), (64, 64, 8)]]
    _nf4_moe_gemv_tuned = triton.autotune(_GEMV_CONFIGS, key=["N", "K"], restore_value=[])(_nf4_moe_gemv_kernel)


SPLIT_BYTES = 512  # default of Quant4bitExperts.decode_split_bytes (bench/generation_mixtral.md)


def nf4_moe_matmul(x: torch.Tensor, packed, ends: torch.Tensor, rows: int,
                   token_of_row: torch.Tensor | None = None, split_bytes: int = SPLIT_BYTES) -> torch.Tensor:
    """``y[r] = x[src(r)] @ W[e(r)].T`` for ``rows`` rows sorted by expert; ``W`` stays NF4.

    ``packed`` is a :class:`~phyassist.models.mixtral4bit.experts.Packed4bit` of shape ``[E, N, K]``; ``ends[e]``
    the end (exclusive) of expert ``e``'s rows; ``src(r) = token_of_row[r]`` (a gather) or ``r``.
    Each program covers ``split_bytes`` packed bytes of K (0: all of K); the partial sums are added
    in fp32 in a fixed order (deterministic, unlike atomics).
    """
    E, N, K = packed.shape
    state = packed.quant_state
    if rows == 0:
        return x.new_empty(0, N)
    if not use_triton(x) or K % 256 or state.blocksize != 64:
        return _torch_moe_matmul(x, packed, ends, rows, token_of_row)
    packed._sync_state_device()
    nested = bool(state.nested)
    s2 = state.state2 if nested else None
    row_expert = torch.searchsorted(ends, torch.arange(rows, device=x.device, dtype=ends.dtype), right=True)
    splits = (K // 2) // split_bytes if split_bytes and (K // 2) % split_bytes == 0 else 1
    partial = torch.empty(splits, rows, N, dtype=torch.float32, device=x.device)
    # the interpreter (CPU tests) runs one fixed tile; GPUs pick theirs by measurement, once per shape
    kernel, fixed = ((_nf4_moe_gemv_tuned, {}) if x.is_cuda
                     else (_nf4_moe_gemv_kernel, {"BLOCK_N": 16, "BLOCK_B": 64}))
    grid = lambda m: (rows, triton.cdiv(N, m["BLOCK_N"]), splits)  # noqa: E731
    _launch(kernel, grid, x, x.contiguous(), token_of_row if token_of_row is not None else ends, row_expert,
            packed.packed, state.code, state.absmax, s2.code if nested else state.code,
            s2.absmax if nested else state.absmax, state.offset if nested else state.absmax, partial,
            N, K, rows, (K // 2) // splits, NESTED=nested, GATHER=token_of_row is not None,
            BLOCKS_PER_BLOCK2=s2.blocksize if nested else 1, QBLOCK=64, **fixed)
    return (partial[0] if splits == 1 else partial.sum(0)).to(x.dtype)


def _torch_moe_matmul(x, packed, ends, rows, token_of_row):
    """Reference and CPU path: the dequantized experts, one matmul per expert with rows (host loop)."""
    w = packed.dequantize()  # [E, N, K]
    xs = x if token_of_row is None else x.index_select(0, token_of_row)
    y, start = x.new_empty(rows, w.shape[1]), 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            y[start:end] = (xs[start:end].to(w.dtype) @ w[e].T).to(y.dtype)
        start = end
    return y


def route(index: torch.Tensor, weights: torch.Tensor, num_experts: int):
    """Rows sorted by expert: ``(token_of_row, inverse, ends, weight_of_row)``; all on the device."""
    k = index.shape[1]
    flat = index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    experts = torch.arange(num_experts, device=flat.device, dtype=flat.dtype)
    ends = torch.searchsorted(flat.index_select(0, order), experts, right=True).to(torch.int32)
    return order // k, inverse, ends, weights.reshape(-1).index_select(0, order).float()


def kernel_fits(module, x: torch.Tensor) -> bool:
    """Whether :func:`routed_experts` runs its kernel for this module and input: on CUDA it must
    (a CUDA graph cannot take the host loop of the fallback); shapes are multiples of 256 and NF4
    blocks of 64, as Mixtral's are."""
    state = module.gate_up.quant_state
    return (use_triton(x) and module.hidden_dim % 256 == 0 and module.intermediate_dim % 256 == 0
            and state.blocksize == 64)


def routed_experts(module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The expert MLP of :class:`Quant4bitExperts` for generation (no autograd), reading only the
    routed experts' NF4 weights; same maths as its training forward."""
    k = index.shape[1]
    token_of_row, inverse, ends, w_row = route(index, weights, module.num_experts)
    x = hidden.to(module.gate_up.quant_state.dtype)
    split = module.decode_split_bytes
    h = nf4_moe_matmul(x, module.gate_up, ends, index.numel(), token_of_row, split)
    a = swiglu_forward(h, w_row)
    y = nf4_moe_matmul(a, module.down, ends, index.numel(), None, split)
    return gather_sum(y, inverse, k).to(hidden.dtype)
