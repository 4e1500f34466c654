"""Plain writes to Cassandra straight from the event loop, over the CQL native protocol (v4).

The driver runs every statement through its own I/O thread: a response future, a query plan, a
wake-up of the I/O thread to send and of the event loop to hand the result back, and the GIL
passed between the two threads each time. A profile of the bridge in a group run put that at
about a third of its CPU, for statements whose answer is only "done". This module sends those
statements itself, on one connection owned by the event loop:

* only prepared, unconditional writes (``INSERT``/``UPDATE``/``DELETE`` without ``IF``) and
  unlogged batches of them; their values are serialised by the driver's own column types
  (:class:`Binder`, as its ``bind`` does) and their ids are the driver's prepared ids, so the
  statements are exactly the ones the driver would run;
* each carries a client-side timestamp from the driver's own generator, as the driver's would;
* reads named by the store (point lookups on the message path, such as a send id's record) are
  asked with the driver's prepared ids too, without result metadata, and their rows decoded with
  the column types the driver learnt when it prepared them (:func:`decode_rows`);
* frames written during one turn of the event loop go out in one ``send``;
* anything else (other reads, lightweight transactions), and everything while this connection
  is down, goes through the driver as before.

Errors come back as :class:`CqlError` (the server's error code and message) or
:class:`ConnectionError` (the connection ended before the answer: the write may or may not have
landed, as with the driver). The protocol is the one Cassandra documents in
``native_protocol_v4.spec``: a 9-byte header (version, flags, stream, opcode, body length) and
the body.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

log = logging.getLogger(__name__)

VERSION_REQUEST = 0x04
OP_ERROR, OP_STARTUP, OP_READY, OP_AUTHENTICATE = 0x00, 0x01, 0x02, 0x03
OP_RESULT, OP_EXECUTE, OP_BATCH = 0x08, 0x0A, 0x0D
OP_AUTH_CHALLENGE, OP_AUTH_RESPONSE, OP_AUTH_SUCCESS = 0x0E, 0x0F, 0x10
FLAG_VALUES, FLAG_SKIP_METADATA, FLAG_TIMESTAMP = 0x01, 0x02, 0x20
RESULT_ROWS = 0x0002
ROWS_HAS_MORE_PAGES, ROWS_NO_METADATA = 0x0002, 0x0004
BATCH_UNLOGGED = 1
ERROR_UNPREPARED = 0x2500
MAX_STREAMS = 32_768  # stream ids 0..32767 (v3+); 0 is kept for the handshake
# Statements sent and not yet answered, at most; later ones wait here, in order, until answers
# come. Cassandra takes requests from every connection into the same stages: with thousands of
# a flood's statements queued there, a login's (on the driver's connections) waited behind them
# for seconds (BENCHMARKS.md, 2026-11-30 dusk). A few dozen keep two cores busy.
WINDOW = 128
MAX_BODY = 256 * 1024 * 1024  # the protocol's own limit on a frame body

_HEADER = struct.Struct(">BBhBi")
_INT = struct.Struct(">i")
_SHORT = struct.Struct(">H")
_LONG = struct.Struct(">q")
_NULL = _INT.pack(-1)
_UNSET = _INT.pack(-2)


class Binder:
    """Serialises the values of one prepared statement as the driver's ``PreparedStatement.bind``
    does (each column's own type, ``None`` as null, the driver's UNSET_VALUE left unset, a short
    sequence padded with it, no UNSET in the routing key), without building a ``BoundStatement``:
    that cost 9.6 µs a statement and this about 2 (BENCHMARKS.md, 2026-12-02 afternoon), with
    five statements or so behind every message. Values come as a list or tuple in the
    statement's order; a statement whose columns the driver would encrypt, or one prepared for a
    protocol before v4 (no unset values), is refused here rather than sent differently."""

    __slots__ = ("_columns", "_routing", "_unset", "_version")

    def __init__(self, prepared: Any, unset: object) -> None:
        if unset is None:
            raise ValueError("Binder needs the driver's UNSET_VALUE (None is a null)")
        if getattr(prepared, "column_encryption_policy", None) is not None:
            raise ValueError("Binder does not encrypt columns: bind through the driver")
        if prepared.protocol_version < 4:
            raise ValueError(f"Binder serialises for protocol v4 and later, not v{prepared.protocol_version}")
        self._columns = tuple((col.name, col.type.serialize) for col in prepared.column_metadata or ())
        self._routing = frozenset(prepared.routing_key_indexes or ())
        self._unset = unset
        self._version = prepared.protocol_version

    def __call__(self, values: Sequence[Any]) -> list[Any]:
        columns, unset = self._columns, self._unset
        if not isinstance(values, (list, tuple)):
            raise TypeError(f"values to bind come as a list or tuple, not {type(values).__name__}")
        if len(values) > len(columns):
            raise ValueError(f"too many values to bind (got {len(values)}, expected {len(columns)})")
        out: list[Any] = []
        for value, (name, serialize) in zip(values, columns, strict=False):  # (fewer values: padded below)
            if value is None:
                out.append(None)
            elif value is unset:
                self._unset_at(len(out))
                out.append(unset)
            else:
                try:
                    out.append(serialize(value, self._version))
                except (TypeError, struct.error) as exc:
                    raise TypeError(f"a value of type {type(value).__name__} for column {name!r}: {exc}") from exc
        while len(out) < len(columns):
            self._unset_at(len(out))
            out.append(unset)
        return out

    def _unset_at(self, index: int) -> None:
        if index in self._routing:
            raise ValueError(f"column {self._columns[index][0]!r} is part of the routing key: it cannot be unset")


class Answer(Protocol):
    """Where a request's answer goes: an asyncio future, or a :class:`Direct`."""

    def done(self) -> bool: ...
    def set_result(self, result: Any, /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...


class Direct:
    """An answer handed to a callback (None for success, else the exception) in the
    connection's own read of it, instead of a future whose waiter runs a turn of the loop later.
    The callback runs once; what it raises is logged, never let into the connection's reading."""

    __slots__ = ("_then",)

    def __init__(self, then: Callable[[BaseException | None], None]) -> None:
        self._then: Callable[[BaseException | None], None] | None = then

    def done(self) -> bool:
        return self._then is None

    def set_result(self, _result: Any, /) -> None:
        self._finish(None)

    def set_exception(self, exception: BaseException, /) -> None:
        self._finish(exception)

    def cancel(self) -> None:
        """Nobody waits for it any more: an answer that comes is dropped."""
        self._then = None

    def _finish(self, exc: BaseException | None) -> None:
        then, self._then = self._then, None
        if then is None:
            return
        try:
            then(exc)
        except Exception:
            log.exception("handling a cassandra answer failed")


class CqlError(Exception):
    """An ERROR frame from the server: its code (e.g. 0x1100 write timeout) and message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"error 0x{code:04x}: {message}")
        self.code = code


class WireUnsupported(Exception):
    """The server asks for something this connection does not do (authentication without
    credentials, or by other means than a password), or answers a read in a form it does not
    decode (rows with their metadata, or paged)."""


def decode_rows(body: bytes, types: Sequence[Any], protocol_version: int = VERSION_REQUEST) -> list[tuple[Any, ...]]:
    """The rows of a RESULT body asked for without metadata, each value decoded by its column's
    driver type (``from_binary``, as the driver's own decoder does)."""
    (kind,) = _INT.unpack_from(body, 0)
    if kind != RESULT_ROWS:
        return []
    flags, count = struct.unpack_from(">ii", body, 4)
    if not flags & ROWS_NO_METADATA or flags & ROWS_HAS_MORE_PAGES or count != len(types):
        raise WireUnsupported(f"rows with flags 0x{flags:x} and {count} columns")
    (n,) = _INT.unpack_from(body, 12)
    at = 16
    rows: list[tuple[Any, ...]] = []
    for _ in range(n):
        row: list[Any] = []
        for t in types:
            (size,) = _INT.unpack_from(body, at)
            at += 4
            if size < 0:
                row.append(None)
            else:
                row.append(t.from_binary(body[at:at + size], protocol_version))
                at += size
        rows.append(tuple(row))
    return rows


def _values(values: Sequence[Any], unset: object) -> bytes:
    out = [_SHORT.pack(len(values))]
    for v in values:
        if v is None:
            out.append(_NULL)
        elif v is unset:
            out.append(_UNSET)
        else:
            out.append(_INT.pack(len(v)))
            out.append(v)
    return b"".join(out)


def _string(s: str) -> bytes:
    b = s.encode()
    return _SHORT.pack(len(b)) + b


def plain_token(user: str, password: str) -> bytes:
    """The SASL PLAIN response a password authenticator takes (RFC 4616: no authorization
    identity, then the user and the password, each after a NUL), as the body of AUTH_RESPONSE
    (a [bytes]: its length first)."""
    token = b"\x00" + user.encode() + b"\x00" + password.encode()
    return _INT.pack(len(token)) + token


class CqlWire(asyncio.Protocol):
    """One native-protocol connection, driven by the event loop. Open with :meth:`open`."""

    def __init__(self, unset: object, timestamps: Callable[[], int], on_lost: Callable[[CqlWire], None]) -> None:
        self._unset = unset
        self._timestamps = timestamps
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._reads: set[int] = set()  # streams whose answer is rows: the future gets the body
        self._free = list(range(MAX_STREAMS - 1, 0, -1))
        self._out: list[bytes] = []
        # past WINDOW: (op, body, rows, future) in the order they were asked for
        self._held: deque[tuple[int, bytes, bool, asyncio.Future[Any]]] = deque()
        self._flush_due = False
        self._loop = asyncio.get_running_loop()
        self._lost = False
        self.host = ""
        self.sent = 0  # statements (or batches) sent on this connection
        self.reads = 0  # reads sent on it

    @classmethod
    async def open(cls, host: str, port: int, unset: object, timestamps: Callable[[], int],
                   on_lost: Callable[[CqlWire], None], timeout: float = 5.0,
                   credentials: tuple[str, str] | None = None, tls: ssl.SSLContext | None = None) -> CqlWire:
        """Connect (through TLS with ``tls``, the host's name or address checked against its
        certificate) and start the protocol; when the server asks for authentication, answer with
        ``credentials`` (user, password) as the driver's PlainTextAuthProvider does. Credentials
        the server refuses raise :class:`CqlError` (its code 0x0100)."""
        loop = asyncio.get_running_loop()
        transport, wire = await asyncio.wait_for(
            loop.create_connection(lambda: cls(unset, timestamps, on_lost), host, port, ssl=tls,
                                   server_hostname=host if tls is not None else None), timeout)
        wire.host = f"{host}:{port}"
        if wire._transport is None and not wire._lost:  # uvloop may call connection_made later
            wire._transport = transport
        try:
            body = _SHORT.pack(1) + _string("CQL_VERSION") + _string("3.0.0")
            op = await asyncio.wait_for(wire._request(OP_STARTUP, body, stream=0), timeout)
            if op == OP_AUTHENTICATE:
                if credentials is None:
                    raise WireUnsupported("the server asks for authentication, and no credentials were given")
                op = await asyncio.wait_for(wire._request(OP_AUTH_RESPONSE, plain_token(*credentials), stream=0),
                                            timeout)
                if op == OP_AUTH_CHALLENGE:
                    raise WireUnsupported("the server's authenticator asks more than a password")
                if op != OP_AUTH_SUCCESS:
                    raise WireUnsupported(f"unexpected answer 0x{op:02x} to the credentials")
            elif op != OP_READY:
                raise WireUnsupported(f"unexpected answer 0x{op:02x} to STARTUP")
        except BaseException:
            wire.close()
            raise
        return wire

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport, self._lost = None, True
        waiting, self._waiting = self._waiting, {}
        held, self._held = self._held, deque()
        self._reads.clear()
        for fut in [*waiting.values(), *(h[3] for h in held)]:
            if not fut.done():
                fut.set_exception(ConnectionError(f"cassandra connection to {self.host} lost: {exc or 'closed'}"))
        self._on_lost(self)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        start, end = 0, len(buf)
        while end - start >= 9:
            _version, _flags, stream, op, length = _HEADER.unpack_from(buf, start)
            if length < 0 or length > MAX_BODY:
                self.close()
                return
            if end - start < 9 + length:
                break
            body_at = start + 9
            start = body_at + length
            fut = self._waiting.pop(stream, None)
            if stream > 0:
                self._free.append(stream)
            rows = stream in self._reads
            if rows:
                self._reads.discard(stream)
            if fut is None or fut.done():  # timed out meanwhile, or an event frame
                continue
            if op == OP_ERROR:
                (code,) = _INT.unpack_from(buf, body_at)
                (n,) = _SHORT.unpack_from(buf, body_at + 4)
                fut.set_exception(CqlError(code, bytes(buf[body_at + 6:body_at + 6 + n]).decode(errors="replace")))
            elif rows and op == OP_RESULT:
                fut.set_result(bytes(buf[body_at:start]))
            else:
                fut.set_result(op)
        del buf[:start]
        if self._held:
            self._send_held()

    def _send_held(self) -> None:
        """Send what waits, as far as the window allows; what its caller gave up on is dropped."""
        held = self._held
        while held and self.in_flight < WINDOW:
            op, body, rows, fut = held.popleft()
            if not fut.done():
                self._send(op, body, self._free.pop(), rows, fut)

    # -- requests --------------------------------------------------------------------------------
    @property
    def usable(self) -> bool:
        return self._transport is not None and not self._transport.is_closing() and bool(self._free)

    def execute(self, query_id: bytes, values: Sequence[Any], consistency: int,
                to: Answer | None = None) -> asyncio.Future[int]:
        """Run one prepared statement with its serialised values. The answer goes to a future,
        or to ``to`` (returned then) as soon as it is read."""
        body = b"".join((_SHORT.pack(len(query_id)), query_id,
                         _SHORT.pack(consistency), bytes((FLAG_VALUES | FLAG_SKIP_METADATA | FLAG_TIMESTAMP,)),
                         _values(values, self._unset), _LONG.pack(self._timestamps())))
        self.sent += 1
        return self._request(OP_EXECUTE, body, to=to)

    def query(self, query_id: bytes, values: Sequence[Any], consistency: int) -> asyncio.Future[bytes]:
        """Run one prepared read; the future gets the RESULT body (see :func:`decode_rows`). The
        read is not paged: it is for lookups that return a few rows."""
        body = b"".join((_SHORT.pack(len(query_id)), query_id,
                         _SHORT.pack(consistency), bytes((FLAG_VALUES | FLAG_SKIP_METADATA,)),
                         _values(values, self._unset)))
        self.reads += 1
        return self._request(OP_EXECUTE, body, rows=True)

    def batch(self, statements: Sequence[tuple[bytes, Sequence[Any]]], consistency: int,
              to: Answer | None = None) -> asyncio.Future[int]:
        """Run prepared statements as one unlogged batch (one request); ``to`` as for :meth:`execute`."""
        parts = [bytes((BATCH_UNLOGGED,)), _SHORT.pack(len(statements))]
        for query_id, values in statements:
            parts += (b"\x01", _SHORT.pack(len(query_id)), query_id, _values(values, self._unset))
        parts += (_SHORT.pack(consistency), bytes((FLAG_TIMESTAMP,)), _LONG.pack(self._timestamps()))
        self.sent += 1
        return self._request(OP_BATCH, b"".join(parts), to=to)

    def _request(self, op: int, body: bytes, stream: int | None = None, *, rows: bool = False,
                 to: Answer | None = None) -> asyncio.Future[Any]:
        # the connection does with a Direct only what it does with a future: done, set_result,
        # set_exception
        fut: asyncio.Future[Any] = self._loop.create_future() if to is None else cast("asyncio.Future[Any]", to)
        if self._transport is None or self._transport.is_closing():
            fut.set_exception(ConnectionError(f"cassandra connection to {self.host} is closed"))
            return fut
        if stream is None:
            if self._held or self.in_flight >= WINDOW:
                self._held.append((op, body, rows, fut))
                return fut
            stream = self._free.pop()
        self._send(op, body, stream, rows, fut)
        return fut

    def _send(self, op: int, body: bytes, stream: int, rows: bool, fut: asyncio.Future[Any]) -> None:
        self._waiting[stream] = fut
        if rows:
            self._reads.add(stream)
        self._out.append(_HEADER.pack(VERSION_REQUEST, 0, stream, op, len(body)))
        self._out.append(body)
        if not self._flush_due:  # one send for everything written during this turn of the loop
            self._flush_due = True
            self._loop.call_soon(self._flush)

    @property
    def in_flight(self) -> int:
        """Statements sent and not yet answered (at most WINDOW)."""
        return MAX_STREAMS - 1 - len(self._free)

    @property
    def held(self) -> int:
        """Statements waiting for the window."""
        return len(self._held)

    def _flush(self) -> None:
        self._flush_due = False
        out, self._out = self._out, []
        if self._transport is not None and not self._transport.is_closing() and out:
            self._transport.write(b"".join(out))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
