"""The v2 routed NF4 kernels of phyassist.models.mixtral4bit.decode (issue 22: ``gemv2``, ``mm2`` and the
``v2`` dispatch between them, the ``code``, ``pair`` and ``code16`` nibble decodings), the routing kernel and
the split-K partial sums, against the dequantized reference; the ``prmt`` decoding's PTX in an emulator of its
five instructions (the kernels run it on GPUs only)
(``_torch_moe_matmul``): in Triton's CPU interpreter in ``make test`` (small shapes, uneven expert
counts, nested and plain scales, with and without the row gather, K split or not), and at
Mixtral-8x7B's shapes on a GPU (``gpu``)."""

import pytest
import torch
from conftest import run_in_triton_interpreter

from phyassist.models.mixtral4bit.decode import (KERNELS, _pair_table, _torch_moe_matmul, nf4_moe_matmul, prmt_asm,
                                                  route)
from phyassist.models.mixtral4bit.experts import Packed4bit


def _weights(E, N, K, nested, dtype, device, seed=0):
    """Random experts quantized by bitsandbytes; drawn on their device (Mixtral's are 8 x 117 M values)."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(E, N, K, generator=g, device=device) * 0.05
    return Packed4bit(w.to(dtype), "nf4", double_quant=nested)


def _rows(counts, K, dtype, device, gather, seed=1):
    """Inputs for rows sorted by expert: ``(x, ends, rows, token_of_row)``; with ``gather`` the rows
    read ``x`` through a random token index (as gate/up does), else row ``r`` reads ``x[r]``."""
    g = torch.Generator().manual_seed(seed)
    rows = sum(counts)
    tokens = max(1, (rows + 1) // 2) if gather else rows
    x = torch.randn(tokens, K, generator=g).to(device, dtype)
    tok = torch.randint(0, tokens, (rows,), generator=g).to(device) if gather else None
    ends = torch.tensor(counts).cumsum(0).to(device, torch.int32)
    return x, ends, rows, tok


def _agree(out, ref, rtol, what):
    """Max error within ``rtol`` of the largest reference output."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, what
    scale = ref.float().abs().max().item()
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= rtol * scale, (what, err, scale)


def _wrong_expert(x, packed, ends, rows, tok):
    """The reference with every row sent to the next expert: what a kernel that mapped rows (or
    programs) to the wrong expert would give; the tolerance must be far below its distance."""
    w = packed.dequantize().float()
    e = torch.searchsorted(ends, torch.arange(rows, device=ends.device, dtype=ends.dtype), right=True)
    xs = (x if tok is None else x.index_select(0, tok)).float()
    return torch.einsum("rk,rnk->rn", xs, w[(e + 1) % w.shape[0]])


def check_kernels(device="cpu", dtype=torch.float32, rtol=1e-5, E=4, N=40, K=256, combos=None,
                  cases=(("gemv2", (2, 0, 3, 1)), ("mm2", (0, 13, 2, 25))), prefetch=True):
    """Every v2 kernel against the reference, over nested / plain scales, the three decodings, with and
    without the row gather, K split in two or whole. Shapes are small (the interpreter runs each program
    in Python): N = 40 leaves a partial column tile; 40 rows with an expert of none and one of 25 leave
    partial row tiles; K = 256 is 4 quant blocks, two steps of the interpreter's 2-block tiles (four of the
    1-block tiles the multi-row kernel takes with ``code16``)."""
    combos = combos or [(True, "code", True, 64), (True, "pair", False, 0), (False, "code", False, 64),
                        (False, "pair", True, 0), (True, "code16", False, 64),
                        (False, "code16", True, 0)]  # (nested, lut, gather, split bytes): each value at least twice
    from phyassist.models.mixtral4bit import decode

    decode.INTERPRETER_TILES["gemv"]["PREFETCH"] = prefetch  # the GEMV's two loops (next tile loaded ahead or not)
    for nested, lut, gather, split in combos:
        packed = _weights(E, N, K, nested, dtype, device)
        for kernel, counts in cases:
            x, ends, rows, tok = _rows(list(counts), K, dtype, device, gather)
            ref = _torch_moe_matmul(x, packed, ends, rows, tok)
            out = nf4_moe_matmul(x, packed, ends, rows, tok, split_bytes=split, kernel=kernel, lut=lut)
            what = (kernel, lut, nested, gather, split, counts)
            _agree(out, ref, rtol, what)
            far = (_wrong_expert(x, packed, ends, rows, tok) - ref.float()).abs().max().item()
            assert far > 10 * rtol * ref.float().abs().max().item(), what


def check_swap(dtype=torch.float32, rtol=1e-5):
    """The multi-row kernel's transposed tiles (``SWAP``: ``W @ x.T``) and its prefetching loop (``PREFETCH``)
    against the reference, with the scale applied to the weights (``code``, 2 blocks a step) and to each
    block's dot product (``code16``); two steps a split (the prefetch past a split's end is masked)."""
    from phyassist.models.mixtral4bit import decode

    for nested, lut, nb, gather, swap, prefetch in ((True, 0, 2, True, True, False), (False, 2, 1, False, True, True),
                                                     (True, 2, 1, True, False, True), (False, 0, 2, True, False, True)):
        packed = _weights(4, 40, 256, nested, dtype, "cpu")
        x, ends, rows, tok = _rows([0, 13, 2, 25], 256, dtype, "cpu", gather)
        ref = _torch_moe_matmul(x, packed, ends, rows, tok)
        tiles = {"BLOCK_M": 16, "BLOCK_N": 32, "NB": nb, "SWAP": swap, "PREFETCH": prefetch}
        split = 64 if nb == 1 else 128
        out = decode._v2_matmul(x, packed, ends, rows, tok, split, True, lut, tiles=tiles).sum(0).to(dtype)
        _agree(out, ref, rtol, ("swap", lut, nested, gather, swap, prefetch))


def check_route(cases=((1, 8, 2), (3, 8, 2), (64, 8, 2), (100, 8, 2), (128, 8, 2), (300, 8, 2), (40, 6, 1),
                       (50, 6, 3), (5, 3, 2))):
    """route()'s one-program kernel (up to ROUTE_KERNEL_ROWS rows) against torch's stable sort: the same four
    tensors, bit for bit, for (tokens, experts, top-k) at row counts below, at and above a power of two and over
    BLOCK_J, experts not a power of two, k of 1 to 3; torch's sort is made to fail where the kernel must run,
    and past the kernel's limit torch's path must run."""
    from phyassist.models.mixtral4bit import decode

    g = torch.Generator().manual_seed(0)
    argsort = torch.argsort
    for tokens, experts, k in cases:
        index = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])  # distinct, as top-k
        weights = torch.rand(tokens, k, generator=g).to(torch.bfloat16)
        flat = index.reshape(-1)
        order = argsort(flat, stable=True)
        want = (order // k, argsort(order), torch.searchsorted(flat[order], torch.arange(experts), right=True).int(),
                weights.reshape(-1)[order].float())
        kernel = flat.numel() <= decode.ROUTE_KERNEL_ROWS
        used = []

        def spy(*a, **kw):
            used.append(1)
            assert not kernel, "torch's sort ran where the route kernel should"
            return argsort(*a, **kw)

        torch.argsort = spy
        try:
            got = decode.route(index, weights, experts)
        finally:
            torch.argsort = argsort
        assert bool(used) != kernel, (tokens, experts, k)
        for name, a, b in zip(("token_of_row", "inverse", "ends", "w_row"), got, want):
            assert a.dtype == b.dtype and torch.equal(a, b), (tokens, experts, k, name)


def check_partials():
    """The SwiGLU and the gather-sum fed split-K partial sums ``[splits, rows, width]`` (fp32) agree with the
    separate sum, rounding and op they replace (within one bf16 step: the interpreter's float-to-bf16
    conversion does not round to nearest as torch's and CUDA's do)."""
    from phyassist.models.mixtral4bit.kernels import gather_sum, swiglu_forward

    g = torch.Generator().manual_seed(0)
    for splits in (1, 3):
        h = torch.randn(splits, 6, 2 * 40, generator=g)
        w = torch.rand(6, generator=g)
        ref = swiglu_forward(h.sum(0).to(torch.bfloat16), w)
        _agree(swiglu_forward(h, w, torch.bfloat16), ref, 2 ** -7, ("swiglu", splits))
        y = torch.randn(splits, 6, 40, generator=g)
        idx = torch.randperm(6, generator=g)
        ref = gather_sum(y.sum(0).to(torch.bfloat16), idx, 2)
        out = gather_sum(y, idx, 2, torch.bfloat16)
        _agree(out, ref, 2 ** -7, ("gather_sum", splits))


def check_dispatch(device="cpu", dtype=torch.float32, rtol=1e-5):
    """Kernel ``v2``: the GEMV up to ``gemv_rows`` rows, the multi-row kernel past them (a single row
    here: a tile of 16 rows with one filled); both right."""
    packed = _weights(4, 40, 128, True, dtype, device)
    x, ends, rows, tok = _rows([0, 0, 1, 0], 128, dtype, device, True)
    ref = _torch_moe_matmul(x, packed, ends, rows, tok)
    for gemv_rows in (0, 1):
        out = nf4_moe_matmul(x, packed, ends, rows, tok, split_bytes=0, kernel="v2", gemv_rows=gemv_rows)
        _agree(out, ref, rtol, ("v2", gemv_rows))


def _module(dtype=torch.float32, device="cpu"):
    """Quant4bitExperts over 4 random SiLU-gated experts (hidden 256, intermediate 256; transformers'
    fused-expert layout, without importing transformers) and 2 tokens routed top-2."""
    from phyassist.models.mixtral4bit.experts import Quant4bitExperts

    torch.manual_seed(0)
    ex = torch.nn.Module()
    ex.gate_up_proj = torch.nn.Parameter(torch.randn(4, 2 * 256, 256) * 0.05)
    ex.down_proj = torch.nn.Parameter(torch.randn(4, 256, 256) * 0.05)
    ex.act_fn = torch.nn.SiLU()
    q = Quant4bitExperts(ex.to(device), compute_dtype=dtype, double_quant=True)
    x = torch.randn(2, 256, device=device, dtype=dtype)
    w, idx = torch.softmax(torch.randn(2, 4, device=device), -1).topk(2, -1)
    return q, x, idx, w


def check_module(atol=1e-5, dtype=torch.float32):
    """routed_experts through the module's switches (decode_kernel, decode_lut, decode_gemv_rows, decode_fuse: the
    multi-row kernel for gate/up with the gather, then down) against the training path's experts (every
    expert dequantized, grouped GEMM)."""
    from phyassist.models.mixtral4bit.decode import routed_experts

    q, x, idx, w = _module(dtype)
    with torch.inference_mode():
        q.decode_max_rows = 0
        ref = q(x, idx, w)
        # fuse: route kernel, partials summed in place; split 64 bytes: K in 2 (both matmuls), so 2 partial sums
        for lut, fuse, split in (("pair", 0, 0), ("code", 1, 0), ("code16", 1, 64), ("code", 1, 64), ("prmt", 1, 64)):
            q.decode_kernel, q.decode_lut, q.decode_gemv_rows, q.decode_fuse = "v2", lut, 0, fuse
            q.decode_split_bytes, q.decode_split_programs = split, 0  # split_bytes applies
            out = routed_experts(q, x, idx, w)
            err = (out.float() - ref.float()).abs().max().item()
            assert err <= atol * max(1.0, ref.abs().max().item()), (lut, fuse, split, err)
        # decode_split_programs: the split chosen per call for about that many programs, split_bytes then unused
        from phyassist.models.mixtral4bit import decode

        real, calls = decode.split_for_programs, []
        launch, splits = decode._v2_matmul, []
        decode.split_for_programs = lambda *a: calls.append(a) or real(*a)
        decode._v2_matmul = lambda *a, **k: splits.append(launch(*a, **k)) or splits[-1]
        try:
            q.decode_lut, q.decode_fuse, q.decode_split_bytes, q.decode_split_programs = "code16", 1, 0, 64
            out = routed_experts(q, x, idx, w)
        finally:
            decode.split_for_programs, decode._v2_matmul, q.decode_split_programs = real, launch, 0
        rows = idx.numel()
        assert calls == [(rows, q.num_experts, 2 * q.intermediate_dim, q.hidden_dim, 64),
                         (rows, q.num_experts, q.hidden_dim, q.intermediate_dim, 64)], calls
        # the kernels ran with that split: as many partial sums as K has chunks of it (split_bytes 0 gives one)
        assert [part.shape[0] for part in splits] == [c[3] // 2 // real(*c) for c in calls], splits
        assert all(part.shape[0] > 1 for part in splits)
        err = (out.float() - ref.float()).abs().max().item()
        assert err <= atol * max(1.0, ref.abs().max().item()), ("split_programs", err)


def test_module_switch_reaches_the_kernel():
    """decode_kernel is passed through (an unknown name is refused); the defaults are the measured choice."""
    from phyassist.models.mixtral4bit.decode import routed_experts
    from phyassist.models.mixtral4bit.decode import DECODE_DEFAULTS

    q, x, idx, w = _module()
    assert (q.decode_kernel, q.decode_lut, q.decode_max_rows) == ("v2", "code16", 128) == (
        DECODE_DEFAULTS["kernel"], DECODE_DEFAULTS["lut"], DECODE_DEFAULTS["max_rows"])
    q.decode_kernel = "nope"
    with torch.inference_mode(), pytest.raises(ValueError, match="nope"):
        routed_experts(q, x, idx, w)


def test_split_for_programs_fills_the_grid_with_whole_quant_blocks():
    """K's split gives about the asked programs: none at batch 64's gate/up (tiles enough), more where rows are few;
    a power of two of splits that divides K's quant blocks (Mixtral's down: 224 = 7 x 32), never below one block;
    one expert is the dense projections' split (dense_split_bytes)."""
    from phyassist.models.mixtral4bit.decode import dense_split_bytes, split_for_programs

    assert split_for_programs(128, 8, 28672, 4096, 1024) == 2048  # 224 x 15 tiles: K whole
    assert split_for_programs(2, 8, 28672, 4096, 1024) == 512  # 224 x 2 tiles: 4 splits
    assert split_for_programs(2, 8, 4096, 14336, 1024) == 448  # 32 x 2 tiles: 16 splits of 14 blocks
    assert split_for_programs(1, 8, 128, 14336, 10 ** 6) == 224  # 32 splits of 7 blocks; 7 is odd: no further
    assert split_for_programs(64, 1, 4096, 4096, 1024) == dense_split_bytes(64, 4096, 4096, 1024) == 256
    assert split_for_programs(128, 8, 4096, 14336, 1024) == 14336 // 2 // 4  # 32 x 15 tiles: 4 splits


def test_pair_table_holds_both_codes():
    """Entry b of the 256-entry table: code[b >> 4] in the high word, code[b & 15] in the low one."""
    import bitsandbytes.functional as bnbf

    _, state = bnbf.quantize_4bit(torch.randn(4, 64), blocksize=64, quant_type="nf4")
    table = _pair_table(state)
    assert table.dtype == torch.int64 and table.shape == (256,) and _pair_table(state) is table  # cached
    words = table.view(torch.int32).view(256, 2).view(torch.float32)
    b = torch.arange(256)
    assert torch.equal(words[:, 1], state.code[b >> 4]) and torch.equal(words[:, 0], state.code[b & 15])


def _ptx(asm: str, *inputs: int) -> dict:
    """Run ``asm`` (the subset :func:`prmt_asm` writes: mov, and, or, shr, prmt on .b32) on ``inputs`` (``$4``
    onwards after the four outputs); returns every register. ``prmt`` as the PTX manual defines its default
    mode: selector nibble ``k`` picks byte ``sel & 7`` of ``{b, a}``, and ``sel & 8`` replicates that byte's
    sign instead (what an unmasked nibble would do)."""
    regs = {f"${4 + i}": v for i, v in enumerate(inputs)}

    def val(op):
        return regs[op] if op in regs else int(op, 0)

    def prmt(a, b, c):
        src, out = a | (b << 32), 0
        for k in range(4):
            sel = (c >> (4 * k)) & 0xF
            byte = (src >> (8 * (sel & 7))) & 0xFF
            out |= ((0xFF if byte & 0x80 else 0) if sel & 8 else byte) << (8 * k)
        return out

    ops = {"mov.b32": lambda a: a, "and.b32": lambda a, b: a & b, "or.b32": lambda a, b: a | b,
           "shr.b32": lambda a, b: a >> b, "prmt.b32": prmt}
    for line in asm.split("\n"):
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, _, rest = line.partition(" ")
        dst, *src = [t.strip() for t in rest.split(",")]
        regs[dst] = ops[op](*map(val, src)) & 0xFFFFFFFF  # an unknown instruction is a KeyError
    return regs


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_prmt_table_is_the_states_code(quant_type):
    """The kernels' PTX comes from bitsandbytes' host table of the state's quant type (no device copy during a
    CUDA graph capture): the same PTX as from the state's own code, and kept on the state."""
    from phyassist.models.mixtral4bit.decode import _prmt_table_asm

    state = _weights(2, 8, 64, True, torch.float32, "cpu").quant_state if quant_type == "nf4" else \
        Packed4bit(torch.randn(2, 8, 64), "fp4").quant_state
    for dtype in (torch.bfloat16, torch.float16):
        assert _prmt_table_asm(state, dtype) == prmt_asm(state.code, dtype)
        assert _prmt_table_asm(state, dtype) is _prmt_table_asm(state, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prmt_decoding_gives_the_code16_values(dtype):
    """Every byte value in each of the four positions of a word, with random neighbours: the PTX's four
    outputs hold code[high nibble] of bytes 0-1, 2-3 and code[low nibble] of bytes 0-1, 2-3, two 16-bit
    values a register (element 0 in the low half), i.e. exactly the ``code16`` table's bits."""
    import bitsandbytes.functional as bnbf

    _, state = bnbf.quantize_4bit(torch.randn(4, 64), blocksize=64, quant_type="nf4")
    asm = prmt_asm(state.code, dtype)
    table = [int(v) & 0xFFFF for v in state.code.to(dtype).view(torch.int16).tolist()]
    g = torch.Generator().manual_seed(0)
    for pos in range(4):
        for b in range(256):
            word = torch.randint(0, 256, (4,), generator=g).tolist()
            word[pos] = b
            regs = _ptx(asm, sum(v << (8 * i) for i, v in enumerate(word)))
            got = [(regs[r] >> sh) & 0xFFFF for r in ("$0", "$1", "$2", "$3") for sh in (0, 16)]
            want = [table[v >> 4] for v in word] + [table[v & 15] for v in word]
            assert got == want, (pos, b, word)
    with pytest.raises(ValueError, match="16-bit"):
        prmt_asm(state.code, torch.float32)


def check_prmt_fallback():
    """In Triton's interpreter (no inline PTX) ``prmt``, and ``code16`` past ``prmt_rows``, run the ``code16``
    kernels: the same result bit for bit, through the GEMV and the multi-row kernel."""
    packed = _weights(4, 32, 128, True, torch.float32, "cpu")
    x, ends, rows, tok = _rows([2, 0, 1, 3], 128, torch.float32, "cpu", True)
    for kernel in ("gemv2", "mm2"):
        want = nf4_moe_matmul(x, packed, ends, rows, tok, kernel=kernel, lut="code16")
        assert torch.equal(nf4_moe_matmul(x, packed, ends, rows, tok, kernel=kernel, lut="prmt"), want)
        assert torch.equal(nf4_moe_matmul(x, packed, ends, rows, tok, kernel=kernel, lut="code16", prmt_rows=1), want)


def test_unknown_kernel_is_refused():
    packed = _weights(2, 8, 64, False, torch.float32, "cpu")
    with pytest.raises(ValueError, match="kernel"):
        nf4_moe_matmul(torch.zeros(1, 64), packed, torch.tensor([1, 1], dtype=torch.int32), 1, kernel="v3")
    assert KERNELS == ("v1", "gemv2", "mm2", "v2")


def test_without_triton_every_kernel_is_the_reference():
    """CPU builds of torch (no interpreter): every kernel name runs the dequantized maths."""
    packed = _weights(4, 32, 128, True, torch.float32, "cpu")
    x, ends, rows, tok = _rows([2, 0, 1, 3], 128, torch.float32, "cpu", True)
    ref = _torch_moe_matmul(x, packed, ends, rows, tok)
    for kernel in KERNELS:
        assert torch.equal(nf4_moe_matmul(x, packed, ends, rows, tok, kernel=kernel), ref)


def test_v2_kernels_match_the_reference_in_triton_interpreter():
    """One interpreter process (its imports take most of the time): the kernels, the v2 dispatch and
    the module's switches. fp32: 1e-5 of the largest output; bf16: within two bf16 steps (the GEMV
    never rounds the weights, the multi-row kernel rounds them as the reference does with ``code`` and
    ``pair``, and rounds the codes, not the scaled weights, with ``code16``)."""
    run_in_triton_interpreter("import tests.test_decode_kernels as t; t.check_kernels(); t.check_dispatch(); "
                              "t.check_kernels(dtype=torch.bfloat16, rtol=2 ** -7, combos=[(True, 'code', True, 64), "
                              "(True, 'code16', True, 64)], prefetch=False); t.check_module(); "
                              "t.check_module(atol=2 ** -6, dtype=torch.bfloat16); t.check_route(); t.check_partials(); "
                              "t.check_swap(); t.check_swap(torch.bfloat16, 2 ** -7); t.check_prmt_fallback()")


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [True, False])
def test_gpu_kernels_match_the_reference_at_mixtral_shapes(has_gpu, nested):
    """Mixtral-8x7B's expert tensors (8 x [2 x 14,336, 4,096] gate/up with the row gather, 8 x [4,096,
    14,336] down) in bf16, 2 to 128 rows (batch 1 to 64, top-2), uneven expert counts: every kernel
    and decoding against the dequantized reference within bf16 rounding of the largest output."""
    E, H, inter = 8, 4096, 14336
    for N, K, gather in ((2 * inter, H, True), (H, inter, False)):
        packed = _weights(E, N, K, nested, torch.bfloat16, "cuda")
        for counts in ((1, 0, 0, 1, 0, 0, 0, 0), (3, 0, 1, 0, 2, 1, 0, 1), (9, 1, 4, 0, 6, 3, 5, 4),
                       (40, 25, 16, 12, 10, 9, 8, 8)):
            x, ends, rows, tok = _rows(list(counts), K, torch.bfloat16, "cuda", gather)
            ref = _torch_moe_matmul(x, packed, ends, rows, tok)
            for kernel in KERNELS:
                for lut in (("code",) if kernel == "v1" else ("code", "pair", "code16", "prmt")):
                    for split in (0, 512):
                        out = nf4_moe_matmul(x, packed, ends, rows, tok, split_bytes=split, kernel=kernel, lut=lut)
                        _agree(out, ref, 2 ** -6, (kernel, lut, split, N, counts))
        del packed
        torch.cuda.empty_cache()


@pytest.mark.gpu
def test_gpu_every_multi_row_tile_matches_the_reference(has_gpu):
    """Each tile of the multi-row autotuner's set (``_MM2_TILES``: the tuner may pick any of them on another GPU or
    shape), fixed, with code16 and prmt (one-block tiles) or code (two-block tiles), against the dequantized reference: bf16, uneven experts of up to 40
    rows with the row gather, K split in 4, partial column tiles (N = 1,000)."""
    from phyassist.models.mixtral4bit import decode

    packed = _weights(8, 1000, 2048, True, torch.bfloat16, "cuda")
    x, ends, rows, tok = _rows([40, 25, 16, 0, 10, 9, 1, 8], 2048, torch.bfloat16, "cuda", True)
    ref = _torch_moe_matmul(x, packed, ends, rows, tok)
    for bm, bn, nb, warps, stages, swap, prefetch in decode._MM2_TILES:
        tiles = {"BLOCK_M": bm, "BLOCK_N": bn, "NB": nb, "SWAP": bool(swap), "PREFETCH": bool(prefetch),
                 "num_warps": warps, "num_stages": stages}
        for lut in ((2, 3) if nb == 1 else (0,)):  # the defaults' decodings; the 2-block tiles take code, pair
            part = decode._v2_matmul(x, packed, ends, rows, tok, 256, True, lut, tiles=tiles)
            out = part.sum(0).to(torch.bfloat16)
            _agree(out, ref, 2 ** -6, (tiles, lut))


@pytest.mark.gpu
def test_gpu_route_and_partial_sums_match_torch(has_gpu):
    """route()'s kernel and the SwiGLU / gather-sum over split-K partials on the GPU, as in the interpreter."""
    from phyassist.models.mixtral4bit import kernels

    g = torch.Generator().manual_seed(0)
    for tokens in (1, 16, 64, 128):  # up to 256 rows: the kernel (ROUTE_KERNEL_ROWS)
        index = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(tokens)]).cuda()
        weights = torch.rand(tokens, 2, generator=g).to(torch.bfloat16).cuda()
        flat = index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        want = (order // 2, torch.argsort(order),
                torch.searchsorted(flat[order], torch.arange(8, device="cuda"), right=True).int(),
                weights.reshape(-1)[order].float())
        for a, b in zip(route(index, weights, 8), want):
            assert a.dtype == b.dtype and torch.equal(a, b), tokens
    h = torch.randn(4, 128, 2 * 14336, device="cuda")
    w = torch.rand(128, device="cuda")
    _agree(kernels.swiglu_forward(h, w, torch.bfloat16), kernels.swiglu_forward(h.sum(0).bfloat16(), w), 2 ** -7,
           "swiglu")
    y = torch.randn(14, 128, 4096, device="cuda")
    idx = torch.randperm(128, device="cuda")
    _agree(kernels.gather_sum(y, idx, 2, torch.bfloat16), kernels.gather_sum(y.sum(0).bfloat16(), idx, 2), 2 ** -7,
           "gather_sum")


def test_decode_options_are_parsed_checked_and_set_on_every_expert_module():
    """The settings string of the benchmarks (``--decode``) names every bad item, and configure_decode sets
    them on each 4-bit expert module."""
    from phyassist.models.mixtral4bit.decode import configure_decode, parse_decode_options

    assert parse_decode_options("kernel=v2, lut = pair,gemv_rows=2,max_rows=256,") == {
        "kernel": "v2", "lut": "pair", "gemv_rows": 2, "max_rows": 256}
    assert parse_decode_options("") == {}
    assert parse_decode_options("fuse=0") == {"fuse": 0}
    for bad, match in (("kernel=v3", "kernel is one of"), ("rows=4", "NAME one of"), ("max_rows=-1", "whole number"),
                       ("lut", "NAME=VALUE"), ("lut=code,lut=pair", "given twice"), ("fuse=2", "fuse is one of")):
        with pytest.raises(ValueError, match=match):
            parse_decode_options(bad)
    q = _module()[0]
    model = torch.nn.ModuleList([q, torch.nn.Linear(2, 2)])
    assert configure_decode(model, {"kernel": "gemv2", "max_rows": 64}) == 1
    assert (q.decode_kernel, q.decode_max_rows, q.decode_lut) == ("gemv2", 64, "code16")
    for bad, match in (({"kernal": "v2"}, "NAME is one of"), ({"max_rows": "64"}, None), ({"max_rows": True}, "whole")):
        if match is None:  # a digit string is taken, as on the command line
            configure_decode(model, bad)
            assert q.decode_max_rows == 64
            continue
        with pytest.raises(ValueError, match=match):
            configure_decode(model, bad)
    with pytest.raises(ValueError, match="no 4-bit expert modules"):
        configure_decode(torch.nn.Linear(2, 2), {"kernel": "v2"})


def _cells(ms: dict) -> list[dict]:
    """bench/decode_kernels.py cells from {(method, rows): layer ms}: split over gate/up and down and over
    two routings whose mean is the given figure."""
    cells = []
    for (method, rows), t in ms.items():
        for dist, f in (("uniform", 0.8), ("zipf", 1.2)):
            for matmul in ("gate_up", "down"):
                cells.append({"nested": True, "dist": dist, "rows": rows, "matmul": matmul, "method": method,
                              "median_ms": t * f / 2})
                cells.append({"nested": False, "dist": dist, "rows": rows, "matmul": matmul, "method": method,
                              "median_ms": 99.0})  # plain scales: not what the study's configs use
    return cells


def test_choose_picks_the_decode_settings_the_figures_support():
    """bench/decode_kernels.py --choose: v2 only when it wins at batch 1, the faster decoding, the GEMV
    while it beats the multi-row kernel, routed rows while they beat dequantizing the layer."""
    from bench.decode_kernels import choose

    rows = (2, 8, 32, 128)
    deq = dict(zip(rows, (1.2, 1.5, 2.0, 2.0)))
    ms = {("dequant+grouped", r): deq[r] for r in rows}
    ms.update({("v1", r): t for r, t in zip(rows, (0.6, 3.0, 11.0, 40.0))})
    # v2: GEMV best at 2 and 8 rows, multi-row kernel from 32; the pair table slower everywhere
    ms.update({("gemv2-code", r): t for r, t in zip(rows, (0.2, 0.7, 2.5, 9.0))})
    ms.update({("mm2-code", r): t for r, t in zip(rows, (0.5, 0.9, 1.1, 2.4))})
    for kind in ("gemv2", "mm2"):
        ms.update({(f"{kind}-pair", r): ms[(f"{kind}-code", r)] + 0.1 for r in rows})
    assert choose(_cells(ms)) == {"kernel": "v2", "lut": "code", "gemv_rows": 8, "max_rows": 32}
    # the v2 kernels lose at batch 1: v1, routed while it beats the dequantization (2 rows)
    ms.update({("gemv2-code", 2): 0.9, ("mm2-code", 2): 0.9, ("gemv2-pair", 2): 0.95, ("mm2-pair", 2): 0.95})
    assert choose(_cells(ms)) == {"kernel": "v1", "lut": "code", "max_rows": 2}
    # only v1 measured (a run without the v2 methods)
    assert choose(_cells({k: v for k, v in ms.items() if k[0] in ("v1", "dequant+grouped")})) == {
        "kernel": "v1", "lut": "code", "max_rows": 2}
    # only the multi-row kernel measured among the v2 ones: it can still be chosen
    only_mm = {k: v for k, v in ms.items() if not k[0].startswith("gemv2")}
    only_mm.update({("mm2-code", 2): 0.3})
    assert choose(_cells(only_mm)) == {"kernel": "v2", "lut": "code", "gemv_rows": 0, "max_rows": 32}
    # a third decoding whose multi-row kernel is faster at every row count is chosen
    only_mm.update({("mm2-code16", r): only_mm[("mm2-code", r)] - 0.05 for r in rows})
    assert choose(_cells(only_mm)) == {"kernel": "v2", "lut": "code16", "gemv_rows": 0, "max_rows": 32}
    # prmt (code16's values by byte permutes): faster at 2 rows, slower at 8, faster from 32 -> from 32 rows
    code16 = {r: only_mm[("mm2-code16", r)] for r in rows}
    only_mm.update({("mm2-prmt", r): code16[r] + d for r, d in zip(rows, (-0.01, 0.01, -0.01, -0.01))})
    assert choose(_cells(only_mm)) == {"kernel": "v2", "lut": "code16", "gemv_rows": 0, "prmt_rows": 32,
                                       "max_rows": 32}
    only_mm.update({("mm2-prmt", r): code16[r] + 0.01 for r in rows})  # slower everywhere: never
    assert choose(_cells(only_mm))["prmt_rows"] == 0
    # prmt's speed counts as code16's from prmt_rows on: a decoding faster than code16's lookups but slower
    # than its prmt loses
    only_mm.update({("mm2-prmt", r): code16[r] - 0.04 for r in rows})
    only_mm.update({("mm2-pair", r): code16[r] - 0.02 for r in rows})
    assert choose(_cells(only_mm)) == {"kernel": "v2", "lut": "code16", "gemv_rows": 0, "prmt_rows": 2,
                                       "max_rows": 32}
    # ... but not below prmt_rows, where prmt does not run: prmt much faster only at 2 rows (then slower), pair
    # a little faster than code16's lookups everywhere: pair (counting prmt at 2 rows would pick code16)
    only_mm.update({("mm2-prmt", r): code16[r] + (-0.04 if r == 2 else 0.01) for r in rows})
    only_mm.update({("mm2-pair", r): code16[r] - 0.005 for r in rows})
    assert choose(_cells(only_mm))["lut"] == "pair"
    # without the dequantizing path nothing says where routing stops paying
    with pytest.raises(ValueError, match="dequant"):
        choose(_cells({k: v for k, v in ms.items() if k[0] != "dequant+grouped"}))
