"""Faults under load, on the real servers: what was answered ``sent`` survives, once, in order.

Each test runs :class:`tests.load.Load` (8 devices in 4 pairs, up to 4 sends in flight each,
retrying as PROTOCOL.md allows), makes one fault in the middle of it, lets the devices recover
and finish, and then :func:`tests.load.check` reads every chat's history and every user's
inbox from 0 and lists every broken promise.

* the one server process killed with SIGKILL and started again on the same data and the same
  ports, on the embedded default and on the production profile;
* Redis emptied (FLUSHALL, every client connection cut) on the production profile;
* Cassandra stopped (SIGSTOP) for 5 s and resumed on the production profile.

Only processes this file started, and the ones scripts/services recorded, are signalled.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from clients.launch import ServerProc
from tests.conftest import production_flags, production_url
from tests.load import Load, check, make_pairs
from tests.test_e2e_faults import Paused, service_pid

PAIRS = 4


def same_ports(srv: ServerProc) -> list[str]:
    """Flags that start a server where ``srv`` listened, so its devices find it again."""
    http_port = urlsplit(srv.http).port
    assert http_port is not None
    return ["--http-port", str(http_port), "--mqtt-port", str(srv.mqtt_port), "--ws-port", str(srv.ws_port)]


async def verdict(load: Load, report: Path) -> None:
    problems = await check(load, report)
    print(load.summary())  # shown with -s, and by pytest for a failing test
    assert not problems, (f"{len(problems)} broken promises ({load.summary()}; everything read and sent is in "
                          f"{report}):\n" + "\n".join(problems[:40]))


@pytest.fixture(scope="module")
def prod_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = ServerProc.start(tmp_path_factory.mktemp("pigeon-crash"), *production_flags())
    yield srv
    srv.stop()


@pytest.mark.parametrize("profile", ["embedded", "production"])
async def test_sigkill_under_load_then_restart_on_the_same_data(profile: str, tmp_path: Path) -> None:
    extra = production_flags() if profile == "production" else []
    data = tmp_path / "data"
    srv = await asyncio.to_thread(ServerProc.start, data, *extra)
    try:
        pairs = await make_pairs(srv.http, PAIRS)
        load = Load(pairs)
        load.start()
        await asyncio.sleep(2.0)
        assert sum(len(d.sends) for d in load.devices) > 0
        srv.stop(signal.SIGKILL)  # nothing gets a chance to flush or answer
        old_http = srv.http
        srv = await asyncio.to_thread(ServerProc.start, data, *extra, *same_ports(srv))
        assert srv.http == old_http
        load.stop_new(after=2.0)  # two more seconds of new sends on the restarted server
        await load.wait()
        lost = sum(d.lost for d in load.devices)
        assert lost >= len(load.devices), f"the kill should have cut every device's connection: {load.summary()}"
        assert any(s.retried and s.attempts > 1 for s in load.sends()), f"nothing was resent: {load.summary()}"
        await verdict(load, tmp_path / "load-report.json")
    finally:
        srv.stop()


async def test_redis_emptied_under_load(prod_server: ServerProc, tmp_path: Path) -> None:
    import redis.asyncio as aioredis

    service_pid("redis")  # only a Redis that scripts/services started is emptied
    pairs = await make_pairs(prod_server.http, PAIRS)
    load = Load(pairs)
    r = aioredis.from_url(production_url("PIGEON_REDIS", "redis://"))
    try:
        load.start()
        await asyncio.sleep(2.0)
        before = len(load.sends())
        # what a Redis restart does to its clients: everything gone, every connection cut
        await r.flushall()
        await r.client_kill_filter(_type="normal", skipme=True)
        load.stop_new(after=3.0)
        await load.wait()
    finally:
        await r.aclose()
    assert len(load.sends()) > before, f"no sends after the flush: {load.summary()}"
    assert any(s.echoes for s in load.sends()), f"no answered send was sent again: {load.summary()}"
    await verdict(load, tmp_path / "load-report.json")


async def test_cassandra_paused_under_load(prod_server: ServerProc, tmp_path: Path) -> None:
    pid = service_pid("cassandra")
    pairs = await make_pairs(prod_server.http, PAIRS)
    load = Load(pairs)
    load.start()
    await asyncio.sleep(2.0)
    with Paused(pid):  # SIGCONT always follows
        await asyncio.sleep(5.0)
    load.stop_new(after=3.0)
    await load.wait()
    sends = load.sends()
    assert any(s.timeouts or s.errors for s in sends), f"the pause went unnoticed: {load.summary()}"
    await verdict(load, tmp_path / "load-report.json")
