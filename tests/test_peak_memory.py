"""PeakMemory on the CPU: a block's transient allocation is in its peak, and the peak of a later block does not
inherit it (freed memory is handed back before the block starts)."""

import time

import torch

from knnmoe_eval.experiments.peak_memory import PeakMemory, rss_anon

MIB = 2**20


def test_a_transient_allocation_is_in_the_peak_and_not_in_the_next_block():
    if rss_anon() is None:
        import pytest

        pytest.skip("no /proc/self/status RssAnon on this platform")
    with PeakMemory("cpu") as peak:
        before = rss_anon()
        x = torch.ones(256 * MIB // 4)  # 256 MiB, touched
        time.sleep(5 * PeakMemory.interval_s)
        del x
        first = peak.measure()["peak_bytes"]
    assert first - before >= 250 * MIB
    with PeakMemory("cpu") as peak:
        time.sleep(5 * PeakMemory.interval_s)
        second = peak.measure()["peak_bytes"]
    assert second < first - 200 * MIB
