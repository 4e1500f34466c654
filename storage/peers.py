"""Requests between bridge processes over direct connections.

A bridge that does not hold a key's partition asks the holder to number it
(``CassandraStore._forward``). Through Redis that is a push onto the partition's list, a blocking
pop by the holder, a push of the answer and a pop by the caller: five or so round trips through
redis-py, which measured 0.9-1.0 ms of CPU per request one at a time and 150-180 µs eight at a
time (both processes together), more than numbering the key itself. Here the caller writes the
request straight to the holder on a connection kept open between the two, and the holder
writes the answer back: one frame each way.

Redis still decides nothing and loses nothing here: the holder advertises its address for each
partition it holds (``RedisState.serve``), a caller that finds no address, cannot connect, or is
told the partition is no longer held there ("moved": the request was not handled) pushes the
request onto the partition's Redis list as before, where the new holder finds it. A connection
that ends after the request was written leaves its outcome unknown, like a Redis request that
timed out: the caller reports the store unavailable, and the device retries (what is asked is
idempotent).

Frames are a 4-byte big-endian length and JSON: the first frame of a connection is the peer key
(:func:`peer_key`, derived from the deployment's secret, which every bridge of it shares to check
each other's tokens; the secret itself never travels), then ``[id, queue, request]`` one way and
``[id, reply]`` the other, ``reply`` null for "moved". A connection that opens with anything else
is told ``"refused"`` and closed unheard, and its caller goes through Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import hmac
import itertools
import json
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from .stopping import stop_tasks

log = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024
CONNECT_TIMEOUT_S = 1.0
DEAD_FOR_S = 1.0  # an address that refused a connection is not tried again for this long
SWEEP_EVERY_S = 0.1  # how often requests past their deadline are failed (they fail this much late at most)


def peer_key(secret: bytes) -> str:
    """What a bridge shows another to be let in: a key derived from the deployment's secret."""
    return hmac.new(secret, b"pigeon bridge-to-bridge requests", hashlib.sha256).hexdigest()


class PeerLost(Exception):
    """The connection ended after the request was written: it may or may not have been handled."""


class _Framed(asyncio.Protocol):
    """Length-prefixed JSON frames both ways; what is written in one turn of the loop goes in one write."""

    def __init__(self, on_frame: Callable[[_Framed, Any], None],
                 on_lost: Callable[[_Framed, Exception | None], None]) -> None:
        self._on_frame = on_frame
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._flush_due = False
        self._close_after_send = False
        self.closed = False
        self.address = ""  # (client side) the peer's HOST:PORT

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport, self.closed = None, True
        self._on_lost(self, exc)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        at, end = 0, len(buf)
        while end - at >= 4:
            (n,) = _LENGTH.unpack_from(buf, at)
            if n > MAX_FRAME:
                log.warning("closing a peer connection that announced a %d-byte frame", n)
                self.close()
                return
            if end - at - 4 < n:
                break
            raw = buf[at + 4:at + 4 + n]  # (a copy already: json takes it as it is)
            at += 4 + n
            try:
                frame = json.loads(raw)
            except ValueError:
                log.warning("closing a peer connection that sent a frame that is not JSON")
                self.close()
                return
            self._on_frame(self, frame)
            if self.closed:
                return
        del buf[:at]

    def send(self, frame: Any) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        raw = json.dumps(frame, separators=(",", ":")).encode()
        self._out.append(_LENGTH.pack(len(raw)))
        self._out.append(raw)
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        out, self._out = self._out, []
        if self.transport is not None and not self.transport.is_closing() and out:
            self.transport.write(b"".join(out))
        if self._close_after_send:
            self.close()

    def close_after_send(self) -> None:
        """Close once what was sent this turn has been written."""
        self.closed = True
        self._close_after_send = True
        if not self._flush_due:
            self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def _reply_of(done: asyncio.Future[dict[str, Any]]) -> dict[str, Any]:
    if done.cancelled():
        return {"error": "cancelled"}
    exc = done.exception()
    if exc is not None:
        log.error("answering a request of another bridge failed", exc_info=exc)
        return {"error": type(exc).__name__}
    return done.result()


class PeerServer:
    """Answers other bridges' requests for the queues ``serves`` says this process serves."""

    def __init__(self, secret: str, serves: Callable[[str], bool], handle: Handler) -> None:
        self._secret = secret.encode()
        self._serves = serves
        self._handle = handle
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Framed] = set()
        self._trusted: set[_Framed] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.address = ""

    async def start(self, host: str, port: int = 0) -> str:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Framed(self._frame, self._lost), host, port)
        sock_host, sock_port = self._server.sockets[0].getsockname()[:2]
        self.address = f"{sock_host}:{sock_port}"
        return self.address

    def _lost(self, conn: _Framed, exc: Exception | None) -> None:
        self._conns.discard(conn)
        self._trusted.discard(conn)

    def _frame(self, conn: _Framed, frame: Any) -> None:
        self._conns.add(conn)
        if conn not in self._trusted:
            if isinstance(frame, str) and hmac.compare_digest(frame.encode(), self._secret):
                self._trusted.add(conn)
            else:
                log.warning("refusing a peer connection that did not give the deployment's key")
                conn.send("refused")
                conn.close_after_send()
            return
        if (not isinstance(frame, list) or len(frame) != 3 or not isinstance(frame[1], str)
                or not isinstance(frame[2], dict)):
            log.warning("closing a peer connection that sent a malformed request")
            conn.close()
            return
        rid, queue, request = frame
        if not self._serves(queue):
            conn.send([rid, None])  # not handled: the caller takes the Redis list to the holder
            return
        try:
            answer = self._handle(request)
        except Exception:  # an answer is always sent: the caller is waiting for it
            log.exception("answering a request of another bridge failed")
            conn.send([rid, {"error": "handler failed"}])
            return
        if asyncio.isfuture(answer):  # settled by the handler's own work: no task needed
            answer.add_done_callback(lambda done: conn.send([rid, _reply_of(done)]))
            return
        task = asyncio.get_running_loop().create_task(self._answer(conn, rid, answer), name="peer-answer")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, conn: _Framed, rid: Any, answer: Awaitable[dict[str, Any]]) -> None:
        try:
            reply = await answer
        except Exception as exc:  # an answer is always sent: the caller is waiting for it
            log.exception("answering a request of another bridge failed")
            reply = {"error": type(exc).__name__}
        conn.send([rid, reply])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.close()
        await stop_tasks(list(self._tasks), "closing the connections from other bridges")


class PeerClient:
    """Connections to other bridges' :class:`PeerServer`, one per address, opened on first use."""

    def __init__(self, secret: str) -> None:
        self._secret = secret
        self._conns: dict[str, _Framed] = {}
        self._opening: dict[str, asyncio.Future[_Framed | None]] = {}
        self._dead: dict[str, float] = {}  # address -> until when not to try it again
        self._waiting: dict[_Framed, dict[int, asyncio.Future[dict[str, Any] | None]]] = {}
        self._ids = itertools.count(1)
        self._deadlines: list[tuple[float, int, asyncio.Future[dict[str, Any] | None]]] = []
        self._sweep: asyncio.TimerHandle | None = None

    async def call(self, address: str, queue: str, request: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
        """The holder's answer; None when the request was not handled (no connection, or the
        partition is not held there). Raises :class:`PeerLost` when the connection ended after the
        request was written, and TimeoutError when no answer came in time."""
        conn = await self._connection(address)
        if conn is None:
            return None
        waiting = self._waiting.get(conn)
        if waiting is None or conn.closed:  # lost before this caller's turn came: nothing was sent
            return None
        rid = next(self._ids)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[dict[str, Any] | None] = loop.create_future()
        waiting[rid] = fut
        conn.send([rid, queue, request])
        # one timer for every request on its way, not one each (asyncio.timeout's timer handle
        # and context manager were a fifth of what a request cost the caller)
        heapq.heappush(self._deadlines, (loop.time() + timeout_s, rid, fut))
        if self._sweep is None:
            self._sweep = loop.call_later(SWEEP_EVERY_S, self._expire)
        try:
            return await fut
        finally:
            waiting.pop(rid, None)

    def _expire(self) -> None:
        """Fail the requests past their deadline with TimeoutError; again later while any wait."""
        loop = asyncio.get_running_loop()
        now, deadlines = loop.time(), self._deadlines
        while deadlines and (deadlines[0][0] <= now or deadlines[0][2].done()):
            _at, _rid, fut = heapq.heappop(deadlines)
            if not fut.done():
                fut.set_exception(TimeoutError())
        self._sweep = loop.call_later(SWEEP_EVERY_S, self._expire) if deadlines else None

    async def _connection(self, address: str) -> _Framed | None:
        conn = self._conns.get(address)
        if conn is not None and not conn.closed:
            return conn
        loop = asyncio.get_running_loop()
        if self._dead.get(address, 0.0) > loop.time():  # refused a moment ago: Redis meanwhile
            return None
        opening = self._opening.get(address)
        if opening is None:
            opening = self._opening[address] = loop.create_future()
            opened = None
            try:
                opened = await self._open(address)
            finally:
                del self._opening[address]
                opening.set_result(opened)
                if opened is None:
                    self._dead[address] = loop.time() + DEAD_FOR_S
        return await asyncio.shield(opening)

    async def _open(self, address: str) -> _Framed | None:
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            _transport, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Framed(self._reply, self._lost), host, int(port)), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError) as exc:
            log.info("no connection to the bridge at %s (%s): asking through Redis", address, exc)
            return None
        self._waiting[conn] = {}
        conn.address = address
        conn.send(self._secret)
        self._conns[address] = conn
        return conn

    def _reply(self, conn: _Framed, frame: Any) -> None:
        if frame == "refused":  # another deployment's key: nothing sent here was handled
            log.warning("the bridge at %s refused this bridge's key (another secret?): asking through Redis",
                        conn.address)
            self._dead[conn.address] = asyncio.get_running_loop().time() + DEAD_FOR_S
            for fut in self._waiting.pop(conn, {}).values():
                if not fut.done():
                    fut.set_result(None)
            conn.close()
            return
        if not isinstance(frame, list) or len(frame) != 2 or not (frame[1] is None or isinstance(frame[1], dict)):
            log.warning("closing a peer connection that sent a malformed answer")
            conn.close()
            return
        waiter = self._waiting.get(conn, {}).get(frame[0])
        if waiter is not None and not waiter.done():
            waiter.set_result(frame[1])

    def _lost(self, conn: _Framed, exc: Exception | None) -> None:
        for fut in self._waiting.pop(conn, {}).values():
            if not fut.done():
                fut.set_exception(PeerLost(f"the connection to the holder ended: {exc or 'closed'}"))
        for address, held in list(self._conns.items()):
            if held is conn:
                del self._conns[address]

    async def close(self) -> None:
        for conn in list(self._conns.values()):
            conn.close()
        self._conns.clear()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
