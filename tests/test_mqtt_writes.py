"""The bridge's paho clients send every queued packet with one ``send`` (bridge/mqtt_writes.py),
and still put each byte on the wire once, in order, through partial sends and a full socket;
they and the SDK's send each write at once (no Nagle)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiomqtt
from paho.mqtt import client as paho

from bridge.mqtt_ingest import MqttIngest
from bridge.mqtt_reads import ReadBuffered
from bridge.mqtt_writes import coalesce_writes
from clients.sdk import Device, Profile
from tests.conftest import embedded_broker, tok_tokens

PUBLISH, PUBACK, DISCONNECT = 0x30, 0x40, 0xE0
USER, BRIDGE, SECRET = "u1", "pigeon-bridge", "bridge-secret"


class TightSocket:
    """Takes at most ``cap`` bytes per send, and is full (would block) on every third call."""

    def __init__(self, cap: int) -> None:
        self.cap, self.calls, self.wire = cap, 0, bytearray()

    def send(self, buf: bytes) -> int:
        self.calls += 1
        if self.calls % 3 == 0:
            raise BlockingIOError
        taken = bytes(buf[: self.cap])
        self.wire += taken
        return len(taken)

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        """paho closes its socket when the client is collected; nothing to close here (without
        it, that close raised while the collector ran inside pytest's AST parsing of a failure
        report, and CPython 3.11's AST constructor then failed the whole run: INTERNALERROR
        "AST constructor recursion depth mismatch")."""


def queued_client(sock: TightSocket) -> tuple[paho.Client, list[bytes], list[paho.MQTTMessageInfo]]:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2)
    client.on_socket_register_write = lambda *_: None  # as under aiomqtt: written when writable
    client._sock = sock  # type: ignore[assignment]
    coalesce_writes(client)
    packets, infos = [], []
    kinds = itertools.cycle([(PUBLISH | 0x02, 1), (PUBACK, 0), (PUBLISH, 0), (PUBLISH | 0x02, 1)])
    for mid in range(1, 41):
        command, qos = next(kinds)
        packet = bytes([command]) + bytes([mid]) * (3 + mid % 7)
        info = paho.MQTTMessageInfo(mid)
        client._packet_queue(command, packet, mid, qos, info)
        packets.append(packet)
        infos.append(info)
    return client, packets, infos


def write_all(client: paho.Client) -> None:
    for _ in range(10_000):
        if not client._out_packet:
            return
        client._packet_write()
    raise AssertionError("the queue never emptied")


def test_every_byte_goes_out_once_in_order_through_partial_sends_and_a_full_socket() -> None:
    for cap in (1, 5, 13, 64, 10_000):
        sock = TightSocket(cap)
        client, packets, infos = queued_client(sock)
        write_all(client)
        assert bytes(sock.wire) == b"".join(packets), cap
        # paho's own bookkeeping still runs for the packets it acts on once written
        assert all(i.is_published() for i, p in zip(infos, packets, strict=True) if p[0] == PUBLISH)


def test_queued_packets_leave_in_few_sends() -> None:
    sock = TightSocket(1 << 20)
    client, packets, infos = queued_client(sock)
    reported: list[int] = []
    client.on_publish = lambda _c, _u, mid, _reason, _props: reported.append(mid)
    write_all(client)
    # 40 packets, QoS 0 publishes among them, joined: one send, and a retry after the one
    # refused (without joining: 40 sends, and every third refused)
    assert sock.calls <= 2, sock.calls
    assert bytes(sock.wire) == b"".join(packets)
    # each QoS 0 publish is reported once written, as paho's own writer does
    qos0 = [mid for mid, p in enumerate(packets, start=1) if p[0] == PUBLISH]
    assert reported == qos0 and len(qos0) == 10
    assert all(infos[mid - 1].is_published() for mid in qos0)


def test_a_qos0_publish_is_reported_only_once_wholly_written() -> None:
    sock = TightSocket(7)  # every packet goes out in pieces
    client, packets, infos = queued_client(sock)
    reported: list[int] = []

    def on_publish(_c: object, _u: object, mid: int, _reason: object, _props: object) -> None:
        # by then every byte of that publish is on the wire
        end = sum(len(p) for p in packets[:mid])
        assert len(sock.wire) >= end, (mid, len(sock.wire), end)
        reported.append(mid)

    client.on_publish = on_publish
    write_all(client)
    assert reported == [mid for mid, p in enumerate(packets, start=1) if p[0] == PUBLISH]


@contextlib.asynccontextmanager
async def bridge_on_a_broker() -> AsyncIterator[tuple[MqttIngest, int]]:
    """The bridge's MQTT ingest (handling nothing) connected to an embedded broker on its own,
    whose devices are those of ``USER`` with the token ``tok-DEVICE``; and the broker's port."""
    broker, port = await embedded_broker(tok_tokens(USER), (BRIDGE, SECRET))

    async def ignore(topic: str, payload: bytes) -> None:
        return None

    ingest = MqttIngest("127.0.0.1", port, username=BRIDGE, password=SECRET, client_id=f"{BRIDGE}-w", handle=ignore)
    runner = asyncio.create_task(ingest.run())
    try:
        await ingest.wait_connected(5)
        yield ingest, port
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await broker.shutdown()


async def numbers_received(dev: aiomqtt.Client, count: int, timeout: float) -> list[int]:
    """The first ``count`` publishes ``dev`` receives, each a number."""
    got: list[int] = []
    async with asyncio.timeout(timeout):
        async for message in dev.messages:
            assert isinstance(message.payload, bytes)
            got.append(int(message.payload))
            if len(got) == count:
                break
    return got


def a_device(port: int, device: str = "d1") -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", port, identifier=device, username=device, password=f"tok-{device}")


async def test_a_burst_of_publishes_reaches_a_device_in_order_in_a_handful_of_sends() -> None:
    topic = f"down/{USER}/d1"
    async with bridge_on_a_broker() as (ingest, port), a_device(port) as dev:
        await dev.subscribe(topic, qos=1)
        assert ingest._client is not None
        out = ingest._client._client
        sends = 0
        send = out._sock_send

        def counted(buf: bytes) -> int:
            nonlocal sends
            sends += 1
            return send(buf)

        out._sock_send = counted  # type: ignore[method-assign]
        await ingest.publish_all([(topic, str(i).encode(), 1) for i in range(300)])
        assert await numbers_received(dev, 300, timeout=20) == list(range(300))
        # one per writable turn (more publishes are let out as acknowledgements come), not one per publish
        assert sends < 100, sends


def tcp_socket(client: paho.Client) -> socket.socket:
    sock = client.socket()
    if isinstance(sock, ReadBuffered):  # the bridge's read buffer (bridge/mqtt_reads.py)
        sock = sock._sock
    assert isinstance(sock, socket.socket), sock
    return sock


def nagle_off(client: paho.Client) -> bool:
    return tcp_socket(client).getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_the_bridge_and_the_sdk_write_to_the_broker_without_waiting_for_its_acks() -> None:
    # paho leaves Nagle's algorithm on: a write then waits for the broker's delayed ACK, up to
    # 40 ms, whenever the broker sends nothing back (QoS 0 publishes)
    async with bridge_on_a_broker() as (ingest, port):
        assert ingest._client is not None
        assert nagle_off(ingest._client._client)
        profile = Profile(http_url="http://127.0.0.1:9", user_id=USER, device_id="d1", token="tok-d1",
                          expires_at=0, mqtt_host="127.0.0.1", mqtt_port=port, ws_url="")
        async with Device(profile)._mqtt_client() as sdk, a_device(port, "d2") as plain:
            assert nagle_off(sdk._client)
            assert not nagle_off(plain._client)  # what the check tells apart


async def test_aiomqtt_s_own_qos0_publish_completes_through_the_joined_writer() -> None:
    # aiomqtt waits for on_publish of a QoS 0 publish that did not go out at once: the joined
    # writer must report it, as paho's own writer does, or the caller waits forever
    topic = f"down/{USER}/d1"
    async with bridge_on_a_broker() as (ingest, port), a_device(port) as dev:
        await dev.subscribe(topic, qos=0)
        assert ingest._client is not None
        async with asyncio.timeout(5):
            await asyncio.gather(*(ingest._client.publish(topic, str(i).encode(), qos=0) for i in range(50)))
        assert await numbers_received(dev, 50, timeout=10) == list(range(50))


@contextlib.contextmanager
def writers_watched() -> Iterator[list[int]]:
    """Every descriptor the running loop is asked to watch for writability, while inside."""
    loop = asyncio.get_running_loop()
    watched: list[int] = []
    own = loop.add_writer

    def add_writer(fd: Any, callback: Any, *args: Any) -> None:
        watched.append(fd if isinstance(fd, int) else fd.fileno())
        own(fd, callback, *args)

    loop.add_writer = add_writer  # type: ignore[method-assign]
    try:
        yield watched
    finally:
        del loop.add_writer  # type: ignore[method-assign]


async def test_the_bridge_writes_without_watching_a_socket_that_has_room() -> None:
    # aiomqtt's writer had the loop watch the socket (and stop) for every batch of publishes
    topic = f"down/{USER}/d1"
    async with bridge_on_a_broker() as (ingest, port), a_device(port) as dev:
        await dev.subscribe(topic, qos=1)
        assert ingest._client is not None
        bridge_fd = ingest._client._client.socket().fileno()
        with writers_watched() as watched:
            for i in range(0, 200, 20):
                await ingest.publish_all([(topic, str(n).encode(), 1) for n in range(i, i + 20)])
            assert await numbers_received(dev, 200, timeout=20) == list(range(200))
        assert bridge_fd not in watched
        assert watched, "the device (aiomqtt's own writer) watched its socket: what the check tells apart"


async def test_a_full_socket_is_written_once_it_drains_every_byte_in_order() -> None:
    topic = f"down/{USER}/d1"
    async with bridge_on_a_broker() as (ingest, port), a_device(port) as dev:
        await dev.subscribe(topic, qos=0)
        assert ingest._client is not None
        sock = tcp_socket(ingest._client._client)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the kernel's smallest: full at once
        pad = b" " * 2000
        with writers_watched() as watched:
            await ingest.publish_all([(topic, str(n).encode() + pad, 0) for n in range(300)])
            assert await numbers_received(dev, 300, timeout=20) == list(range(300))
        assert sock.fileno() in watched, "the socket never filled: the full-socket path went untested"
        assert asyncio.get_running_loop().remove_writer(sock.fileno()) is False  # no longer watched
