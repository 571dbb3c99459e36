"""Offline look at the routed NF4 kernels' machine code, no GPU needed: compile v1 and the v2 kernels (every
decoding and autotune config, nested scales, row gather, bf16) for sm_90 with the installed Triton's own ptxas, and print
per config the SASS instructions of the main loop per packed byte a thread handles, its loads per byte, and the
registers and spills (cuobjdump). A static count, not a time: it says how many instructions each byte costs
and whether a change added any (layout conversions, spills), not how the loads overlap on a GPU;
``bench/decode_kernels.py`` measures that.

    python bench/decode_kernels_sass.py            # ~1 min on one CPU; needs Triton's NVIDIA backend

The device runs Triton 3.6; another Triton lays the kernels out differently (the kit's venv has 3.9 here),
so compare with that version first on the path: ``bench/decode_kernels_sass.txt`` was made with

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0
    PYTHONPATH=$PWD /tmp/t36/bin/python -c "import sys, runpy; sys.path.append('<kit venv site-packages>'); \
        sys.argv = ['x']; runpy.run_path('bench/decode_kernels_sass.py', run_name='__main__')"
"""

from __future__ import annotations

import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def _bin(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def loop_stats(cubin: bytes) -> tuple[collections.Counter, str]:
    """SASS opcodes of the longest backward-branch loop, and cuobjdump's resource line."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([_bin("nvdisasm"), "-c", str(path)], capture_output=True, text=True).stdout
        res = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True, text=True)
    labels, seq = {}, []
    for line in sass.splitlines():
        if m := re.match(r"\s*(\.L_x_\d+):", line):
            labels[m.group(1)] = len(seq)
        if m := re.search(r"/\*[0-9a-f]+\*/\s+(.*?);", line):
            seq.append(m.group(1).strip())
    loops = [(i - labels[m.group(1)], labels[m.group(1)], i) for i, t in enumerate(seq)
             if (m := re.search(r"BRA\s+`?\(?(\.L_x_\d+)", t)) and labels.get(m.group(1), i + 1) <= i]
    _, a, b = max(loops) if loops else (0, 0, len(seq) - 1)
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in seq[a:b + 1])
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res.stdout)
    return ops, (f"{m.group(1)} regs, {m.group(4)} B spilled" if m else "?")


def compile_sm90(fn, types: dict, consts: dict, warps: int, stages: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    div16 = [n for n in fn.arg_names if n.endswith("_ptr") or n in ("N", "K", "KH", "CHUNK")]  # as a launch sees them
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    import triton

    from phyassist.models.mixtral4bit import decode as d

    print(f"triton {triton.__version__}, sm_90; per packed byte a thread handles in one loop step")
    ptrs = dict(x_ptr="*bf16", xw_ptr="*i32", tok_ptr="*i64", row_expert_ptr="*i64", ends_ptr="*i32",
                packed_ptr="*u8", code_ptr="*fp32", absmax_ptr="*u8", code2_ptr="*fp32", absmax2_ptr="*fp32",
                offset_ptr="*fp32", y_ptr="*fp32", N="i32", K="i32", KH="i32", ROWS="i32", CHUNK="i32",
                ROW_BUCKET="i32")
    from bitsandbytes.functional import get_4bit_type

    asm = d.prmt_asm(get_4bit_type("nf4", device="cpu"), torch.bfloat16)
    runs = [("v1", d._nf4_moe_gemv_kernel, c, {"QBLOCK": 64}, c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_B"])
            for c in d._GEMV_CONFIGS]
    for lut, name in enumerate(d.LUTS):  # code, pair, code16, prmt
        extra = {"LUT": lut, "HALF_BITS": 16, "ASM": asm if name == "prmt" else ""}
        runs += [(f"gemv2 {name}", d._nf4_gemv_v2_kernel, c, extra, c.kwargs["BLOCK_N"] * c.kwargs["NB"] * 32)
                 for c in d._GEMV2_CONFIGS]
        runs += [(f"mm2 {name}", d._nf4_mm_v2_kernel, c,
                  dict(extra, E=8, E_POW2=8, PRECISION=None, DOT_F32=False), c.kwargs["BLOCK_N"] * c.kwargs["NB"] * 32)
                 for c in d._mm2_configs(one_block=lut >= 2)]
    for name, fn, cfg, extra, tile_bytes in runs:
        lut = extra.get("LUT", 0)
        types = dict(ptrs, lut_ptr={0: "*fp32", 1: "*i64"}.get(lut, "*bf16"))
        consts = dict(NESTED=True, GATHER=True, BLOCKS_PER_BLOCK2=256, **extra, **cfg.kwargs)
        k = compile_sm90(fn, types, consts, cfg.num_warps, cfg.num_stages)
        ops, res = loop_stats(k.asm["cubin"])
        per = tile_bytes / (32 * cfg.num_warps)
        loads = sum(v for op, v in ops.items() if op in ("LDG", "LDGSTS"))
        top = ", ".join(f"{op} {v / per:.1f}" for op, v in ops.most_common(6))
        print(f"{name:12s} {str(cfg.kwargs):84s} w{cfg.num_warps} s{cfg.num_stages}: "
              f"{sum(ops.values()) / per:5.1f} instr/byte, {loads / per:4.2f} global loads/byte, {res}  ({top})",
              flush=True)


if __name__ == "__main__":
    main()
