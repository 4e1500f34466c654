"""Shared fixtures: a real ``pigeon serve`` process on free loopback ports, and devices for it."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import secrets
import ssl
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from broker.embedded import PigeonBroker, broker_config
from broker.gate import DeviceGate
from clients.launch import ROOT, ServerProc
from clients.sdk import Device, Profile, login
from tests.ast_threads import serialize_ast_parse

serialize_ast_parse()  # before any thread of the run parses (tests/ast_threads.py)


def production_url(var: str, scheme: str) -> str:
    """The URL of a production server the test run was given (scripts/test starts them)."""
    value = os.environ.get(var, "")
    if not value.startswith(scheme):
        message = f"{var} is not a {scheme} URL: start the servers with 'scripts/services up' (scripts/test does)"
        if os.environ.get("PIGEON_REQUIRE_SERVICES"):
            pytest.fail(message)
        pytest.skip(message)
    return value


_made_keyspaces: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def _drop_made_keyspaces() -> Iterator[None]:
    """At the end of the run, drop the keyspaces fresh_store_url made (each holds two dozen
    tables in the test Cassandra's heap). Best effort: a failure here fails no test."""
    yield
    drop_keyspaces(_made_keyspaces)


def drop_keyspaces(urls: list[str]) -> None:
    """Drop keyspaces fresh_store_url made (only those), best effort: a failure fails no test."""
    made = [u for u in urls if u in _made_keyspaces]
    if not made:
        return
    from urllib.parse import urlsplit

    from storage import cassandra_cluster

    cluster = cassandra_cluster(made[0], connect_timeout=10)
    try:
        session = cluster.connect()
        for each in made:
            session.execute(f"DROP KEYSPACE IF EXISTS {urlsplit(each).path.strip('/')}", timeout=60)
    except Exception as exc:  # noqa: BLE001 - cleaning up only
        print(f"could not drop the test keyspaces: {exc!r}")
    finally:
        cluster.shutdown()


def fresh_store_url() -> str:
    """A keyspace of its own on the test run's Cassandra, migrated. Each deployment a test starts
    gets one, as each real deployment has its own: bridges of one deployment share their
    partition leases, so two unrelated servers on one keyspace would split the partitions
    between them and hand each other their work."""
    base = production_url("PIGEON_STORE", "cassandra://")
    base, sep, query = base.partition("?")  # (a query may hold a path: ?ca=FILE)
    head, _, keyspace = base.rpartition("/")
    url = f"{head}/{keyspace}_{secrets.token_hex(4)}{sep}{query}"
    _made_keyspaces.append(url)
    done = subprocess.run([sys.executable, "-m", "clients.cli", "db", "migrate", "--store", url], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"pigeon db migrate failed for {url}:\n{done.stdout}{done.stderr}")
    return url


def production_flags() -> list[str]:
    """Flags for a server on the production backends, on a keyspace of its own."""
    store = fresh_store_url()
    media = production_url("PIGEON_MEDIA", "s3://")
    redis = production_url("PIGEON_REDIS", "redis://")
    return ["--store", store, "--media", media, "--redis", redis]


def broker_flags() -> list[str]:
    """Flags for the external Mosquitto that scripts/services started."""
    broker = production_url("PIGEON_BROKER", "mqtt://")
    creds = production_url("PIGEON_BROKER_CREDENTIALS_FILE", "/")
    # how that Mosquitto checks devices: Pigeon's plugin, with the secret exported as PIGEON_SECRET_FILE
    return ["--broker", broker, "--broker-credentials-file", creds,
            "--broker-auth", os.environ.get("PIGEON_BROKER_AUTH", "dynsec")]


@contextmanager
def two_bridges(dir0: Path, dir1: Path, *flags: str) -> Iterator[tuple[ServerProc, ServerProc]]:
    """Two server processes of one deployment (the same flags and the same secret, as
    docs/deploy.md asks), stopped again, second first."""
    kept = [d / "secret" for d in (dir0, dir1) if (d / "secret").exists()]
    shared = kept[0].read_text() if kept else secrets.token_hex(32)
    for d in (dir0, dir1):
        d.mkdir(parents=True, exist_ok=True)
        (d / "secret").write_text(shared)
    first = ServerProc.start(dir0, *flags)
    try:
        second = ServerProc.start(dir1, *flags)
    except BaseException:
        first.stop()
        raise
    try:
        yield first, second
    finally:
        second.stop()
        first.stop()


@pytest.fixture(scope="session", params=["embedded", "production", "mosquitto"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """The server every end-to-end test talks to, once per profile: the embedded default;
    Cassandra + Redis + MinIO with the embedded broker; and all of those on Mosquitto."""
    extra: list[str] = []
    if request.param in ("production", "mosquitto"):
        extra = production_flags()
    if request.param == "mosquitto":
        extra += broker_flags()
    srv = ServerProc.start(tmp_path_factory.mktemp(f"pigeon-{request.param}"), *extra)
    srv.profile = request.param
    yield srv
    srv.stop()


async def metric(srv: ServerProc, name: str) -> float:
    """One sample of a server's ``/metrics`` (``name`` with its labels, as printed), 0 if absent."""
    import httpx

    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{srv.http}/metrics")).text
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[-1])
    return 0.0


async def sends_handled(srv: ServerProc) -> float:
    return await metric(srv, 'pigeon_requests_total{type="send"}')


async def partitions_held(srv: ServerProc) -> float:
    return await metric(srv, "pigeon_partitions_held")


async def first_v1_msg(host: str, port: int, listener: Profile, user_id: str,
                       send: Callable[[], Awaitable[object]]) -> tuple[dict[str, object], int]:
    """As a raw v1 client of ``listener``'s that only listens on ``down/{user_id}``: call
    ``send``, and return the first ``msg`` event that comes there and its QoS."""
    import json

    import aiomqtt

    async with aiomqtt.Client(host, port, identifier=listener.device_id, username=listener.device_id,
                              password=listener.token, clean_session=True) as c:
        await c.subscribe(f"down/{user_id}", qos=1)
        await send()
        async with asyncio.timeout(10):
            async for m in c.messages:
                ev = json.loads(bytes(m.payload))  # type: ignore[arg-type]
                if ev["type"] == "msg":
                    return ev, m.qos
    raise AssertionError("the listener's connection ended before a msg came")


def tok_tokens(user: str) -> Callable[[str], Awaitable[tuple[str, str] | None]]:
    """A token check for an embedded broker on its own: ``tok-DEVICE`` is that device of ``user``."""

    async def check(token: str) -> tuple[str, str] | None:
        return (user, token[4:]) if token.startswith("tok-") else None

    return check


async def embedded_broker(check: Callable[[str], Awaitable[tuple[str, str] | None]],
                          bridge: tuple[str, str] | None = None, **options: float) -> tuple[PigeonBroker, int]:
    """The embedded broker alone on a free loopback port, devices checked by ``check(token)``
    (and the bridge's ``(username, password)``, if given, let in as the bridge); ``options``
    go to PigeonBroker (e.g. ``connect_timeout``)."""
    gate = DeviceGate(check, *(bridge or (None, None)))
    broker = PigeonBroker(broker_config("127.0.0.1", 0, 0, gate), gate, **options)
    await broker.start()
    return broker, broker._servers["default"].instance.sockets[0].getsockname()[1]  # noqa: SLF001


_phones = itertools.count(random.randrange(1_000_000, 8_000_000))


def fresh_phone() -> str:
    return f"+1555{next(_phones):07d}"


NewUser = Callable[..., Awaitable[Profile]]


@pytest.fixture
def new_user(server: ServerProc) -> NewUser:
    async def make(phone: str | None = None, name: str = "device", proto: int = 2) -> Profile:
        return await login(server.http, phone or fresh_phone(), device_name=name, proto=proto)

    return make


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Awaitable[Device]]]:
    """Open devices that are all closed at the end of the test."""
    opened: list[Device] = []

    async def open_device(profile: Profile, **kw: object) -> Device:
        dev = Device(profile, **kw)  # type: ignore[arg-type]
        await dev.__aenter__()
        opened.append(dev)
        return dev

    yield open_device
    for dev in reversed(opened):
        try:
            await dev.close()
        except Exception:  # noqa: BLE001 - a test may have closed it already
            pass


async def relay_pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, tap: bytearray | None = None) -> None:
    """Copy one direction of a relayed connection until it ends (``tap`` keeps what went by),
    then close the other side."""
    try:
        while data := await src.read(65536):
            if tap is not None:
                tap += data
            dst.write(data)
            await dst.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        dst.close()


async def tls11_client_or_skip(trust: Callable[[ssl.SSLContext], None],
                               serve: Callable[[ssl.SSLContext], None]) -> ssl.SSLContext:
    """A client context that speaks only TLS 1.1 (``trust`` adds the CA it checks against), once
    a control shows this machine's OpenSSL can speak it to a server that allows it (``serve``
    gives that server its certificate); skips the test if it cannot, since refusing TLS 1.1
    would then show nothing."""
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    trust(old)
    lax = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    serve(lax)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        lax.minimum_version = ssl.TLSVersion.TLSv1
    for ctx in (old, lax):
        ctx.set_ciphers("ALL:@SECLEVEL=0")
    control = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0, ssl=lax)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", control.sockets[0].getsockname()[1], ssl=old)
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.1"
        writer.close()
    except ssl.SSLError:
        pytest.skip("this OpenSSL cannot speak TLS 1.1 at all, so refusing it shows nothing")
    finally:
        control.close()
    return old


def services_script() -> Any:
    """scripts/services.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("pigeon_services_script", ROOT / "scripts" / "services.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A port nothing listens on at 127.0.0.1 now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
