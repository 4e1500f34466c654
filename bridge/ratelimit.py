"""Per-device token buckets: ``rate`` requests a second sustained, bursts of ``burst``.

The buckets live in this process. Every request a device publishes reaches exactly one bridge
process at a time: the embedded default has one, and with several bridges a device's ``up/``
topic is subscribed only by the holder of its user's partition (``bridge.mqtt_ingest``). So the
holder sees all of a device's traffic, and a bucket kept where the requests arrive is exact
without a round trip to shared state. When a partition changes hands its devices start with
full buckets at the new holder, which allows one extra burst per handover.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .clock import Clock


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    def __init__(self, clock: Clock, rate: float, burst: int, max_buckets: int = 200_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self._clock = clock
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, _Bucket] = {}
        self._max_buckets = max_buckets

    def take(self, key: str) -> int:
        """Spend one token; return 0 if allowed, else the milliseconds until one is available."""
        now = self._clock.monotonic()
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self._max_buckets:
                self._forget_full(now)
            b = self._buckets[key] = _Bucket(float(self.burst), now)
        else:
            b.tokens = min(float(self.burst), b.tokens + (now - b.stamp) * self.rate)
            b.stamp = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0
        return max(1, math.ceil((1.0 - b.tokens) / self.rate * 1000))

    def _forget_full(self, now: float) -> None:
        """Drop the buckets that have refilled: forgetting one is the same as keeping it full."""
        full = [k for k, v in self._buckets.items() if v.tokens + (now - v.stamp) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self._max_buckets:  # all busy: the first tenth known go (they allow a burst again)
            for k in list(self._buckets)[: len(self._buckets) // 10 + 1]:
                del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)
