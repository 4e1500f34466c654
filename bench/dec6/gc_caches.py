"""How long a full collection of the interpreter's cyclic garbage collector takes with the
Cassandra store's two big caches full (200,000 inbox entries of 100,000 messages, 20,000
completed sends), kept as objects and kept packed (``storage.cassandra._packed``).

Run from the repository root: ``python bench/dec6/gc_caches.py`` (BENCHMARKS.md, 2026-12-06)."""

import gc
import time

from cachetools import LRUCache

from storage.base import InboxEntry, Message
from storage.cassandra import _packed


def fill(packed: bool) -> tuple[LRUCache, LRUCache]:
    entries: LRUCache = LRUCache(200_000)
    sent: LRUCache = LRUCache(20_000)
    for i in range(100_000):
        m = Message(f"chat{i % 5000:08d}", i, f"r{i}", f"u{i % 10000}", f"d{i % 10000}", 1796500000000 + i, "text",
                    body=f"message body {i}")
        a, b = (f"u{i % 10000}", i), (f"v{i % 10000}", i)
        if packed:
            p = _packed(m)
            entries[a] = entries[b] = sent[(f"d{i}", f"r{i}")] = p
        else:
            entries[a], entries[b] = InboxEntry(a[0], i, m), InboxEntry(b[0], i, m)
            sent[(f"d{i}", f"r{i}")] = m
    return entries, sent


for packed in (False, True, False, True):
    gc.collect()
    gc.freeze()
    keep = fill(packed)
    gc.collect(0)
    gc.collect(1)
    t = time.perf_counter()
    gc.collect()
    first = time.perf_counter() - t
    t = time.perf_counter()
    gc.collect()
    again = time.perf_counter() - t
    print("packed " if packed else "objects", f"full collection {first * 1000:.1f} ms, again {again * 1000:.1f} ms, "
          f"objects tracked {len(gc.get_objects())}")
    del keep
    gc.unfreeze()
    gc.collect()
