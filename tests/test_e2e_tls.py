"""TLS end to end: MQTT over TLS, MQTT over WebSocket over TLS and HTTPS on the embedded profile,
with a throwaway CA (trustme); and the Mosquitto TLS listener of the production profile.

What is checked: a device trusting the server's CA logs in over HTTPS and sends and receives
over mqtts:// and wss://; one trusting another CA is refused everywhere; with TLS on, login
names only TLS endpoints, the plaintext listeners can be turned off, and the token is never
seen on the wire (a recording relay sits between the device and the server); a renewed
certificate is taken on SIGHUP; bad settings are refused before anything starts.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
import trustme

from bridge.config import Settings
from bridge.errors import ConfigError
from clients.launch import ROOT, ServerProc
from clients.sdk import Api, Device, PigeonClientError, Profile, login, tls_context
from tests.conftest import fresh_phone, production_flags, production_url, relay_pipe, tls11_client_or_skip
from tests.mqtt_raw import connect_packet

TLS_PORTS = ["--mqtts-port", "0", "--wss-port", "0", "--https-port", "0"]


@dataclass
class Pki:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost; and a CA that signed
    nothing of the server's."""

    ca: trustme.CA
    ca_file: Path
    wrong_ca_file: Path
    cert: Path
    key: Path

    def issue(self, cert: Path, key: Path, ca: trustme.CA | None = None) -> None:
        issued = (ca or self.ca).issue_cert("127.0.0.1", "localhost")
        issued.private_key_pem.write_to_path(str(key))
        issued.cert_chain_pems[0].write_to_path(str(cert))

    def flags(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key), *TLS_PORTS]


def make_pki(root: Path) -> Pki:
    root.mkdir(parents=True, exist_ok=True)
    ca, wrong = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    wrong.cert_pem.write_to_path(str(root / "wrong-ca.pem"))
    pki = Pki(ca, root / "ca.pem", root / "wrong-ca.pem", root / "cert.pem", root / "key.pem")
    pki.issue(pki.cert, pki.key)
    return pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_only(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """The embedded profile with TLS on and the plaintext listeners off."""
    srv = ServerProc.start(tmp_path_factory.mktemp("pigeon-tls-only"), *pki.flags(), "--no-plaintext")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tls_and_plain(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    """TLS on, the plaintext listeners still on beside it."""
    srv = ServerProc.start(tmp_path_factory.mktemp("pigeon-tls-plain"), *pki.flags())
    yield srv
    srv.stop()


class Recorder:
    """A TCP relay on a free loopback port that forwards to ``target`` and keeps every byte it
    carries, both ways: what anyone on the path would see."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.seen = bytearray()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Recorder:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        for task in (asyncio.create_task(relay_pipe(reader, up_writer, self.seen)),
                     asyncio.create_task(relay_pipe(up_reader, writer, self.seen))):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def bundle(out: Path, *files: Path) -> Path:
    out.write_bytes(b"".join(f.read_bytes() for f in files))
    return out


def port_of(url: str) -> int:
    return int(url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[1])


async def pair(srv: ServerProc, ca_file: Path) -> tuple[Profile, Profile]:
    a = await login(srv.https, fresh_phone(), device_name="a", ca_file=ca_file)
    b = await login(srv.https, fresh_phone(), device_name="b", ca_file=ca_file)
    return a, b


@pytest.fixture
async def devices() -> AsyncIterator[list[Device]]:
    opened: list[Device] = []
    yield opened
    for dev in reversed(opened):
        await dev.close()


async def next_msg(dev: Device, body: str) -> dict[str, object]:
    """The next message event with this body (a sender's own devices get its messages too)."""
    while True:
        event = await dev.next_event(timeout=10)
        if event.get("type") == "msg" and event.get("body") == body:
            return event


async def open_device(opened: list[Device], profile: Profile, **kw: str) -> Device:
    dev = Device(profile, **kw)  # type: ignore[arg-type]
    await dev.__aenter__()
    opened.append(dev)
    return dev


# -- the embedded profile, TLS only --------------------------------------------------------------------
async def test_login_names_only_tls_endpoints_and_plain_listeners_are_off(tls_only: ServerProc, pki: Pki) -> None:
    assert tls_only.http == "" and tls_only.mqtt_port == 0 and tls_only.ws_port == 0
    assert tls_only.https.startswith("https://") and tls_only.mqtts_port and tls_only.wss_port
    async with httpx.AsyncClient(base_url=tls_only.https, verify=tls_context(pki.ca_file)) as http:
        code = (await http.post("/v1/auth/code", json={"phone": (phone := fresh_phone())})).json()["dev_code"]
        body = (await http.post("/v1/auth/verify", json={"phone": phone, "code": code})).json()
    assert body["http_url"] == tls_only.https
    assert body["mqtt"]["url"] == f"mqtts://127.0.0.1:{tls_only.mqtts_port}"
    assert body["mqtt"]["port"] == tls_only.mqtts_port and body["mqtt"]["tls"] is True
    assert body["mqtt"]["ws_url"] == f"wss://127.0.0.1:{tls_only.wss_port}/mqtt"


async def test_devices_trusting_the_ca_send_and_receive_over_mqtts_and_wss(
        tls_only: ServerProc, pki: Pki, devices: list[Device]) -> None:
    a, b = await pair(tls_only, pki.ca_file)
    assert a.mqtt_tls and a.http_url.startswith("https://") and a.ws_url.startswith("wss://")
    dev_a = await open_device(devices, a)  # mqtts://
    dev_b = await open_device(devices, b, transport="websockets")  # wss://
    sent = await dev_a.send("over tls", to=b.user_id)
    assert (await next_msg(dev_b, "over tls"))["seq"] == sent["seq"]
    back = await dev_b.send("and back over wss", chat=sent["chat"])
    assert (await next_msg(dev_a, "and back over wss"))["seq"] == back["seq"]
    # the HTTP half of the SDK goes over HTTPS with the same CA
    history = await dev_a.api.history(sent["chat"])
    assert [m["body"] for m in history["messages"]][:2] == ["and back over wss", "over tls"]


async def test_media_goes_over_https_too(tls_only: ServerProc, pki: Pki, devices: list[Device]) -> None:
    a, b = await pair(tls_only, pki.ca_file)
    dev_a, dev_b = await open_device(devices, a), await open_device(devices, b)
    media = await dev_a.upload(b"a file over tls", "text/plain", name="f.txt")
    sent = await dev_a.send("file", to=b.user_id, media=media)
    reply = await dev_b.request({"type": "media_url", "key": media["key"], "chat": sent["chat"]})
    assert reply["url"].startswith(tls_only.https + "/")
    assert await dev_b.download(media["key"], sent["chat"]) == b"a file over tls"


async def test_a_client_trusting_another_ca_is_refused_everywhere(tls_only: ServerProc, pki: Pki) -> None:
    with pytest.raises(PigeonClientError) as refused:
        await login(tls_only.https, fresh_phone(), ca_file=pki.wrong_ca_file)
    assert refused.value.code == "unavailable" and "CERTIFICATE_VERIFY_FAILED" in refused.value.message
    good, _ = await pair(tls_only, pki.ca_file)
    wrong = replace(good, ca_file=str(pki.wrong_ca_file))
    for transport in ("tcp", "websockets"):
        dev = Device(wrong, transport=transport)
        with pytest.raises(PigeonClientError) as refused:
            await dev.__aenter__()
        assert refused.value.code == "connect_refused", transport
    # the system's CAs do not know the throwaway CA either
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        async with httpx.AsyncClient(verify=tls_context(None)) as http:
            await http.get(f"{tls_only.https}/healthz")


async def test_no_old_protocol_versions_and_no_plaintext_on_the_tls_ports(tls_only: ServerProc, pki: Pki) -> None:
    # TLS 1.1 is refused (once a control shows this machine's OpenSSL speaks it)
    old = await tls11_client_or_skip(lambda ctx: ctx.load_verify_locations(str(pki.ca_file)),
                                     lambda ctx: ctx.load_cert_chain(str(pki.cert), str(pki.key)))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _, writer = await asyncio.open_connection("127.0.0.1", tls_only.mqtts_port, ssl=old)
        writer.close()
    # a TLS 1.2+ handshake gets no compression
    good = tls_context(pki.ca_file)
    _, writer = await asyncio.open_connection("127.0.0.1", tls_only.mqtts_port, ssl=good)
    tls = writer.get_extra_info("ssl_object")
    assert tls.version() in ("TLSv1.2", "TLSv1.3") and tls.compression() is None
    writer.close()
    # a plaintext CONNECT on the TLS port is no MQTT session: no CONNACK, the connection ends
    good_profile, _ = await pair(tls_only, pki.ca_file)
    reader, writer = await asyncio.open_connection("127.0.0.1", tls_only.mqtts_port)
    writer.write(connect_packet(good_profile.device_id, good_profile.device_id, good_profile.token))
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(1024), 10)
    assert not answer.startswith(b"\x20")  # a CONNACK would start with 0x20
    writer.close()
    # and plain HTTP on the HTTPS port gets no API answer
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.HTTPError):
            await http.get(f"http://127.0.0.1:{port_of(tls_only.https)}/healthz")


async def test_the_token_never_travels_in_plaintext(tls_only: ServerProc, pki: Pki, devices: list[Device]) -> None:
    """Login over HTTPS, a session over mqtts and one over wss, each through a recording relay:
    the login code, the token and the message never show in what was carried."""
    phone = fresh_phone()
    async with Recorder("127.0.0.1", port_of(tls_only.https)) as https, \
            Recorder("127.0.0.1", tls_only.mqtts_port) as mqtts, \
            Recorder("127.0.0.1", tls_only.wss_port) as wss:
        base = f"https://127.0.0.1:{https.port}"
        profile = await login(base, phone, ca_file=pki.ca_file)
        peer = await login(tls_only.https, fresh_phone(), ca_file=pki.ca_file)
        over_tcp = replace(profile, mqtt_port=mqtts.port)
        dev = await open_device(devices, over_tcp)
        await dev.send("secret words", to=peer.user_id)
        over_ws = replace(profile, ws_url=f"wss://127.0.0.1:{wss.port}/mqtt")
        ws_dev = await open_device(devices, over_ws, transport="websockets")
        await ws_dev.send("more secret words", to=peer.user_id)
        await dev.close()
        await ws_dev.close()
        devices.clear()
    for recorder in (https, mqtts, wss):
        assert len(recorder.seen) > 1000  # the relay did carry the sessions
        for secret in (profile.token.encode(), profile.device_id.encode(), phone.encode(), b"secret words"):
            assert secret not in recorder.seen


# -- TLS beside the plaintext listeners ----------------------------------------------------------------
async def test_with_plaintext_on_login_still_names_only_tls(tls_and_plain: ServerProc, pki: Pki) -> None:
    srv = tls_and_plain
    assert srv.http and srv.mqtt_port and srv.https and srv.mqtts_port
    # logging in over the plaintext listener still points the device at TLS
    async with httpx.AsyncClient(base_url=srv.http) as http:
        code = (await http.post("/v1/auth/code", json={"phone": (phone := fresh_phone())})).json()["dev_code"]
        body = (await http.post("/v1/auth/verify", json={"phone": phone, "code": code})).json()
    assert body["http_url"] == srv.https
    assert body["mqtt"]["url"] == f"mqtts://127.0.0.1:{srv.mqtts_port}" and body["mqtt"]["tls"] is True
    assert body["mqtt"]["ws_url"] == f"wss://127.0.0.1:{srv.wss_port}/mqtt"
    # the SDK moves to HTTPS for everything after such a login
    profile = await login(srv.http, fresh_phone(), ca_file=pki.ca_file)
    assert profile.http_url == srv.https and profile.mqtt_tls and profile.mqtt_port == srv.mqtts_port
    async with Api(profile) as api:
        assert (await api.me())["user_id"] == profile.user_id


async def test_the_recorder_does_see_a_plaintext_token(tls_and_plain: ServerProc, pki: Pki,
                                                       devices: list[Device]) -> None:
    """The control for the test above: over the plaintext listener the same relay sees the token."""
    profile = await login(tls_and_plain.https, fresh_phone(), ca_file=pki.ca_file)
    async with Recorder("127.0.0.1", tls_and_plain.mqtt_port) as plain:
        dev = await open_device(devices, replace(profile, mqtt_port=plain.port, mqtt_tls=False))
        await dev.close()
        devices.clear()
    assert profile.token.encode() in plain.seen


async def test_bridge_ingest_over_mqtt_with_plaintext_off(pki: Pki, tmp_path: Path, devices: list[Device]) -> None:
    """--ingest mqtt: the bridge's own MQTT connection takes the TLS listener when there is no other."""
    srv = ServerProc.start(tmp_path / "srv", *pki.flags(), "--no-plaintext", "--ingest", "mqtt")
    try:
        a, b = await pair(srv, pki.ca_file)
        dev_a, dev_b = await open_device(devices, a), await open_device(devices, b)
        sent = await dev_a.send("through the bridge's tls session", to=b.user_id)
        assert (await next_msg(dev_b, "through the bridge's tls session"))["seq"] == sent["seq"]
    finally:
        for dev in devices:
            await dev.close()
        devices.clear()
        srv.stop()


async def test_sighup_reloads_the_certificate(pki: Pki, tmp_path: Path) -> None:
    """A renewed certificate (here from another CA) is presented to new connections after SIGHUP;
    a broken file on a later SIGHUP keeps the one in use."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    pki.issue(cert, key)
    srv = ServerProc.start(tmp_path / "srv", "--tls-cert", str(cert), "--tls-key", str(key), *TLS_PORTS,
                           "--no-plaintext")
    try:
        async def healthy(ca: Path) -> bool:
            try:
                async with httpx.AsyncClient(verify=tls_context(ca)) as http:
                    return (await http.get(f"{srv.https}/healthz")).status_code == 200
            except httpx.ConnectError:
                return False

        async def mqtts_handshake(ca: Path) -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", srv.mqtts_port, ssl=tls_context(ca))
            except ssl.SSLError:
                return False
            writer.close()
            return True

        assert await healthy(pki.ca_file) and not await healthy(pki.wrong_ca_file)
        renewed = trustme.CA()
        pki.issue(cert, key, renewed)
        renewed_ca = tmp_path / "renewed-ca.pem"
        renewed.cert_pem.write_to_path(str(renewed_ca))
        assert await healthy(pki.ca_file)  # not reloaded yet
        srv.proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if await healthy(renewed_ca):
                break
            await asyncio.sleep(0.05)
        assert await healthy(renewed_ca) and not await healthy(pki.ca_file)
        assert await mqtts_handshake(renewed_ca) and not await mqtts_handshake(pki.ca_file)
        key.write_text("not a key")
        srv.proc.send_signal(signal.SIGHUP)
        for _ in range(200):  # the server says it kept the certificate in use
            if "TLS certificate not reloaded" in srv.log_path.read_text():
                break
            await asyncio.sleep(0.05)
        assert "TLS certificate not reloaded" in srv.log_path.read_text()
        assert srv.proc.poll() is None and await healthy(renewed_ca)
        assert await mqtts_handshake(renewed_ca)
    finally:
        srv.stop()


# -- the production profile: Mosquitto's TLS listener (scripts/services) ------------------------------------
async def test_mosquitto_tls_listener_end_to_end(pki: Pki, tmp_path: Path, devices: list[Device]) -> None:
    """Devices on Mosquitto's TLS listener, the bridge's own connections to Mosquitto over TLS
    too, and the bridge's HTTP API over HTTPS only: send and receive; a device that does not
    trust Mosquitto's CA is refused; the token is not seen on the way to Mosquitto."""
    broker_tls = production_url("PIGEON_BROKER_TLS", "mqtts://")
    broker_ca = Path(production_url("PIGEON_BROKER_TLS_CA_FILE", "/"))
    creds = production_url("PIGEON_BROKER_CREDENTIALS_FILE", "/")
    tls_port = port_of(broker_tls)
    srv = ServerProc.start(tmp_path / "srv", *production_flags(), "--broker", f"{broker_tls}?public={broker_tls}",
                           "--broker-ca-file", str(broker_ca), "--broker-credentials-file", creds,
                           *pki.flags(), "--no-plaintext")
    try:
        assert srv.http == "" and srv.mqtts_port == tls_port
        # the bridge's HTTPS certificate and Mosquitto's come from two CAs: the devices trust both
        both = bundle(tmp_path / "both-cas.pem", pki.ca_file, broker_ca)
        a, b = await pair(srv, both)
        assert a.mqtt_tls and (a.mqtt_host, a.mqtt_port) == ("127.0.0.1", tls_port)
        dev_b = await open_device(devices, b)
        async with Recorder("127.0.0.1", tls_port) as wire:
            dev_a = await open_device(devices, replace(a, mqtt_port=wire.port))
            sent = await dev_a.send("through mosquitto over tls", to=b.user_id)
            assert (await next_msg(dev_b, "through mosquitto over tls"))["seq"] == sent["seq"]
            await dev_a.close()
            devices.remove(dev_a)
        assert len(wire.seen) > 500 and a.token.encode() not in wire.seen and b"through mosquitto" not in wire.seen
        wrong = Device(replace(a, ca_file=str(pki.ca_file)))  # trusts the HTTPS CA, not Mosquitto's
        with pytest.raises(PigeonClientError) as refused:
            await wrong.__aenter__()
        assert refused.value.code == "connect_refused"
    finally:
        for dev in devices:
            await dev.close()
        devices.clear()
        srv.stop()


async def test_the_same_settings_from_pigeon_variables(pki: Pki, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in (("PIGEON_TLS_CERT", str(pki.cert)), ("PIGEON_TLS_KEY", str(pki.key)),
                        ("PIGEON_PLAINTEXT", "false"), ("PIGEON_MQTTS_PORT", "0"), ("PIGEON_WSS_PORT", "0"),
                        ("PIGEON_HTTPS_PORT", "0")):
        monkeypatch.setenv(name, value)
    srv = ServerProc.start(tmp_path / "srv")
    try:
        assert srv.http == "" and srv.mqtt_port == 0 and srv.ws_port == 0
        assert srv.https and srv.mqtts_port and srv.wss_port
        profile = await login(srv.https, fresh_phone(), ca_file=pki.ca_file)
        assert profile.mqtt_tls and profile.mqtt_port == srv.mqtts_port
    finally:
        srv.stop()


# -- the pigeon command ----------------------------------------------------------------------------------
async def test_cli_logs_in_and_sends_over_tls(tls_only: ServerProc, pki: Pki, tmp_path: Path,
                                              devices: list[Device]) -> None:
    peer = await login(tls_only.https, fresh_phone(), ca_file=pki.ca_file)
    dev_peer = await open_device(devices, peer)
    prof = tmp_path / "cli.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIGEON_")}
    run = [sys.executable, "-m", "clients.cli"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*run, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    refused = await asyncio.to_thread(cli, "login", fresh_phone(), "--server", tls_only.https,
                                      "--ca-file", str(pki.wrong_ca_file), "--profile", str(tmp_path / "no.json"))
    assert refused.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr
    done = await asyncio.to_thread(cli, "login", fresh_phone(), "--server", tls_only.https,
                                   "--ca-file", str(pki.ca_file), "--profile", str(prof))
    assert done.returncode == 0, done.stderr
    saved = json.loads(prof.read_text())
    assert saved["mqtt_tls"] is True and saved["ca_file"] == str(pki.ca_file)
    sent = await asyncio.to_thread(cli, "send", peer.phone, "from the terminal", "--profile", str(prof))
    assert sent.returncode == 0, sent.stderr
    assert (await next_msg(dev_peer, "from the terminal"))["from"] == saved["user_id"]


def test_serve_refuses_bad_tls_settings(pki: Pki, tmp_path: Path) -> None:
    base = Settings(data_dir=tmp_path, secret=b"s" * 32)
    with pytest.raises(ConfigError, match="needs TLS"):
        replace(base, plaintext=False).validated()
    with pytest.raises(ConfigError, match="go together"):
        replace(base, tls_cert=pki.cert).validated()
    with pytest.raises(ConfigError, match="not found"):
        replace(base, tls_cert=tmp_path / "missing.pem", tls_key=pki.key).validated()
    with pytest.raises(ConfigError, match="cannot be loaded"):
        replace(base, tls_cert=pki.key, tls_key=pki.cert).validated()
    with pytest.raises(ConfigError, match="mqtts_port"):
        replace(base, tls_cert=pki.cert, tls_key=pki.key, mqtts_port=70000).validated()
    with pytest.raises(ConfigError, match="public="):
        replace(base, broker="mqtt://127.0.0.1:1883?public=ws://x:1", broker_credentials_file=pki.key).validated()
    for bad_ca in (pki.key, tmp_path / "missing.pem"):
        with pytest.raises(ConfigError, match="CA file .* cannot be loaded"):
            replace(base, broker_ca_file=bad_ca).validated()
    assert replace(base, tls_cert=pki.cert, tls_key=pki.key, plaintext=False).validated().tls
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIGEON_")}
    done = subprocess.run([sys.executable, "-m", "clients.cli", "serve", "--data-dir", str(tmp_path),
                           "--no-plaintext"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "needs TLS" in done.stderr


# -- the benchmark ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mqtt", ["mqtts", "wss"])
def test_bench_runs_over_tls_and_refuses_the_wrong_ca(pki: Pki, tmp_path: Path, mqtt: str) -> None:
    """The bench's devices speak MQTT over TLS (mqtts://) or over a WebSocket with TLS (wss://),
    and its HTTP requests go over HTTPS, all checked against --ca-file (the server has no
    plaintext listener)."""
    srv = ServerProc.start(tmp_path / "srv", *pki.flags(), "--no-plaintext", "--rate", "1000", "--burst", "2000")
    tiny = ["--workers", "1", "--seconds", "0.5", "--pairs", "2", "--window", "2", "--max-seconds", "120", "--quiet"]
    url = f"mqtts://127.0.0.1:{srv.mqtts_port}" if mqtt == "mqtts" else f"wss://127.0.0.1:{srv.wss_port}/mqtt"
    target = ["--http", srv.https, "--mqtt", url]

    def bench(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "clients.cli", "bench", "p2p", *target, *tiny, *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=280)

    try:
        out = tmp_path / "p2p.json"
        done = bench("--ca-file", str(pki.ca_file), "--json", str(out))
        assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
        result = json.loads(out.read_text())
        assert result["msgs_per_s"] > 0 and result["lost"] == 0 and result["duplicates"] == 0
        assert result["store_ops_per_msg"] > 0  # /metrics was read over HTTPS too
        refused = bench("--ca-file", str(pki.wrong_ca_file))
        assert refused.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr + refused.stdout
    finally:
        srv.stop()


def test_bench_refuses_a_malformed_websocket_address() -> None:
    for bad in ("wss://127.0.0.1/mqtt", "ws://:9001/mqtt", "wss://127.0.0.1:9001/mqtt?x=1", "wss://127.0.0.1:99999/"):
        done = subprocess.run([sys.executable, "-m", "clients.cli", "bench", "p2p", "--http", "https://127.0.0.1:1",
                               "--mqtt", bad, "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "ws://HOST:PORT/PATH" in done.stderr + done.stdout, (bad, done.stderr[-2000:])


# -- the web client in a browser ---------------------------------------------------------------------------
def spki_pin(cert: Path) -> str:
    """Chromium's pin of a certificate's key: base64 SHA-256 of its SubjectPublicKeyInfo."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


async def test_the_web_page_over_https_and_wss(tls_only: ServerProc, pki: Pki, devices: list[Device]) -> None:
    """The page at the HTTPS listener logs in and chats over wss:// with a Python device on
    mqtts://. Chromium trusts exactly the server's key (a pin); without it the page does not load."""
    from playwright.async_api import Error as PlaywrightError
    from playwright.async_api import async_playwright, expect

    from tests.web_browser import CHROMIUM_ARGS, chromium_path

    peer = await login(tls_only.https, fresh_phone(), ca_file=pki.ca_file)
    dev_peer = await open_device(devices, peer)
    pinned = [*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={spki_pin(pki.cert)}"]
    async with async_playwright() as pw:
        plain = await pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        try:
            page = await plain.new_page()
            with pytest.raises(PlaywrightError, match="ERR_CERT_AUTHORITY_INVALID"):
                await page.goto(tls_only.https)
        finally:
            await plain.close()
        browser = await pw.chromium.launch(executable_path=chromium_path(), headless=True, args=pinned)
        try:
            page = await browser.new_page()
            sockets: list[str] = []
            page.on("websocket", lambda ws: sockets.append(ws.url))
            await page.goto(tls_only.https)
            phone = fresh_phone()
            await page.get_by_test_id("phone").fill(phone)
            await page.get_by_test_id("request-code").click()
            await expect(page.get_by_test_id("code")).not_to_have_value("")
            await page.get_by_test_id("verify").click()
            await expect(page.get_by_test_id("connection")).to_have_text("online")
            assert sockets and all(url.startswith(f"wss://127.0.0.1:{tls_only.wss_port}/") for url in sockets)
            await page.get_by_test_id("new-chat-phone").fill(peer.phone)
            await page.get_by_test_id("open-chat").click()
            await expect(page.locator("#open")).to_be_visible()
            await page.get_by_test_id("compose").fill("from the browser over wss")
            await page.get_by_test_id("send").click()
            got = await next_msg(dev_peer, "from the browser over wss")
            await dev_peer.send("to the browser over mqtts", chat=str(got["chat"]))
            await expect(page.get_by_test_id("message").filter(has_text="to the browser over mqtts")).to_be_visible()
        finally:
            await browser.close()
