"""Generation-time expert MLP: read only the routed experts' NF4 bytes, never dequantize a whole layer.

Why: the training path (:class:`~phyassist.models.mixtral4bit.experts.Quant4bitExperts`' autograd node)
dequantizes all eight experts of a layer to bf16 before its grouped GEMM: 2.8 GB written and read
again per Mixtral-8x7B layer. For a training batch of thousands of tokens that cost is shared by every
token; for one token per sequence it is the whole cost of the step (bench/generation_mixtral.md).

What: :func:`nf4_moe_matmul` multiplies each routed row by its expert's weights straight from the
packed NF4 bytes, dequantized in registers; a batch-1 step thus reads 2 of 8 experts. The expert of each
row is found on the GPU: nothing waits for the host, so a whole decode step can be captured in a CUDA graph
(:mod:`phyassist.models.generation`). Kernels (``kernel=``, the module's ``decode_kernel``):

* ``mm2`` (the default through ``v2`` with ``gemv_rows=0``): rows of one expert share each decoded weight
  tile on the tensor cores; aligned 16-byte loads of the packed bytes, one scale per quant block, one or two
  table lookups per byte. With the ``code16`` decoding (the default: codes looked up in the compute dtype,
  each quant block's dot product scaled once) the fastest routed kernel from 2 to 128 rows (batch 1 to 64),
  and faster than dequantizing the layer up to 128 rows (bench/decode_kernels.md).
* ``gemv2``: the same loads and decoding, one row per program on the CUDA cores (``v2`` uses it up to
  ``gemv_rows``; on the H200 its ``code`` variant lost to the ``code16`` multi-row kernel at the mean of both
  routings and beat the ``code`` one at 2 and 8 rows; its ``code16`` variant is not measured yet,
  bench/decode_kernels.md).
* ``v1``: the first GEMV (per element: the byte, the nested scale chain, two code lookups), kept as the
  reference the others were measured against.

Decodings (``lut=``, the module's ``decode_lut``): ``code``, ``pair``, ``code16`` look the nibbles up in small
tables in memory (one load instruction per weight or per byte); ``prmt`` gets ``code16``'s values from byte
permutes over the code held in registers (inline PTX, :func:`prmt_asm`): a third fewer instructions in the
multi-row kernel's loop, 1.35-1.56x faster than ``code16`` from 2 rows (batch 1) to 128 on the H200
(bench/decode_kernels.md). ``prmt_rows`` switches ``code16`` to ``prmt`` from a row count on.

:func:`routed_experts` is the MLP built on it: gate/up, fused SwiGLU with the routing weight, down,
gather-sum back to token order; :func:`route` sorts the rows by expert in one program, and the
split-K partial sums are added inside the SwiGLU and the gather-sum (``decode_fuse``). Without Triton (CPU
builds of torch) the same maths runs on the dequantized experts.

:func:`nf4_linear_partials` runs the multi-row kernel with one expert over a bitsandbytes ``Linear4bit``'s bytes:
the attention projections in the captured decode step from 2 rows on (:mod:`phyassist.models.fused_decode`; at
one row bitsandbytes' GEMV was faster, bench/dense_nf4.md).

The packed layout is bitsandbytes' (``quantize_4bit`` of the whole ``[E, N, K]`` tensor, blocks of
64 consecutive values along ``K``, the first value of a byte in its high nibble), so these kernels
read the very tensors that training uses.
"""

from __future__ import annotations

import torch

from phyassist.models.mixtral4bit.kernels import (_launch, dequantize_nf4, gather_sum, scale_args, sum_partials,
                                                  swiglu_forward, use_triton)
from phyassist.models.mixtral4bit.kernels import _triton as triton

if triton is not None:
    import triton.language as tl

    from phyassist.models.mixtral4bit.kernels import block_scale

    @triton.jit
    def _routed_row(row_expert_ptr, tok_ptr, r, GATHER: tl.constexpr):
        """(expert, input row) of routed row ``r`` (int64): the input is token ``tok[r]`` or row ``r`` itself."""
        e = tl.load(row_expert_ptr + r).to(tl.int64)
        src = r
        if GATHER:
            src = tl.load(tok_ptr + r).to(tl.int64)
        return e, src

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
        e, src = _routed_row(row_expert_ptr, tok_ptr, r, GATHER)
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
            scale = block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blk, cmask[:, None], NESTED,
                                BLOCKS_PER_BLOCK2)
            # round each weight to the compute dtype first, as the dequantized reference does
            hi = (tl.load(code_ptr + (byte >> 4)) * scale).to(x_ptr.dtype.element_ty).to(tl.float32)
            lo = (tl.load(code_ptr + (byte & 15)) * scale).to(x_ptr.dtype.element_ty).to(tl.float32)
            acc += hi * x_even[None, :] + lo * x_odd[None, :]
        tl.store(y_ptr + (split * ROWS + r) * N + cols, tl.sum(acc, axis=1), mask=cmask)

    _GEMV_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_B": bb}, num_warps=w)
                     for bn, bb, w in [(16, 64, 4), (32, 64, 4), (16, 128, 4), (8, 128, 2), (32, 128, 8), (64, 64, 8)]]
    _nf4_moe_gemv_tuned = triton.autotune(_GEMV_CONFIGS, key=["N", "K"], restore_value=[])(_nf4_moe_gemv_kernel)

    # ---- v2: one tile of [BLOCK_N columns, NB quant blocks x 32 bytes] at a time (issue 22) ----

    @triton.jit
    def _packed_tile(packed_ptr, wrow, cmask, jb, bmask, KH):
        """The packed bytes of quant blocks ``jb`` of the weight rows ``wrow``: ``[BLOCK_N, NB, 32]``.
        The addresses are ``wrow * KH + 32 * jb + [0, 32)``: ``KH = K // 2`` is a multiple of 16 that Triton
        sees (an int argument divisible by 16 is specialized), so each thread's run of bytes is one aligned
        vector load."""
        offs = wrow[:, None, None] * KH + jb[None, :, None] * 32 + tl.arange(0, 32)[None, None, :]
        return tl.load(packed_ptr + offs, mask=cmask[:, None, None] & bmask[None, :, None], other=0)

    @triton.jit
    def _decode_tile(byte, lut_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, wrow, cmask, jb, bmask, KH,
                     NESTED: tl.constexpr, LUT: tl.constexpr, BLOCKS_PER_BLOCK2: tl.constexpr, ASM: tl.constexpr):
        """NF4 codes of a :func:`_packed_tile` as ``(hi, lo)``, each ``[BLOCK_N, NB, 32]`` (fp32; the compute
        dtype with ``LUT`` 2 and 3), and the
        blocks' scales ``[BLOCK_N, NB]``. A scale is loaded once per (column, quant block), the nested chain
        (absmax byte -> code2 -> x absmax2 + offset) too. ``LUT`` 0: two gathers per byte into the 16-entry
        code (64 bytes, one L1 line); 1: one gather per byte into the 256-entry table of code pairs
        (:func:`_pair_table`, 2 KiB); 2: as 0 from the code in the compute dtype (:func:`_code_table`), so
        the values go to the tensor cores unconverted and the scale is applied to each block's dot product;
        3: the values of 2 without any memory access: byte permutes over the code held in registers
        (:func:`prmt_asm`; GPUs only, 16-bit compute dtypes; ``lut_ptr`` is the code16 table, only its dtype
        is read). Why 3: a gather per nibble issues one load
        instruction per weight, as many as the load unit can take while the bytes stream at full rate."""
        if LUT == 3:
            code_dtype = lut_ptr.dtype.element_ty  # the code16 table's: the compute dtype
            hi, lo = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [byte], dtype=(code_dtype, code_dtype),
                                               is_pure=True, pack=4)
        elif LUT == 1:
            pair = tl.load(lut_ptr + byte.to(tl.int32))  # int64: code[byte >> 4] high word, code[byte & 15] low
            hi = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            lo = pair.to(tl.int32).to(tl.float32, bitcast=True)
        else:
            hi = tl.load(lut_ptr + (byte.to(tl.int32) >> 4))  # high nibble first, as bitsandbytes packs
            lo = tl.load(lut_ptr + (byte.to(tl.int32) & 15))
        blk = wrow[:, None] * (KH // 32) + jb[None, :]
        smask = cmask[:, None] & bmask[None, :]
        scale = block_scale(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, blk, smask, NESTED, BLOCKS_PER_BLOCK2)
        return hi, lo, scale

    @triton.jit
    def _split_pairs(w, X_DTYPE: tl.constexpr, HALF_BITS: tl.constexpr):
        """Two consecutive inputs held in one integer word (``x`` viewed as int32 for 16-bit, int64 for
        fp32 inputs) as ``(even, odd)`` in ``X_DTYPE``: the even one is at the lower address, so in the
        low half (little endian). Loading words keeps ``x`` aligned with the packed bytes (byte ``j`` of
        a row holds the weights of inputs ``2j`` and ``2j + 1``) without strided loads or interleaving."""
        if HALF_BITS == 16:
            even = w.to(tl.int16).to(X_DTYPE, bitcast=True)
            odd = (w >> 16).to(tl.int16).to(X_DTYPE, bitcast=True)
        else:
            even = w.to(tl.int32).to(X_DTYPE, bitcast=True)
            odd = (w >> 32).to(tl.int32).to(X_DTYPE, bitcast=True)
        return even, odd

    @triton.jit
    def _nf4_gemv_v2_kernel(x_ptr, xw_ptr, tok_ptr, row_expert_ptr, packed_ptr, lut_ptr, absmax_ptr, code2_ptr,
                            absmax2_ptr, offset_ptr, y_ptr, N, KH, ROWS, CHUNK, NESTED: tl.constexpr,
                            GATHER: tl.constexpr, LUT: tl.constexpr, BLOCKS_PER_BLOCK2: tl.constexpr,
                            HALF_BITS: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
                            PREFETCH: tl.constexpr):
        """v2 GEMV: one row, one tile of ``BLOCK_N`` output columns, ``CHUNK`` quant blocks of K (a split),
        ``NB`` blocks a step. Each block's dot product is summed over its 64 codes first and scaled once:
        ``y = sum_blocks scale * sum_k code * x`` in fp32 (the weights are never rounded to the compute
        dtype, unlike the reference; the difference is within that dtype's rounding)."""
        r, pid_n, split = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
        e, src = _routed_row(row_expert_ptr, tok_ptr, r, GATHER)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < N
        wrow = e * N + cols
        acc = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
        first = split * CHUNK
        last = first + CHUNK
        if PREFETCH:
            nxt = _packed_tile(packed_ptr, wrow, cmask, first + tl.arange(0, NB), first + tl.arange(0, NB) < last, KH)
        for j0 in range(first, last, NB):
            jb = j0 + tl.arange(0, NB)
            bmask = jb < last
            if PREFETCH:
                # the next step's bytes are requested before this step's are decoded, so the loop's DRAM
                # stream is in flight while it computes (Triton pipelines only loads that feed tl.dot);
                # costs byte moves and registers, so the autotuner chooses
                byte = nxt
                nxt = _packed_tile(packed_ptr, wrow, cmask, jb + NB, jb + NB < last, KH)
            else:
                byte = _packed_tile(packed_ptr, wrow, cmask, jb, bmask, KH)
            hi, lo, scale = _decode_tile(byte, lut_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, wrow, cmask,
                                         jb, bmask, KH, NESTED, LUT, BLOCKS_PER_BLOCK2, ASM)
            xw = tl.load(xw_ptr + src * KH + jb[:, None] * 32 + tl.arange(0, 32)[None, :], mask=bmask[:, None], other=0)
            xe, xo = _split_pairs(xw, x_ptr.dtype.element_ty, HALF_BITS)
            part = tl.sum(hi.to(tl.float32) * xe.to(tl.float32)[None, :, :]
                          + lo.to(tl.float32) * xo.to(tl.float32)[None, :, :], axis=2)
            acc += part * scale
        tl.store(y_ptr + (split * ROWS + r) * N + cols, tl.sum(acc, axis=1), mask=cmask)

    @triton.jit
    def _nf4_mm_v2_kernel(x_ptr, xw_ptr, tok_ptr, ends_ptr, packed_ptr, lut_ptr, absmax_ptr, code2_ptr, absmax2_ptr,
                          offset_ptr, y_ptr, N, KH, ROWS, CHUNK, ROW_BUCKET, E: tl.constexpr, E_POW2: tl.constexpr,
                          NESTED: tl.constexpr, GATHER: tl.constexpr, LUT: tl.constexpr,
                          BLOCKS_PER_BLOCK2: tl.constexpr, HALF_BITS: tl.constexpr, PRECISION: tl.constexpr,
                          DOT_F32: tl.constexpr, ASM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          NB: tl.constexpr, SWAP: tl.constexpr = False, PREFETCH: tl.constexpr = False):
        """v2 multi-row: one tile of up to ``BLOCK_M`` rows of one expert, ``BLOCK_N`` columns and ``CHUNK``
        quant blocks of K; the weight tile is decoded once per step and multiplied on the tensor cores
        (``tl.dot``), the even inputs against the high nibbles and the odd ones against the low. Weights
        are rounded to the compute dtype as the dequantized reference rounds them (``LUT`` 0, 1; with 2 and 3
        the codes are, and each quant block's dot product is scaled in fp32), sums in fp32.
        ``DOT_F32`` (Triton's CPU interpreter only, whose ``tl.dot`` misreads bf16 tiles) multiplies those
        rounded values in fp32 instead.

        ``SWAP`` computes the transposed tile, ``W @ x.T``: the weights become the MMA's first operand (``BLOCK_N``
        rows, where the MMA wants at least 64) and the few input rows its second; which orientation is faster
        is the autotuner's measurement (``_MM2_TILES``). ``PREFETCH`` requests the next step's packed bytes before
        this step's are decoded, as the GEMV's does: at batch 1 a program has few bytes in flight, and more of
        them is what a memory-bound stream needs.

        Program ``t`` of axis 0 finds its (expert, first row) from ``ends`` on the GPU: expert ``e`` has
        ``cdiv(count_e, BLOCK_M)`` tiles, numbered in expert order; the grid is an upper bound on their
        total (``rows // BLOCK_M + min(E, rows)``) and programs past it return at once."""
        t, pid_n, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        ex = tl.arange(0, E_POW2)
        emask = ex < E
        end_e = tl.load(ends_ptr + ex, mask=emask, other=0)
        start_e = tl.load(ends_ptr + ex - 1, mask=emask & (ex > 0), other=0)
        tiles = tl.where(emask, (end_e - start_e + BLOCK_M - 1) // BLOCK_M, 0)
        tiles_end = tl.cumsum(tiles, axis=0)
        e = tl.sum((tiles_end <= t).to(tl.int32), axis=0)  # experts whose tiles all come before t
        if e >= E:
            return
        mine = ex == e
        row0 = tl.sum(tl.where(mine, start_e + (t - (tiles_end - tiles)) * BLOCK_M, 0), axis=0)
        end = tl.sum(tl.where(mine, end_e, 0), axis=0)
        rows = row0.to(tl.int64) + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = rows < end
        src = rows
        if GATHER:
            src = tl.load(tok_ptr + rows, mask=rmask, other=0).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < N
        wrow = e.to(tl.int64) * N + cols
        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        first = split * CHUNK
        last = first + CHUNK
        if PREFETCH:
            nxt = _packed_tile(packed_ptr, wrow, cmask, first + tl.arange(0, NB), first + tl.arange(0, NB) < last, KH)
        for j0 in range(first, last, NB):
            jb = j0 + tl.arange(0, NB)
            bmask = jb < last
            if PREFETCH:
                byte = nxt
                nxt = _packed_tile(packed_ptr, wrow, cmask, jb + NB, jb + NB < last, KH)
            else:
                byte = _packed_tile(packed_ptr, wrow, cmask, jb, bmask, KH)
            hi, lo, scale = _decode_tile(byte, lut_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, wrow, cmask,
                                         jb, bmask, KH, NESTED, LUT, BLOCKS_PER_BLOCK2, ASM)
            if LUT >= 2:  # codes already in the compute dtype; the block's scale comes after its dot product
                tl.static_assert(NB == 1, "LUT 2 and 3 scale each quant block's dot product: one block a step")
                w_hi = tl.reshape(hi, (BLOCK_N, 32))
                w_lo = tl.reshape(lo, (BLOCK_N, 32))
            else:
                w_hi = tl.reshape((hi * scale[:, :, None]).to(x_ptr.dtype.element_ty), (BLOCK_N, NB * 32))
                w_lo = tl.reshape((lo * scale[:, :, None]).to(x_ptr.dtype.element_ty), (BLOCK_N, NB * 32))
            ks = j0 * 32 + tl.arange(0, NB * 32)
            xw = tl.load(xw_ptr + src[:, None] * KH + ks[None, :], mask=rmask[:, None] & (ks < last * 32)[None, :],
                         other=0)
            xe, xo = _split_pairs(xw, x_ptr.dtype.element_ty, HALF_BITS)
            if DOT_F32:
                xe, xo = xe.to(tl.float32), xo.to(tl.float32)
                w_hi, w_lo = w_hi.to(tl.float32), w_lo.to(tl.float32)
            if SWAP:
                if LUT >= 2:
                    d = tl.dot(w_hi, tl.trans(xe), input_precision=PRECISION)
                    d = tl.dot(w_lo, tl.trans(xo), d, input_precision=PRECISION)
                    acc += d * tl.reshape(scale, (BLOCK_N, 1))
                else:
                    acc = tl.dot(w_hi, tl.trans(xe), acc, input_precision=PRECISION)
                    acc = tl.dot(w_lo, tl.trans(xo), acc, input_precision=PRECISION)
            elif LUT >= 2:
                d = tl.dot(xe, tl.trans(w_hi), input_precision=PRECISION)
                d = tl.dot(xo, tl.trans(w_lo), d, input_precision=PRECISION)
                acc += d * tl.reshape(scale, (1, BLOCK_N))
            else:
                acc = tl.dot(xe, tl.trans(w_hi), acc, input_precision=PRECISION)
                acc = tl.dot(xo, tl.trans(w_lo), acc, input_precision=PRECISION)
        if SWAP:
            tl.store(y_ptr + (split * ROWS + rows[None, :]) * N + cols[:, None], acc,
                     mask=rmask[None, :] & cmask[:, None])
        else:
            tl.store(y_ptr + (split * ROWS + rows[:, None]) * N + cols[None, :], acc,
                     mask=rmask[:, None] & cmask[None, :])

    def _quick_bench(fn, quantiles):
        """The autotuners' timing: short (these kernels take microseconds), so that tuning a new shape
        during a generation warm-up costs little."""
        return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)

    # Tiles of one quant block and 64-256 columns, the next tile prefetched or not: the compiler gives each
    # thread whole columns' blocks (more columns per thread reuse its inputs), 40-128 registers, no spills
    # (sm_90, Triton 3.6, compiled offline).
    _GEMV2_CONFIGS = [triton.Config({"BLOCK_N": bn, "NB": 1, "PREFETCH": pf}, num_warps=w)
                      for pf in (False, True) for bn, w in [(64, 2), (128, 4), (256, 4)]]
    _nf4_gemv_v2_tuned = triton.autotune(_GEMV2_CONFIGS, key=["N", "KH", "CHUNK", "NESTED", "LUT"],
                                         restore_value=[], do_bench=_quick_bench)(_nf4_gemv_v2_kernel)
    # (BLOCK_M, BLOCK_N, NB, warps, stages, SWAP, PREFETCH). On the H200 (bench/decode_kernels.md) prmt took the
    # plain (16, 128, 1, 4, 1) for gate/up up to 32 routed rows, transposed tiles for down and at 128 rows, there
    # the 3-stage (32, 128) one (its stages pipeline the packed bytes through shared memory; the 2-3 stage tiles
    # tried at 280cbcf, with the code and pair decodings, pipelined their table lookups and lost everywhere);
    # no prefetching tile won a cell in two sweeps, so none is in the set (the kernel keeps ``PREFETCH`` for tests
    # and other GPUs: a tile of its own list, not the autotuner's).
    _MM2_TILES = [(16, 64, 2, 4, 2, 0, 0), (16, 128, 1, 4, 1, 0, 0), (32, 64, 2, 4, 2, 0, 0), (64, 64, 2, 4, 2, 0, 0),
                  (32, 128, 2, 8, 2, 0, 0), (16, 128, 1, 4, 1, 1, 0), (32, 128, 1, 4, 1, 1, 0),
                  (64, 128, 1, 8, 1, 1, 0), (16, 128, 1, 4, 3, 1, 0), (32, 128, 1, 4, 3, 1, 0)]

    def _mm2_configs(one_block: bool):
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "NB": nb, "SWAP": bool(sw), "PREFETCH": bool(pf)},
                              num_warps=w, num_stages=s)
                for bm, bn, nb, w, s, sw, pf in _MM2_TILES if nb == 1 or not one_block]

    # tuned per power-of-two row count (ROW_BUCKET, read only by the autotuner), not per exact count
    _MM2_KEY = ["N", "KH", "ROW_BUCKET", "CHUNK", "NESTED", "LUT"]
    _nf4_mm_v2_tuned = triton.autotune(_mm2_configs(False), key=_MM2_KEY, restore_value=[],
                                       do_bench=_quick_bench)(_nf4_mm_v2_kernel)
    _nf4_mm_v2_tuned_nb1 = triton.autotune(_mm2_configs(True), key=_MM2_KEY, restore_value=[],  # LUT 2, 3
                                           do_bench=_quick_bench)(_nf4_mm_v2_kernel)

    def _mm2_tuner(lut: int):
        """The multi-row kernel's autotuner for decoding ``LUTS[lut]``: one quant block a step for the decodings
        that scale each block's dot product (2, 3)."""
        return _nf4_mm_v2_tuned_nb1 if lut >= 2 else _nf4_mm_v2_tuned


KERNELS = ("v1", "gemv2", "mm2", "v2")  # Quant4bitExperts.decode_kernel; see nf4_moe_matmul
LUTS = ("code", "pair", "code16", "prmt")  # Quant4bitExperts.decode_lut: how the v2 kernels decode nibbles
# Quant4bitExperts' generation settings (module attributes ``decode_<name>``): a forward without autograd of at
# most ``max_rows`` (token, expert) rows reads only the routed experts' NF4 bytes (routed_experts); more rows
# (prefill) share one dequantization of the layer instead. ``kernel`` / ``lut`` / ``gemv_rows`` pick
# nf4_moe_matmul's kernel and ``split_bytes`` the packed bytes of K per program. The values are what
# bench/decode_kernels.py --choose picks from the kernel timings on an H200 (bench/decode_kernels.md): the v2
# multi-row kernel from 2 rows (batch 1) to 128 (batch 64), the code in the compute dtype, decoded by byte
# permutes (prmt) from 2 rows on (every decode step). ``fuse`` 1: the routing
# in one kernel (route, up to ROUTE_KERNEL_ROWS rows, prefill chunks included) and the split-K partial sums added
# inside the SwiGLU and gather-sum; 0: torch's sort and a sum of their own everywhere (the path before; measured
# end to end only together with code16, bench/generation_mixtral.md). Per model: configure_decode.
# ``prmt_rows`` (with ``lut`` code16): from this many rows on, the same values come from the ``prmt`` decoding
# (byte permutes in registers instead of lookups in memory); 0 never.
# ``split_programs`` (the multi-row kernel; the GEMV keeps ``split_bytes``): when not 0, the split of K is chosen per
# call instead of ``split_bytes``, for about this many programs (:func:`split_for_programs`): few splits where rows give
# many row tiles (batch 64: the split-K partial sums of gate/up are 4 x 128 x 28,672 fp32 values, 58.7 MB a layer,
# with 512-byte splits), more where few do; 1,024 measured 1.02x at skewed batch 64 with the step's attention in SDPA
# and 1.05x with it in the fused decode attention (bench/generation_mixtral.md), so it is the default.
DECODE_DEFAULTS = {"max_rows": 128, "split_bytes": 512, "kernel": "v2", "lut": "code16", "gemv_rows": 0, "fuse": 1,
                   "prmt_rows": 2, "split_programs": 1024}
# The values each setting may take (check_decode_options).
DECODE_OPTIONS = {"kernel": KERNELS, "lut": LUTS, "gemv_rows": int, "max_rows": int, "split_bytes": int,
                  "fuse": (0, 1), "prmt_rows": int, "split_programs": int}


def nf4_moe_matmul(x: torch.Tensor, packed, ends: torch.Tensor, rows: int,
                   token_of_row: torch.Tensor | None = None, split_bytes: int = DECODE_DEFAULTS["split_bytes"],
                   kernel: str = "v1", lut: str = "code", gemv_rows: int = DECODE_DEFAULTS["gemv_rows"],
                   reduce: bool = True, prmt_rows: int = 0, split_programs: int = 0) -> torch.Tensor:
    """``y[r] = x[src(r)] @ W[e(r)].T`` for ``rows`` rows sorted by expert; ``W`` stays NF4.

    ``packed`` is a :class:`~phyassist.models.mixtral4bit.experts.Packed4bit` of shape ``[E, N, K]``; ``ends[e]``
    the end (exclusive) of expert ``e``'s rows; ``src(r) = token_of_row[r]`` (a gather) or ``r``.
    Each program covers ``split_bytes`` packed bytes of K (0: all of K), or with ``split_programs`` (the multi-row
    kernel) the split that gives about that many programs (:func:`split_for_programs`); the partial sums are added
    in fp32 in a fixed order (deterministic, unlike atomics).

    ``kernel``: ``v1`` the first GEMV; ``gemv2`` its rewrite (aligned vector loads, one scale per quant
    block, see :func:`_nf4_gemv_v2_kernel`); ``mm2`` the multi-row tensor-core kernel (rows of one expert
    share each decoded weight tile); ``v2`` ``gemv2`` up to ``gemv_rows`` rows and ``mm2`` above (which is
    fastest where: bench/decode_kernels.md). The default ``kernel`` here stays ``v1``, the first kernel, which
    the tests use as the routed reference; the expert modules pass their own ``decode_kernel``. ``lut`` (v2
    kernels): ``code`` two lookups per packed byte into the 16-entry code, ``pair`` one into a 256-entry table
    of code pairs, ``code16`` two into the code rounded to the compute dtype, each quant block's dot product
    scaled once (not each weight; the weights are then not rounded as the reference rounds them, the
    difference is within that dtype's rounding); ``prmt`` the values of ``code16`` from byte permutes in
    registers, no lookup in memory (:func:`prmt_asm`): NVIDIA GPUs and a 16-bit ``x`` only, elsewhere it runs as
    ``code16``; ``code16`` runs as ``prmt`` in the multi-row kernel from ``prmt_rows`` rows on (0: never). Nothing
    waits for the host.

    ``reduce`` False returns the split-K partial sums ``[splits, rows, N]`` (fp32, or ``[1, rows, N]`` in
    ``x``'s dtype from the torch path) for a consumer that adds them itself (:func:`routed_experts`).
    """
    E, N, K = packed.shape
    state = packed.quant_state
    if kernel not in KERNELS or lut not in LUTS:
        raise ValueError(f"nf4_moe_matmul: kernel must be one of {KERNELS} and lut one of {LUTS}, "
                         f"got {kernel!r}, {lut!r}")
    if rows == 0 or (not use_triton(x) or state.blocksize != 64 or K % (256 if kernel == "v1" else 64)
                     or x.element_size() not in (2, 4)):
        y = x.new_empty(0, N) if rows == 0 else _torch_moe_matmul(x, packed, ends, rows, token_of_row)
        return y if reduce else y[None]
    packed._sync_state_device()
    if kernel != "v1":
        multi = kernel == "mm2" or (kernel == "v2" and rows > gemv_rows)
        if split_programs and multi:  # counted in the multi-row kernel's tiles; the GEMV keeps split_bytes
            split_bytes = split_for_programs(rows, E, N, K, split_programs)
        if lut == "code16" and multi and 0 < prmt_rows <= rows:  # chosen from the multi-row kernel's timings
            lut = "prmt"
        if lut == "prmt" and not (x.is_cuda and torch.version.hip is None and x.element_size() == 2):
            lut = "code16"  # the same values; the PTX needs an NVIDIA GPU, and its table holds 16-bit codes
        partial = _v2_matmul(x, packed, ends, rows, token_of_row, split_bytes, multi, LUTS.index(lut))
        return sum_partials(partial, x.dtype) if reduce else partial
    scales, scale_meta = scale_args(state)
    row_expert = torch.searchsorted(ends, torch.arange(rows, device=x.device, dtype=ends.dtype), right=True)
    splits = (K // 2) // split_bytes if split_bytes and (K // 2) % split_bytes == 0 else 1
    partial = torch.empty(splits, rows, N, dtype=torch.float32, device=x.device)
    # the interpreter (CPU tests) runs one fixed tile; GPUs pick theirs by measurement, once per shape
    kernel, fixed = ((_nf4_moe_gemv_tuned, {}) if x.is_cuda
                     else (_nf4_moe_gemv_kernel, {"BLOCK_N": 16, "BLOCK_B": 64}))
    grid = lambda m: (rows, triton.cdiv(N, m["BLOCK_N"]), splits)  # noqa: E731
    _launch(kernel, grid, x, x.contiguous(), token_of_row if token_of_row is not None else ends, row_expert,
            packed.packed, state.code, *scales, partial, N, K, rows, (K // 2) // splits,
            GATHER=token_of_row is not None, QBLOCK=64, **scale_meta, **fixed)
    return sum_partials(partial, x.dtype) if reduce else partial


# the interpreter (CPU tests) runs fixed tiles, small enough to be quick and to leave partial tiles
# (the multi-row kernel with the code16 table takes one quant block a step)
INTERPRETER_TILES = {"gemv": {"BLOCK_N": 32, "NB": 2, "PREFETCH": True},
                     "mm": {"BLOCK_M": 16, "BLOCK_N": 32, "NB": 2}, "mm-nb1": {"BLOCK_M": 16, "BLOCK_N": 32, "NB": 1}}


def _v2_matmul(x, packed, ends, rows, token_of_row, split_bytes, multi: bool, lut: int, tiles=None):
    """Launch the v2 GEMV (``multi`` False) or multi-row kernel with decoding ``LUTS[lut]``; returns the
    fp32 partial sums ``[splits, rows, N]``. ``tiles`` fixes the tile (else: the autotuned one on GPUs,
    :data:`INTERPRETER_TILES` in the interpreter)."""
    E, N, K = packed.shape
    state = packed.quant_state
    scales, scale_meta = scale_args(state)
    kh, blocks = K // 2, K // 64
    chunk = split_bytes // 32 if split_bytes and split_bytes % 32 == 0 and blocks % (split_bytes // 32) == 0 else blocks
    splits = blocks // chunk
    partial = torch.empty(splits, rows, N, dtype=torch.float32, device=x.device)
    x = x.contiguous()
    words = x.view(torch.int32 if x.element_size() == 2 else torch.int64)  # [tokens, K // 2]: input pairs
    args = (x, words, token_of_row if token_of_row is not None else ends)
    table = state.code if lut == 0 else _pair_table(state) if lut == 1 else _code_table(state, x.dtype)
    tail = (packed.packed, table, *scales, partial, N, kh, rows, chunk)
    meta = dict(GATHER=token_of_row is not None, LUT=lut, HALF_BITS=8 * x.element_size(),
                ASM=_prmt_table_asm(state, x.dtype) if lut == 3 else "", **scale_meta)
    name = ("mm-nb1" if lut >= 2 else "mm") if multi else "gemv"
    if tiles is None and not x.is_cuda:
        tiles = INTERPRETER_TILES[name]
    if multi:
        kern = _nf4_mm_v2_kernel if tiles else _mm2_tuner(lut)
        grid = lambda m: (rows // m["BLOCK_M"] + min(E, rows), triton.cdiv(N, m["BLOCK_N"]), splits)  # noqa: E731
        _launch(kern, grid, x, *args, ends, *tail, triton.next_power_of_2(rows), E=E, E_POW2=triton.next_power_of_2(E),
                PRECISION="ieee" if x.dtype == torch.float32 or not x.is_cuda else None, DOT_F32=not x.is_cuda,
                **meta, **(tiles or {}))
    else:
        kern = _nf4_gemv_v2_kernel if tiles else _nf4_gemv_v2_tuned
        row_expert = torch.searchsorted(ends, torch.arange(rows, device=x.device, dtype=ends.dtype), right=True)
        grid = lambda m: (rows, triton.cdiv(N, m["BLOCK_N"]), splits)  # noqa: E731
        _launch(kern, grid, x, *args, row_expert, *tail, **meta, **(tiles or {}))
    return partial


class _OneExpert:
    """A bitsandbytes 4-bit linear weight (``quantize_4bit`` of ``[N, K]``) seen as a one-expert stack ``[1, N, K]``:
    the same packed bytes and quant state that :func:`nf4_moe_matmul` reads for the experts."""

    def __init__(self, data: torch.Tensor, state):
        self.packed, self.quant_state, self.shape = data, state, (1, *state.shape)

    def _sync_state_device(self) -> None:
        if self.quant_state.absmax.device != self.packed.device:
            self.quant_state.to(self.packed.device)

    def dequantize(self) -> torch.Tensor:  # the torch path's weights
        self._sync_state_device()
        return dequantize_nf4(self.packed, self.quant_state).view(self.shape)


_ONE_EXPERT_ENDS: dict = {}
# the dense kernel's split of K aims at about this many programs (output tiles of 128 columns x row tiles of 16 x
# splits): few output tiles at decode batch sizes, and a memory-bound stream needs every SM busy. It stands in for
# bitsandbytes from DENSE_MIN_ROWS rows on; at one row bitsandbytes' GEMV was faster. Both from bench/dense_nf4.md
# (H200: Mixtral's q, k, v, o with the study's adapters, in a CUDA graph: 1,024 programs the fastest at 64 rows,
# 512 at 16 by 9 %; at one row the best split took 1.19x bitsandbytes' time; 2-15 rows not measured: above one row
# bitsandbytes dequantizes and multiplies, the path the kernel beat at 16 and 64 rows)
DENSE_PROGRAMS = 1024
DENSE_MIN_ROWS = 2


def _one_expert_ends(rows: int, device: torch.device) -> torch.Tensor:
    """``ends`` of a one-expert stack (``[rows]``, int32), kept per (rows, device) once made outside a CUDA graph
    capture; during one it is made inside (a fill node of the graph), since a kept tensor would be written only
    when that graph replays."""
    key = (rows, str(device))
    ends = _ONE_EXPERT_ENDS.get(key)
    if ends is None:
        ends = torch.full((1,), rows, dtype=torch.int32, device=device)
        if not (ends.is_cuda and torch.cuda.is_current_stream_capturing()):
            _ONE_EXPERT_ENDS[key] = ends
    return ends


def split_for_programs(rows: int, experts: int, n: int, k: int, programs: int) -> int:
    """Packed bytes of K per program for the multi-row kernel: the split (a power of two dividing K's quant blocks)
    that brings ``cdiv(n, 128)`` output tiles x row tiles x splits up to ``programs``, never below one block. Row
    tiles: ``cdiv(rows, 16)`` plus ``min(experts, rows) - 1`` (each expert's rows may end in a partial tile: the
    bound the kernel's grid takes too, with the host not knowing how many experts got rows); the kernel's own tile
    may be larger, so this counts programs as tiles of 128 x 16."""
    blocks = k // 64
    tiles = -(-n // 128) * (-(-rows // 16) + min(experts, rows) - 1)
    splits = 1
    while tiles * splits < programs and blocks % (2 * splits) == 0:
        splits *= 2
    return 32 * (blocks // splits)


def dense_split_bytes(rows: int, n: int, k: int, programs: int = DENSE_PROGRAMS) -> int:
    """Packed bytes of K per program for :func:`nf4_linear_partials`: :func:`split_for_programs` with one expert."""
    return split_for_programs(rows, 1, n, k, programs)


def nf4_linear_partials(x: torch.Tensor, data: torch.Tensor, state, lut: str = DECODE_DEFAULTS["lut"],
                        prmt_rows: int = DECODE_DEFAULTS["prmt_rows"],
                        programs: int = DENSE_PROGRAMS) -> torch.Tensor:
    """``x @ W.T`` for a bitsandbytes 4-bit linear weight (``data``, ``state``: a ``Linear4bit``'s
    ``weight.data`` and ``weight.quant_state``), as the routed kernel's split-K partial sums ``[splits, rows, N]``
    (fp32; ``[1, rows, N]`` in ``x``'s dtype from the torch path): the multi-row kernel with one expert. Why: at
    batch 1 bitsandbytes' GEMV read the attention projections at about 0.59 TB/s in the captured step
    (bench/generation_mixtral.md), and above batch 1 it dequantizes the whole weight first; the consumer adds the
    partials while it does its own pass (:func:`phyassist.models.fused_decode.lora_add_partials`)."""
    n, k = state.shape
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    return nf4_moe_matmul(x2, _OneExpert(data, state), _one_expert_ends(rows, x.device), rows, None,
                          dense_split_bytes(rows, n, k, programs), kernel="v2", lut=lut, gemv_rows=0, reduce=False,
                          prmt_rows=prmt_rows)


def _pair_table(state) -> torch.Tensor:
    """The 256-entry table of the ``pair`` decoding: entry ``b`` holds ``code[b >> 4]`` (high word) and
    ``code[b & 15]`` (low word) as the bits of two fp32 in one int64. Built once per quant state and
    device (a few small torch ops, no host sync) and kept on the state."""
    code = state.code
    table = getattr(state, "_phyassist_pairs", None)
    if table is None or table.device != code.device:
        c = code.float().contiguous()
        b = torch.arange(256, device=code.device)
        table = torch.stack([c[b & 15], c[b >> 4]], dim=-1).contiguous().view(torch.int64).view(256)
        state._phyassist_pairs = table
    return table


def _code_table(state, dtype: torch.dtype) -> torch.Tensor:
    """The 16-entry code in ``dtype`` (the ``code16`` decoding), built once per quant state, device and
    dtype and kept on the state."""
    table = getattr(state, "_phyassist_code16", None)
    if table is None or table.device != state.code.device or table.dtype != dtype:
        table = state.code.to(dtype).contiguous()
        state._phyassist_code16 = table
    return table


def _prmt_table_asm(state, dtype: torch.dtype) -> str:
    """:func:`prmt_asm` of ``state``'s code, kept on the state. The code is bitsandbytes' fixed table of the
    state's quant type, read on the host: copying the GPU's copy would sync, which a CUDA graph being captured
    (the first decode step at a new batch size) refuses."""
    cached = getattr(state, "_phyassist_prmt", None)
    if cached is None or cached[0] != dtype:
        from bitsandbytes.functional import get_4bit_type

        cached = (dtype, prmt_asm(get_4bit_type(state.quant_type, device="cpu"), dtype))
        state._phyassist_prmt = cached
    return cached[1]


def prmt_asm(code: torch.Tensor, dtype: torch.dtype) -> str:
    """PTX for the ``prmt`` decoding (``LUT`` 3): four packed bytes in (``$4``), their eight codes out in
    ``dtype`` (16-bit), two to a register: ``$0, $1`` the high nibbles (the even inputs) of bytes 0-1 and 2-3,
    ``$2, $3`` the low nibbles (the odd inputs), as ``tl.inline_asm_elementwise(..., pack=4)`` packs them.

    How: ``prmt`` picks 4 bytes out of 8 by four 3-bit selectors, and a packed byte's two nibbles are two
    selectors. The 16 codes' high bytes are 16 bytes in four words (immediates in the PTX); entries 0-7 and 8-15
    are looked up separately and bit 3 of each nibble picks between them (a third ``prmt``); the same for
    the low bytes; two more ``prmt`` put each value's two bytes together. 25 instructions and a move for 8
    weights, no load (the memory lookups take one load instruction per weight). Bit 3 is masked off first: ``prmt``
    reads it as "replicate the sign". The table is ``code`` rounded to ``dtype`` (the ``code16`` values)."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"prmt_asm: the prmt decoding holds 16-bit codes, not {dtype}")
    bits = [int(v) & 0xFFFF for v in code.detach().to("cpu", dtype).view(torch.int16).tolist()]
    if len(bits) != 16:
        raise ValueError(f"prmt_asm: a 4-bit code has 16 entries, got {len(bits)}")

    def word(table, i):  # entries 4i .. 4i + 3 of a byte table as one little-endian register
        return sum(table[4 * i + j] << (8 * j) for j in range(4))

    hi = [word([b >> 8 for b in bits], i) for i in range(4)]
    lo = [word([b & 0xFF for b in bits], i) for i in range(4)]
    lines = ["{", ".reg .b32 nq, ns, nc, na, nb, nh, nl;", "mov.b32 nq, $4;"]
    th = [f"0x{v:08x}" for v in hi]
    tl = [f"0x{v:08x}" for v in lo]
    for half, (even, odd) in enumerate((("$0", "$2"), ("$1", "$3"))):
        if half:
            lines.append("shr.b32 nq, nq, 16;")  # bytes 2-3; prmt reads the selectors from bits 0-15
        lines += ["and.b32 ns, nq, 0x7777;",  # entry within each half of the table
                  "shr.b32 nc, nq, 1;", "and.b32 nc, nc, 0x4444;", "or.b32 nc, nc, 0x3210;",  # byte j or j + 4 by bit 3
                  f"prmt.b32 na, {th[0]}, {th[1]}, ns;", f"prmt.b32 nb, {th[2]}, {th[3]}, ns;", "prmt.b32 nh, na, nb, nc;",
                  f"prmt.b32 na, {tl[0]}, {tl[1]}, ns;", f"prmt.b32 nb, {tl[2]}, {tl[3]}, ns;", "prmt.b32 nl, na, nb, nc;",
                  # value j's bytes are (l_j, h_j); values 1 and 3 are the high nibbles of the two bytes
                  f"prmt.b32 {even}, nl, nh, 0x7351;", f"prmt.b32 {odd}, nl, nh, 0x6240;"]
    lines.append("}")
    return "\n".join(lines)


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


if triton is not None:

    @triton.jit
    def _route_kernel(index_ptr, weight_ptr, tok_ptr, inverse_ptr, ends_ptr, wrow_ptr, R, K: tl.constexpr,
                      E: tl.constexpr, E_POW2: tl.constexpr, R_POW2: tl.constexpr, BLOCK_J: tl.constexpr):
        """:func:`route` in one program: a row's place in expert order is the number of rows of a lower
        expert plus the earlier rows of its own (a stable counting sort), counted over ``BLOCK_J`` rows at a
        time; rows then scatter to their places. Replaces a sort, a scatter, a search and three gathers:
        about ten kernels a layer and decode step, each a few microseconds."""
        i = tl.arange(0, R_POW2)
        valid = i < R
        e = tl.load(index_ptr + i, mask=valid, other=E).to(tl.int32)  # rows past R sort after every expert
        pos = tl.zeros((R_POW2,), dtype=tl.int32)
        for j0 in range(0, R, BLOCK_J):
            j = j0 + tl.arange(0, BLOCK_J)
            ej = tl.load(index_ptr + j, mask=j < R, other=E).to(tl.int32)
            before = (ej[None, :] < e[:, None]) | ((ej[None, :] == e[:, None]) & (j[None, :] < i[:, None]))
            pos += tl.sum(before.to(tl.int32), axis=1)
        tl.store(inverse_ptr + i, pos.to(tl.int64), mask=valid)
        tl.store(tok_ptr + pos, (i // K).to(tl.int64), mask=valid)
        tl.store(wrow_ptr + pos, tl.load(weight_ptr + i, mask=valid, other=0).to(tl.float32), mask=valid)
        ex = tl.arange(0, E_POW2)
        ends = tl.sum(((e[None, :] <= ex[:, None]) & valid[None, :]).to(tl.int32), axis=1)
        tl.store(ends_ptr + ex, ends, mask=ex < E)


# up to this many (token, expert) rows route() runs its one-program kernel: its compares grow with rows^2; at
# 1,024 rows (a 512-token prefill chunk) it took about 0.7 ms a layer on the H200 (`git show
# b92138d:bench/generation_mixtral/profile_decode_0204.txt` vs _0224.txt), where torch's sort does not reach the
# profiles' top 30
ROUTE_KERNEL_ROWS = 256


def route(index: torch.Tensor, weights: torch.Tensor, num_experts: int, kernel: bool = True):
    """Rows sorted by expert (stable): ``(token_of_row, inverse, ends, weight_of_row)``; all on the device.
    ``inverse[i]`` is the sorted place of row ``i`` (= token ``i // k``'s ``i % k``-th expert),
    ``ends[e]`` the end of expert ``e``'s rows (int32). Up to :data:`ROUTE_KERNEL_ROWS` rows (every decode
    step, a short prompt's prefill, a small training batch) one Triton program does it all (``kernel``); more
    rows use torch's sort."""
    k, rows = index.shape[1], index.numel()
    flat = index.reshape(-1)
    if kernel and use_triton(flat) and 0 < rows <= ROUTE_KERNEL_ROWS:
        token_of_row = torch.empty(rows, dtype=torch.int64, device=flat.device)
        inverse = torch.empty_like(token_of_row)
        ends = torch.empty(num_experts, dtype=torch.int32, device=flat.device)
        w_row = torch.empty(rows, dtype=torch.float32, device=flat.device)
        r_pow2 = max(16, triton.next_power_of_2(rows))
        _launch(_route_kernel, (1,), flat, flat.contiguous(), weights.reshape(-1).contiguous(), token_of_row, inverse,
                ends, w_row, rows, K=k, E=num_experts, E_POW2=max(2, triton.next_power_of_2(num_experts)),
                R_POW2=r_pow2, BLOCK_J=min(r_pow2, 64), num_warps=4)
        return token_of_row, inverse, ends, w_row
    order = torch.argsort(flat, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    experts = torch.arange(num_experts, device=flat.device, dtype=flat.dtype)
    # searchsorted, unlike CUDA's bincount, needs no device-to-host sync
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
    k, fuse = index.shape[1], bool(module.decode_fuse)
    token_of_row, inverse, ends, w_row = route(index, weights, module.num_experts, kernel=fuse)
    x = hidden.to(module.gate_up.quant_state.dtype)
    kw = dict(split_bytes=module.decode_split_bytes, kernel=module.decode_kernel, lut=module.decode_lut,
              gemv_rows=module.decode_gemv_rows, reduce=not fuse, prmt_rows=module.decode_prmt_rows,
              split_programs=module.decode_split_programs)
    # fused: the split-K partial sums are added inside the SwiGLU and the gather-sum (no pass of their own)
    h = nf4_moe_matmul(x, module.gate_up, ends, index.numel(), token_of_row, **kw)
    a = swiglu_forward(h, w_row, x.dtype)
    y = nf4_moe_matmul(a, module.down, ends, index.numel(), None, **kw)
    return gather_sum(y, inverse, k, x.dtype).to(hidden.dtype)


def parse_decode_options(text: str) -> dict:
    """``"kernel=v2,lut=code,max_rows=256"`` -> ``{"kernel": "v2", "lut": "code", "max_rows": 256}``, each
    name and value checked (a typo names the bad item instead of being ignored)."""
    out: dict = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep:
            raise ValueError(f"decode option {item!r}: expected NAME=VALUE with NAME one of {', '.join(DECODE_OPTIONS)}")
        if name in out:
            raise ValueError(f"decode option {item!r}: {name} given twice")
        out[name] = value
    return check_decode_options(out)


def check_decode_options(options: dict) -> dict:
    """``options`` with each name checked against DECODE_OPTIONS and each value converted and checked (a
    whole number may come as a string of digits, as from the command line)."""
    out = {}
    for name, value in options.items():
        where = f"{name}={value}"
        kind = DECODE_OPTIONS.get(name)
        if kind is None:
            raise ValueError(f"decode option {where!r}: unknown NAME; NAME is one of {', '.join(DECODE_OPTIONS)} "
                             "(expected NAME=VALUE with NAME one of these)")
        if kind is int:
            if isinstance(value, str) and value.isdigit():
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"decode option {where!r}: {name} takes a whole number >= 0")
        else:
            if isinstance(value, str) and all(isinstance(v, int) for v in kind) and value.isdigit():
                value = int(value)  # a whole-number choice (fuse) from the command line
            if value not in kind or isinstance(value, bool):
                raise ValueError(f"decode option {where!r}: {name} is one of {', '.join(map(str, kind))}")
        out[name] = value
    return out


def configure_decode(model, options: dict) -> int:
    """Set ``decode_<name>`` on every 4-bit expert module of ``model`` (names and values checked as
    :func:`parse_decode_options` checks them); returns how many modules were set, and refuses a model that has
    none (the settings would silently do nothing). Captured decode graphs notice the change
    (:func:`phyassist.models.generation._adapter_state` reads these attributes)."""
    checked = check_decode_options(options)
    n = 0
    for m in model.modules():
        if hasattr(m, "decode_max_rows"):
            for name, value in checked.items():
                setattr(m, f"decode_{name}", value)
            n += 1
    if n == 0:
        raise ValueError(f"configure_decode: {type(model).__name__} has no 4-bit expert modules to configure")
    return n
