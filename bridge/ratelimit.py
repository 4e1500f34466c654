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


class Strikes:
    """Refusals per device within a window: the device that keeps pushing past its limit.

    A device that honours ``retry_after_ms`` is refused about once per wait; one that ignores it
    is refused for every request it sends while its bucket is empty. ``add`` counts a refusal
    and says when a device has had ``limit`` of them within ``window_s`` (counting starts over
    then, and after a window with fewer). The map holds only devices refused in their current
    window, and past ``max_keys`` the stale windows go first, then the oldest entries.
    """

    def __init__(self, clock: Clock, limit: int, window_s: float = 10.0, max_keys: int = 100_000) -> None:
        if limit < 1 or window_s <= 0:
            raise ValueError("limit must be >= 1 and window_s > 0")
        self._clock = clock
        self.limit = limit
        self.window_s = window_s
        self._max_keys = max_keys
        self._seen: dict[str, list[float]] = {}  # key -> [refusals, window start]

    def add(self, key: str) -> bool:
        now = self._clock.monotonic()
        seen = self._seen.get(key)
        if seen is None or now - seen[1] >= self.window_s:
            if seen is None and len(self._seen) >= self._max_keys:
                self._forget(now)
            seen = self._seen[key] = [0.0, now]
        seen[0] += 1
        if seen[0] >= self.limit:
            del self._seen[key]
            return True
        return False

    def _forget(self, now: float) -> None:
        stale = [k for k, (_, start) in self._seen.items() if now - start >= self.window_s]
        for k in stale:
            del self._seen[k]
        if len(self._seen) >= self._max_keys:
            for k in list(self._seen)[: len(self._seen) // 10 + 1]:
                del self._seen[k]

    def __len__(self) -> int:
        return len(self._seen)
