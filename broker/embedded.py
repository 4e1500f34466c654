"""The embedded broker: amqtt 0.12.1 with eight defects fixed and an in-process path to the bridge.

Fixes (each reproduced first by a test in ``tests/test_broker_fixes.py``):

1. **Received publishes lost on disconnect.** amqtt queues each publish for the client loop,
   but the loop stops reading that queue when the connection closes, so a device that
   publishes and disconnects loses what it sent (stock amqtt had even PUBACKed it). Here the
   loop hands on everything already queued, in order, before it publishes the will.
2. **A refused CONNECT disturbs the device it impersonates.** amqtt drops the existing session
   of a client id before it authenticates the new CONNECT, so a wrong password knocks the real
   device off. Here authentication comes first; a refused CONNECT touches nothing. An accepted
   one takes over cleanly: the old connection is closed and its will is not published.
3. **Keepalive not enforced.** amqtt's read timeout handler does nothing, so half-open
   connections live forever and their wills never fire. Here a connection silent for
   1.5 × its keepalive is closed, and its will published.
4. **Deliveries skipped while subscribers change.** amqtt walks the live subscription lists
   while awaiting permission checks, so a subscriber leaving mid-walk shifts the list and
   another is skipped. Here the walk is over a snapshot, and exact topic filters are looked up
   directly; only the filters holding + or # are matched one by one, so a publish costs the
   same with ten thousand devices subscribed as with ten.
5. **Every departure scans every subscription.** amqtt removes a leaving session's
   subscriptions by walking all topic filters of all sessions, so ten thousand devices leaving
   cost ten thousand × twenty thousand steps, and the server stopped answering for minutes.
   Here each client's own filters are remembered, and only those are visited.
6. **PUBACK before the publish is handled.** amqtt PUBACKs a QoS-1 publish as soon as it is
   queued, so a server killed under load had acknowledged requests the bridge never saw; the
   device did not send those again, while the ones it had no PUBACK for were resent and
   overtook them. Here the PUBACK waits until the client loop has handed the publish on (for
   ``up/…``: the bridge's ``ingest`` returned, the request stored and answered, or answered
   with an error). Each device's loop takes its publishes one at a time, in arrival order, so
   its PUBACKs leave in that order too, and a device waiting on the bridge holds up no other.
7. **Broken first packets leave the connection open.** amqtt parses whatever arrives first as
   a CONNECT (a PUBLISH too), waits without limit for a body its length announced, and on most
   errors returns without closing the socket. Here the first packet is read whole, within
   ``connect_timeout`` seconds, and must be a CONNECT (type 1, flags 0) of at most
   ``MAX_CONNECT_BYTES`` that amqtt parses to its last byte; otherwise the connection is
   closed at once (MQTT 3.1.1 section 4.8), as is one that sends no CONNECT in time.
8. **Broken packets after the CONNECT are taken.** amqtt drops a PUBLISH with QoS 3, or with
   a topic of invalid UTF-8 or holding a wildcard, takes (and PUBACKs) one with packet id 0,
   answers a SUBSCRIBE with no topic filter or with wrong flags, and ignores packets only a
   server may send; the connection stays open (of the 36 kinds in
   ``tests/test_broken_sessions.py``, 31 were left open, and a DISCONNECT with a body was taken
   as a clean one, without the will). Over WebSocket it also repeats the last frame it got when
   the client goes away in the middle of a packet, so a PUBLISH the client never sent whole is
   parsed from copies of its start and handed to the bridge. Here every packet of a connected
   client is read whole (its rest within ``connect_timeout`` seconds, at most ``max_packet``
   bytes) and checked against MQTT 3.1.1 (``broker.packets``) before amqtt sees it; a broken
   one closes the connection at once, as a lost one (the will is published), and so does a
   WebSocket client's text frame [MQTT-6.0.0-1].

With ``admit`` (the bridge's admission control), every ``up/`` publish is offered to it as it is
read, before it is queued: one taken in is counted until the client loop has handled it; one
refused is answered at once on the device's own connection, at QoS 0, PUBACKed and never
queued. ``backlog`` tells the bridge how many publications wait in the broadcast queue.

The server's own QoS 0 publishes (:meth:`PigeonBroker.publish`) are written to each
subscriber's socket at once instead of through amqtt's broadcast queue, unless that subscriber's
socket is behind (docs/architecture.md, "Replies and events on the embedded broker").

Publishes on ``up/…`` (device requests and wills) go straight to the bridge's ``ingest``
coroutine in this process, in the order the device sent them; nothing subscribes to them
over MQTT. Sessions are always clean: the bridge's store, not the broker, holds what devices
have not yet received.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from amqtt.adapters import (
    ReaderAdapter,
    StreamReaderAdapter,
    StreamWriterAdapter,
    WebSocketsWriter,
    WriterAdapter,
)
from amqtt.broker import Broker, Server
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.session import (
    INCOMING,
    ApplicationMessage,
    IncomingApplicationMessage,
    OutgoingApplicationMessage,
    Session,
)
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from .gate import DeviceGate
from .packets import ProtocolViolation, check_packet, varint
from .plugins import REFUSAL_ATTR, principal_of

log = logging.getLogger(__name__)

Ingest = Callable[[str, bytes], Awaitable[None]]
# Taking in a device publish on up/ (the bridge's admission control, bridge/admission.py):
# None when taken in, and then ``Release`` is called once it has been handled; otherwise the
# (topic, payload) replies that answer it at once, and the publish is acknowledged, never queued.
# The third argument: how many of this connection's publishes are held already. ``Start``: its
# handling is about to start, and it was taken in then (time.monotonic()): None to handle it, or
# the replies that answer it instead (it waited too long; bridge/admission.py).
Admit = Callable[[str, bytes | bytearray, int], list[tuple[str, bytes]] | None]
Start = Callable[[str, bytes | bytearray, float], list[tuple[str, bytes]] | None]
Release = Callable[[], None]
KEEPALIVE_FACTOR = 1.5
# A connection that has not sent a whole CONNECT within this many seconds is closed (fix 7).
CONNECT_TIMEOUT_S = 10.0
# The largest CONNECT accepted: a client id, a will (a presence payload) and a token fit many
# times over; a larger announced length is a broken or hostile first packet.
MAX_CONNECT_BYTES = 64 * 1024
CONNECT_FIRST_BYTE = 0x10  # packet type 1 (CONNECT), flags 0 [MQTT-2.2.2-2]
# The largest packet a connected client may send (fix 8): a request of the protocol's largest
# payload fits many times over (a larger one is still answered ``too_large`` by the bridge), and
# so does the WebSocket listener's frame limit of 1 MiB.
MAX_PACKET_BYTES = 1024 * 1024
# The most a connected client's reader takes from its socket at once.
RECEIVE_BYTES = 64 * 1024
# A server's QoS 0 publish is written to a device's socket at once unless this many bytes are
# already waiting there (then it waits for them to drain, as amqtt's own publishes do).
DIRECT_WRITE_LIMIT = 256 * 1024


# put in an incoming message's ``puback_packet`` once its PUBACK is written (or on its way):
# amqtt only asks whether that attribute is set
ACKNOWLEDGED = object()


def puback(packet_id: int) -> bytes:
    """The PUBACK packet of ``packet_id``."""
    return b"\x40\x02" + packet_id.to_bytes(2, "big")


def qos0_publish(topic: str, payload: bytes) -> bytes:
    """The whole QoS 0 PUBLISH packet (no retain, no dup) of ``payload`` on ``topic``."""
    name = topic.encode()
    return b"".join((b"\x30", varint(2 + len(name) + len(payload)), len(name).to_bytes(2, "big"), name, payload))


class BrokenFirstPacket(AMQTTError):
    """The first packet of a connection is not a well-formed CONNECT, or did not come in time."""


class _Buffered(ReaderAdapter):
    """Reads from bytes already received: amqtt parses the first packet from here, so it can
    never wait on the network for more than the packet announced."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    async def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else min(len(self._data), self._pos + n)
        chunk = self._data[self._pos:end]
        self._pos = end
        return chunk

    def feed_eof(self) -> None:
        self._pos = len(self._data)

    @property
    def left(self) -> int:
        return len(self._data) - self._pos


async def _read_exactly(reader: ReaderAdapter, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await reader.read(n - len(data))
        if not chunk:
            raise BrokenFirstPacket("connection closed in the middle of the first packet")
        data += chunk
    return data


async def read_first_packet(reader: ReaderAdapter) -> bytes:
    """The whole first packet of a connection, if it can be a CONNECT; raises BrokenFirstPacket."""
    head = await _read_exactly(reader, 1)
    if head[0] != CONNECT_FIRST_BYTE:
        raise BrokenFirstPacket(f"first packet is not a CONNECT (first byte 0x{head[0]:02x})")
    try:
        length, raw_length = await _remaining_length(reader)
    except ProtocolViolation as exc:
        raise BrokenFirstPacket(str(exc)) from exc
    head += raw_length
    if length > MAX_CONNECT_BYTES:
        raise BrokenFirstPacket(f"CONNECT announces {length} bytes, more than {MAX_CONNECT_BYTES}")
    return head + await _read_exactly(reader, length)


async def _remaining_length(reader: ReaderAdapter) -> tuple[int, bytes]:
    length, multiplier, raw = 0, 1, b""
    for _ in range(4):
        byte = (await _read_exactly(reader, 1))[0]
        raw += bytes([byte])
        length += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            return length, raw
        multiplier *= 128
    raise ProtocolViolation("remaining length longer than four bytes")


class _WebSocketReader(ReaderAdapter):
    """The bytes of a WebSocket's binary frames (amqtt's own reader repeats the last frame when
    the client goes away in the middle of a packet). A text frame breaks MQTT [MQTT-6.0.0-1]:
    it and the end of the connection read as the end of the stream."""

    def __init__(self, connection: ServerConnection) -> None:
        self._connection = connection
        self._buffer = bytearray()
        self._ended = False

    async def read(self, n: int = -1) -> bytes:
        await self._fill(max(n, 1))
        chunk = bytes(self._buffer[:n] if n >= 0 else self._buffer)
        del self._buffer[:len(chunk)]
        return chunk

    async def read_some(self) -> bytes:
        """What has come (at least one byte: the next binary frame if nothing is left of the
        last); nothing at the end."""
        await self._fill(1)
        chunk = bytes(self._buffer)
        self._buffer.clear()
        return chunk

    async def _fill(self, want: int) -> None:
        while len(self._buffer) < want and not self._ended:
            try:
                frame = await self._connection.recv()
            except ConnectionClosed:
                self._ended = True
                break
            if isinstance(frame, str):
                log.info("closing a WebSocket connection: a text frame [MQTT-6.0.0-1]")
                self._ended = True
                await self._connection.close(1003, "MQTT travels in binary frames")
                break
            self._buffer.extend(frame)

    def feed_eof(self) -> None:
        self._ended = True


class _CheckedReader(ReaderAdapter):
    """Hands amqtt the packets of a connected client only once each is whole and checked against
    MQTT 3.1.1 (fix 8). A broken packet, one cut short by the end of the connection, one longer
    than ``max_packet`` or one whose rest does not come within ``timeout`` seconds of its first
    byte reads as the end of the stream (after the sound packets before it): amqtt then closes
    the connection as a lost one.

    It is on the path of every packet, so it is kept cheap: it takes what the connection has
    received in one read, finds the packets' fixed headers in that buffer, checks every whole
    packet there on a view of the bytes (no copy per packet), and hands amqtt its reads from an
    offset. Nothing is timed while packets come whole; only a wait for the rest of a packet
    already begun runs under a deadline (waiting between packets is the keepalive's business)."""

    def __init__(self, reader: ReaderAdapter, max_packet: int, timeout: float) -> None:
        self._receive = _receiver(reader)
        self._reader = reader
        self._max_packet = max_packet
        self._timeout = timeout
        self._buffer = bytearray()  # received, not yet a whole packet
        self._begun: float | None = None  # loop time the first byte in ``_buffer`` came
        self._out = b""  # whole, checked packets amqtt has not read yet
        self._at = 0
        self._ended = False
        self.violation: str | None = None

    async def read(self, n: int = -1) -> bytes:
        out, at = self._out, self._at
        if at >= len(out):
            if self._ended:
                return b""
            out, at = self._out, self._at = await self._next_packets(), 0
        end = len(out) if n < 0 else min(len(out), at + n)
        self._at = end
        return out[at:end]

    async def _next_packets(self) -> bytes:
        while True:
            whole = self._take()
            if whole or self.violation is not None:
                if self.violation is not None:
                    log.info("closing a connection: %s", self.violation)
                    self._ended = True
                return whole
            if not self._buffer:
                data = await self._receive()
            else:
                if self._begun is None:
                    self._begun = asyncio.get_running_loop().time()
                try:
                    async with asyncio.timeout_at(self._begun + self._timeout):
                        data = await self._receive()
                except TimeoutError:
                    self.violation = f"a packet not whole within {self._timeout:g} s of its first byte"
                    continue
            if not data:
                if self._buffer:
                    self.violation = "connection closed in the middle of a packet"
                    continue
                self._ended = True
                return b""
            if not self._buffer:
                self._begun = asyncio.get_running_loop().time()
            self._buffer += data

    def _take(self) -> bytes:
        """The whole packets at the start of the buffer, up to the first broken one (which sets
        ``violation``); a packet begun but not whole stays in the buffer."""
        if self.violation is not None:
            return b""
        buffer, size, pos = self._buffer, len(self._buffer), 0
        bounds: list[tuple[int, int, int]] = []  # (start, start of body, end) of each whole packet
        while pos < size:
            try:
                header = _fixed_header(buffer, pos, size)
            except ProtocolViolation as exc:
                self.violation = str(exc)
                break
            if header is None:
                break  # its remaining length is not whole yet
            at, length = header
            if length > self._max_packet:
                self.violation = f"a packet of {length} bytes, more than {self._max_packet}"
                break
            if at + length > size:
                break
            bounds.append((pos, at, at + length))
            pos = at + length
        if not bounds:
            return b""
        whole = bytes(buffer[:pos])
        del buffer[:pos]
        self._begun = None if not buffer else asyncio.get_running_loop().time()
        view = memoryview(whole)
        for start, body, end in bounds:
            try:
                check_packet(whole[start], view[body:end])
            except ProtocolViolation as exc:
                self.violation = str(exc)
                return whole[:start]
        return whole

    def feed_eof(self) -> None:
        self._ended = True
        self._reader.feed_eof()


def _fixed_header(buffer: bytearray, pos: int, size: int) -> tuple[int, int] | None:
    """Where the body of the packet starting at ``buffer[pos]`` begins, and its remaining length;
    None if the remaining length has not all come yet."""
    length, shift, at = 0, 0, pos + 1
    while at < size:
        if at - pos > 4:
            raise ProtocolViolation("remaining length longer than four bytes")
        byte = buffer[at]
        at += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return at, length
        shift += 7
    if at - pos > 4:
        raise ProtocolViolation("remaining length longer than four bytes")
    return None


def _receiver(reader: ReaderAdapter) -> Callable[[], Awaitable[bytes]]:
    """What reads, from ``reader``, the bytes that have come (at least one; none at the end)."""
    if isinstance(reader, _WebSocketReader):
        return reader.read_some
    if isinstance(reader, StreamReaderAdapter):
        stream = reader._reader  # noqa: SLF001 - amqtt's adapter reads only exact sizes
        return lambda: stream.read(RECEIVE_BYTES)
    raise TypeError(f"no way to read what has come from a {type(reader).__name__}")


class _Handler(BrokerProtocolHandler):
    """Closes the connection when nothing has been read for the (already scaled) keepalive (fix 3),
    and PUBACKs a device's QoS-1 publish only once the broker has handled it (fix 6)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # id(incoming message) -> resolved by the client loop once the message is handled
        self._handled: dict[int, asyncio.Future[None]] = {}
        self.admit: Admit | None = None
        self.starting: Start | None = None  # not ``start``: amqtt's handler has one
        self.release: Release | None = None
        # whether this connection's session may be sent a reply on a topic right now
        self.reply_to: Callable[[Session, str], bool] | None = None
        # id() of the publishes taken in by ``admit`` and not yet handled -> when taken in
        self._counted: dict[int, float] = {}
        # packets on their way the way amqtt writes (publishes handed to it, and every
        # ``_send_packet`` under way): while any is, nothing is written at once (``write_now``)
        self._behind = 0

    def _refused(self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage,
                 packet_id: int | None = None) -> Awaitable[None] | None:
        """Ask admission control about an incoming device publish; count it if taken in, else
        return what answers it (and PUBACKs it, given its ``packet_id``)."""
        if self.admit is None or not app_message.topic.startswith("up/"):
            return None
        replies = self.admit(app_message.topic, app_message.data, len(self._counted))
        if replies is None:
            self._counted[id(app_message)] = time.monotonic()
            return None
        return self._answer_now(replies, packet_id)

    async def _answer_now(self, replies: list[tuple[str, bytes]], packet_id: int | None = None) -> None:
        """A refusal goes straight to the device that sent the request, on its own connection, at
        QoS 0: not through the broker's one broadcast queue, which carries every reply and event
        and which a flood of refusals would make everyone wait behind. (Lost only with the
        connection, when the device tries again anyway.) With ``packet_id``, the PUBACK of the
        refused publish follows it; both are one write when the socket keeps up."""
        session = self.session
        permitted = [(topic, payload) for topic, payload in replies
                     if session is not None and self.reply_to is not None and self.reply_to(session, topic)]
        ack = b"" if packet_id is None else puback(packet_id)
        if self.write_now(b"".join([*(qos0_publish(t, p) for t, p in permitted), ack])):
            return
        for topic, payload in permitted:
            await self.mqtt_publish(topic, payload, 0, False)
        if packet_id is not None:
            await self._send_packet(PubackPacket.build(packet_id))

    async def _acknowledge(self, packet_id: int) -> None:
        """PUBACK a device's publish: at once when nothing of this connection's waits to be
        written before it, else the way amqtt writes packets."""
        if not self.write_now(puback(packet_id)):
            await self._send_packet(PubackPacket.build(packet_id))

    async def _handle_qos0_message_flow(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage,
    ) -> None:
        if app_message.direction == INCOMING and not (
                app_message.publish_packet is not None and app_message.publish_packet.dup_flag):
            refused = self._refused(app_message)
            if refused is not None:
                await refused
                return
        await super()._handle_qos0_message_flow(app_message)

    async def _handle_qos1_message_flow(
        self, app_message: OutgoingApplicationMessage | IncomingApplicationMessage,
    ) -> None:
        if (app_message.direction != INCOMING or self.session is None or app_message.packet_id is None
                or app_message.puback_packet):
            await super()._handle_qos1_message_flow(app_message)  # outgoing, or amqtt's own errors
            return
        refused = self._refused(app_message, app_message.packet_id)
        if refused is not None:  # answered at once and never queued: acknowledged at once too
            await refused
            app_message.puback_packet = ACKNOWLEDGED
            return
        # amqtt queues the message for the client loop and PUBACKs it at once. Here the PUBACK
        # waits until the loop has handed it on (to the bridge, for up/...): the loop takes one
        # message at a time, in arrival order, so the PUBACKs leave in that order too.
        handled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._handled[id(app_message)] = handled
        try:
            await self.session.delivered_message_queue.put(app_message)
            await handled
        finally:
            self._handled.pop(id(app_message), None)
        await self._acknowledge(app_message.packet_id)
        app_message.puback_packet = ACKNOWLEDGED

    def message_handled(self, app_message: object) -> None:
        """The client loop is done with ``app_message``: its PUBACK may go."""
        key = id(app_message)
        if self._counted.pop(key, None) is not None and self.release is not None:
            self.release()
        handled = self._handled.pop(key, None)
        if handled is not None and not handled.done():
            handled.set_result(None)

    def release_all(self) -> None:
        """The connection is over: whatever it had taken in and not handled is no longer held."""
        if self.release is not None:
            for _ in self._counted:
                self.release()
        self._counted.clear()

    def expired(self, app_message: Any) -> Awaitable[None] | None:
        """Ask admission control, as the client loop is about to hand a publish it took in to
        the bridge, whether it waited too long: if so, what answers it instead."""
        taken_at = self._counted.get(id(app_message))
        if taken_at is None or self.starting is None:
            return None
        replies = self.starting(app_message.topic, app_message.data, taken_at)
        return None if replies is None else self._answer_now(replies)

    def write_now(self, packet: bytes) -> bool:
        """Write whole packets to this connection's socket now, if nothing of this connection's
        is on its way the way amqtt writes (``_behind``: every :meth:`_send_packet` from its
        start, waiting for the write lock included, to its end) and its socket keeps up; False
        when they must go amqtt's way. No timer is pushed back: a broker connection's write
        timeout does nothing (``BrokerProtocolHandler.handle_write_timeout``)."""
        w = self.writer
        if self._behind or not isinstance(w, StreamWriterAdapter) or w.is_closed:
            return False
        transport = w._writer.transport
        if transport.is_closing() or transport.get_write_buffer_size() > DIRECT_WRITE_LIMIT:
            return False
        transport.write(packet)
        return True

    async def _send_packet(self, packet: Any) -> None:
        # counted from before the write lock is asked for: a packet waiting for it (the lock
        # reads free between its release and the next holder's turn) is not overtaken
        self._behind += 1
        try:
            await super()._send_packet(packet)
        finally:
            self._behind -= 1

    def publish_later(self, topic: str, payload: bytes) -> asyncio.Task[Any]:
        """Send a QoS 0 PUBLISH the way amqtt does, waiting for the socket to drain; until that
        is done, :meth:`write_now` writes nothing, so what follows cannot overtake it."""
        self._behind += 1
        task: asyncio.Task[Any] = asyncio.ensure_future(self.mqtt_publish(topic, payload, 0, False))
        task.add_done_callback(self._caught_up)
        return task

    def _caught_up(self, _task: asyncio.Future[Any]) -> None:
        self._behind -= 1

    def handle_read_timeout(self) -> None:
        log.info("keepalive expired for %s; closing", self.session.client_id if self.session else None)
        # amqtt's reader loop stops when its reader is gone, then reports the connection lost,
        # which publishes the will.
        self.reader = None


class PigeonBroker(Broker):
    def __init__(self, config: dict[str, Any], gate: DeviceGate, ingest: Ingest | None = None,
                 connect_timeout: float = CONNECT_TIMEOUT_S, max_packet: int = MAX_PACKET_BYTES,
                 tls: ssl.SSLContext | None = None, admit: Admit | None = None,
                 release: Release | None = None, start: Start | None = None) -> None:
        super().__init__(config)
        self.gate = gate
        self.tls = tls
        self._admit, self._release, self._start = admit, release, start
        self.connect_timeout = connect_timeout
        self.max_packet = max_packet
        self._ingest = ingest
        self.broadcasts = 0  # publications taken from the broadcast queue, or written at once
        self._writing: set[asyncio.Future[Any]] = set()  # QoS 0 publishes that went amqtt's way
        # filters with + or #: the only ones a publish must be matched against one by one
        self._wildcards: set[str] = set()
        # client id -> the filters it subscribed to (fix 5)
        self._filters_of: dict[str, set[str]] = {}

    def _may_reply(self, session: Session, topic: str) -> bool:
        """The session subscribed to exactly ``topic`` and may receive it."""
        principal = principal_of(session)
        return (principal is not None and self.gate.may_receive(principal, topic)
                and any(s is session for s, _ in self._subscriptions.get(topic, ())))

    def sent_out(self) -> int:
        """Publications taken from the broadcast queue so far (the rate it drains at)."""
        return self.broadcasts

    def backlog(self) -> int:
        """Publications waiting in amqtt's broadcast queue to be sent to their subscribers."""
        waiting: int = self._broadcast_queue.qsize()
        return waiting

    def set_ingest(self, ingest: Ingest) -> None:
        self._ingest = ingest

    async def ws_connected(self, websocket: ServerConnection, listener_name: str) -> None:
        await self._client_connected(listener_name, _WebSocketReader(websocket), WebSocketsWriter(websocket))

    def _create_ssl_context(self, listener: Any) -> ssl.SSLContext:
        """The TLS listeners use the server's own context (bridge/tls.py: TLS 1.2+, no compression,
        no client certificates, reloadable), not the one amqtt would build from the listener's
        files, which asks every client for a certificate checked against the system's CAs."""
        if self.tls is None:
            raise AMQTTError("a TLS listener is configured but the broker was given no TLS context")
        return self.tls

    # -- fixes 2 and 7, keepalive scaling -----------------------------------------------------------
    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    first = await read_first_packet(reader)
            except TimeoutError as exc:
                raise BrokenFirstPacket(f"no CONNECT within {self.connect_timeout:g} s") from exc
            buffered = _Buffered(first)
            handler, session = await _Handler.init_from_connect(buffered, writer, self.plugins_manager)
            handler.admit, handler.release, handler.reply_to = self._admit, self._release, self._may_reply
            handler.starting = self._start
            if buffered.left:
                raise BrokenFirstPacket(f"{buffered.left} bytes after the end of the CONNECT it announced")
        except (AMQTTError, MQTTError, NoDataError, ValueError, UnicodeDecodeError) as exc:
            log.info("closing the connection from %s:%s: %s", remote_address, remote_port, exc)
            await _close(writer)
            raise AMQTTError(exc) from exc
        session.clean_session = True
        session.parent = 0
        if session.keep_alive > 0:
            session.keep_alive = math.ceil(session.keep_alive * KEEPALIVE_FACTOR)
        return handler, session

    async def _handle_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, client_session: Session,
        handler: BrokerProtocolHandler, server: Server, listener_name: str,
    ) -> None:
        authenticated = await self._authenticate(client_session, self.listeners_config[listener_name])
        client_id = client_session.client_id
        if not authenticated or not client_id:
            code = int(getattr(client_session, REFUSAL_ATTR, NOT_AUTHORIZED))
            await ConnackPacket.build(0, code).to_stream(writer)
            await writer.close()
            return
        previous = self._sessions.get(client_id)
        if previous is not None:
            old_session, old_handler = previous
            old_session.will_flag = False  # replaced by the same device: not a lost connection
            if old_session.transitions.is_connected():
                log.info("client %s reconnected; closing its previous connection", client_id)
                await old_handler.handle_connection_closed()
                await old_handler.stop()
            await self._delete_session(client_id)
        client_session.transitions.connect()
        handler.attach(client_session, _CheckedReader(reader, self.max_packet, self.connect_timeout), writer)
        self._sessions[client_id] = (client_session, handler)
        await handler.mqtt_connack_authorize(True)
        await self.plugins_manager.fire_event(
            BrokerEvents.CLIENT_CONNECTED, client_id=client_id, client_session=client_session
        )
        await handler.start()
        await self._client_message_loop(client_session, handler)

    # -- fix 1 --------------------------------------------------------------------------------
    async def _client_message_loop(self, client_session: Session, handler: BrokerProtocolHandler) -> None:
        disconnect_waiter = asyncio.ensure_future(handler.wait_disconnect())
        subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
        unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
        try:
            while True:
                done, _ = await asyncio.wait(
                    [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if subscribe_waiter in done:
                    await self._handle_subscription(client_session, handler, subscribe_waiter)
                    subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
                if unsubscribe_waiter in done:
                    await self._handle_unsubscription(client_session, handler, unsubscribe_waiter)
                    unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
                if wait_deliver in done:
                    if not await self._handle_message_delivery(client_session, handler, wait_deliver):
                        # a protocol violation: end the connection as if it were lost
                        await handler.handle_connection_closed()
                    wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
                if disconnect_waiter.done():
                    await self._drain(client_session, handler, wait_deliver)
                    await self._handle_disconnect(client_session, handler, disconnect_waiter)
                    return
        except asyncio.CancelledError:
            log.debug("client loop of %s cancelled", client_session.client_id)
        finally:
            for waiter in (disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver):
                waiter.cancel()
            await asyncio.gather(
                disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver, return_exceptions=True
            )
            if isinstance(handler, _Handler):
                handler.release_all()

    async def _handle_message_delivery(
        self, client_session: Session, handler: BrokerProtocolHandler, wait_deliver: asyncio.Future[Any],
    ) -> bool:
        message = wait_deliver.result()
        try:
            expired = handler.expired(message) if isinstance(handler, _Handler) else None
            if expired is not None:  # waited past admission control's bound: answered instead
                await expired
                return True
            return bool(await super()._handle_message_delivery(client_session, handler, wait_deliver))
        finally:  # handled (or refused, or failed): fix 6's PUBACK may go
            if isinstance(handler, _Handler):
                handler.message_handled(message)

    async def _drain(self, session: Session, handler: BrokerProtocolHandler, pending: asyncio.Future[Any]) -> None:
        """Hand on every publish already acknowledged to the device, in the order it arrived."""
        if not pending.done():
            pending.cancel()
        results = await asyncio.gather(pending, return_exceptions=True)
        first = results[0]
        queued: list[ApplicationMessage] = [first] if isinstance(first, ApplicationMessage) else []
        while not session.delivered_message_queue.empty():
            queued.append(session.delivered_message_queue.get_nowait())
        for message in queued:
            fut: asyncio.Future[ApplicationMessage] = asyncio.get_running_loop().create_future()
            fut.set_result(message)
            await self._handle_message_delivery(session, handler, fut)

    # -- in-process delivery to the bridge ------------------------------------------------------
    async def _broadcast_message(
        self, session: Session | None, topic: str | None, data: bytes | bytearray | None,
        force_qos: int | None = None,
    ) -> None:
        if topic is not None and topic.startswith("up/") and self._ingest is not None:
            if data is not None:
                try:
                    await self._ingest(topic, bytes(data))
                except Exception:
                    log.exception("bridge failed to take a publish on %s", topic)
            return
        await super()._broadcast_message(session, topic, data, force_qos)

    async def retain_message(
        self, source_session: Session | None, topic_name: str | None, data: bytes | bytearray | None,
        qos: int | None = None,
    ) -> None:
        # Nothing in Pigeon's protocol is retained: the store is the source of truth.
        return None

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        """Publish from the server to every permitted subscriber of ``topic``.

        At QoS 0 (every event for a protocol v2 device, typing for v1) the PUBLISH is written
        to each subscriber's socket here and now: amqtt's way, through its broadcast queue and
        a task per broadcast and per subscriber, took a fifth of the embedded server's event
        loop (BENCHMARKS.md). A subscriber whose socket is behind gets it amqtt's way, after
        what it is already waiting for. At QoS 1 it goes through the broadcast queue, as any
        device's publish does."""
        if qos != 0:
            await super()._broadcast_message(None, topic, payload, qos)
            return
        self.broadcasts += 1
        packet = b""
        for handler, _sub_qos in self._deliveries(topic):
            if not packet:
                packet = qos0_publish(topic, payload)
            if isinstance(handler, _Handler):
                if handler.write_now(packet):
                    continue
                task = handler.publish_later(topic, payload)
            else:
                task = asyncio.ensure_future(handler.mqtt_publish(topic, payload, 0, retain=False))
            self._writing.add(task)
            task.add_done_callback(self._written)

    def subscribed(self, topic: str) -> bool:
        """Whether any session has a subscription that ``topic`` matches (connected or not:
        sessions here are clean, so a subscription is a connection's)."""
        if self._subscriptions.get(topic):
            return True
        return any(self._matches(topic, a_filter) for a_filter in self._wildcards)

    def _written(self, task: asyncio.Future[Any]) -> None:
        self._writing.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the connection went (at most once)
            log.info("a QoS 0 publish to a device was not written: %r", task.exception())

    async def shutdown(self) -> None:
        writing = list(self._writing)
        for task in writing:
            task.cancel()
        await asyncio.gather(*writing, return_exceptions=True)
        await super().shutdown()

    def _deliveries(self, topic: str) -> list[tuple[BrokerProtocolHandler, int]]:
        """The handler of each connected session subscribed to ``topic`` and permitted to
        receive it, with the QoS it subscribed at (fix 4: a snapshot, exact filters looked up)."""
        matches: list[tuple[Session, int]] = list(self._subscriptions.get(topic, ()))
        for a_filter in list(self._wildcards):
            subscriptions = self._subscriptions.get(a_filter)
            if subscriptions is None:
                self._wildcards.discard(a_filter)  # its last subscriber left
            elif self._matches(topic, a_filter):
                matches.extend(subscriptions)
        out: list[tuple[BrokerProtocolHandler, int]] = []
        for target_session, sub_qos in matches:
            if target_session.transitions.state != "connected":
                continue
            principal = principal_of(target_session)
            if principal is None or not self.gate.may_receive(principal, topic):
                continue
            handler = self._get_handler(target_session)
            if handler is not None:
                out.append((handler, sub_qos))
        return out

    # -- fix 4 --------------------------------------------------------------------------------
    async def _run_broadcast(self, running_tasks: Any) -> None:
        broadcast = await self._broadcast_queue.get()
        self.broadcasts += 1
        topic = broadcast["topic"]
        for handler, sub_qos in self._deliveries(topic):
            qos = broadcast.get("qos", sub_qos)
            qos = min(qos, sub_qos) if qos is not None else sub_qos
            delivery = handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)
            running_tasks.append(asyncio.ensure_future(delivery))

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        code = int(await super().add_subscription(subscription, session))
        if code != 0x80:
            if "+" in subscription[0] or "#" in subscription[0]:
                self._wildcards.add(subscription[0])
            if session.client_id is not None:
                self._filters_of.setdefault(session.client_id, set()).add(subscription[0])
        return code

    # -- fix 5 --------------------------------------------------------------------------------
    async def _del_all_subscriptions(self, session: Session) -> None:
        # every subscription is added through add_subscription, so a client id not found here
        # has none (it never subscribed, or was already cleared)
        filters = self._filters_of.pop(session.client_id, set()) if session.client_id is not None else set()
        for a_filter in filters:  # amqtt matches by client id, as its own walk does
            if self._del_subscription(a_filter, session) and not self._subscriptions.get(a_filter, True):
                del self._subscriptions[a_filter]

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        principal = principal_of(session)
        if principal is None:
            return False
        return bool(await super()._topic_filtering(session, topic, action))

    async def register_device(self, user_id: str, device_id: str, token: str, expires_at: int) -> None:
        """Nothing to do: the embedded broker checks tokens itself at CONNECT."""

    async def remove_device(self, device_id: str) -> None:
        """Close the unlinked device's connection, if it has one (its token is refused from now on)."""
        await self.disconnect_device(device_id)

    async def disconnect_device(self, device_id: str) -> None:
        """Close the device's connection, if it has one, as if it were lost (its will is
        published); it may connect again."""
        held = self._sessions.get(device_id)
        if held is not None and held[0].transitions.is_connected():
            handler = held[1]
            await handler.handle_connection_closed()
            # amqtt ends the session when its client loop next looks, which a loop busy handing
            # on the device's publishes may not do for a long time (a suite run saw a kicked
            # device's connection still open 30 s later): the socket is closed here at once
            if handler.writer is not None:
                await _close(handler.writer)

    def connected_count(self) -> int:
        return sum(1 for s, _ in self._sessions.values() if s.transitions.state == "connected")


async def _close(writer: WriterAdapter) -> None:
    try:
        await writer.close()
    except (OSError, AMQTTError, RuntimeError) as exc:  # already gone: nothing left to close
        log.debug("closing a connection: %s", exc)


def listener_names(tls: bool, plaintext: bool = True) -> dict[str, str]:
    """The amqtt listener serving each of ``mqtt``, ``ws``, ``mqtts`` and ``wss``. amqtt needs one
    named ``default`` and fills the others' unset fields from it (``ssl`` among them), so
    ``default`` is the plain MQTT listener, or the TLS one when there is no plain listener."""
    names: dict[str, str] = {}
    if plaintext:
        names.update(mqtt="default", ws="ws")
    if tls:
        names.update(mqtts="mqtts" if plaintext else "default", wss="wss")
    return names


def broker_config(host: str, mqtt_port: int, ws_port: int, gate: DeviceGate, *, mqtts_port: int | None = None,
                  wss_port: int | None = None, plaintext: bool = True) -> dict[str, Any]:
    """With ``mqtts_port`` and ``wss_port``: TLS listeners too (the broker needs ``tls=`` then);
    ``plaintext=False`` leaves the plain ones out."""
    tls = mqtts_port is not None and wss_port is not None
    if not tls and not plaintext:
        raise ValueError("a broker with no plaintext listener needs TLS listeners")
    binds = {"mqtt": ("tcp", mqtt_port, False), "ws": ("ws", ws_port, False),
             "mqtts": ("tcp", mqtts_port, True), "wss": ("ws", wss_port, True)}
    listeners = {}
    for role, name in listener_names(tls, plaintext).items():
        kind, port, secure = binds[role]
        listeners[name] = {"type": kind, "bind": f"{host}:{port}", **({"ssl": True} if secure else {})}
    return {
        "listeners": listeners,
        "timeout_disconnect_delay": 0,
        "plugins": {
            "broker.plugins.DeviceAuthPlugin": {"gate": gate},
            "broker.plugins.TopicPermissionPlugin": {"gate": gate},
        },
    }
