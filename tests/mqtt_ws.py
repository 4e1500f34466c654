"""MQTT over a hand-made WebSocket (RFC 6455) on a raw socket, for tests that need frames no
WebSocket library would send: text frames, unmasked or reserved-bit frames, cut packets."""

from __future__ import annotations

import asyncio
import base64
import os
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
