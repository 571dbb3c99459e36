"""The attention projections' 4-bit GEMV in the captured decode step: bitsandbytes' ``Linear4bit`` vs the kit's
routed kernel with one expert (:func:`phyassist.models.mixtral4bit.decode.nf4_linear_partials`), each with the
study's LoRA product added (issue 22).

Mixtral-8x7B's q, k, v, o (``[4096, 4096]``, ``[1024, 4096]`` twice, ``[4096, 4096]``) of 32 layers, random weights
in NF4 (blocks of 64, nested scales: the study's quantization) with rank-32 fp32 adapters; each method runs all 128
projections in one captured CUDA graph (692 MB of NF4 bytes and scales: the L2 cache holds none of it between layers,
as in a decode step), timed over graph replays between CUDA events. ``bnb``: the layer's forward (bitsandbytes' GEMV
at one row, dequantize + cuBLAS above) then :func:`phyassist.models.fused_decode.lora_add_`; ``kit-pN``: the dense
kernel, its split of K aimed at ``N`` programs (``DENSE_PROGRAMS``), and :func:`~phyassist.models.fused_decode
.lora_add_partials` adding its partial sums. Reports microseconds a layer (q + k + v + o with adapters), the median
of the replays, and the NF4 bytes' rate (bench/dense_nf4.md).

    . bench/device_env.sh && python3 bench/dense_nf4.py --out $OUT/dense_nf4.json     # H200: about a minute
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096)}


def build(layers: int, rank: int):
    import bitsandbytes as bnb
    import torch

    out = []
    for _ in range(layers):
        layer = {}
        for name, (n, k) in SHAPES.items():
            lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                    compress_statistics=True)
            with torch.no_grad():
                lin.weight.data.normal_(0, 0.02)
            lin = lin.cuda()
            a = torch.randn(rank, k, device="cuda") * 0.01
            b = torch.randn(n, rank, device="cuda") * 0.01
            layer[name] = (lin, a, b)
        out.append(layer)
    return out


def step_fn(method: str, layers, xs):
    from phyassist.models.fused_decode import lora_add_, lora_add_partials
    from phyassist.models.mixtral4bit.decode import nf4_linear_partials

    programs = int(method[len("kit-p"):]) if method.startswith("kit-p") else None

    def step():
        outs = []
        for layer in layers:
            for name, (lin, a, b) in layer.items():
                x = xs[name]
                if programs is None:
                    y = lin(x).contiguous()
                    outs.append(lora_add_(y, x, a, b, 2.0))
                else:
                    p = nf4_linear_partials(x, lin.weight.data, lin.weight.quant_state, programs=programs)
                    outs.append(lora_add_partials(p, x, a, b, 2.0, x.dtype))
        return outs
    return step


def time_graph(step, replays: int):
    import torch

    for _ in range(2):  # autotuning, cuBLAS handles
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    times = []
    for _ in range(replays + 2):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return times[2:], outs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="1,16,64")
    ap.add_argument("--methods", default="bnb,kit-p128,kit-p256,kit-p512,kit-p1024")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--replays", type=int, default=20)
    args = ap.parse_args(argv)
    import torch

    from provenance import provenance

    torch.manual_seed(0)
    t0 = time.perf_counter()
    layers = build(args.layers, 32)
    nbytes = sum(lin.weight.data.numel() + lin.weight.quant_state.absmax.numel()
                 for layer in layers for lin, _, _ in layer.values())
    res = dict(command=" ".join(sys.argv), device=torch.cuda.get_device_name(0), torch=torch.__version__,
               layers=args.layers, nf4_bytes=nbytes, build_s=round(time.perf_counter() - t0, 1), rows=[],
               provenance=provenance())
    for rows in [int(r) for r in args.rows.split(",")]:
        xs = {name: torch.randn(rows, k, device="cuda").to(torch.bfloat16) for name, (n, k) in SHAPES.items()}
        ref = None
        for method in args.methods.split(","):
            with torch.inference_mode():
                times, outs = time_graph(step_fn(method, layers, xs), args.replays)
                if ref is None:
                    ref = [o.float() for o in outs]
                err = max(((o.float() - r).abs().max() / r.abs().max()).item() for o, r in zip(outs, ref))
            med = statistics.median(times)
            row = dict(rows=rows, method=method, us_per_layer=round(med / args.layers * 1e6, 2),
                       gbps=round(nbytes / med / 1e9, 1), max_rel_err_vs_first=round(err, 5),
                       times_s=[round(t, 6) for t in times])
            print(json.dumps({k: v for k, v in row.items() if k != "times_s"}), flush=True)
            res["rows"].append(row)
            Path(args.out).write_text(json.dumps(res, indent=1))
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
