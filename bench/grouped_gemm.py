"""Grouped GEMM rate of one Mixtral layer's expert shapes, by weight layout (H100 question: does
the layout the 4-bit experts are dequantized into change torch's grouped GEMM speed?).

8 experts, 8,192 routed rows (4 x 1024 tokens, top-2) split evenly, hidden 4096, gate/up 2 x 14336.
For each product of the expert MLP (forward gate/up and down, backward through both) the weight is
given K-major (a transposed view of the stored [E, N, K] tensor, as the kit's forward does) or
N-major ([E, K, N] contiguous), plus cuBLAS on one dense [8192 x K] @ [K x N] of the same FLOPs,
and one cuBLAS GEMM per expert (split sizes known on the host, as a loop over experts needs), each
also with the routed rows of a random router (uneven, as top-2 of a random Mixtral router gives).
``--compare``: the per-expert GEMMs on the routed split as the kit runs them (one stream, torch's
default BLAS), round-robin over 2 and 4 CUDA streams (so one expert's last, partly filled wave of
tiles can overlap the next expert's), and through cuBLASLt (``preferred_blas_library``), interleaved
``--rounds`` times with medians, since single measurements move by several per cent on a
power-capped GPU.

    python bench/grouped_gemm.py --compare --rounds 7 --json-out grouped_gemm_compare.json

    python bench/grouped_gemm.py        # GPU only; prints JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def rate(fn, flops: float, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return flops * reps / (time.perf_counter() - t) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compare", action="store_true", help="per-expert loop: streams and BLAS library")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    E, rows, H, I2 = 8, 8192, 4096, 2 * 14336
    offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * (rows // E)
    even = [e * (rows // E) for e in range(E + 1)]
    gen = torch.Generator().manual_seed(0)  # a random router: 4,096 tokens, each to its top 2 of 8
    top2 = torch.randn(rows // 2, E, generator=gen).topk(2, dim=-1).indices.flatten()
    counts = torch.bincount(top2, minlength=E)
    routed = [0] + counts.cumsum(0).tolist()
    routed_offs = torch.tensor(routed[1:], device=dev, dtype=torch.int32)

    def padded_ends(pad: int) -> list[int]:
        ends, end = [], 0
        for c in counts.tolist():
            end += -(-c // pad) * pad
            ends.append(end)
        return ends

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "routed_rows": counts.tolist(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    side = [torch.cuda.Stream() for _ in range(4)]  # for --compare
    for name, K, N in (("gate_up (x @ W13^T)", H, I2), ("down (a @ W2^T)", I2 // 2, H),
                       ("grad through down (g @ W2)", H, I2 // 2), ("grad through gate_up (gh @ W13)", I2, H)):
        x = torch.randn(rows, K, device=dev, dtype=dt)
        w_nk = torch.randn(E, N, K, device=dev, dtype=dt)  # stored [E, N, K]: used transposed (K-major)
        w_kn = w_nk.transpose(1, 2).contiguous()  # [E, K, N] contiguous (N-major)
        flops = 2 * rows * K * N
        dense_w = torch.randn(K, N, device=dev, dtype=dt)
        out = torch.empty(rows, N, device=dev, dtype=dt)

        def per_expert(bounds, streams=()):
            """One GEMM per expert on the current stream, or round-robin over ``streams``."""
            main = torch.cuda.current_stream()
            for s in streams:
                s.wait_stream(main)
            for e in range(E):
                a, b = bounds[e], bounds[e + 1]
                with torch.cuda.stream(streams[e % len(streams)] if streams else main):
                    torch.mm(x[a:b], w_nk[e].T, out=out[a:b])
            for s in streams:
                main.wait_stream(s)

        res[name] = {
            "K-major TF/s": round(rate(lambda: F.grouped_mm(x, w_nk.transpose(1, 2), offs=offs), flops), 1),
            "N-major TF/s": round(rate(lambda: F.grouped_mm(x, w_kn, offs=offs), flops), 1),
            "dense cuBLAS TF/s": round(rate(lambda: x @ dense_w, flops), 1),
            "per-expert cuBLAS TF/s": round(rate(lambda: per_expert(even), flops), 1),
            "K-major, routed split TF/s": round(rate(lambda: F.grouped_mm(x, w_nk.transpose(1, 2), offs=routed_offs),
                                                     flops), 1),
            "per-expert cuBLAS, routed split TF/s": round(rate(lambda: per_expert(routed), flops), 1),
        }
        if args.compare:
            default_blas = torch.backends.cuda.preferred_blas_library()
            ways = {"1 stream": ((), default_blas), "2 streams": (side[:2], default_blas),
                    "4 streams": (side, default_blas), "1 stream, cuBLASLt": ((), "cublaslt")}
            runs = {w: [] for w in ways}
            for _ in range(args.rounds):
                for w, (streams, blas) in ways.items():
                    torch.backends.cuda.preferred_blas_library(blas)
                    runs[w].append(round(rate(lambda: per_expert(routed, streams), flops, reps=40), 1))
                torch.backends.cuda.preferred_blas_library(default_blas)
            res[name]["per-expert, routed split, interleaved rounds TF/s"] = {
                w: {"median": statistics.median(v), "all": v} for w, v in runs.items()}
        for pad in (16, 128):  # each expert's rows start on a multiple of `pad` (zero rows between)
            offs_p = torch.tensor(padded_ends(pad), device=dev, dtype=torch.int32)
            x_p = torch.zeros(int(offs_p[-1]), K, device=dev, dtype=dt)
            res[name][f"K-major, routed split padded to {pad} rows TF/s"] = round(
                rate(lambda: F.grouped_mm(x_p, w_nk.transpose(1, 2), offs=offs_p), flops), 1)  # real rows' FLOPs
            del x_p
        del x, w_nk, w_kn, dense_w, out
        torch.cuda.empty_cache()
        print(name, res[name], flush=True)
    print(json.dumps(res))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
