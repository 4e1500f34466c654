"""The shared-state contract, run unchanged on the in-process state and on Redis."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from storage.state import MemoryState, SharedState, is_mark, open_state
from tests.conftest import production_url
from tests.test_push_worker import until


@pytest.fixture(params=["memory", "redis"])
async def state(request: pytest.FixtureRequest) -> AsyncIterator[SharedState]:
    s = open_state(None if request.param == "memory" else production_url("PIGEON_REDIS", "redis://"))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def uid() -> str:
    return "u" + uuid.uuid4().hex[:12]


async def test_a_user_is_online_while_any_device_is(state: SharedState) -> None:
    u = uid()
    assert not await state.is_online(u)
    assert await state.device_online(u, "d1") is True
    assert await state.device_online(u, "d1") is False  # already
    assert await state.device_online(u, "d2") is False  # user was online already
    assert await state.device_offline(u, "d1") is False  # d2 still there
    assert await state.is_online(u)
    assert await state.device_offline(u, "d2") is True
    assert await state.device_offline(u, "d2") is False
    assert not await state.is_online(u)


async def test_online_users_are_asked_together(state: SharedState) -> None:
    a, b, c = uid(), uid(), uid()
    await state.device_online(a, "d1")
    await state.device_online(c, "d1")
    await state.device_online(c, "d2")
    await state.device_offline(c, "d1")
    assert await state.online_users([a, b, c]) == {a, c}
    assert await state.online_users([]) == set()
    await state.device_offline(a, "d1")
    await state.device_offline(c, "d2")
    assert await state.online_users([a, b, c]) == set()


async def test_online_device_count(state: SharedState) -> None:
    before = await state.online_devices()
    u = uid()
    await state.device_online(u, "a")
    await state.device_online(u, "b")
    assert await state.online_devices() == before + 2
    await state.device_offline(u, "a")
    await state.device_offline(u, "b")
    assert await state.online_devices() == before


async def test_a_user_gone_offline_leaves_no_presence_key_in_redis() -> None:
    """The device count walks the users' count keys: one left behind at 0 by every user who was
    ever online made each count (every 5 s while /metrics is scraped) walk them all, for good."""
    import redis.asyncio as aioredis

    url = production_url("PIGEON_REDIS", "redis://")
    s = open_state(url)
    await s.open()
    raw = aioredis.from_url(url)
    try:
        u = uid()
        await s.device_online(u, "a")
        await s.device_online(u, "b")
        await s.device_offline(u, "a")
        assert await raw.get(f"pg:{{u:{u}}}:count") == b"1"
        await s.device_offline(u, "b")
        await s.device_offline(u, "b")  # (again: changes nothing)
        assert await raw.exists(f"pg:{{u:{u}}}:count", f"pg:{{u:{u}}}:online") == 0
        await s.device_online(u, "a")
        assert await raw.get(f"pg:{{u:{u}}}:count") == b"1" and await s.is_online(u)
        await s.device_offline(u, "a")
        assert await raw.exists(f"pg:{{u:{u}}}:count") == 0
        # one left at 0 by an older server goes with the next count; one at 1 stays
        old, online = uid(), uid()
        await raw.set(f"pg:{{u:{old}}}:count", 0)
        await s.device_online(online, "a")
        await s.online_devices()
        assert await raw.exists(f"pg:{{u:{old}}}:count") == 0
        assert await raw.get(f"pg:{{u:{online}}}:count") == b"1"
        await s.device_offline(online, "a")
    finally:
        await raw.aclose()
        await s.close()


async def test_refusal_windows_wait_for_a_partitions_next_holder(state: SharedState) -> None:
    """What one bridge records of its devices' refusal windows, the next holder of their
    partition reads: each device's latest, only those still open, and only that partition's
    of that deployment."""
    scope = f"s{uuid.uuid4().hex[:8]}"
    await state.put_held_back(scope, 3, {"up/u1/d1": (5_000, "m1"), "up/u2/d2": (1_000, "m7")})
    await state.put_held_back(scope, 3, {"up/u1/d1": (6_000, "m1")})  # (grown)
    await state.put_held_back(scope, 4, {"up/u9/d9": (9_000, "x")})
    await state.put_held_back(scope, 3, {})
    assert await state.held_back(scope, 3, 2_000) == {"up/u1/d1": (6_000, "m1")}
    assert await state.held_back(scope, 3, 7_000) == {}
    assert await state.held_back(f"{scope}x", 3, 0) == {}
    assert await state.held_back(scope, 4, 0) == {"up/u9/d9": (9_000, "x")}


async def test_unfinished_requests_wait_for_a_partitions_next_holder(state: SharedState) -> None:
    """What a bridge records as unfinished for a partition's users, the next holder reads: each
    name's latest value, without those forgotten, and only that partition's of that deployment."""
    scope = f"s{uuid.uuid4().hex[:8]}"
    await state.put_unfinished(scope, 3, {"n1": "[1]", "a1": "7"})
    await state.put_unfinished(scope, 3, {"n1": "[1,2]", "a2": "9"})  # (replaced; another)
    await state.put_unfinished(scope, 3, {"a1": None, "gone": None})  # (forgotten; never there)
    await state.put_unfinished(scope, 4, {"n9": "[]"})
    await state.put_unfinished(scope, 3, {})
    assert await state.unfinished(scope, 3) == {"n1": "[1,2]", "a2": "9"}
    assert await state.unfinished(scope, 4) == {"n9": "[]"}
    assert await state.unfinished(f"{scope}x", 3) == {}
    await state.put_unfinished(scope, 4, {"n9": None})
    assert await state.unfinished(scope, 4) == {}
    # dropped only as it was read: one written again since stays
    await state.drop_unfinished(scope, 3, {"n1": "[1]", "a2": "9", "gone": "x"})
    assert await state.unfinished(scope, 3) == {"n1": "[1,2]"}
    await state.drop_unfinished(scope, 3, {"n1": "[1,2]"})
    await state.drop_unfinished(scope, 3, {})
    assert await state.unfinished(scope, 3) == {}


async def test_a_record_landing_after_a_later_one_or_its_forgetting_changes_nothing(state: SharedState) -> None:
    """A record of a field replaces what is there only when it is later (by the time it starts
    with); forgetting one leaves its time, which refuses it and any earlier one landing after
    that, and takes a later one. Values without a time are written and dropped as they are."""
    scope = f"s{uuid.uuid4().hex[:8]}~"
    await state.put_unfinished(scope, 3, {"f": "1000 [2]", "g": "1000 x", "h": "1000 y"})
    await state.put_unfinished(scope, 3, {"f": "999 [1]", "g": "1000 z", "h": "1001 y2"})
    assert await state.unfinished(scope, 3) == {"f": "1000 [2]", "g": "1000 x", "h": "1001 y2"}
    await state.put_unfinished(scope, 3, {"t": "no time", "f": "no time"})
    await state.put_unfinished(scope, 3, {"t": "1 then one"})
    assert await state.unfinished(scope, 3) == {"f": "no time", "g": "1000 x", "h": "1001 y2", "t": "1 then one"}
    await state.put_unfinished(scope, 3, {"f": "1000 [2]", "t": "no time"})
    # forgotten: each that holds the record or an earlier one (or nothing yet) is left its time
    await state.forget_unfinished(scope, 3, {"f": "1000 [2]", "g": "1001 x2", "h": "1000 y", "n": "1005 n",
                                             "t": "no time", "u": "7"})
    assert await state.unfinished(scope, 3) == {"f": "1000", "g": "1001", "h": "1001 y2", "n": "1005",
                                                "t": "no time"}
    assert [is_mark(v) for v in (await state.unfinished(scope, 3)).values()].count(True) == 3
    await state.put_unfinished(scope, 3, {"f": "1000 [2]", "g": "999 [1]", "n": "1005 n"})  # (landing late)
    assert await state.unfinished(scope, 3) == {"f": "1000", "g": "1001", "h": "1001 y2", "n": "1005",
                                                "t": "no time"}
    await state.forget_unfinished(scope, 3, {"g": "1000 x"})  # (an earlier one's forgetting, late)
    await state.put_unfinished(scope, 3, {"f": "1002 [3]"})  # (a later record of the field)
    assert await state.unfinished(scope, 3) == {"f": "1002 [3]", "g": "1001", "h": "1001 y2", "n": "1005",
                                                "t": "no time"}
    await state.drop_unfinished(scope, 3, {"g": "1001", "n": "1004"})  # (a mark dropped as it is)
    assert await state.unfinished(scope, 3) == {"f": "1002 [3]", "h": "1001 y2", "n": "1005", "t": "no time"}
    assert await state.unfinished(scope, 4) == {}


async def test_unfinished_requests_recorded_in_redis_expire_and_any_can_be_dropped() -> None:
    """The record of a partition's unfinished requests goes by itself a day after its last
    change; one whose bytes are not UTF-8 (not written by a bridge) can be read and dropped."""
    import redis.asyncio as aioredis

    from storage.state import UNFINISHED_KEPT_MS

    url = production_url("PIGEON_REDIS", "redis://")
    s = open_state(url)
    await s.open()
    raw = aioredis.from_url(url)
    scope = f"s{uuid.uuid4().hex[:8]}"
    try:
        await s.put_unfinished(scope, 5, {"n1": "[]"})
        assert 0 < await raw.pttl(f"pg:{{unfinished:{scope}:5}}") <= UNFINISHED_KEPT_MS
        await s.put_unfinished(scope, 5, {"n1": None})
        assert await raw.exists(f"pg:{{unfinished:{scope}:5}}") == 0
        await s.forget_unfinished(scope, 5, {"n1": "12 []"})  # (what forgetting leaves goes too)
        assert 0 < await raw.pttl(f"pg:{{unfinished:{scope}:5}}") <= UNFINISHED_KEPT_MS
        await s.drop_unfinished(scope, 5, {"n1": "12"})
        # a field that is not UTF-8 is read as text all the same, and can be dropped by that name
        await raw.hset(f"pg:{{unfinished:{scope}:5}}", mapping={b"n\xff": b"1 \xfe", b"a": b"2 3"})
        got = await s.unfinished(scope, 5)
        assert got["a"] == "2 3" and len(got) == 2
        await s.put_unfinished(scope, 5, {name: None for name in got if name != "a"})
        assert await s.unfinished(scope, 5) == {"a": "2 3"}
        # and so can one whose value is not UTF-8, by its value as read
        await raw.hset(f"pg:{{unfinished:{scope}:5}}", mapping={b"n\xff": b"1 \xfe"})
        got = await s.unfinished(scope, 5)
        await s.drop_unfinished(scope, 5, {name: value for name, value in got.items() if name != "a"})
        assert await s.unfinished(scope, 5) == {"a": "2 3"}
    finally:
        await raw.aclose()
        await s.close()


async def test_watches_expire(state: SharedState) -> None:
    u = uid()
    await state.add_watch(u, "w1/d1", expiry_ms=2_000, now_ms=1_000)
    await state.add_watch(u, "w2/d2", expiry_ms=5_000, now_ms=1_000)
    assert sorted(await state.watchers(u, now_ms=1_000)) == ["w1/d1", "w2/d2"]
    assert await state.watchers(u, now_ms=3_000) == ["w2/d2"]
    assert await state.watchers(u, now_ms=6_000) == []


async def test_redis_failures_surface_only_as_storage_unavailable() -> None:
    import redis.asyncio as aioredis

    from storage.base import StorageUnavailable

    url = production_url("PIGEON_REDIS", "redis://")
    state = open_state(url)
    await state.open()
    admin = aioredis.from_url(url)
    try:
        await admin.client_kill_filter(_type="normal", skipme=True)  # every other connection is cut
        u = uid()
        calls = [lambda: state.online_devices(), lambda: state.device_online(u, "d"), lambda: state.is_online(u),
                 lambda: state.watchers(u, 0)]
        for call in calls:
            try:
                await call()
            except StorageUnavailable:
                pass  # the one error a caller has to handle
    finally:
        await admin.aclose()
        await state.close()


async def test_hundreds_of_requests_at_once_all_get_answered(state: SharedState) -> None:
    """More concurrent requests than the Redis client keeps connections: they wait their turn."""
    users = [f"u-many-{i}" for i in range(300)]
    await asyncio.gather(*(state.device_online(u, "d1") for u in users))
    assert await asyncio.gather(*(state.is_online(u) for u in users)) == [True] * 300


async def test_requests_between_bridges_keep_their_order_and_share_round_trips() -> None:
    """Requests one process hands another arrive in the order they were made, and those made in
    the same turn of the event loop (and their answers) travel in one round trip, not one each."""
    import redis.asyncio as aioredis

    from storage.state_redis import RedisState

    url = production_url("PIGEON_REDIS", "redis://")
    # through Redis lists only (peer_host=None): the way every request takes when no direct
    # connection to the holder can be had
    caller, holder = RedisState(url, peer_host=None), RedisState(url, peer_host=None)
    admin = aioredis.from_url(url)
    queue = f"test-order-{uid()}:p0"
    seen: list[int] = []

    async def echo(request: dict[str, object]) -> dict[str, object]:
        n = request["n"]
        assert isinstance(n, int)
        seen.append(n)
        return {"n": n * 2}

    await caller.open()
    await holder.open()
    holder.handle("echo", echo)
    serving = asyncio.create_task(holder.serve(lambda: [queue]))
    try:
        await caller.call(queue, {"kind": "echo", "n": -1}, 5)  # both sides are running
        seen.clear()
        pushes = (await admin.info("commandstats")).get("cmdstat_rpush", {}).get("calls", 0)
        replies = await asyncio.gather(*(caller.call(queue, {"kind": "echo", "n": i}, 5) for i in range(50)))
        assert replies == [{"n": 2 * i} for i in range(50)]
        assert seen == list(range(50))
        pushed = (await admin.info("commandstats"))["cmdstat_rpush"]["calls"] - pushes
        assert pushed < 20, pushed  # one per request and one per answer would be 100
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await admin.aclose()
        await caller.close()
        await holder.close()


SECRET = b"the test deployment's secret"


class _Echo:
    """A holder's handler that records what it was asked (and can be held back)."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.hold: asyncio.Event | None = None

    async def __call__(self, request: dict[str, object]) -> dict[str, object]:
        n = request["n"]
        assert isinstance(n, int)
        self.seen.append(n)
        if self.hold is not None:
            await self.hold.wait()
        return {"n": n * 2}


async def _serving(url: str, queues: list[str]) -> tuple[object, _Echo, asyncio.Task[None]]:
    from storage.state_redis import RedisState

    holder = RedisState(url, "127.0.0.1", SECRET)
    await holder.open()
    echo = _Echo()
    holder.handle("echo", echo)
    return holder, echo, asyncio.create_task(holder.serve(lambda: list(queues)))


@contextlib.asynccontextmanager
async def _served(url: str, queues: list[str]) -> AsyncIterator[_Echo]:
    """A holder serving ``queues`` (echoing what it is asked) for the block, then stopped."""
    holder, echo, serving = await _serving(url, queues)
    try:
        yield echo
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await holder.close()  # type: ignore[attr-defined]


async def _direct_ready(caller: object, queue: str) -> None:
    """Until the caller has learnt where the holder answers (it advertises every second)."""
    from storage.state_redis import RedisState

    assert isinstance(caller, RedisState)
    for _ in range(60):
        caller._holders.pop(queue, None)
        if await caller._holder_of(queue) is not None:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the holder never said where it answers")


async def test_requests_between_bridges_go_straight_to_the_holder_in_order() -> None:
    """With a direct connection (storage/peers.py) a request and its answer are one frame each
    way: nothing is pushed onto a Redis list, and the holder takes them in the order made."""
    import redis.asyncio as aioredis

    from storage.state_redis import RedisState

    url = production_url("PIGEON_REDIS", "redis://")
    queue = f"test-direct-{uid()}:p0"
    holder, echo, serving = await _serving(url, [queue])
    caller = RedisState(url, "127.0.0.1", SECRET)
    await caller.open()
    admin = aioredis.from_url(url)
    try:
        await _direct_ready(caller, queue)
        pushes = (await admin.info("commandstats")).get("cmdstat_rpush", {}).get("calls", 0)
        replies = await asyncio.gather(*(caller.call(queue, {"kind": "echo", "n": i}, 5) for i in range(50)))
        assert replies == [{"n": 2 * i} for i in range(50)]
        assert echo.seen == list(range(50))
        assert caller.direct_calls == 50
        assert (await admin.info("commandstats")).get("cmdstat_rpush", {}).get("calls", 0) == pushes
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await admin.aclose()
        await caller.close()
        await holder.close()  # type: ignore[attr-defined]


async def test_requests_between_bridges_go_on_over_their_connection_while_redis_cannot_answer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis stops answering the caller after it learnt where the holder answers: once the
    address it read is older than HOLDER_CACHE_S it cannot read it again, and keeps using it
    (the direct connection does not need Redis) rather than failing every request."""
    import time

    from storage.base import StorageUnavailable
    from storage.state_redis import RedisState

    url = production_url("PIGEON_REDIS", "redis://")
    queue = f"test-no-redis-{uid()}:p0"
    async with _served(url, [queue]) as echo:
        caller = RedisState(url, "127.0.0.1", SECRET)
        await caller.open()
        try:
            await _direct_ready(caller, queue)
            address, _read_at = caller._holders[queue]

            async def no_answer(coro: Any) -> Any:
                coro.close()
                raise StorageUnavailable("redis: no answer")

            with monkeypatch.context() as patched:
                patched.setattr(caller, "_do", no_answer)
                caller._holders[queue] = (address, time.monotonic() - 10)  # read long ago
                assert await caller.call(queue, {"kind": "echo", "n": 3}, 5) == {"n": 6}
            assert echo.seen == [3] and caller.direct_calls == 1
        finally:
            await caller.close()


async def test_a_request_pushed_twice_onto_a_queues_list_is_handled_once() -> None:
    """redis-py sends a push again when its answer was lost after Redis applied it: the request
    is then twice in the queue's list. The holder handles it once (a receipt or a system message,
    which carry no request id of their own, would otherwise be stored twice)."""
    import json

    import redis.asyncio as aioredis

    from storage.state_redis import RPC_LIST

    url = production_url("PIGEON_REDIS", "redis://")
    queue = f"test-twice-{uid()}:p0"
    async with _served(url, [queue]) as echo:
        admin = aioredis.from_url(url)
        try:
            twice = json.dumps(["a-caller", "7", {"kind": "echo", "n": 1}])
            await admin.rpush(f"{RPC_LIST}{queue}", twice, twice,
                              json.dumps(["a-caller", "8", {"kind": "echo", "n": 2}]))
            await until(lambda: 2 in echo.seen)  # the request after them, handled
            assert echo.seen == [1, 2]
        finally:
            await admin.aclose()


async def test_a_request_for_a_queue_given_up_reaches_the_new_holder_through_redis() -> None:
    """The holder a caller remembers has given the queue up: it answers "moved" without handling
    the request, and the caller pushes it onto the queue's Redis list, where the new holder takes it."""
    from storage.state_redis import RedisState

    url = production_url("PIGEON_REDIS", "redis://")
    queue = f"test-moved-{uid()}:p0"
    old_queues = [queue]
    old, old_echo, old_serving = await _serving(url, old_queues)
    caller = RedisState(url, "127.0.0.1", SECRET)
    await caller.open()
    new, new_echo, new_serving = None, None, None
    try:
        await _direct_ready(caller, queue)
        assert await caller.call(queue, {"kind": "echo", "n": 1}, 5) == {"n": 2}
        old_queues.clear()  # given up; the caller still has the old holder's address
        new, new_echo, new_serving = await _serving(url, [])
        new_queues = [queue]
        new_serving.cancel()
        new_serving = asyncio.create_task(new.serve(lambda: list(new_queues)))  # type: ignore[attr-defined]
        assert await caller.call(queue, {"kind": "echo", "n": 2}, 5) == {"n": 4}
        assert old_echo.seen == [1] and new_echo.seen == [2]
    finally:
        for task in (old_serving, new_serving):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await caller.close()
        await old.close()  # type: ignore[attr-defined]
        if new is not None:
            await new.close()  # type: ignore[attr-defined]


async def test_a_connection_without_the_deployments_key_is_refused_unheard() -> None:
    """Only a bridge that knows the deployment's secret is answered; one of another deployment
    (another secret) is refused, and its requests go through Redis instead."""
    import json
    import struct

    from storage.state_redis import RedisState

    url = production_url("PIGEON_REDIS", "redis://")
    queue = f"test-secret-{uid()}:p0"
    holder, echo, serving = await _serving(url, [queue])
    caller = RedisState(url, "127.0.0.1", SECRET)
    await caller.open()
    try:
        await _direct_ready(caller, queue)
        address = await caller._holder_of(queue)
        assert address is not None
        host, _, port = address.rpartition(":")

        def frame(obj: object) -> bytes:
            raw = json.dumps(obj).encode()
            return struct.pack(">I", len(raw)) + raw

        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(frame("not the key") + frame([1, queue, {"kind": "echo", "n": 7}]))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == frame("refused")  # and closed, nothing answered
        writer.close()
        assert echo.seen == []
        stranger = RedisState(url, "127.0.0.1", b"another deployment's secret")
        await stranger.open()
        try:
            assert await stranger.call(queue, {"kind": "echo", "n": 8}, 5) == {"n": 16}  # through Redis
            assert stranger.direct_calls == 0 and echo.seen == [8]
        finally:
            await stranger.close()
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await caller.close()
        await holder.close()  # type: ignore[attr-defined]


async def test_a_holder_gone_after_taking_a_request_leaves_it_unavailable_not_retried() -> None:
    """The connection ends after the request was written: the holder may have handled it, so the
    caller reports the store unavailable (the device retries under the same id) rather than
    asking a second holder and numbering it twice."""
    from storage.base import StorageUnavailable
    from storage.state_redis import RedisState

    url = production_url("PIGEON_REDIS", "redis://")
    queue = f"test-gone-{uid()}:p0"
    holder, echo, serving = await _serving(url, [queue])
    echo.hold = asyncio.Event()
    caller = RedisState(url, "127.0.0.1", SECRET)
    await caller.open()
    try:
        await _direct_ready(caller, queue)
        asking = asyncio.create_task(caller.call(queue, {"kind": "echo", "n": 3}, 5))
        for _ in range(50):
            if echo.seen:
                break
            await asyncio.sleep(0.02)
        assert echo.seen == [3]
        serving.cancel()  # the holder stops: its connections close
        await asyncio.gather(serving, return_exceptions=True)
        with pytest.raises(StorageUnavailable, match="may have handled"):
            await asking
    finally:
        echo.hold.set()
        serving.cancel()
        await caller.close()
        await holder.close()  # type: ignore[attr-defined]


async def test_every_bridge_hears_whose_devices_changed(state: SharedState) -> None:
    """One process says a user's devices changed; its own listeners and (on Redis) another
    process's hear it, after being told None once they can hear (what came before was missed)."""
    url = None if isinstance(state, MemoryState) else production_url("PIGEON_REDIS", "redis://")
    other = open_state(url) if url else state
    if other is not state:
        await other.open()
    here: list[str | None] = []
    there: list[str | None] = []
    try:
        state.listen_devices(here.append)
        if other is not state:
            other.listen_devices(there.append)
        await until(lambda: state.hears_devices() and other.hears_devices(), timeout=10)  # (a round trip)
        u = uid()
        await state.devices_changed(u)
        await until(lambda: u in here and (other is state or u in there), timeout=10)
        if other is not state:  # (other processes may be saying something on the same Redis)
            assert here[0] is None and there[0] is None and u in here and u in there
        else:
            assert here == [u]
    finally:
        if other is not state:
            await other.close()
            assert not other.hears_devices() and there[-1] is None  # closing: no longer heard


async def test_a_bridge_that_lost_the_devices_news_trusts_nothing_until_it_hears_again() -> None:
    """The subscription to who changed devices is dropped by Redis: the listener is told None
    at once and ``hears_devices`` is false until a new subscription is confirmed, then news
    comes through again."""
    import redis.asyncio as aioredis

    from storage.state_redis import RedisState

    url = production_url("PIGEON_REDIS", "redis://")
    s = open_state(url)
    assert isinstance(s, RedisState)
    await s.open()
    raw = aioredis.from_url(url)
    told: list[str | None] = []
    try:
        s.listen_devices(told.append)
        await until(s.hears_devices, timeout=10)
        assert s.hears_devices() and told == [None]
        mine = [c["id"] for c in await raw.client_list() if c.get("name") == s.news_client_name]
        assert len(mine) == 1
        await raw.client_kill_filter(_id=mine[0])
        await until(s.hears_devices, want=False)
        assert not s.hears_devices() and told == [None, None]  # (within 5 s)
        await until(s.hears_devices, timeout=10)
        assert s.hears_devices() and told == [None, None, None]  # subscribed again: news missed
        u = uid()
        await s.devices_changed(u)
        await until(lambda: u in told, timeout=10)
        assert u in told
    finally:
        await raw.aclose()
        await s.close()


@pytest.mark.parametrize("direct", [False, True], ids=["lists", "direct"])
async def test_a_request_to_another_bridge_while_redis_does_not_answer_fails_within_its_time(direct: bool) -> None:
    """Redis accepts connections but answers nothing (hung, or a network that drops its
    packets): each command fails only after its retries, about 8 s, and a forwarded send made
    two of them (where the holder answers, then the push). The call is given up, unavailable,
    once its own time is out. (A loopback listener that never answers stands in for Redis.)"""
    from storage.base import StorageUnavailable

    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    state = open_state(f"redis://127.0.0.1:{port}/0", *(("127.0.0.1", b"s" * 32) if direct else ()))
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        with pytest.raises(StorageUnavailable, match="no answer from the holder"):
            await asyncio.wait_for(state.call("ks:p1", {"kind": "number"}, 0.5), 30)
        assert loop.time() - started < 3  # (its own time, not Redis's retries)
    finally:
        await state.close()
        server.close()
        for writer in held:
            writer.close()
