"""Where login codes go outside development mode."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx

from clients.sdk import request_code, verify
from tests.conftest import ServerProc, fresh_phone


async def test_with_no_flags_codes_go_to_the_server_log(tmp_path: Path) -> None:
    srv = ServerProc.start(tmp_path / "data", dev=False)
    try:
        phone = fresh_phone()
        assert await request_code(srv.http, phone) is None  # not in the reply
        async with asyncio.timeout(10):
            while not (m := re.search(rf"login code for \{phone}: (\d{{6}})", srv.log_path.read_text())):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        profile = await verify(srv.http, phone, m.group(1))
        assert profile.user_id.startswith("u")
    finally:
        srv.stop()


async def test_codes_go_to_the_configured_webhook(tmp_path: Path) -> None:
    received: list[dict[str, str]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
        received.append(json.loads(await reader.readexactly(length)))
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    hook = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = hook.sockets[0].getsockname()[1]
    srv = ServerProc.start(tmp_path / "data", "--sms-webhook", f"http://127.0.0.1:{port}/sms", dev=False)
    try:
        phone = fresh_phone()
        assert await request_code(srv.http, phone) is None
        assert received[0]["phone"] == phone and received[0]["code"] in received[0]["text"]
        assert (await verify(srv.http, phone, received[0]["code"])).device_id
        hook.close()
        await hook.wait_closed()
        # the provider is gone: the request fails visibly instead of pretending a code was sent
        async with httpx.AsyncClient(base_url=srv.http) as http:
            r = await http.post("/v1/auth/code", json={"phone": fresh_phone()})
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
    finally:
        srv.stop()
