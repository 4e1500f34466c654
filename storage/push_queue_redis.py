"""The push queue in Redis, shared by every bridge of a deployment (see :mod:`storage.push_queue`).

Keys share one hash tag per deployment (``pg:{push:NAMESPACE}:…``), so each script touches one
slot. A sorted set holds every pending wake's device by due time; a hash per wake holds what it
covers and its latest claim token; a short-lived key per device remembers its last push for the
coalescing window. A claim (one script: no wake can be scheduled between its steps) moves the
claimed wakes' due time forward by the lease, so a bridge that dies holding a wake hands it on,
and gives each a new token, which ``retry`` and ``done`` must present. Durable as far as the
Redis server's persistence is (run it with ``appendonly yes``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from .base import StorageError, StorageUnavailable
from .push_queue import PushJob

_SCHEDULE = """
local z = KEYS[1]
local best = -1
local n = (#KEYS - 1) / 2
for i = 0, n - 1 do
  local h, s, dev = KEYS[2 + 2 * i], KEYS[3 + 2 * i], ARGV[8 + i]
  local due
  if redis.call('EXISTS', h) == 1 then
    redis.call('HINCRBY', h, 'events', ARGV[3])
    redis.call('HINCRBY', h, 'messages', ARGV[7])
    due = tonumber(redis.call('ZSCORE', z, dev))
    if not due then  -- a wake without its queue entry would never be sent: give it one
      due = tonumber(ARGV[4])
      redis.call('ZADD', z, due, dev)
    end
  else
    due = tonumber(ARGV[4])
    local last = redis.call('GET', s)
    if last then due = math.max(due, tonumber(last) + tonumber(ARGV[5])) end
    redis.call('HSET', h, 'user', ARGV[1], 'event_ms', ARGV[2], 'events', ARGV[3], 'messages', ARGV[7],
               'attempts', 0, 'give_up', ARGV[6])
    redis.call('ZADD', z, due, dev)
  end
  if best < 0 or due < best then best = due end
end
return best
"""
# one step: the due devices whose wakes exist are leased and given a claim token, and what their
# wakes cover is returned with them; a queue entry whose wake is gone is removed. (The wakes'
# keys are made from the prefix, all under the deployment's hash tag: one slot.)
_CLAIM = """
local z, prefix = KEYS[1], ARGV[4]
local out = {}
for i, dev in ipairs(redis.call('ZRANGEBYSCORE', z, '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])) do
  local h = prefix .. dev
  if redis.call('EXISTS', h) == 1 then
    local claim = ARGV[5] .. ':' .. i
    redis.call('ZADD', z, ARGV[2], dev)
    redis.call('HSET', h, 'claim', claim)
    table.insert(out, dev)
    table.insert(out, redis.call('HGETALL', h))
  else
    redis.call('ZREM', z, dev)
  end
end
return out
"""
_RETRY = """
if redis.call('HGET', KEYS[2], 'claim') ~= ARGV[3] then return 0 end
redis.call('HINCRBY', KEYS[2], 'attempts', 1)
redis.call('HDEL', KEYS[2], 'claim')
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
"""
_DONE = """
local z, h, s = KEYS[1], KEYS[2], KEYS[3]
local dev, claimed, now, window = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('HGET', h, 'claim') ~= ARGV[7] then return 0 end  -- claimed again since, or finished
if ARGV[6] == '1' and window > 0 then redis.call('SET', s, now, 'PX', window) end
local events = tonumber(redis.call('HGET', h, 'events') or '0')
local messages = tonumber(redis.call('HGET', h, 'messages') or '0')
if events > claimed then
  local due = now
  local last = redis.call('GET', s)
  if last then due = math.max(now, tonumber(last) + window) end
  redis.call('HSET', h, 'events', events - claimed, 'messages', math.max(0, messages - tonumber(ARGV[8])),
             'event_ms', now, 'attempts', 0, 'give_up', ARGV[5])
  redis.call('HDEL', h, 'claim')
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
                       messages: int, now_ms: int, window_ms: int, give_up_ms: int) -> int:
        if not device_ids:
            return now_ms
        keys = [self._due]
        for d in device_ids:
            keys += [self._wake + d, self._sent + d]
        args = [user_id, event_ms, events, now_ms, window_ms, give_up_ms, messages, *device_ids]
        return int(await self._do(self._scripts["schedule"](keys=keys, args=args)))

    async def claim(self, now_ms: int, lease_ms: int, limit: int) -> list[PushJob]:
        token = uuid.uuid4().hex
        got = await self._do(self._scripts["claim"](keys=[self._due],
                                                    args=[now_ms, now_ms + lease_ms, limit, self._wake, token]))
        jobs: list[PushJob] = []
        for d, h in zip(got[::2], got[1::2], strict=True):
            f = {_text(k): _text(v) for k, v in zip(h[::2], h[1::2], strict=True)}
            jobs.append(PushJob(device_id=_text(d), user_id=f["user"], event_ms=int(f["event_ms"]),
                                events=int(f["events"]), messages=int(f.get("messages", f["events"])),
                                attempts=int(f["attempts"]), give_up_ms=int(f["give_up"]),
                                claim=f["claim"]))
        return jobs

    async def retry(self, job: PushJob, due_ms: int) -> None:
        await self._do(self._scripts["retry"](keys=[self._due, self._wake + job.device_id],
                                              args=[job.device_id, due_ms, job.claim]))

    async def done(self, job: PushJob, *, pushed: bool, now_ms: int, window_ms: int, give_up_ms: int) -> None:
        d = job.device_id
        args = [d, job.events, now_ms, window_ms, give_up_ms, int(pushed), job.claim, job.messages]
        await self._do(self._scripts["done"](keys=[self._due, self._wake + d, self._sent + d], args=args))

    async def depth(self) -> int:
        return int(await self._do(self._redis.zcard(self._due)))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
