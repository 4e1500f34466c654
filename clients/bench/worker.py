"""One load-generator process: it holds a slice of the simulated devices and runs what the
parent asks, phase by phase, over a pipe.

A simulated device behaves like the SDK where it matters for load: it subscribes to its two
``down`` topics, announces presence, acknowledges its inbox (at most every 100 ms), and when an
inbox gap stays open for two seconds it syncs the gap from the store, since the broker is never
trusted to deliver every live publish. Senders and their recipients live in the same process,
so a delivery's latency is measured on one clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
import time
import traceback
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import httpx

from bridge import wire_v2
from bridge.errors import ProtocolError
from bridge.protocol import Sent
from clients.launch import GC_THRESHOLDS
from clients.sdk import V2_ACK_DELAY_S, tls_context

from .mqtt import MqttConn, connect

ACK_EVERY_S = 0.1
GAP_SYNC_AFTER_S = 2.0
STALL_S = 10.0
CONNECT_CONCURRENCY = 64
LOGIN_CONCURRENCY = 16
TIMED = {"traffic", "plan", "wire"}  # the commands that time deliveries
# a resending phase (the failover scenario): a send answered with one of these goes again under
# its id, as the SDK's does (clients/sdk.py ``_request_retried``): after its ``retry_after_ms`` or
# RESEND_AFTER_S doubled per attempt, whichever is longer, at most RESEND_MAX_S, and up to half
# as long again at random; RESEND_ATTEMPTS in all (the SDK's default: 3 retries), then it fails
RESENT_CODES = ("rate_limited", "unavailable")
RESEND_AFTER_S = 0.5
RESEND_MAX_S = 10.0
RESEND_ATTEMPTS = 4


def now_ns() -> int:
    return time.monotonic_ns()


def body_now() -> str:
    """A 20-character text body: the send time, so every message has the same size."""
    return f"{now_ns():020d}"[-20:]


def _entry(ev: dict[str, Any]) -> tuple[Any, ...]:
    """What identifies an inbox entry: a message by its chat and seq, a receipt by what it says."""
    if ev.get("type") == "msg":
        return ("msg", ev.get("chat"), ev.get("seq"))
    return (ev.get("type"), ev.get("chat"), ev.get("kind"), ev.get("user"), ev.get("up_to"))


@dataclass(slots=True)
class Track:
    """A message on its way: how many deliveries are still due, and who waits for them."""

    left: int
    t0: int
    measured: bool
    slots: asyncio.Semaphore | None
    confirmed: bool = False  # the server answered ``sent``: it said the message is stored
    attempts: int = 1
    place: int = -1  # a resending phase: its place among its device's sends


@dataclass
class Tally:
    """What one phase saw in this process."""

    delivered: int = 0
    delivered_measured: int = 0
    sent_ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    resent: Counter[str] = field(default_factory=Counter)  # sends that went again, by what they were answered
    duplicates: int = 0  # an entry stored twice: never allowed
    late_live: int = 0  # a live copy of an inbox entry the device already had (by sync): harmless
    recovered_by_sync: int = 0
    gap_syncs: int = 0
    stalled: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    sent_s: list[float] = field(default_factory=list)  # when each of latencies_ms' messages left (Unix s)

    def as_dict(self) -> dict[str, Any]:
        return {
            "delivered": self.delivered, "delivered_measured": self.delivered_measured, "sent_ok": self.sent_ok,
            "errors": dict(self.errors), "resent": dict(self.resent), "duplicates": self.duplicates,
            "late_live": self.late_live,
            "recovered_by_sync": self.recovered_by_sync,
            "gap_syncs": self.gap_syncs, "stalled": self.stalled, "latencies_ms": self.latencies_ms,
            "sent_s": self.sent_s,
        }


class Dev:
    """A simulated device: a logged-in identity with one MQTT connection."""

    def __init__(self, w: Worker, user: str, device: str, token: str) -> None:
        self.w = w
        self.user, self.device, self.token = user, device, token
        self.up = f"up/{user}/{device}"
        self.conn: MqttConn | None = None
        self.cursor = 0
        self.acked = 0
        self.ahead: set[int] = set()
        self.at: dict[int, tuple[Any, ...]] = {}  # inbox position -> the entry that was there
        self.msg_at: dict[tuple[Any, Any], int] = {}  # (chat, seq) -> the inbox position it came at
        self.gap_since = 0.0
        self.syncing = False
        self.replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.last_sent: dict[str, int] = {}  # chat -> highest seq the server answered ``sent`` with
        self.told_delivered: dict[str, tuple[int, float]] = {}  # chat -> (up_to, when it arrived)
        self.proto = 1  # 2: speaks protocol v2 (MessagePack; see bridge/wire_v2.py)
        self.acked_at = 0.0  # v2: when the last ack went
        # request id -> the chat a send named (a v2 ``sent`` leaves it out) or the user it was ``to``
        self.send_chats: dict[str, str] = {}
        self.send_to: dict[str, str] = {}
        self.chat_with: dict[str, str] = {}  # user -> the direct chat with them, once a ``sent`` or a sync named it
        # v2: inbox positions of live msgs that left out a direct chat not known here -> their sender
        self.unresolved: dict[int, str | None] = {}
        # a resending phase: this device's sends going again, by their place among its sends; a
        # later one goes only when every earlier one is through, and new sends wait in ``held``
        # meanwhile, so the server numbers them in the order they were made (as the SDK does)
        self.sender: Callable[[str], None] | None = None
        self.new_phase()

    def new_phase(self) -> None:
        """Nothing going again, nothing held: as at the start of a phase."""
        self.made = 0  # sends made in this phase
        self.again: dict[str, int] = {}
        self.due: set[str] = set()  # of those, the ones whose wait is over
        self.on_way: set[str] = set()  # of those, the one sent again and not answered yet
        self.held: deque[str] = deque()

    def creds(self) -> dict[str, str]:
        return {"user": self.user, "device": self.device, "token": self.token}

    async def connect(self, host: str, port: int, presence: bool, proto: int = 1, mqtt5: bool = False) -> None:
        self.proto = proto
        will = (self.up, self.encode({"type": "presence", "state": "offline"}))
        self.conn = await connect(host, port, self.device, self.device, self.token, self.on_message, will=will,
                                  tls=self.w.mqtt_tls, ws_path=self.w.mqtt_ws_path, mqtt5=mqtt5)
        user_topic = f"down/{self.user}/v2" if proto == 2 else f"down/{self.user}"
        await self.conn.subscribe([user_topic, f"down/{self.user}/{self.device}"], timeout=30)
        if presence:
            await self.publish({"type": "presence", "state": "online"})

    def encode(self, payload: dict[str, Any]) -> bytes:
        if self.proto == 2:
            return wire_v2.encode_request(payload)
        return json.dumps(payload, separators=(",", ":")).encode()

    def publish(self, payload: dict[str, Any], qos: int = 1) -> asyncio.Future[None]:
        assert self.conn is not None, "not connected"
        if payload.get("type") == "send" and isinstance(payload.get("id"), str):
            if "chat" in payload:
                self.send_chats[payload["id"]] = payload["chat"]
            elif "to" in payload and payload["to"] not in self.chat_with:
                self.send_to[payload["id"]] = payload["to"]
        fut = self.conn.publish(self.up, self.encode(payload), qos)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(None)
        return fut

    async def request(self, payload: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        rid = self.w.new_id()
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.replies[rid] = fut
        try:
            await self.publish({**payload, "id": rid})
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self.replies.pop(rid, None)

    def on_message(self, topic: str, payload: bytes) -> None:
        if wire_v2.is_v2(payload):
            try:  # the event's v1 object (and a v2 sent's inbox position): what the rest reads
                # (the time of a live msg or sent is placed by this machine's clock: the bench runs
                # beside the server or on a machine in step with it; the SDK uses the server's)
                event = wire_v2.decode(payload, self.user, self.send_chats, peers=self.chat_with,
                                       now_ms=time.time_ns() // 1_000_000)
                ev = event.to_json()
                if isinstance(event, Sent) and event.inbox is not None:
                    ev["inbox"] = event.inbox
            except wire_v2.Unresolved as exc:  # a gap: sync fetches it complete
                if exc.inbox is not None and exc.inbox > self.cursor:
                    self.unresolved[exc.inbox] = exc.peer
                    self.gap_since = self.gap_since or time.monotonic()
                    self.w.gapped.add(self)
                return
            except wire_v2.Unawaited:  # a repeat answered again (a bridge died before acknowledging it)
                self.w.tally.errors["sent_again"] += 1
                return
            except ProtocolError:
                self.w.tally.errors["undecodable"] += 1
                return
        else:
            ev = json.loads(payload)
        if ev.get("type") in ("sent", "error") and isinstance(ev.get("id"), str):
            self.send_chats.pop(ev["id"], None)
            to = self.send_to.pop(ev["id"], None)
            # v2: only from a fresh one, as the SDK (it carries the inbox position); v1's never
            # does, and a bench device never sends one id to two users
            if to is not None and ev.get("type") == "sent" and (self.proto == 1 or ev.get("inbox") is not None):
                self.chat_with[to] = str(ev["chat"])
        self.take(ev, from_store=False)

    def take(self, ev: dict[str, Any], *, from_store: bool) -> None:
        kind = ev.get("type")
        inbox = ev.get("inbox")
        if kind == "sent" and isinstance(inbox, int):  # v2: the own message's position, which no copy fills
            entry = ("msg", ev.get("chat"), ev.get("seq"))
            if self._mark(inbox, from_store, entry):
                self.msg_at.setdefault((ev.get("chat"), ev.get("seq")), inbox)
            inbox = None
        if isinstance(inbox, int) and kind != "sent" and not self._mark(inbox, from_store, _entry(ev)):
            return
        if kind == "msg":
            key = (ev.get("chat"), ev.get("seq"))
            if isinstance(inbox, int):
                first = self.msg_at.setdefault(key, inbox)
                if first != inbox:  # one message at two inbox positions: stored twice
                    self.w.tally.duplicates += 1
                    return
            if ev.get("device") != self.device:
                self.w.delivered(str(ev.get("id")), from_store)
            return
        if kind == "receipt" and ev.get("kind") == "delivered":
            chat, up_to = str(ev.get("chat")), int(ev.get("up_to", 0))
            if up_to > self.told_delivered.get(chat, (0, 0.0))[0]:
                self.told_delivered[chat] = (up_to, time.monotonic())
                self.w.receipt_seen.set()
            return
        rid = ev.get("id")
        if kind in ("sent", "error", "batch") and isinstance(rid, str):
            fut = self.replies.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(ev)
            elif kind == "sent":
                self.w.confirmed(rid)
            elif kind == "error":
                retry_after = ev.get("retry_after_ms")
                self.w.failed(rid, str(ev.get("code")), self, retry_after if isinstance(retry_after, int) else None)

    def _mark(self, inbox: int, from_store: bool, entry: tuple[Any, ...]) -> bool:
        """Record an inbox position; False if this device has already had it. The same entry
        again live (a live event arriving after a sync fetched it) is counted as late; another
        entry at a position already had would be a duplicate, and is counted as one."""
        if inbox <= self.cursor or inbox in self.ahead:
            had = self.at.get(inbox)
            if had is not None and had != entry:
                self.w.tally.duplicates += 1
            elif not from_store:
                self.w.tally.late_live += 1
            return False
        self.at[inbox] = entry
        if inbox == self.cursor + 1:
            self.cursor = inbox
            while self.cursor + 1 in self.ahead:
                self.ahead.discard(self.cursor + 1)
                self.cursor += 1
            if not self.ahead:
                self.gap_since = 0.0
        else:
            self.ahead.add(inbox)
            self.gap_since = self.gap_since or time.monotonic()
            self.w.gapped.add(self)
        self.w.dirty.add(self)
        return True

    def learn(self, item: dict[str, Any]) -> None:
        """A sync item at a position whose live msg left out a chat not known here: that chat is
        the direct chat with its sender."""
        peer = self.unresolved.pop(item.get("inbox"), None)  # type: ignore[arg-type]
        if peer is not None and item.get("type") == "msg" and item.get("from") == peer:
            self.chat_with[peer] = str(item.get("chat"))

    async def sync(self, limit: int = 1000, each: Callable[[dict[str, Any]], None] | None = None,
                   timeout: float = 30.0, waits_ms: list[float] | None = None) -> int:
        """Fetch the inbox after the cursor until the store has no more, showing every item to
        ``each`` too, and the wait for each batch to ``waits_ms``; return how many batches it took."""
        batches = 0
        while True:
            asked = time.monotonic()
            batch = await self.request({"type": "sync", "after": self.cursor, "limit": limit}, timeout)
            if waits_ms is not None:
                waits_ms.append(round((time.monotonic() - asked) * 1000, 1))
            if batch.get("type") != "batch":
                raise RuntimeError(f"sync answered with {batch}")
            batches += 1
            for item in batch["items"]:
                if each is not None:
                    each(item)
                self.learn(item)
                self.take(item, from_store=True)
            # positions the store skipped were never written (a refused request): move past them
            self.cursor = max(self.cursor, int(batch["last"]))
            self.ahead = {i for i in self.ahead if i > self.cursor}
            self.unresolved = {i: p for i, p in self.unresolved.items() if i > self.cursor}
            if not batch.get("more"):
                return batches

    def flush_ack(self) -> bool:
        """Acknowledge what arrived; False when a v2 device holds its ack back a little longer."""
        if self.cursor > self.acked and self.conn is not None:
            if self.proto == 2:
                now = time.monotonic()
                # at most one ack per V2_ACK_DELAY_S, the first after a quiet spell at once (as the
                # SDK), at QoS 0: the next ack covers a lost one
                if now - self.acked_at < V2_ACK_DELAY_S:
                    return False
                self.acked_at = now
            self.acked = self.cursor
            self.publish({"type": "ack", "up_to": self.cursor}, qos=0 if self.proto == 2 else 1)
        return True


class Relay:
    """A connection to the broker for the baseline: no bridge, same payloads."""

    def __init__(self, w: Worker) -> None:
        self.w = w
        self.conn: MqttConn | None = None

    def on_message(self, topic: str, payload: bytes) -> None:
        ev = json.loads(payload)
        self.w.delivered(str(ev.get("id")), False)


class Worker:
    def __init__(self, index: int, progress: Any, ca_file: str | None = None, mqtt_tls: bool = False,
                 mqtt_ws_path: str | None = None) -> None:
        self.index = index
        self.progress = progress
        # https://, mqtts:// and wss:// are checked against ca_file (None: the system's CAs)
        self.tls = tls_context(ca_file)
        self.mqtt_tls = self.tls if mqtt_tls else None
        self.proto = 1  # the protocol of the devices connected last (request ids follow it)
        self._last_id = 0
        self.mqtt_ws_path = mqtt_ws_path  # devices speak MQTT over a WebSocket at this path
        self.devs: list[Dev] = []
        self.relays: list[Relay] = []
        self.tracks: dict[str, Track] = {}
        self.done: set[str] = set()
        self.dirty: set[Dev] = set()
        self.gapped: set[Dev] = set()  # devices with an inbox gap open
        self.tally = Tally()
        self.active: list[Dev] = []  # the devices the current traffic phase involves
        self.idle = asyncio.Event()
        self.groups: list[str] = []
        self.relay_pubs: list[Relay] = []
        self.relay_topics: list[str] = []
        self.relay_address = ("to", "")
        self._ticker: asyncio.Task[None] | None = None
        self._sync_tasks: set[asyncio.Task[None]] = set()
        self._accepted_when_sent = False
        self.receipt_seen = asyncio.Event()
        # overload scenario: when each send left (msg id -> monotonic s), and each answer as
        # (sent at, answered at, "sent" or the error code), on the system-wide monotonic clock
        self.sent_at: dict[str, float] | None = None
        self.answers: list[tuple[float, float, str]] = []
        self.resend = False  # the current phase's devices send refused sends again (RESENT_CODES)
        self._again_of: dict[str, Dev] = {}  # msg id -> its device, while it goes again

    def tick(self, n: int = 1) -> None:
        self.progress[self.index] += n

    # -- delivery accounting ----------------------------------------------------------------------------
    def delivered(self, msg_id: str, from_store: bool) -> None:
        track = self.tracks.get(msg_id)
        if track is None:
            if msg_id in self.done and not from_store:
                self.tally.duplicates += 1
            return
        track.left -= 1
        self.tally.delivered += 1
        if from_store:
            self.tally.recovered_by_sync += 1
        elif track.measured:
            self.tally.delivered_measured += 1
            took_ms = (now_ns() - track.t0) / 1e6
            self.tally.latencies_ms.append(took_ms)
            self.tally.sent_s.append(time.time() - took_ms / 1000)
        self.tick()
        if track.left <= 0:
            self._finish(msg_id, track)

    def _answered(self, msg_id: str, outcome: str) -> None:
        if self.sent_at is not None:
            t0 = self.sent_at.pop(msg_id, None)
            if t0 is not None:
                self.answers.append((t0, time.monotonic(), outcome))

    def confirmed(self, msg_id: str) -> None:
        self._answered(msg_id, "sent")
        self.tally.sent_ok += 1
        track = self.tracks.get(msg_id)
        if track is not None:
            track.confirmed = True
        dev = self._again_of.pop(msg_id, None)
        if dev is not None:
            self._through(dev, msg_id)

    def _through(self, dev: Dev, msg_id: str) -> None:
        """A send that went again is answered for good: the device's later ones go on."""
        del dev.again[msg_id]
        dev.on_way.discard(msg_id)
        self._go_on(dev)

    def failed(self, msg_id: str, code: str, dev: Dev | None = None, retry_after_ms: int | None = None) -> None:
        track = self.tracks.get(msg_id)
        if (self.resend and dev is not None and code in RESENT_CODES and track is not None
                and track.attempts < RESEND_ATTEMPTS and track.place >= 0):
            self.tally.resent[code] += 1
            delay = min(RESEND_MAX_S, max(RESEND_AFTER_S * 2 ** (track.attempts - 1), (retry_after_ms or 0) / 1000))
            track.attempts += 1
            dev.again[msg_id] = track.place
            dev.on_way.discard(msg_id)
            self._again_of[msg_id] = dev
            asyncio.get_running_loop().call_later(delay * (1 + random.random() / 2), self._due, dev, msg_id)
            return
        if dev is not None and self._again_of.pop(msg_id, None) is not None:  # given up
            self._through(dev, msg_id)
        self._answered(msg_id, code)
        self.tally.errors[code] += 1
        track = self.tracks.pop(msg_id, None)
        if track is not None and track.slots is not None:
            track.slots.release()
        if not self.tracks:
            self.idle.set()

    def _resending(self, dev: Dev, send: Callable[[str], None]) -> Callable[[str], None]:
        """``send`` for a resending phase: a new send waits while any earlier one goes again."""
        dev.sender = send

        def go(msg_id: str) -> None:
            self.tracks[msg_id].place = dev.made
            dev.made += 1
            if dev.again or dev.held:
                dev.held.append(msg_id)
            else:
                send(msg_id)
        return go

    def _due(self, dev: Dev, msg_id: str) -> None:
        if msg_id in dev.again:
            dev.due.add(msg_id)
            self._go_on(dev)

    def _go_on(self, dev: Dev) -> None:
        """Send the earliest of a device's sends going again once its wait is over; when none is
        left, the sends held behind them, in their order."""
        assert dev.sender is not None
        if dev.again:
            first = min(dev.again, key=dev.again.__getitem__)
            if first in dev.due and first not in dev.on_way:
                dev.due.discard(first)
                dev.on_way.add(first)
                dev.sender(first)
            return
        while dev.held and not dev.again:
            dev.sender(dev.held.popleft())

    def _finish(self, msg_id: str, track: Track) -> None:
        del self.tracks[msg_id]
        self.done.add(msg_id)
        if track.slots is not None:
            track.slots.release()
        if not self.tracks:
            self.idle.set()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(ACK_EVERY_S)
            dirty, self.dirty = self.dirty, set()
            for dev in dirty:
                if not dev.flush_ack():
                    self.dirty.add(dev)
            now = time.monotonic()
            for dev in self.due_syncs(now):
                self._start_sync(dev)
            stall_before = now_ns() - int(STALL_S * 1e9)
            for track in list(self.tracks.values()):
                if track.slots is not None and track.t0 < stall_before:
                    # free the sender's slot; the message stays counted until it arrives or the run ends
                    self.tally.stalled += 1
                    track.slots.release()
                    track.slots = None

    def due_syncs(self, now: float) -> list[Dev]:
        """The devices to sync now: those with a gap open for GAP_SYNC_AFTER_S (a missing
        position may still come live), and at once those holding a live event they could not
        place (v2 left out a direct chat they do not know: waiting does not help)."""
        due = []
        for dev in list(self.gapped):
            if not dev.ahead and not dev.unresolved:
                self.gapped.discard(dev)
            elif not dev.syncing and (dev.unresolved or now - dev.gap_since > GAP_SYNC_AFTER_S):
                due.append(dev)
        return due

    def _start_sync(self, dev: Dev) -> None:
        async def run() -> None:
            dev.syncing = True
            self.tally.gap_syncs += 1
            try:
                await dev.sync()
            except Exception:  # noqa: BLE001 - retried at the next tick while the gap stays open
                pass
            finally:
                dev.syncing = False
                dev.gap_since = time.monotonic() if dev.ahead or dev.unresolved else 0.0

        task = asyncio.create_task(run())
        self._sync_tasks.add(task)
        task.add_done_callback(self._sync_tasks.discard)

    # -- commands -----------------------------------------------------------------------------------------
    async def login(self, http: str, phones: list[str], name: str, proto: int = 1) -> list[dict[str, str]]:
        """Log a device in for every phone (the server must run with --dev), each saying it
        reads user events in ``proto``."""
        sem = asyncio.Semaphore(LOGIN_CONCURRENCY)
        out: list[Dev | None] = [None] * len(phones)
        async with httpx.AsyncClient(base_url=http, timeout=120, verify=self.tls) as client:
            async def one(i: int, phone: str) -> None:
                async with sem:
                    r = await client.post("/v1/auth/code", json={"phone": phone})
                    r.raise_for_status()
                    code = r.json().get("dev_code")
                    if not code:
                        raise RuntimeError("the server did not return a login code: run it with --dev")
                    r = await client.post("/v1/auth/verify", json={"phone": phone, "code": code, "device_name": name,
                                                                      "proto": proto})
                    r.raise_for_status()
                    body = r.json()
                    out[i] = Dev(self, body["user_id"], body["device_id"], body["token"])
                    self.tick()

            await asyncio.gather(*(one(i, p) for i, p in enumerate(phones)))
        self.devs.extend(d for d in out if d is not None)
        return [d.creds() for d in self.devs]

    def new_id(self) -> str:
        """A request id: random hex for v1; for v2 a counter in base 36 shared by this process's
        devices, as short as the SDK's (whose counter is per device): every device here is
        fresh from this run's login, so no id can repeat for one."""
        if self.proto == 1:
            return uuid.uuid4().hex
        self._last_id += 1
        n, digits = self._last_id, ""
        while n:
            n, d = divmod(n, 36)
            digits = "0123456789abcdefghijklmnopqrstuvwxyz"[d] + digits
        return digits

    async def connect(self, host: str, port: int, first: int = 0, count: int | None = None,
                      presence: bool = True, proto: int = 1, mqtt5: bool = False) -> dict[str, Any]:
        """Connect devices[first:first+count], speaking protocol ``proto`` (over MQTT 5 with
        ``mqtt5``); return the seconds it took. (Request ids are short from then on if ``proto`` is 2.)"""
        self.proto = proto
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
        chosen = self.devs[first:None if count is None else first + count]

        async def one(dev: Dev) -> None:
            async with sem:
                await dev.connect(host, port, presence, proto, mqtt5)
                self.tick()

        t0 = time.monotonic()
        await asyncio.gather(*(one(d) for d in chosen))
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_loop())
        return {"seconds": time.monotonic() - t0, "connected": len(chosen)}

    async def make_groups(self, http: str, size: int) -> list[str]:
        """Cut this process's devices into groups of ``size``; the first of each creates it."""
        chats = []
        async with httpx.AsyncClient(base_url=http, timeout=60, verify=self.tls) as client:
            for start in range(0, len(self.devs) - size + 1, size):
                members = self.devs[start:start + size]
                r = await client.post("/v1/chats", headers={"Authorization": f"Bearer {members[0].token}"},
                                      json={"kind": "group", "title": f"bench {start // size}",
                                            "members": [m.user for m in members[1:]]})
                r.raise_for_status()
                chats.append(r.json()["chat"])
                self.tick()
        self.groups = chats
        return chats

    async def relay_connect(self, host: str, port: int, username: str, password: str, topics: list[str],
                            subscribers_per_topic: int, address: tuple[str, str]) -> dict[str, Any]:
        """Baseline: one publisher per topic and its subscribers, straight on the broker.
        ``address`` is the (key, value) the payload names its destination with, as long as
        the real one, so the baseline moves the same bytes."""
        self.relay_topics = topics
        self.relay_address = address
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(name: str, topic: str | None) -> Relay:
            async with sem:
                relay = Relay(self)
                relay.conn = await connect(host, port, name, username, password, relay.on_message)
                if topic is not None:
                    await relay.conn.subscribe([topic], timeout=30)
                self.tick()
                return relay

        tag = uuid.uuid4().hex[:8]
        subs = [one(f"bench-{tag}-s{t}-{k}", topic) for t, topic in enumerate(topics)
                for k in range(subscribers_per_topic)]
        self.relays = list(await asyncio.gather(*subs))
        self.relay_pubs = list(await asyncio.gather(*(one(f"bench-{tag}-p{t}", None) for t in range(len(topics)))))
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_loop())
        return {"connected": len(self.relays) + len(self.relay_pubs)}

    async def traffic(self, flow: str, mode: str, seconds: float, window: int = 4, rate: float = 0.0,
                      measured: bool = True, pairs: list[tuple[int, int]] | None = None,
                      group_senders: int = 1, members: int = 0, resend: bool = False) -> dict[str, Any]:
        """Send for ``seconds``: ``closed`` keeps ``window`` undelivered messages per sender,
        ``open`` sends at ``rate`` messages/s spread over the senders. ``resend``: a send answered
        ``rate_limited`` or ``unavailable`` goes again, in its device's order (RESENT_CODES).

        flow ``p2p``: pairs (sender index, recipient index) of this process's devices.
        flow ``group``: the first ``group_senders`` members of each group send into it.
        flow ``relay``: the baseline publishers publish to their topics."""
        self.tally = Tally()
        senders: list[Callable[[str], None]] = []
        expect = 1
        # the broker alone answers nothing: a relayed publish counts as accepted once sent
        self._accepted_when_sent = flow == "relay"
        self.active = []
        self.resend = resend
        self._again_of.clear()
        for dev in self.devs:
            dev.new_phase()

        def sending(dev: Dev, send: Callable[[str], None]) -> Callable[[str], None]:
            return self._resending(dev, send) if resend else send

        if flow == "p2p":
            assert pairs is not None
            if pairs:  # the ids follow the senders' protocol (wire has a pair of each)
                self.proto = self.devs[pairs[0][0]].proto
            for s, r in pairs:
                senders.append(sending(self.devs[s], self._p2p_sender(self.devs[s], self.devs[r].user)))
                self.active += [self.devs[s], self.devs[r]]
        elif flow == "group":
            expect = members - 1
            self.active = self.devs[:len(self.groups) * members]
            for g, chat in enumerate(self.groups):
                for k in range(group_senders):
                    dev = self.devs[g * members + k]
                    senders.append(sending(dev, self._group_sender(dev, chat)))
        elif flow == "relay":
            expect = max(1, members)
            for pub, topic in zip(self.relay_pubs, self.relay_topics, strict=True):
                senders.append(self._relay_sender(pub, topic))
        else:
            raise ValueError(flow)
        t_start = time.monotonic()
        stop_at = t_start + seconds
        cpu0 = time.process_time()
        if mode == "closed":
            runs = [self._closed(send, window, expect, stop_at, measured) for send in senders]
        else:
            each = rate / max(1, len(senders))
            runs = [self._open(send, each, expect, stop_at, measured, k / max(1, len(senders)) / max(each, 1e-9))
                    for k, send in enumerate(senders)]
        await asyncio.gather(*runs)
        elapsed = time.monotonic() - t_start
        out = self.tally.as_dict()
        out.update(seconds=elapsed, cpu_s=time.process_time() - cpu0, senders=len(senders))
        return out

    def _p2p_sender(self, dev: Dev, to_user: str) -> Callable[[str], None]:
        """Sends ``to`` the user until a ``sent`` has named their direct chat, then to that chat
        (as an application does once it knows the chat)."""
        def send(msg_id: str) -> None:
            chat = dev.chat_with.get(to_user)
            address = {"to": to_user} if chat is None else {"chat": chat}
            dev.publish({"type": "send", "id": msg_id, **address, "body": body_now()})
        return send

    def _group_sender(self, dev: Dev, chat: str) -> Callable[[str], None]:
        def send(msg_id: str) -> None:
            dev.publish({"type": "send", "id": msg_id, "chat": chat, "body": body_now()})
        return send

    def _relay_sender(self, relay: Relay, topic: str) -> Callable[[str], None]:
        assert relay.conn is not None
        conn = relay.conn

        key, value = self.relay_address

        def send(msg_id: str) -> None:
            payload = {"type": "send", "id": msg_id, key: value, "body": body_now()}
            conn.publish(topic, json.dumps(payload, separators=(",", ":")).encode())
        return send

    async def _closed(self, send: Callable[[str], None], window: int, expect: int, stop_at: float,
                      measured: bool) -> None:
        slots = asyncio.Semaphore(window)
        while time.monotonic() < stop_at:
            try:
                async with asyncio.timeout(max(0.001, stop_at - time.monotonic())):
                    await slots.acquire()
            except TimeoutError:
                return
            msg_id = self.new_id()
            self.tracks[msg_id] = Track(expect, now_ns(), measured, slots, self._accepted_when_sent)
            send(msg_id)

    async def _open(self, send: Callable[[str], None], rate: float, expect: int, stop_at: float,
                    measured: bool, offset: float) -> None:
        if rate <= 0:
            return
        interval = 1.0 / rate
        due = time.monotonic() + min(offset, interval)
        while due < stop_at:
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            msg_id = self.new_id()
            self.tracks[msg_id] = Track(expect, now_ns(), measured, None, self._accepted_when_sent)
            if self.sent_at is not None:
                self.sent_at[msg_id] = time.monotonic()
            send(msg_id)
            due += interval

    async def plan(self, pairs: list[tuple[int, int]], segments: list[tuple[float, float]]) -> dict[str, Any]:
        """Overload scenario: open-loop p2p traffic at each (seconds, rate) in turn, with no pause
        between them; every send's answer is recorded with when it left and came (``answers``),
        so the parent can cut the run into intervals. Sends still unanswered are listed at the end."""
        self.tally = Tally()
        self._accepted_when_sent = False
        self.sent_at, self.answers = {}, []
        senders = [self._p2p_sender(self.devs[s], self.devs[r].user) for s, r in pairs]
        self.active = [d for s, r in pairs for d in (self.devs[s], self.devs[r])]
        t_start = time.monotonic()
        cpu0 = time.process_time()
        try:
            for seconds, rate in segments:
                stop_at = time.monotonic() + seconds
                each = rate / max(1, len(senders))
                await asyncio.gather(*(self._open(send, each, 1, stop_at, True, k / max(1, len(senders))
                                                  / max(each, 1e-9)) for k, send in enumerate(senders)))
            await asyncio.sleep(2.0)  # answers to the last sends
        finally:
            pending, self.sent_at = self.sent_at, None
        out = self.tally.as_dict()
        out.update(seconds=time.monotonic() - t_start, cpu_s=time.process_time() - cpu0, senders=len(senders),
                   t_start=t_start, answers=self.answers, unanswered_at=sorted(pending.values()))
        self.answers = []
        return out

    async def drain(self, timeout: float) -> dict[str, Any]:
        """Wait for what is still on its way, then let each device sync any inbox gap. What is
        still missing is reported: as ``lost`` (deliveries) when the server had answered ``sent``
        for the message, as ``unanswered`` (messages) when it never answered at all."""
        if self.tracks:
            self.idle.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.idle.wait()
        lost_live = sum(t.left for t in self.tracks.values())
        if self.tracks:
            sem = asyncio.Semaphore(CONNECT_CONCURRENCY)

            async def catch_up(dev: Dev) -> None:
                async with sem:
                    with contextlib.suppress(Exception):  # what could not be synced is counted lost below
                        await dev.sync()

            await asyncio.gather(*(catch_up(d) for d in self.active if d.conn is not None and not d.syncing))
        await asyncio.sleep(0.3)  # let final acks go out
        lost = sum(t.left for t in self.tracks.values() if t.confirmed)
        unanswered = sum(1 for t in self.tracks.values() if not t.confirmed)
        self.tracks.clear()
        return {"lost_live": lost_live, "lost": lost, "unanswered": unanswered, "duplicates": self.tally.duplicates,
                "late_live": self.tally.late_live,
                "recovered_by_sync": self.tally.recovered_by_sync, "gap_syncs": self.tally.gap_syncs,
                "delivered_total": self.tally.delivered}  # the phase's deliveries, those during the drain too

    async def send_batch(self, senders: list[tuple[int, int]], to_user: str, window: int) -> dict[str, Any]:
        """Sync scenario: each (device index, count) sends that many messages to ``to_user`` and
        waits for every ``sent`` reply (the recipient is offline)."""
        errors: Counter[str] = Counter()

        async def run(dev: Dev, each: int) -> None:
            slots = asyncio.Semaphore(window)

            async def one() -> None:
                try:
                    reply = await dev.request({"type": "send", "to": to_user, "body": body_now()}, timeout=120)
                    if reply.get("type") != "sent":
                        errors[str(reply.get("code"))] += 1
                    else:
                        chat = str(reply["chat"])
                        dev.last_sent[chat] = max(dev.last_sent.get(chat, 0), int(reply["seq"]))
                    self.tick()
                finally:
                    slots.release()

            tasks = []
            for _ in range(each):
                await slots.acquire()
                tasks.append(asyncio.create_task(one()))
            await asyncio.gather(*tasks)

        await asyncio.gather(*(run(self.devs[i], n) for i, n in senders))
        return {"errors": dict(errors)}

    async def receipts(self, timeout: float) -> dict[str, Any]:
        """Sync scenario: wait until every sender here has been told its last message was
        delivered; return when the last of those receipts arrived (system-wide monotonic
        clock) and how many senders were never told."""
        senders = [d for d in self.devs if d.last_sent]

        def missing() -> list[Dev]:
            return [d for d in senders if any(d.told_delivered.get(c, (0, 0.0))[0] < seq
                                                for c, seq in d.last_sent.items())]

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while missing():
                    self.receipt_seen.clear()
                    await self.receipt_seen.wait()
        arrived = [t for d in senders for c in d.last_sent if (t := d.told_delivered.get(c, (0, 0.0))[1])]
        return {"last_at": max(arrived, default=None), "untold": len(missing())}

    async def catch_up(self, host: str, port: int, index: int, proto: int = 1) -> dict[str, Any]:
        """Sync scenario: connect the offline device (speaking ``proto``), sync everything,
        acknowledge it."""
        dev = self.devs[index]
        seen: list[int] = []
        self.proto = proto
        t0 = time.monotonic()
        await dev.connect(host, port, presence=True, proto=proto)
        t_connected = time.monotonic()
        taken = 0
        ids: set[tuple[str, str]] = set()

        def count(item: dict[str, Any]) -> None:
            nonlocal taken
            taken += 1
            if item.get("type") == "msg":
                # a message is its sending device's request id: v2 ids are short counters,
                # the same in every load-generator process
                ids.add((str(item.get("device")), str(item.get("id"))))
                seen.append(int(item["inbox"]))
            self.tick()

        waits_ms: list[float] = []
        batches = await dev.sync(each=count, timeout=60, waits_ms=waits_ms)
        await dev.publish({"type": "ack", "up_to": dev.cursor})
        dev.acked = dev.cursor
        t_done = time.monotonic()
        return {"t0": t0, "seconds": t_done - t0, "connect_s": t_connected - t0, "sync_s": t_done - t_connected,
                "events": taken, "unique_msgs": len(ids), "msgs": len(seen), "batches": batches,
                "batch_wait_ms": waits_ms}

    async def wire(self, sender: int, recipient: int, count: int, rate: float) -> dict[str, Any]:
        """Send ``count`` messages one pair apart at ``rate``/s and count both devices' bytes."""
        a, b = self.devs[sender], self.devs[recipient]
        assert a.conn is not None and b.conn is not None
        self.active = [a, b]
        await asyncio.sleep(1.0)  # let connect-time traffic settle
        before = (a.conn.bytes_out, a.conn.bytes_in, b.conn.bytes_out, b.conn.bytes_in)
        self.tally = Tally()
        stop_at = time.monotonic() + count / rate
        await self._open(self._p2p_sender(a, b.user), rate, 1, stop_at, True, 0.0)
        drained = await self.drain(10.0)
        await asyncio.sleep(1.0)  # receipts and acks of the last message
        after = (a.conn.bytes_out, a.conn.bytes_in, b.conn.bytes_out, b.conn.bytes_in)
        up_a, down_a, up_b, down_b = (x - y for x, y in zip(after, before, strict=True))
        return {"sender_up": up_a, "sender_down": down_a, "recipient_up": up_b, "recipient_down": down_b,
                "delivered": self.tally.delivered, "latencies_ms": self.tally.latencies_ms, **drained,
                "mqtt5": a.conn.mqtt5, "topic_aliases_to_broker": a.conn.alias_max_out,
                "aliased_by_broker": a.conn.aliased_in + b.conn.aliased_in}

    async def disconnect(self) -> dict[str, Any]:
        for dev in self.devs:
            if dev.conn is not None:
                dev.publish({"type": "presence", "state": "offline"})
                dev.conn.disconnect()
                dev.conn = None
        for relay in self.relays + self.relay_pubs:
            if relay.conn is not None:
                relay.conn.disconnect()
                relay.conn = None
        self.relays = []
        self.relay_pubs = []
        return {}


def main(conn: Connection, index: int, progress: Any, ca_file: str | None = None, mqtt_tls: bool = False,
         mqtt_ws_path: str | None = None) -> None:
    """Process entry: answer ``(command, kwargs)`` from the parent until told to stop."""
    gc.set_threshold(*GC_THRESHOLDS)
    asyncio.run(_serve(conn, Worker(index, progress, ca_file, mqtt_tls, mqtt_ws_path)))


async def _serve(conn: Connection, worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    while True:
        msg = await loop.run_in_executor(None, conn.recv)
        if msg is None:
            return
        name, kwargs = msg
        method: Callable[..., Awaitable[Any]] = getattr(worker, name)
        if name in TIMED:
            # what exists before a phase (devices, connections, earlier phases' figures) stays
            # through it: out of the collector's passes, whose pauses would count in the
            # latencies measured (a full pass held a worker 40-90 ms, BENCHMARKS.md)
            gc.collect()
            gc.freeze()
        try:
            conn.send(("ok", await method(**kwargs)))
        except Exception:  # noqa: BLE001 - the parent reports it and stops the run
            conn.send(("error", traceback.format_exc()))
