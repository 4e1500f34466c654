"""Fuzzing the embedded broker with broken packets on raw sockets (tests/fuzz.py), over TCP and,
the same packets inside sound (masked, binary) WebSocket frames, over its WebSocket listener.

Whatever a connection sends first, within the connect timeout (0.2 s here) plus a little the
broker has either answered a CONNACK (the bytes happened to form a CONNECT) or closed the
connection; a device connected all along still gets its PINGRESP after every case.

Whatever a connected client sends after a sound CONNECT, the broker has within the same time
either closed the connection or still answers it (a PINGREQ sent behind it gets its PINGRESP):
a packet certain to break MQTT 3.1.1 is always closed, a sound one never; a device connected
all along still gets its PINGRESP after every case, and sends and receives at the end.

Over WebSocket each case runs half as many examples as over TCP: both listeners hand their bytes
to the same checked reader, and the WebSocket run is there to show that the frames change nothing.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import pytest
from hypothesis import given

from broker.embedded import PigeonBroker
from tests.conftest import embedded_broker, tok_tokens
from tests.fuzz import TIMEOUT_S, examples, first_packet, session_packet
from tests.mqtt_raw import connect_packet, publish_packet, subscribe_packet
from tests.mqtt_ws import BlockingWs

CONNECT_TIMEOUT = 0.2
# a busy two-core machine, and a close that follows the timeout: the most a case may wait
CLOSED_WITHIN = CONNECT_TIMEOUT + 1.3
PACKET_TIMEOUT = 0.1
TRANSPORTS = ("tcp", "ws")
# examples per test over each transport (tests/fuzz.py multiplies them in the long run)
FIRST_PACKETS = {"tcp": 400, "ws": 200}
SESSION_PACKETS = {"tcp": 250, "ws": 125}


class Conn(Protocol):
    """What the tests use of a connection: a socket, or MQTT over a WebSocket (BlockingWs)."""

    def settimeout(self, timeout: float | None) -> None: ...
    def sendall(self, data: bytes) -> None: ...
    def recv(self, n: int) -> bytes: ...
    def __enter__(self) -> Conn: ...
    def __exit__(self, *exc: object) -> object: ...


Ports = dict[str, int]
Dial = Callable[[], AbstractContextManager[Conn]]


def dialer(transport: str, ports: Ports) -> Dial:
    """Opens a new connection to the broker's listener for ``transport``."""
    if transport == "ws":
        return lambda: BlockingWs("127.0.0.1", ports["ws"])
    return lambda: socket.create_connection(("127.0.0.1", ports["tcp"]), timeout=5)


@contextmanager
def broker_on_thread(connect_timeout: float) -> Iterator[tuple[PigeonBroker, asyncio.AbstractEventLoop, Ports]]:
    """The embedded broker on a loop of its own thread: the test's sockets are plain, blocking ones."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-broker", daemon=True)
    thread.start()
    started: tuple[PigeonBroker, int] = asyncio.run_coroutine_threadsafe(
        embedded_broker(tok_tokens("u1"), connect_timeout=connect_timeout), loop).result(30)
    broker, port = started
    ws_port = broker._servers["ws"].instance.sockets[0].getsockname()[1]  # noqa: SLF001
    try:
        yield broker, loop, {"tcp": port, "ws": ws_port}
    finally:
        asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def broker_ports() -> Iterator[Ports]:
    with broker_on_thread(CONNECT_TIMEOUT) as (_, _, ports):
        yield ports


def read_for_a_while(sock: Conn, got: bytearray, answered: Callable[[bytes], bool]) -> str | None:
    """Read into ``got`` for up to CLOSED_WITHIN seconds: 'closed' when the broker closes the
    connection, 'answered' once ``answered(got)`` holds, None if neither happened in time."""
    deadline = time.monotonic() + CLOSED_WITHIN
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            return None
        except OSError:
            return "closed"
        if not chunk:
            return "closed"
        got += chunk
        if answered(bytes(got)):
            return "answered"
    return None


def outcome(dial: Dial, data: bytes) -> str:
    """'closed' or 'connack' (the broker answered a CONNECT), or 'open' if neither came in time."""
    with dial() as sock:
        try:
            sock.sendall(data)
        except OSError:
            return "closed"  # closed while we were still sending
        got = bytearray()
        seen = read_for_a_while(sock, got, lambda g: g[:1] == b"\x20" and len(g) >= 4)
        if seen == "answered" or (seen == "closed" and got[:1] == b"\x20"):
            return "connack"
        return seen or "open"


@pytest.mark.timeout(TIMEOUT_S)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_broken_first_packets_are_closed_and_other_devices_undisturbed(broker_ports: Ports, transport: str) -> None:
    dial = dialer(transport, broker_ports)
    with dial() as device:
        device.sendall(connect_packet("dev-a", "dev-a", "tok-dev-a", keepalive=600))
        assert device.recv(4) == b"\x20\x02\x00\x00"
        seen: dict[str, int] = {}

        @examples(FIRST_PACKETS[transport])
        @given(data=first_packet())
        def run(data: bytes) -> None:
            result = outcome(dial, data)
            seen[result] = seen.get(result, 0) + 1
            assert result != "open", f"still open after {CLOSED_WITHIN} s: {data[:80]!r}"
            device.sendall(b"\xc0\x00")  # PINGREQ: the connected device is still served
            assert device.recv(2) == b"\xd0\x00"

        run()
        print(f"first packets over {transport}: {seen}")
        assert seen.get("closed", 0) > 0, seen


def packets_in(data: bytes) -> list[bytes]:
    """The whole packets at the start of ``data`` (each with its fixed header)."""
    found, pos = [], 0
    while pos + 2 <= len(data):
        length, multiplier, i = 0, 1, pos + 1
        while i < len(data) and i < pos + 5:
            length += (data[i] & 0x7F) * multiplier
            multiplier *= 128
            i += 1
            if not data[i - 1] & 0x80:
                break
        else:
            return found
        if i + length > len(data):
            return found
        found.append(data[pos:i + length])
        pos = i + length
    return found


LATE_CONNECTS = [0]


@contextmanager
def connected(dial: Dial) -> Iterator[Conn]:
    """A connection with an accepted CONNECT. The broker here closes a connection whose CONNECT
    is not whole within PACKET_TIMEOUT (0.1 s), which a busy machine can miss: then it is tried
    again (counted in LATE_CONNECTS), at most three times."""
    for _ in range(3):
        with dial() as sock:
            sock.sendall(connect_packet("dev-fz", "dev-fz", "tok-dev-fz", keepalive=600))
            answer = sock.recv(4)
            if answer:
                assert answer == b"\x20\x02\x00\x00"
                yield sock
                return
        LATE_CONNECTS[0] += 1
    pytest.fail("three CONNECTs in a row were not taken in time")


def session_outcome(dial: Dial, data: bytes) -> str:
    """After a sound CONNECT, ``data`` then a PINGREQ: 'closed', 'alive' (the PINGRESP came),
    or 'open' if neither came in time. The PINGREQ may complete a packet ``data`` cut short
    (a PUBACK's packet id, say); then a second one must be answered."""
    with connected(dial) as sock:
        got = bytearray()
        for attempt in (data + b"\xc0\x00", b"\xc0\x00"):
            try:
                sock.sendall(attempt)
            except OSError:
                return "closed"
            seen = read_for_a_while(sock, got, lambda g: b"\xd0\x00" in packets_in(g))
            if seen is not None:
                return "alive" if seen == "answered" else "closed"
        return "open"


@pytest.mark.timeout(TIMEOUT_S)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_broken_packets_after_connect_are_closed_and_other_devices_undisturbed(transport: str) -> None:
    # a packet cut short is closed PACKET_TIMEOUT after it began: shorter than the first-packet
    # test's, as most mutated packets end so and the test waits for each
    with broker_on_thread(PACKET_TIMEOUT) as (broker, loop, ports), dialer(transport, ports)() as device:
        dial = dialer(transport, ports)
        device.sendall(connect_packet("dev-a", "dev-a", "tok-dev-a", keepalive=600))
        assert device.recv(4) == b"\x20\x02\x00\x00"
        device.sendall(subscribe_packet("down/u1/dev-a", 1))
        assert device.recv(5) == b"\x90\x03\x00\x01\x01"
        seen: dict[tuple[str, str], int] = {}

        @examples(SESSION_PACKETS[transport])
        @given(case=session_packet("up/u1/dev-fz", "down/u1/dev-fz"))
        def run(case: tuple[bytes, str]) -> None:
            data, kind = case
            result = session_outcome(dial, data)
            seen[(kind, result)] = seen.get((kind, result), 0) + 1
            assert result != "open", f"neither closed nor answering after {CLOSED_WITHIN} s: {data[:80]!r}"
            if kind == "broken":
                assert result == "closed", f"a broken packet was taken: {data[:80]!r}"
            if kind == "sound":
                assert result == "alive", f"a sound packet closed the connection: {data[:80]!r}"
            device.sendall(b"\xc0\x00")  # the connected device is still served
            assert device.recv(2) == b"\xd0\x00"

        run()
        # and it still sends and receives
        device.sendall(publish_packet("up/u1/dev-a", b'{"type":"ping"}', 9))
        assert device.recv(4) == b"\x40\x02\x00\x09"
        asyncio.run_coroutine_threadsafe(broker.publish("down/u1/dev-a", b"still here", 0), loop).result(5)
        device.settimeout(5)
        delivered = b""
        while not delivered.endswith(b"still here"):
            delivered += device.recv(4096)
        print(f"packets after connect over {transport}: {dict(sorted(seen.items()))}, "
              f"CONNECTs tried again: {LATE_CONNECTS[0]}")
        assert seen.get(("broken", "closed"), 0) > 0 and seen.get(("sound", "alive"), 0) > 0, seen
