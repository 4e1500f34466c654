"""The device edge: one ``up/{user}/{device}`` publish in, the publications it causes out.

Transport-free: the embedded broker calls it in-process, an MQTT client transport calls it
for messages read from an external broker. Every failure becomes an ``error`` reply on the
device's own topic; internal faults are logged and answered with ``unavailable``.
"""

from __future__ import annotations

import logging
import time

from .errors import ProtocolError, RateLimited, Unavailable
from .handling import Caller, Result
from .media import Media
from .messaging import Messenger
from .metrics import Metrics
from .outbox import Out, device_topic
from .presence import PresenceTracker
from .protocol import (
    Ack,
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
    error_reply,
    parse_request,
)
from .ratelimit import RateLimiter

log = logging.getLogger(__name__)


def parse_up_topic(topic: str) -> Caller | None:
    parts = topic.split("/")
    if len(parts) != 3 or parts[0] != "up" or not parts[1] or not parts[2]:
        return None
    return Caller(user_id=parts[1], device_id=parts[2])


class DeviceRouter:
    def __init__(
        self, messenger: Messenger, presence: PresenceTracker, media: Media, limiter: RateLimiter,
        metrics: Metrics, max_payload: int,
    ) -> None:
        self._messenger = messenger
        self._presence = presence
        self._media = media
        self._limiter = limiter
        self._metrics = metrics
        self._max_payload = max_payload

    async def handle(self, topic: str, payload: bytes) -> list[Out]:
        caller = parse_up_topic(topic)
        if caller is None:
            log.warning("ignoring publish on unexpected topic %r", topic)
            return []
        started = time.perf_counter()
        kind = "invalid"
        reply_to = device_topic(caller.user_id, caller.device_id)
        try:
            req = parse_request(payload, self._max_payload)
            kind = req.type
            self._metrics.requests.labels(kind).inc()
            if isinstance(req, PresenceReq):
                return await self._presence_change(caller, req.online)
            wait_ms = await self._limiter.take(caller.device_id)
            if wait_ms:
                raise RateLimited("too many requests", retry_after_ms=wait_ms, request_id=getattr(req, "id", None))
            outs = await self._presence.device_online(caller.user_id, caller.device_id)
            result = await self._dispatch(caller, req)
            if result.reply is not None:
                outs.append(Out.event(reply_to, result.reply))
            outs.extend(result.outs)
            return outs
        except ProtocolError as exc:
            return [self._error(reply_to, exc, "mqtt")]
        except Exception:
            log.exception("unexpected failure handling %s from %s", kind, caller.device_id)
            return [self._error(reply_to, Unavailable("internal error; retry later"), "mqtt")]
        finally:
            self._metrics.latency.labels(kind).observe(time.perf_counter() - started)

    def _error(self, topic: str, exc: ProtocolError, edge: str) -> Out:
        self._metrics.errors.labels(exc.code, edge).inc()
        retry = exc.retry_after_ms if isinstance(exc, RateLimited) else None
        return Out.event(topic, error_reply(exc.code, exc.message, exc.request_id, retry))

    async def _presence_change(self, caller: Caller, online: bool) -> list[Out]:
        if online:
            outs = await self._presence.device_online(caller.user_id, caller.device_id, explicit=True)
        else:
            outs = await self._presence.device_offline(caller.user_id, caller.device_id)
        self._metrics.online.set(await self._presence.online_devices())
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
                if result.reply is not None:
                    self._metrics.sync_items.inc(len(result.reply["items"]))
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
