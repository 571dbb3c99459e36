"""bench/generation_mixtral.py's decode rate: the arithmetic that turns two medians into the decode steps' tokens/s
is checked here, on the CPU, because the script itself only runs on a GPU machine."""

from __future__ import annotations

import pytest

from bench.generation_mixtral import decode_rate


def test_decode_rate_excludes_prefill_and_first_token():
    # 64 sequences x 128 new tokens in 12 s, of which 2 s are the prefill and first token: 127 steps in 10 s
    assert decode_rate(64, 128, 12.0, 2.0) == pytest.approx(64 * 127 / 10.0, abs=0.05)
    assert decode_rate(1, 64, 1.5, 0.2) == pytest.approx(63 / 1.3, abs=0.05)


def test_decode_rate_is_at_least_the_whole_call_rate():
    # the prefill takes longer than one decode step here, so leaving it out raises the rate
    assert decode_rate(16, 128, 8.0, 1.0) > 16 * 128 / 8.0


@pytest.mark.parametrize("new, total, prefill", [(1, 1.0, 0.5), (0, 1.0, 0.5), (64, 1.0, 1.0), (64, 1.0, 1.2)])
def test_decode_rate_none_without_decode_time(new, total, prefill):
    assert decode_rate(8, new, total, prefill) is None
