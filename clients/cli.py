"""The ``pigeon`` command: run the server, and chat from a terminal."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import mimetypes
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from bridge.config import secret_from_env, settings
from bridge.errors import PigeonError
from clients.launch import GC_THRESHOLDS
from clients.sdk import Api, Device, PigeonClientError, Profile, request_code, verify

app = typer.Typer(help="Pigeon: messaging over MQTT for phones and IoT devices.", no_args_is_help=True)
group_app = typer.Typer(help="Create and manage groups.", no_args_is_help=True)
app.add_typer(group_app, name="group")
db_app = typer.Typer(help="Manage the message store.", no_args_is_help=True)
app.add_typer(db_app, name="db")
console = Console()
err = Console(stderr=True)

ProfileOpt = Annotated[
    Path, typer.Option("--profile", envvar="PIGEON_PROFILE", help="Where the login and sync cursor are kept.")
]
DEFAULT_PROFILE = Path.home() / ".config" / "pigeon" / "profile.json"


@app.command()
def serve(
    dev: Annotated[bool, typer.Option("--dev", envvar="PIGEON_DEV", help="Return login codes in the reply.")] = False,
    data_dir: Annotated[Path, typer.Option(envvar="PIGEON_DATA_DIR")] = Path(".pigeon"),
    host: Annotated[str, typer.Option(envvar="PIGEON_HOST")] = "127.0.0.1",
    public_host: Annotated[str | None, typer.Option(
        envvar="PIGEON_PUBLIC_HOST", help="The host name devices reach this server by (login replies name it)")] = None,
    public_url: Annotated[str | None, typer.Option(
        envvar="PIGEON_PUBLIC_URL", help="The HTTP base devices use when a reverse proxy fronts Pigeon, "
        "e.g. https://chat.example.com")] = None,
    public_ws_url: Annotated[str | None, typer.Option(
        envvar="PIGEON_PUBLIC_WS_URL", help="The MQTT-over-WebSocket URL login returns when a reverse proxy "
        "fronts Pigeon, e.g. wss://chat.example.com/mqtt")] = None,
    mqtt_port: Annotated[int, typer.Option(envvar="PIGEON_MQTT_PORT")] = 1883,
    ws_port: Annotated[int, typer.Option(envvar="PIGEON_WS_PORT")] = 8083,
    http_port: Annotated[int, typer.Option(envvar="PIGEON_HTTP_PORT")] = 8080,
    tls_cert: Annotated[Path | None, typer.Option(
        envvar="PIGEON_TLS_CERT", help="PEM certificate chain: serve MQTT, WebSocket and HTTP over TLS too "
        "(--mqtts-port, --wss-port, --https-port); login then names only the TLS listeners; SIGHUP reloads it")]
    = None,
    tls_key: Annotated[Path | None, typer.Option(envvar="PIGEON_TLS_KEY", help="PEM private key of --tls-cert")]
    = None,
    mqtts_port: Annotated[int, typer.Option(envvar="PIGEON_MQTTS_PORT", help="MQTT over TLS")] = 8883,
    wss_port: Annotated[int, typer.Option(envvar="PIGEON_WSS_PORT", help="MQTT over WebSocket over TLS")] = 8084,
    https_port: Annotated[int, typer.Option(envvar="PIGEON_HTTPS_PORT", help="the HTTP API over TLS")] = 8443,
    plaintext: Annotated[bool, typer.Option(
        "--plaintext/--no-plaintext", envvar="PIGEON_PLAINTEXT", help="also serve the plain listeners "
        "(--mqtt-port, --ws-port, --http-port); --no-plaintext needs --tls-cert")] = True,
    store: Annotated[str | None, typer.Option(envvar="PIGEON_STORE", help="sqlite:///PATH or cassandra[s]://[USER:PASSWORD@]HOSTS/KEYSPACE[?ca=FILE]")]
    = None,
    media: Annotated[str | None, typer.Option(envvar="PIGEON_MEDIA", help="file:///PATH or s3://KEY:SECRET@HOST/BUCKET")]
    = None,
    redis: Annotated[str | None, typer.Option(envvar="PIGEON_REDIS", help="redis://HOST:PORT/DB (absent: in-process)")]
    = None,
    peer_host: Annotated[str, typer.Option(
        envvar="PIGEON_PEER_HOST", help="with --redis and several bridges: the address other bridges reach this "
        "one on for the keys it numbers for them; 'off': through Redis only")] = "127.0.0.1",
    broker: Annotated[str | None, typer.Option(
        envvar="PIGEON_BROKER", help="mqtt://HOST:PORT of an external broker (absent: embedded)")] = None,
    broker_credentials_file: Annotated[Path | None, typer.Option(
        envvar="PIGEON_BROKER_CREDENTIALS_FILE", help="file holding the bridge's broker username:password")] = None,
    broker_ca_file: Annotated[Path | None, typer.Option(
        envvar="PIGEON_BROKER_CA_FILE", help="with an mqtts:// broker: the CA file its certificate is checked "
        "against (absent: the system's CAs)")] = None,
    broker_auth: Annotated[str | None, typer.Option(
        envvar="PIGEON_BROKER_AUTH", help="how the external broker checks devices: 'dynsec' (a dynamic-security "
        "client per device, made at login) or 'plugin' (Pigeon's Mosquitto plugin checks their tokens; "
        "docs/deploy.md)")] = None,
    sms_webhook: Annotated[str | None, typer.Option(envvar="PIGEON_SMS_WEBHOOK")] = None,
    rate: Annotated[float, typer.Option(envvar="PIGEON_RATE", help="Requests/s per device")] = 50.0,
    burst: Annotated[int, typer.Option(envvar="PIGEON_BURST")] = 200,
    kick_after: Annotated[int, typer.Option(
        envvar="PIGEON_KICK_AFTER", help="disconnect a device refused by its rate limit this many times within "
        "10 s (0: never)")] = 200,
    max_pending: Annotated[int, typer.Option(
        envvar="PIGEON_MAX_PENDING", help="device requests the bridge holds (queued or in flight) before it "
        "answers new ones rate_limited at once")] = 2048,
    max_pending_device: Annotated[int, typer.Option(
        envvar="PIGEON_MAX_PENDING_DEVICE", help="a device's own requests held before its new "
        "ones are answered rate_limited at once")] = 200,
    shed_pending: Annotated[int | None, typer.Option(
        envvar="PIGEON_SHED_PENDING", help="requests held from which typing and presence fan-out are dropped "
        "(default: half of --max-pending)")] = None,
    overload_retry_ms: Annotated[int, typer.Option(
        envvar="PIGEON_OVERLOAD_RETRY_MS", help="the least retry_after_ms of a request refused for overload "
        "(more when the backlog takes longer to drain)")] = 1000,
    max_queue_delay_ms: Annotated[int, typer.Option(
        envvar="PIGEON_MAX_QUEUE_DELAY_MS", help="new device requests are answered rate_limited at once while "
        "those held have waited longer than this (0: no bound by delay, only --max-pending)")] = 2000,
    max_group: Annotated[int, typer.Option(envvar="PIGEON_MAX_GROUP")] = 100,
    max_payload: Annotated[int, typer.Option(envvar="PIGEON_MAX_PAYLOAD")] = 64 * 1024,
    media_max_bytes: Annotated[int, typer.Option(envvar="PIGEON_MEDIA_MAX_BYTES")] = 100 * 1024 * 1024,
    media_url_ttl: Annotated[int, typer.Option(envvar="PIGEON_MEDIA_URL_TTL", help="seconds")] = 600,
    connect_timeout: Annotated[float, typer.Option(
        envvar="PIGEON_CONNECT_TIMEOUT", help="seconds the embedded broker waits for a connection's CONNECT "
        "before closing it")] = 10.0,
    log_level: Annotated[str, typer.Option(envvar="PIGEON_LOG_LEVEL")] = "INFO",
    ingest: Annotated[str, typer.Option(
        envvar="PIGEON_INGEST", help="inprocess: the broker hands device publishes to the bridge directly; "
        "mqtt: the bridge subscribes to up/+/+ as an MQTT client (on the embedded broker a publish is then "
        "acknowledged to the device when queued, not when handled: for tests)")] = "inprocess",
    event_loop: Annotated[str, typer.Option(
        envvar="PIGEON_EVENT_LOOP", help="uvloop (libuv, faster; the default where it is installed) or asyncio "
        "(the standard library's)")] = "auto",
    push_window: Annotated[float, typer.Option(
        envvar="PIGEON_PUSH_WINDOW", help="seconds: a device is pushed at most once per this long")] = 10.0,
    push_max_age: Annotated[int, typer.Option(
        envvar="PIGEON_PUSH_MAX_AGE", help="seconds a push is retried before it is dropped")] = 86_400,
    vapid_key_file: Annotated[Path | None, typer.Option(
        envvar="PIGEON_VAPID_KEY_FILE", help="Web Push: PEM P-256 private key (absent: DATA_DIR/vapid.pem, "
        "made on first start)")] = None,
    vapid_subject: Annotated[str, typer.Option(
        envvar="PIGEON_VAPID_SUBJECT", help="Web Push: the VAPID 'sub' contact (mailto: or https:)")]
    = "mailto:admin@localhost",
    fcm_credentials_file: Annotated[Path | None, typer.Option(
        envvar="PIGEON_FCM_CREDENTIALS_FILE", help="FCM: the service account's JSON key")] = None,
    fcm_url: Annotated[str, typer.Option(
        envvar="PIGEON_FCM_URL", help="FCM HTTP v1 API base URL")] = "https://fcm.googleapis.com",
    apns_key_file: Annotated[Path | None, typer.Option(
        envvar="PIGEON_APNS_KEY_FILE", help="APNs: the .p8 token signing key")] = None,
    apns_key_id: Annotated[str | None, typer.Option(envvar="PIGEON_APNS_KEY_ID", help="APNs: the key's id")] = None,
    apns_team_id: Annotated[str | None, typer.Option(envvar="PIGEON_APNS_TEAM_ID", help="APNs: team id")] = None,
    apns_topic: Annotated[str | None, typer.Option(envvar="PIGEON_APNS_TOPIC", help="APNs: the app's bundle id")]
    = None,
    apns_url: Annotated[str, typer.Option(
        envvar="PIGEON_APNS_URL", help="APNs base URL (sandbox: https://api.sandbox.push.apple.com)")]
    = "https://api.push.apple.com",
) -> None:
    """Run broker, bridge and HTTP API in one process (embedded default: nothing to install)."""
    from bridge.app import PigeonServer

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("amqtt", "transitions", "websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = settings(
            dev=dev, data_dir=data_dir, host=host, public_host=public_host, public_url=public_url,
            public_ws_url=public_ws_url, mqtt_port=mqtt_port,
            ws_port=ws_port, http_port=http_port, store=store, media=media, redis=redis, sms_webhook=sms_webhook,
            peer_host="" if peer_host.strip().lower() == "off" else peer_host.strip(),
            broker=broker, broker_credentials_file=broker_credentials_file, broker_ca_file=broker_ca_file,
            broker_auth=broker_auth,
            tls_cert=tls_cert, tls_key=tls_key, mqtts_port=mqtts_port, wss_port=wss_port, https_port=https_port,
            plaintext=plaintext,
            rate_per_s=rate, rate_burst=burst, max_group=max_group, max_payload=max_payload,
            media_max_bytes=media_max_bytes, media_url_ttl_s=media_url_ttl, secret=secret_from_env() or None,
            ingest=ingest, push_window_s=push_window, push_max_age_s=push_max_age, vapid_key_file=vapid_key_file,
            vapid_subject=vapid_subject, fcm_credentials_file=fcm_credentials_file, fcm_url=fcm_url,
            apns_key_file=apns_key_file, apns_key_id=apns_key_id, apns_team_id=apns_team_id, apns_topic=apns_topic,
            apns_url=apns_url, connect_timeout_s=connect_timeout, kick_after=kick_after, max_pending=max_pending,
            max_pending_device=max_pending_device,
            shed_pending=shed_pending, overload_retry_ms=overload_retry_ms, max_queue_delay_ms=max_queue_delay_ms,
        ).validated()
    except PigeonError as exc:
        err.print(f"[red]configuration error:[/] {exc}")
        raise typer.Exit(2) from exc

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with PigeonServer(cfg) as server:
            if server.tls is not None:
                loop.add_signal_handler(signal.SIGHUP, _reload_tls, server)
            # what was built to start (modules, settings, connections) stays: leave it out of
            # every later collection
            gc.collect()
            gc.freeze()
            listening = " ".join(f"{k}={v}" for k, v in server.listening().items())
            print(f"pigeon ready {listening} data={cfg.data_dir}", flush=True)
            await stop.wait()

    from storage import StorageError

    # Every request leaves short-lived objects, and the collector's default young generation
    # (700 objects) ran a full collection every second or so under load, 100-270 ms each with
    # the loop stopped: the tail of the latency (BENCHMARKS.md, 2026-11-30). Fewer, larger young
    # collections let requests finish before their objects are promoted.
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        with asyncio.Runner(loop_factory=_loop_factory(event_loop)) as runner:
            runner.run(run())
    except (PigeonError, StorageError) as exc:
        err.print(f"[red]pigeon could not start:[/] {exc}")
        raise typer.Exit(1) from exc


def _reload_tls(server: Any) -> None:
    """SIGHUP: load the certificate and key files again; a bad file keeps the old ones."""
    try:
        server.reload_tls()
    except PigeonError as exc:
        logging.getLogger("pigeon").error("TLS certificate not reloaded, the old one stays in use: %s", exc)


def _loop_factory(choice: str) -> Any:
    """The event loop ``serve`` runs on: uvloop where installed (less CPU per message), else asyncio's."""
    if choice not in ("auto", "uvloop", "asyncio"):
        err.print(f"[red]configuration error:[/] --event-loop must be auto, uvloop or asyncio, not {choice!r}")
        raise typer.Exit(2)
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            err.print("[red]configuration error:[/] --event-loop uvloop: uvloop is not installed")
            raise typer.Exit(2) from None
        return None
    return uvloop.new_event_loop


@db_app.command("migrate")
def db_migrate(
    store: Annotated[str | None, typer.Option(envvar="PIGEON_STORE", help="sqlite:///PATH or cassandra[s]://[USER:PASSWORD@]HOSTS/KEYSPACE[?ca=FILE]")]
    = None,
    data_dir: Annotated[Path, typer.Option(envvar="PIGEON_DATA_DIR")] = Path(".pigeon"),
) -> None:
    """Create or update the store's schema (keyspace replication: ?replication=... in the URL)."""
    from storage import StorageError, open_store

    url = settings(store=store, data_dir=data_dir).store_url

    async def go() -> None:
        s = open_store(url)
        try:
            await s.migrate()
        finally:
            await s.close()

    try:
        asyncio.run(go())
    except StorageError as exc:
        err.print(f"[red]migration failed:[/] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"schema up to date in {url.split('@')[-1]}")


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except PigeonClientError as exc:
        err.print(f"[red]{exc.code}:[/] {exc.message}")
        raise typer.Exit(1) from exc


def _profile(path: Path) -> Profile:
    try:
        return Profile.load(path)
    except PigeonClientError as exc:
        err.print(f"[red]{exc.message}[/]")
        raise typer.Exit(1) from exc


async def _resolve_chat(api: Api, target: str) -> str:
    """A chat id, or the direct chat with a user given by phone (+E164) or user id."""
    if target.startswith("+"):
        return str((await api.open_direct(await api.find_user(target)))["chat"])
    if target.startswith("u"):
        return str((await api.open_direct(target))["chat"])
    return target


async def _resolve_user(api: Api, who: str) -> str:
    return await api.find_user(who) if who.startswith("+") else who


class Names:
    """How people are shown: their name and phone (or the phone alone), never an opaque id."""

    def __init__(self, api: Api, me: str | None = None) -> None:
        self._api = api
        self._me = me
        self._known: dict[str, str] = {}

    async def of(self, user_id: str) -> str:
        if user_id == self._me:
            return "me"
        if user_id not in self._known:
            try:
                card = await self._api.user(user_id)
                phone = card.get("phone") or user_id
                self._known[user_id] = f"{card['name']} ({phone})" if card.get("name") else phone
            except PigeonClientError:
                self._known[user_id] = user_id  # no longer visible (left every shared chat)
        return self._known[user_id]

    async def title(self, chat: dict[str, Any]) -> str:
        if chat.get("title"):
            return str(chat["title"])
        others = [m for m in chat["members"] if m != self._me] or chat["members"]
        return ", ".join([await self.of(m) for m in others])


@app.command("login")
def login_cmd(
    phone: Annotated[str, typer.Argument(help="Your phone number, E.164 (+15550001111)")],
    server: Annotated[str, typer.Option(
        envvar="PIGEON_SERVER", help="HTTP(S) URL of the server")] = "http://127.0.0.1:8080",
    ca_file: Annotated[Path | None, typer.Option(
        envvar="PIGEON_CA_FILE", help="PEM CA file the server's certificate is checked against (https://, "
        "mqtts://, wss://) when the system does not trust it; kept in the profile")] = None,
    code: Annotated[str | None, typer.Option(help="The code you received (asked for if omitted)")] = None,
    name: Annotated[str, typer.Option(help="A name for this device")] = "pigeon-cli",
    display_name: Annotated[str | None, typer.Option(
        "--display-name", help="Your name, shown to the people you chat with (instead of your phone number)")] = None,
    profile: ProfileOpt = DEFAULT_PROFILE,
) -> None:
    """Link this terminal as a device of the account with that phone number."""

    async def go() -> tuple[Profile, str | None]:
        the_code = code
        if the_code is None:
            dev_code = await request_code(server, phone, ca_file=ca_file)
            if dev_code is not None:
                console.print(f"[dim]development server: code {dev_code} filled in[/]")
                the_code = dev_code
            else:
                the_code = typer.prompt("Code from the SMS")
        linked = await verify(server, phone, the_code, name, "cli", ca_file=ca_file)
        async with Api(linked) as api:
            me = await api.rename(display_name) if display_name is not None else await api.me()
        return linked, me.get("name")

    p, shown = _run(go())
    p.save(profile)
    who = f"{shown} ({p.phone})" if shown else p.phone
    console.print(f"logged in as [bold]{escape(who)}[/] (device {p.device_id}); profile saved to {profile}")
    if not shown:
        console.print("[dim]others see your phone number; add --display-name 'Your Name' to show a name[/]")


@app.command()
def push(
    provider: Annotated[str, typer.Argument(help="webhook, webpush, fcm or apns; or 'off' to stop being woken")],
    token: Annotated[str | None, typer.Argument(
        help="webhook: the URL; webpush: the subscription JSON (endpoint and keys); fcm/apns: the device token")]
    = None,
    profile: ProfileOpt = DEFAULT_PROFILE,
) -> None:
    """Say where this device is woken when none of your devices is connected."""
    if provider != "off" and token is None:
        err.print(f"[red]give the {provider} token (see pigeon push --help)[/]")
        raise typer.Exit(2)

    async def go() -> list[dict[str, Any]]:
        async with Api(_profile(profile)) as api:
            if provider == "off":
                await api.clear_push()
            else:
                assert token is not None
                value: str | dict[str, Any] = token
                if provider == "webpush":
                    try:
                        value = json.loads(token)
                    except ValueError as exc:
                        raise PigeonClientError("bad_request", "a webpush token is the subscription's JSON") from exc
                await api.set_push(provider, value)
            return await api.devices()

    for d in _run(go()):
        console.print(f"{d['device_id']}  {escape(d['name'])} ({d['platform']})  push: {d['push'] or '-'}")


@app.command()
def chats(profile: ProfileOpt = DEFAULT_PROFILE) -> None:
    """List your direct chats and groups."""

    p = _profile(profile)

    async def go() -> list[tuple[dict[str, Any], str]]:
        async with Api(p) as api:
            names = Names(api, p.user_id)
            return [(c, await names.title(c)) for c in await api.chats()]

    for c, title in _run(go()):
        console.print(f"{c['chat']}  [bold]{c['kind']:6}[/] {escape(title)}  (last seq {c['last_seq']})")


@app.command()
def send(
    target: Annotated[str, typer.Argument(help="Chat id, user id, or phone number")],
    text: Annotated[str | None, typer.Argument(help="The message")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="Attach a file")] = None,
    profile: ProfileOpt = DEFAULT_PROFILE,
) -> None:
    """Send one message (and optionally a file), then exit."""
    if not text and file is None:
        err.print("[red]nothing to send:[/] give a text or --file")
        raise typer.Exit(2)

    async def go() -> Mapping[str, Any]:
        async with Device(_profile(profile)) as dev:
            chat = await _resolve_chat(dev.api, target)
            media = await _upload(dev, file) if file else None
            return await dev.send(text, chat=chat, media=media)

    reply = _run(go())
    console.print(f"✓ sent to {reply['chat']} as seq {reply['seq']}")


async def _upload(dev: Device, file: Path) -> dict[str, Any]:
    data = await asyncio.to_thread(file.read_bytes)
    mime = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    return await dev.upload(data, mime, name=file.name)


@app.command()
def history(
    target: Annotated[str, typer.Argument(help="Chat id, user id, or phone number")],
    limit: Annotated[int, typer.Option(min=1, max=200)] = 20,
    profile: ProfileOpt = DEFAULT_PROFILE,
) -> None:
    """Show the latest messages of a chat, oldest first."""

    p = _profile(profile)

    async def go() -> list[str]:
        async with Api(p) as api:
            chat = await _resolve_chat(api, target)
            names = Names(api, p.user_id)
            return [await _line(m, names) for m in reversed((await api.history(chat, limit=limit))["messages"])]

    for line in _run(go()):
        console.print(line)


async def _line(m: Mapping[str, Any], names: Names) -> str:
    when = time.strftime("%H:%M", time.localtime(m["ts"] / 1000))
    who = await names.of(m["from"])
    if m["kind"] == "system":
        whom = await names.of(m["user"]) if m.get("user") else ""
        return escape(f"{when} #{m['seq']} {who} {m['event'].replace('_', ' ')} {whom}").join(("[dim]", "[/]"))
    body = escape(m.get("body") or "")
    if m.get("media"):
        label = escape(f"[file {m['media'].get('name') or m['media']['key'][:12]}, {m['media']['size']} bytes]")
        body = f"{body} [cyan]{label}[/]".strip()
    return f"{when} #{m['seq']} [bold]{escape(who)}[/]: {body}"


@group_app.command("create")
def group_create(
    title: str,
    members: Annotated[list[str] | None, typer.Argument(help="Phones or user ids")] = None,
    profile: ProfileOpt = DEFAULT_PROFILE,
) -> None:
    """Create a group; you become its admin."""

    async def go() -> dict[str, Any]:
        async with Api(_profile(profile)) as api:
            return await api.create_group(title, [await _resolve_user(api, m) for m in members or []])

    g = _run(go())
    console.print(f"group {g['chat']} '{g['title']}' with {len(g['members'])} members")


@group_app.command("add")
def group_add(chat: str, member: str, profile: ProfileOpt = DEFAULT_PROFILE) -> None:
    """Add a member (admins only)."""

    async def go() -> dict[str, Any]:
        async with Api(_profile(profile)) as api:
            return await api.add_member(chat, await _resolve_user(api, member))

    g = _run(go())
    console.print(f"{chat} now has {len(g['members'])} members")


@group_app.command("remove")
def group_remove(chat: str, member: str, profile: ProfileOpt = DEFAULT_PROFILE) -> None:
    """Remove a member (admins), or yourself (leave)."""

    async def go() -> None:
        async with Api(_profile(profile)) as api:
            await api.remove_member(chat, await _resolve_user(api, member))

    _run(go())
    console.print(f"removed {member} from {chat}")


@group_app.command("leave")
def group_leave(chat: str, profile: ProfileOpt = DEFAULT_PROFILE) -> None:
    """Leave a group."""
    p = _profile(profile)

    async def go() -> None:
        async with Api(p) as api:
            await api.remove_member(chat, p.user_id)

    _run(go())
    console.print(f"left {chat}")


TICKS = {"sent": "✓ sent", "delivered": "✓✓ delivered", "read": "[blue]✓✓ read[/]"}


@app.command()
def chat(
    target: Annotated[str, typer.Argument(help="Chat id, user id, or phone number")],
    profile: ProfileOpt = DEFAULT_PROFILE,
) -> None:
    """Chat live: type to send, '/file PATH' to send a file, '/save [SEQ] [PATH]' to keep a received
    file, '/quit' to leave.

    Your messages show ✓ when stored, ✓✓ when delivered, and blue ✓✓ when read.
    """
    p = _profile(profile)
    _run(_chat(p, target))


async def _save(dev: Device, chat_id: str, files: dict[int, dict[str, Any]], args: str) -> None:
    """``/save [SEQ] [PATH]``: write a received file (the latest, or message #SEQ's) to PATH, or to
    the current folder under its own name; an existing file is never overwritten."""
    words = args.split(maxsplit=1)
    seq: int | None = None
    if words and words[0].lstrip("#").isdigit():
        seq = int(words.pop(0).lstrip("#"))
    if not files or (seq is not None and seq not in files):
        console.print(f"[red]no received file {'#' + str(seq) if seq is not None else 'yet'} in this chat[/]")
        return
    media = files[seq if seq is not None else max(files)]
    own = Path(media.get("name") or media["key"][:12]).name or "file"
    dest = Path(words[0]).expanduser() if words else Path(own)  # noqa: ASYNC240 - no I/O
    if await asyncio.to_thread(dest.is_dir):
        dest = dest / own
    if await asyncio.to_thread(dest.exists):
        console.print(f"[red]{escape(str(dest))} already exists; give another path: /save {seq or ''} PATH[/]")
        return
    try:
        data = await dev.download(media["key"], chat_id)
    except PigeonClientError as exc:
        console.print(f"[red]could not download ({exc.code}): {escape(exc.message)}[/]")
        return
    if hashlib.sha256(data).hexdigest() != media.get("sha256", hashlib.sha256(data).hexdigest()):
        console.print("[red]the download does not match the file's SHA-256; not saved[/]")
        return
    await asyncio.to_thread(dest.write_bytes, data)
    console.print(f"saved {escape(str(dest))} ({len(data)} bytes)")


async def _chat(p: Profile, target: str) -> None:
    async with Device(p) as dev:
        chat_id = await _resolve_chat(dev.api, target)
        names = Names(dev.api, p.user_id)
        files: dict[int, dict[str, Any]] = {}  # received files by seq, for /save
        for m in reversed((await dev.api.history(chat_id, limit=20))["messages"]):
            if m.get("media") and m["from"] != p.user_id:
                files[m["seq"]] = m["media"]
            console.print(await _line(m, names))
        dev.pending_events()  # already shown above
        with_whom = await names.title(await dev.api.get_chat(chat_id))
        console.print(f"[dim]chat with {escape(with_whom)} — type a message, /file PATH, /save [SEQ] [PATH], "
                      "or /quit[/]")
        status: dict[int, str] = {}

        async def show_events() -> None:
            async for ev in dev.events():
                if ev.get("chat") != chat_id:
                    continue
                if ev["type"] == "msg":
                    if ev["from"] == p.user_id and ev["device"] == p.device_id:
                        continue  # our own, already shown with its tick
                    console.print(await _line(ev, names))
                    if ev.get("media") and ev["from"] != p.user_id:
                        files[ev["seq"]] = ev["media"]
                        console.print(f"[dim]  /save {ev['seq']} keeps this file[/]")
                    await dev.read(chat_id, ev["seq"])
                elif ev["type"] == "receipt":
                    for seq in sorted(s for s in status if s <= ev["up_to"]):
                        if status[seq] != "read" and (ev["kind"] == "read" or status[seq] == "sent"):
                            status[seq] = ev["kind"]
                            console.print(f"[dim]  #{seq}[/] {TICKS[ev['kind']]}")
                elif ev["type"] == "typing":
                    console.print(f"[dim]{escape(await names.of(ev['user']))} is typing…[/]")

        shower = asyncio.create_task(show_events(), name="chat-events")
        try:
            while True:
                line = await asyncio.to_thread(sys.stdin.readline)
                if not line or line.strip() == "/quit":
                    break
                text = line.rstrip("\n")
                if not text.strip():
                    continue
                media = None
                if text == "/save" or text.startswith("/save "):
                    await _save(dev, chat_id, files, text[5:].strip())
                    continue
                if text.startswith("/file "):
                    path = Path(text[6:].strip()).expanduser()  # noqa: ASYNC240 - a cheap stat
                    if not await asyncio.to_thread(path.is_file):
                        console.print(f"[red]no such file: {path}[/]")
                        continue
                    media = await _upload(dev, path)
                    text = ""
                try:
                    reply = await dev.send(text or None, chat=chat_id, media=media)
                except PigeonClientError as exc:
                    console.print(f"[red]not sent ({exc.code}): {exc.message}[/]")
                    continue
                status[reply["seq"]] = "sent"
                console.print(f"[dim]  #{reply['seq']}[/] {TICKS['sent']}")
        finally:
            shower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await shower


@app.command()
def bench(
    scenario: Annotated[str, typer.Argument(
        help="p2p, baseline, group, sync, idle, wire, overload, failover, or all (every one but overload and "
        "failover)")],
    profile: Annotated[str | None, typer.Option(
        help="start a server to measure: embedded, or production (Mosquitto + Cassandra + Redis + MinIO "
        "from scripts/services)")] = None,
    http: Annotated[str | None, typer.Option(help="HTTP URL of a running server (started with --dev)")] = None,
    mqtt: Annotated[str | None, typer.Option(
        help="the running server's MQTT listener: HOST:PORT, mqtt://HOST:PORT or mqtts://HOST:PORT, or its "
        "MQTT over WebSocket listener: ws://HOST:PORT/mqtt or wss://HOST:PORT/mqtt")] = None,
    ca_file: Annotated[Path | None, typer.Option(
        help="with an https:// --http or an mqtts:// or wss:// --mqtt: the CA file the server's certificate is checked "
        "against (absent: the system's CAs)")] = None,
    server_pid: Annotated[list[int] | None, typer.Option(
        help="PID of a running server process whose memory and CPU to report (repeatable)")] = None,
    broker_credentials_file: Annotated[Path | None, typer.Option(
        help="with --mqtt on Mosquitto: the bridge's admin credentials, so the baseline uses that same broker "
        "(otherwise the baseline runs on a separate embedded broker)")] = None,
    label: Annotated[str | None, typer.Option(help="profile name to report for a running server")] = None,
    workers: Annotated[int, typer.Option(help="load-generator processes")] = 2,
    seconds: Annotated[float, typer.Option(help="length of each measured phase")] = 10.0,
    pairs: Annotated[int, typer.Option(help="p2p/baseline: sender-recipient pairs")] = 100,
    window: Annotated[int, typer.Option(help="full-speed phases: undelivered messages each sender keeps")] = 4,
    groups: Annotated[int, typer.Option(help="group: how many groups")] = 2,
    members: Annotated[int, typer.Option(help="group: members per group")] = 100,
    messages: Annotated[int, typer.Option(help="sync: messages waiting for the offline device")] = 10_000,
    devices: Annotated[int, typer.Option(help="idle: devices held connected")] = 10_000,
    wire_messages: Annotated[int, typer.Option(help="wire: messages to count")] = 100,
    overload_seconds: Annotated[float, typer.Option(
        help="overload: how long the load is offered at --overload-factor x full speed")] = 60.0,
    recovery_seconds: Annotated[float, typer.Option(
        help="overload: how long the load is then offered at half of full speed")] = 30.0,
    overload_factor: Annotated[float, typer.Option(help="overload: offered load as a multiple of full speed")] = 3.0,
    full_speed: Annotated[float | None, typer.Option(
        help="overload, failover: full speed in msgs/s (default: measured first, for --seconds, like p2p)")] = None,
    rate_per_bridge: Annotated[list[float] | None, typer.Option(
        help="p2p: after the steps at a quarter, half and three quarters of full speed, one more at this many "
        "msgs/s per bridge (that times --bridges in all), so that runs with different --bridges compare at the "
        "same load per bridge; repeatable")] = None,
    max_seconds: Annotated[float, typer.Option(help="stop the run if it takes longer than this")] = 900.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the results to this file")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    server_log: Annotated[Path | None, typer.Option(
        help="with --profile: copy the log of the server the run started to this file when it ends")] = None,
    bridges: Annotated[int, typer.Option(
        help="with --profile production: how many bridge processes to start (they share the work)")] = 1,
    cold_sync: Annotated[bool, typer.Option(
        help="sync, with --profile production: restart the bridges before the offline device reconnects, "
        "so the sync reads Cassandra rather than what a bridge kept in memory")] = False,
    proto: Annotated[int, typer.Option(
        help="the protocol the simulated devices speak: 2 (MessagePack, the SDK's default) or 1 (JSON); "
        "wire always measures both")] = 2,
    keep_store: Annotated[bool, typer.Option(
        help="with --profile production: keep what earlier runs left in the bench's keyspace (by default it "
        "is dropped and made again, so every run starts from an empty store)")] = False,
    keyspace: Annotated[str, typer.Option(
        help="with --profile production: the bench's keyspace, pigeon_bench or pigeon_bench_NAME (NAME: up to 30 "
        "lower-case letters, digits and _), so that runs side by side on one Cassandra do not empty each other's")] = (
        "pigeon_bench"),
    resend: Annotated[bool, typer.Option(
        help="failover: the devices send a send answered rate_limited or unavailable again under its id, in their "
        "order, as the SDK does (latencies then run from the first attempt); --no-resend counts each such answer "
        "as an error and sends nothing again")] = True,
    mqtt5: Annotated[bool, typer.Option(
        help="wire: also measure a pair of v2 devices over MQTT 5 with topic aliases (the broker must speak "
        "MQTT 5: Mosquitto, --profile production; the embedded broker speaks 3.1.1 only)")] = False,
) -> None:
    """Measure throughput, latency, fan-out, sync, idle cost and bytes on the wire (loopback only)."""
    import json

    from clients.bench.run import ALONE, SCENARIOS, Bench, Options
    from clients.bench.target import BENCH_KEYSPACE, BenchError, open_target

    chosen = [s for s in SCENARIOS if s not in ALONE] if scenario == "all" else [scenario]
    problems = []
    if scenario != "all" and scenario not in SCENARIOS:
        problems.append(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)} or all")
    if profile not in (None, "embedded", "production"):
        problems.append("--profile must be embedded or production")
    if (profile is None) == (http is None):
        problems.append("give either --profile, or --http and --mqtt of a running server")
    limits = {"--workers": (workers, 1, 32), "--pairs": (pairs, 1, 5000), "--window": (window, 1, 1000),
              "--groups": (groups, 1, 100), "--members": (members, 2, 1000), "--messages": (messages, 1, 1_000_000),
              "--devices": (devices, 2 * workers, 18_000 * workers), "--wire-messages": (wire_messages, 1, 100_000)}
    for flag, (value, low, high) in limits.items():
        if not low <= value <= high:
            problems.append(f"{flag} must be between {low} and {high}, got {value}")
    if not 0.5 <= seconds <= 600 or not 1 <= max_seconds <= 7200:
        problems.append("--seconds must be within 0.5..600 and --max-seconds within 1..7200")
    if not 1 <= overload_seconds <= 600 or not 1 <= recovery_seconds <= 600:
        problems.append("--overload-seconds and --recovery-seconds must be within 1..600")
    if not 1 < overload_factor <= 10:
        problems.append(f"--overload-factor must be above 1 and at most 10, got {overload_factor}")
    if full_speed is not None and not 1 <= full_speed <= 100_000:
        problems.append(f"--full-speed must be within 1..100000 msgs/s, got {full_speed}")
    if any(not 1 <= r <= 100_000 for r in rate_per_bridge or ()):
        problems.append(f"--rate-per-bridge must be within 1..100000 msgs/s, got {rate_per_bridge}")
    if rate_per_bridge and scenario not in ("p2p", "all"):
        problems.append("--rate-per-bridge is for the p2p scenario")
    if cold_sync and profile != "production":
        problems.append("--cold-sync needs --profile production (the devices must outlive the restart)")
    if not 1 <= bridges <= 8 or (bridges > 1 and profile != "production"):
        problems.append("--bridges must be within 1..8, and more than 1 only with --profile production")
    if scenario == "failover" and (profile != "production" or bridges < 2):
        problems.append("failover needs --profile production and --bridges 2 or more (it kills one)")
    if proto not in (1, 2):
        problems.append(f"--proto must be 1 or 2, got {proto}")
    if keep_store and profile != "production":
        problems.append("--keep-store is for --profile production (the embedded one always starts empty)")
    if not BENCH_KEYSPACE.fullmatch(keyspace) or (keyspace != "pigeon_bench" and profile != "production"):
        problems.append(f"--keyspace must be pigeon_bench or pigeon_bench_NAME (NAME: up to 30 lower-case letters, "
                        f"digits and _), and only with --profile production; got {keyspace!r}")
    if not resend and scenario != "failover":
        problems.append("--no-resend is for the failover scenario")
    if mqtt5 and profile == "embedded":
        problems.append("--mqtt5 needs a broker that speaks MQTT 5; the embedded one speaks 3.1.1 only")
    if problems:
        for p in problems:
            err.print(f"[red]{p}[/]")
        raise typer.Exit(2)
    opts = Options(workers=workers, seconds=seconds, pairs=max(pairs, workers), window=window, groups=groups,
                   members=members, messages=messages, devices=devices, wire_messages=wire_messages,
                   max_seconds=max_seconds, progress=not quiet, cold_sync=cold_sync,
                   overload_seconds=overload_seconds, recovery_seconds=recovery_seconds,
                   overload_factor=overload_factor, full_speed=full_speed, proto=proto,
                   mqtt5=mqtt5, rates_per_bridge=tuple(rate_per_bridge or ()), resend=resend)
    results = []
    try:
        with open_target(profile, http, mqtt, server_pid or [], broker_credentials_file, label,
                         server_log, bridges, ca_file, keep_store, keyspace) as target:
            runner = Bench(target, opts, err)
            for name in chosen:
                result = runner.run(name).as_dict()
                if target.store is not None:
                    result["store"] = target.store
                results.append(result)
                _show_result(result)
    except BenchError as exc:
        err.print(f"[red]bench failed:[/] {exc}")
        raise typer.Exit(1) from exc
    finally:
        if json_out is not None and results:
            json_out.write_text(json.dumps(results[0] if scenario != "all" else results, indent=2) + "\n")
    if any(r.get("lost") or r.get("duplicates") or r.get("unanswered") for r in results):
        raise typer.Exit(3)


def _show_result(r: dict[str, Any]) -> None:
    """One line per key figure; lost or duplicated messages in red, never hidden."""
    keys = ("msgs_per_s", "deliveries_per_s", "baseline_msgs_per_s", "baseline_deliveries_per_s", "ratio",
            "p50_ms", "p95_ms", "p99_ms", "seconds", "connects_per_s", "kb_per_device", "rss_mb", "bytes_per_msg",
            "store_ops_per_msg", "lwt_per_msg", "bridge_cpu_ms_per_msg", "rate_limited", "unavailable",
            "health_max_ms", "login_max_ms", "responsive", "held_max", "recovered_after_s", "takeover_s",
            "during_within_1s_pct", "max_ms")
    shown = "  ".join(f"{k}={r[k]}" for k in keys if r.get(k) is not None)
    console.print(f"[bold]{r['scenario']}[/] ({r['profile']}): {shown}")
    for stretch in ("before", "during", "after"):
        if isinstance(r.get(stretch), dict):
            s = r[stretch]
            console.print(f"  sends {stretch} the takeover: {s['messages']}, p50 {s['p50_ms']} ms, "
                          f"p99 {s['p99_ms']} ms")
    for step in [*(r.get("rates") or []), *(r.get("rates_per_bridge") or [])]:
        if step.get("bridge_cpu_ms_per_msg") is not None:
            box = step.get("box_cpu_pct")
            console.print(f"  at {step['msgs_per_s']} msgs/s ({step['msgs_per_s_per_bridge']} a bridge): p99 "
                          f"{step['p99_ms']} ms, {step['bridge_cpu_ms_per_msg']} ms of bridge CPU a message"
                          + (f"; the box {box['busy']} % busy, {box['steal']} % stolen by the hypervisor"
                             if box else ""))
    if r.get("lost") or r.get("duplicates"):
        console.print(f"[bold red]  LOST {r.get('lost')} and DUPLICATED {r.get('duplicates')} messages[/]")
    if r.get("unanswered"):
        console.print(f"[bold red]  UNANSWERED {r['unanswered']} sends: no 'sent', no error, never delivered[/]")
    if r.get("late_live"):
        console.print(f"  {r['late_live']} live events arrived after a sync had fetched their entries (not duplicates)")
    if r.get("resent"):
        console.print(f"  sent again: {r['resent']} (by the answer that refused them)")
    if r.get("errors"):
        console.print(f"[yellow]  errors: {r['errors']}[/]")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
