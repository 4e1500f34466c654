"""The bridge's read buffer under paho (bridge/mqtt_reads.py): the packets of what one read got
are all taken in one wake-up, with paho's own packet reader, and nothing about the connection
changes."""

from __future__ import annotations

import socket
import ssl

import pytest
from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bridge.mqtt_reads import READ_CHUNK, ReadBuffered
from tests.mqtt_raw import publish_packet


def wake_up(client: paho.Client) -> None:
    """What aiomqtt does when the event loop finds the client's socket readable."""
    while True:
        client.loop_read()
        sock = client._sock
        if hasattr(sock, "pending") and sock.pending() > 0:
            continue
        break


def receiving_client(sock: object) -> tuple[paho.Client, list[bytes]]:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="session", protocol=paho.MQTTv311)
    got: list[bytes] = []
    client.on_message = lambda _c, _u, message: got.append(message.payload)
    client._sock = sock  # as if connected: paho reads the broker's packets from it
    return client, got


@pytest.mark.parametrize("buffered", [False, True], ids=["paho alone", "read buffer"])
def test_one_wake_up_reads_every_packet_of_what_it_read(buffered: bool) -> None:
    broker, bridge = socket.socketpair()
    bridge.setblocking(False)
    with broker, bridge:
        client, got = receiving_client(ReadBuffered(bridge) if buffered else bridge)
        broker.sendall(b"".join(publish_packet(f"up/u{i}/d", str(i).encode(), 0) for i in range(300)))
        wake_up(client)
        # paho alone reads one packet a wake-up (the rest waits for the loop's next turn)
        assert got == ([str(i).encode() for i in range(300)] if buffered else [b"0"])


def test_a_packet_cut_across_reads_and_one_larger_than_the_buffer_come_whole() -> None:
    broker, bridge = socket.socketpair()
    bridge.setblocking(False)
    with broker, bridge:
        client, got = receiving_client(ReadBuffered(bridge))
        big = bytes(range(256)) * (3 * READ_CHUNK // 256)
        first, second = publish_packet("up/u/d", b"small", 0), publish_packet("up/u/d", big, 0)
        broker.sendall(first + second[:10])
        wake_up(client)
        assert got == [b"small"]
        broker.sendall(second[10:])
        for _ in range(10):  # the big one takes a few wake-ups, as the kernel hands it over
            wake_up(client)
            if len(got) == 2:
                break
        assert got == [b"small", big]


def test_the_buffer_keeps_what_a_socket_says() -> None:
    broker, bridge = socket.socketpair()
    bridge.setblocking(False)
    with broker:
        sock = ReadBuffered(bridge)
        with pytest.raises(BlockingIOError):
            sock.recv(1)  # nothing yet: as the socket says
        broker.sendall(b"abcdef")
        assert sock.recv(1) == b"a" and sock.pending() == 5
        assert sock.recv(2) == b"bc" and sock.recv(10) == b"def" and sock.pending() == 0
        assert sock.fileno() == bridge.fileno()  # everything else is the socket's
        assert not isinstance(sock, ssl.SSLSocket) and sock.gettimeout() == 0.0
        broker.close()
        assert sock.recv(1) == b""  # the end of the connection
    sock.close()
    assert bridge.fileno() == -1
