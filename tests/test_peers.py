"""Requests between bridges on a direct connection (storage/peers.py), on loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from storage.peers import PeerClient, PeerServer, peer_key

KEY = peer_key(b"the test deployment's secret")
QUEUE = "ks:p3"


async def _server(handle: Any) -> tuple[PeerServer, str]:
    server = PeerServer(KEY, lambda q: q == QUEUE, handle)
    return server, await server.start("127.0.0.1")


async def test_a_handler_that_answers_with_a_future_is_answered_without_a_task() -> None:
    """The holder's fast path: the handler hands back a future its own work settles (an append
    to an open log), and the answer goes out when it is settled, in the order settled."""
    pending: list[tuple[int, asyncio.Future[dict[str, Any]]]] = []
    all_taken = asyncio.Event()

    def handle(request: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        pending.append((int(request["n"]), fut))
        if len(pending) == 3:
            all_taken.set()
        return fut

    server, address = await _server(handle)
    client = PeerClient(KEY)
    try:
        asking = [asyncio.create_task(client.call(address, QUEUE, {"n": i}, 5)) for i in range(3)]
        await asyncio.wait_for(all_taken.wait(), 5)
        assert [n for n, _ in pending] == [0, 1, 2]  # taken in the order sent
        assert not server._tasks
        for n, fut in reversed(pending):
            fut.set_result({"twice": 2 * n})
        assert await asyncio.gather(*asking) == [{"twice": 0}, {"twice": 2}, {"twice": 4}]
    finally:
        await client.close()
        await server.close()


async def test_a_handler_that_fails_in_any_way_still_answers_with_an_error() -> None:
    """A future that fails, a coroutine that raises, and a handler that raises before returning
    each give the caller an error answer, not a wait until its deadline."""

    def handle(request: dict[str, Any]) -> Any:
        how = request["how"]
        if how == "raise":
            raise ValueError("at once")
        if how == "coroutine":
            async def fails() -> dict[str, Any]:
                raise KeyError("later")
            return fails()
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        fut.set_exception(RuntimeError("in the future"))
        return fut

    server, address = await _server(handle)
    client = PeerClient(KEY)
    try:
        replies = await asyncio.gather(*(client.call(address, QUEUE, {"how": how}, 5)
                                         for how in ("raise", "coroutine", "future")))
        assert replies == [{"error": "handler failed"}, {"error": "KeyError"}, {"error": "RuntimeError"}]
    finally:
        await client.close()
        await server.close()


async def test_an_unanswered_request_times_out_and_an_answered_one_leaves_no_timer() -> None:
    """Deadlines are kept by one sweep: a request with no answer fails with TimeoutError soon
    after its own deadline, another request answered meanwhile is unaffected, and once nothing
    waits the sweep stops."""
    held: list[asyncio.Future[dict[str, Any]]] = []

    def handle(request: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if request["answer"]:
            fut.set_result({"ok": True})
        else:
            held.append(fut)
        return fut

    server, address = await _server(handle)
    client = PeerClient(KEY)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        silent = asyncio.create_task(client.call(address, QUEUE, {"answer": False}, 0.3))
        assert await client.call(address, QUEUE, {"answer": True}, 0.3) == {"ok": True}
        with pytest.raises(TimeoutError):
            await silent
        assert 0.3 <= loop.time() - started < 1.0
        assert await client.call(address, QUEUE, {"answer": True}, 5) == {"ok": True}
        await asyncio.sleep(0.25)
        assert client._sweep is None and not client._deadlines
    finally:
        for fut in held:
            fut.cancel()
        await client.close()
        await server.close()


async def test_callers_waiting_for_a_connection_that_is_lost_at_once_are_told_to_go_through_redis() -> None:
    """Two requests wait for one connection to open; it is lost before the second one's turn
    comes. The first was written on it (PeerLost: it may have been handled); the second was not,
    and is told so (None: the caller asks through Redis), not failed with a KeyError."""
    from storage.peers import PeerLost

    server, address = await _server(lambda request: asyncio.get_running_loop().create_future())
    client = PeerClient(KEY)
    opened = client._open

    async def lost_at_once(addr: str) -> Any:
        conn = await opened(addr)
        conn.transport.abort()  # (its loss is seen in the loop's next turn)
        return conn

    client._open = lost_at_once  # type: ignore[method-assign]
    try:
        first, second = await asyncio.gather(client.call(address, QUEUE, {"n": 1}, 5),
                                             client.call(address, QUEUE, {"n": 2}, 5), return_exceptions=True)
        assert isinstance(first, PeerLost) and second is None
    finally:
        await client.close()
        await server.close()
