"""Failure behaviour on the production profile, against the real servers of scripts/services.

Faults are made the way they happen: a Cassandra or MinIO process that stops answering
(SIGSTOP, then SIGCONT), and a Redis that loses everything (FLUSHALL and every client
connection cut, as after a restart). Only processes scripts/services started are touched,
by the PID it recorded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator

import httpx
import pytest

from clients.sdk import Api, Device, PigeonClientError, login
from tests.conftest import ROOT, ServerProc, fresh_phone, production_flags, production_url

STATE = ROOT / ".services" / "state.json"


def service_pid(name: str) -> int:
    state = json.loads(STATE.read_text()) if STATE.exists() else {}
    if name not in state:
        message = f"{name} was not started by scripts/services, so this test may not pause it"
        if os.environ.get("PIGEON_REQUIRE_SERVICES"):
            pytest.fail(message)
        pytest.skip(message)
    return int(state[name]["pid"])


class Paused:
    """SIGSTOP a server for the length of a with-block; SIGCONT always follows."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def __exit__(self, *exc: object) -> None:
        os.kill(self.pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def prod_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = ServerProc.start(tmp_path_factory.mktemp("pigeon-faults"), *production_flags())
    yield srv
    srv.stop()


async def test_cassandra_down_means_unavailable_never_sent_then_recovery(prod_server: ServerProc) -> None:
    pid = service_pid("cassandra")
    a = await login(prod_server.http, fresh_phone())
    b = await login(prod_server.http, fresh_phone())
    async with Device(a, reply_timeout=30) as da:
        first = await da.send("before", to=b.user_id)
        with Paused(pid):
            with pytest.raises(PigeonClientError) as info:
                await da.request({"type": "send", "id": "in-outage", "chat": first["chat"], "body": "x"})
            assert info.value.code == "unavailable"
            async with httpx.AsyncClient() as http:  # the bridge itself keeps running
                assert (await http.get(f"{prod_server.http}/healthz")).status_code == 200
        # back: the same request is accepted once, numbered right after the first message
        async with asyncio.timeout(60):
            while True:
                try:
                    again = await da.send("x", chat=first["chat"], id="in-outage", retries=0)
                    break
                except PigeonClientError as exc:
                    assert exc.code in ("unavailable", "timeout")
                    await asyncio.sleep(1)
        assert again["seq"] == first["seq"] + 1
        async with Api(a) as api:
            assert [m["seq"] for m in (await api.history(first["chat"]))["messages"]] == [2, 1]


async def test_redis_losing_everything_reuses_no_number_and_loses_nothing(prod_server: ServerProc) -> None:
    import redis.asyncio as aioredis

    service_pid("redis")
    a = await login(prod_server.http, fresh_phone())
    b = await login(prod_server.http, fresh_phone())
    r = aioredis.from_url(production_url("PIGEON_REDIS", "redis://"))
    try:
        async with Device(a) as da, Device(b) as db:
            sent = [await da.send(f"m{i}", to=b.user_id) for i in range(3)]
            await r.flushall()
            await r.client_kill_filter(_type="normal", skipme=True)
            sent += [await da.send(f"m{i}", to=b.user_id) for i in range(3, 6)]
            assert [s["seq"] for s in sent] == [1, 2, 3, 4, 5, 6]
            async with asyncio.timeout(10):
                got: list[dict[str, object]] = []
                while len(got) < 6:
                    ev = await db.next_event()
                    if ev["type"] == "msg":
                        got.append(ev)
            assert [e["body"] for e in got] == [f"m{i}" for i in range(6)]
            assert [e["inbox"] for e in got] == [1, 2, 3, 4, 5, 6]
            # presence comes back with the devices' next word
            await db._publish({"type": "presence", "state": "online"})  # noqa: SLF001
            await asyncio.sleep(0.3)
            async with Api(a) as api:
                assert (await api.presence(b.user_id))["online"] is True
    finally:
        await r.aclose()


async def test_minio_down_fails_media_but_text_keeps_working(prod_server: ServerProc) -> None:
    pid = service_pid("minio")
    a = await login(prod_server.http, fresh_phone())
    b = await login(prod_server.http, fresh_phone())
    async with Device(a, reply_timeout=30) as da:
        media = await da.upload(os.urandom(100), "image/png")
        chat = (await da.send("pic", to=b.user_id, media=media))["chat"]
        with Paused(pid):
            with pytest.raises(PigeonClientError) as info:
                await da.request({"type": "media_upload", "sha256": "b" * 64, "size": 10, "mime": "image/png"})
            assert info.value.code == "unavailable"
            with pytest.raises(PigeonClientError) as info:
                await da.request({"type": "media_url", "key": media["key"], "chat": chat})
            assert info.value.code == "unavailable", info.value
            assert (await da.send("text still flows", chat=chat))["seq"] == 2
        assert (await da.request({"type": "media_url", "key": media["key"], "chat": chat}))["url"]

