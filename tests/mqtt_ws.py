"""MQTT over a hand-made WebSocket (RFC 6455) on a raw socket, for tests that need frames no
WebSocket library would send: text frames, unmasked or reserved-bit frames, cut packets."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct

BINARY, TEXT, CLOSE, PING = 0x2, 0x1, 0x8, 0x9


def ws_frame(payload: bytes, opcode: int = BINARY, *, fin: bool = True, masked: bool = True, rsv: int = 0) -> bytes:
    """One client frame (masked, as RFC 6455 section 5.3 requires of a client, unless told not)."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def ws_open(host: str, port: int, path: str = "/mqtt") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket with the ``mqtt`` subprotocol, opened by hand; returns once the server upgraded it."""
    reader, writer = await asyncio.open_connection(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n")
                 .encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def ws_read_frame(reader: asyncio.StreamReader, timeout: float = 5.0) -> tuple[int, bytes]:
    """One (unmasked) server frame: its opcode and payload."""
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), timeout)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    return b0 & 0x0F, await reader.readexactly(n)


async def ws_closed_within(reader: asyncio.StreamReader, timeout: float) -> float | None:
    """Seconds until the server closed the WebSocket (a close frame, or the end of the TCP
    stream), reading and dropping any other frame; None if it is still open after ``timeout``."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(timeout):
            while True:
                opcode, _ = await ws_read_frame(reader, timeout)
                if opcode == CLOSE:
                    break
    except TimeoutError:
        return None
    except (asyncio.IncompleteReadError, ConnectionResetError):
        pass
    return loop.time() - started


class BlockingWs:
    """MQTT over a WebSocket on a plain blocking socket, shaped like one for the fuzz tests:
    ``sendall`` sends its bytes in one sound (masked, binary) frame, ``recv`` returns MQTT bytes
    from the server's binary frames (b"" once the server closed the WebSocket or the socket),
    and ``settimeout`` bounds each wait (TimeoutError, with no bytes lost)."""

    def __init__(self, host: str, port: int, timeout: float = 5.0, path: str = "/mqtt") -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self._sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                            f"Sec-WebSocket-Protocol: mqtt\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self._sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"the WebSocket upgrade was not answered: {head!r}")
            head += chunk
        head, _, self._raw = head.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"the WebSocket upgrade was refused: {head!r}")
        self._data = bytearray()
        self._closed = False

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(ws_frame(data))

    def recv(self, n: int) -> bytes:
        while not self._data and not self._closed:
            if not self._take_frame():
                chunk = self._sock.recv(65536)  # raises TimeoutError, keeping what came in self._raw
                if not chunk:
                    self._closed = True
                self._raw += chunk
        out = bytes(self._data[:n])
        del self._data[:n]
        return out

    def _take_frame(self) -> bool:
        """Take one whole server frame from what has come; False if none is whole yet."""
        raw = self._raw
        if len(raw) < 2:
            return False
        n, at = raw[1] & 0x7F, 2
        if n == 126:
            if len(raw) < 4:
                return False
            (n,), at = struct.unpack_from("!H", raw, 2), 4
        elif n == 127:
            if len(raw) < 10:
                return False
            (n,), at = struct.unpack_from("!Q", raw, 2), 10
        if len(raw) < at + n:
            return False
        opcode, payload, self._raw = raw[0] & 0x0F, raw[at:at + n], raw[at + n:]
        if opcode == CLOSE:
            self._closed = True
        elif opcode in (BINARY, 0):
            self._data += payload
        return True  # a ping or pong is read and dropped

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> BlockingWs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
