#!/usr/bin/env python3
"""Install (if missing), start and stop the real servers Pigeon's production profile uses.

    scripts/services up      start Cassandra, Redis, MinIO and Mosquitto on free loopback ports, wait
                             until each answers, print `export PIGEON_...=...` lines
    scripts/services down    stop exactly the processes `up` started (by PID)
    scripts/services status  show what is running
    scripts/services exports print the `export` lines of the servers already up (exit 1 if none)
    scripts/services restart-redis  kill Redis (SIGKILL) and start it again, empty, on its port:
                             a fault for the tests

Ports are free ones on 127.0.0.1 unless set: SERVICES_REDIS_PORT, SERVICES_MINIO_PORT,
SERVICES_CASSANDRA_PORT (CQL), SERVICES_MOSQUITTO_PORT, SERVICES_MOSQUITTO_TLS_PORT,
SERVICES_MQTT_FRONT_PORT. A server
already given by PIGEON_STORE (cassandra://), PIGEON_REDIS or PIGEON_MEDIA (s3://) is used
as it is and not started. Downloads and builds are cached in $PIGEON_SERVICES_CACHE
(default ~/.cache/pigeon-services); state and data live in .services/ beside this repo.

Where the servers come from (no Docker engine needed):
  Redis      Debian's redis-server package (apt-get, as root)
  Cassandra  org.apache.cassandra:cassandra-all from Maven Central, run on the machine's Java 17,
             asking for a password: the exported PIGEON_STORE logs in as the role `pigeon` with
             a password made for the run (setting it up needs cassandra-driver: run in the venv).
             Its native port takes TLS too (a certificate for 127.0.0.1 from a CA of the run,
             .services/cassandra/tls/): PIGEON_STORE_TLS is the same store as cassandras://...?ca=
  MinIO      built from source with the Go module proxy (`go install`)
  Mosquitto  Debian's mosquitto package (2.0.11 on Debian 12), with its dynamic-security plugin;
             or, with SERVICES_MOSQUITTO=2.1.2, that release built once from its pinned commit
             (git clone of SERVICES_MOSQUITTO_GIT, default the project's GitHub repository; cmake,
             gcc, libssl-dev and libcjson-dev, installed with apt-get as root when missing). The
             version is exported as SERVICES_MOSQUITTO_VERSION. The bridge's own
             credential is written to .services/mosquitto/bridge.credentials (mode 0600) and
             exported as PIGEON_BROKER_CREDENTIALS_FILE. Devices are checked by Pigeon's own
             plugin (broker/mosquitto/pigeon_auth.c, compiled once into the cache with gcc,
             mosquitto-dev, libmosquitto-dev and libssl-dev, installed with apt-get as root when
             missing) with a secret made for the run: exported as PIGEON_SECRET_FILE, with
             PIGEON_BROKER_AUTH=plugin. Beside its plain listener it has a TLS
             one (TLS 1.2+) with a certificate for 127.0.0.1 and localhost from a CA made for this
             run with openssl (.services/mosquitto/tls/), exported as PIGEON_BROKER_TLS
             (mqtts://127.0.0.1:PORT) and PIGEON_BROKER_TLS_CA_FILE (the CA's certificate).
  MQTT front Debian's haproxy package (apt-get, as root), with scripts/mqtt-front.cfg: a listener
             in front of Mosquitto's plain one that closes a connection whose first packet is not
             a valid CONNECT at once, and one without a whole CONNECT after
             SERVICES_CONNECT_TIMEOUT_S (default 10), which Mosquitto itself never does. Exported
             as PIGEON_BROKER_FRONT (mqtt://127.0.0.1:PORT; port SERVICES_MQTT_FRONT_PORT) and
             SERVICES_CONNECT_TIMEOUT_S. The same HAProxy also ends TLS for devices with
             Mosquitto's certificate and checks what comes inside it the same way: exported as
             PIGEON_BROKER_FRONT_TLS (mqtts://127.0.0.1:PORT; port SERVICES_MQTT_FRONT_TLS_PORT;
             the CA is PIGEON_BROKER_TLS_CA_FILE). Only devices use them; the bridge connects to
             Mosquitto.
Only the standard library is used, except for setting up Cassandra's login role, which needs
cassandra-driver (the project's venv, as scripts/test has it).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = ROOT / ".services"
STATE = STATE_DIR / "state.json"
CACHE = Path(os.environ.get("PIGEON_SERVICES_CACHE", Path.home() / ".cache" / "pigeon-services"))

CASSANDRA_VERSION = "5.0.4"
MINIO_MODULE = "github.com/minio/minio@v0.0.0-20260212201848-7aac2a2c5b7c"
MINIO_USER, MINIO_PASSWORD, MINIO_BUCKET = "pigeon", "pigeon-test-secret", "pigeon-media"
KEYSPACE = "pigeon_test"
# Cassandra asks for a password (PasswordAuthenticator), as a deployment's would: the bridges
# log in as this role, with a password made for the run (in the exported PIGEON_STORE). What a
# role may do is not checked (AllowAllAuthorizer).
CASSANDRA_USER = "pigeon"
# SERVICES_CASSANDRA_AUTH=none starts it without (AllowAllAuthenticator), to measure the difference.
CASSANDRA_AUTH = os.environ.get("SERVICES_CASSANDRA_AUTH", "password")
if CASSANDRA_AUTH not in ("password", "none"):
    raise SystemExit(f"services: SERVICES_CASSANDRA_AUTH must be password or none, got {CASSANDRA_AUTH!r}")

# G1 with a 20 ms pause goal: with its default goal (200 ms) the young generation grew to
# 600-900 MB and each collection stopped Cassandra for 30-260 ms, the tail of every latency
# figure (BENCHMARKS.md). Pauses are logged to logs/gc.log.
# SERVICES_CASSANDRA_GC_FLAGS replaces them (space-separated JVM flags), to measure another collector.
CASSANDRA_GC_FLAGS: list[str] = os.environ.get("SERVICES_CASSANDRA_GC_FLAGS",
                                               "-XX:+UseG1GC -XX:MaxGCPauseMillis=20").split()
# Cassandra's shared pool keeps an idle worker waking every 10 us or so to look for work
# (parkNanos), and each statement passes through two of its stages. On this 2-core box that was
# 30,000-48,000 context switches a second and about half a core at any load from 140 msgs/s up,
# taken from the bridge and the broker. With the kernel's timer slack at 250 us instead of its
# 50 us those parks last a little longer: about 15,000-22,000 switches, a third of a core, and
# more messages a second (BENCHMARKS.md, 2026-11-30 dusk). At 1 ms, in alternated runs,
# Cassandra took a quarter less CPU per message again, one bridge's full speed went from
# 938-1,347 to 1,148-1,356 msgs/s and two bridges' from 962-1,008 to 1,354-1,368; p50 at a
# quarter of full speed stayed at 5-8 ms (2 ms cost 3 ms more there; BENCHMARKS.md, 2026-12-03
# night). SERVICES_CASSANDRA_TIMER_SLACK_NS sets another value (50000 is the kernel's default).
# In a deployment: systemd's TimerSlackNSec=.
# Memtables as Cassandra 5's cassandra_latest.yaml has them: tries, their data off the Java heap.
# With the default (skip lists on the heap) memtable data filled the heap's old generation under
# load, and G1 ran a marking cycle every few seconds: two pauses of 15-30 ms within 300 ms, and
# the marking itself, in the seconds where a p2p run's p99 jumped to 140-260 ms (BENCHMARKS.md,
# 2026-12-02, late morning). SERVICES_CASSANDRA_MEMTABLES=default runs the default instead, and
# SERVICES_CASSANDRA_YAML_EXTRA is appended to cassandra.yaml as it is: both to measure others.
TRIE_MEMTABLES_OFF_HEAP = """memtable_allocation_type: offheap_objects
memtable:
  configurations:
    skiplist:
      class_name: SkipListMemtable
    trie:
      class_name: TrieMemtable
    default:
      inherits: trie
"""
MEMTABLES = "" if os.environ.get("SERVICES_CASSANDRA_MEMTABLES") == "default" else TRIE_MEMTABLES_OFF_HEAP
PR_SET_TIMERSLACK = 29
CASSANDRA_TIMER_SLACK_NS = int(os.environ.get("SERVICES_CASSANDRA_TIMER_SLACK_NS", "1000000"))
JVM17_FLAGS = [
    "-Djdk.attach.allowAttachSelf=true",
    *[f"--add-exports={m}=ALL-UNNAMED" for m in (
        "java.base/jdk.internal.misc", "java.management.rmi/com.sun.jmx.remote.internal.rmi",
        "java.management/com.sun.jmx.remote.security", "java.rmi/sun.rmi.registry", "java.rmi/sun.rmi.server",
        "java.sql/java.sql", "java.base/java.lang.ref", "jdk.unsupported/sun.misc", "jdk.attach/sun.tools.attach",
        "jdk.compiler/com.sun.tools.javac.file",
    )],
    *[f"--add-opens=java.base/{p}=ALL-UNNAMED" for p in (
        "java.lang.module", "jdk.internal.loader", "jdk.internal.ref", "jdk.internal.reflect", "jdk.internal.math",
        "jdk.internal.module", "jdk.internal.util.jar", "sun.nio.ch", "java.io", "java.lang.reflect", "java.lang",
        "java.util", "java.nio",
    )],
    "--add-opens=jdk.management/com.sun.management.internal=ALL-UNNAMED",
    "--add-opens=jdk.compiler/com.sun.tools.javac=ALL-UNNAMED",
    "-Dio.netty.tryReflectionSetAccessible=true",
]


def say(msg: str) -> None:
    print(f"services: {msg}", file=sys.stderr, flush=True)


def configured_port(name: str) -> int:
    """The port SERVICES_<NAME>_PORT asks for, or a free one."""
    value = os.environ.get(f"SERVICES_{name.upper()}_PORT", "")
    if value:
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise SystemExit(f"services: SERVICES_{name.upper()}_PORT must be a port number, got {value!r}")
        if port_open(int(value)):
            raise SystemExit(f"services: port {value} (SERVICES_{name.upper()}_PORT) is already in use")
        return int(value)
    return free_port()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(what: str, ready: object, timeout: float, proc: subprocess.Popen[bytes] | None, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(ready) and ready():
            return
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise SystemExit(f"services: {what} exited with {proc.returncode} before it was ready\n{tail}")
        time.sleep(0.25)
    raise SystemExit(f"services: {what} was not ready within {timeout:.0f}s; see {log}")


def run(cmd: list[str], **kw: object) -> None:
    """Run an install step; its output goes to stderr, since stdout carries only the exports."""
    kw.setdefault("stdout", sys.stderr)
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


def spawn(name: str, cmd: list[str], env: dict[str, str] | None = None,
          timer_slack_ns: int | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    log = STATE_DIR / f"{name}.log"
    fh = open(log, "ab")  # noqa: SIM115 - the child keeps it
    preexec = None
    if timer_slack_ns is not None:
        def preexec() -> None:  # in the child, before exec: every thread it starts inherits the slack
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(timer_slack_ns), 0, 0, 0)
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, **(env or {})}, preexec_fn=preexec)
    fh.close()
    return proc, log


def find_program(name: str) -> str | None:
    """On PATH, or where Debian installs daemons (/usr/sbin is not on every user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


# -- Redis ------------------------------------------------------------------------------------------
def apt_program(program: str, package: str) -> str:
    """``program``, installed from Debian's ``package`` (apt-get, as root) when it is missing."""
    found = find_program(program)
    if found:
        return found
    say(f"installing {package} (apt)")
    run(["apt-get", "update", "-qq"], stdout=subprocess.DEVNULL)
    run(["apt-get", "install", "-y", "-qq", package], stdout=subprocess.DEVNULL,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = find_program(program)
    if not found:
        raise SystemExit(f"services: {program} is still missing after apt-get install {package}")
    return found


def redis_binary() -> str:
    return apt_program("redis-server", "redis-server")


def start_redis(state: dict[str, object]) -> str:
    port = configured_port("redis")
    data = STATE_DIR / "redis"
    data.mkdir(parents=True, exist_ok=True)
    proc, log = spawn("redis", [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(data), "--protected-mode", "yes"])

    def ready() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    wait_until("redis", ready, 30, proc, log)
    state["redis"] = {"pid": proc.pid, "port": port}
    return f"redis://127.0.0.1:{port}/0"


# -- MinIO ------------------------------------------------------------------------------------------
def minio_binary() -> Path:
    binary = CACHE / "go" / "bin" / "minio"
    if binary.exists():
        return binary
    if not shutil.which("go"):
        raise SystemExit("services: Go is needed to build MinIO (go install); none is on PATH")
    say(f"building MinIO from {MINIO_MODULE} (first time only, several minutes)")
    env = {**os.environ, "GOPATH": str(CACHE / "go"), "GOMODCACHE": str(CACHE / "gomod"),
           "GOCACHE": str(CACHE / "gocache"), "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"}
    run(["go", "install", MINIO_MODULE], env=env)
    return binary


def start_minio(state: dict[str, object]) -> str:
    port, console = configured_port("minio"), free_port()
    data = STATE_DIR / "minio"
    data.mkdir(parents=True, exist_ok=True)
    proc, log = spawn(
        "minio",
        [str(minio_binary()), "server", str(data), "--address", f"127.0.0.1:{port}",
         "--console-address", f"127.0.0.1:{console}", "--quiet"],
        env={"MINIO_ROOT_USER": MINIO_USER, "MINIO_ROOT_PASSWORD": MINIO_PASSWORD,
             "MINIO_BROWSER": "off", "MINIO_UPDATE": "off"},
    )

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/minio/health/live", timeout=1) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    wait_until("minio", ready, 60, proc, log)
    state["minio"] = {"pid": proc.pid, "port": port}
    return f"s3://{MINIO_USER}:{MINIO_PASSWORD}@127.0.0.1:{port}/{MINIO_BUCKET}"


# -- Cassandra --------------------------------------------------------------------------------------
def cassandra_lib() -> Path:
    home = CACHE / f"cassandra-{CASSANDRA_VERSION}"
    lib = home / "lib"
    if (lib / f"cassandra-all-{CASSANDRA_VERSION}.jar").exists():
        return lib
    if not shutil.which("mvn"):
        raise SystemExit("services: Maven (mvn) is needed to fetch Cassandra from Maven Central")
    say(f"fetching Cassandra {CASSANDRA_VERSION} and its dependencies from Maven Central (first time only)")
    home.mkdir(parents=True, exist_ok=True)
    (home / "pom.xml").write_text(f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>pigeon.services</groupId><artifactId>cassandra-runtime</artifactId><version>1</version>
  <dependencies><dependency>
    <groupId>org.apache.cassandra</groupId><artifactId>cassandra-all</artifactId>
    <version>{CASSANDRA_VERSION}</version>
  </dependency></dependencies>
</project>
""")
    run(["mvn", "-q", "-B", "-Dstyle.color=never", "dependency:copy-dependencies", f"-DoutputDirectory={lib}",
         "-DincludeScope=runtime"], cwd=home)
    return lib


def start_cassandra(state: dict[str, object]) -> str:
    if not shutil.which("java"):
        raise SystemExit("services: Java 17 is needed to run Cassandra; none is on PATH")
    if CASSANDRA_AUTH != "none":
        try:
            import cassandra.cluster  # noqa: F401 - checked before a start that takes a minute
        except ImportError as exc:
            raise SystemExit("services: setting up Cassandra's login role needs cassandra-driver; run this "
                             "inside the project's venv (pip install -e '.[test]'), or with "
                             "SERVICES_CASSANDRA_AUTH=none") from exc
    for tool in ("openssl", "keytool"):
        if not shutil.which(tool):
            raise SystemExit(f"services: {tool} is needed for Cassandra's TLS files; none is on PATH")
    lib = cassandra_lib()
    native, storage, jmx = configured_port("cassandra"), free_port(), free_port()
    home = STATE_DIR / "cassandra"
    for sub in ("data", "commitlog", "saved_caches", "hints", "cdc_raw", "logs", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    tls_options, tls_ca = cassandra_tls_options(home)
    conf = home / "cassandra.yaml"
    conf.write_text(f"""cluster_name: pigeon-test
num_tokens: 16
listen_address: 127.0.0.1
rpc_address: 127.0.0.1
storage_port: {storage}
native_transport_port: {native}
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:{storage}"
endpoint_snitch: SimpleSnitch
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
commitlog_sync: periodic
commitlog_sync_period: 10000ms
data_file_directories: [{home / 'data'}]
commitlog_directory: {home / 'commitlog'}
saved_caches_directory: {home / 'saved_caches'}
hints_directory: {home / 'hints'}
cdc_raw_directory: {home / 'cdc_raw'}
start_native_transport: true
authenticator: {"AllowAllAuthenticator" if CASSANDRA_AUTH == "none" else "PasswordAuthenticator"}
authorizer: AllowAllAuthorizer
disk_failure_policy: stop
commit_failure_policy: stop
# test and bench keyspaces are dropped by design (the bench empties its own before each run):
# no snapshot of them is kept on disk
auto_snapshot: false
{tls_options}{MEMTABLES}{os.environ.get("SERVICES_CASSANDRA_YAML_EXTRA", "")}""")
    logback = home / "logback.xml"
    logback.write_text(f"""<configuration>
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>{home / 'logs' / 'system.log'}</file>
    <encoder><pattern>%d %-5level [%thread] %logger{{1}}: %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="FILE"/></root>
</configuration>
""")
    cmd = [
        "java", "-Xms256m", "-Xmx2g", *CASSANDRA_GC_FLAGS, *JVM17_FLAGS,
        f"-Xlog:gc:file={home / 'logs' / 'gc.log'}:time,uptime,level:filecount=2,filesize=20m",
        f"-Dcassandra.config=file://{conf}", "-Dcassandra-foreground=yes",
        f"-Dcassandra.storagedir={home}", f"-Dcassandra.logdir={home / 'logs'}",
        f"-Dlogback.configurationFile={logback}", "-Dcassandra.skip_wait_for_gossip_to_settle=0",
        "-Dcassandra.ring_delay_ms=0", "-Dchronicle.analytics.disable=true",
        f"-Dcassandra.jmx.local.port={jmx}", f"-Djava.io.tmpdir={home / 'tmp'}",
        f"-Djna.tmpdir={home / 'tmp'}", "-Dcassandra.superuser_setup_delay_ms=0",
        "-cp", f"{lib}/*", "org.apache.cassandra.service.CassandraDaemon",
    ]
    proc, log = spawn("cassandra", cmd, timer_slack_ns=CASSANDRA_TIMER_SLACK_NS)
    wait_until("cassandra", lambda: port_open(native), 180, proc, home / "logs" / "system.log")
    state["cassandra"] = {"pid": proc.pid, "port": native}
    login = ""
    if CASSANDRA_AUTH != "none":
        login = f"{CASSANDRA_USER}:{cassandra_role(native, proc, home / 'logs' / 'system.log')}@"
    # the same node through TLS: for the tests of cassandras://, on the same port
    state["cassandra_tls_url"] = f"cassandras://{login}127.0.0.1:{native}/{KEYSPACE}?ca={tls_ca}"
    return f"cassandra://{login}127.0.0.1:{native}/{KEYSPACE}"


def cassandra_role(native: int, proc: subprocess.Popen[bytes], log: Path) -> str:
    """Make Pigeon's login role with a password of this run, as the default superuser (which
    Cassandra sets up right after it starts with a password authenticator), and return that
    password. Needs cassandra-driver: run inside the project's venv."""
    try:
        from cassandra.auth import PlainTextAuthProvider
        from cassandra.cluster import Cluster
    except ImportError as exc:
        raise SystemExit("services: setting up Cassandra's login role needs cassandra-driver; run this "
                         "inside the project's venv (pip install -e '.[test]')") from exc
    password = secrets.token_hex(16)
    connected: list[tuple[object, object]] = []

    def logged_in() -> bool:
        cluster = Cluster(["127.0.0.1"], port=native, protocol_version=4, connect_timeout=5,
                          auth_provider=PlainTextAuthProvider("cassandra", "cassandra"))
        try:
            connected.append((cluster, cluster.connect()))
            return True
        except Exception:  # noqa: BLE001 - the default superuser is not set up yet
            cluster.shutdown()
            return False

    wait_until("cassandra's default superuser", logged_in, 120, proc, log)
    cluster, conn = connected[0]
    try:
        for cql in (f"CREATE ROLE IF NOT EXISTS {CASSANDRA_USER} WITH LOGIN = true AND PASSWORD = '{password}'",
                    f"ALTER ROLE {CASSANDRA_USER} WITH PASSWORD = '{password}'"):
            conn.execute(cql, timeout=60)  # type: ignore[attr-defined]
    finally:
        cluster.shutdown()  # type: ignore[attr-defined]
    return password


# -- Mosquitto ---------------------------------------------------------------------------------------
DYNSEC_PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
BRIDGE_USER = "pigeon-bridge"
MOSQUITTO_MAX_PACKET = 128 * 1024 * 1024
# Releases `SERVICES_MOSQUITTO=VERSION` builds from source instead of Debian's package, each
# pinned to its tag's commit (checked after the clone). 2.1 closes what 2.0.11 keeps open: a
# PUBLISH with QoS 0 and DUP, a SUBACK or PINGRESP from a client, a PINGREQ with flags or a body,
# and a connection that sends no CONNECT after 30 s instead of about 95 (RELIABILITY.md).
MOSQUITTO_RELEASES = {"2.1.2": "99fa50f30e325609394c324c8ff71cfbbe95d8ab"}
# Pigeon's own plugin: Mosquitto checks device tokens itself (docs/deploy.md)
AUTH_PLUGIN_SOURCE = ROOT / "broker" / "mosquitto" / "pigeon_auth.c"
AUTH_PLUGIN_NEEDS = {"cc": "gcc", "/usr/include/mosquitto_broker.h": "mosquitto-dev",
                     "/usr/include/mosquitto.h": "libmosquitto-dev", "/usr/include/openssl/hmac.h": "libssl-dev"}
MOSQUITTO_GIT = os.environ.get("SERVICES_MOSQUITTO_GIT", "https://github.com/eclipse-mosquitto/mosquitto.git")
# what building it needs, by Debian package: a program on PATH or a header
MOSQUITTO_BUILD_NEEDS = {"git": "git", "cmake": "cmake", "make": "make", "cc": "gcc",
                         "/usr/include/openssl/ssl.h": "libssl-dev", "/usr/include/cjson/cJSON.h": "libcjson-dev"}


def mosquitto_programs() -> tuple[str, str, str, str]:
    """(mosquitto, mosquitto_ctrl, its dynamic-security plugin, the version) of
    $SERVICES_MOSQUITTO: unset or 'debian' for Debian's package, or a release of
    MOSQUITTO_RELEASES, built once into the cache."""
    wanted = os.environ.get("SERVICES_MOSQUITTO", "debian")
    if wanted == "debian":
        binary = mosquitto_binary()
        ctrl = find_program("mosquitto_ctrl")
        assert ctrl is not None  # mosquitto_binary() installed it
        version = subprocess.run([binary, "-h"], capture_output=True, text=True).stdout.split()[2]
        return binary, ctrl, DYNSEC_PLUGIN, version
    if wanted not in MOSQUITTO_RELEASES:
        raise SystemExit(f"services: SERVICES_MOSQUITTO={wanted!r}: not 'debian' nor one of "
                         f"{sorted(MOSQUITTO_RELEASES)}")
    home = built_mosquitto(wanted)
    return (str(home / "sbin" / "mosquitto"), str(home / "bin" / "mosquitto_ctrl"),
            str(home / "lib" / "mosquitto_dynamic_security.so"), wanted)


def built_mosquitto(version: str) -> Path:
    """Mosquitto ``version`` built from its pinned commit into $PIGEON_SERVICES_CACHE (once)."""
    home = CACHE / f"mosquitto-{version}"
    if (home / "sbin" / "mosquitto").exists():
        return home
    install_missing(MOSQUITTO_BUILD_NEEDS, f"building Mosquitto {version}")
    work = CACHE / f"mosquitto-{version}.build"
    shutil.rmtree(work, ignore_errors=True)
    say(f"building Mosquitto {version} from {MOSQUITTO_GIT} into {home}")
    run(["git", "clone", "--quiet", "--depth", "1", "--branch", f"v{version}", MOSQUITTO_GIT, str(work / "src")],
        stderr=subprocess.DEVNULL)
    commit = subprocess.run(["git", "-C", str(work / "src"), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    if commit != MOSQUITTO_RELEASES[version]:
        raise SystemExit(f"services: v{version} of {MOSQUITTO_GIT} is {commit}, not {MOSQUITTO_RELEASES[version]}")
    run(["cmake", "-S", str(work / "src"), "-B", str(work / "build"), "-DCMAKE_BUILD_TYPE=Release",
         f"-DCMAKE_INSTALL_PREFIX={home}", f"-DCMAKE_INSTALL_RPATH={home / 'lib'}", "-DWITH_TESTS=OFF",
         "-DWITH_DOCS=OFF", "-DWITH_CTRL_SHELL=OFF", "-DWITH_LTO=OFF", "-DWITH_CLIENTS=OFF"], stdout=subprocess.DEVNULL)
    run(["cmake", "--build", str(work / "build"), "--parallel", str(os.cpu_count() or 1)], stdout=subprocess.DEVNULL)
    run(["cmake", "--install", str(work / "build")], stdout=subprocess.DEVNULL)
    shutil.rmtree(work, ignore_errors=True)
    return home


def install_missing(needs: dict[str, str], purpose: str) -> None:
    """Install (apt-get, as root) the packages of ``needs`` (a program on PATH or a file -> its
    Debian package) whose program or file is missing."""
    missing = sorted({pkg for need, pkg in needs.items()
                      if not (Path(need).exists() if need.startswith("/") else shutil.which(need))})
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"services: {purpose} needs {' '.join(missing)} (apt-get, as root)")
    say(f"installing {' '.join(missing)} (apt) for {purpose}")
    run(["apt-get", "update", "-qq"], stdout=subprocess.DEVNULL)
    run(["apt-get", "install", "-y", "-qq", *missing], stdout=subprocess.DEVNULL,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def auth_plugin(include: Path | None) -> Path:
    """broker/mosquitto/pigeon_auth.c compiled against this Mosquitto's headers (``include``,
    or Debian's mosquitto-dev when None), once per source and headers, into the cache."""
    source = AUTH_PLUGIN_SOURCE.read_bytes()
    built = CACHE / f"pigeon_auth-{hashlib.sha256(source + str(include).encode()).hexdigest()[:16]}.so"
    if built.exists():
        return built
    needs = AUTH_PLUGIN_NEEDS if include is None else {"cc": "gcc", "/usr/include/openssl/hmac.h": "libssl-dev"}
    install_missing(needs, "building Pigeon's Mosquitto plugin")
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = built.with_suffix(".partial")
    run(["cc", "-std=c11", "-D_POSIX_C_SOURCE=200809L", "-O2", "-Wall", "-Wextra", "-shared", "-fPIC",
         *(["-I", str(include)] if include is not None else []), str(AUTH_PLUGIN_SOURCE), "-lcrypto",
         "-o", str(partial)])
    partial.rename(built)
    for stale in CACHE.glob("pigeon_auth-*.so"):  # builds of earlier sources
        if stale != built:
            stale.unlink()
    return built


def mosquitto_binary() -> str:
    found = find_program("mosquitto")
    if found and Path(DYNSEC_PLUGIN).exists() and find_program("mosquitto_ctrl"):
        return found
    say("installing mosquitto (apt)")
    run(["apt-get", "update", "-qq"], stdout=subprocess.DEVNULL)
    run(["apt-get", "install", "-y", "-qq", "mosquitto", "mosquitto-clients"], stdout=subprocess.DEVNULL,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = find_program("mosquitto")
    if not found or not Path(DYNSEC_PLUGIN).exists():
        raise SystemExit("services: mosquitto or its dynamic-security plugin is missing after apt-get install")
    return found


def _give_to_mosquitto(*paths: Path) -> None:
    """Started as root, Mosquitto drops to the 'mosquitto' user and must still save its
    dynamic-security file."""
    if os.geteuid() != 0:
        return
    try:
        import pwd

        entry = pwd.getpwnam("mosquitto")
    except KeyError:
        return
    for path in paths:
        os.chown(path, entry.pw_uid, entry.pw_gid)


def make_tls_files(home: Path, for_mosquitto: bool = True) -> tuple[Path, Path, Path]:
    """A CA for this run and a server certificate it signs for 127.0.0.1 and localhost (openssl);
    returns (CA certificate, server certificate, server key)."""
    tls = home / "tls"
    tls.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (tls / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = tls / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
                   "basicConstraints=critical,CA:FALSE\n")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "30",
         "-subj", "/CN=pigeon services test CA", "-keyout", str(ca_key), "-out", str(ca)], **quiet)
    run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(csr)], **quiet)
    run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
         "-days", "30", "-extfile", str(ext), "-out", str(cert)], **quiet)
    ca_key.unlink()  # nothing more is signed with it
    if for_mosquitto:
        _give_to_mosquitto(tls, key, cert)
    return ca, cert, key


def cassandra_tls_options(home: Path) -> tuple[str, Path]:
    """Cassandra's client_encryption_options (TLS on its native port beside plain connections:
    `optional`), with a key store and trust store of this run made from make_tls_files' PEM files;
    returns them and the CA certificate a client trusts."""
    ca, cert, key = make_tls_files(home, for_mosquitto=False)
    tls = ca.parent
    keystore, truststore = tls / "keystore.p12", tls / "truststore.p12"
    password = secrets.token_hex(12)
    for path in (keystore, truststore):
        path.unlink(missing_ok=True)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    run(["openssl", "pkcs12", "-export", "-in", str(cert), "-inkey", str(key), "-name", "cassandra",
         "-out", str(keystore), "-passout", f"pass:{password}"], **quiet)
    run(["keytool", "-importcert", "-noprompt", "-alias", "ca", "-file", str(ca), "-keystore", str(truststore),
         "-storetype", "PKCS12", "-storepass", password], **quiet)
    return f"""client_encryption_options:
  enabled: true
  optional: true
  keystore: {keystore}
  keystore_password: {password}
  truststore: {truststore}
  truststore_password: {password}
  store_type: PKCS12
  require_client_auth: false
""", ca


def start_mosquitto(state: dict[str, object]) -> str:
    binary, ctrl_program, plugin, version = mosquitto_programs()
    port = configured_port("mosquitto")
    tls_port = configured_port("mosquitto_tls")
    home = STATE_DIR / "mosquitto"
    home.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(24)
    dynsec = home / "dynamic-security.json"
    dynsec.unlink(missing_ok=True)
    # the bridge is the dynamic-security admin: it creates one client per device
    run([ctrl_program, "dynsec", "init", str(dynsec), BRIDGE_USER], input=f"{password}\n{password}\n".encode(),
        stdout=subprocess.DEVNULL)
    _give_to_mosquitto(home, dynsec)
    # Pigeon's plugin checks device tokens (signed with this deployment's secret, exported as
    # PIGEON_SECRET_FILE); dynamic security only knows the bridge's own client
    auth = home / "auth"
    auth.mkdir(exist_ok=True)
    secret = auth / "secret"
    secret.write_text(secrets.token_hex(32))
    secret.chmod(0o600)
    built = auth_plugin(None if plugin.startswith("/usr/") else Path(plugin).parent.parent / "include")
    auth_so = Path(shutil.copy(built, auth / "pigeon_auth.so"))
    (auth / "revoked").unlink(missing_ok=True)
    _give_to_mosquitto(auth, secret, auth_so)
    if not plugin.startswith("/usr/"):
        # a build in the cache: Mosquitto started as root drops to its own user, which cannot
        # read root's home, so the plugin goes beside the configuration
        plugin = str(shutil.copy(plugin, home / Path(plugin).name))
        _give_to_mosquitto(Path(plugin))
    creds = home / "bridge.credentials"
    fd = os.open(creds, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{BRIDGE_USER}:{password}\n")
    ca, cert, key = make_tls_files(home)
    conf = home / "mosquitto.conf"
    # per_listener_settings false: both listeners share the authentication and the dynamic security
    conf.write_text(f"""per_listener_settings false
listener {port} 127.0.0.1
listener {tls_port} 127.0.0.1
certfile {cert}
keyfile {key}
tls_version tlsv1.2
allow_anonymous false
persistence false
# The bridges acknowledge a device publish only once they have handled it, in one session per
# partition: the broker's default window of 20 unacknowledged messages per session would cap a
# bridge at 20 requests in progress; and a partition's session keeps what arrives while its
# holder changes.
max_inflight_messages 1000
max_queued_messages 100000
# The largest packet any client may send, the bridge included: above the largest sync batch the
# bridge publishes (1,000 events of a 16,000-character body, about 96 kB each at worst), so 2.1's
# default of 2,000,000 bytes does not cut the bridge off; and still closing at once a packet that
# announces 256 MiB, which Mosquitto would otherwise allocate and wait for (2.0 has no limit).
max_packet_size {MOSQUITTO_MAX_PACKET}
persistent_client_expiration 7d
# Without it a small packet (a PUBACK, a reply) can wait for the peer's delayed ACK (Nagle).
set_tcp_nodelay true
log_dest stdout
log_type error
log_type warning
plugin {auth_so}
plugin_opt_secret_file {secret}
plugin_opt_revoked_file {auth / "revoked"}
plugin {plugin}
plugin_opt_config_file {dynsec}
""")
    proc, log = spawn("mosquitto", [binary, "-c", str(conf)])
    wait_until("mosquitto", lambda: port_open(port) and port_open(tls_port), 30, proc, log)
    ctrl = [ctrl_program, "-h", "127.0.0.1", "-p", str(port), "-u", BRIDGE_USER, "-P", password, "dynsec"]
    for args in (["createRole", "pigeon-bridge-io"],
                 ["addRoleACL", "pigeon-bridge-io", "publishClientSend", "down/#", "allow"],
                 ["addRoleACL", "pigeon-bridge-io", "subscribePattern", "up/+/+", "allow"],
                 ["addRoleACL", "pigeon-bridge-io", "publishClientSend", "up/~probe/#", "allow"],
                 ["addRoleACL", "pigeon-bridge-io", "publishClientSend", "$CONTROL/pigeon-auth/v1", "allow"],
                 ["addClientRole", BRIDGE_USER, "pigeon-bridge-io"]):
        run([*ctrl, *args], stderr=subprocess.DEVNULL)
    state["mosquitto"] = {"pid": proc.pid, "port": port, "tls_port": tls_port, "version": version}
    state["mosquitto_credentials"] = str(creds)
    state["mosquitto_secret"] = str(secret)
    state["mosquitto_tls_ca"] = str(ca)
    return f"mqtt://127.0.0.1:{port}"


def connect_timeout_s() -> float:
    value = os.environ.get("SERVICES_CONNECT_TIMEOUT_S", "10")
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0.001 <= seconds <= 3600:
        raise SystemExit(f"services: SERVICES_CONNECT_TIMEOUT_S must be seconds from 0.001 to 3600, got {value!r}")
    return seconds


def start_mqtt_front(state: dict[str, object]) -> str:
    """HAProxy with scripts/mqtt-front.cfg in front of the Mosquitto started before it."""
    mosquitto = state["mosquitto"]
    assert isinstance(mosquitto, dict)
    binary, timeout = apt_program("haproxy", "haproxy"), connect_timeout_s()
    port, tls_port = configured_port("mqtt_front"), configured_port("mqtt_front_tls")
    conf = Path(__file__).resolve().parent / "mqtt-front.cfg"
    # HAProxy reads the certificate and its key from one file
    tls = Path(str(state["mosquitto_tls_ca"])).parent
    pem = tls / "front.pem"
    pem.unlink(missing_ok=True)
    with os.fdopen(os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
        out.write((tls / "server.pem").read_bytes() + (tls / "server.key").read_bytes())
    env = {"PIGEON_FRONT_BIND": f"127.0.0.1:{port}", "PIGEON_FRONT_BROKER": f"127.0.0.1:{mosquitto['port']}",
           "PIGEON_FRONT_CONNECT_TIMEOUT": f"{round(timeout * 1000)}ms", "PIGEON_FRONT_IDLE_TIMEOUT": "1h",
           "PIGEON_FRONT_TLS_BIND": f"127.0.0.1:{tls_port}", "PIGEON_FRONT_TLS_CERT": str(pem)}
    run([binary, "-c", "-f", str(conf)], env={**os.environ, **env}, stdout=subprocess.DEVNULL)  # the file is sound
    proc, log = spawn("mqtt_front", [binary, "-db", "-f", str(conf)], env=env)  # -db: in the foreground
    wait_until("haproxy", lambda: port_open(port) and port_open(tls_port), 30, proc, log)
    state["mqtt_front"] = {"pid": proc.pid, "port": port, "tls_port": tls_port, "connect_timeout_s": timeout}
    return f"mqtt://127.0.0.1:{port}"


# -- commands ---------------------------------------------------------------------------------------
def load_state() -> dict[str, object]:
    return json.loads(STATE.read_text()) if STATE.exists() else {}


def up() -> None:
    STATE_DIR.mkdir(exist_ok=True)
    state = load_state()
    if any(isinstance(v, dict) and "pid" in v and alive(int(v["pid"])) for v in state.values()):
        raise SystemExit("services: already up (run 'scripts/services down' first)")
    state = {}
    exports: dict[str, str] = {}
    try:
        starters = (("PIGEON_REDIS", "redis", start_redis), ("PIGEON_MEDIA", "s3", start_minio),
                    ("PIGEON_BROKER", "mqtt", start_mosquitto), ("PIGEON_BROKER_FRONT", "mqtt", start_mqtt_front),
                    ("PIGEON_STORE", "cassandra", start_cassandra))
        for var, scheme, start in starters:
            given = os.environ.get(var, "")
            if var == "PIGEON_BROKER_FRONT":
                if "mosquitto" not in state:
                    continue  # a broker given from outside: its front, if any, is the deployment's
                given = ""  # the Mosquitto started here gets its own front, not one given for another
            if given.startswith(f"{scheme}://"):
                say(f"using {var} from the environment")
                exports[var] = given
                continue
            t0 = time.monotonic()
            exports[var] = start(state)
            STATE.write_text(json.dumps(state))
            say(f"{start.__name__.removeprefix('start_')} ready in {time.monotonic() - t0:.1f}s")
    except BaseException:
        STATE.write_text(json.dumps(state))
        down()
        raise
    if "mosquitto_credentials" in state:
        exports["PIGEON_BROKER_CREDENTIALS_FILE"] = str(state["mosquitto_credentials"])
        # the bridges sign tokens with the secret the broker's plugin checks them with
        exports["PIGEON_SECRET_FILE"] = str(state["mosquitto_secret"])
        exports["PIGEON_BROKER_AUTH"] = "plugin"
    if "cassandra_tls_url" in state:
        exports["PIGEON_STORE_TLS"] = str(state["cassandra_tls_url"])
    if "mosquitto_tls_ca" in state:
        mosquitto = state["mosquitto"]
        assert isinstance(mosquitto, dict)
        exports["PIGEON_BROKER_TLS"] = f"mqtts://127.0.0.1:{mosquitto['tls_port']}"
        exports["PIGEON_BROKER_TLS_CA_FILE"] = str(state["mosquitto_tls_ca"])
        # which Mosquitto it is: the tests hold each release to what it does (RELIABILITY.md)
        exports["SERVICES_MOSQUITTO_VERSION"] = str(mosquitto["version"])
    if "mqtt_front" in state:
        front = state["mqtt_front"]
        assert isinstance(front, dict)
        exports["PIGEON_BROKER_FRONT_TLS"] = f"mqtts://127.0.0.1:{front['tls_port']}"
        exports["SERVICES_CONNECT_TIMEOUT_S"] = f"{front['connect_timeout_s']:g}"
    state["exports"] = exports
    STATE.write_text(json.dumps(state))
    print_exports(exports)


def print_exports(exports: dict[str, str]) -> None:
    for var, value in exports.items():
        print(f"export {var}='{value}'")


def exports() -> None:
    """The export lines of the servers already up (for tools that reuse them); exit 1 if none are."""
    state = load_state()
    if not any(isinstance(v, dict) and "pid" in v and alive(int(v["pid"])) for v in state.values()):
        raise SystemExit(1)
    found = state.get("exports")
    if not isinstance(found, dict):
        raise SystemExit("services: the state file has no exports; run 'scripts/services down' and up again")
    print_exports(found)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def stop(name: str, pid: int, sig: int = signal.SIGTERM) -> None:
    """Stop one server this script started (its own process group), waiting until it is gone."""
    if not alive(pid):
        return
    say(f"stopping {name} (pid {pid})")
    try:
        os.killpg(pid, sig)  # its own session: the server and nothing else
    except OSError:
        return
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    if alive(pid):
        os.killpg(pid, signal.SIGKILL)


def down() -> None:
    state = load_state()
    for name, info in state.items():
        if isinstance(info, dict) and "pid" in info:
            stop(name, int(info["pid"]))
    if STATE.exists():
        STATE.unlink()


def restart_redis() -> None:
    """Kill the Redis this script started (SIGKILL: everything in it is lost) and start an empty
    one on the same port, as after a crash and a restart. For fault tests."""
    state = load_state()
    info = state.get("redis")
    if not isinstance(info, dict) or "pid" not in info or not alive(int(info["pid"])):
        raise SystemExit("services: no Redis of ours is running")
    port = int(info["port"])
    stop("redis", int(info["pid"]), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while port_open(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.environ["SERVICES_REDIS_PORT"] = str(port)
    start_redis(state)
    STATE.write_text(json.dumps(state))
    say(f"redis restarted on port {port} (pid {state['redis']['pid']})")  # type: ignore[index]


def status() -> None:
    for name, info in load_state().items():
        if isinstance(info, dict) and "pid" in info:
            print(f"{name}: pid {info['pid']} port {info['port']} {'up' if alive(int(info['pid'])) else 'DOWN'}")


def main() -> None:
    commands = {"up": up, "down": down, "status": status, "exports": exports, "restart-redis": restart_redis}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        raise SystemExit("usage: scripts/services up|down|status|exports|restart-redis")
    commands[sys.argv[1]]()


if __name__ == "__main__":
    main()
