"""One ``recv`` for many incoming packets of a paho client, instead of three or more per packet.

paho reads a packet's first byte with one ``recv(1)``, each byte of its remaining length with
another, then its body: at least three system calls per packet, and a PUBACK (4 bytes) costs as
many as a publish. A profile of the bridge at half of full speed on the production profile had
15 % of its CPU in paho's packet reader. :func:`buffered_reads` gives the client a reader that
takes what the socket holds (up to ``RECV_SIZE``) in one call and hands paho its small reads out
of that, and makes ``loop_read`` go on while bytes are left over: the socket no longer shows them
as readable, so nothing else would come back for them.

A read that finds nothing buffered goes to paho's own ``_sock_recv``, so its end of stream
(``b""``), its errors and its TLS cases (want-read, want-write) stay as they were. What is left
over belongs to the connection it came from and is dropped when paho opens another socket.
"""

from __future__ import annotations

from typing import Any

from paho.mqtt import client as paho
from paho.mqtt.enums import MQTTErrorCode

RECV_SIZE = 65536


def buffered_reads(client: paho.Client) -> None:
    """Make ``client`` read its socket ``RECV_SIZE`` bytes at a time (see the module's docstring)."""
    own_recv = client._sock_recv
    own_loop_read = client.loop_read
    state: dict[str, Any] = {"buf": b"", "pos": 0, "sock": None}

    def sock_recv(bufsize: int) -> bytes:
        buf, pos = state["buf"], state["pos"]
        if state["sock"] is not client._sock:  # a new connection: nothing of the old one counts
            buf, pos, state["sock"] = b"", 0, client._sock
        if pos >= len(buf):
            buf = own_recv(RECV_SIZE)  # raises BlockingIOError when there is nothing; b"": closed
            if not buf:
                state["buf"], state["pos"] = b"", 0
                return buf
            pos = 0
        end = pos + bufsize
        piece: bytes = buf[pos:end]
        state["buf"], state["pos"] = buf, min(end, len(buf))
        return piece

    def left_over() -> bool:
        return state["sock"] is client._sock and state["pos"] < len(state["buf"])

    def loop_read(max_packets: int = 1) -> MQTTErrorCode:
        while True:
            rc = own_loop_read(max_packets)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or not left_over():
                return rc

    client._sock_recv = sock_recv  # type: ignore[method-assign]
    client.loop_read = loop_read  # type: ignore[method-assign]
