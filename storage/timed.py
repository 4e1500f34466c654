"""A bounded map whose entries are forgotten a fixed time after they were last set.

cachetools' ``TTLCache`` keeps a linked list of expiry times and a recency order, and walks
them on every read and write: about 5 µs a read in a profile of the bridge's message path,
which asks such a map several times per message (BENCHMARKS.md, 2026-12-02 afternoon). Here a
read is a dict lookup and one clock reading. An entry read after it expired is dropped then; one
never read again stays until the map is full, when the one set longest ago goes first, so the
size stays bounded either way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar, overload

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
D = TypeVar("D")


class TimedMap(Generic[K, V]):
    """At most ``maxsize`` entries, each forgotten ``ttl`` seconds (by ``timer``) after it was set."""

    __slots__ = ("_entries", "_maxsize", "_ttl", "_timer")

    def __init__(self, maxsize: int, ttl: float, timer: Callable[[], float] = time.monotonic) -> None:
        if maxsize < 1 or ttl <= 0:
            raise ValueError("a TimedMap needs maxsize >= 1 and ttl > 0")
        self._entries: dict[K, tuple[float, V]] = {}  # in the order they were set
        self._maxsize, self._ttl, self._timer = maxsize, ttl, timer

    @overload
    def get(self, key: K) -> V | None: ...
    @overload
    def get(self, key: K, default: D) -> V | D: ...

    def get(self, key: K, default: object = None) -> object:
        hit = self._entries.get(key)
        if hit is None:
            return default
        if self._timer() - hit[0] >= self._ttl:
            del self._entries[key]
            return default
        return hit[1]

    def __contains__(self, key: object) -> bool:
        return self.get(key, _ABSENT) is not _ABSENT  # type: ignore[arg-type]

    def __setitem__(self, key: K, value: V) -> None:
        entries = self._entries
        entries.pop(key, None)  # set again: it moves to the end of the order
        entries[key] = (self._timer(), value)
        if len(entries) > self._maxsize:
            del entries[next(iter(entries))]

    def pop(self, key: K, default: V | None = None) -> V | None:
        hit = self._entries.pop(key, None)
        if hit is None or self._timer() - hit[0] >= self._ttl:
            return default
        return hit[1]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        """Entries held, expired ones not yet dropped included."""
        return len(self._entries)


_ABSENT = object()
