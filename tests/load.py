"""A bounded load of devices that retry as PROTOCOL.md allows, and the checks a fault must pass.

:class:`Load` drives devices in pairs, each pair writing to its direct chat. Every device keeps
up to ``window`` sends in flight at a paced rate, each under a request id of its own, and:

* resends a send under the same id when no reply came in time (a lost reply),
* resends it after a pause when the server answered ``unavailable`` or ``rate_limited`` (not
  accepted: retry later),
* after losing its connection, connects again and resends every unanswered send, under the
  same ids and in the order it first sent them,
* now and then sends an already answered send again (a retry after a lost reply), which must
  get the same ``seq``.

Everything it sent, every attempt and every reply is recorded. :func:`check` then reads each
chat's history over HTTP and each user's inbox with ``sync`` from 0, and lists every broken
promise: see its docstring. Every loop is bounded in time and count; only loopback servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from clients.sdk import Api, Device, PigeonClientError, Profile, RequestTimeout, login
from tests.conftest import fresh_phone

Event = dict[str, Any]
RETRY_LATER = ("unavailable", "rate_limited")


@dataclass
class Send:
    """One message a device sent, with every attempt and reply."""

    device: str
    user: str
    chat: str
    id: str
    body: str
    index: int  # the device's own order: the n-th send it first published
    attempts: int = 0  # publishes of this id while it was unanswered
    echoes: int = 0  # publishes of this id after it was answered (a retry after a lost reply)
    timeouts: int = 0
    replies: list[Event] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    late: list[Event] = field(default_factory=list)  # replies that came when no attempt was waiting
    trace: list[tuple[float, str]] = field(default_factory=list)

    @property
    def answered(self) -> bool:
        return bool(self.replies)

    @property
    def retried(self) -> bool:
        return self.attempts + self.echoes > 1

    def payload(self) -> Event:
        return {"type": "send", "id": self.id, "chat": self.chat, "body": self.body}


class ConnectionLost(Exception):
    """The device's connection is gone: connect again and resend what is unanswered."""


async def close_quietly(dev: Device) -> None:
    with contextlib.suppress(Exception):
        await dev.close()


class LoadDevice:
    """One device under load; see the module docstring for how it retries."""

    def __init__(self, load: Load, profile: Profile, chat: str, label: str) -> None:
        self.load = load
        self.profile = profile
        self.chat = chat
        self.label = label
        self.sends: list[Send] = []
        self._by_id: dict[str, Send] = {}
        self.connects = 0
        self.connect_failures = 0
        self.lost = 0
        self._closing: list[asyncio.Task[None]] = []

    def unanswered(self) -> list[Send]:
        return [s for s in self.sends if not s.answered]

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while loop.time() < self.load.give_up_at:
                if loop.time() >= self.load.stop_new_at and not self.unanswered():
                    return
                dev = Device(self.profile, reply_timeout=self.load.reply_timeout)
                try:
                    await dev.__aenter__()  # connects, subscribes, syncs from the profile's cursor
                except (PigeonClientError, aiomqtt.MqttError, OSError, TimeoutError):
                    self.connect_failures += 1
                    self._closing.append(asyncio.create_task(close_quietly(dev)))
                    await asyncio.sleep(0.2)
                    continue
                self.connects += 1
                try:
                    await self._pump(dev)
                    await close_quietly(dev)
                    return
                except ConnectionLost:
                    self.lost += 1
                    # closing a dead connection can take a few bounded seconds: not on the resend path
                    self._closing.append(asyncio.create_task(close_quietly(dev)))
        finally:
            if self._closing:
                await asyncio.wait(self._closing, timeout=30)

    async def _pump(self, dev: Device) -> None:
        load = self.load
        loop = asyncio.get_running_loop()
        inflight: dict[asyncio.Task[Event], Send] = {}
        retry_at: dict[str, float] = {}  # sends refused for now -> when to send them again

        def attempt(s: Send, *, echo: bool = False) -> None:
            if echo:
                s.echoes += 1
            else:
                s.attempts += 1
            s.trace.append((loop.time(), "echo" if echo else "attempt"))
            # tasks start in creation order, so their publishes leave in this order too
            inflight[asyncio.create_task(dev.request(s.payload(), timeout=load.reply_timeout))] = s

        try:
            # a new connection: every unanswered send again, same ids, in the order first sent
            for s in self.unanswered():
                attempt(s)
            next_new = loop.time()
            while loop.time() < load.give_up_at:
                now = loop.time()
                if now >= load.stop_new_at and not inflight and not self.unanswered():
                    return
                for s in self.unanswered():
                    if retry_at.get(s.id, math.inf) <= now:
                        del retry_at[s.id]
                        attempt(s)
                if (now < load.stop_new_at and now >= next_new and len(self.sends) < load.max_sends
                        and len(self.unanswered()) < load.window):
                    s = Send(device=self.profile.device_id, user=self.profile.user_id, chat=self.chat,
                             id=f"{self.label}-{len(self.sends)}-{random.getrandbits(32):08x}",
                             body=f"{self.label}:{len(self.sends)}", index=len(self.sends))
                    self.sends.append(s)
                    self._by_id[s.id] = s
                    attempt(s)
                    next_new = now + 1 / load.rate
                    if s.index % load.echo_every == load.echo_every - 1:
                        busy = {id(x) for x in inflight.values()}
                        done = [x for x in self.sends if x.answered and id(x) not in busy]
                        if done:
                            attempt(random.choice(done), echo=True)
                if inflight:
                    finished, _ = await asyncio.wait(inflight, timeout=0.02, return_when=asyncio.FIRST_COMPLETED)
                else:
                    finished = set()
                    await asyncio.sleep(0.02)
                for ev in dev.pending_events():  # replies nobody waited for, and inbox events
                    late = self._by_id.get(str(ev.get("id")))
                    if late is not None and ev.get("type") in ("sent", "error"):
                        late.late.append(ev)
                        late.trace.append((loop.time(), f"late {ev.get('type')} {ev.get('code', ev.get('seq'))}"))
                for task in finished:
                    s = inflight.pop(task)
                    exc = task.exception()
                    wait = getattr(exc, "retry_after_ms", None)
                    s.trace.append((loop.time(), f"{type(exc).__name__ if exc else 'sent'} "
                                                 f"{getattr(exc, 'code', '') if exc else task.result().get('seq')}"
                                                 + (f" retry after {wait} ms" if wait is not None else "")))
                    if exc is None:
                        s.replies.append(task.result())
                    elif isinstance(exc, RequestTimeout):
                        s.timeouts += 1
                        if not s.answered:
                            attempt(s)  # a lost reply: the same id again
                    elif isinstance(exc, PigeonClientError) and exc.code == "not_connected":
                        raise ConnectionLost() from exc  # (how the SDK's request tells a lost connection)
                    elif isinstance(exc, PigeonClientError):
                        s.errors.append(exc.code)
                        if exc.code in RETRY_LATER and not s.answered:
                            retry_at[s.id] = loop.time() + max(0.3, (exc.retry_after_ms or 0) / 1000)
                    else:
                        raise exc
        finally:
            for task in inflight:
                task.cancel()
            if inflight:
                await asyncio.wait(inflight, timeout=5)


@dataclass
class Pair:
    a: Profile
    b: Profile
    chat: str


async def make_pairs(http_url: str, n: int) -> list[Pair]:
    """``n`` pairs of fresh users, each pair with its direct chat."""
    pairs = []
    for _ in range(n):
        a = await login(http_url, fresh_phone(), device_name="load")
        b = await login(http_url, fresh_phone(), device_name="load")
        async with Api(a) as api:
            chat = str((await api.open_direct(b.user_id))["chat"])
        pairs.append(Pair(a, b, chat))
    return pairs


class Load:
    """Devices in pairs sending to each other until :meth:`stop_new`, then until all is answered."""

    def __init__(self, pairs: list[Pair], *, window: int = 4, rate: float = 15.0, reply_timeout: float = 10.0,
                 echo_every: int = 10, max_sends: int = 400, give_up_after: float = 60.0) -> None:
        self.pairs = pairs
        self.window = window
        self.rate = rate
        self.reply_timeout = reply_timeout
        self.echo_every = echo_every
        self.max_sends = max_sends
        self.give_up_after = give_up_after
        self.stop_new_at = math.inf
        self.give_up_at = math.inf
        self.devices = [LoadDevice(self, p, pair.chat, f"p{i}{side}")
                        for i, pair in enumerate(pairs) for side, p in (("a", pair.a), ("b", pair.b))]
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.give_up_at = asyncio.get_running_loop().time() + self.give_up_after
        self._tasks = [asyncio.create_task(d.run(), name=f"load-{d.label}") for d in self.devices]

    def stop_new(self, after: float = 0.0) -> None:
        """No new sends from ``after`` seconds on; what is unanswered is still retried."""
        self.stop_new_at = asyncio.get_running_loop().time() + after

    async def wait(self) -> None:
        """Until every device has all its sends answered (or gave up), bounded."""
        remaining = self.give_up_at - asyncio.get_running_loop().time()
        done, pending = await asyncio.wait(self._tasks, timeout=max(0.0, remaining) + 45)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        assert not pending, f"load devices still running after the bound: {[t.get_name() for t in pending]}"

    def sends(self) -> list[Send]:
        return [s for d in self.devices for s in d.sends]

    def summary(self) -> str:
        sends = self.sends()
        return (f"{len(sends)} sends, {sum(s.retried for s in sends)} retried "
                f"({sum(s.timeouts for s in sends)} timeouts, {sum(len(s.errors) for s in sends)} refusals "
                f"{dict(Counter(e for s in sends for e in s.errors))}, {sum(s.echoes for s in sends)} echoes), "
                f"{sum(d.lost for d in self.devices)} connections lost, "
                f"{sum(d.connect_failures for d in self.devices)} failed connects")


# -- the checker ------------------------------------------------------------------------------------------

async def read_history(api: Api, chat: str) -> list[Event]:
    """Every message of a chat over HTTP, newest first page by page; returned in seq order."""
    out: list[Event] = []
    before: int | None = None
    for _ in range(1000):
        page = await api.history(chat, before=before, limit=200)
        out.extend(page["messages"])
        before = page["next_before"]
        if before is None:
            return sorted(out, key=lambda m: int(m["seq"]))
    raise AssertionError(f"history of {chat} did not end after 1000 pages")


async def read_inbox(profile: Profile) -> list[Event]:
    """The user's whole inbox, with ``sync`` from 0, exactly as the server returns it."""
    dev = Device(profile, reply_timeout=20)
    items: list[Event] = []
    try:
        await dev.__aenter__()
        after = 0
        for _ in range(1000):
            batch = await dev.request({"type": "sync", "after": after, "limit": 1000}, timeout=20)
            items.extend(batch["items"])
            if not batch["more"]:
                return items
            if not batch["items"]:
                raise AssertionError(f"sync after {after} said more but returned nothing")
            after = int(batch["last"])
        raise AssertionError("sync from 0 did not end after 1000 batches")
    finally:
        await close_quietly(dev)


MESSAGE_FIELDS = ("chat", "seq", "id", "from", "device", "kind", "body")


def trace(s: Send) -> str:
    t0 = s.trace[0][0] if s.trace else 0.0
    steps = [f"+{at - t0:.2f}s {what}" for at, what in s.trace]
    if len(steps) > 12:
        steps = [*steps[:6], f"... {len(steps) - 12} more ...", *steps[-6:]]
    return (f"{s.attempts} attempts, {s.echoes} echoes, {s.timeouts} timeouts, refusals {dict(Counter(s.errors))}, "
            f"replies {[r.get('seq') for r in s.replies]}, late {[r.get('code', r.get('seq')) for r in s.late]}; "
            + ", ".join(steps))


def describe(by_key: dict[tuple[str, str], Send], msgs: list[Event], chat: str, seq: int) -> str:
    """How the device that sent (chat, seq) went about it, for a failure message."""
    for e in msgs:
        if (e["chat"], e["seq"]) == (chat, seq):
            s = by_key.get((str(e.get("device")), str(e.get("id"))))
            if s is not None:
                return f" (send {s.id}: {trace(s)})"
    return ""


async def check(load: Load, report: Path | None = None) -> list[str]:
    """Read every chat's history and every user's inbox from 0, and :func:`judge` them.

    With ``report``, everything read and sent is written there as JSON, for a failure's post-mortem.
    """
    histories: dict[str, list[Event]] = {}
    for pair in load.pairs:
        async with Api(pair.a) as api:
            histories[pair.chat] = await read_history(api, pair.chat)
    inboxes: dict[str, list[Event]] = {}
    for pair in load.pairs:
        for p in (pair.a, pair.b):
            inboxes[p.user_id] = await read_inbox(p)
    problems = judge(load, histories, inboxes)
    if report is not None:
        text = json.dumps({
            "problems": problems, "summary": load.summary(), "histories": histories, "inboxes": inboxes,
            "devices": {d.label: {"device": d.profile.device_id, "user": d.profile.user_id, "chat": d.chat,
                                  "sends": [dataclasses.asdict(s) for s in d.sends]} for d in load.devices},
        }, indent=1, default=str)
        await asyncio.to_thread(report.write_text, text)
    return problems


def judge(load: Load, histories: dict[str, list[Event]], inboxes: dict[str, list[Event]]) -> list[str]:
    """Every broken promise after a fault and recovery, one line each (empty: all kept).

    * every send was answered ``sent``, every retried send too, and all the replies to one
      request id name the same chat and seq;
    * each (device, request id) is stored exactly once, at the seq its replies named, with its
      body; the history holds nothing the devices did not send;
    * each chat's seqs are 1..N with no gap and no repeat;
    * one device's messages to its chat have seqs in the order the device first sent them
      (a pair is excused only when the server refused the earlier one: not accepted, so it
      was accepted later, when the device sent it again);
    * each user's inbox, read with sync from 0, has positions 1..M with no gap, holds every
      message of the user's chats exactly once, each as history has it.
    """
    problems: list[str] = []
    sends = load.sends()
    by_key: dict[tuple[str, str], Send] = {(s.device, s.id): s for s in sends}

    for s in sends:
        if not s.answered:
            what = "a retried send" if s.retried else "a send"
            problems.append(f"{what} was never answered: {s.id} ({trace(s)})")
            continue
        if any(r.get("type") != "sent" for r in s.replies):
            problems.append(f"{s.id}: a reply that is not 'sent': {s.replies}")
        named = {(r.get("chat"), r.get("seq")) for r in s.replies}
        if len(named) != 1:
            problems.append(f"{s.id}: answered at different places {sorted(named, key=str)}")

    stored: dict[tuple[str, str], Event] = {}
    for chat, msgs in histories.items():
        seqs = [int(m["seq"]) for m in msgs]
        repeated = sorted(q for q, n in Counter(seqs).items() if n > 1)
        if repeated:
            problems.append(f"chat {chat}: seqs given twice: {repeated[:20]}")
        if sorted(set(seqs)) != list(range(1, len(set(seqs)) + 1)):
            missing = sorted(set(range(1, max(seqs, default=0) + 1)) - set(seqs))
            problems.append(f"chat {chat}: seqs with gaps, missing {missing[:20]}")
        for m in msgs:
            key = (str(m.get("device")), str(m.get("id")))
            if key in stored:
                twice = by_key.get(key)
                problems.append(f"chat {chat}: {key} stored twice, at seqs {stored[key]['seq']} and {m['seq']}"
                                + (f" ({trace(twice)})" if twice else ""))
                continue
            stored[key] = m
            sender = by_key.get(key)
            if sender is None:
                problems.append(f"chat {chat}: seq {m['seq']} {key} was never sent by a device")
            elif m.get("body") != sender.body or m.get("from") != sender.user or m.get("chat") != sender.chat:
                problems.append(f"chat {chat}: seq {m['seq']} does not hold what {sender.id} sent: {m}")

    seq_of: dict[tuple[str, str], int] = {}
    for key, s in by_key.items():
        found = stored.get(key)
        if found is None:
            if s.answered:
                problems.append(f"{s.id} was answered {s.replies[0]} but is not in the history")
            continue
        seq_of[key] = int(found["seq"])
        if s.answered and (s.replies[0].get("chat"), s.replies[0].get("seq")) != (found["chat"], found["seq"]):
            problems.append(f"{s.id} was answered at seq {s.replies[0].get('seq')} but is stored at {found['seq']}")

    for d in load.devices:
        mine = [s for s in d.sends if (s.device, s.id) in seq_of]  # in the order first sent
        for earlier, later in itertools.combinations(mine, 2):
            if seq_of[(earlier.device, earlier.id)] > seq_of[(later.device, later.id)] and not earlier.errors:
                problems.append(f"device {d.label}: its send #{earlier.index} is stored at seq "
                                f"{seq_of[(earlier.device, earlier.id)]}, after its later send #{later.index} "
                                f"at seq {seq_of[(later.device, later.id)]} ({trace(earlier)})")

    chats_of: dict[str, list[str]] = defaultdict(list)
    for pair in load.pairs:
        chats_of[pair.a.user_id].append(pair.chat)
        chats_of[pair.b.user_id].append(pair.chat)
    for user, chats in chats_of.items():
        items = inboxes[user]
        positions = [int(e["inbox"]) for e in items]
        if positions != list(range(1, len(items) + 1)):
            wrong = [(i + 1, p) for i, p in enumerate(positions) if p != i + 1]
            problems.append(f"user {user}: inbox positions are not 1..{len(items)}; first differences "
                            f"(expected, got): {wrong[:10]}")
        msgs = [e for e in items if e.get("type") == "msg"]
        counts = Counter((str(e["chat"]), int(e["seq"])) for e in msgs)
        for chat, seq in sorted(k for k, n in counts.items() if n > 1):
            at = [int(e["inbox"]) for e in msgs if (e["chat"], e["seq"]) == (chat, seq)]
            problems.append(f"user {user}: inbox holds chat {chat} seq {seq} more than once, at positions {at}"
                            f"{describe(by_key, msgs, chat, seq)}")
        expected = {(chat, int(m["seq"])): m for chat in chats for m in histories[chat]}
        lacking = sorted(set(expected) - set(counts))
        if lacking:
            problems.append(f"user {user}: sync from 0 lacks {len(lacking)} messages: {lacking[:20]}")
        strangers = sorted(set(counts) - set(expected))
        if strangers:
            problems.append(f"user {user}: inbox holds messages that are in no history: {strangers[:20]}")
        for e in msgs:
            kept = expected.get((str(e["chat"]), int(e["seq"])))
            if kept is not None and any(e.get(f) != kept.get(f) for f in MESSAGE_FIELDS):
                problems.append(f"user {user}: inbox entry {e} differs from the history's {kept}")
    return problems
