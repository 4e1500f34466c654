"""The garbage collector's pauses on /metrics (bridge/metrics.py, ``GcPauses``)."""

from __future__ import annotations

import gc
import re

from bridge.metrics import Metrics


def gen2(text: str) -> tuple[float, float]:
    count = re.search(r'^pigeon_gc_pause_seconds_count\{generation="2"\} (\S+)$', text, re.M)
    total = re.search(r'^pigeon_gc_pause_seconds_sum\{generation="2"\} (\S+)$', text, re.M)
    assert count and total, text
    return float(count.group(1)), float(total.group(1))


def test_a_full_collection_is_counted_with_its_pause_once_per_process() -> None:
    first = Metrics()
    watching = len(gc.callbacks)
    second = Metrics()  # another server in the same process shares the one watch
    assert len(gc.callbacks) == watching
    before_n, before_s = gen2(first.render().decode())
    kept = [[i] for i in range(200_000)]  # something for the collector to walk
    gc.collect(2)
    del kept
    after_n, after_s = gen2(first.render().decode())
    assert after_n >= before_n + 1  # (making the list may have run some too)
    assert after_s > before_s
    assert gen2(second.render().decode()) == (after_n, after_s)
    buckets = re.findall(r'^pigeon_gc_pause_seconds_bucket\{generation="2",le="([^"]+)"\} (\S+)$',
                         first.render().decode(), re.M)
    assert buckets[-1] == ("+Inf", f"{after_n}")
    counts = [float(n) for _, n in buckets]
    assert counts == sorted(counts)  # cumulative
