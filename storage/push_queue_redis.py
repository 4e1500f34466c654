"""The push queue in Redis, shared by every bridge of a deployment (see :mod:`storage.push_queue`).

Keys share one hash tag per deployment (``pg:{push:NAMESPACE}:…``), so each script touches one
slot. A sorted set holds every pending wake's device by due time; a hash per wake holds what it
covers; a short-lived key per device remembers its last push for the coalescing window. A claim
moves the claimed wakes' due time forward by the lease, so a bridge that dies holding a wake
hands it on. Durable as far as the Redis server's persistence is (run it with ``appendonly yes``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import StorageError, StorageUnavailable
from .push_queue import PushJob

_SCHEDULE = """
local z = KEYS[1]
local best = -1
local n = (#KEYS - 1) / 2
for i = 0, n - 1 do
  local h, s, dev = KEYS[2 + 2 * i], KEYS[3 + 2 * i], ARGV[7 + i]
  local due
  if redis.call('EXISTS', h) == 1 then
    redis.call('HINCRBY', h, 'events', ARGV[3])
    due = tonumber(redis.call('ZSCORE', z, dev) or ARGV[4])
  else
    due = tonumber(ARGV[4])
    local last = redis.call('GET', s)
    if last then due = math.max(due, tonumber(last) + tonumber(ARGV[5])) end
    redis.call('HSET', h, 'user', ARGV[1], 'event_ms', ARGV[2], 'events', ARGV[3], 'attempts', 0, 'give_up', ARGV[6])
    redis.call('ZADD', z, due, dev)
  end
  if best < 0 or due < best then best = due end
end
return best
"""
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, dev in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], dev) end
return due
"""
_RETRY = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[2], 'attempts', 1)
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
"""
_DONE = """
local z, h, s = KEYS[1], KEYS[2], KEYS[3]
local dev, claimed, now, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if ARGV[6] == '1' and window > 0 then redis.call('SET', s, now, 'PX', window) end
local events = tonumber(redis.call('HGET', h, 'events') or '0')
if events > claimed then
  local due = now
  local last = redis.call('GET', s)
  if last then due = math.max(now, tonumber(last) + window) end
  redis.call('HSET', h, 'events', events - claimed, 'event_ms', now, 'attempts', 0, 'give_up', ARGV[5])
  redis.call('ZADD', z, due, dev)
else
  redis.call('DEL', h)
  redis.call('ZREM', z, dev)
end
return 1
"""


class RedisPushQueue:
    def __init__(self, url: str, namespace: str) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise StorageError("the Redis push queue needs the redis package: pip install 'pigeon[redis]'") from exc
        self._redis: Any = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        tag = f"pg:{{push:{namespace}}}"
        self._due = f"{tag}:due"
        self._wake = f"{tag}:w:"
        self._sent = f"{tag}:s:"
        self._scripts: dict[str, Any] = {}

    async def _do(self, coro: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise StorageUnavailable(f"push queue redis: {exc}") from exc

    async def open(self) -> None:
        await self._do(self._redis.ping())
        for name, src in (("schedule", _SCHEDULE), ("claim", _CLAIM), ("retry", _RETRY), ("done", _DONE)):
            self._scripts[name] = self._redis.register_script(src)

    async def close(self) -> None:
        await self._redis.aclose()

    async def schedule(self, user_id: str, device_ids: Sequence[str], *, event_ms: int, events: int,
                       now_ms: int, window_ms: int, give_up_ms: int) -> int:
        if not device_ids:
            return now_ms
        keys = [self._due]
        for d in device_ids:
            keys += [self._wake + d, self._sent + d]
        args = [user_id, event_ms, events, now_ms, window_ms, give_up_ms, *device_ids]
        return int(await self._do(self._scripts["schedule"](keys=keys, args=args)))

    async def claim(self, now_ms: int, lease_ms: int, limit: int) -> list[PushJob]:
        got = await self._do(self._scripts["claim"](keys=[self._due], args=[now_ms, now_ms + lease_ms, limit]))
        devices = [d.decode() if isinstance(d, bytes) else str(d) for d in got]
        if not devices:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for d in devices:
            pipe.hgetall(self._wake + d)
        jobs: list[PushJob] = []
        for d, h in zip(devices, await self._do(pipe.execute()), strict=True):
            if not h:  # finished meanwhile by another worker
                await self._do(self._redis.zrem(self._due, d))
                continue
            f = {k.decode(): v.decode() for k, v in h.items()}
            jobs.append(PushJob(device_id=d, user_id=f["user"], event_ms=int(f["event_ms"]), events=int(f["events"]),
                                attempts=int(f["attempts"]), give_up_ms=int(f["give_up"])))
        return jobs

    async def retry(self, job: PushJob, due_ms: int) -> None:
        await self._do(self._scripts["retry"](keys=[self._due, self._wake + job.device_id],
                                              args=[job.device_id, due_ms]))

    async def done(self, job: PushJob, *, pushed: bool, now_ms: int, window_ms: int, give_up_ms: int) -> None:
        d = job.device_id
        await self._do(self._scripts["done"](keys=[self._due, self._wake + d, self._sent + d],
                                             args=[d, job.events, now_ms, window_ms, give_up_ms, int(pushed)]))

    async def depth(self) -> int:
        return int(await self._do(self._redis.zcard(self._due)))
