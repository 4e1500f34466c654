"""Per-device token buckets: ``rate`` requests a second sustained, bursts of ``burst``.

Buckets live in the shared state, so every bridge process draws on the same budget. If the
shared state cannot be reached the request is allowed: a rate limiter must not stop messaging.
"""

from __future__ import annotations

import logging

from storage.base import StorageUnavailable
from storage.state import MemoryState, SharedState

from .clock import Clock

log = logging.getLogger(__name__)


class RateLimiter:
    def __init__(self, clock: Clock, rate: float, burst: int, state: SharedState | None = None) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self._clock = clock
        self.rate = rate
        self.burst = burst
        self._state = state or MemoryState()

    async def take(self, key: str) -> int:
        """Spend one token; return 0 if allowed, else the milliseconds until one is available."""
        try:
            return await self._state.take_token(key, self.rate, self.burst, self._clock.now_ms() / 1000)
        except StorageUnavailable as exc:
            log.warning("rate limiter unavailable, allowing: %s", exc)
            return 0
