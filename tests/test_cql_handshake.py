"""The store's own Cassandra connection logging in (storage/cql_wire.CqlWire.open), against a
loopback server that speaks the native protocol's handshake frames (v4 framing: a 9-byte header,
then the body) and answers as the test says. It stands in for answers a real Cassandra with a
password authenticator does not give (AUTH_CHALLENGE); the real one is tested in
tests/test_storage_contract.py. Each case checks the connection is closed when it fails."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable

import pytest

from storage.cql_wire import (
    OP_AUTH_CHALLENGE,
    OP_AUTH_RESPONSE,
    OP_AUTH_SUCCESS,
    OP_AUTHENTICATE,
    OP_ERROR,
    OP_STARTUP,
    CqlError,
    CqlWire,
    WireUnsupported,
)

HEADER = struct.Struct(">BBhBi")


def frame(stream: int, op: int, body: bytes) -> bytes:
    return HEADER.pack(0x84, 0, stream, op, len(body)) + body


class Handshake:
    """Answers STARTUP with AUTHENTICATE, and AUTH_RESPONSE with ``answer``(token); records the
    tokens it got and whether the client closed the connection."""

    def __init__(self, answer: Callable[[bytes], tuple[int, bytes]]) -> None:
        self.answer = answer
        self.tokens: list[bytes] = []
        self.closed = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                _v, _f, stream, op, length = HEADER.unpack(await reader.readexactly(9))
                body = await reader.readexactly(length)
                if op == OP_STARTUP:
                    authenticator = b"org.apache.cassandra.auth.PasswordAuthenticator"
                    writer.write(frame(stream, OP_AUTHENTICATE, struct.pack(">H", len(authenticator)) + authenticator))
                elif op == OP_AUTH_RESPONSE:
                    (n,) = struct.unpack_from(">i", body)
                    self.tokens.append(body[4:4 + n])
                    writer.write(frame(stream, *self.answer(body[4:4 + n])))
                await writer.drain()
        except asyncio.IncompleteReadError:
            self.closed.set()
        finally:
            writer.close()


@pytest.fixture
async def listening() -> AsyncIterator[Callable[[Handshake], asyncio.Future[int]]]:
    servers: list[asyncio.Server] = []

    def start(h: Handshake) -> asyncio.Future[int]:
        async def go() -> int:
            server = await asyncio.start_server(h.serve, "127.0.0.1", 0)
            servers.append(server)
            return int(server.sockets[0].getsockname()[1])
        return asyncio.ensure_future(go())

    yield start
    for server in servers:
        server.close()


def open_wire(port: int, credentials: tuple[str, str] | None) -> asyncio.Future[CqlWire]:
    return asyncio.ensure_future(CqlWire.open("127.0.0.1", port, object(), lambda: 0, lambda wire: None,
                                              timeout=2, credentials=credentials))


async def test_the_login_is_a_sasl_plain_token_and_success_opens_the_connection(listening: Callable) -> None:
    h = Handshake(lambda token: (OP_AUTH_SUCCESS, struct.pack(">i", -1)))
    wire = await open_wire(await listening(h), ("pigeon", "pässword"))
    assert h.tokens == [b"\x00pigeon\x00p\xc3\xa4ssword"]
    assert wire.usable
    wire.close()


@pytest.mark.parametrize(("answer", "raised"), [
    ((OP_AUTH_CHALLENGE, struct.pack(">i", 4) + b"more"), WireUnsupported),  # a mechanism asking more
    ((OP_ERROR, struct.pack(">i", 0x0100) + struct.pack(">H", 15) + b"Bad credentials"), CqlError),
])
async def test_a_login_not_taken_fails_and_closes_the_connection(
        listening: Callable, answer: tuple[int, bytes], raised: type[Exception]) -> None:
    h = Handshake(lambda token: answer)
    with pytest.raises(raised) as err:
        await open_wire(await listening(h), ("pigeon", "secret-word"))
    assert "secret-word" not in str(err.value)
    if isinstance(err.value, CqlError):
        assert err.value.code == 0x0100
    await asyncio.wait_for(h.closed.wait(), 2)


async def test_asked_to_log_in_without_credentials_it_says_so_and_closes(listening: Callable) -> None:
    h = Handshake(lambda token: (OP_AUTH_SUCCESS, b""))
    with pytest.raises(WireUnsupported, match="no credentials"):
        await open_wire(await listening(h), None)
    assert h.tokens == []
    await asyncio.wait_for(h.closed.wait(), 2)


async def test_no_answer_to_the_login_times_out_and_closes(listening: Callable) -> None:
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _v, _f, stream, op, length = HEADER.unpack(await reader.readexactly(9))
            await reader.readexactly(length)
            authenticator = b"org.apache.cassandra.auth.PasswordAuthenticator"
            writer.write(frame(stream, OP_AUTHENTICATE, struct.pack(">H", len(authenticator)) + authenticator))
            await reader.readexactly(9)  # the AUTH_RESPONSE's header: then nothing is answered
            await reader.read()  # until the client closes
            closed.set()
        finally:
            writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        with pytest.raises(TimeoutError):
            await open_wire(int(server.sockets[0].getsockname()[1]), ("pigeon", "x"))
        await asyncio.wait_for(closed.wait(), 2)
    finally:
        server.close()
