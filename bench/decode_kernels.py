"""Routed NF4 expert kernels of one Mixtral-8x7B layer by row count (issue 22): the measured v1 GEMV, the v2
GEMV and multi-row kernels (the nibble decodings ``code``, ``pair``, ``code16``, ``prmt``), and the training path's
dequantize-all + grouped GEMM.

One layer's experts (8 x gate/up [2 x 14,336, 4,096] and down [4,096, 14,336]), random weights quantized by
bitsandbytes' ``quantize_4bit`` (blocks of 64; nested scales and plain), for 2, 8, 32 and 128 routed rows
(batch 1, 4, 16, 64 with top-2), experts drawn uniformly or Zipf-like (``p_e ~ 1 / rank^1.2``). Each cell
times each method on gate/up (with the row gather) and on down: median ms of CUDA-event-timed calls after
warm-up (the first call autotunes), L2 flushed before each call (the other layers' weights would have
evicted it), and the effective rate of the NF4 bytes the step needs (packed bytes and block scales of the
experts that got a row, each once; all 8 for the dequantizing path). The chosen autotune configs are
printed and kept in the JSON.

    . bench/device_env.sh && python3 bench/decode_kernels.py --out $OUT/decode_kernels.json   # H200: ~2 min
    python3 bench/decode_kernels.py --tiny --out /tmp/decode_kernels_tiny.json  # CPU smoke check (interpreter)
    python3 bench/decode_kernels.py --choose decode_kernels.json   # the decode settings these figures pick

``--tiny`` runs Triton's CPU interpreter on a small layer (4 experts, 256 wide, 2 and 6 rows, Zipf-like
routing, one call each; about a minute): it checks that every method runs and agrees with the reference,
its times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# every decoding's GEMV and multi-row kernel: --choose sets gemv_rows from the chosen decoding's own GEMV
METHODS = ("v1", "gemv2-code", "gemv2-pair", "gemv2-code16", "gemv2-prmt", "mm2-code", "mm2-code@0", "mm2-pair",
           "mm2-code16", "mm2-prmt", "dequant+grouped")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small layer in Triton's CPU interpreter (smoke check)")
    ap.add_argument("--out", help="raw results (JSON)")
    ap.add_argument("--choose", metavar="JSON", help="print the decode settings a run's figures pick "
                    "(phyassist.models.mixtral4bit.decode.parse_decode_options' format) and exit")
    ap.add_argument("--rows", default=None, help="routed rows per call, comma-separated (default 2,8,32,128)")
    ap.add_argument("--nested", default="1,0", help="double-quantized scales: 1, 0 or both")
    ap.add_argument("--dists", default="uniform,zipf")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="kernel-lut[@split bytes][#tile] (split 512 unless given; tile BMxBNxWARPSxSTAGES[s], see "
                    "fixed_tile) or dequant+grouped")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--zipf", type=float, default=1.2)
    args = ap.parse_args(argv)
    if not args.out and not args.choose:
        ap.error("--out is required (or --choose JSON)")
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # read when Triton is imported
        args.rows = args.rows or "2,6"
        args.dists = "zipf" if args.dists == "uniform,zipf" else args.dists
        args.reps, args.warmup = 0, 0  # the checked call is the only one
    args.rows = [int(r) for r in (args.rows or "2,8,32,128").split(",")]
    return args


def routing(rows: int, E: int, dist: str, alpha: float, gen):
    """Top-2 expert choice of rows // 2 tokens: ``(index, weights)``, experts distinct per token."""
    import torch

    tokens = max(1, rows // 2)
    p = torch.ones(E) if dist == "uniform" else 1.0 / torch.arange(1, E + 1).float() ** alpha
    index = torch.multinomial(p.expand(tokens, E), 2, replacement=False, generator=gen)
    return index, torch.full((tokens, 2), 0.5)


def fixed_tile(text: str) -> dict:
    """``"32x128x4x3s"`` -> the multi-row kernel's tile: BLOCK_M x BLOCK_N, warps, stages, ``s`` transposed
    (SWAP), one quant block a step (the code16 and prmt decodings take one)."""
    swap = text.endswith("s")
    parts = text.rstrip("s").split("x")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        raise ValueError(f"tile {text!r}: expected BMxBNxWARPSxSTAGES with an optional trailing s (transposed)")
    bm, bn, warps, stages = map(int, parts)
    return {"BLOCK_M": bm, "BLOCK_N": bn, "NB": 1, "SWAP": swap, "PREFETCH": False, "num_warps": warps,
            "num_stages": stages}


def nf4_bytes(packed, experts: int) -> int:
    """Packed bytes and first-level block scales of ``experts`` of the E experts (the nested second level
    and code tables are a few KB)."""
    qs = packed.quant_state
    per_expert = (packed.packed.numel() + qs.absmax.numel() * qs.absmax.element_size()) / packed.shape[0]
    return int(per_expert * experts)


def summary(cells, methods) -> None:
    """Per layer (gate/up + down) median ms by method: one line per (nested, routing, rows)."""
    print("\nlayer ms (gate_up + down)  " + " ".join(f"{m:>15s}" for m in methods))
    keys = sorted({(c["nested"], c["dist"], c["rows"]) for c in cells}, key=lambda k: (not k[0], k[1], k[2]))
    for key in keys:
        ms = {m: sum(c["median_ms"] for c in cells if (c["nested"], c["dist"], c["rows"]) == key and c["method"] == m)
              for m in methods}
        print(f"nested={int(key[0])} {key[1]:7s} rows={key[2]:3d}  " + " ".join(f"{ms[m]:15.3f}" for m in methods))


def layer_ms(cells, nested: bool = True) -> dict:
    """(method, rows) -> ms of one layer (gate/up + down), the mean over the routing distributions."""
    sums: dict = {}
    for c in cells:
        if c["nested"] == nested:
            key = (c["method"], c["rows"])
            sums.setdefault(key, {}).setdefault(c["dist"], 0.0)
            sums[key][c["dist"]] += c["median_ms"]
    return {k: sum(v.values()) / len(v) for k, v in sums.items()}


def decode_luts() -> tuple:
    """The nibble decodings the kit knows (``decode.LUTS``), without importing torch when it is not there."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from phyassist.models.mixtral4bit.decode import LUTS
    except ImportError:  # --choose on a machine without the kit's dependencies
        return ("code", "pair", "code16", "prmt")
    return LUTS


def choose(cells, nested: bool = True) -> dict:
    """The decode settings these figures pick for double-quantized experts (the study's configs):

    * kernel ``v2`` when its best routed kernel beats v1 at the fewest rows (batch 1), else ``v1``;
    * prmt_rows (code16, when ``mm2-prmt`` was measured): the fewest measured rows from which ``mm2-prmt`` beats
      ``mm2-code16`` at every larger measured row count too (0: at none); from there code16's multi-row time is
      prmt's (``prmt`` is code16's other way to the same values, not a decoding of its own);
    * lut: the decoding with the smaller summed time of its best routed kernel over all row counts;
    * gemv_rows: the largest measured row count up to which the v2 GEMV beats the multi-row kernel;
    * max_rows: the largest measured row count up to which the chosen routed path beats dequantizing
      all experts + grouped GEMM (a row count between two measured ones takes the smaller); a run without the
      dequantizing method cannot say, so it is refused.
    """
    ms = layer_ms(cells, nested)
    rows = sorted({r for _, r in ms})
    if rows and not any(m == "dequant+grouped" for m, _ in ms):
        raise ValueError("choose: the figures lack the dequant+grouped method, so max_rows cannot be chosen")

    def t(method, r):
        return ms.get((method, r), float("inf"))

    prmt_rows = 0
    for r in reversed(rows):
        if t("mm2-prmt", r) >= t("mm2-code16", r):
            break
        prmt_rows = r

    def mm(lut, r):  # the multi-row kernel; code16's runs as prmt from prmt_rows on
        return t("mm2-prmt" if lut == "code16" and 0 < prmt_rows <= r else f"mm2-{lut}", r)

    luts = [lut for lut in decode_luts() if lut != "prmt"
            and any((f"{k}-{lut}", r) in ms for k in ("gemv2", "mm2") for r in rows)]
    best = {lut: (lambda r, lut=lut: min(t(f"gemv2-{lut}", r), mm(lut, r))) for lut in luts}
    out: dict = {"kernel": "v1", "lut": "code"}
    if luts:
        lut = min(luts, key=lambda lut: sum(best[lut](r) for r in rows))
        if best[lut](rows[0]) < t("v1", rows[0]):
            out = {"kernel": "v2", "lut": lut}
            gemv_rows = 0
            for r in rows:
                if t(f"gemv2-{lut}", r) > mm(lut, r):
                    break
                gemv_rows = r
            out["gemv_rows"] = gemv_rows
            if lut == "code16" and any(("mm2-prmt", r) in ms for r in rows):
                out["prmt_rows"] = prmt_rows
    routed = best[out["lut"]] if out["kernel"] == "v2" else (lambda r: t("v1", r))
    max_rows = 0
    for r in rows:
        if routed(r) >= t("dequant+grouped", r):
            break
        max_rows = r
    out["max_rows"] = max_rows
    return out


def main(argv=None) -> None:
    args = parse(argv)
    if args.choose:
        res = json.loads(Path(args.choose).read_text())
        options = choose(res["cells"])
        for (m, r), v in sorted(layer_ms(res["cells"]).items(), key=lambda kv: (kv[0][1], kv[0][0])):
            print(f"rows={r:3d} {m:16s} {v:8.3f} ms per layer", file=sys.stderr)
        print(",".join(f"{k}={v}" for k, v in options.items()))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from phyassist.models.mixtral4bit import decode
    from phyassist.models.mixtral4bit.experts import Packed4bit, _grouped_matmul, uses_grouped_mm

    cuda = torch.cuda.is_available() and not args.tiny
    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    E, H, inter = (4, 256, 256) if args.tiny else (8, 4096, 14336)
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev) if cuda else None  # > the H200's 50 MB L2

    def timed(fn) -> tuple[float, list[float]]:
        for _ in range(args.warmup):
            fn()
        times = []
        for _ in range(args.reps):
            if cuda:
                flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), times

    def method_fn(name, x, packed, ends, rows, tok):
        if name == "dequant+grouped":  # the training forward's product: every expert dequantized, grouped GEMM
            counts = None if uses_grouped_mm(x) else torch.diff(ends, prepend=ends.new_zeros(1)).tolist()

            def run():
                xs = x if tok is None else x.index_select(0, tok)
                return _grouped_matmul(xs, packed.dequantize().transpose(1, 2), ends, counts)
            return run, None
        name, _, tile = name.partition("#")
        kernel_lut, _, split = name.partition("@")
        kernel, _, lut = kernel_lut.partition("-")
        split = int(split) if split else 512
        lut = lut or "code"
        if tile:  # one fixed multi-row tile, not the autotuner's choice (a sweep of the tiles themselves)
            if kernel != "mm2":
                raise ValueError(f"method {name}#{tile}: a fixed tile is the multi-row kernel's (mm2)")
            tiles = fixed_tile(tile)
            index = decode.LUTS.index(lut)
            if index == 2 and x.is_cuda and x.element_size() == 2 and rows >= decode.DECODE_DEFAULTS["prmt_rows"] > 0:
                index = 3  # code16 runs as prmt from prmt_rows rows on, as nf4_moe_matmul runs it

            def run():
                part = decode._v2_matmul(x, packed, ends, rows, tok, split, True, index, tiles=tiles)
                return decode.sum_partials(part, x.dtype)
            return run, None
        if decode.triton is None:  # CPU builds of torch: no autotuner to report
            tuner = None
        elif kernel == "mm2":
            tuner = decode._mm2_tuner(decode.LUTS.index(lut))
        else:
            tuner = {"v1": decode._nf4_moe_gemv_tuned, "gemv2": decode._nf4_gemv_v2_tuned}[kernel]
        return (lambda: decode.nf4_moe_matmul(x, packed, ends, rows, tok, split_bytes=split, kernel=kernel,
                                              lut=lut)), tuner

    gen = torch.Generator().manual_seed(0)  # routing and inputs
    gen_w = torch.Generator(device=dev).manual_seed(0)  # weights, drawn where they live (8 x 117 M values)
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)", "torch": torch.__version__,
           "triton": __import__("triton").__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "shape": {"experts": E, "hidden": H, "intermediate": inter}, "dtype": str(dt), "reps": args.reps,
           "warmup": args.warmup, "l2_flush": cuda, "zipf_alpha": args.zipf, "cells": []}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from provenance import provenance

    res["provenance"] = provenance()  # the date, the source sha1 and the git HEAD of the tree that ran
    methods = args.methods.split(",")
    t_start = time.perf_counter()
    for nested in (bool(int(n)) for n in args.nested.split(",")):
        layer = {}
        for name, (N, K) in (("gate_up", (2 * inter, H)), ("down", (H, inter))):
            w = (torch.randn(E, N, K, generator=gen_w, device=dev) * 0.02).to(dt)
            layer[name] = Packed4bit(w, "nf4", double_quant=nested)
            del w
        for dist in args.dists.split(","):
            for rows in args.rows:
                index, weights = routing(rows, E, dist, args.zipf, gen)
                token_of_row, _, ends, _ = decode.route(index.to(dev), weights.to(dev), E)
                rows = index.numel()
                counts = torch.diff(ends.cpu(), prepend=torch.zeros(1, dtype=ends.dtype)).tolist()
                used = sum(1 for c in counts if c)
                for name, packed in layer.items():
                    N, K = packed.shape[1], packed.shape[2]
                    if name == "gate_up":
                        x, tok = torch.randn(index.shape[0], K, generator=gen).to(dev, dt), token_of_row
                    else:
                        x, tok = (torch.randn(rows, K, generator=gen) * 0.1).to(dev, dt), None
                    ref = decode._torch_moe_matmul(x, packed, ends, rows, tok).float()
                    for m in methods:
                        fn, tuner = method_fn(m, x, packed, ends, rows, tok)
                        t0 = time.perf_counter()
                        out = fn().float()  # on a GPU the first call also autotunes
                        first = (time.perf_counter() - t0) * 1e3
                        err = ((out - ref).abs().max() / ref.abs().max()).item()
                        ms, times = timed(fn) if args.reps else (first, [first])
                        nbytes = nf4_bytes(packed, E if m == "dequant+grouped" else used)
                        config = str(getattr(tuner, "best_config", None)) if cuda and tuner is not None else None
                        cell = {"nested": nested, "dist": dist, "rows": rows, "expert_rows": counts, "matmul": name,
                                "N": N, "K": K, "method": m, "median_ms": round(ms, 4),
                                "nf4_mb": round(nbytes / 1e6, 1),
                                "gbps": round(nbytes / ms / 1e6, 1), "max_rel_err": err, "config": config,
                                "times_ms": [round(t, 4) for t in times]}
                        res["cells"].append(cell)
                        print(f"nested={int(nested)} {dist:7s} rows={rows:3d} {name:7s} {m:16s} {ms:9.3f} ms "
                              f"{cell['gbps']:8.1f} GB/s  err {err:.1e}" + (f"  [{config}]" if config else ""),
                              flush=True)
                        if err > (2 ** -6 if dt == torch.bfloat16 else 1e-4):
                            print(f"  !! {m} disagrees with the reference", flush=True)
        del layer
        Path(args.out).write_text(json.dumps(res, indent=1))
    summary(res["cells"], methods)
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out} ({res['seconds']} s)")


if __name__ == "__main__":
    main()
