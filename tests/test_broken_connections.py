"""Broken connections are closed (MQTT 3.1.1 section 4.8), and no one else notices.

A connection whose first packet is not a well-formed CONNECT is closed at once; one that sends
no CONNECT within the broker's connect timeout is closed then. Raw sockets, because no MQTT
library sends such things. The embedded broker runs alone here; the Mosquitto tests use the
one ``scripts/services`` started (skipped without it, failed under ``PIGEON_REQUIRE_SERVICES``).
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import shutil
import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trustme

from bridge.config import Settings
from bridge.errors import ConfigError
from clients.bench.mqtt import mqtt_str, varint
from clients.launch import ROOT, ServerProc
from clients.sdk import Device, PigeonClientError, Profile, login
from tests.conftest import (
    embedded_broker,
    free_port,
    fresh_phone,
    production_flags,
    production_url,
    tls11_client_or_skip,
    tok_tokens,
)
from tests.mqtt_raw import connect_packet, publish_packet, read_packet

USER = "u1"
PINGREQ, PINGRESP = b"\xc0\x00", b"\xd0\x00"


def _connect_with(flags: int, body_extra: bytes = b"", first: int = 0x10) -> bytes:
    var = mqtt_str("MQTT") + bytes([4, flags]) + struct.pack("!H", 60)
    body = var + mqtt_str("dev-x") + body_extra
    return bytes([first]) + varint(len(body)) + body


_rng = random.Random(1313)
BROKEN: dict[str, bytes] = {
    # not a CONNECT at all
    "random bytes": bytes(_rng.randrange(256) for _ in range(64)),
    "random bytes 2": bytes(_rng.randrange(256) for _ in range(7)),
    "publish before connect": publish_packet("up/u1/dev-x", b"{}", 1),
    "subscribe before connect": b"\x82\x08\x00\x01\x00\x03a/b\x01",
    "pingreq before connect": PINGREQ,
    "disconnect before connect": b"\xe0\x00",
    "http request": b"GET /mqtt HTTP/1.1\r\nHost: x\r\n\r\n",
    # impossible lengths
    "five-byte remaining length": b"\x10\xff\xff\xff\xff\x01",
    "announced 256 MiB": b"\x10\xff\xff\xff\x7f" + b"\x00" * 32,
    # a CONNECT with bad flags
    "connect with fixed-header flags": _connect_with(0x02, first=0x12),
    "connect with the reserved bit": _connect_with(0x03),
    "connect with will flag but no will": _connect_with(0x06),
    "connect with will QoS 3": _connect_with(0x1E, mqtt_str("w") + mqtt_str("x")),
    "connect with a password and no username": _connect_with(0x42, mqtt_str("pw")),
    "connect with a wrong protocol name": b"\x10\x0f\x00\x04MQTX\x04\x02\x00\x3c\x00\x03abc",
    "connect with bytes after its fields": _connect_with(0x02, b"\x00\x01\x02junk"),
    "connect cut short": b"\x10\x0a\x00\x04MQTT\x04\x02\x00\x3c",
}


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> float:
    """Seconds until the server closed the connection (everything it sent is read and dropped);
    fails the test if it is still open after ``timeout``."""
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(4096):
                pass
    except TimeoutError:
        pytest.fail(f"the connection was still open after {timeout} s")
    except ConnectionResetError:
        pass
    return time.monotonic() - started


async def send_and_wait_close(host: str, port: int, data: bytes, timeout: float,
                              tls: ssl.SSLContext | None = None) -> float:
    reader, writer = await asyncio.open_connection(host, port, ssl=tls)
    try:
        writer.write(data)
        await writer.drain()
        return await closed_within(reader, timeout)
    finally:
        writer.close()


@pytest.fixture
async def broker() -> AsyncIterator[int]:
    b, port = await embedded_broker(tok_tokens(USER), connect_timeout=1.0)
    try:
        yield port
    finally:
        await b.shutdown()


async def connected_device(port: int, device: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(connect_packet(device, device, f"tok-{device}", keepalive=60))
    await writer.drain()
    first, body = await read_packet(reader)
    assert first == 0x20 and body[1] == 0, (first, body)
    return reader, writer


async def still_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(PINGREQ)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(2), 5) == PINGRESP


@pytest.mark.parametrize("name", list(BROKEN))
async def test_a_broken_first_packet_is_closed_at_once(broker: int, name: str) -> None:
    assert await send_and_wait_close("127.0.0.1", broker, BROKEN[name], timeout=0.5) < 0.5


async def test_no_connect_within_the_timeout_is_closed(broker: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", broker)
    try:
        elapsed = await closed_within(reader, timeout=5)
    finally:
        writer.close()
    assert 0.8 < elapsed < 2.0  # the fixture's broker waits 1 s


async def test_a_connect_trickling_in_is_closed_at_the_timeout(broker: int) -> None:
    packet = connect_packet("dev-slow", "dev-slow", "tok-dev-slow")
    reader, writer = await asyncio.open_connection("127.0.0.1", broker)

    async def trickle() -> None:  # one byte every 0.15 s: the whole CONNECT never arrives in 1 s
        try:
            for byte in packet:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.15)
        except ConnectionError:
            pass  # closed by the broker: what the test waits for

    sender = asyncio.create_task(trickle())
    try:
        elapsed = await closed_within(reader, timeout=5)
    finally:
        sender.cancel()
        writer.close()
    assert 0.8 < elapsed < 2.0


async def test_a_slow_but_timely_connect_is_accepted(broker: int) -> None:
    packet = connect_packet("dev-slow", "dev-slow", "tok-dev-slow")
    reader, writer = await asyncio.open_connection("127.0.0.1", broker)
    try:
        await asyncio.sleep(0.5)
        writer.write(packet)
        await writer.drain()
        first, body = await read_packet(reader)
        assert first == 0x20 and body[1] == 0
        await still_answers(reader, writer)
    finally:
        writer.close()


async def test_broken_connections_do_not_disturb_connected_devices(broker: int) -> None:
    reader, writer = await connected_device(broker, "dev-a")
    try:
        closed = await asyncio.gather(*(
            send_and_wait_close("127.0.0.1", broker, data, timeout=2.0) for data in list(BROKEN.values()) * 5
        ))
        assert len(closed) == 5 * len(BROKEN)
        await still_answers(reader, writer)
        other = await connected_device(broker, "dev-b")
        await still_answers(*other)
        other[1].close()
    finally:
        writer.close()


def test_the_connect_timeout_setting_is_checked() -> None:
    assert Settings().connect_timeout_s == 10.0
    for bad in (0.0, -1.0, 4000.0):
        with pytest.raises(ConfigError, match="connect_timeout_s"):
            Settings(connect_timeout_s=bad, secret=b"x" * 32).validated()


# -- Mosquitto (the production profile's broker) ------------------------------------------------
@pytest.fixture
def mosquitto() -> tuple[str, int, str, str]:
    url = urlsplit(production_url("PIGEON_BROKER", "mqtt://"))
    creds = Path(production_url("PIGEON_BROKER_CREDENTIALS_FILE", "/")).read_text().strip()
    user, _, password = creds.partition(":")
    assert url.hostname is not None and url.port is not None
    return url.hostname, url.port, user, password


# Which Mosquitto scripts/services started: Debian's 2.0.11, or a release it built
# (SERVICES_MOSQUITTO=2.1.2). With the max_packet_size scripts/services sets, Mosquitto 2.0.11
# closes 16 of these at once; it waits for the body of "random bytes 2", which happens to start with
# a CONNECT byte and a 940 kB length (up to 1.5 x its default keepalive of 60 s): that one is
# checked on the embedded broker only. 2.1 closes all 17 at once (it limits a CONNECT's size).
MOSQUITTO_VERSION = os.environ.get("SERVICES_MOSQUITTO_VERSION", "2.0.11")
MOSQUITTO_21 = MOSQUITTO_VERSION.startswith("2.1.")
MOSQUITTO_HOLDS = set() if MOSQUITTO_21 else {"random bytes 2"}
MOSQUITTO_CLOSES_AT_ONCE = [n for n in BROKEN if n not in MOSQUITTO_HOLDS]
# A connection that sends nothing is closed by Mosquitto's keepalive check only: 1.5 x a keepalive
# of 20 s on 2.1 (checked every second), of 60 s on 2.0.11 (checked every 5 s: about 95 s, too long
# for the suite). No release has a setting for it (RELIABILITY.md).
MOSQUITTO_21_SILENT_S = 1.5 * 20


@pytest.mark.parametrize("name", MOSQUITTO_CLOSES_AT_ONCE)
async def test_mosquitto_closes_a_broken_first_packet_at_once(mosquitto: tuple[str, int, str, str], name: str) -> None:
    host, port, _, _ = mosquitto
    assert await send_and_wait_close(host, port, BROKEN[name], timeout=1.0) < 1.0


async def test_mosquitto_broken_connections_do_not_disturb_a_connected_client(
    mosquitto: tuple[str, int, str, str],
) -> None:
    host, port, user, password = mosquitto
    await undisturbed_by(host, port, user, password, MOSQUITTO_CLOSES_AT_ONCE)


async def undisturbed_by(host: str, port: int, user: str, password: str, names: list[str]) -> None:
    """A client connected to ``host:port`` as ``user`` still gets its PINGRESP after the broken
    first packets ``names``, three of each at once, were sent and closed beside it."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(connect_packet(f"test-{secrets.token_hex(4)}", user, password, keepalive=60))
        await writer.drain()
        first, body = await read_packet(reader)
        assert first == 0x20 and body[1] == 0
        await asyncio.gather(*(send_and_wait_close(host, port, BROKEN[name], timeout=2.0) for name in names * 3))
        await still_answers(reader, writer)
    finally:
        writer.close()


@pytest.mark.skipif(not MOSQUITTO_21, reason=f"Mosquitto {MOSQUITTO_VERSION} holds a silent connection ~95 s")
@pytest.mark.timeout(120)
async def test_mosquitto_21_closes_a_silent_connection_after_30_s(mosquitto: tuple[str, int, str, str]) -> None:
    """Not the 10 s the embedded broker keeps: Mosquitto has no setting for it (RELIABILITY.md)."""
    host, port, _, _ = mosquitto
    reader, writer = await asyncio.open_connection(host, port)
    try:
        closed = await closed_within(reader, MOSQUITTO_21_SILENT_S + 5)
    finally:
        writer.close()
    # its check compares whole seconds: between 30 and 31 s, and a little for a busy machine
    assert MOSQUITTO_21_SILENT_S - 1.0 <= closed <= MOSQUITTO_21_SILENT_S + 2.5, closed


# -- HAProxy in front of Mosquitto (scripts/mqtt-front.cfg) ------------------------------------------
# First the file itself, with a connect timeout of 1 s, in front of a listener that records what
# reaches it; then the front scripts/services runs before its Mosquitto (PIGEON_BROKER_FRONT).
FRONT_CFG = ROOT / "scripts" / "mqtt-front.cfg"
FRONT_TIMEOUT_S = float(os.environ.get("SERVICES_CONNECT_TIMEOUT_S", "10"))
# These two start with a CONNECT's first byte and announce more bytes than they send: the front
# waits for the rest as for any CONNECT, and closes them at its connect timeout.
FRONT_WAITS = {"random bytes 2", "announced 256 MiB"}
# HAProxy's parser does not check these rules of a CONNECT: they reach Mosquitto, which closes
# them at once (test_mosquitto_closes_a_broken_first_packet_at_once).
FRONT_PASSES = {"connect with will QoS 3", "connect with a password and no username"}
CONNACK = b"\x20\x02\x00\x00"
FRONT_REFUSES = {**{n: BROKEN[n] for n in BROKEN if n not in FRONT_WAITS | FRONT_PASSES},
                 "connack first": CONNACK}  # a valid MQTT packet, but not a CONNECT


@dataclass
class Front:
    port: int
    reached: list[bytearray]  # one per connection that reached the broker's side: what came on it
    tls_port: int  # the same checks behind TLS, which the front ends with a certificate of ``ca``
    ca: trustme.CA

    def trusting(self, ca: trustme.CA | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        (ca or self.ca).configure_trust(context)
        return context


@pytest.fixture
async def front_alone(tmp_path: Path) -> AsyncIterator[Front]:
    """HAProxy with scripts/mqtt-front.cfg and a connect timeout of 1 s, in front of a listener that
    answers a CONNECT with a CONNACK and a PINGREQ with a PINGRESP, and records what reached it;
    plain, and behind TLS with a certificate of a throwaway CA."""
    haproxy = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/local/sbin:/usr/sbin:/sbin")
    if haproxy is None:
        production_url("PIGEON_BROKER_FRONT", "mqtt://")  # fails under PIGEON_REQUIRE_SERVICES
        pytest.skip("no haproxy (scripts/services installs it)")
    reached: list[bytearray] = []

    async def broker_side(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        reached.append(got)
        try:
            while data := await reader.read(4096):
                writer.write((CONNACK if not got and data[0] == 0x10 else b"") + PINGRESP * data.count(PINGREQ))
                got += data
        finally:
            writer.close()

    listener = await asyncio.start_server(broker_side, "127.0.0.1", 0)
    port, tls_port = free_port(), free_port()
    ca = trustme.CA()
    pem = tmp_path / "front.pem"
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    env = {**os.environ, "PIGEON_FRONT_BIND": f"127.0.0.1:{port}",
           "PIGEON_FRONT_BROKER": f"127.0.0.1:{listener.sockets[0].getsockname()[1]}",
           "PIGEON_FRONT_CONNECT_TIMEOUT": "1s", "PIGEON_FRONT_IDLE_TIMEOUT": "1m",
           "PIGEON_FRONT_TLS_BIND": f"127.0.0.1:{tls_port}", "PIGEON_FRONT_TLS_CERT": str(pem)}
    proc = await asyncio.create_subprocess_exec(haproxy, "-db", "-f", str(FRONT_CFG), env=env,
                                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            if proc.returncode is not None:
                assert proc.stderr is not None
                pytest.fail(f"haproxy exited: {(await proc.stderr.read()).decode(errors='replace')}")
            try:
                (await asyncio.open_connection("127.0.0.1", port))[1].close()  # silent: closed at 1 s
                (await asyncio.open_connection("127.0.0.1", tls_port))[1].close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.05)
        reached.clear()
        yield Front(port, reached, tls_port, ca)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
        listener.close()


@pytest.mark.parametrize("name", list(FRONT_REFUSES))
async def test_the_front_refuses_a_broken_first_packet_at_once_and_passes_nothing_on(front_alone: Front,
                                                                                    name: str) -> None:
    assert await send_and_wait_close("127.0.0.1", front_alone.port, FRONT_REFUSES[name], timeout=1.0) < 0.5
    await asyncio.sleep(0.1)
    assert front_alone.reached == []


@pytest.mark.parametrize("name", sorted(FRONT_PASSES))
async def test_what_haproxy_does_not_check_reaches_the_broker(front_alone: Front, name: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", front_alone.port)
    try:
        writer.write(BROKEN[name])
        assert await asyncio.wait_for(reader.readexactly(4), 5) == CONNACK  # the listener's answer
        assert front_alone.reached == [bytearray(BROKEN[name])]
    finally:
        writer.close()


Trickle = tuple[asyncio.StreamReader, asyncio.StreamWriter, "asyncio.Task[None]"]


async def trickled(host: str, port: int, packet: bytes, every_s: float, tls: ssl.SSLContext | None = None) -> Trickle:
    """A connection that sends ``packet`` one byte every ``every_s`` seconds."""
    reader, writer = await asyncio.open_connection(host, port, ssl=tls)

    async def trickle() -> None:
        try:
            for byte in packet:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(every_s)
        except ConnectionError:
            pass  # closed by the front: what the test waits for

    return reader, writer, asyncio.create_task(trickle())


async def closed_at_the_timeout_and_timely_let_through(host: str, port: int, timeout: float,
                                                       user: str, password: str,
                                                       tls: ssl.SSLContext | None = None) -> None:
    """Silent, a CONNECT trickling in too slowly, and the two that announce more than they send:
    all closed at the front's connect timeout; a CONNECT that trickles in within a third of it
    is let through, and its connection then works. With ``tls``, all of it inside TLS, and a
    connection that never starts its handshake is closed at the timeout too."""
    good = connect_packet(f"test-{secrets.token_hex(4)}", user, password, keepalive=60)
    opened: list[Trickle] = []
    waiting: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        opened.append(slow := await trickled(host, port, connect_packet("dev-slow", user, password),
                                             2 * timeout / len(good), tls))
        opened.append(timely := await trickled(host, port, good, timeout / 3 / len(good), tls))
        waiting += [slow[:2], await asyncio.open_connection(host, port, ssl=tls)]
        if tls is not None:
            waiting.append(await asyncio.open_connection(host, port))  # no handshake at all
        for name in sorted(FRONT_WAITS):
            waiting.append(await asyncio.open_connection(host, port, ssl=tls))
            waiting[-1][1].write(BROKEN[name])
        closed = await asyncio.gather(*(closed_within(reader, timeout + 5) for reader, _ in waiting))
        assert all(timeout - 0.5 < t < timeout + 2.0 for t in closed), closed
        first, body = await read_packet(timely[0])
        assert first == 0x20 and body[1] == 0, (first, body)
        await still_answers(*timely[:2])
    finally:
        for task in opened:
            task[2].cancel()
        for _, writer in [*waiting, *(t[:2] for t in opened)]:
            writer.close()


async def test_the_front_closes_what_sent_no_whole_connect_at_its_timeout(front_alone: Front) -> None:
    await closed_at_the_timeout_and_timely_let_through("127.0.0.1", front_alone.port, 1.0, "u", "p")
    assert len(front_alone.reached) == 1 and front_alone.reached[0].startswith(connect_packet(
        "x", "u", "p", keepalive=60)[:1])
    assert front_alone.reached[0].endswith(PINGREQ)  # the timely one, whole, and what came after it


@pytest.mark.parametrize("name", list(FRONT_REFUSES))
async def test_the_tls_front_refuses_a_broken_first_packet_at_once_and_passes_nothing_on(front_alone: Front,
                                                                                        name: str) -> None:
    assert await send_and_wait_close("127.0.0.1", front_alone.tls_port, FRONT_REFUSES[name], timeout=1.0,
                                     tls=front_alone.trusting()) < 0.5
    await asyncio.sleep(0.1)
    assert front_alone.reached == []


async def test_the_tls_front_closes_what_sent_no_whole_connect_at_its_timeout(front_alone: Front) -> None:
    await closed_at_the_timeout_and_timely_let_through("127.0.0.1", front_alone.tls_port, 1.0, "u", "p",
                                                       front_alone.trusting())
    # what reached the broker's side is the timely CONNECT, whole and in the clear, and what followed
    assert len(front_alone.reached) == 1 and front_alone.reached[0].startswith(connect_packet(
        "x", "u", "p", keepalive=60)[:1])
    assert front_alone.reached[0].endswith(PINGREQ)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_a_device_connected_through_the_front_may_stay_silent_past_the_connect_timeout(
    front_alone: Front, tls: bool,
) -> None:
    """The connect timeout bounds the wait for the CONNECT only: a device idle for longer once
    connected (up to 1.5 x its keepalive, which Mosquitto enforces) is left alone."""
    port = front_alone.tls_port if tls else front_alone.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=front_alone.trusting() if tls else None)
    try:
        writer.write(connect_packet("dev-idle", "u", "p", keepalive=60))
        assert await asyncio.wait_for(reader.readexactly(4), 5) == CONNACK
        await asyncio.sleep(2.5)  # 2.5 x the front's connect timeout
        await still_answers(reader, writer)
    finally:
        writer.close()


async def test_the_tls_front_refuses_plaintext_old_tls_and_clients_trusting_another_ca(front_alone: Front) -> None:
    """None of these gets a connection to the broker's side: plain MQTT on the TLS port, TLS 1.1,
    and a client that does not trust the front's certificate."""
    assert await send_and_wait_close("127.0.0.1", front_alone.tls_port, connect_packet("dev-plain", "u", "p"),
                                     timeout=2.0) < 0.5
    cert = front_alone.ca.issue_cert("127.0.0.1")
    old = await tls11_client_or_skip(front_alone.ca.configure_trust, cert.configure_cert)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.open_connection("127.0.0.1", front_alone.tls_port, ssl=old)
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection("127.0.0.1", front_alone.tls_port, ssl=front_alone.trusting(trustme.CA()))
    await asyncio.sleep(0.1)
    assert front_alone.reached == []


@pytest.fixture
def front() -> tuple[str, int]:
    url = urlsplit(production_url("PIGEON_BROKER_FRONT", "mqtt://"))
    assert url.hostname is not None and url.port is not None
    return url.hostname, url.port


@pytest.mark.timeout(max(60.0, 3 * FRONT_TIMEOUT_S + 15))
async def test_the_services_front_closes_at_its_timeout_what_mosquitto_keeps(
    front: tuple[str, int], mosquitto: tuple[str, int, str, str],
) -> None:
    """The same at the connect timeout scripts/services gave its front (10 s unless set), with
    Mosquitto behind it (the bridge's account, as above), which alone holds such connections."""
    _, _, user, password = mosquitto
    await closed_at_the_timeout_and_timely_let_through(*front, FRONT_TIMEOUT_S, user, password)


async def test_through_the_front_broken_connections_do_not_disturb_a_connected_client(
    front: tuple[str, int], mosquitto: tuple[str, int, str, str],
) -> None:
    _, _, user, password = mosquitto
    await undisturbed_by(*front, user, password, [n for n in BROKEN if n not in FRONT_WAITS])


async def talk_both_ways(connect: Callable[..., Awaitable[Device]], a: Profile, b: Profile, what: str) -> None:
    """``a`` over MQTT 3.1.1 and ``b`` over MQTT 5 send each other a message, each received live."""
    dev_a, dev_b = await connect(a), await connect(b, mqtt5=True)
    for sender, receiver, peer in ((dev_a, dev_b, b), (dev_b, dev_a, a)):
        body = f"{what} to {peer.device_id}"
        sent = await sender.send(body, to=peer.user_id)
        async with asyncio.timeout(10):
            while (event := await receiver.next_event(timeout=10)).get("body") != body:
                pass
        assert event["seq"] == sent["seq"]


async def test_devices_log_in_send_and_receive_through_the_front(
    tmp_path: Path, front: tuple[str, int], connect: Callable[..., Awaitable[Device]],
) -> None:
    """The server names the front at login (the broker URL's public=), and the devices' whole
    conversation goes through it, over MQTT 3.1.1 and over MQTT 5."""
    host, port = front
    broker = production_url("PIGEON_BROKER", "mqtt://")
    srv = ServerProc.start(tmp_path / "srv", *production_flags(), "--broker", f"{broker}?public={host}:{port}",
                           "--broker-credentials-file", production_url("PIGEON_BROKER_CREDENTIALS_FILE", "/"))
    try:
        a = await login(srv.http, fresh_phone(), device_name="a")
        b = await login(srv.http, fresh_phone(), device_name="b")
        assert (a.mqtt_host, a.mqtt_port) == (host, port)
        await talk_both_ways(connect, a, b, "through the front")
    finally:
        srv.stop()


async def test_devices_log_in_send_and_receive_through_the_tls_front(
    tmp_path: Path, connect: Callable[..., Awaitable[Device]],
) -> None:
    """The services' front also ends TLS (Mosquitto's certificate): login names it, and devices
    trusting the CA talk through it over MQTT 3.1.1 and 5; one trusting another CA is refused."""
    url = production_url("PIGEON_BROKER_FRONT_TLS", "mqtts://")
    ca_file = production_url("PIGEON_BROKER_TLS_CA_FILE", "/")
    front = urlsplit(url)
    broker = production_url("PIGEON_BROKER", "mqtt://")
    srv = ServerProc.start(tmp_path / "srv", *production_flags(), "--broker", f"{broker}?public={url}",
                           "--broker-credentials-file", production_url("PIGEON_BROKER_CREDENTIALS_FILE", "/"))
    try:
        a = await login(srv.http, fresh_phone(), device_name="a", ca_file=ca_file)
        b = await login(srv.http, fresh_phone(), device_name="b", ca_file=ca_file)
        assert a.mqtt_tls and (a.mqtt_host, a.mqtt_port) == (front.hostname, front.port)
        await talk_both_ways(connect, a, b, "through the tls front")
        other = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other))
        with pytest.raises(PigeonClientError) as refused:
            await connect(replace(a, ca_file=str(other)))
        assert refused.value.code == "connect_refused"
    finally:
        srv.stop()
