"""The bridge's paho clients read many packets per ``recv`` (bridge/mqtt_reads.py), and paho
still sees every packet once, in order, whatever the chunks the socket hands over."""

from __future__ import annotations

import random
import struct

import pytest
from paho.mqtt import client as paho
from paho.mqtt.enums import MQTTErrorCode

from bridge.mqtt_reads import buffered_reads


def publish(topic: str, payload: bytes, qos: int, mid: int) -> bytes:
    body = struct.pack("!H", len(topic)) + topic.encode() + (struct.pack("!H", mid) if qos else b"") + payload
    length, n = b"", len(body)
    while True:  # the remaining length, 7 bits a byte
        byte, n = n % 128, n // 128
        length += bytes([byte | (128 if n else 0)])
        if not n:
            break
    return bytes([0x30 | (qos << 1)]) + length + body


class ChunkSocket:
    """Hands over the stream in the given chunks, one per ``recv`` at most, then would block
    (or reports the end of the stream)."""

    def __init__(self, chunks: list[bytes], closed: bool = False) -> None:
        self.chunks, self.closed, self.calls = list(chunks), closed, 0

    def recv(self, bufsize: int) -> bytes:
        self.calls += 1
        if not self.chunks:
            if self.closed:
                return b""
            raise BlockingIOError
        chunk = self.chunks.pop(0)
        if len(chunk) > bufsize:
            self.chunks.insert(0, chunk[bufsize:])
            chunk = chunk[:bufsize]
        return chunk

    def fileno(self) -> int:
        return -1

    closed_by_paho = False

    def close(self) -> None:
        self.closed_by_paho = True


def reading_client(sock: ChunkSocket) -> tuple[paho.Client, list[tuple[str, bytes, int]]]:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2)
    client.on_socket_register_write = lambda *_: None
    client.manual_ack_set(True)  # as the bridge's sessions: nothing to write back here
    got: list[tuple[str, bytes, int]] = []
    client.on_message = lambda _c, _u, m: got.append((m.topic, m.payload, m.qos))
    client._sock = sock  # type: ignore[assignment]
    buffered_reads(client)
    return client, got


def stream(n: int) -> tuple[bytes, list[tuple[str, bytes, int]]]:
    rng = random.Random(n)
    sent, data = [], b""
    for i in range(n):
        topic, qos = f"up/u{i % 7}/d{i % 3}", i % 2
        payload = bytes(rng.randrange(256) for _ in range(rng.choice([0, 5, 120, 300, 3000])))
        data += publish(topic, payload, qos, i + 1)
        sent.append((topic, payload, qos))
    return data, sent


@pytest.mark.parametrize("cut", [1, 2, 3, 7, 64, 1000, 1 << 20])
def test_every_packet_is_read_once_in_order_whatever_the_chunks(cut: int) -> None:
    data, sent = stream(60)
    sock = ChunkSocket([data[i:i + cut] for i in range(0, len(data), cut)])
    client, got = reading_client(sock)
    for _ in range(100_000):  # each call as on a readable socket, until it would block
        assert client.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS
        if not sock.chunks:
            break
    assert got == sent


def test_packets_left_in_the_buffer_are_read_without_the_socket_saying_so() -> None:
    data, sent = stream(40)
    sock = ChunkSocket([data])  # all at once: one readable event, then nothing more arrives
    client, got = reading_client(sock)
    assert client.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS  # paho's own would read one packet
    assert got == sent
    # one read for the data, and the last (would block) with nothing buffered; paho alone: over 120
    assert sock.calls <= 3, sock.calls


def test_the_end_of_the_stream_is_still_the_end_of_the_connection() -> None:
    data, sent = stream(3)
    sock = ChunkSocket([data], closed=True)
    client, got = reading_client(sock)
    client.loop_read()
    assert got == sent
    client.loop_read()  # the end of the stream leaves the socket readable: the next event
    assert client._sock is None and sock.closed_by_paho  # paho closed it, as on its own reads


def test_what_is_left_of_an_old_connection_is_not_read_on_a_new_one() -> None:
    data, _ = stream(2)
    old = ChunkSocket([data + data[:5]])  # ends in the middle of a packet
    client, got = reading_client(old)
    client.loop_read()
    assert len(got) == 2
    client._in_packet = {"command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1,
                         "remaining_length": 0, "packet": bytearray(b""), "to_process": 0, "pos": 0}
    fresh, sent = stream(1)
    client._sock = ChunkSocket([fresh])  # type: ignore[assignment]  # as paho does on a reconnect
    got.clear()
    client.loop_read()
    assert got == sent
