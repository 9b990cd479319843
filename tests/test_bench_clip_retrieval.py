"""The arithmetic of benchmarks/bench_clip_retrieval.py: ratios pair rounds, and clip-retrieval's per-call start-up
comes off by a small run in the same round."""

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_clip_retrieval

    yield bench_clip_retrieval
    sys.modules.pop("bench_clip_retrieval", None)


def test_ratios_pair_rounds_and_take_the_median(bench):
    # round by round 5x, 2x, 6x: the median is 5x; a ratio of medians (20 / 5) would say 4x
    result = bench.paired_ratios([10.0, 20.0, 30.0], [2.0, 10.0, 5.0])
    assert result["ratios"] == pytest.approx([5.0, 2.0, 6.0])
    assert result["median"] == pytest.approx(5.0)


def test_ratios_refuse_unpaired_rounds(bench):
    with pytest.raises(ValueError, match="2 rounds against 3"):
        bench.paired_ratios([1.0, 2.0, 3.0], [1.0, 2.0])


def test_start_up_comes_off_and_the_marginal_rate_remains(bench):
    start_up, rate = 15.0, 5.0  # seconds per call, images per second
    full = [start_up + 100 / rate, 2 * start_up + 100 / rate]  # the start-up may differ between rounds
    probe = [start_up + 10 / rate, 2 * start_up + 10 / rate]
    assert bench.without_start_up(full, probe, 100, 10) == pytest.approx([100 / rate, 100 / rate])


def test_start_up_needs_a_smaller_probe(bench):
    with pytest.raises(ValueError, match="smaller"):
        bench.without_start_up([10.0], [5.0], 8, 8)


def test_rounds_alternate_their_order(bench):
    names = ["clip-retrieval", "torch fp32", "torch bf16"]
    assert bench.round_order(0, names) == names
    assert bench.round_order(1, names) == names[::-1]
    assert bench.round_order(2, names) == names
