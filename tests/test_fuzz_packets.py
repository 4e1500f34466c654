"""Fuzzing the embedded broker with broken first packets on raw sockets (tests/fuzz.py).

Whatever a connection sends first, within the connect timeout (0.2 s here) plus a little the
broker has either answered a CONNACK (the bytes happened to form a CONNECT) or closed the
connection; a device connected all along still gets its PINGRESP after every case.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given

from broker.embedded import PigeonBroker
from tests.conftest import embedded_broker, tok_tokens
from tests.fuzz import TIMEOUT_S, examples, first_packet
from tests.mqtt_raw import connect_packet

CONNECT_TIMEOUT = 0.2
# a busy two-core machine, and a close that follows the timeout: the most a case may wait
CLOSED_WITHIN = CONNECT_TIMEOUT + 1.3


@pytest.fixture(scope="module")
def broker_port() -> Iterator[int]:
    """The embedded broker on a loop of its own thread: the test's sockets are plain, blocking ones."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-broker", daemon=True)
    thread.start()
    started: tuple[PigeonBroker, int] = asyncio.run_coroutine_threadsafe(
        embedded_broker(tok_tokens("u1"), connect_timeout=CONNECT_TIMEOUT), loop).result(30)
    broker, port = started
    try:
        yield port
    finally:
        asyncio.run_coroutine_threadsafe(broker.shutdown(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def outcome(port: int, data: bytes) -> str:
    """'closed' or 'connack' (the broker answered a CONNECT), or 'open' if neither came in time."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(data)
        except OSError:
            return "closed"  # closed while we were still sending
        deadline = time.monotonic() + CLOSED_WITHIN
        got = b""
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                break
            except OSError:
                return "closed"
            if not chunk:
                return "connack" if got[:1] == b"\x20" else "closed"
            got += chunk
            if got[:1] == b"\x20" and len(got) >= 4:
                return "connack"
        return "open"


@pytest.mark.timeout(TIMEOUT_S)
def test_broken_first_packets_are_closed_and_other_devices_undisturbed(broker_port: int) -> None:
    with socket.create_connection(("127.0.0.1", broker_port), timeout=5) as device:
        device.sendall(connect_packet("dev-a", "dev-a", "tok-dev-a", keepalive=600))
        assert device.recv(4) == b"\x20\x02\x00\x00"
        seen: dict[str, int] = {}

        @examples(400)
        @given(data=first_packet())
        def run(data: bytes) -> None:
            result = outcome(broker_port, data)
            seen[result] = seen.get(result, 0) + 1
            assert result != "open", f"still open after {CLOSED_WITHIN} s: {data[:80]!r}"
            device.sendall(b"\xc0\x00")  # PINGREQ: the connected device is still served
            assert device.recv(2) == b"\xd0\x00"

        run()
        print(f"first packets: {seen}")
        assert seen.get("closed", 0) > 0, seen
