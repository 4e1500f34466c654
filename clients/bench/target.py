"""What a benchmark runs against: a server it starts (``--profile``) or one already running,
plus the broker-only relay the baseline uses, and the processes whose memory is measured."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from clients.launch import ROOT, ServerProc
from clients.sdk import PigeonClientError, parse_mqtt_url
from storage.cassandra_owner import PARTITIONS

# the server a benchmark starts answers more than a phone's fair share per device, so that the
# limiter is exercised but never the thing measured; runs report any rate_limited error loudly
BENCH_SERVER_FLAGS = ("--rate", "1000", "--burst", "2000")
SERVICES = ROOT / "scripts" / "services.py"


class BenchError(Exception):
    """A benchmark that cannot run as asked; the message says why."""


@dataclass(frozen=True)
class Relay:
    """Where the baseline's publishers and subscribers connect, with which credential."""

    host: str
    port: int
    username: str
    password: str
    pid: int | None = None  # the relay's own process, when it is not the target's broker


@dataclass
class Target:
    profile: str
    http: str
    mqtt_host: str
    mqtt_port: int
    pids: dict[str, int] = field(default_factory=dict)
    relay: Relay | None = None
    bridge_pids: list[int] = field(default_factory=list)  # the pigeon server itself, for its CPU per message
    # every bridge's HTTP URL, whose /metrics the store counts are summed over (default: ``http``)
    bridge_urls: list[str] = field(default_factory=list)
    # stops the server(s) the bench started and starts them again on the same ports and data
    restart: Callable[[], None] | None = None
    # production with 2 bridges or more: kills the last with SIGKILL, never to start again; the
    # others' HTTP URLs are then ``bridge_urls``
    kill_bridge: Callable[[], None] | None = None
    mqtt_tls: bool = False  # devices connect with mqtts:// (or wss://)
    mqtt_ws_path: str | None = None  # devices connect over a WebSocket at this path (ws://, wss://)
    ca_file: str | None = None  # what https:// and mqtts:// are checked against (None: the system's CAs)
    # production: whether the bench's keyspace was emptied before the run ("emptied") or kept ("kept")
    store: str | None = None
    # servers whose CPU is reported beside the others' but not their memory (Cassandra's heap is
    # sized up front, so its resident memory says nothing about the run)
    cpu_only_pids: dict[str, int] = field(default_factory=dict)

    def metrics_urls(self) -> list[str]:
        return self.bridge_urls or [self.http]


def require_loopback(host: str, what: str) -> None:
    """Benchmarks only ever load this machine."""
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as exc:
        raise BenchError(f"{what}: cannot resolve {host!r}: {exc}") from exc
    for address in addresses:
        if not ipaddress.ip_address(address.split("%")[0]).is_loopback:
            raise BenchError(f"{what}: {host} is not a loopback address; pigeon bench only loads this machine")


def rss_kb(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of a process in clock ticks."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


TICKS_PER_S = os.sysconf("SC_CLK_TCK")
# /proc/stat's first line: the whole box's CPU time by kind, in ticks, in this order (guest time
# is counted in user already, so it is left out)
BOX_TIME_KINDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def box_ticks() -> dict[str, int] | None:
    """The whole box's CPU time so far by kind (all cores), or None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as fh:
            first = fh.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    return dict(zip(BOX_TIME_KINDS, map(int, first[1:1 + len(BOX_TIME_KINDS)]), strict=False))


def box_shares(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, float] | None:
    """How the box's CPU time between two :func:`box_ticks` went, in % of all its cores' time:
    ``busy`` (user, nice, system, irq, softirq), ``idle`` (with iowait) and ``steal`` (time the
    hypervisor gave another guest while this one had work: on a shared virtual machine, CPU the
    processes here wanted and did not get). None when either is unknown or no time passed."""
    if before is None or after is None:
        return None
    spent = {k: max(0, after.get(k, 0) - before.get(k, 0)) for k in BOX_TIME_KINDS}
    total = sum(spent.values())
    if total <= 0:
        return None
    busy = spent["user"] + spent["nice"] + spent["system"] + spent["irq"] + spent["softirq"]
    return {"busy": round(100 * busy / total, 1), "idle": round(100 * (spent["idle"] + spent["iowait"]) / total, 1),
            "steal": round(100 * spent["steal"] / total, 1)}


@contextlib.contextmanager
def relay_broker() -> Iterator[Relay]:
    """The embedded broker alone, in its own process (see ``clients.bench.relay_broker``)."""
    proc = subprocess.Popen([sys.executable, "-m", "clients.bench.relay_broker"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if len(line) != 4 or line[:2] != ["relay", "ready"]:
            raise BenchError(f"the baseline broker did not start (said {line!r})")
        yield Relay("127.0.0.1", int(line[2]), "bench", line[3], proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _dynsec(host: str, port: int, credentials_file: Path, commands: list[dict[str, object]],
            tolerate: tuple[str, ...] = ()) -> None:
    """Run dynamic-security commands over a connection opened for just that."""
    import asyncio

    from bridge.config import read_credentials
    from broker.dynsec import DynSecAdmin

    user, password = read_credentials(credentials_file)

    async def run() -> None:
        async with DynSecAdmin(host, port, user, password) as admin:
            for command in commands:
                await admin.run([command], tolerate=tolerate)

    asyncio.run(run())


@contextlib.contextmanager
def mosquitto_relay(host: str, port: int, credentials_file: Path) -> Iterator[Relay]:
    """A throwaway dynamic-security client that may publish and subscribe under bench/."""
    name, secret = f"pigeon-bench-{secrets.token_hex(4)}", secrets.token_urlsafe(18)
    _dynsec(host, port, credentials_file, [
        {"command": "createRole", "rolename": name, "acls": [
            {"acltype": "publishClientSend", "topic": "bench/#", "allow": True},
            {"acltype": "subscribePattern", "topic": "bench/#", "allow": True}]},
        {"command": "createClient", "username": name, "password": secret, "roles": [{"rolename": name}]},
    ])
    try:
        yield Relay(host, port, name, secret)
    finally:
        _dynsec(host, port, credentials_file, [{"command": "deleteClient", "username": name},
                                               {"command": "deleteRole", "rolename": name}], ("not found",))


def _services_state() -> dict[str, object]:
    path = ROOT / ".services" / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


@contextlib.contextmanager
def production_services() -> Iterator[dict[str, str]]:
    """The production servers: those ``scripts/services`` already runs, or started (and
    stopped again) here."""
    if not SERVICES.exists():
        raise BenchError(f"--profile production needs {SERVICES} (run from a Pigeon checkout)")
    done = subprocess.run([sys.executable, str(SERVICES), "exports"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    started = done.returncode == 1 and not done.stdout
    if started:  # none up: start them here, and stop them again afterwards
        done = subprocess.run([sys.executable, str(SERVICES), "up"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise BenchError("scripts/services up failed (its messages are above)")
    elif done.returncode != 0:
        raise BenchError("scripts/services exports failed (its messages are above)")
    exports = dict(shlex.split(line)[1].split("=", 1) for line in done.stdout.splitlines()
                   if line.startswith("export "))
    try:
        yield exports
    finally:
        if started:
            subprocess.run([sys.executable, str(SERVICES), "down"], cwd=ROOT, check=False)


BENCH_KEYSPACE = re.compile(r"pigeon_bench(_[a-z0-9]{1,30})?")


def empty_keyspace(store_url: str) -> None:
    """Drop the bench's own keyspace (``pigeon_bench``, or ``pigeon_bench_NAME`` given with
    ``--keyspace``; it is migrated again right after), so that every run starts
    from the same empty store. Data kept from earlier runs is compacted by Cassandra while the next
    one runs: on a 2-core box that shares every server, compacting a few tens of MB takes a core for
    seconds and shows in the latencies measured (see BENCHMARKS.md). ``--keep-store`` keeps it."""
    from storage import cassandra_cluster

    url = urlparse(store_url)
    keyspace = url.path.strip("/")
    if not BENCH_KEYSPACE.fullmatch(keyspace):  # the bench only ever drops its own
        raise BenchError(f"refusing to drop keyspace {keyspace!r}")
    cluster = cassandra_cluster(store_url, protocol_version=4, connect_timeout=10)
    try:
        cluster.connect().execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
    except Exception as exc:  # noqa: BLE001 - the driver raises many kinds; all mean the same here
        raise BenchError(f"could not empty the bench's keyspace {keyspace}: {exc}") from exc
    finally:
        cluster.shutdown()


def service_pids(names: tuple[str, ...] = ("mosquitto", "redis")) -> dict[str, int]:
    return {name: int(info["pid"]) for name, info in _services_state().items()
            if isinstance(info, dict) and "pid" in info and name in names}


def partitions_held(http: str) -> int:
    """How many of the store's partitions the bridge at ``http`` holds (its /metrics; 0 when it
    does not answer)."""
    try:
        text = httpx.get(f"{http}/metrics", timeout=5.0).text
    except httpx.HTTPError:
        return 0
    m = re.search(r"^pigeon_partitions_held (\S+)$", text, re.M)
    return int(float(m.group(1))) if m else 0


def wait_shared(servers: list[ServerProc], timeout_s: float = 60.0) -> None:
    """Wait until every bridge holds some of the store's partitions (they balance by lease)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        held = [partitions_held(s.http) for s in servers]
        if min(held) > 0 and sum(held) >= PARTITIONS:
            time.sleep(2.0)  # let the balance settle before devices log in
            return
        time.sleep(0.5)
    raise BenchError(f"the {len(servers)} bridges did not share the partitions within {timeout_s:.0f} s")


def parse_bench_mqtt(url: str) -> tuple[str, int, bool, str | None]:
    """The devices' MQTT listener: ``HOST:PORT``, ``mqtt://``, ``mqtts://`` (as the SDK reads
    them), or MQTT over a WebSocket, ``ws://HOST:PORT/PATH`` or ``wss://HOST:PORT/PATH`` (the
    path defaults to /mqtt) → (host, port, TLS, the WebSocket's path or None)."""
    scheme, sep, _ = url.partition("://")
    if sep and scheme in ("ws", "wss"):
        parts = urlparse(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None or parts.query or parts.fragment:
            raise BenchError(f"--mqtt: MQTT over a WebSocket is ws://HOST:PORT/PATH or wss://HOST:PORT/PATH, "
                             f"not {url!r}")
        return parts.hostname, port, scheme == "wss", parts.path or "/mqtt"
    try:
        host, port, tls = parse_mqtt_url(url)
    except PigeonClientError as exc:
        raise BenchError(f"--mqtt: {exc.message} (or ws://HOST:PORT/PATH, wss://HOST:PORT/PATH)") from exc
    return host, port, tls, None


def keep_log(server: ServerProc, to: Path | None) -> None:
    if to is not None:
        shutil.copyfile(server.log_path, to)


@contextlib.contextmanager
def open_target(profile: str | None, http: str | None, mqtt: str | None, server_pids: list[int],
                credentials_file: Path | None, label: str | None, server_log: Path | None = None,
                bridges: int = 1, ca_file: Path | None = None, keep_store: bool = False,
                keyspace: str = "pigeon_bench") -> Iterator[Target]:
    if http is not None:
        if mqtt is None:
            raise BenchError("--http needs --mqtt HOST:PORT too")
        url = urlparse(http)
        host, port, mqtt_tls, ws_path = parse_bench_mqtt(mqtt)
        if not url.hostname or url.scheme not in ("http", "https"):
            raise BenchError("--http must be a URL such as http://127.0.0.1:8080 or https://127.0.0.1:8443")
        if ca_file is not None and not ca_file.is_file():
            raise BenchError(f"--ca-file {ca_file} is not a file")
        if (mqtt_tls or ws_path is not None) and credentials_file is not None:
            raise BenchError("--broker-credentials-file: the baseline's admin connection uses Mosquitto's plain "
                             "listener; leave it out with mqtts://, ws:// or wss:// (the baseline then runs on a "
                             "separate broker)")
        require_loopback(url.hostname, "--http")
        require_loopback(host, "--mqtt")
        target = Target(label or "external", http.rstrip("/"), host, port,
                        {f"pid {p}": p for p in server_pids}, bridge_pids=list(server_pids), mqtt_tls=mqtt_tls,
                        mqtt_ws_path=ws_path, ca_file=str(ca_file.resolve()) if ca_file is not None else None)
        if credentials_file is not None:
            with mosquitto_relay(host, port, credentials_file) as target.relay:
                yield target
        else:
            with relay_broker() as target.relay:
                yield target
        return
    if profile == "embedded":
        with tempfile.TemporaryDirectory(prefix="pigeon-bench-") as tmp, relay_broker() as relay:
            server = ServerProc.start(Path(tmp), *BENCH_SERVER_FLAGS)
            try:
                yield Target("embedded", server.http, server.mqtt_host, server.mqtt_port,
                             {"pigeon": server.proc.pid}, relay, [server.proc.pid])
            finally:
                server.stop()
                keep_log(server, server_log)
        return
    if profile == "production":
        with production_services() as env, tempfile.TemporaryDirectory(prefix="pigeon-bench-") as tmp:
            # the bench's own keyspace, on the same cluster with the same options
            store = urlparse(env["PIGEON_STORE"])._replace(path=f"/{keyspace}").geturl()
            if not keep_store:
                empty_keyspace(store)
            migrate = subprocess.run([sys.executable, "-m", "clients.cli", "db", "migrate", "--store", store],
                                     cwd=ROOT, capture_output=True, text=True)
            if migrate.returncode != 0:
                raise BenchError(f"pigeon db migrate failed: {migrate.stderr[-2000:]}")
            broker = urlparse(env["PIGEON_BROKER"])
            creds = Path(env["PIGEON_BROKER_CREDENTIALS_FILE"])
            flags = (*BENCH_SERVER_FLAGS, "--store", store, "--media", env["PIGEON_MEDIA"],
                     "--redis", env["PIGEON_REDIS"], "--broker", env["PIGEON_BROKER"],
                     "--broker-credentials-file", str(creds),
                     # the services' way (their plugin), unless PIGEON_BROKER_AUTH here says otherwise
                     "--broker-auth", os.environ.get("PIGEON_BROKER_AUTH") or env.get("PIGEON_BROKER_AUTH", "dynsec"))
            # bridges of one deployment sign with one secret: a token one gave is good on all (with
            # the services' Mosquitto, the secret its plugin checks tokens with: PIGEON_SECRET_FILE)
            if env.get("PIGEON_SECRET_FILE"):
                os.environ["PIGEON_SECRET_FILE"] = env["PIGEON_SECRET_FILE"]
            else:
                os.environ.setdefault("PIGEON_SECRET", secrets.token_hex(32))
            servers: list[ServerProc] = []
            try:
                for i in range(bridges):
                    servers.append(ServerProc.start(Path(tmp) / f"bridge{i}", *flags))
                if bridges > 1:
                    wait_shared(servers)
                server = servers[0]
                pids = {("pigeon" if i == 0 else f"pigeon-{i + 1}"): s.proc.pid for i, s in enumerate(servers)}
                with mosquitto_relay(broker.hostname or "127.0.0.1", broker.port or 1883, creds) as relay:
                    target = Target("production" if bridges == 1 else f"production, {bridges} bridges", server.http,
                                    server.mqtt_host, server.mqtt_port, {**pids, **service_pids()}, relay,
                                    [s.proc.pid for s in servers], [s.http for s in servers],
                                    store="kept" if keep_store else "emptied",
                                    cpu_only_pids=service_pids(("cassandra",)))

                    def restart() -> None:
                        """Every bridge stopped, then started again on the same HTTP port and data
                        (devices stay connected to Mosquitto)."""
                        for s in servers:
                            s.stop()
                        for i, s in enumerate(servers):
                            servers[i] = ServerProc.start(Path(tmp) / f"bridge{i}", *flags, "--http-port",
                                                          str(urlparse(s.http).port))
                        if bridges > 1:
                            wait_shared(servers)
                        target.bridge_pids = [s.proc.pid for s in servers]
                        for i, s in enumerate(servers):
                            target.pids["pigeon" if i == 0 else f"pigeon-{i + 1}"] = s.proc.pid

                    def kill_bridge() -> None:
                        victim = servers.pop()
                        victim.stop(signal.SIGKILL)
                        target.bridge_pids = [s.proc.pid for s in servers]
                        target.bridge_urls = [s.http for s in servers]
                        target.pids = {name: pid for name, pid in target.pids.items() if pid != victim.proc.pid}
                        keep_log(victim, None if server_log is None else Path(f"{server_log}.killed"))

                    target.restart = restart
                    if bridges > 1:
                        target.kill_bridge = kill_bridge
                    yield target
            finally:
                for s in servers:
                    s.stop()
                for i, s in enumerate(servers):  # the first bridge's log where asked, the others' beside it
                    keep_log(s, server_log if i == 0 or server_log is None else Path(f"{server_log}.{i + 1}"))
        return
    raise BenchError("give --profile embedded|production, or --http URL --mqtt HOST:PORT of a running server")
