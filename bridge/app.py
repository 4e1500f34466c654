"""Assembling one Pigeon process: store, media, broker, bridge and HTTP API."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from pathlib import Path
from types import TracebackType
from urllib.parse import parse_qs, urlparse

import uvicorn

from broker.dynsec import DynSecAdmin, DynSecError
from broker.embedded import MAX_PACKET_BYTES, PigeonBroker, broker_config, listener_names
from broker.gate import DeviceGate
from broker.token_plugin import TokenPlugin
from storage import StorageError, open_media, open_store
from storage.media_local import LocalMediaStore
from storage.push_queue import open_push_queue
from storage.state import open_state

from .accounts import Accounts
from .admission import Admission, HeldBackHandover
from .clock import Clock, SystemClock
from .config import Settings, read_credentials
from .errors import PigeonError, Unauthorized
from .handover import ADOPT, ReceiptHandover
from .http_api import Endpoints, HttpDeps, create_app
from .media import Media
from .messaging import Messenger
from .metrics import Metrics
from .mqtt_ingest import AskHolder, MqttIngest, Partitions
from .outbox import Out
from .presence import PresenceTracker
from .protocol import ErrorReply
from .push import Pusher, PushTargets
from .push_providers import build_providers
from .ratelimit import RateLimiter, Strikes
from .router import DeviceRouter
from .sms import LogSms, WebhookSms
from .tls import client_context, load_certificate, server_context
from .tokens import TokenSigner
from .wire import DeviceKinds, V1Readers, publishes

log = logging.getLogger(__name__)
START_TIMEOUT_S = 30.0
BRIDGE_USER = "pigeon-bridge"


class StartupError(PigeonError):
    """A component did not start in time or could not bind its port."""


class PigeonServer:
    """Everything ``pigeon serve`` runs, as one async context manager.

    ``async with PigeonServer(settings) as server:`` returns once every listener is bound and
    the HTTP API answers; ``server.endpoints`` (what login names) and ``server.listening()``
    tell where.
    """

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.metrics = Metrics()
        self.store = open_store(settings.store_url)
        self.endpoints = Endpoints(host=settings.advertised_host, ws_url=settings.public_ws_url)
        # one TLS context for every TLS listener; reload_tls() loads new files into it
        self.tls: ssl.SSLContext | None = None
        self.http_port = 0
        self.https_port = 0
        self.broker_ports: dict[str, int] = {}  # the embedded broker's bound listeners: mqtt, ws, mqtts, wss
        self._http_sock: socket.socket | None = None
        self._https_sock: socket.socket | None = None
        self._uvicorns: list[tuple[uvicorn.Server, socket.socket]] = []
        self._stopping = asyncio.Event()
        self._broker: PigeonBroker | None = None
        self._ingest_client: MqttIngest | None = None
        self._receipt_handover: ReceiptHandover | None = None
        self._dynsec: DynSecAdmin | None = None
        self._devices_at_broker: DynSecAdmin | TokenPlugin | None = None  # what it is told of devices
        self._runner: asyncio.Task[None] | None = None
        self.kinds = DeviceKinds()  # which devices speak protocol v2 (bridge/wire.py)
        self.v1_read: V1Readers | None = None  # on an external broker: who may read down/{user}

    async def publish(self, outs: Sequence[Out]) -> None:
        if self._ingest_client is not None:
            # handed over in this order, not waiting for the broker's acknowledgements
            sent = publishes(outs, self.kinds, v1_read=self.v1_read)
            await self._ingest_client.publish_all(sent)
        elif self._broker is not None:
            sent = publishes(outs, self.kinds, self._broker.subscribed)
            for topic, payload, qos in sent:
                await self._broker.publish(topic, payload, qos)
        else:
            return
        by_qos = self.metrics.messages_out_of
        for _topic, _payload, qos in sent:
            by_qos[str(qos)].inc()

    async def __aenter__(self) -> PigeonServer:
        s = self.settings
        if s.tls_cert is not None and s.tls_key is not None:
            self.tls = server_context(s.tls_cert, s.tls_key)
        if s.plaintext:
            self._http_sock = _bind(s.host, s.http_port, "HTTP")
            self.http_port = self._http_sock.getsockname()[1]
        if self.tls is not None:
            try:
                self._https_sock = _bind(s.host, s.https_port, "HTTPS")
            except StartupError:
                if self._http_sock is not None:
                    self._http_sock.close()
                raise
            self.https_port = self._https_sock.getsockname()[1]
        if s.public_url:
            base = s.public_url.rstrip("/")
        elif self.tls is not None:  # with TLS on, devices are only ever pointed at the TLS listeners
            base = f"https://{s.advertised_host}:{self.https_port}"
        else:
            base = f"http://{s.advertised_host}:{self.http_port}"
        self.endpoints.http_url = base

        try:
            await self.store.open()
        except StorageError as exc:
            raise StartupError(f"store {s.store_url.split('@')[-1]}: {exc}") from exc
        blobs = open_media(s.media_url, secret=s.secret, public_base=base)
        await blobs.open()
        self.blobs = blobs
        signer = self._signer = TokenSigner(s.secret)
        self.state = open_state(s.redis, peer_host=s.peer_host or None, peer_secret=s.secret)
        try:
            await self.state.open()
        except StorageError as exc:
            raise StartupError(f"shared state {s.redis}: {exc}") from exc
        self.store.use_state(self.state)
        self.presence = PresenceTracker(self.store, self.state, self.clock)
        self.messenger = Messenger(self.store, self.clock, self.presence, s.max_group)
        self._open_push(s)
        try:
            await self.push_queue.open()
        except StorageError as exc:
            raise StartupError(f"push queue: {exc}") from exc
        self.accounts = Accounts(
            self.store, self.clock, signer, s.secret,
            sender=_code_sender(s),
            code_ttl_s=s.code_ttl_s, max_attempts=s.code_max_attempts, lock_s=s.code_lock_s,
            token_ttl_s=s.token_ttl_s,
        )
        self.accounts.devices_changed = self.state.devices_changed
        if s.broker and (s.redis or s.store_url.startswith("sqlite:")):
            # An external broker cannot say who subscribes to down/{user}; the store can, and
            # every bridge hears of a change through the shared state (bridge/wire.py). Without
            # Redis only a store no other process writes (SQLite) lets one bridge hear them all.
            self.v1_read = V1Readers(self.store.reads_v1, self.state.hears_devices)
            self.state.listen_devices(self.v1_read.changed)
        self.media = Media(self.store, blobs, self.clock, max_bytes=s.media_max_bytes, url_ttl_s=s.media_url_ttl_s)
        limiter = RateLimiter(self.clock, s.rate_per_s, s.rate_burst)
        self.admission = Admission(s.max_pending, s.shed_pending, s.overload_retry_ms, s.max_payload, self.metrics,
                                   per_device=s.max_pending_device, max_delay_ms=s.max_queue_delay_ms)
        self.metrics.held.set_function(lambda: self.admission.held)
        self.metrics.held_delay.set_function(lambda: self.admission.wait_s if self.admission.held else 0.0)
        self.presence.admission = self.admission
        self.router = DeviceRouter(
            self.messenger, self.presence, self.media, limiter, self.metrics, s.max_payload, publish=self.publish,
            admission=self.admission, strikes=Strikes(self.clock, s.kick_after) if s.kick_after else None,
            disconnect=self._disconnect_device, kinds=self.kinds,
        )

        if s.broker:
            await self._use_external_broker(s)
        else:
            await self._start_embedded_broker(s)
        ingest = self._ingest_client
        if ingest is not None:
            # replies and events waiting for the broker's acknowledgement: bounded with the requests,
            # as the embedded broker's broadcast queue is
            self.admission.backlog = ingest.backlog
            self.metrics.intake.set_function(ingest.intake)
            self.metrics.ingest_lag.set_function(ingest.lag)
            self.metrics.outgoing.set_function(ingest.backlog)
        elif self._broker is not None:
            self.metrics.outgoing.set_function(self._broker.backlog)

        ready = asyncio.Event()
        deps = HttpDeps(
            accounts=self.accounts, messenger=self.messenger, presence=self.presence, media=self.media,
            blobs=blobs if isinstance(blobs, LocalMediaStore) else None, metrics=self.metrics,
            clock=self.clock, publish=self.publish, endpoints=self.endpoints, dev=s.dev,
            max_payload=s.max_payload, ready=ready, connected=self._connected_devices,
            store_ops=lambda: self.store.ops,
            partitions_held=lambda: len(self.store.held_partitions()) if isinstance(self.store, Partitions) else 0,
            push=self.push_targets, push_depth=self.pusher.depth,
            web_root=web_root(), admission=self.admission,
        )
        http_app = create_app(deps)
        for sock, tls in ((self._http_sock, None), (self._https_sock, self.tls)):
            if sock is None:
                continue
            config = uvicorn.Config(
                http_app, log_level="warning", access_log=False,
                lifespan="off" if self._uvicorns else "on",  # the app's startup runs once
                ssl_context_factory=_given_context(tls) if tls is not None else None,
            )
            self._uvicorns.append((uvicorn.Server(config), sock))
        self._runner = asyncio.create_task(self._run(), name="pigeon-runner")
        try:
            await asyncio.wait_for(ready.wait(), START_TIMEOUT_S)
            await asyncio.wait_for(self._all_started(), START_TIMEOUT_S)
            if self._ingest_client is not None:
                await self._ingest_client.wait_connected(START_TIMEOUT_S)
        except (TimeoutError, PigeonError) as exc:
            await self.__aexit__(None, None, None)
            raise StartupError(f"pigeon did not start: {exc or 'HTTP API not ready in time'}") from exc
        log.info("pigeon ready: %s", " ".join(f"{k}={v}" for k, v in self.listening().items()))
        return self

    async def _all_started(self) -> None:
        while not all(server.started for server, _ in self._uvicorns):
            if self._runner is not None and self._runner.done():
                raise StartupError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)

    def listening(self) -> dict[str, str]:
        """Every listener by what it serves (``off`` when it is not served): http, mqtt and ws,
        then https, mqtts and wss when TLS is on. For an external broker, what login names."""
        host, ep = self.endpoints.host, self.endpoints
        found = {"http": f"http://{host}:{self.http_port}" if self._http_sock is not None else "off"}
        if self._broker is None:  # an external broker: devices reach what login names
            plain_mqtt = "off" if ep.mqtt_tls else f"{host}:{ep.mqtt_port}"
            found.update(mqtt=plain_mqtt, ws=ep.websocket() or "off")
            if self.tls is not None or ep.mqtt_tls:
                found.update(https=f"https://{host}:{self.https_port}" if self.tls is not None else "off",
                             mqtts=f"{host}:{ep.mqtt_port}" if ep.mqtt_tls else "off")
            return found
        ports = self.broker_ports
        found.update(mqtt=f"{host}:{ports['mqtt']}" if "mqtt" in ports else "off",
                     ws=f"ws://{host}:{ports['ws']}/mqtt" if "ws" in ports else "off")
        if self.tls is not None:
            found.update(https=f"https://{host}:{self.https_port}", mqtts=f"{host}:{ports['mqtts']}",
                         wss=f"wss://{host}:{ports['wss']}/mqtt")
        return found

    def reload_tls(self) -> None:
        """Load the certificate and key files again (after they were renewed): connections made
        from now on present the new certificate; open ones keep theirs. A file that cannot be
        loaded raises ConfigError and the old certificate stays in use."""
        s = self.settings
        if self.tls is None or s.tls_cert is None or s.tls_key is None:
            raise PigeonError("TLS is not on: there is no certificate to reload")
        load_certificate(self.tls, s.tls_cert, s.tls_key)
        log.info("TLS certificate reloaded from %s", s.tls_cert)

    def _open_push(self, s: Settings) -> None:
        """Providers from the settings, the durable queue, and the worker that sends (started by
        ``_run``); the queue itself is opened by ``__aenter__``."""
        self.providers, webpush, self._push_client = build_providers(s)
        # one queue per deployment: bridges sharing Redis and a store share it
        namespace = hashlib.sha256(s.store_url.rsplit("@", 1)[-1].encode()).hexdigest()[:16]
        self.push_queue = open_push_queue(s.redis, s.data_dir, namespace)
        self.pusher = Pusher(self.store, self.state, self.push_queue, self.providers, self.clock, self.metrics,
                             window_s=s.push_window_s, max_age_s=s.push_max_age_s)
        self.messenger.wakes = self.pusher
        self.presence.on_user_offline = self.pusher.went_offline
        self.push_targets = PushTargets(self.store, self.providers, webpush.public_key, dev=s.dev,
                                        on_change=self.pusher.forget_targets)
        log.info("push providers: %s", ", ".join(sorted(self.providers)))

    async def _start_embedded_broker(self, s: Settings) -> None:
        async def check_token(token: str) -> tuple[str, str] | None:
            try:
                caller = await self.accounts.authenticate(token)
            except Unauthorized:
                return None
            return caller.user_id, caller.device_id

        bridge_password = secrets.token_urlsafe(32)
        gate = DeviceGate(check_token, BRIDGE_USER, bridge_password)
        in_process = self._ingest if s.ingest == "inprocess" else None
        tls = self.tls is not None
        config = broker_config(s.host, s.mqtt_port, s.ws_port, gate, mqtts_port=s.mqtts_port if tls else None,
                               wss_port=s.wss_port if tls else None, plaintext=s.plaintext)
        # a packet past max_packet closes the connection; a payload past max_payload is still answered too_large
        broker = PigeonBroker(config, gate, in_process, connect_timeout=s.connect_timeout_s, tls=self.tls,
                              max_packet=max(MAX_PACKET_BYTES, 2 * s.max_payload),
                              admit=self._admit_now if in_process else None,
                              release=self.admission.release if in_process else None,
                              start=self._start_now if in_process else None)
        try:
            await broker.start()
        except Exception as exc:
            raise StartupError(f"broker could not start: {exc}") from exc
        self._broker = broker
        self.accounts.registry = broker
        if in_process is not None:  # replies and events wait there: bounded with the requests
            self.admission.backlog = broker.backlog
            self.admission.sent_out = broker.sent_out
        self.broker_ports = {role: _bound_port(broker, name) for role, name in listener_names(tls, s.plaintext).items()}
        # with TLS on, login names the TLS listeners only
        self.endpoints.mqtt_tls = tls
        self.endpoints.mqtt_port = self.broker_ports["mqtts" if tls else "mqtt"]
        self.endpoints.ws_port = self.broker_ports["wss" if tls else "ws"]
        if s.ingest == "mqtt":
            # the bridge's own connection: the plain listener, or the TLS one trusting our own certificate
            own_tls = None if s.plaintext else client_context(s.tls_cert, pinned=True)
            self._ingest_client = MqttIngest(
                "127.0.0.1" if s.host in ("0.0.0.0", "") else s.host,
                self.broker_ports["mqtt" if s.plaintext else "mqtts"],
                username=BRIDGE_USER, password=bridge_password, client_id=f"{BRIDGE_USER}-{os.getpid()}",
                handle=self._ingest, tls_context=own_tls, admit=self._admit, release=self.admission.release,
                start=self._start,
            )

    async def _use_external_broker(self, s: Settings) -> None:
        """Devices connect to a broker we do not run; the bridge is its privileged client and
        either registers each device in the broker's dynamic security at login or, with
        broker_auth "plugin", leaves checking tokens to Pigeon's plugin there."""
        assert s.broker is not None and s.broker_credentials_file is not None
        url = urlparse(s.broker)
        secure = url.scheme == "mqtts"
        host, port = url.hostname or "127.0.0.1", url.port or (8883 if secure else 1883)
        # the bridge's own connections to the broker: TLS for mqtts://, checked against the broker CA file
        broker_tls = client_context(s.broker_ca_file) if secure else None
        user, password = read_credentials(s.broker_credentials_file)
        query = parse_qs(url.query)
        public = urlparse(_public_mqtt_url(query.get("public", [f"{host}:{port}"])[0], secure))
        assert public.hostname is not None and public.port is not None  # checked by Settings.validated
        self.endpoints.host, self.endpoints.mqtt_port = public.hostname, public.port
        self.endpoints.mqtt_tls = public.scheme == "mqtts"
        self.endpoints.ws_url = s.public_ws_url or query.get("ws_url", [None])[0]
        admin = DynSecAdmin(host, port, user, password, tls_context=broker_tls)
        try:
            await admin.__aenter__()
            await admin.check_bridge_role()
        except DynSecError as exc:
            await admin.__aexit__(None, None, None)
            raise StartupError(f"broker {host}:{port}: {exc}") from exc
        if s.broker_auth == "plugin":  # the broker checks tokens itself (broker/token_plugin.py)
            plugin = TokenPlugin(admin, self._signer.issue, self.clock.now_ms, s.token_ttl_s * 1000,
                                 host=host, port=port, tls_context=broker_tls)
            try:
                await plugin.check()
            except DynSecError as exc:
                await admin.__aexit__(None, None, None)
                raise StartupError(f"broker {host}:{port}: {exc}") from exc
            devices: DynSecAdmin | TokenPlugin = plugin
        else:
            devices = admin
        self._dynsec, self._devices_at_broker = admin, devices
        partitions = self.store if isinstance(self.store, Partitions) else None
        call = getattr(self.state, "call", None)
        ask_holder: AskHolder | None = None
        if partitions is not None and call is not None:
            async def ask_holder(part: int, request: dict[str, object], timeout: float) -> dict[str, object]:
                assert partitions is not None
                reply: dict[str, object] = await call(partitions.queue_of(part), request, timeout)
                return reply
        if partitions is not None:
            # Bridges of one deployment share the store's partitions: each takes the device
            # traffic of the users of the partitions it holds, in one persistent broker session
            # per partition (bridge/mqtt_ingest.py), and a dead bridge's share moves with its leases.
            windows = HeldBackHandover(self.state, partitions, self.admission)  # (they move with partitions)
            self.admission.on_hold = windows.note
            unfinished = self._receipt_handover = ReceiptHandover(self.state, partitions, self.messenger,
                                                                  ask_holder=ask_holder)  # (so do these)

            async def adopt(part: int) -> None:
                await asyncio.gather(windows.adopt(part), unfinished.adopt(part))

            self._ingest_client = MqttIngest(
                host, port, username=user, password=password, client_id=f"{user}-{secrets.token_hex(6)}",
                handle=self._ingest, persistent=True, partitions=partitions, ask_holder=ask_holder,
                tls_context=broker_tls, admit=self._admit, release=self.admission.release,
                start=self._start, on_session=adopt, recorded=windows.recorded,
            )
            handle = getattr(self.state, "handle", None)
            if handle is not None:
                handle("subscribe", self._ingest_client.serve_subscribe)
                handle(ADOPT, unfinished.serve_adopt)
            self.accounts.registry = _WatchedRegistry(devices, self._ingest_client)
        else:  # one bridge: a persistent session that takes every device's traffic
            self._ingest_client = MqttIngest(
                host, port, username=user, password=password, client_id=f"{user}-all", handle=self._ingest,
                persistent=True, tls_context=broker_tls, admit=self._admit, release=self.admission.release,
                start=self._start,
            )
            self.accounts.registry = devices

    async def _connected_devices(self) -> int:
        if self._broker is not None:
            return self._broker.connected_count()
        return await self.presence.online_devices()  # an external broker: devices marked online

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._housekeeping(), name="housekeeping")
            tg.create_task(self.pusher.run(self._stopping), name="push")
            watch = tg.create_task(self.presence.run_keepalive_watch(self.publish), name="keepalive-watch")
            ingest = None
            if self._ingest_client is not None:
                ingest = tg.create_task(self._ingest_client.run(), name="mqtt-ingest")
            await asyncio.gather(*(server.serve(sockets=[sock]) for server, sock in self._uvicorns))
            watch.cancel()
            if ingest is not None:
                ingest.cancel()

    async def _housekeeping(self) -> None:
        """Every half minute: the online gauge; every ten minutes: sweep unconfirmed uploads and,
        on an external broker, devices whose tokens expired."""
        ticks = 0
        while not self._stopping.is_set():
            try:
                async with asyncio.timeout(30):
                    await self._stopping.wait()
            except TimeoutError:
                ticks += 1
                try:
                    self.metrics.online.set(await self.presence.online_devices())
                    if ticks % 20 == 0:
                        await self.media.sweep(self.settings.upload_ttl_s)
                        if self._dynsec is not None:  # devices whose tokens expired leave the broker
                            await self._dynsec.remove_expired(self.clock.now_ms())
                except Exception:  # housekeeping must never take the server down
                    log.exception("housekeeping step failed; trying again later")

    def _admit(self, topic: str, payload: bytes | bytearray, received_at: float, queued: int) -> Awaitable[None] | None:
        """Admission control for a device publish (bridge/admission.py), ``queued`` of its device's
        held already: None when taken in, else the publishing of its refusal."""
        refused = self.admission.admit(topic, payload, queued, waited=time.monotonic() - received_at)
        return None if refused is None else self.publish(refused)

    def _start(self, topic: str, payload: bytes, taken_at: float) -> Awaitable[None] | None:
        """A publish is about to be handled: None to go on, else the publishing of its
        refusal (it waited past the bound by delay, bridge/admission.py)."""
        refused = self.admission.start(topic, payload, taken_at)
        return None if refused is None else self.publish(refused)

    def _start_now(self, topic: str, payload: bytes | bytearray, taken_at: float) -> list[tuple[str, bytes]] | None:
        """The same, for the embedded broker's client loop, which writes a refusal straight to the device."""
        return self._written_now(self.admission.start(topic, payload, taken_at))

    def _admit_now(self, topic: str, payload: bytes | bytearray, queued: int) -> list[tuple[str, bytes]] | None:
        """The same, for the embedded broker, which writes a refusal straight to the device and
        knows how many of the device's own publishes are held (``queued``)."""
        return self._written_now(self.admission.admit(topic, payload, queued))

    def _written_now(self, refused: list[Out] | None) -> list[tuple[str, bytes]] | None:
        """What the embedded broker writes straight to the device instead of handling a publish
        (None: handle it), counted as published at QoS 0."""
        if refused is None:
            return None
        if refused:
            self.metrics.messages_out_of["0"].inc(len(refused))
        return [(topic, payload) for topic, payload, _qos in publishes(refused, self.kinds)]

    async def _disconnect_device(self, device_id: str) -> None:
        """Close a device's connection: the embedded broker drops it; on Mosquitto, dynamic
        security disables and re-enables its client, or Pigeon's plugin is told to kick it (it
        may connect again)."""
        if self._broker is not None:
            await self._broker.disconnect_device(device_id)
        elif self._devices_at_broker is not None:
            await self._devices_at_broker.kick_device(device_id)

    async def _ingest(self, topic: str, payload: bytes) -> None:
        outs = await self.router.handle(topic, payload)
        for out in outs:
            if isinstance(out.event, ErrorReply) and out.event.code == "unavailable" and out.event.id:
                # a send the store failed: the device's sends behind it wait until it comes back
                self.admission.failed(topic, payload, out.event.id)
        await self.publish(outs)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stopping.set()
        for server, _ in self._uvicorns:
            server.should_exit = True
        if self._runner is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._runner), 10)
            except (TimeoutError, asyncio.CancelledError):
                self._runner.cancel()
            except Exception:
                log.exception("HTTP server stopped with an error")
        if self._dynsec is not None:
            await self._dynsec.__aexit__(None, None, None)
            self._dynsec = None
        if self._broker is not None:
            try:
                await self._broker.shutdown()
            except Exception:
                log.exception("broker shutdown failed")
            self._broker = None
        if getattr(self, "router", None) is not None and self.router.acks is not None:
            try:  # acks already taken move their receipts before the store closes
                await asyncio.wait_for(self.router.acks.drain(), 10)
            except TimeoutError:
                log.warning("stopped with %d acks still being handled", self.router.acks.busy())
        if getattr(self, "push_queue", None) is not None:
            await self.push_queue.close()
            for provider in self.providers.values():
                await provider.aclose()
            await self._push_client.aclose()
        if self.v1_read is not None:
            await self.v1_read.close()
        if getattr(self, "messenger", None) is not None:  # (records of requests cancelled as it stopped)
            await self.messenger.flush_keeping()
        if self._receipt_handover is not None:
            await self._receipt_handover.close()
        await self.store.close()
        if getattr(self, "state", None) is not None:
            await self.state.close()
        for sock in (self._http_sock, self._https_sock):
            if sock is not None:
                sock.close()
        log.info("pigeon stopped")


class _WatchedRegistry:
    """At login: the device's credentials in the broker, and its user's device topics in the
    broker session of the bridge that holds the user's partition, before the token is handed out."""

    def __init__(self, admin: DynSecAdmin | TokenPlugin, ingest: MqttIngest) -> None:
        self._admin, self._ingest = admin, ingest

    async def register_device(self, user_id: str, device_id: str, token: str, expires_at: int) -> None:
        await asyncio.gather(self._admin.register_device(user_id, device_id, token, expires_at),
                             self._ingest.watch_user(user_id))

    async def remove_device(self, device_id: str) -> None:
        await self._admin.remove_device(device_id)


def _code_sender(s: Settings) -> WebhookSms | LogSms | None:
    if s.dev:
        return None  # the code is returned in the HTTP reply
    if s.sms_webhook:
        return WebhookSms(s.sms_webhook)
    log.warning("no SMS provider configured (--sms-webhook): login codes will be written to this log")
    return LogSms()


def _given_context(ctx: ssl.SSLContext) -> Callable[[uvicorn.Config, Callable[[], ssl.SSLContext]], ssl.SSLContext]:
    """For uvicorn: serve HTTPS with this context (not one uvicorn would build from files)."""
    def factory(_config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return ctx
    return factory


def _public_mqtt_url(public: str, secure: bool) -> str:
    """An external broker's ``public=`` (what login names): ``mqtt://HOST:PORT``, ``mqtts://HOST:PORT``,
    or ``HOST:PORT`` (then the same scheme as the broker URL)."""
    return public if "://" in public else f"{'mqtts' if secure else 'mqtt'}://{public}"


def _bind(host: str, port: int, what: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot bind {what} port {host}:{port}: {exc}") from exc
    return sock


def _bound_port(broker: PigeonBroker, listener: str) -> int:
    server = broker._servers[listener]  # noqa: SLF001 - amqtt exposes no accessor for bound ports
    sockets = getattr(server.instance, "sockets", None) or []
    for sock in sockets:
        return int(sock.getsockname()[1])
    raise StartupError(f"listener {listener} has no bound socket")


def web_root() -> Path | None:
    """The web client's static files, shipped in the package (clients/web), if present."""
    root = Path(str(resources.files("clients") / "web"))
    return root if (root / "index.html").is_file() else None
