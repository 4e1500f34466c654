"""Hot state shared by bridge processes: presence, presence watches, rate-limit buckets.

Chosen by URL like the store: absent means in-process (:class:`MemoryState`, the embedded
default), ``redis://HOST:PORT/DB`` means :class:`storage.state_redis.RedisState`. None of this is
durable data: losing it (a Redis restart) only makes users look offline until their devices
next speak, forgets watches (devices renew them) and refills rate buckets. Messages, sequence
numbers and receipts never live here. Requests one bridge process hands another (Redis only:
``RedisState.call``/``serve``) wait here too; a restart loses those, their callers answer
``unavailable`` after a timeout, and devices retry.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol


class SharedState(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def device_online(self, user_id: str, device_id: str) -> bool:
        """Mark the device online; True when this made its user online."""

    async def device_offline(self, user_id: str, device_id: str) -> bool:
        """Mark the device offline; True when this made its user offline."""

    async def is_online(self, user_id: str) -> bool: ...

    async def online_devices(self) -> int:
        """How many devices are online (for metrics; may be approximate)."""

    async def add_watch(self, watched: str, watcher: str, expiry_ms: int, now_ms: int) -> None:
        """``watcher`` (``user/device``) wants presence changes of ``watched`` until ``expiry_ms``."""

    async def watchers(self, watched: str, now_ms: int) -> list[str]:
        """The current watchers of a user; expired ones are dropped."""

    async def take_token(self, key: str, rate: float, burst: int, now_s: float) -> int:
        """Spend one token from the bucket ``key``; 0 if allowed, else milliseconds to wait."""


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class MemoryState:
    """Everything in this process: right for one process, the embedded default."""

    def __init__(self, max_buckets: int = 200_000) -> None:
        self._devices: dict[str, set[str]] = defaultdict(set)
        self._watch: dict[str, dict[str, int]] = defaultdict(dict)
        self._buckets: dict[str, _Bucket] = {}
        self._max_buckets = max_buckets

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def device_online(self, user_id: str, device_id: str) -> bool:
        devices = self._devices[user_id]
        before = len(devices)
        devices.add(device_id)
        return before == 0

    async def device_offline(self, user_id: str, device_id: str) -> bool:
        devices = self._devices.get(user_id)
        if not devices or device_id not in devices:
            return False
        devices.discard(device_id)
        if devices:
            return False
        del self._devices[user_id]
        return True

    async def is_online(self, user_id: str) -> bool:
        return bool(self._devices.get(user_id))

    async def online_devices(self) -> int:
        return sum(len(d) for d in self._devices.values())

    async def add_watch(self, watched: str, watcher: str, expiry_ms: int, now_ms: int) -> None:
        self._watch[watched][watcher] = expiry_ms

    async def watchers(self, watched: str, now_ms: int) -> list[str]:
        w = self._watch.get(watched)
        if not w:
            return []
        for key in [k for k, exp in w.items() if exp <= now_ms]:
            del w[key]
        if not w:
            del self._watch[watched]
            return []
        return list(w)

    async def take_token(self, key: str, rate: float, burst: int, now_s: float) -> int:
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self._max_buckets:
                full = [k for k, v in self._buckets.items() if v.tokens + (now_s - v.stamp) * rate >= burst]
                for k in full:
                    del self._buckets[k]
            b = self._buckets[key] = _Bucket(float(burst), now_s)
        else:
            b.tokens = min(float(burst), b.tokens + (now_s - b.stamp) * rate)
            b.stamp = now_s
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0
        return max(1, math.ceil((1.0 - b.tokens) / rate * 1000))

def open_state(url: str | None) -> SharedState:
    if not url:
        return MemoryState()
    if url.startswith(("redis://", "rediss://")):
        from .state_redis import RedisState

        return RedisState(url)
    from . import BackendConfigError

    raise BackendConfigError(f"unknown state scheme in {url!r} (expected redis:// or nothing for in-process)")
