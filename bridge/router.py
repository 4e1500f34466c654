"""The device edge: one ``up/{user}/{device}`` publish in, the publications it causes out.

Transport-free: the embedded broker calls it in-process, an MQTT client transport calls it
for messages read from an external broker. Every failure becomes an ``error`` reply on the
device's own topic; internal faults are logged and answered with ``unavailable``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from .admission import Admission
from .errors import ProtocolError, RateLimited, Unavailable
from .handling import Caller, Result
from .media import Media
from .messaging import Messenger
from .metrics import Metrics
from .outbox import Address, Out, ToDevice
from .presence import PresenceTracker
from .protocol import (
    Ack,
    Batch,
    ErrorReply,
    MediaDone,
    MediaUpload,
    MediaUrl,
    PresenceReq,
    Read,
    Request,
    Send,
    Sync,
    Typing,
    Watch,
)
from .ratelimit import RateLimiter, Strikes
from .wire import DeviceKinds
from .wire_v2 import is_v2, parse_any

log = logging.getLogger(__name__)


Publish = Callable[[list[Out]], Awaitable[None]]
# closes a device's connection to the broker (the embedded broker, or a kick through Mosquitto's
# dynamic security)
Disconnect = Callable[[str], Awaitable[None]]


class AckLane:
    """Acks handled beside a device's other requests, one at a time per device, and folded.

    An ack changes nothing the device's next request reads: ``sync`` pages by the position the
    device names and every receipt moves forward only. Yet handling an ack is the slowest thing
    a catching-up device asks for (it reads back the acknowledged part of the inbox and writes a
    receipt per chat), so in line it would hold up every ``sync`` behind it. Here it runs apart:
    while one ack of a device is being handled, later ones wait, and only the furthest of them is
    handled next, since it covers the others.
    """

    def __init__(self, run: Callable[[Caller, Ack], Awaitable[None]]) -> None:
        self._run = run
        self._waiting: dict[str, tuple[Caller, Ack]] = {}
        self._running: dict[str, asyncio.Task[None]] = {}

    def submit(self, caller: Caller, req: Ack) -> None:
        device = caller.device_id
        if device in self._running:
            held = self._waiting.get(device)
            if held is None or req.up_to > held[1].up_to:
                self._waiting[device] = (caller, req)
            return
        self._running[device] = asyncio.create_task(self._lane(caller, req), name=f"ack-{device}")

    async def _lane(self, caller: Caller, req: Ack) -> None:
        device = caller.device_id
        try:
            while True:
                await self._run(caller, req)
                held = self._waiting.pop(device, None)
                if held is None:
                    return
                caller, req = held
        finally:
            del self._running[device]

    def busy(self) -> int:
        """Devices with an ack being handled."""
        return len(self._running)

    async def settled(self, device: str) -> None:
        """Wait until the acks this device sent so far have been handled (its lane takes the
        waiting one before it ends)."""
        running = self._running.get(device)
        if running is not None:
            await asyncio.gather(running, return_exceptions=True)

    async def drain(self) -> None:
        """Wait until every ack taken so far has been handled."""
        while self._running:
            await asyncio.gather(*list(self._running.values()), return_exceptions=True)


def parse_up_topic(topic: str) -> Caller | None:
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != "up" or not parts[1] or not parts[2]:
        return None
    return Caller(user_id=parts[1], device_id=parts[2])


class DeviceRouter:
    def __init__(
        self, messenger: Messenger, presence: PresenceTracker, media: Media, limiter: RateLimiter,
        metrics: Metrics, max_payload: int, publish: Publish | None = None, *,
        admission: Admission | None = None, strikes: Strikes | None = None, disconnect: Disconnect | None = None,
        kinds: DeviceKinds | None = None,
    ) -> None:
        """With ``publish``, acks run on an ``AckLane`` and what they cause is published through
        it; without, they are handled in line like any other request. With ``admission``, typing
        is dropped while it sheds (see ``bridge.admission``); with ``strikes`` and ``disconnect``,
        a device refused by its rate limit ``strikes.limit`` times within the window is
        disconnected (it still gets the refusal). With ``kinds``, each request's version (v1 JSON or
        v2, by its first byte) is noted there for the MQTT edge (``bridge.wire``)."""
        self._messenger = messenger
        self._presence = presence
        self._media = media
        self._limiter = limiter
        self._metrics = metrics
        self._max_payload = max_payload
        self._publish = publish
        self._admission = admission
        self._strikes = strikes
        self._disconnect = disconnect
        self._kinds = kinds
        self.acks: AckLane | None = AckLane(self._ack_apart) if publish is not None else None

    async def handle(self, topic: str, payload: bytes) -> list[Out]:
        caller = parse_up_topic(topic)
        if caller is None:
            log.warning("ignoring publish on unexpected topic %r", topic)
            return []
        started = time.perf_counter()
        kind = "invalid"
        reply_to = ToDevice(caller.user_id, caller.device_id)
        if self._kinds is not None:
            self._kinds.saw(caller.user_id, caller.device_id, is_v2(payload))
        try:
            req = parse_any(payload, self._max_payload)
            kind = req.type
            self._metrics.requests_of[kind].inc()
            if isinstance(req, PresenceReq):
                return await self._presence_change(caller, req.online, req.keepalive)
            if isinstance(req, Typing) and self._admission is not None and self._admission.shedding:
                self._admission.shed("typing")
                return []
            wait_ms = self._limiter.take(caller.device_id)
            if wait_ms:
                if self._strikes is not None and self._strikes.add(caller.device_id):
                    await self._kick(caller, self._strikes)
                raise RateLimited("too many requests", retry_after_ms=wait_ms, request_id=getattr(req, "id", None))
            outs = await self._presence.device_online(caller.user_id, caller.device_id)
            if isinstance(req, Ack) and self.acks is not None:
                self.acks.submit(caller, req)
                kind = ""  # timed where the lane handles it
                return outs
            result = await self._dispatch(caller, req)
            if result.reply is not None:
                outs.append(Out(reply_to, result.reply))
            outs.extend(result.outs)
            return outs
        except Exception as exc:
            return self._failed_outs(reply_to, exc, kind, caller)
        finally:
            if kind:
                self._metrics.latency_of[kind].observe(time.perf_counter() - started)

    async def _kick(self, caller: Caller, strikes: Strikes) -> None:
        log.warning("device %s kept pushing past its rate limit (%d refusals within %g s); disconnecting it",
                    caller.device_id, strikes.limit, strikes.window_s)
        self._metrics.kicked.inc()
        if self._disconnect is None:
            return
        try:
            await self._disconnect(caller.device_id)
        except Exception:  # the refusal still goes out; the next strikes try again
            log.exception("disconnecting device %s failed", caller.device_id)

    async def _ack_apart(self, caller: Caller, req: Ack) -> None:
        assert self._publish is not None
        started = time.perf_counter()
        reply_to = ToDevice(caller.user_id, caller.device_id)
        try:
            outs = (await self._dispatch(caller, req)).outs
        except Exception as exc:
            outs = self._failed_outs(reply_to, exc, "ack", caller)
        finally:
            self._metrics.latency_of["ack"].observe(time.perf_counter() - started)
        try:
            await self._publish(outs)
        except Exception:
            log.exception("publishing what an ack from %s caused failed", caller.device_id)

    def _failed_outs(self, reply_to: Address, exc: Exception, kind: str, caller: Caller) -> list[Out]:
        """The error reply, and what the request did before it failed tells (``ProtocolError.outs``)."""
        return [self._failed(reply_to, exc, kind, caller), *(exc.outs if isinstance(exc, ProtocolError) else ())]

    def _failed(self, reply_to: Address, exc: Exception, kind: str, caller: Caller) -> Out:
        """The error reply for a request that failed; internal faults are logged, not shown."""
        if isinstance(exc, ProtocolError):
            return self._error(reply_to, exc, "mqtt")
        log.error("unexpected failure handling %s from %s", kind, caller.device_id, exc_info=exc)
        return self._error(reply_to, Unavailable("internal error; retry later"), "mqtt")

    def _error(self, to: Address, exc: ProtocolError, edge: str) -> Out:
        self._metrics.errors.labels(exc.mqtt_code, edge).inc()
        retry = exc.retry_after_ms if isinstance(exc, RateLimited) else None
        return Out(to, ErrorReply(id=exc.request_id, code=exc.mqtt_code, message=exc.message, retry_after_ms=retry))

    async def _presence_change(self, caller: Caller, online: bool, keepalive: int | None) -> list[Out]:
        if online:
            outs = await self._presence.device_online(caller.user_id, caller.device_id, explicit=True,
                                                      keepalive=keepalive)
        else:
            # A device that closes acks what it has and then says offline; its ack runs apart, and
            # whether the user went offline with events unacknowledged (bridge.push wakes it for
            # them) must be judged after it: the offline waits for the acks it sent before.
            if self.acks is not None:
                await self.acks.settled(caller.device_id)
            outs = await self._presence.device_offline(caller.user_id, caller.device_id)
        # The online gauge is counted when /metrics is read, not here: counting walks every
        # online user in the shared state, which per presence change made a burst of N
        # connects cost N² round trips.
        return outs

    async def _dispatch(self, caller: Caller, req: Request) -> Result:
        m = self._messenger
        try:
            if isinstance(req, Send):
                result = await m.send(caller, req)
                if result.outs:
                    self._metrics.messages_in.inc()
                    self._metrics.fanout.observe(len(result.outs))
                return result
            if isinstance(req, Sync):
                result = await m.sync(caller, req)
                self._metrics.sync_batches.inc()
                if isinstance(result.reply, Batch):
                    self._metrics.sync_items.inc(len(result.reply.events))
                return result
            if isinstance(req, Ack):
                return await m.ack(caller, req)
            if isinstance(req, Read):
                return await m.read(caller, req)
            if isinstance(req, Typing):
                return await m.typing(caller, req)
            if isinstance(req, Watch):
                return Result(outs=await self._presence.watch(caller.user_id, caller.device_id, req))
            if isinstance(req, MediaUpload):
                return Result(reply=await self._media.upload(caller, req.id, req.sha256, req.size, req.mime))
            if isinstance(req, MediaDone):
                return Result(reply=await self._media.done(caller, req.id, req.key))
            if isinstance(req, MediaUrl):
                return Result(reply=await self._media.url(caller, req.id, req.key, req.chat))
        except ProtocolError as exc:
            if exc.request_id is None:
                exc.request_id = getattr(req, "id", None)
            raise
        raise AssertionError(f"unhandled request {req!r}")
