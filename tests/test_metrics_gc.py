"""The server's metrics (bridge/metrics.py): the garbage collector's pauses (``GcPauses``) and
the hot path's labelled children (``ByLabel``)."""

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


def test_the_hot_paths_children_are_the_metrics_own_and_looked_up_once() -> None:
    m = Metrics()
    send = m.requests_of["send"]
    assert m.requests_of["send"] is send is m.requests.labels("send")
    send.inc()
    m.requests_of["ack"].inc(2)
    m.latency_of["send"].observe(0.003)
    m.messages_out_of["1"].inc()
    text = m.render().decode()
    assert 'pigeon_requests_total{type="send"} 1.0' in text
    assert 'pigeon_requests_total{type="ack"} 2.0' in text
    assert 'pigeon_handling_seconds_count{type="send"} 1.0' in text
    assert 'pigeon_messages_out_total{qos="1"} 1.0' in text
