"""The shared-state contract, run unchanged on the in-process state and on Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from storage.state import SharedState, open_state
from tests.conftest import production_url


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
    caller, holder = RedisState(url), RedisState(url)
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
