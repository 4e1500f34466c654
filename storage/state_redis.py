"""Shared hot state in Redis (redis-py asyncio).

Keys carry a hash tag per user (``pg:{u:USER}:…``), so every
multi-key step touches one slot and the layout works on Redis Cluster. Each step that must be
atomic is one Lua script. A Redis failure raises :class:`storage.base.StorageUnavailable`;
callers decide whether that blocks (it never blocks messaging: see ``bridge.presence``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .base import StorageError, StorageUnavailable
from .peers import PeerClient, PeerLost, PeerServer, peer_key
from .state import HELD_BACK_KEPT_MS, TIME_DIGITS, UNFINISHED_KEPT_MS, DevicesListener
from .stopping import stop_tasks

_ONLINE = """
local added = redis.call('SADD', KEYS[1], ARGV[1])
if added == 1 then redis.call('INCR', KEYS[2]) end
if added == 1 and redis.call('SCARD', KEYS[1]) == 1 then return 1 end
return 0
"""
_OFFLINE = """
local removed = redis.call('SREM', KEYS[1], ARGV[1])
if removed == 1 and redis.call('DECR', KEYS[2]) <= 0 then redis.call('DEL', KEYS[2]) end
if removed == 1 and redis.call('SCARD', KEYS[1]) == 0 then return 1 end
return 0
"""
# a user's device count left at 0 (servers before 2026-12-01 kept them), removed as it is found
_DROP_IF_ZERO = """
if tonumber(redis.call('GET', KEYS[1]) or '0') <= 0 then return redis.call('DEL', KEYS[1]) end
return 0
"""
_WATCHERS = """
local all = redis.call('HGETALL', KEYS[1])
local out = {}
for i = 1, #all, 2 do
  if tonumber(all[i + 1]) <= tonumber(ARGV[1]) then redis.call('HDEL', KEYS[1], all[i])
  else table.insert(out, all[i]) end
end
return out
"""
# each field of KEYS[1] named at an odd ARGV removed if it still holds the value after it
_HDEL_IF_SAME = """
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
return 0
"""
# The time a record of an unfinished request carries (storage/state.py's ``record_time``), as the
# digits written, or nil
_RECORD_TIME = """
local function time_of(v)
  if not v then return nil end
  local t = string.match(v, '^(%d+) ') or string.match(v, '^(%d+)$')
  if t and #t <= tonumber(ARGV[1]) then return t end
  return nil
end
local function later_or_same(stored, value)
  local was, now = time_of(stored), time_of(value)
  return was ~= nil and now ~= nil and tonumber(was) >= tonumber(now)
end
"""
# KEYS[1]'s field at each ARGV[4 + 2i] set to the value after it unless the one there carries a
# time not earlier than the value's (``RedisState.put_unfinished``); the ARGV[3] fields after
# those removed; the key kept ARGV[2] ms
_PUT_UNLESS_LATER = _RECORD_TIME + """
local sets = tonumber(ARGV[3])
for i = 4, 3 + 2 * sets, 2 do
  if not later_or_same(redis.call('HGET', KEYS[1], ARGV[i]), ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
for i = 4 + 2 * sets, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS[1]'s field at each ARGV[3 + 2i] left with the time of the record after it (``forget_unfinished``)
_FORGET = _RECORD_TIME + """
for i = 3, #ARGV, 2 do
  local mark = time_of(ARGV[i + 1])
  if mark and mark ~= ARGV[i + 1] then
    local stored = redis.call('HGET', KEYS[1], ARGV[i])
    if not stored or stored == ARGV[i + 1] or (time_of(stored) and not later_or_same(stored, ARGV[i + 1])) then
      redis.call('HSET', KEYS[1], ARGV[i], mark)
      redis.call('PEXPIRE', KEYS[1], ARGV[2])
    end
  end
end
return 0
"""
REDIS_CONNECTIONS = 64
# Requests between bridge processes (see ``call``): one list per queue (a deployment's partition),
# one per caller for replies. All in one hash slot, so one BLPOP can wait on several of them on
# Redis Cluster too.
RPC_LIST = "pg:{rpc}:q:"
REPLY_LIST = "pg:{rpc}:r:"
# Where the holder of a queue answers directly (storage/peers.py): "HOST:PORT", kept alive by the
# holder every ADVERTISE_S, gone ADVERTISE_TTL_S after it stops.
HOLDER_AT = "pg:{rpc}:at:"
ADVERTISE_S = 1.0
ADVERTISE_TTL_S = 3
HOLDER_CACHE_S = 1.0  # how long a caller trusts the address it read for a queue
RPC_WAIT_S = 1  # a blocking pop returns this often to look at what it serves
# How long a request taken from a queue's list is remembered: the same one pushed again within
# it (redis-py sends a push again when its answer was lost, after the push was applied) is not
# handled twice. Longer than a push's retries take, and than any request waits (FORWARD_TIMEOUT_S).
REQUEST_SEEN_S = 30.0
RPC_BUNCH = 256  # requests (or replies) taken from a list in one round trip
# Where a bridge says a user's devices changed (``devices_changed``): Redis pub/sub, heard by
# every bridge that listens at that moment and by no other.
DEVICES_CHANNEL = "pg:devices"
HEAR_AGAIN_S = 1.0  # a lost subscription is taken again after this long
PING_EVERY_S = 2.0  # the subscription is pinged this often; no pong within PONG_WITHIN_S: lost
PONG_WITHIN_S = 3.0
log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pushes:
    """What one turn of the event loop pushes onto Redis lists."""

    done: asyncio.Future[None]
    lists: dict[str, list[str]] = field(default_factory=dict)
    expire: set[str] = field(default_factory=set)


def _unfinished_key(scope: str, part: int) -> str:
    return f"pg:{{unfinished:{scope}:{part}}}"


# Records of unfinished requests are read as text, one that is not UTF-8 with its bytes kept as
# surrogates (unreadable, so dropped), and written back or dropped by those same bytes.
def _text(raw: bytes | str) -> str:
    return raw.decode(errors="surrogateescape") if isinstance(raw, bytes) else str(raw)


def _raw(text: str) -> bytes:
    return text.encode(errors="surrogateescape")


async def _close_both(pubsub: Any, client: Any) -> None:
    await pubsub.aclose()
    await client.aclose()


class RedisState:
    def __init__(self, url: str, peer_host: str | None = None, peer_secret: bytes | None = None) -> None:
        """``peer_host``: the address this process answers other bridges' requests on, directly
        (storage/peers.py), and the one it gives them; ``peer_secret``: the deployment's secret,
        which only its bridges know. Without both: through Redis lists only."""
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise StorageError("Redis state needs the redis package: pip install 'pigeon[redis]'") from exc
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        # a connection Redis dropped (a restart, CLIENT KILL) is replaced and the command retried,
        # rather than failing the one request that happened to use it
        # At most REDIS_CONNECTIONS at once; a request beyond them waits for one to come free
        # (up to 2 s) rather than failing with "too many connections", as redis-py's default
        # pool does under a few hundred concurrent requests.
        self._url = url
        self._pool: Any = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=REDIS_CONNECTIONS, timeout=2,
            socket_timeout=2, socket_connect_timeout=2, health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._redis: Any = aioredis.Redis(connection_pool=self._pool)
        # (registering one only names it here: Redis is sent it on its first use)
        self._scripts: dict[str, Any] = {name: self._redis.register_script(src) for name, src in (
            ("online", _ONLINE), ("offline", _OFFLINE), ("watchers", _WATCHERS), ("drop_if_zero", _DROP_IF_ZERO),
            ("hdel_if_same", _HDEL_IF_SAME), ("put_unless_later", _PUT_UNLESS_LATER), ("forget", _FORGET))}
        self._me = uuid.uuid4().hex
        self._rids = itertools.count(1)  # a request's id: unique among this process's replies
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._handlers: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {}
        self._reply_task: asyncio.Task[None] | None = None
        self._closing = False
        self._pushes: _Pushes | None = None  # requests and replies waiting for this loop turn's push
        self._push_tasks: set[asyncio.Task[None]] = set()
        self._devices_listeners: list[DevicesListener] = []
        self._devices_task: asyncio.Task[None] | None = None
        self._hearing = False
        self.news_client_name = f"pigeon-news-{self._me[:12]}"  # its subscription's, in CLIENT LIST
        self._peer_host = peer_host if peer_secret else None
        self._peer_key = peer_key(peer_secret) if peer_secret else ""
        self._peer_server: PeerServer | None = None
        self._peer_client: PeerClient | None = None
        self._holders: dict[str, tuple[str | None, float]] = {}  # queue -> (address, read at)
        self._reading: dict[str, asyncio.Future[str | None]] = {}  # queue -> its address being read
        self.direct_calls = 0  # requests answered over a direct connection (for tests and metrics)

    async def _do(self, coro: Any) -> Any:
        from redis.exceptions import RedisError

        try:
            return await coro
        except RedisError as exc:
            raise StorageUnavailable(f"redis: {exc}") from exc
        except OSError as exc:
            raise StorageUnavailable(f"redis: {exc}") from exc

    async def open(self) -> None:
        await self._do(self._redis.ping())
        if self._peer_host is not None:
            self._peer_client = PeerClient(self._peer_key)

    async def close(self) -> None:
        self._closing = True
        if self._devices_task is not None:
            # it looks at ``_closing`` at least every RPC_WAIT_S (see the reply task below)
            await asyncio.wait([self._devices_task], timeout=RPC_WAIT_S + 1)
            await stop_tasks([self._devices_task], "closing the shared state")
            self._devices_task = None
        if self._peer_client is not None:
            await self._peer_client.close()
        if self._reply_task is not None:
            # It ends by itself once its blocking pop returns (within RPC_WAIT_S). Cancelling it
            # in the middle of one is not enough: redis-py can take the cancellation while it
            # reads the reply and go on (storage/stopping.py).
            self._closing = True
            await asyncio.wait([self._reply_task], timeout=RPC_WAIT_S + 1)
            await stop_tasks([self._reply_task], "closing the shared state")
            self._reply_task = None
        await self._redis.aclose()
        await self._pool.disconnect()

    @staticmethod
    def _online_keys(user_id: str) -> list[str]:
        # a per-user device count beside the set keeps each script within the user's slot
        return [f"pg:{{u:{user_id}}}:online", f"pg:{{u:{user_id}}}:count"]

    async def device_online(self, user_id: str, device_id: str) -> bool:
        return bool(await self._do(self._scripts["online"](keys=self._online_keys(user_id), args=[device_id])))

    async def device_offline(self, user_id: str, device_id: str) -> bool:
        return bool(await self._do(self._scripts["offline"](keys=self._online_keys(user_id), args=[device_id])))

    async def is_online(self, user_id: str) -> bool:
        return bool(await self._do(self._redis.scard(f"pg:{{u:{user_id}}}:online")))

    async def online_users(self, user_ids: Sequence[str]) -> set[str]:
        if not user_ids:
            return set()
        pipe = self._redis.pipeline(transaction=False)
        for u in user_ids:
            pipe.scard(f"pg:{{u:{u}}}:online")
        counts = await self._do(pipe.execute())
        return {u for u, n in zip(user_ids, counts, strict=True) if n}

    async def online_devices(self) -> int:
        async def count() -> int:
            total, cursor = 0, 0
            while True:  # a page of keys, then their values in one pipelined round trip
                cursor, keys = await self._redis.scan(cursor, match="pg:{u:*}:count", count=1000)
                if keys:
                    pipe = self._redis.pipeline(transaction=False)
                    for key in keys:
                        pipe.get(key)
                    values = [int(v or 0) for v in await pipe.execute()]
                    total += sum(values)
                    left = [key for key, v in zip(keys, values, strict=True) if v <= 0]
                    if left:  # (the user's count is gone when its last device goes offline)
                        pipe = self._redis.pipeline(transaction=False)
                        for key in left:
                            await self._scripts["drop_if_zero"](keys=[key], client=pipe)  # (queued)
                        await pipe.execute()
                if not cursor:
                    return total

        result: int = await self._do(count())
        return result

    async def add_watch(self, watched: str, watcher: str, expiry_ms: int, now_ms: int) -> None:
        key = f"pg:{{u:{watched}}}:watchers"
        ttl = max(1, expiry_ms - now_ms) + 60_000  # the hash outlives its last watch a little
        await self._do(self._redis.hset(key, watcher, expiry_ms))
        await self._do(self._redis.pexpire(key, ttl, gt=True))
        await self._do(self._redis.pexpire(key, ttl, nx=True))

    async def watchers(self, watched: str, now_ms: int) -> list[str]:
        got = await self._do(self._scripts["watchers"](keys=[f"pg:{{u:{watched}}}:watchers"], args=[now_ms]))
        return [w.decode() if isinstance(w, bytes) else str(w) for w in got]

    # -- devices' refusal windows, handed to a partition's next holder ----------------------------
    async def put_held_back(self, scope: str, part: int, windows: Mapping[str, tuple[int, str]]) -> None:
        if not windows:
            return
        key = f"pg:{{held:{scope}:{part}}}"
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(key, mapping={topic: f"{until} {first}" for topic, (until, first) in windows.items()})
        pipe.pexpire(key, HELD_BACK_KEPT_MS)  # (windows last seconds: the hash goes once none is written)
        await self._do(pipe.execute())

    async def held_back(self, scope: str, part: int, now_ms: int) -> dict[str, tuple[int, str]]:
        got = await self._do(self._redis.hgetall(f"pg:{{held:{scope}:{part}}}"))
        out: dict[str, tuple[int, str]] = {}
        for name, value in got.items():
            topic = name.decode() if isinstance(name, bytes) else str(name)
            until, _, first = (value.decode() if isinstance(value, bytes) else str(value)).partition(" ")
            if until.isdigit() and int(until) > now_ms:
                out[topic] = (int(until), first)
        return out

    # -- what a request left unfinished, handed to a partition's next holder ----------------------
    async def put_unfinished(self, scope: str, part: int, entries: Mapping[str, str | None]) -> None:
        if not entries:
            return
        kept = [_raw(text) for name, value in entries.items() if value is not None for text in (name, value)]
        gone = [_raw(name) for name, value in entries.items() if value is None]
        args = [TIME_DIGITS, UNFINISHED_KEPT_MS, len(kept) // 2, *kept, *gone]
        await self._do(self._scripts["put_unless_later"](keys=[_unfinished_key(scope, part)], args=args))

    async def drop_unfinished(self, scope: str, part: int, entries: Mapping[str, str]) -> None:
        if not entries:
            return
        args = [_raw(text) for name, value in entries.items() for text in (name, value)]
        await self._do(self._scripts["hdel_if_same"](keys=[_unfinished_key(scope, part)], args=args))

    async def forget_unfinished(self, scope: str, part: int, entries: Mapping[str, str]) -> None:
        if not entries:
            return
        pairs = [_raw(text) for name, value in entries.items() for text in (name, value)]
        args = [TIME_DIGITS, UNFINISHED_KEPT_MS, *pairs]
        await self._do(self._scripts["forget"](keys=[_unfinished_key(scope, part)], args=args))

    async def unfinished(self, scope: str, part: int) -> dict[str, str]:
        got = await self._do(self._redis.hgetall(_unfinished_key(scope, part)))
        return {_text(k): _text(v) for k, v in got.items()}

    # -- requests between bridge processes -------------------------------------------------------
    async def devices_changed(self, user_id: str) -> None:
        await self._do(self._redis.publish(DEVICES_CHANNEL, user_id))

    def listen_devices(self, listener: DevicesListener) -> None:
        self._devices_listeners.append(listener)
        if self._devices_task is None:
            self._devices_task = asyncio.get_running_loop().create_task(self._hear_devices(),
                                                                        name="pigeon-devices-news")

    def hears_devices(self) -> bool:
        return self._hearing

    def _tell(self, user_id: str | None) -> None:
        for listener in self._devices_listeners:
            listener(user_id)

    async def _hear_devices(self) -> None:
        """Subscribed to DEVICES_CHANNEL for as long as this runs, on a connection of its own
        that is never silently retried (redis-py would reconnect and subscribe again by itself,
        trusting the listeners' answers meanwhile). Listeners are told None each time the
        subscription is confirmed and when it is lost, or answers no ping within PONG_WITHIN_S:
        what was said in between was not heard."""
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        loop = asyncio.get_running_loop()
        while not self._closing:
            client: Any = aioredis.Redis.from_url(self._url, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0),
                                                  client_name=self.news_client_name)
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(DEVICES_CHANNEL)
                pinged_at: float | None = None
                pong_at = loop.time()
                while not self._closing:
                    now = loop.time()
                    if pinged_at is None and now - pong_at >= PING_EVERY_S:
                        await pubsub.ping()
                        pinged_at = now
                    elif pinged_at is not None and now - pinged_at > PONG_WITHIN_S:
                        raise TimeoutError(f"no pong in {PONG_WITHIN_S}s")
                    message = await pubsub.get_message(timeout=0.5)
                    if message is None:
                        continue
                    if message["type"] == "pong":
                        pong_at, pinged_at = loop.time(), None
                    elif message["type"] == "subscribe":
                        self._hearing = True
                        self._tell(None)
                    elif message["type"] == "message":
                        self._tell(message["data"].decode())
            except Exception as exc:
                log.warning("not hearing which users' devices change (%s); trying again", exc)
            finally:
                if self._hearing:
                    self._hearing = False
                    self._tell(None)
                try:  # (shielded: a second cancellation at close must not leave the socket open)
                    await asyncio.shield(_close_both(pubsub, client))
                except Exception as exc:
                    log.debug("closing the devices subscription: %s", exc)
            if not self._closing:
                await asyncio.sleep(HEAR_AGAIN_S)

    def handle(self, kind: str, handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> None:
        """Answer requests of that kind (see ``call``) with ``handler``."""
        self._handlers[kind] = handler

    async def call(self, queue: str, request: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """Hand ``request`` (with a ``kind``) to whichever process serves ``queue`` (a partition of
        one deployment: ``KEYSPACE:pN``) and wait for its answer. A request nobody takes in time
        raises :class:`StorageUnavailable` (it may still be handled later: requests carry their
        own deadline, and what they ask is idempotent). The whole call, Redis's part in it
        included, takes at most ``timeout_s``: while Redis does not answer, each of its commands
        fails only after its retries (about 8 s), and a forward made two of them."""
        try:
            async with asyncio.timeout(timeout_s):
                if self._peer_host is not None:
                    reply = await self._call_direct(queue, request, timeout_s)
                    if reply is not None:
                        return reply
                if self._reply_task is None or self._reply_task.done():
                    self._reply_task = asyncio.create_task(self._collect_replies(), name="rpc-replies")
                rid = str(next(self._rids))
                fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
                self._replies[rid] = fut
                try:
                    await self._push(f"{RPC_LIST}{queue}", json.dumps([self._me, rid, request]), expire=False)
                    return await fut
                finally:
                    self._replies.pop(rid, None)
        except TimeoutError as exc:
            raise StorageUnavailable(f"no answer from the holder of {queue} in {timeout_s:.0f} s") from exc

    async def _call_direct(self, queue: str, request: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """The holder's answer over a direct connection (storage/peers.py), or None when the
        request was not handled that way and must go through the queue's Redis list."""
        address = await self._holder_of(queue)
        if address is None:
            return None
        if self._peer_client is None:
            return None
        try:
            reply = await self._peer_client.call(address, queue, request, timeout_s)
        except PeerLost as exc:
            self._holders.pop(queue, None)
            raise StorageUnavailable(f"{exc} (the holder of {queue} may have handled the request)") from exc
        except TimeoutError as exc:
            raise StorageUnavailable(f"no answer from the holder of {queue} in {timeout_s:.0f} s") from exc
        if reply is None:  # not handled there (moved, or no connection): the Redis list finds the holder
            self._holders.pop(queue, None)
            return None
        self.direct_calls += 1
        return reply

    async def _holder_of(self, queue: str) -> str | None:
        """Where the holder of ``queue`` answers, as last read (at most HOLDER_CACHE_S ago). The
        requests that wait for one reading go on in the order they were made."""
        now = time.monotonic()
        known = self._holders.get(queue)
        if known is not None and now - known[1] < HOLDER_CACHE_S:
            return known[0]
        reading = self._reading.get(queue)
        if reading is None:
            reading = self._reading[queue] = asyncio.get_running_loop().create_future()
            # while Redis cannot say (or the reading is given up): the address last read, if any
            address = known[0] if known is not None else None
            try:
                raw = await self._do(self._redis.get(f"{HOLDER_AT}{queue}"))
                read = raw.decode() if isinstance(raw, bytes) else raw
                mine = self._peer_server.address if self._peer_server is not None else None
                address = None if read == mine else read  # (mine: advertised before it gave the queue up)
                self._holders[queue] = (address, now)
            except StorageUnavailable:
                pass
            finally:
                del self._reading[queue]
                reading.set_result(address)
        return await asyncio.shield(reading)

    async def _advertise(self, queues: Callable[[], Sequence[str]], address: str) -> None:
        """Say where this process answers for each queue it serves, until cancelled."""
        while True:
            held = queues()
            if held:
                pipe = self._redis.pipeline(transaction=False)
                for q in held:
                    pipe.set(f"{HOLDER_AT}{q}", address, ex=ADVERTISE_TTL_S)
                try:
                    await self._do(pipe.execute())
                except StorageUnavailable as exc:
                    log.warning("could not say where this bridge answers: %s", exc)
            await asyncio.sleep(ADVERTISE_S)

    def _handle_request(self, request: dict[str, Any]) -> Awaitable[dict[str, Any]]:
        """The answer of the handler of the request's kind: a coroutine, or a future it settles."""
        handler = self._handlers.get(str(request.get("kind")))
        if handler is not None:
            return handler(request)
        unknown: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        unknown.set_result({"error": "unknown request"})
        return unknown

    async def _push(self, key: str, item: str, *, expire: bool) -> None:
        """Append ``item`` to the list ``key``. Everything pushed in one turn of the event loop goes
        in one pipelined round trip, one RPUSH per list in the order pushed (a reply list also
        gets its expiry); returns once that round trip is done."""
        pushes = self._pushes
        if pushes is None:  # the first this turn: the task that sends them starts on the next
            pushes = self._pushes = _Pushes(asyncio.get_running_loop().create_future())
            task = asyncio.get_running_loop().create_task(self._write_pushes(pushes), name="rpc-push")
            self._push_tasks.add(task)
            task.add_done_callback(self._push_tasks.discard)
        pushes.lists.setdefault(key, []).append(item)
        if expire:
            pushes.expire.add(key)
        await asyncio.shield(pushes.done)

    async def _write_pushes(self, pushes: _Pushes) -> None:
        if self._pushes is pushes:  # pushes from here on go in the next round trip
            self._pushes = None
        pipe = self._redis.pipeline(transaction=False)
        for key, items in pushes.lists.items():
            pipe.rpush(key, *items)
            if key in pushes.expire:
                pipe.expire(key, 60)
        try:
            await self._do(pipe.execute())
        except StorageUnavailable as exc:
            pushes.done.set_exception(exc)
            pushes.done.exception()  # retrieved here: no waiter may be left to see it
        else:
            pushes.done.set_result(None)

    async def _collect_replies(self) -> None:
        key = f"{REPLY_LIST}{self._me}"
        while not self._closing:
            got = await self._pop([key], "replies from other bridges")
            if got is None:
                continue
            for item in [got[1], *await self._more(key)]:
                rid, reply = json.loads(item)
                fut = self._replies.get(rid)
                if fut is not None and not fut.done():
                    fut.set_result(reply)

    async def _pop(self, keys: list[str], what: str) -> Any:
        """(list, item) from the first of ``keys`` to hold one, waiting up to RPC_WAIT_S; None if
        nothing came (or Redis could not be reached: then after a pause)."""
        try:
            return await self._do(self._redis.blpop(keys, timeout=RPC_WAIT_S))
        except StorageUnavailable as exc:
            log.warning("waiting for %s: %s", what, exc)
            await asyncio.sleep(0.5)
            return None

    async def _more(self, *keys: str) -> list[bytes]:
        """What else waits in the lists, taken in one round trip after a blocking pop: one pop
        per item, or per list, would let busy lists grow (each waits for the event loop's next
        turn, and a holder serves a list per partition it holds)."""
        try:
            if len(keys) == 1:
                return list(await self._do(self._redis.lpop(keys[0], RPC_BUNCH)) or [])
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                pipe.lpop(key, RPC_BUNCH)
            return [item for got in await self._do(pipe.execute()) for item in got or []]
        except StorageUnavailable as exc:
            log.warning("reading %s: %s", ", ".join(keys), exc)
            return []

    async def serve(self, queues: Callable[[], Sequence[str]]) -> None:
        """Take requests for the queues ``queues()`` names (asked anew at every wait) and answer
        each with the handler of its kind; runs until cancelled. A request popped from a queue
        given up meanwhile goes back to the front of it, for the next holder."""
        advertising: asyncio.Task[None] | None = None
        if self._peer_host is not None and self._peer_server is None:
            server = PeerServer(self._peer_key, lambda q: q in queues(), self._handle_request)
            try:
                address = await server.start(self._peer_host)
            except OSError as exc:
                log.warning("cannot answer other bridges directly on %s (%s): through Redis only",
                            self._peer_host, exc)
            else:
                self._peer_server = server
                advertising = asyncio.create_task(self._advertise(queues, address), name="rpc-advertise")
        try:
            await self._serve_lists(queues)
        finally:
            try:
                if advertising is not None:
                    await stop_tasks([advertising], "no longer answering other bridges")
            finally:
                if self._peer_server is not None:
                    await self._peer_server.close()
                    self._peer_server = None

    async def _serve_lists(self, queues: Callable[[], Sequence[str]]) -> None:
        running: set[asyncio.Task[None]] = set()
        seen: dict[tuple[str, str], float] = {}  # (caller, request id) -> when taken, oldest first

        async def answer(caller: str, rid: str, request: dict[str, Any]) -> None:
            try:
                reply = await self._handle_request(request)
            except Exception as exc:  # an answer is always sent: the caller is waiting for it
                log.exception("answering a request of another bridge failed")
                reply = {"error": f"{type(exc).__name__}"}
            try:
                await self._push(f"{REPLY_LIST}{caller}", json.dumps([rid, reply]), expire=True)
            except StorageUnavailable as exc:
                log.warning("could not answer a request of another bridge: %s", exc)

        while True:
            keys = [f"{RPC_LIST}{q}" for q in queues()]
            if not keys:
                await asyncio.sleep(RPC_WAIT_S / 4)
                continue
            got = await self._pop(keys, "requests from other bridges")
            if got is None:
                continue
            key = got[0].decode() if isinstance(got[0], bytes) else str(got[0])
            held = [f"{RPC_LIST}{q}" for q in queues()]
            if key not in held:
                try:
                    await self._do(self._redis.lpush(key, got[1]))
                except StorageUnavailable as exc:
                    log.warning("could not hand back a request for %s: %s", key, exc)
                continue
            for item in [got[1], *await self._more(*held)]:
                try:
                    caller, rid, request = json.loads(item)
                    if not isinstance(request, dict):
                        raise TypeError("not an object")
                except (ValueError, TypeError):
                    log.warning("ignoring a malformed request in %s", ", ".join(held))
                    continue
                now = time.monotonic()
                while seen and now - next(iter(seen.values())) > REQUEST_SEEN_S:
                    del seen[next(iter(seen))]
                if (str(caller), str(rid)) in seen:  # the same push made twice: handled once
                    log.info("a request of another bridge came twice; answered once")
                    continue
                seen[(str(caller), str(rid))] = now
                task = asyncio.create_task(answer(caller, rid, request), name="rpc-answer")
                running.add(task)
                task.add_done_callback(running.discard)
