"""Where a captured decode step's time goes, kernel by kernel and layer by layer (issue 22).

``torch.profiler``'s table sums kernels by name, and in the 4-bit Mixtral's decode step one name does several jobs
(the routed NF4 kernel multiplies gate/up, down and, from 2 rows on, q, k, v and o). A replayed CUDA graph runs the
same kernels in the same order every step and every layer, so a kernel's place in the layer names its job. This
module reads a profiler trace (``export_chrome_trace``'s JSON), finds the repeating step and, inside it, the
repeating layer, and reports per place in the layer: the kernel, its median time and the median idle gap before it
(the GPU waiting between two kernels of the graph), summed over the layers of one step.

Pure functions over lists (no torch): tests/test_kernel_timeline.py checks them on synthetic timelines. From the
kernel events bench/generation_mixtral.py keeps where its breakdown failed (``*_events.json``), again on any machine:

    python3 bench/kernel_timeline.py EVENTS.json --steps 15 --layers 32 --min-period 64 --max-mismatch 4
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def kernel_events(trace: dict | str | Path) -> list[tuple[str, float, float]]:
    """``(name, start_us, duration_us)`` of every GPU kernel in a chrome trace, in start order."""
    if not isinstance(trace, dict):
        trace = json.loads(Path(trace).read_text())
    events = [(e["name"], float(e["ts"]), float(e["dur"])) for e in trace.get("traceEvents", [])
              if e.get("cat") == "kernel" and "dur" in e]
    return sorted(events, key=lambda e: e[1])


def period(names: list[str], repeats: int, start: int = 0, min_period: int = 1,
           anchor: str | None = None) -> tuple[int, int] | None:
    """``(offset, p)``: the smallest ``p >= min_period`` such that ``names[offset:offset + repeats * p]`` is one run of
    ``p`` names ``repeats`` times, searching offsets from ``start``; None if none fits. Where several offsets fit
    (the name before the run equals its last one: the run could start one earlier), the first whose name holds
    ``anchor`` wins (a layer starts with its norm), else the first."""
    n = len(names)
    for p in range(max(1, min_period), (n - start) // repeats + 1):
        fits = [off for off in range(start, n - repeats * p + 1)
                if all(names[off + i] == names[off + i + p] for i in range((repeats - 1) * p))]
        if fits:
            anchored = [off for off in fits if anchor and anchor in names[off]]
            return (anchored or fits)[0], p
    return None


def decode_steps(events: list[tuple[str, float, float]], steps: int, max_trailing: int = 8,
                 min_period: int = 2, max_mismatch: int = 0) -> list[list[tuple[str, float, float]]]:
    """The last ``steps`` repetitions of the step's kernel sequence (the decode steps: the prefill comes first and
    does not repeat), found as the shortest sequence of at least ``min_period`` kernels that the trace's tail repeats
    ``steps`` times; up to ``max_trailing`` kernels after the last step (``generate``'s final length reduction) are
    skipped. A step may differ from the next in up to ``max_mismatch`` places: the eager kernels between two
    replays (sampling, the output's growth) pick a vectorized variant by their tensors' alignment, which moves as the
    output grows (at batch 1 of Mixtral, one place in every step). Give ``min_period`` at least twice the layer
    count where fewer steps than layers are profiled: a run of layers inside one step repeats too."""
    names = [e[0] for e in events]
    for trail in range(max_trailing + 1):
        end = len(names) - trail
        for p in range(min_period, end // steps + 1):
            tail = names[end - steps * p:end]
            allowed, mismatches = max_mismatch * (steps - 1), 0
            for i in range((steps - 1) * p):
                if tail[i] != tail[i + p]:
                    mismatches += 1
                    if mismatches > allowed:
                        break
            if mismatches <= allowed:
                base = end - steps * p
                return [events[base + k * p: base + (k + 1) * p] for k in range(steps)]
    raise ValueError(f"decode_steps: the trace's last kernels do not repeat {steps} times")


def layer_breakdown(steps: list[list[tuple[str, float, float]]], layers: int) -> dict:
    """Per place in a layer (the run of kernels the step repeats ``layers`` times): the kernel's name, its median
    time and the median gap before it over all layers and steps, and per step: its kernels' span (first kernel's
    start to last one's end), its period (start to next start: the host's gaps between steps included), the
    layers' span, the kernels outside the layers (embedding, final norm, head, sampling)."""
    names = [e[0] for e in steps[0]]
    found = period(names, layers, min_period=2, anchor="norm")
    if found is None:
        raise ValueError(f"layer_breakdown: no run of kernels repeats {layers} times in a step of {len(names)}")
    off, p = found
    places = []
    for j in range(p):
        times, gaps = [], []
        for step in steps:
            for layer in range(layers):
                i = off + layer * p + j
                name, ts, dur = step[i]
                times.append(dur)
                if i > 0:
                    prev = step[i - 1]
                    gaps.append(max(0.0, ts - (prev[1] + prev[2])))
        places.append({"place": j, "kernel": names[off + j], "median_us": round(statistics.median(times), 2),
                       "gap_before_us": round(statistics.median(gaps), 2) if gaps else 0.0,
                       "per_step_ms": round(statistics.median(times) * layers / 1e3, 3)})
    walls = [(s[-1][1] + s[-1][2] - s[0][1]) / 1e3 for s in steps]
    periods = [(b[0][1] - a[0][1]) / 1e3 for a, b in zip(steps, steps[1:])]  # start to start: gaps between steps too
    busy = [sum(e[2] for e in s) / 1e3 for s in steps]
    layer_ms = [(s[off + layers * p - 1][1] + s[off + layers * p - 1][2] - s[off][1]) / 1e3 for s in steps]
    outside = sorted({e[0] for s in steps for e in s[:off] + s[off + layers * p:]})
    return {"kernels_per_step": len(names), "kernels_per_layer": p, "first_layer_at": off, "layers": layers,
            "step_ms": round(statistics.median(walls), 3),
            "step_period_ms": round(statistics.median(periods), 3) if periods else None, "busy_ms": round(statistics.median(busy), 3),
            "layers_ms": round(statistics.median(layer_ms), 3), "outside_layers": outside, "places": places}


def format_breakdown(b: dict, title: str) -> str:
    """The breakdown as a text table (what bench/generation_mixtral.py writes beside the profiler's)."""
    lines = [title,
             f"step {b['step_ms']} ms from its first kernel to its last, {b['step_period_ms']} ms start to start "
             f"(kernels busy {b['busy_ms']} ms; the {b['layers']} layers {b['layers_ms']} ms), "
             f"{b['kernels_per_step']} kernels a step, {b['kernels_per_layer']} a layer; outside the layers: "
             + ", ".join(b["outside_layers"]),
             f"{'place':>5}  {'kernel':60s} {'median us':>10} {'gap before us':>14} {'ms a step':>10}"]
    for r in b["places"]:
        lines.append(f"{r['place']:>5}  {r['kernel'][:60]:60s} {r['median_us']:>10} {r['gap_before_us']:>14} "
                     f"{r['per_step_ms']:>10}")
    gaps = sum(r["gap_before_us"] for r in b["places"]) * b["layers"] / 1e3
    lines.append(f"sum over places: kernels {sum(r['per_step_ms'] for r in b['places']):.3f} ms, gaps {gaps:.3f} ms "
                 "a step (medians times layers)")
    return "\n".join(lines)


def read_events(path: str | Path) -> list[tuple[str, float, float]]:
    """The kernel events of a ``*_events.json`` (bench/generation_mixtral.py's ``save_events``)."""
    d = json.loads(Path(path).read_text())
    return [(d["names"][i], float(ts), float(dur)) for i, ts, dur in d["events"]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="The captured decode step's breakdown from a kernel events file.")
    ap.add_argument("events", help="a *_events.json written by bench/generation_mixtral.py")
    ap.add_argument("--steps", type=int, required=True, help="decode steps profiled (new tokens - 1)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--min-period", type=int, default=2)
    ap.add_argument("--max-mismatch", type=int, default=0)
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    steps = decode_steps(read_events(args.events), args.steps, min_period=args.min_period,
                         max_mismatch=args.max_mismatch)
    print(format_breakdown(layer_breakdown(steps, args.layers), args.title or Path(args.events).name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
