"""Shared fixtures: a real ``pigeon serve`` process on free loopback ports, and devices for it."""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clients.sdk import Device, Profile, login

ROOT = Path(__file__).resolve().parent.parent
BACKEND_VARS = ("PIGEON_STORE", "PIGEON_MEDIA", "PIGEON_REDIS", "PIGEON_BROKER", "PIGEON_BROKER_CREDENTIALS_FILE")
READY_RE = re.compile(r"pigeon ready http=(\S+) mqtt=(\S+):(\d+) ws=ws://[^:]+:(\d+)/mqtt")


@dataclass
class ServerProc:
    """A running ``pigeon serve`` child process."""

    proc: subprocess.Popen[str]
    http: str
    mqtt_host: str
    mqtt_port: int
    ws_port: int
    data_dir: Path
    log_path: Path
    profile: str = "embedded"

    @classmethod
    def start(cls, data_dir: Path, *extra: str, timeout: float = 60.0, dev: bool = True) -> ServerProc:
        data_dir.mkdir(parents=True, exist_ok=True)
        log_path = data_dir / "server.log"
        log = open(log_path, "a")  # noqa: SIM115 - closed with the process
        cmd = [
            sys.executable, "-m", "clients.cli", "serve", *(["--dev"] if dev else []), "--data-dir", str(data_dir),
            "--host", "127.0.0.1", "--mqtt-port", "0", "--ws-port", "0", "--http-port", "0",
            "--log-level", os.environ.get("PIGEON_TEST_SERVER_LOG_LEVEL", "WARNING"), *extra,
        ]
        # backends are chosen by the flags given here, never inherited by accident
        env = {k: v for k, v in os.environ.items() if k not in BACKEND_VARS}
        env["PYTHONUNBUFFERED"] = "1"
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        found: list[re.Match[str]] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                m = READY_RE.search(line)
                if m:
                    found.append(m)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        log.close()  # the child holds its own copy
        if not found:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"pigeon serve did not become ready; log:\n{log_path.read_text()[-4000:]}")
        m = found[0]
        return cls(proc=proc, http=m.group(1), mqtt_host=m.group(2), mqtt_port=int(m.group(3)),
                   ws_port=int(m.group(4)), data_dir=data_dir, log_path=log_path)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def production_url(var: str, scheme: str) -> str:
    """The URL of a production server the test run was given (scripts/test starts them)."""
    value = os.environ.get(var, "")
    if not value.startswith(scheme):
        message = f"{var} is not a {scheme} URL: start the servers with 'scripts/services up' (scripts/test does)"
        if os.environ.get("PIGEON_REQUIRE_SERVICES"):
            pytest.fail(message)
        pytest.skip(message)
    return value


def production_flags() -> list[str]:
    """Flags for a server on the production backends, with the store's schema migrated."""
    store = production_url("PIGEON_STORE", "cassandra://")
    media = production_url("PIGEON_MEDIA", "s3://")
    redis = production_url("PIGEON_REDIS", "redis://")
    subprocess.run([sys.executable, "-m", "clients.cli", "db", "migrate", "--store", store], cwd=ROOT, check=True,
                   capture_output=True)
    return ["--store", store, "--media", media, "--redis", redis]


def broker_flags() -> list[str]:
    """Flags for the external Mosquitto that scripts/services started."""
    broker = production_url("PIGEON_BROKER", "mqtt://")
    creds = production_url("PIGEON_BROKER_CREDENTIALS_FILE", "/")
    return ["--broker", broker, "--broker-credentials-file", creds]


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


_phones = itertools.count(random.randrange(1_000_000, 8_000_000))


def fresh_phone() -> str:
    return f"+1555{next(_phones):07d}"


NewUser = Callable[..., Awaitable[Profile]]


@pytest.fixture
def new_user(server: ServerProc) -> NewUser:
    async def make(phone: str | None = None, name: str = "device") -> Profile:
        return await login(server.http, phone or fresh_phone(), device_name=name)

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
