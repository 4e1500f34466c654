"""Devices on a real Mosquitto that checks their tokens itself: Pigeon's pigeon_auth plugin
(broker/mosquitto/pigeon_auth.c, broker/token_plugin.py).

The broker is the one scripts/services started, with the plugin and the secret it exports as
PIGEON_SECRET_FILE; one test starts a Mosquitto of its own to restart it. Every refusal of
protocol section 2 is checked with raw MQTT packets.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import string
import struct
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiomqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.tokens import TokenSigner
from broker.dynsec import DynSecAdmin, DynSecError
from broker.token_plugin import PLUGIN_CONTROL, TokenPlugin
from clients.bench.mqtt import mqtt_str, varint
from tests.conftest import free_port, production_url, services_script
from tests.fuzz import TIMEOUT_S, examples
from tests.mqtt_raw import connack_code, connect_packet, read_packet, subscribe_packet
from tests.test_mosquitto_dynsec import broker, only_its_own_topic_reaches_the_bridge

ROOT = Path(__file__).resolve().parent.parent
DAY_MS = 86_400_000


def signer() -> TokenSigner:
    return TokenSigner(Path(production_url("PIGEON_SECRET_FILE", "/")).read_bytes().strip())


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def ids() -> tuple[str, str]:
    return "u" + uuid.uuid4().hex[:12], "d" + uuid.uuid4().hex[:12]


@pytest.fixture
async def admin_client() -> AsyncIterator[DynSecAdmin]:
    host, port, user, password = broker()
    async with DynSecAdmin(host, port, user, password) as admin:
        yield admin


@pytest.fixture
async def plugin() -> AsyncIterator[TokenPlugin]:
    host, port, user, password = broker()
    async with DynSecAdmin(host, port, user, password) as admin:
        p = TokenPlugin(admin, signer().issue, now_ms, DAY_MS, host=host, port=port)
        await p.check()
        yield p


async def test_a_device_connects_with_a_token_of_this_deployment_only() -> None:
    host, port, _, _ = broker()
    user, device = ids()
    token = signer().issue(user, device, now_ms() + 60_000)
    assert await connack_code(host, port, connect_packet(device, device, token)) == 0  # nothing registered
    refused = {
        "expired": connect_packet(device, device, signer().issue(user, device, now_ms() - 1)),
        "forged": connect_packet(device, device, token[:-1] + ("0" if token[-1] != "0" else "1")),
        "another secret": connect_packet(device, device, TokenSigner(b"x" * 32).issue(user, device, now_ms() + 60_000)),
        "another client id": connect_packet("d-someone-else", device, token),
        "another username": connect_packet(device, "d-someone-else", token),
        "no password": connect_packet(device, device),
        "not a token": connect_packet(device, device, "pg1.a.b"),
    }
    for what, packet in refused.items():
        assert await connack_code(host, port, packet) in (4, 5), what


async def test_device_permissions_are_those_of_the_protocol() -> None:
    host, port, _, _ = broker()
    user, device = ids()
    _, sibling = ids()
    token = signer().issue(user, device, now_ms() + 60_000)
    await only_its_own_topic_reaches_the_bridge(user, device, token, [
        (f"up/{user}/{sibling}", b"as a sibling"),
        (f"up/uSomeoneElse/{device}", b"as another user"),
        (f"down/{user}", b"spoof"),
        (PLUGIN_CONTROL, f"kick {sibling}\n".encode()),
    ])
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(connect_packet(device, device, token))
        refused = ["#", "up/+/+", f"down/{user}/{sibling}", "down/uSomeoneElse", f"down/{user}/+", f"down/{user}/#",
                   "$SYS/#", f"down/{user}x", f"down/{user}/v2/x"]
        for i, topic in enumerate(refused):
            writer.write(subscribe_packet(topic, 10 + i))
        for i, topic in enumerate([f"down/{user}", f"down/{user}/{device}", f"down/{user}/v2"]):
            writer.write(subscribe_packet(topic, 30 + i))
        await writer.drain()
        assert (await read_packet(reader))[1][1] == 0
        codes = [(await read_packet(reader))[1][2] for _ in range(len(refused) + 3)]
        assert codes == [0x80] * len(refused) + [1, 1, 1]
    finally:
        writer.close()


async def test_an_unlinked_device_is_closed_and_refused_from_then_on(plugin: TokenPlugin) -> None:
    host, port, _, _ = broker()
    user, device = ids()
    _, sibling = ids()
    token = signer().issue(user, device, now_ms() + 60_000)
    sibling_token = signer().issue(user, sibling, now_ms() + 60_000)
    async with aiomqtt.Client(host, port, username=sibling, password=sibling_token, identifier=sibling) as other:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(connect_packet(device, device, token))
            await writer.drain()
            assert (await read_packet(reader))[1][1] == 0
            await plugin.remove_device(device)
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # closed by the broker
        finally:
            writer.close()
        assert await connack_code(host, port, connect_packet(device, device, token)) in (4, 5)
        # kept where a restarted broker reads it again
        assert device in (Path(production_url("PIGEON_SECRET_FILE", "/")).parent / "revoked").read_text()
        # a newer token of the same device is refused too; its sibling carries on
        newer = signer().issue(user, device, now_ms() + 120_000)
        assert await connack_code(host, port, connect_packet(device, device, newer)) in (4, 5)
        await other.publish(f"up/{user}/{sibling}", json.dumps({"type": "ping"}), qos=1)


async def will_after(host: str, port: int, device: str, token: str, will_topic: str,
                     close: Callable[[], Awaitable[None]]) -> bytes | None:
    """Connect the device with a will, ``close`` it, and return the will the bridge's client
    saw published within 2 s (None if none)."""
    _, _, bridge_user, bridge_password = broker()
    async with aiomqtt.Client(host, port, username=bridge_user, password=bridge_password,
                              identifier=f"bridge-test-{uuid.uuid4().hex[:6]}") as bridge:
        await bridge.subscribe(will_topic, qos=1)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(connect_packet(device, device, token, will=(will_topic, b"gone")))
            await writer.drain()
            assert (await read_packet(reader))[1][1] == 0
            await close()
            async with asyncio.timeout(5):
                assert await reader.read() == b""  # closed by the broker
        finally:
            writer.close()
        try:
            async with asyncio.timeout(2):
                async for message in bridge.messages:
                    return bytes(message.payload) if isinstance(message.payload, bytes) else b""
        except TimeoutError:
            return None
    return None


async def test_a_kicked_device_has_its_will_published_and_may_connect_again(plugin: TokenPlugin) -> None:
    host, port, _, _ = broker()
    user, device = ids()
    token = signer().issue(user, device, now_ms() + 60_000)
    will = await will_after(host, port, device, token, f"up/{user}/{device}", lambda: plugin.kick_device(device))
    assert will == b"gone"  # as when a connection is lost: presence goes offline
    assert await connack_code(host, port, connect_packet(device, device, token)) == 0


async def test_an_unlinked_device_is_closed_without_its_will(plugin: TokenPlugin) -> None:
    host, port, _, _ = broker()
    user, device = ids()
    token = signer().issue(user, device, now_ms() + 60_000)
    assert await will_after(host, port, device, token, f"up/{user}/{device}",
                            lambda: plugin.remove_device(device)) is None


async def test_the_check_fails_clearly_when_the_broker_does_not_take_this_deployments_tokens() -> None:
    host, port, user, password = broker()
    other = TokenSigner(b"y" * 32)
    async with DynSecAdmin(host, port, user, password) as admin:
        with pytest.raises(DynSecError, match="pigeon_auth plugin"):
            await TokenPlugin(admin, other.issue, now_ms, DAY_MS, host=host, port=port).check()


@contextmanager
def own_mosquitto(home: Path, secret: Path) -> Iterator[int]:
    """A Mosquitto of the test's own with only the plugin (the services' build), on a free port;
    stopped again by its PID."""
    production_url("PIGEON_SECRET_FILE", "/")  # the services are up (skips or fails without)
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists() or not Path("/usr/include/mosquitto_broker.h").exists():
        pytest.skip("Debian's Mosquitto and its headers are not here")
    plugin = services_script().auth_plugin(None)  # this source, built as scripts/services builds it
    port = free_port()
    conf = home / "mosquitto.conf"
    # started as root, Mosquitto would become its own user, who cannot read the test's files
    conf.write_text(f"""user root
listener {port} 127.0.0.1
allow_anonymous false
persistence false
log_dest file {home / "mosquitto.log"}
plugin {plugin}
plugin_opt_secret_file {secret}
plugin_opt_revoked_file {home / "revoked"}
""")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    own_pids.append(proc.pid)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    log = (home / "mosquitto.log").read_text()
                    raise AssertionError(f"own Mosquitto did not start: {log}") from None
                time.sleep(0.1)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


own_pids: list[int] = []  # the own Mosquittos started, for a test to signal by PID


async def test_a_reload_keeps_every_device_connected(tmp_path: Path) -> None:
    """On SIGHUP (how docs/deploy.md renews certificates) Mosquitto checks every connected client
    again, with the username the plugin gave it: devices stay connected, served as before."""
    secret = tmp_path / "secret"
    secret.write_text("r" * 40)
    sign = TokenSigner(b"r" * 40)
    user, device = ids()
    with own_mosquitto(tmp_path, secret) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(connect_packet(device, device, sign.issue(user, device, now_ms() + 60_000), keepalive=600))
            await writer.drain()
            assert (await read_packet(reader))[1][1] == 0
            os.kill(own_pids[-1], signal.SIGHUP)
            await asyncio.sleep(1.0)  # the reload has run
            writer.write(subscribe_packet(f"down/{user}", 7))
            writer.write(b"\xc0\x00")  # PINGREQ
            await writer.drain()
            assert (await read_packet(reader))[1][2] == 1  # SUBACK: still itself, with its own permissions
            assert (await read_packet(reader))[0] == 0xD0  # PINGRESP
        finally:
            writer.close()


async def test_device_names_are_reserved_to_devices_with_a_token(admin_client: DynSecAdmin) -> None:
    """A dynamic-security client given a name of the plugin's form ("pg1.USER.DEVICE") would get
    that device's permissions: the plugin refuses such a name without a token."""
    host, port, _, _ = broker()
    name = f"pg1.{ids()[0]}.{ids()[1]}"
    await admin_client.run([{"command": "createClient", "username": name, "password": "a-password"}])
    try:
        assert await connack_code(host, port, connect_packet(name, name, "a-password")) in (4, 5)
    finally:
        await admin_client.run([{"command": "deleteClient", "username": name}], tolerate=["not found"])


async def test_revocations_outlive_a_restart_and_ended_ones_are_dropped(tmp_path: Path) -> None:
    """The revocations in the plugin's file are loaded when Mosquitto starts (the ones that ran
    out, and lines that are not revocations, dropped from the file), and a revoked device stays
    refused while others connect."""
    secret = tmp_path / "secret"
    secret.write_text("s" * 40 + "\n")  # surrounding whitespace is not part of a secret
    sign = TokenSigner(b"s" * 40)
    user, revoked = ids()
    _, ended = ids()
    _, fine = ids()
    (tmp_path / "revoked").write_text(f"{revoked} {now_ms() + DAY_MS}\n{ended} {now_ms() - 1}\nbroken line\n")
    with own_mosquitto(tmp_path, secret) as port:
        expires = now_ms() + 60_000
        assert await connack_code("127.0.0.1", port, connect_packet(revoked, revoked,
                                                                    sign.issue(user, revoked, expires))) in (4, 5)
        for device in (ended, fine):
            assert await connack_code("127.0.0.1", port, connect_packet(device, device,
                                                                        sign.issue(user, device, expires))) == 0
        kept = (tmp_path / "revoked").read_text().split()
        assert kept[0] == revoked and len(kept) == 2  # the ended and the broken ones are gone


# -- the plugin parses what any client sends as a password: fuzzed --------------------------
NICE_ID = st.text(string.ascii_letters + string.digits + "_-~", min_size=1, max_size=12)
ODD_ID = st.one_of(
    st.text(min_size=0, max_size=40),  # any characters: spaces, '/', '#', '+', '.', control ones
    st.integers(120, 300).map(lambda n: "d" * n),  # around and past the 128 the plugin takes
    st.sampled_from(["a.b", "a/b", "+", "#", "a b", "\x7f", "é"]),
)


def plugin_accepts(device_id: str) -> bool:
    """The ids a token may carry, as the plugin checks them (1-128 bytes; no space, control
    character, '.', '/', '+' or '#')."""
    raw = device_id.encode()
    return 1 <= len(raw) <= 128 and not any(c <= 0x20 or c == 0x7F or chr(c) in "./+#" for c in raw)


@st.composite
def credential_cases(draw: st.DrawFn, sign: TokenSigner) -> tuple[bytes, bytes, bytes, bool | None]:
    """(client id, username, password, should it be let in?): a token signed with the
    deployment's secret for nice or odd ids, or a nice one broken in one place. None: either
    way, for ids outside ASCII, which Mosquitto itself may refuse (its UTF-8 rules close a
    connection whose strings hold control characters such as U+0080, or non-characters)."""
    user = draw(st.one_of(NICE_ID, ODD_ID))
    device = draw(st.one_of(NICE_ID, ODD_ID))
    expired = draw(st.booleans())
    signed = token = sign.issue(user, device, now_ms() + (-1 if expired else 600_000)).encode()
    cid = username = device.encode()
    # a dot in an id makes the token another one (five parts no more)
    good = not expired and plugin_accepts(device) and plugin_accepts(user) and signed.count(b".") == 4
    how = draw(st.sampled_from(["as signed", "byte changed", "cut", "dot added", "part replaced", "other client",
                                "prefix only"]))
    if how == "byte changed":
        i = draw(st.integers(0, len(token) - 1))
        b = draw(st.integers(0, 255).filter(lambda x: x != token[i]))
        token = token[:i] + bytes([b]) + token[i + 1:]
    elif how == "cut":
        token = token[:draw(st.integers(0, len(token) - 1))]
    elif how == "dot added":
        i = draw(st.integers(0, len(token)))
        token = token[:i] + b"." + token[i:]
    elif how == "part replaced":
        parts = token.split(b".")
        k = draw(st.integers(0, len(parts) - 1))
        parts[k] = draw(st.one_of(st.binary(max_size=40), st.integers(0, 5000).map(lambda n: b"7" * n),
                                  st.sampled_from([b"-5", b"9" * 30, b"", parts[k].upper()])))
        token = b".".join(parts)
    elif how == "other client":
        cid = draw(st.one_of(NICE_ID, ODD_ID)).encode()
        if cid == username:
            cid += b"x"
    elif how == "prefix only":
        token = b"pg1." + draw(st.binary(max_size=300))
    if not (good and token == signed and cid == username):
        return cid, username, token, False
    return cid, username, token, True if (user + device).isascii() else None


def credentials_packet(client_id: bytes, username: bytes, password: bytes) -> bytes:
    body = mqtt_str("MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60)
    body += mqtt_str(client_id) + mqtt_str(username) + mqtt_str(password)
    return bytes([0x10]) + varint(len(body)) + body


def connack_or_closed(host: str, port: int, packet: bytes) -> int | None:
    """The CONNACK's return code, or None when the broker closed the connection without one."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(packet)
        got = b""
        while len(got) < 4:
            chunk = s.recv(4 - len(got))
            if not chunk:
                return None
            got += chunk
        return got[3]


@pytest.mark.timeout(TIMEOUT_S)
def test_fuzzed_credentials_let_in_only_good_tokens_and_the_broker_stays_up() -> None:
    host, port, _, _ = broker()
    sign = signer()
    user, device = ids()
    with socket.create_connection((host, port), timeout=5) as held:  # a device connected throughout
        held.sendall(connect_packet(device, device, sign.issue(user, device, now_ms() + 3_600_000), keepalive=600))
        assert held.recv(4) == b"\x20\x02\x00\x00"
        seen: dict[str, int] = {}

        @examples(300)
        @given(case=credential_cases(sign))
        def run(case: tuple[bytes, bytes, bytes, bool | None]) -> None:
            cid, username, password, good = case
            code = connack_or_closed(host, port, credentials_packet(cid, username, password))
            if good:
                assert code == 0, case
            elif good is False:
                assert code != 0, case  # refused (4, 5) or closed (not valid MQTT)
            seen[str(code)] = seen.get(str(code), 0) + 1
            held.sendall(b"\xc0\x00")  # PINGREQ: the connected device is still served
            assert held.recv(2) == b"\xd0\x00"

        run()
        print(f"fuzzed credentials: {seen}")
        assert seen.get("0", 0) > 0 and seen.get("5", 0) + seen.get("4", 0) > 0, seen
