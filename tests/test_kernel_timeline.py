"""bench/kernel_timeline.py: the captured decode step's kernels by place in the layer, read from a profiler trace.
Checked on synthetic timelines (a prefill, then steps of a prologue, layers and an eager tail), since the traces
themselves come from the GPU machine."""

from __future__ import annotations

import pytest

from bench.kernel_timeline import decode_steps, format_breakdown, kernel_events, layer_breakdown, period

LAYER = [("rms_norm", 2.0), ("mm", 10.0), ("attn", 5.0), ("mm", 30.0), ("router", 3.0)]


def _timeline(steps: int, layers: int, gap: float = 1.0, slow_layer: int | None = None):
    """(name, start, duration) of a prefill and ``steps`` decode steps: embedding, ``layers`` x LAYER, head, argmax."""
    events, t = [], 0.0

    def add(name, dur):
        nonlocal t
        events.append((name, t, dur))
        t += dur + gap

    for name, dur in [("prefill_mm", 500.0), ("prefill_attn", 300.0), ("head", 20.0), ("argmax", 2.0)]:
        add(name, dur)  # generate() picks the first token from the prefill's logits
    for _ in range(steps):
        add("router", 1.0)  # a kernel named as a layer's last one just before the first layer (a rotation trap)
        for layer in range(layers):
            for name, dur in LAYER:
                add(name, dur * (3 if layer == slow_layer and name == "attn" else 1))
        add("head", 20.0)
        add("argmax", 2.0)
    for name, dur in [("where", 1.0), ("max", 1.0)]:  # generate()'s final length, after the last step
        add(name, dur)
    return events


def test_steps_and_places_are_found_and_timed():
    steps = decode_steps(_timeline(steps=5, layers=4, gap=0.5), 5)
    assert len(steps) == 5 and all(len(s) == 1 + 4 * len(LAYER) + 2 for s in steps)
    b = layer_breakdown(steps, 4)
    assert b["kernels_per_layer"] == len(LAYER) and b["first_layer_at"] == 1
    assert [r["kernel"] for r in b["places"]] == [n for n, _ in LAYER]
    assert [r["median_us"] for r in b["places"]] == [d for _, d in LAYER]
    assert all(r["gap_before_us"] == 0.5 for r in b["places"])
    assert b["places"][3]["per_step_ms"] == pytest.approx(30.0 * 4 / 1e3)
    assert b["outside_layers"] == ["argmax", "head", "router"]
    per_step = 1 + sum(d for _, d in LAYER) * 4 + 20 + 2
    assert b["busy_ms"] == pytest.approx(per_step / 1e3)
    assert b["step_ms"] == pytest.approx((per_step + 0.5 * (len(steps[0]) - 1)) / 1e3)
    assert b["step_period_ms"] == pytest.approx((per_step + 0.5 * len(steps[0])) / 1e3, abs=1e-3)  # rounded
    assert b["layers_ms"] == pytest.approx((sum(d for _, d in LAYER) * 4 + 0.5 * (4 * len(LAYER) - 1)) / 1e3, abs=1e-3)
    text = format_breakdown(b, "t")
    assert "router" in text and "gaps" in text


def test_median_ignores_one_slow_layer():
    b = layer_breakdown(decode_steps(_timeline(steps=3, layers=5, slow_layer=2), 3), 5)
    assert b["places"][2]["median_us"] == 5.0


def test_no_repetition_is_an_error():
    events = [(f"k{i}", float(i), 1.0) for i in range(40)]
    with pytest.raises(ValueError, match="do not repeat"):
        decode_steps(events, 3)
    with pytest.raises(ValueError, match="repeats 4 times"):
        layer_breakdown([events], 4)


def test_period_finds_the_offset_and_the_shortest_run():
    assert period(list("xyabababab"), 4) == (2, 2)
    assert period(list("abcabc"), 2, min_period=2) == (0, 3)
    assert period(list("abcd"), 2) is None
    # "b" before the run equals the run's last name: it could start at 0 or 1; the anchor picks the layer's start
    assert period(["b", "norm", "b", "norm", "b"], 2, min_period=2) == (0, 2)
    assert period(["b", "norm", "b", "norm", "b"], 2, min_period=2, anchor="norm") == (1, 2)


def test_trailing_kernels_after_the_last_step_are_skipped_within_a_limit():
    events = _timeline(steps=3, layers=2)
    assert len(decode_steps(events, 3)) == 3
    with pytest.raises(ValueError, match="do not repeat"):
        decode_steps(events, 3, max_trailing=1)  # two kernels follow the last step


def test_kernel_events_reads_only_kernels_in_start_order():
    trace = {"traceEvents": [{"cat": "kernel", "name": "b", "ts": 5, "dur": 1},
                             {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 9},
                             {"cat": "kernel", "name": "a", "ts": 2, "dur": 2}]}
    assert kernel_events(trace) == [("a", 2.0, 2.0), ("b", 5.0, 1.0)]


def test_batch_one_steps_fewer_than_layers_and_a_host_kernel_that_changes_variant():
    """What the batch-1 trace of the 4-bit Mixtral holds (bench/generation_mixtral.md): fewer profiled steps than
    layers, so a run of layers inside one step repeats as often as the steps (the shortest period is a layer), and
    an eager kernel between replays whose vectorized variant alternates from step to step. ``min_period`` of two
    kernels a layer and ``max_mismatch`` find the step."""
    events, seen = [], 0
    for n, t, d in _timeline(steps=3, layers=8):
        if n == "argmax":
            n, seen = ("argmax_v2" if seen % 2 else "argmax_v4"), seen + 1
        events.append((n, t, d))
    per_step = 1 + 8 * len(LAYER) + 2
    assert len(decode_steps(events, 3)[0]) == len(LAYER)  # the trap: one layer taken for a step
    with pytest.raises(ValueError, match="do not repeat"):
        decode_steps(events, 3, min_period=2 * 8)  # the variant differs between steps
    steps = decode_steps(events, 3, min_period=2 * 8, max_mismatch=1)
    assert [len(s) for s in steps] == [per_step] * 3
    b = layer_breakdown(steps, 8)
    assert [r["kernel"] for r in b["places"]] == [n for n, _ in LAYER]
