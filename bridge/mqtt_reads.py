"""Many packets read per wake-up of a paho client's socket, instead of one.

Under aiomqtt, paho reads when the event loop finds the socket readable, and then reads *one*
packet (``loop_read`` reads as many as the client has QoS 1 and 2 publishes of its own in
flight, at least one; a session that only receives has none), in three or four ``recv`` calls
(the packet's first byte, its length a byte at a time, then its body). The rest waits for the
loop's next turn. A busy bridge's turn takes milliseconds (hundreds of requests' callbacks), so
each receiving session was read at one packet per turn whatever it held: during a flood the
sessions with the most devices fell seconds behind in the kernel's socket buffer and in the
broker, and their devices' sends were refused as too old long after the flood had ended
(BENCHMARKS.md, 2026-12-02).

:func:`buffered_reads` gives a client's socket a read buffer: one ``recv`` of up to
``READ_CHUNK`` bytes, from which paho's small reads are served, and a ``pending()`` that counts
what the buffer still holds. aiomqtt's reader keeps calling paho while the socket reports data
pending (it does so for TLS sockets, whose records hold decrypted bytes the kernel no longer
shows), so one wake-up reads every packet of that chunk (and on into the next chunk when a
packet runs past its end), and what is left in the socket is read at the next turn. The chunk
is small, so that a turn of the loop with every session readable stays short (a login's steps
wait for the next turn each). Only reads change: writes, TLS, closing and everything else go
to the socket itself.
"""

from __future__ import annotations

from typing import Any

from paho.mqtt import client as paho

# At most this much is read per wake-up: about 40 of the devices' publishes, so that one
# wake-up of each of a bridge's sessions stays about a millisecond of parsing.
READ_CHUNK = 4 * 1024


class ReadBuffered:
    """A socket (plain, TLS, or paho's WebSocket wrapper) whose ``recv`` is served from a buffer
    filled by one larger ``recv``."""

    __slots__ = ("_buf", "_pos", "_sock")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, size: int) -> bytes:
        if self._pos >= len(self._buf):
            data: bytes = self._sock.recv(max(size, READ_CHUNK))  # BlockingIOError, SSLWantReadError: as before
            if len(data) <= size:
                self._buf, self._pos = b"", 0
                return data  # b"" is the end of the connection, as before
            self._buf, self._pos = data, 0
        start = self._pos
        self._pos = min(start + size, len(self._buf))
        return self._buf[start:self._pos]

    def pending(self) -> int:
        """Bytes already read and not yet handed to paho, and what the socket itself holds
        decoded (a TLS socket)."""
        inner = getattr(self._sock, "pending", None)
        return len(self._buf) - self._pos + (inner() if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def buffered_reads(client: paho.Client) -> None:
    """Give every socket ``client`` opens a read buffer (the module's docstring). Call it before
    the client connects, after aiomqtt has set its ``on_socket_open`` (or :func:`no_delay`'s)."""
    opened = client.on_socket_open

    def on_socket_open(c: paho.Client, userdata: Any, sock: Any) -> None:
        wrapped = ReadBuffered(sock)
        c._sock = wrapped  # paho reads through ``_sock`` from now on
        if opened is not None:
            opened(c, userdata, wrapped)

    client.on_socket_open = on_socket_open
