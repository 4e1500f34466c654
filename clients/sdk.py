"""The Pigeon Python SDK: one MQTT connection for live events, HTTP for the rest.

::

    profile = await login("http://127.0.0.1:8080", "+15550001111", dev=True)
    async with Device(profile) as dev:
        sent = await dev.send(to=peer_id, body="hello")
        async for event in dev.events():
            ...

What it does for the application:

* keeps on disk (in the profile file) the inbox position the application has taken events up
  to (from ``events()``, ``next_event()``, ``pending_events()``) and, on connect, syncs from it
  until nothing is left, so an offline device misses nothing, and events delivered but never
  taken (the process ended first) come again;
* delivers inbox events exactly once and in inbox order: a duplicate is dropped, a gap in the
  live stream triggers a sync before anything after the gap is delivered;
* acknowledges what it has delivered (which produces *delivered* receipts for senders), and
  the position it starts from once a connection is up (an ack may have been lost before);
* once closed, ends ``events()`` and answers ``next_event()`` with ``not_connected``;
* connects again by itself after a lost connection (not after ``close()``), waiting 0.5 s
  doubling to 30 s between attempts, each wait shortened by up to half at random so devices
  cut off together do not return together; each new connection subscribes again, says
  ``presence online`` and syncs from the cursor before the device counts as online again, so
  nothing sent meanwhile is missed and nothing comes twice. Only the first connection, in
  ``async with``, raises when it fails; a broker that refuses the device's credentials on a
  later attempt (token expired, device unlinked) ends the attempts, since the same token is
  refused every time. A request waiting for its reply when the connection goes fails at once
  with ``not_connected``, except ``send`` (and ``sync``): it waits for the next connection, up
  to its reply timeout an attempt, and goes again there under the same id;
* refreshes the device's token before it connects (the first time and each time again) when
  it expires within a week (``refresh_before_s``), keeping the new one in the profile;
* tells the application its connection state if it asks: ``Device.state`` is ``connecting``,
  ``online``, ``offline`` (lost, waiting to try again), ``refused`` or ``closed`` (as the
  JavaScript SDK's ``status``), ``Device.connected`` is true when online, and
  ``Device(profile, on_state=f)`` calls ``f(state)`` on every change;
* retries ``send`` under the same id, so a lost reply never produces a second message, and in
  the order the sends were made: once a send is refused (``rate_limited``, ``unavailable``) or
  unanswered, the device's later sends (new ones, and refused ones going again) wait until it
  is through, so the server numbers them in the order the application made them, as the
  protocol promises for one device's sends to a chat (docs/protocol.md section 4).

TLS: a server started with a certificate names ``https://``, ``mqtts://`` and ``wss://`` endpoints
at login, and the SDK uses them (after a login over plain HTTP too, it moves to the HTTPS URL);
pass ``ca_file=`` (kept in the profile) when its certificate is not signed by a CA the system
trusts. Certificates and host names are always checked.

Errors: :class:`PigeonClientError` (with ``.code``, the protocol's error code) for anything the
server refused, :class:`RequestTimeout` when no reply came in time.

The device speaks protocol v2 (MessagePack, fewer packets; docs/protocol.md section 5b) unless
told ``proto=1`` (JSON, as MQTT.js pages and ``mosquitto_pub`` speak). Events and replies, in
either version, are decoded into the protocol's typed envelopes (``bridge.protocol``:
``MsgEvent``, ``ReceiptEvent``, ``Sent``, ``Batch``…), the same types the bridge sends, and
validated on the way in (a payload that is not a valid event is logged and dropped). Each is
also a read-only mapping of its v1 JSON keys, so ``ev["type"]`` and ``ev == {...}`` read as
they did when events were plain dicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import ssl
import time
import uuid
from collections import ChainMap
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiomqtt
import httpx
from aiomqtt.exceptions import MqttConnectError
from cachetools import LRUCache
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bridge import wire_v2
from bridge.errors import ProtocolError
from bridge.mqtt_matcher import cycle_free_lookups
from bridge.mqtt_writes import no_delay
from bridge.protocol import (
    REPLY_TYPES,
    Attachment,
    Batch,
    ChatMessage,
    ErrorReply,
    Event,
    MediaUploadReply,
    MediaUrlReply,
    MsgEvent,
    PresenceEvent,
    ReceiptEvent,
    Sent,
    decode_payload,
    read_media,
)

log = logging.getLogger(__name__)
__all__ = ["Api", "Device", "Event", "PigeonClientError", "Profile", "RequestTimeout", "login", "request_code",
           "verify"]
CLOSE_STEP_S = 5.0
_CLOSED = object()  # put after the events once the device is closed: whoever waits for one is told
PEERS_KEPT = 4096  # direct chats remembered (one forgotten costs a sync when its peer writes next)
PEERS_SAVED = 512  # of those, kept in the profile (written with the sync cursor)
UNRESOLVED_KEPT = 1024
ABANDONED_KEPT = 1024  # requests given up on whose late replies are recognised
V2_ACK_DELAY_S = 1.0  # v2: at most one ack a second (each ack makes a delivered receipt per chat it covers)
REFRESH_BEFORE_S = 7 * 86_400  # a token that expires within this is refreshed before connecting
RECONNECT_FIRST_S = 0.5  # the wait before the first attempt to connect again, doubled after each failure ...
RECONNECT_MAX_S = 30.0  # ... up to this (each wait shortened by up to half at random)


def ack_wait(last_ack: float | None, now: float, delay: float, *, leading: bool) -> float:
    """How long to gather acks before the next goes. v1 (``leading`` false): ``delay`` after the
    first event to ack. v2: at once when none went in the last ``delay`` (a lone message is
    told delivered at once), else until ``delay`` after the last one (a stream of messages
    makes one ack, and so one delivered receipt per chat, per ``delay``)."""
    if not leading:
        return delay
    if last_ack is None:
        return 0.0
    return max(0.0, last_ack + delay - now)


class PigeonClientError(Exception):
    """The server refused a request; ``code`` is the protocol's error code."""

    def __init__(self, code: str, message: str, status: int | None = None, retry_after_ms: int | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.retry_after_ms = retry_after_ms


class RequestTimeout(PigeonClientError):
    def __init__(self, message: str) -> None:
        super().__init__("timeout", message)


@dataclass(slots=True)
class Profile:
    """A linked device: where the server is, who we are, and how far we have synced."""

    http_url: str
    user_id: str
    device_id: str
    token: str
    expires_at: int
    mqtt_host: str
    mqtt_port: int
    ws_url: str
    phone: str = ""
    cursor: int = 0
    mqtt_tls: bool = False  # MQTT (and the WebSocket) over TLS, as login said
    ca_file: str | None = None  # the CA the server's certificate is checked against (None: the system's)
    # protocol v2 request ids: every number below this one may have been used by this device
    # (0: not known, so the next Device seeds its counter from the clock; see Device._new_id)
    ids_from: int = 0
    # the protocol login said this device reads user events in: 2 only on down/{user}/v2, so a
    # Device of this profile speaks v2 (a profile saved before this field existed said 1)
    proto: int = 1
    # v2: the direct chat with each peer learnt last (a live msg from the peer leaves it out;
    # one not known here costs a sync), the newest PEERS_SAVED, so a restart keeps them
    peers: dict[str, str] = field(default_factory=dict)
    path: str | None = field(default=None, repr=False)

    def save(self, path: Path | str | None = None, *, durable: bool = False) -> None:
        """Write the profile (atomically: a new file put in place); ``durable`` also waits
        until it is on disk."""
        target = Path(path or self.path or "")
        if not str(target):
            return
        self.path = str(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data.pop("path")
        tmp = target.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, target)
        if durable:
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    @classmethod
    def load(cls, path: Path | str) -> Profile:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise PigeonClientError("not_logged_in", f"no profile at {path}; run 'pigeon login' first") from exc
        return cls(**data, path=str(path))


def tls_context(ca_file: str | Path | None = None) -> ssl.SSLContext:
    """A client context: TLS 1.2 or newer, the server's certificate and host name checked against
    ``ca_file`` (or the system's CAs when None)."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise PigeonClientError("bad_ca_file", f"CA file {ca_file} cannot be loaded: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def parse_mqtt_url(url: str) -> tuple[str, int, bool]:
    """``mqtt://HOST:PORT``, ``mqtts://HOST:PORT`` or ``HOST:PORT`` → (host, port, tls); the port
    defaults to 1883 (mqtt) or 8883 (mqtts)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "mqtt", url
    if scheme not in ("mqtt", "mqtts"):
        raise PigeonClientError("bad_request", f"an MQTT address is mqtt://HOST:PORT or mqtts://HOST:PORT, not {url!r}")
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not colon:
        host, port = rest.rstrip("/"), "8883" if scheme == "mqtts" else "1883"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PigeonClientError("bad_request", f"an MQTT address is mqtt://HOST:PORT or mqtts://HOST:PORT, not {url!r}")
    return host.strip("[]"), int(port), scheme == "mqtts"


def _http(base_url: str | None = None, ca_file: str | Path | None = None, **kw: Any) -> httpx.AsyncClient:
    """An HTTP client; https:// URLs are checked against ``ca_file`` (or the system's CAs)."""
    return httpx.AsyncClient(base_url=base_url or "", verify=tls_context(ca_file), **kw)


def _raise_for(resp: httpx.Response) -> Any:
    if resp.status_code < 400:
        return resp.json() if resp.content else None
    try:
        err = resp.json()["error"]
        raise PigeonClientError(err["code"], err["message"], resp.status_code, err.get("retry_after_ms"))
    except (ValueError, KeyError, TypeError):
        raise PigeonClientError("http_error", f"HTTP {resp.status_code}", resp.status_code) from None


def _absolute(path: str | Path | None) -> str | None:
    """As kept in a profile: absolute, so the profile works from any directory."""
    return os.path.abspath(path) if path is not None else None


async def _post(http_url: str, path: str, body: dict[str, Any], ca_file: str | Path | None) -> Any:
    async with _http(http_url, ca_file, timeout=10) as http:
        try:
            resp = await http.post(path, json=body)
        except httpx.HTTPError as exc:  # refused, or a certificate that does not check out
            raise PigeonClientError("unavailable", f"cannot reach {http_url}: {exc}") from exc
        return _raise_for(resp)


async def request_code(http_url: str, phone: str, *, ca_file: str | Path | None = None) -> str | None:
    """Ask for a login code; returns it when the server runs in dev mode."""
    reply = await _post(http_url, "/v1/auth/code", {"phone": phone}, ca_file)
    return reply.get("dev_code") if isinstance(reply, dict) else None


async def verify(http_url: str, phone: str, code: str, device_name: str = "python-sdk",
                 platform: str = "python", *, ca_file: str | Path | None = None, proto: int = 2) -> Profile:
    """Link a new device with the code sent to ``phone``. ``proto``: the protocol its
    :class:`Device` will speak; 2 (the default) tells the server the device never reads the
    v1 topic ``down/{user}`` (docs/protocol.md section 1), 1 keeps that possible."""
    if proto not in (1, 2):
        raise ValueError("proto must be 1 or 2")
    r = await _post(http_url, "/v1/auth/verify", {
        "phone": phone, "code": code, "device_name": device_name, "platform": platform, "proto": proto}, ca_file)
    mqtt = r["mqtt"]
    named = r.get("http_url")
    if isinstance(named, str) and named.startswith("https://") and not http_url.startswith("https://"):
        http_url = named  # logged in over plain HTTP to a server with TLS: the token goes over HTTPS from now on
    host, port, secure = mqtt["host"], mqtt["port"], False
    if mqtt.get("url"):  # mqtts:// when the server serves MQTT over TLS
        host, port, secure = parse_mqtt_url(mqtt["url"])
    return Profile(
        http_url=http_url, user_id=r["user_id"], device_id=r["device_id"], token=r["token"],
        expires_at=r["expires_at"], mqtt_host=host, mqtt_port=port, ws_url=mqtt["ws_url"], phone=phone,
        mqtt_tls=secure, ca_file=_absolute(ca_file),
        ids_from=1,  # login made a new device: no id has been used by it yet
        proto=int(r.get("proto", 1)),  # (a server before 2026-12-01 took none: its devices read v1)
    )


async def login(http_url: str, phone: str, *, dev: bool = True, code: str | None = None,
                device_name: str = "python-sdk", save_to: Path | str | None = None,
                ca_file: str | Path | None = None, proto: int = 2) -> Profile:
    """Link a new device. In dev mode the code comes back from the server; otherwise pass it.
    ``ca_file``: the CA the server's certificate is checked against, when the system does not
    trust it (kept in the profile for the MQTT and HTTP connections that follow)."""
    if code is None:
        code = await request_code(http_url, phone, ca_file=ca_file)
        if code is None:
            raise PigeonClientError("code_required", "the server sent the code by SMS; pass code=")
    profile = await verify(http_url, phone, code, device_name, ca_file=ca_file, proto=proto)
    if save_to is not None:
        profile.save(save_to)
    return profile


class Api:
    """The HTTP half: chats, groups, history, receipts, users, media."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self._http = _http(profile.http_url, profile.ca_file, timeout=30,
                           headers={"Authorization": f"Bearer {profile.token}"})

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = await self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise PigeonClientError("unavailable", f"cannot reach {self.profile.http_url}: {exc}") from exc
        return _raise_for(resp)

    async def refresh(self) -> dict[str, Any]:
        """A new token for this device (``POST /v1/auth/refresh``): kept in the profile (saved
        when it has a file) and used from now on, here and by the device's next connection."""
        got = dict(await self._call("POST", "/v1/auth/refresh"))
        self.profile.token, self.profile.expires_at = str(got["token"]), int(got["expires_at"])
        self._http.headers["Authorization"] = f"Bearer {self.profile.token}"
        self.profile.save()
        return got

    async def me(self) -> dict[str, Any]:
        return dict(await self._call("GET", "/v1/me"))

    async def rename(self, name: str) -> dict[str, Any]:
        return dict(await self._call("PATCH", "/v1/me", json={"name": name}))

    async def find_user(self, phone: str) -> str:
        return str((await self._call("GET", "/v1/users", params={"phone": phone}))["user_id"])

    async def user(self, user_id: str) -> dict[str, Any]:
        """Phone and name of oneself or of a user one shares a chat with."""
        return dict(await self._call("GET", f"/v1/users/{user_id}"))

    async def chats(self) -> list[dict[str, Any]]:
        return list((await self._call("GET", "/v1/chats"))["chats"])

    async def get_chat(self, chat: str) -> dict[str, Any]:
        return dict(await self._call("GET", f"/v1/chats/{chat}"))

    async def open_direct(self, peer: str) -> dict[str, Any]:
        return dict(await self._call("POST", "/v1/chats", json={"kind": "direct", "peer": peer}))

    async def create_group(self, title: str, members: list[str]) -> dict[str, Any]:
        return dict(await self._call("POST", "/v1/chats", json={"kind": "group", "title": title, "members": members}))

    async def add_member(self, chat: str, user_id: str) -> dict[str, Any]:
        return dict(await self._call("POST", f"/v1/chats/{chat}/members", json={"user_id": user_id}))

    async def remove_member(self, chat: str, user_id: str) -> dict[str, Any]:
        return dict(await self._call("DELETE", f"/v1/chats/{chat}/members/{user_id}"))

    async def history(self, chat: str, before: int | None = None, limit: int = 50) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if before is not None:
            params["before"] = before
        return dict(await self._call("GET", f"/v1/chats/{chat}/messages", params=params))

    async def post_message(self, chat: str, body: str, id: str | None = None) -> dict[str, Any]:
        return dict(await self._call("POST", f"/v1/chats/{chat}/messages",
                                     json={"id": id or uuid.uuid4().hex, "body": body}))

    async def receipts(self, chat: str) -> list[dict[str, Any]]:
        return list((await self._call("GET", f"/v1/chats/{chat}/receipts"))["receipts"])

    async def presence(self, user_id: str) -> dict[str, Any]:
        return dict(await self._call("GET", f"/v1/users/{user_id}/presence"))

    async def set_push(self, provider: str, token: str | Mapping[str, Any], *,
                       device_id: str | None = None) -> dict[str, Any]:
        """Where this device is woken when none of the user's devices is connected (protocol
        section 7): ``webpush`` with the browser's subscription object, ``fcm`` or ``apns`` with
        the platform's device token, ``webhook`` with a URL. ``device_id`` defaults to this
        device (the only one the server accepts)."""
        return dict(await self._call("PUT", f"/v1/devices/{device_id or self.profile.device_id}/push",
                                     json={"provider": provider, "token": token}))

    async def clear_push(self, *, device_id: str | None = None) -> dict[str, Any]:
        """Stop waking this device."""
        return dict(await self._call("DELETE", f"/v1/devices/{device_id or self.profile.device_id}/push"))

    async def devices(self) -> list[dict[str, Any]]:
        """The user's linked devices, each with the provider that wakes it (or None)."""
        return list((await self._call("GET", "/v1/devices"))["devices"])

    async def vapid_public_key(self) -> str:
        """The server's VAPID key, the ``applicationServerKey`` of a browser's push subscription."""
        return str((await self._call("GET", "/v1/push/vapid"))["public_key"])

    async def put_blob(self, upload: Mapping[str, Any], data: bytes) -> None:
        """Upload bytes with a presigned ticket (PUT or POST form), straight to storage."""
        async with _http(None, self.profile.ca_file, timeout=120) as raw:
            if upload["method"] == "PUT":
                resp = await raw.put(upload["url"], content=data, headers=dict(upload.get("headers") or {}))
            else:
                resp = await raw.post(upload["url"], data=dict(upload.get("fields") or {}),
                                      files={"file": ("upload", data)})
        if resp.status_code >= 300:
            raise PigeonClientError("upload_failed", f"storage refused the upload: HTTP {resp.status_code}",
                                    resp.status_code)

    async def get_blob(self, url: str) -> bytes:
        async with _http(None, self.profile.ca_file, timeout=120) as raw:
            resp = await raw.get(url)
        if resp.status_code >= 300:
            raise PigeonClientError("download_failed", f"storage refused the download: HTTP {resp.status_code}",
                                    resp.status_code)
        return resp.content


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a background publish's outcome as seen (the caller may have stopped waiting)."""
    if not task.cancelled():
        task.exception()


def _abandon(client: aiomqtt.Client) -> None:
    """Drop a connection without waiting: a DISCONNECT if it is up (the socket closes once it
    is written), nothing if it is gone already. One still being made is dropped as soon as the
    broker accepts it: aiomqtt connects in a thread that a cancellation does not stop, and the
    connection it makes would otherwise stay up behind a closed device (online to the broker)."""
    paho = client._client

    def drop(*_: Any) -> None:
        with contextlib.suppress(Exception):
            paho.disconnect()

    paho.on_connect = drop
    drop()


def _credentials_refused(exc: aiomqtt.MqttError) -> bool:
    """The broker's CONNACK refused the token (bad credentials, not authorized): the same token
    is refused on every attempt. (paho gives 3.1.1's codes 4 and 5 as MQTT 5's 134 and 135.)"""
    if not isinstance(exc, MqttConnectError):
        return False
    rc = getattr(exc.rc, "value", exc.rc)
    return rc in (4, 5, 134, 135)


ID_BLOCK = 256  # v2 request ids recorded as used at a time (see Device._new_id)
BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"


class Device:
    """A connected device: requests over MQTT, events in inbox order, cursor kept on disk.

    It speaks protocol v2 (docs/protocol.md section 5b) unless given ``proto=1``: requests
    and events in MessagePack, short request ids, events at QoS 0, at most one ack a second,
    and no copy of its own messages (``send`` puts the message in the event stream itself, at
    the inbox position its ``sent`` names). What v2 leaves out of live events it fills in: the
    direct chat of a message from its peer (known from a ``send`` to them, or fetched by sync
    the first time) and the high bits of a live time (placed by the server's clock as the
    latest batch gave it). An application sees the same events either way."""

    def __init__(self, profile: Profile, *, keepalive: int = 240, transport: str = "tcp",
                 reply_timeout: float = 10.0, ack_delay: float | None = None, proto: int = 2,
                 mqtt5: bool = False, on_state: Callable[[str], object] | None = None,
                 refresh_before_s: float = REFRESH_BEFORE_S) -> None:
        """``ack_delay``: how long acks are gathered before one goes (default 0.05 s); with v2,
        which acks at QoS 0, the least time between two acks (default 1 s, ``V2_ACK_DELAY_S``:
        fewer acks and fewer delivered receipts; the first ack after a quiet second goes at once).
        ``mqtt5``: connect over MQTT 5 (for a broker that speaks it, such as Mosquitto; not the
        embedded one) and, when the broker's CONNACK allows topic aliases, name the ``up`` topic
        once and publish with its alias alone after that. ``on_state``: called with the new
        :attr:`state` whenever it changes (the module's docstring). ``refresh_before_s``: before
        each connection, a token that expires within this long is refreshed first."""
        if proto not in (1, 2):
            raise ValueError("proto must be 1 or 2")
        if proto == 1 and profile.proto == 2:
            raise ValueError("this device logged in saying it reads protocol v2 only; "
                             "log in with proto=1 for a device that speaks v1")
        if mqtt5 and transport != "tcp":
            raise ValueError("mqtt5 is for the tcp transport (the embedded broker's WebSocket speaks 3.1.1)")
        self.proto = proto
        self.mqtt5 = mqtt5
        self._alias = 0  # MQTT 5: the up topic's alias (1) once the broker's CONNACK allows one
        self._alias_named = False  # ... and whether a publish that named the topic went out
        self._next_id = 0  # v2: the number of the next request id (0: not started; see _new_id)
        self._ids_reserved = 0  # v2: ids up to here are recorded as used in the profile
        self.profile = profile
        self.api = Api(profile)
        self._keepalive = keepalive
        self._transport = transport
        self._reply_timeout = reply_timeout
        self._ack_delay = ack_delay if ack_delay is not None else (V2_ACK_DELAY_S if proto == 2 else 0.05)
        self._ack_at: float | None = None  # loop time of the last ack
        self._client: aiomqtt.Client | None = None
        self._pending: dict[str, asyncio.Future[Event]] = {}
        self._send_chats: dict[str, str] = {}  # request id -> the chat a pending send named (v2's sent omits it)
        # requests given up on (no reply in time) -> for a send, its (to, body, media), whose late
        # ``sent`` puts the application's own message in the stream (as ``send`` would have); and
        # the chats such sends named (their late v2 ``sent`` omits it)
        self._abandoned: LRUCache[str, tuple[str | None, str | None, Mapping[str, Any] | None] | None] = (
            LRUCache(ABANDONED_KEPT))
        self._abandoned_chats: LRUCache[str, str] = LRUCache(ABANDONED_KEPT)
        self._reply_chats = ChainMap(self._send_chats, self._abandoned_chats)  # (read by the decoder)
        # every send not through yet, by its place among the device's sends -> set once it is:
        # a send going again waits for the earlier ones (see _after_earlier_sends)
        self._sends_open: dict[int, asyncio.Event] = {}
        # sends in the order they were made, and those of them going again (refused or
        # unanswered) -> set once they are through: a later send waits for every earlier one here
        self._sends_made = 0
        self._sends_again: dict[int, asyncio.Event] = {}
        # v2: user -> the direct chat with them (a live msg from the peer leaves it out), and the
        # inbox positions of live msgs that left out a chat not known here -> their sender
        self._peers: LRUCache[str, str] = LRUCache(PEERS_KEPT)
        self._peers.update(profile.peers)
        self._unresolved: LRUCache[int, str | None] = LRUCache(UNRESOLVED_KEPT)
        # v2: the server's clock (ms) as the latest batch gave it, and this loop's time then: the
        # estimate that places the shortened times of live events (see _server_now)
        self._server_clock: tuple[int, float] | None = None
        self._events: asyncio.Queue[Any] = asyncio.Queue()  # events, then _CLOSED once closed
        self._side: asyncio.Queue[Event] = asyncio.Queue()
        self._cursor = profile.cursor  # the inbox position delivered up to (to the queue above)
        # ... and the one the application has taken up to: what the profile keeps, so a restart
        # delivers again what was delivered but never taken (lost with the process otherwise)
        self._taken = profile.cursor
        # what was acked on this connection: none yet, so the first sync acks the cursor (an ack
        # sent at QoS 0, or just before a close, may never have reached the server)
        self._acked = 0
        self._buffer: dict[int, Any] = {}
        self._sync_lock = asyncio.Lock()
        self._sync_wanted = asyncio.Event()
        self._ack_wanted = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._closing = False
        self._state = "connecting"
        self._on_state = on_state
        self._refresh_before_ms = refresh_before_s * 1000
        # set while a connection is up (subscribed), and for good once no other will come: what
        # a send made while disconnected waits for (see _until_connected)
        self._connected = asyncio.Event()
        self._entered = False  # the first connection caught up: a lost one is connected again from now on
        self._stopped = False  # no connection will come again (closed, refused, or lost while entering)
        self._failures = 0  # attempts to connect again that failed since the last that caught up
        self.up = f"up/{profile.user_id}/{profile.device_id}"
        self._last_publish = 0.0  # loop time of the last publish: the server's sign of life

    @property
    def cursor(self) -> int:
        return self._cursor

    @property
    def state(self) -> str:
        """``connecting``, ``online``, ``offline``, ``refused`` or ``closed`` (the module's docstring)."""
        return self._state

    @property
    def connected(self) -> bool:
        """Online: connected, subscribed and caught up with the inbox."""
        return self._state == "online"

    def _set_state(self, state: str) -> None:
        if state == self._state:
            return
        self._state = state
        if self._on_state is not None:
            try:
                self._on_state(state)
            except Exception:  # (the application's callback must not stop the device)
                log.exception("on_state callback failed")

    # -- lifecycle --------------------------------------------------------------------------------
    def _mqtt_client(self) -> aiomqtt.Client:
        client = self._new_mqtt_client()
        no_delay(client._client)  # each publish leaves at once, not after the broker's delayed ACK
        cycle_free_lookups(client._client)  # no garbage cycle per event read
        return client

    def _new_mqtt_client(self) -> aiomqtt.Client:
        p = self.profile
        offline = self._encode({"type": "presence", "state": "offline"})
        if self._transport == "websockets":
            scheme, _, rest = p.ws_url.partition("://")
            host_port = rest.split("/", 1)[0]
            host, port = host_port.rsplit(":", 1)
            return aiomqtt.Client(
                host, int(port), identifier=p.device_id, username=p.device_id, password=p.token,
                clean_session=True, keepalive=self._keepalive, transport="websockets", websocket_path="/mqtt",
                will=aiomqtt.Will(self.up, offline, qos=1), protocol=aiomqtt.ProtocolVersion.V311,
                tls_context=tls_context(p.ca_file) if scheme == "wss" else None,
            )
        if self.mqtt5:
            # a clean start with no session expiry: nothing is kept after a disconnect, as with
            # 3.1.1's clean session; no Topic Alias Maximum is offered, so the broker names
            # every topic it sends (paho does not resolve aliases that come in)
            client = aiomqtt.Client(
                p.mqtt_host, p.mqtt_port, identifier=p.device_id, username=p.device_id, password=p.token,
                clean_start=True, keepalive=self._keepalive, will=aiomqtt.Will(self.up, offline, qos=1),
                protocol=aiomqtt.ProtocolVersion.V5, tls_context=tls_context(p.ca_file) if p.mqtt_tls else None,
            )
            paho = client._client
            connected: Any = paho.on_connect  # aiomqtt's (it reads no CONNACK properties)

            def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any = None) -> None:
                self._alias = 1 if getattr(props, "TopicAliasMaximum", 0) >= 1 else 0
                self._alias_named = False
                connected(c, userdata, flags, reason, props)

            paho.on_connect = on_connect
            return client
        return aiomqtt.Client(
            p.mqtt_host, p.mqtt_port, identifier=p.device_id, username=p.device_id, password=p.token,
            clean_session=True, keepalive=self._keepalive, will=aiomqtt.Will(self.up, offline, qos=1),
            protocol=aiomqtt.ProtocolVersion.V311, tls_context=tls_context(p.ca_file) if p.mqtt_tls else None,
        )

    def _up(self) -> tuple[str, Properties | None]:
        """The topic and properties of a publish on the up topic: on MQTT 5 with an alias
        allowed, the topic with alias 1 until one such publish has gone out, then "" and the
        alias alone."""
        if not self._alias:
            return self.up, None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.TopicAlias = self._alias
        return ("" if self._alias_named else self.up), props

    def _named(self, published: asyncio.Future[Any] | None = None) -> None:
        """A publish that named the up topic with its alias went out (the broker has the alias)."""
        if published is None or (not published.cancelled() and published.exception() is None):
            self._alias_named = self._alias_named or bool(self._alias)

    async def __aenter__(self) -> Device:
        """Connect, subscribe, say online and sync; raises when any of it fails (only a
        connection lost after this returned is made again by itself)."""
        await self._refresh_if_due()
        client = self._mqtt_client()
        try:
            await client.__aenter__()
        except BaseException as exc:  # (refused, unanswered, or cancelled: a connection that
            # comes up after all is dropped, see _abandon)
            _abandon(client)
            await self.api.close()
            if isinstance(exc, aiomqtt.MqttError):
                raise PigeonClientError("connect_refused", str(exc)) from exc
            raise
        self._client = client
        try:
            await self._subscribe(client)
            self._connected.set()
            self._runner = asyncio.create_task(self._run(client), name=f"pigeon-device-{self.profile.device_id}")
            await self._publish(self._online())
            await self.sync()
        except BaseException:  # (the connection and the background tasks do not outlive a failed start)
            await self.close()
            raise
        self._entered = True
        self._set_state("online")
        return self

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        # v2 devices take their user's events from the v2 topic (docs/protocol.md)
        await client.subscribe(f"down/{self.profile.user_id}{'/v2' if self.proto == 2 else ''}", qos=1)
        await client.subscribe(f"down/{self.profile.user_id}/{self.profile.device_id}", qos=1)

    def _online(self) -> dict[str, Any]:
        """``presence online`` stating the keepalive, which this device keeps with publishes the
        server sees (_heartbeat_loop): the server then marks it offline 1.5 × keepalive after it
        goes silent, whatever the broker's own keepalive check does."""
        return {"type": "presence", "state": "online", "keepalive": self._keepalive}

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Acknowledge what was delivered, say offline, and disconnect; each step is bounded
        by ``CLOSE_STEP_S`` so closing never hangs on a broker that stopped answering."""
        if self._client is not None:
            await self._bounded("final ack", self._flush_ack())
            await self._bounded("offline presence", self._publish({"type": "presence", "state": "offline"}))
        # The loops also stop on this flag: on Python 3.11, asyncio.wait_for (which aiomqtt
        # uses for every publish) can swallow a cancellation that lands as its PUBACK arrives,
        # and a loop that lost its cancellation would otherwise wait for work forever.
        self._closing = True
        self._stop()
        self._ack_wanted.set()
        self._sync_wanted.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()  # (a wait before connecting again, or an attempt, ends here)
            await self._settle(runner)
        client = self._client  # (read once the runner stopped: it may have connected again meanwhile)
        if client is not None:
            await self._bounded("disconnect", client.__aexit__(None, None, None))
        if runner is not None and not runner.done():
            await self._settle(runner)  # the read loop ends once the connection is gone
        self._client = None
        await self.api.close()
        self._save_cursor()
        self._set_state("closed")
        self._events.put_nowait(_CLOSED)  # whoever waits for an event is told

    @staticmethod
    async def _settle(runner: asyncio.Task[None]) -> None:
        """Wait at most ``CLOSE_STEP_S`` for the background task; waiting never cancels it."""
        await asyncio.wait({runner}, timeout=CLOSE_STEP_S)
        if runner.done():
            if not runner.cancelled() and runner.exception() is not None:
                log.debug("background tasks ended with %r", runner.exception())
        else:
            log.warning("closing: background tasks did not stop within %.0fs", CLOSE_STEP_S)

    @staticmethod
    async def _bounded(what: str, step: Awaitable[Any]) -> None:
        try:
            async with asyncio.timeout(CLOSE_STEP_S):
                await step
        except (TimeoutError, aiomqtt.MqttError, OSError, PigeonClientError) as exc:
            log.warning("closing: %s did not complete (%s)", what, type(exc).__name__)

    async def _run(self, client: aiomqtt.Client) -> None:
        """The background work: the loops outlive connections, the read loop is one connection's."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._connection_loop(client), name="connection")
            tg.create_task(self._sync_loop(), name="gap-sync")
            tg.create_task(self._ack_loop(), name="ack")
            tg.create_task(self._heartbeat_loop(), name="heartbeat")

    async def _connection_loop(self, client: aiomqtt.Client) -> None:
        """Read the connection's events until it is lost, then connect again (unless closed,
        refused, or lost before ``__aenter__`` was through, which then raises) and catch up
        beside the new connection's read loop (the sync's reply comes through it)."""
        catching: asyncio.Task[None] | None = None
        while True:
            reading = asyncio.create_task(self._read_loop(client), name="read")
            reading.add_done_callback(_retrieve)
            try:
                await reading
            except aiomqtt.MqttError as exc:
                if not self._closing:
                    log.warning("connection lost (%s); connecting again", exc)
            finally:
                reading.cancel()
                if catching is not None:
                    catching.cancel()
            self._lost(client)
            if self._closing or not self._entered:
                self._stop()
                return
            again = await self._connect_again()
            if again is None:
                self._stop()
                self._set_state("refused")
                return
            client = again
            catching = asyncio.create_task(self._catch_up(client), name="catch-up")
            catching.add_done_callback(_retrieve)

    def _lost(self, client: aiomqtt.Client) -> None:
        """The connection is gone: requests waiting for a reply on it are told ``not_connected``
        (``send`` goes again on the next), and nothing is acked on the next one yet."""
        if self._client is client:
            self._client = None
        _abandon(client)
        self._connected.clear()
        self._acked = 0
        if not self._closing:
            self._set_state("offline")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(PigeonClientError("not_connected", "the connection was lost before the reply came"))
                _retrieve(fut)  # (watch never awaits its marker)

    def _stop(self) -> None:
        """No connection will come again: whoever waits for one is told."""
        self._stopped = True
        self._connected.set()

    async def _connect_again(self) -> aiomqtt.Client | None:
        """Wait (``RECONNECT_FIRST_S`` doubling to ``RECONNECT_MAX_S``, with jitter), connect and
        subscribe; again until it works. None when the broker refuses the credentials."""
        while True:
            wait = min(RECONNECT_MAX_S, RECONNECT_FIRST_S * 2 ** min(self._failures, 16))
            await asyncio.sleep(wait * (0.5 + random.random() / 2))
            self._set_state("connecting")
            await self._refresh_if_due()
            client: aiomqtt.Client | None = None
            try:
                client = self._mqtt_client()
                await self._open(client)
                await self._subscribe(client)
            except (aiomqtt.MqttError, OSError, ValueError) as exc:  # (OSError, ValueError: a TLS
                # context that cannot be made now, its CA file gone; tried again like the rest)
                if client is not None:
                    _abandon(client)
                if isinstance(exc, aiomqtt.MqttError) and _credentials_refused(exc):
                    log.error("the broker refuses this device's credentials (%s); not connecting again", exc)
                    return None
                log.info("connecting again failed (%r)", exc)
                self._failures += 1
                self._set_state("offline")
                continue
            except BaseException:  # closed meanwhile: the half-made connection goes too
                if client is not None:
                    _abandon(client)
                raise
            self._client = client
            self._connected.set()
            return client

    async def _open(self, client: aiomqtt.Client) -> None:
        """Connect ``client``; MqttError when the broker has not answered within the reply timeout,
        or as soon as the connection closes unanswered (aiomqtt alone waits its whole timeout for
        a CONNACK that cannot come any more)."""
        gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        paho = client._client
        told = paho.on_disconnect

        def on_disconnect(*args: Any) -> None:
            if not gone.done():
                gone.set_result(None)
            if told is not None:
                told(*args)

        paho.on_disconnect = on_disconnect
        connecting: asyncio.Future[Any] = asyncio.ensure_future(client.__aenter__())
        connecting.add_done_callback(_retrieve)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._reply_timeout):
                    either: set[asyncio.Future[Any]] = {connecting, gone}
                    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            paho.on_disconnect = told
            if not connecting.done():
                connecting.cancel()
        if not connecting.done() or connecting.cancelled():
            raise aiomqtt.MqttError("the connection closed before the broker answered" if gone.done()
                                    else "the broker did not answer in time")
        connecting.result()

    async def _catch_up(self, client: aiomqtt.Client) -> None:
        """On a new connection: say online and sync from the cursor (the first sync acks it). If
        that fails, the connection is dropped, and the read loop's end makes another."""
        try:
            await self._publish(self._online())
            await self.sync()
        except (aiomqtt.MqttError, PigeonClientError) as exc:
            if self._client is client:
                log.warning("catching up on the new connection failed (%s); connecting again", exc)
                self._failures += 1
                _abandon(client)
            return
        if self._client is client:
            self._failures = 0
            self._set_state("online")

    async def _refresh_if_due(self) -> None:
        """Refresh the token when it expires within ``refresh_before_s`` (a device that stays
        connected for weeks would otherwise be refused when it next connects). A failure is
        logged and the connection tried with the token as it is."""
        if self.profile.expires_at - time.time() * 1000 > self._refresh_before_ms:
            return
        try:
            await self.api.refresh()
        except Exception as exc:  # noqa: BLE001 - the server's answer, or saving the profile: the
            # device goes on with the token it has (a bad answer must not end its reconnecting)
            log.warning("refreshing the device's token failed (%r); connecting with the one it has", exc)
        else:
            log.info("refreshed the device's token (it expired within %.0f s)", self._refresh_before_ms / 1000)

    async def _until_connected(self) -> None:
        """Wait up to the reply timeout for a connection; ``not_connected`` if none came (or none
        will: closed or refused)."""
        if self._client is None and not self._stopped:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._reply_timeout):
                    await self._connected.wait()
        if self._client is None:
            raise PigeonClientError("not_connected", "the device is not connected")

    # -- plumbing ------------------------------------------------------------------------------------
    def _encode(self, payload: Mapping[str, Any]) -> bytes:
        # a type v2 has no number for goes as JSON, and the server answers it as it would in v1
        if self.proto == 2 and payload.get("type") in wire_v2.REQUEST_NUMBERS:
            return wire_v2.encode_request(payload)
        return json.dumps(payload, separators=(",", ":")).encode()

    def _new_id(self) -> str:
        """A request id: v1, a random hex string; v2, the device's counter in base 36, short
        and never repeated, since ``send`` is idempotent by (device, id) for good.

        The counter is kept in the profile in blocks of ``ID_BLOCK``: a block is recorded as used
        (and the profile saved) before its first id goes out, so a crash skips the rest of the
        block rather than using an id again. A device fresh from login starts at 1. A profile
        that knows no counter (one saved by an older SDK, or credentials put together by hand
        after the profile was lost) starts at the microseconds since the Unix epoch: above every
        id used before, since earlier ids were either those microseconds (older SDKs), a counter
        that cannot have passed them, or 32-character hex."""
        if self.proto == 1:
            return uuid.uuid4().hex
        if self._next_id == 0:
            self._next_id = self.profile.ids_from or time.time_ns() // 1000
            self._ids_reserved = self._next_id
        if self._next_id >= self._ids_reserved:
            self._ids_reserved = self._next_id + ID_BLOCK
            self.profile.ids_from = self._ids_reserved
            if self.profile.path:
                self.profile.save(durable=True)
        n, digits = self._next_id, ""
        self._next_id += 1
        while n:
            n, d = divmod(n, 36)
            digits = BASE36[d] + digits
        return digits

    async def _publish(self, payload: Mapping[str, Any], qos: int = 1) -> None:
        if self._client is None:
            raise PigeonClientError("not_connected", "the device is not connected")
        try:
            async with asyncio.timeout(self._reply_timeout):
                topic, props = self._up()
                await self._client.publish(topic, self._encode(payload), qos=qos, properties=props)
            self._named()
            self._last_publish = asyncio.get_running_loop().time()
        except TimeoutError as exc:
            raise RequestTimeout(f"the broker did not acknowledge a {payload.get('type')} in time") from exc
        except aiomqtt.MqttError as exc:
            raise PigeonClientError("not_connected", f"the {payload.get('type')} could not go out: {exc}") from exc

    async def request(self, payload: Mapping[str, Any], timeout: float | None = None) -> Event:
        """Publish a request with an id and wait for the reply carrying that id.

        One timeout covers the publish and the reply. The server PUBACKs a publish only once it
        has handled it, so the reply may arrive before the PUBACK, or the PUBACK may take as long
        as the handling: the reply is returned as soon as it arrives, PUBACK or not.
        """
        if self._client is None:
            raise PigeonClientError("not_connected", "the device is not connected")
        rid = str(payload.get("id") or self._new_id())
        body = {**payload, "id": rid}
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut  # before the publish: the reply may come before its PUBACK
        if body.get("type") == "send" and isinstance(body.get("chat"), str):
            self._send_chats[rid] = body["chat"]
        # the PUBACK wait runs beside the reply wait, bounded only by the one deadline below
        topic, props = self._up()
        published: asyncio.Future[Any] = asyncio.ensure_future(self._client.publish(
            topic, self._encode(body), qos=1, properties=props, timeout=math.inf))
        published.add_done_callback(_retrieve)
        published.add_done_callback(self._named)
        try:
            async with asyncio.timeout(timeout or self._reply_timeout):
                either: set[asyncio.Future[Any]] = {fut, published}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if not fut.done():
                    published.result()  # the publish failed (MqttError): no reply can come
                    await fut
                reply = fut.result()
        except TimeoutError as exc:
            self._abandoned.setdefault(rid, None)  # its reply, should it come yet, is not an event
            raise RequestTimeout(f"no reply to {payload.get('type')} {rid}") from exc
        except aiomqtt.MqttError as exc:  # (the connection went; the read loop's end tells the rest)
            raise PigeonClientError("not_connected", f"the request could not go out: {exc}") from exc
        finally:
            self._pending.pop(rid, None)
            self._send_chats.pop(rid, None)
            published.cancel()  # a PUBACK still owed is of no use once the reply is here
        if isinstance(reply, ErrorReply):
            raise PigeonClientError(reply.code, reply.message, retry_after_ms=reply.retry_after_ms)
        return reply

    async def _read_loop(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            raw = message.payload
            if not isinstance(raw, (bytes, bytearray, str)):
                continue
            raw = raw.encode() if isinstance(raw, str) else raw
            try:
                event = (wire_v2.decode(raw, self.profile.user_id, self._reply_chats, peers=self._peers,
                                        now_ms=self._server_now()) if wire_v2.is_v2(raw) else decode_payload(raw))
            except wire_v2.Unresolved as exc:  # fetched by sync, whose items are complete
                if exc.inbox is not None and exc.inbox > self._cursor:
                    self._unresolved[exc.inbox] = exc.peer
                    self._sync_wanted.set()
                continue
            except wire_v2.Unawaited as exc:  # a repeat answered again: its first answer came
                log.debug("ignoring a repeated reply on %s: %s", message.topic, exc.message)
                continue
            except ProtocolError as exc:
                log.warning("ignoring a payload on %s that is not a valid event: %s", message.topic, exc.message)
                continue
            if isinstance(event, Batch) and event.now is not None:
                self._server_clock = (event.now, asyncio.get_running_loop().time())
            rid = getattr(event, "id", None)
            if event.type in REPLY_TYPES and rid is not None and rid in self._pending:
                fut = self._pending.pop(rid)
                if not fut.done():
                    fut.set_result(event)
                continue
            if event.type in REPLY_TYPES and rid is not None and rid in self._abandoned:
                self._late_reply(rid, event)
                continue
            if isinstance(event, PresenceEvent) and rid is not None and rid in self._pending:
                self._side.put_nowait(event)
                continue
            if isinstance(event, (MsgEvent, ReceiptEvent)):
                self._take(event)
            else:
                await self._events.put(event)

    def _server_now(self) -> int | None:
        """v2: the server's clock now, as the latest batch's ``now`` and this loop's monotonic
        time since put it (a live event's time is placed within 24 days of it), or None before
        the first batch."""
        if self._server_clock is None:
            return None
        now, then = self._server_clock
        return now + round((asyncio.get_running_loop().time() - then) * 1000)

    def _take(self, event: Mapping[str, Any], *, from_store: bool = False) -> None:
        """Deliver inbox events exactly once and in order; a gap asks for a sync.

        A live event past a gap waits for the sync. What sync returns comes from the store in
        inbox order and is authoritative: a position it skips does not exist.
        """
        pos = event.inbox if isinstance(event, (MsgEvent, ReceiptEvent)) else int(event["inbox"])
        if pos <= self._cursor:
            return
        self._buffer[pos] = event
        if from_store:
            for early in sorted(p for p in self._buffer if p < pos):
                self._deliver(early)
            self._deliver(pos)
        while self._cursor + 1 in self._buffer:
            self._deliver(self._cursor + 1)
        if self._buffer:
            self._sync_wanted.set()

    def _deliver(self, pos: int) -> None:
        self._cursor = pos
        self._events.put_nowait(self._buffer.pop(pos))
        self._ack_wanted.set()

    async def _sync_loop(self) -> None:
        while not self._closing:
            await self._sync_wanted.wait()
            if self._closing:
                return
            await asyncio.sleep(0.05)  # let the in-flight live events land before asking
            self._sync_wanted.clear()
            if self._buffer or self._unresolved:
                try:
                    await self.sync()
                except (aiomqtt.MqttError, PigeonClientError) as exc:
                    if self._stopped:
                        return
                    log.warning("gap sync failed: %s", exc)
                    self._sync_wanted.set()
                    await asyncio.sleep(1 + random.random())
                    continue
                if self._buffer:  # the sync did not reach the events held (the store not there yet)
                    await asyncio.sleep(0.5 + random.random() / 2)
                    self._sync_wanted.set()

    async def _heartbeat_loop(self) -> None:
        """Say ``presence online`` again whenever nothing was published for half the keepalive."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            if self._client is None:  # (a new connection says online as it is made)
                await self._connected.wait()
                if self._stopped:
                    return
                continue
            await asyncio.sleep(max(0.0, self._last_publish + self._keepalive / 2 - loop.time()))
            if self._closing:
                return
            if loop.time() - self._last_publish >= self._keepalive / 2:
                try:
                    await self._publish(self._online())
                except (aiomqtt.MqttError, PigeonClientError) as exc:
                    log.warning("presence heartbeat not sent (%s); trying again", exc)
                    await asyncio.sleep(min(1.0, self._keepalive / 4))

    async def _ack_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            await self._ack_wanted.wait()
            if self._closing:
                return
            await asyncio.sleep(ack_wait(self._ack_at, loop.time(), self._ack_delay, leading=self.proto == 2))
            self._ack_wanted.clear()
            try:
                await self._flush_ack()
            except (aiomqtt.MqttError, PigeonClientError) as exc:
                log.warning("ack not sent (%s); will retry with the next one", exc)

    async def _flush_ack(self) -> None:
        if self._cursor > self._acked and self._client is not None:
            up_to = self._cursor
            await self._publish({"type": "ack", "up_to": up_to}, qos=0 if self.proto == 2 else 1)
            self._ack_at = asyncio.get_running_loop().time()
            self._acked = max(self._acked, up_to)
            self._save_cursor()

    def _learn_peer(self, peer: str, chat: str) -> None:
        """The direct chat with ``peer``; kept in the profile too (saved with the cursor)."""
        self._peers[peer] = chat
        saved = self.profile.peers
        saved.pop(peer, None)
        saved[peer] = chat  # (the newest last)
        while len(saved) > PEERS_SAVED:
            del saved[next(iter(saved))]

    def _save_cursor(self) -> None:
        self.profile.cursor = self._taken
        if self.profile.path:
            self.profile.save()

    # -- requests ----------------------------------------------------------------------------------------
    async def sync(self, limit: int = 500) -> int:
        """Fetch every inbox event after the cursor; return how many were new."""
        async with self._sync_lock:
            before = self._cursor
            while True:
                batch = await self._request_retried({"type": "sync", "after": self._cursor, "limit": limit})
                if not isinstance(batch, Batch):
                    raise PigeonClientError("bad_reply", f"sync was answered with {batch.type}")
                for item in batch.events:
                    if isinstance(item, MsgEvent) and item.inbox in self._unresolved:
                        peer = self._unresolved.pop(item.inbox)
                        if peer is not None and item.message.sender == peer:  # it was the direct chat
                            self._learn_peer(peer, item.message.chat)
                    self._take(item, from_store=True)
                if not batch.more or not batch.events:
                    break
            for pos in [p for p in self._unresolved if p <= self._cursor]:
                del self._unresolved[pos]
            await self._flush_ack()
            return self._cursor - before

    async def send(self, body: str | None = None, *, chat: str | None = None, to: str | None = None,
                   media: Mapping[str, Any] | None = None, id: str | None = None, retries: int = 3) -> Event:
        """Send a message; retried under the same id until the server answers ``sent``."""
        payload: dict[str, Any] = {"type": "send", "id": id or self._new_id()}
        if chat is not None:
            payload["chat"] = chat
        if to is not None:
            payload["to"] = to
        if body is not None:
            payload["body"] = body
        if media is not None:
            payload["media"] = dict(media)
        self._sends_made += 1
        order = self._sends_made
        self._sends_open[order] = open_ = asyncio.Event()
        try:
            reply = await self._request_retried(payload, retries, order=order)
        except PigeonClientError:  # (given up: a late ``sent`` of an attempt may still come)
            self._abandoned[payload["id"]] = (to, body, media)
            if chat is not None:
                self._abandoned_chats[payload["id"]] = chat
            raise
        finally:
            del self._sends_open[order]
            open_.set()
        if isinstance(reply, Sent) and to is not None and reply.inbox is not None:
            # (a fresh one: the server found the chat by this send's ``to``; one answered from an
            # earlier attempt under the same id is about that attempt, in whatever chat it was)
            self._learn_peer(to, reply.chat)
        if isinstance(reply, Sent) and reply.inbox is not None:
            self._take_own(reply, body, media)
        return reply

    async def _request_retried(self, payload: Mapping[str, Any], retries: int = 3, order: int | None = None) -> Event:
        """A request that may be asked again (a send under its id, a sync from the cursor): retried
        when unanswered, answered ``rate_limited``/``unavailable`` (after ``retry_after_ms``), or
        cut off by a lost connection; each attempt first waits for a connection (up to the reply
        timeout), so one made while the device is connecting again goes out once it is back.
        ``order``: a send's place among this device's sends; each attempt waits for the earlier
        sends that are going again (the module's docstring)."""
        if "id" not in payload:
            payload = {**payload, "id": self._new_id()}
        delay = 0.5
        again: asyncio.Event | None = None
        try:
            for attempt in range(retries + 1):
                try:
                    await self._until_connected()
                    if order is not None:
                        await self._after_earlier_sends(order, again=attempt > 0)
                    return await self.request(payload)
                except RequestTimeout:
                    if attempt == retries:
                        raise
                except PigeonClientError as exc:
                    again_when = ("rate_limited", "unavailable") + (() if self._stopped else ("not_connected",))
                    if exc.code not in again_when or attempt == retries:
                        raise
                    delay = max(delay, (exc.retry_after_ms or 0) / 1000)
                if order is not None and again is None:
                    again = self._sends_again[order] = asyncio.Event()
                await asyncio.sleep(min(delay, 10) * (1 + random.random() / 2))
                delay *= 2
            raise AssertionError("unreachable")
        finally:
            if again is not None and order is not None:
                del self._sends_again[order]
                again.set()

    async def _after_earlier_sends(self, order: int, *, again: bool = False) -> None:
        """Wait until no send made before this one is still going again; for a send going
        again itself (``again``), until every send made before it is through: one still waiting
        for its first reply may be lost and go again too, and must not be numbered after this."""
        waits = self._sends_open if again else self._sends_again
        while earlier := [e for k, e in waits.items() if k < order]:
            await earlier[0].wait()

    def _late_reply(self, rid: str, event: Event) -> None:
        """The reply to a request given up on came after all: not an event for the application,
        but a late ``sent`` (v2) puts the application's own message in the stream, as the send
        would have (a sync would fetch it, later)."""
        own = self._abandoned.pop(rid)
        self._abandoned_chats.pop(rid, None)
        if own is None or not isinstance(event, Sent) or event.inbox is None:
            return
        to, body, media = own
        if to is not None:
            self._learn_peer(to, event.chat)
        self._take_own(event, body, media)

    def _take_own(self, sent: Sent, body: str | None, media: Mapping[str, Any] | None) -> None:
        """v2: the server sends no copy of this device's message to it; ``sent`` names its inbox
        position and the message is put there as the copy would have been."""
        assert sent.inbox is not None
        attachment: Attachment | None = read_media(dict(media)) if media is not None else None
        message = ChatMessage(chat=sent.chat, seq=sent.seq, id=sent.id, sender=self.profile.user_id,
                              device=self.profile.device_id, ts=sent.ts, kind="media" if media else "text",
                              body=body or None, media=attachment)
        self._take(MsgEvent(sent.inbox, message))

    async def read(self, chat: str, up_to: int) -> None:
        await self._publish({"type": "read", "chat": chat, "up_to": up_to})

    async def typing(self, chat: str) -> None:
        await self._publish({"type": "typing", "chat": chat}, qos=0)

    async def watch(self, users: list[str], ttl: int = 300) -> list[Event]:
        """Presence of the visible users now; later changes arrive through :meth:`events`."""
        rid = self._new_id()
        fut: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut  # marks presence replies with this id as replies
        try:
            await self._publish({"type": "watch", "id": rid, "users": users, "ttl": ttl})
            out: list[Event] = []
            deadline = asyncio.get_running_loop().time() + 2.0
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0 or len(out) >= len(set(users)):
                    return out
                try:
                    async with asyncio.timeout(remaining):
                        ev = await self._side.get()
                except TimeoutError:
                    return out
                if isinstance(ev, PresenceEvent) and ev.id == rid:
                    out.append(ev)
        finally:
            self._pending.pop(rid, None)

    async def upload(self, data: bytes, mime: str, name: str | None = None) -> dict[str, Any]:
        """Upload bytes and return the MEDIA object to put in :meth:`send`."""
        sha = hashlib.sha256(data).hexdigest()
        reply = await self.request({"type": "media_upload", "sha256": sha, "size": len(data), "mime": mime})
        if not isinstance(reply, MediaUploadReply):
            raise PigeonClientError("bad_reply", f"media_upload was answered with {reply.type}")
        if not reply.exists:
            if reply.upload is None:
                raise PigeonClientError("bad_reply", "media_upload named no upload for a new object")
            await self.api.put_blob(reply.upload.to_json(), data)
        await self.request({"type": "media_done", "key": reply.key})
        media: dict[str, Any] = {"key": reply.key, "mime": mime, "size": len(data), "sha256": sha}
        if name:
            media["name"] = name
        return media

    async def download(self, key: str, chat: str) -> bytes:
        reply = await self.request({"type": "media_url", "key": key, "chat": chat})
        if not isinstance(reply, MediaUrlReply):
            raise PigeonClientError("bad_reply", f"media_url was answered with {reply.type}")
        return await self.api.get_blob(reply.url)

    # -- events ------------------------------------------------------------------------------------------
    async def next_event(self, timeout: float | None = None) -> Event:
        """The next event; :class:`RequestTimeout` when none came within ``timeout``, and
        ``not_connected`` once the device is closed."""
        try:
            async with asyncio.timeout(timeout):
                event = await self._events.get()
        except TimeoutError as exc:
            raise RequestTimeout("no event arrived in time") from exc
        if event is _CLOSED:
            self._events.put_nowait(_CLOSED)  # (for every later call too)
            raise PigeonClientError("not_connected", "the device is closed")
        return self._handed(event)

    async def events(self) -> AsyncIterator[Event]:
        """Every event as it comes, until the device is closed."""
        while True:
            event = await self._events.get()
            if event is _CLOSED:
                self._events.put_nowait(_CLOSED)
                return
            yield self._handed(event)

    def pending_events(self) -> list[Event]:
        out: list[Event] = []
        while not self._events.empty():
            event = self._events.get_nowait()
            if event is _CLOSED:
                self._events.put_nowait(_CLOSED)
                break
            out.append(self._handed(event))
        return out

    def _handed(self, event: Event) -> Event:
        """``event`` goes to the application: an inbox event's position is taken (kept in the
        profile from the next save on)."""
        if isinstance(event, (MsgEvent, ReceiptEvent)):
            self._taken = max(self._taken, event.inbox)
        return event

