"""A small MQTT 3.1.1 and 5 client for the load generator: one asyncio protocol per connection.

It does only what simulated devices need (CONNECT with a will, SUBSCRIBE, QoS 0/1 PUBLISH,
PUBACK, keepalive PINGREQ, DISCONNECT) and counts every byte it reads and writes, so the
``wire`` scenario measures what really crossed the socket. It holds a connection in a few
kilobytes, which lets a handful of processes hold tens of thousands of devices.

Over a WebSocket (``ws://`` or ``wss://``, ``connect(..., ws_path="/mqtt")``) each write goes out
as one binary frame and every binary frame received is read as MQTT bytes; the byte counts are
then of the MQTT bytes, without the frames' few bytes of their own.

On MQTT 5 it uses topic aliases both ways where the broker allows: it names a topic once with
an alias and then sends the alias alone, as many topics as the broker's CONNACK Topic Alias
Maximum allows, and it offers the broker ``TOPIC_ALIASES`` aliases of its own in CONNECT (a
broker may or may not use them; ``aliased_in`` counts the publishes that came with one).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections.abc import Callable
from typing import Protocol

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from broker.packets import varint

OnMessage = Callable[[str, bytes], None]
TOPIC_ALIASES = 8  # MQTT 5: how many topic aliases the broker may use towards this client
# MQTT 5 property identifiers by the size of their value (MQTT 5.0 section 2.2.2.2)
_PROP_BYTE = {0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A}
_PROP_TWO = {0x13, 0x21, 0x22, 0x23}
_PROP_FOUR = {0x02, 0x11, 0x18, 0x27}
_PROP_VARINT = {0x0B}
_PROP_UTF8_OR_BINARY = {0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F}
_PROP_PAIR = {0x26}
TOPIC_ALIAS, TOPIC_ALIAS_MAXIMUM = 0x23, 0x22


class MqttRefused(Exception):
    pass


def mqtt_str(s: str | bytes) -> bytes:
    """An MQTT UTF-8 string: two-byte length, then the bytes."""
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """An MQTT variable byte integer at ``pos``: its value and the position after it."""
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 21:
            raise MqttRefused("malformed variable byte integer")


def read_properties(buf: bytes, pos: int) -> tuple[dict[int, int], int]:
    """The MQTT 5 properties at ``pos`` (their length first): the integer ones by identifier
    (strings and binary ones are skipped), and the position after them."""
    length, pos = read_varint(buf, pos)
    end, props = pos + length, {}
    while pos < end:
        ident, pos = read_varint(buf, pos)
        if ident in _PROP_BYTE:
            props[ident], pos = buf[pos], pos + 1
        elif ident in _PROP_TWO:
            props[ident], pos = struct.unpack_from("!H", buf, pos)[0], pos + 2
        elif ident in _PROP_FOUR:
            props[ident], pos = struct.unpack_from("!I", buf, pos)[0], pos + 4
        elif ident in _PROP_VARINT:
            props[ident], pos = read_varint(buf, pos)
        elif ident in _PROP_UTF8_OR_BINARY:
            pos += 2 + struct.unpack_from("!H", buf, pos)[0]
        elif ident in _PROP_PAIR:
            for _ in range(2):
                pos += 2 + struct.unpack_from("!H", buf, pos)[0]
        else:
            raise MqttRefused(f"unknown MQTT 5 property {ident:#x}")
    if pos != end:
        raise MqttRefused("malformed MQTT 5 properties")
    return props, end


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


class _Transport(Protocol):
    """What MqttConn writes to: an asyncio transport, or a WebSocket's (_WsTransport)."""

    def write(self, data: bytes) -> None: ...
    def is_closing(self) -> bool: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class MqttConn(asyncio.Protocol):
    """One client connection. ``on_message(topic, payload)`` is called for every PUBLISH."""

    def __init__(self, on_message: OnMessage, mqtt5: bool = False) -> None:
        self.on_message = on_message
        self.mqtt5 = mqtt5
        self.alias_max_out = 0  # MQTT 5: the aliases the broker accepts from us (its CONNACK)
        self._aliases_out: dict[str, int] = {}  # topic -> the alias it was given
        self._aliases_in: dict[int, str] = {}  # alias -> topic, as the broker named them
        self.aliased_in = 0  # publishes the broker sent with an alias
        self.bytes_in = 0
        self.bytes_out = 0
        self._buf = bytearray()
        self._transport: _Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._connack: asyncio.Future[int] = self._loop.create_future()
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._next_id = 0
        self._ping: asyncio.TimerHandle | None = None
        self._keepalive = 0
        self.closed: asyncio.Future[None] = self._loop.create_future()

    # -- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def attach(self, transport: _Transport) -> None:
        """Write to ``transport`` (a WebSocket's) instead of an asyncio one."""
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        buf = self._buf
        buf += data
        while len(buf) >= 2:
            length, shift, pos = 0, 0, 1
            while True:
                if pos >= len(buf):
                    return
                byte = buf[pos]
                length |= (byte & 0x7F) << shift
                pos += 1
                if not byte & 0x80:
                    break
                shift += 7
            end = pos + length
            if len(buf) < end:
                return
            self._handle(buf[0], bytes(buf[pos:end]))
            del buf[:end]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._ping is not None:
            self._ping.cancel()
        error = ConnectionError(f"connection closed: {exc!r}")
        if not self._connack.done():
            self._connack.set_exception(error)
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(error)
        self._waiting.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    # -- packets --------------------------------------------------------------------------------------
    def _handle(self, first: int, body: bytes) -> None:
        kind = first >> 4
        if kind == 3:  # PUBLISH
            tlen = struct.unpack_from("!H", body)[0]
            topic = body[2:2 + tlen].decode()
            pos = 2 + tlen
            if (first >> 1) & 3:
                self._write(b"\x40\x02" + body[pos:pos + 2])  # PUBACK
                pos += 2
            if self.mqtt5:
                props, pos = read_properties(body, pos)
                alias = props.get(TOPIC_ALIAS)
                if alias is not None:
                    self.aliased_in += 1
                    if topic:
                        self._aliases_in[alias] = topic
                    else:
                        topic = self._aliases_in[alias]
            self.on_message(topic, body[pos:])
        elif kind in (4, 9):  # PUBACK, SUBACK
            fut = self._waiting.pop(struct.unpack_from("!H", body)[0], None)
            if fut is not None and not fut.done():
                codes = body[2:]
                if kind == 9 and self.mqtt5:
                    codes = body[read_properties(body, 2)[1]:]
                if kind == 9 and any(code >= 0x80 for code in codes):
                    fut.set_exception(MqttRefused("subscription refused"))
                else:
                    fut.set_result(None)
        elif kind == 2:  # CONNACK
            if self.mqtt5 and body[1] == 0:
                props, _ = read_properties(body, 2)
                self.alias_max_out = props.get(TOPIC_ALIAS_MAXIMUM, 0)
            if not self._connack.done():
                self._connack.set_result(body[1])

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self.bytes_out += len(data)
            self._transport.write(data)

    def _packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._waiting:
                return self._next_id
        raise RuntimeError("65535 publishes in flight")

    def _schedule_ping(self) -> None:
        if self._keepalive:
            self._ping = self._loop.call_later(self._keepalive * 0.75, self._send_ping)

    def _send_ping(self) -> None:
        self._write(b"\xc0\x00")
        self._schedule_ping()

    # -- API ----------------------------------------------------------------------------------------------
    async def handshake(self, client_id: str, username: str, password: str, keepalive: int,
                        will: tuple[str, bytes] | None, timeout: float) -> None:
        flags = 0x02 | 0x80 | 0x40
        payload = mqtt_str(client_id)
        if will is not None:
            flags |= 0x04 | 0x08  # will at QoS 1
            payload += (b"\x00" if self.mqtt5 else b"") + mqtt_str(will[0]) + mqtt_str(will[1])
        payload += mqtt_str(username) + mqtt_str(password)
        # MQTT 5: the one property, Topic Alias Maximum (3 bytes)
        props = bytes([3, TOPIC_ALIAS_MAXIMUM]) + struct.pack("!H", TOPIC_ALIASES) if self.mqtt5 else b""
        self._write(_packet(0x10, mqtt_str("MQTT") + bytes([5 if self.mqtt5 else 4, flags])
                            + struct.pack("!H", keepalive) + props + payload))
        async with asyncio.timeout(timeout):
            code = await self._connack
        if code:
            raise MqttRefused(f"CONNECT refused with code {code}")
        self._keepalive = keepalive
        self._schedule_ping()

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> asyncio.Future[None] | None:
        """Send a PUBLISH; at QoS 1 return a future that completes on its PUBACK."""
        name, props = self._topic(topic)
        if qos == 0:
            self._write(_packet(0x30, name + props + payload))
            return None
        pid = self._packet_id()
        fut: asyncio.Future[None] = self._loop.create_future()
        fut.add_done_callback(_retrieve)  # a fire-and-forget publish may fail unobserved on close
        self._waiting[pid] = fut
        self._write(_packet(0x32, name + struct.pack("!H", pid) + props + payload))
        return fut

    def _topic(self, topic: str) -> tuple[bytes, bytes]:
        """The topic name field and (MQTT 5) the properties of a PUBLISH to ``topic``: the topic
        with a new alias the first time, the alias alone after that, while aliases last."""
        if not self.mqtt5:
            return mqtt_str(topic), b""
        alias = self._aliases_out.get(topic)
        if alias is not None:
            return mqtt_str(""), bytes([3, TOPIC_ALIAS]) + struct.pack("!H", alias)
        if len(self._aliases_out) < self.alias_max_out:
            alias = self._aliases_out[topic] = len(self._aliases_out) + 1
            return mqtt_str(topic), bytes([3, TOPIC_ALIAS]) + struct.pack("!H", alias)
        return mqtt_str(topic), b"\x00"

    async def subscribe(self, topics: list[str], timeout: float) -> None:
        pid = self._packet_id()
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiting[pid] = fut
        props = b"\x00" if self.mqtt5 else b""
        self._write(_packet(0x82, struct.pack("!H", pid) + props + b"".join(mqtt_str(t) + b"\x01" for t in topics)))
        async with asyncio.timeout(timeout):
            await fut

    def disconnect(self) -> None:
        self._write(b"\xe0\x00")
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class _WsTransport:
    """MQTT over a WebSocket for MqttConn: each write is one binary frame, sent in order by one
    task; each binary frame received goes to the connection's ``data_received``; the end of the
    WebSocket is the connection's ``connection_lost``."""

    def __init__(self, ws: ClientConnection, conn: MqttConn) -> None:
        self._ws = ws
        self._outgoing: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._closing = False
        self._sender = asyncio.create_task(self._send())
        self._reader = asyncio.create_task(self._read(conn))

    def write(self, data: bytes) -> None:
        if not self._closing:
            self._outgoing.put_nowait(bytes(data))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Close once what was written has gone out."""
        if not self._closing:
            self._closing = True
            self._outgoing.put_nowait(None)

    def abort(self) -> None:
        self._closing = True
        self._sender.cancel()
        self._ws.transport.abort()

    async def _send(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            while (data := await self._outgoing.get()) is not None:
                await self._ws.send(data)
            await self._ws.close()

    async def _read(self, conn: MqttConn) -> None:
        error: Exception | None = None
        try:
            async for frame in self._ws:
                if isinstance(frame, str):
                    raise ConnectionError("a text frame: MQTT travels in binary frames")
                conn.data_received(frame)
        except (ConnectionClosed, ConnectionError, OSError) as exc:
            error = exc
        finally:
            self._closing = True
            self._sender.cancel()
            conn.connection_lost(error)


async def _open(host: str, port: int, on_message: OnMessage, tls: ssl.SSLContext | None,
                ws_path: str | None, mqtt5: bool) -> MqttConn:
    if ws_path is None:
        _, conn = await asyncio.get_running_loop().create_connection(
            lambda: MqttConn(on_message, mqtt5), host, port, ssl=tls, server_hostname=host if tls is not None else None)
        return conn
    where = f"[{host}]" if ":" in host else host
    ws = await ws_connect(f"{'wss' if tls is not None else 'ws'}://{where}:{port}{ws_path}", ssl=tls,
                          subprotocols=[Subprotocol("mqtt")], compression=None, ping_interval=None,
                          max_size=None, open_timeout=None)
    conn = MqttConn(on_message, mqtt5)
    conn.attach(_WsTransport(ws, conn))
    return conn


async def connect(host: str, port: int, client_id: str, username: str, password: str, on_message: OnMessage, *,
                  keepalive: int = 240, will: tuple[str, bytes] | None = None, timeout: float = 30.0,
                  tls: ssl.SSLContext | None = None, ws_path: str | None = None, mqtt5: bool = False) -> MqttConn:
    """An MQTT 3.1.1 session (MQTT 5 with ``mqtt5``), over TLS (certificate and host name checked)
    when ``tls`` is given, and over a WebSocket at ``ws_path`` (``wss://`` with ``tls``) when that
    is given."""
    async with asyncio.timeout(timeout):
        conn = await _open(host, port, on_message, tls, ws_path, mqtt5)
    try:
        await conn.handshake(client_id, username, password, keepalive, will, timeout)
    except BaseException:
        conn.abort()
        raise
    return conn
