"""The bridge as an MQTT client: consume device publishes from a broker, publish replies and events.

Used with any broker the bridge does not run itself, and selectable on the embedded one
(``--ingest mqtt``). Each device's publishes wait in a lane of its own, handled one at a time
and in order by a task that lives while the lane holds any, so different devices proceed in
parallel and one whose request waits long on the store holds up no other device. Connections
are re-established with capped, jittered backoff.

**Partitioned** (a store with partition leases: Cassandra). Devices keep publishing on
``up/{user}/{device}``; each bridge process receives only the traffic of the users of the
partitions it holds. For each such partition it holds one persistent broker session under the
partition's own client id (``{bridge user}-{keyspace}-p{N}``), subscribed to ``up/{user}/+`` for each of the
partition's users; a user's topic joins the session at login, through the holder. When a
partition changes hands, the new holder connects under the same client id: the broker closes
the old holder's connection and hands the new one the session, with everything that arrived
while nobody held it. Replies and events go out on a connection of their own.

**Unpartitioned** (one bridge, e.g. on SQLite): one persistent session subscribed to ``up/+/+``.

**How long publishes wait before the bridge reads them.** A session's publishes queue in the
broker and in the kernel's socket buffers before paho reads them, where the bridge cannot see
them. So each receiving session also subscribes to a probe topic of its own,
``up/~probe/{client id}`` (no device can publish there: a user id never starts with ``~``), and
the bridge publishes the time on it every ``PROBE_EVERY_S``, whether or not earlier probes came
back. The broker hands a session its publishes in the order they reached it, so a publish read
while a probe is still on its way reached the broker before that probe: it has waited at least
as long as the oldest probe on its way has been gone. That is the wait counted for it, for
admission control (bridge/admission.py), which refuses what waited past its bound as it is
read: a backlog that built up in the broker during an overload is answered at once rather than
handled seconds late, and as the backlog drains the count follows it down within a probe's
period. (The last probe's round trip, counted before, stood until the next probe came back:
a drained session's publishes were counted as old as the backlog had been for one more round
trip.) The broker must let the bridge publish there (``publishClientSend up/~probe/#``,
docs/deploy.md); without it the wait is taken as 0.

Either way a publish is acknowledged only once it has been handled (paho's manual ack), so what
the broker accepted while the bridge was down, or was still handling when it died, is delivered
again when it comes back. Acknowledgements go out as handling finishes, so not always in the
order the publishes arrived: MQTT 3.1.1 asks a client to acknowledge in order (4.6.0-2), which
would make every device wait behind the slowest one; Mosquitto matches a PUBACK to its publish
by packet id and accepts them in any order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import aiomqtt
from paho.mqtt.client import MQTT_ERR_NO_CONN, MQTT_ERR_QUEUE_SIZE, MQTT_ERR_SUCCESS, MQTTMessage

from .errors import PigeonError
from .mqtt_matcher import cycle_free_lookups
from .mqtt_reads import buffered_reads
from .mqtt_writes import coalesce_writes, no_delay, write_soon

log = logging.getLogger(__name__)

Handle = Callable[[str, bytes], Awaitable[None]]
# admission control (bridge/admission.py): None when a publish is taken in (``Release`` once it
# has been handled), else an awaitable answering it at once; it is then acknowledged, not queued.
# The third argument: when the bridge received it (time.monotonic()), before it waited to be read;
# the fourth: how many of its device's are held already (its lane, the one being handled included).
Admit = Callable[[str, bytes, float, int], Awaitable[None] | None]
Release = Callable[[], None]
# as a publish taken in then is about to be handled (time.monotonic()): None to handle it,
# else an awaitable answering it instead (it waited past admission control's bound)
Start = Callable[[str, bytes, float], Awaitable[None] | None]
# a device's refusal window being recorded for the next holder of its partition (bridge/admission.py,
# HeldBackHandover.recorded): None when nothing of the device's is left to record, else what
# settles once it is written (or given up); its publishes are acknowledged after that
Recorded = Callable[[str], asyncio.Future[None] | None]
# topic, payload, what acknowledges it once handled (None: nothing to acknowledge), when it was
# taken in, and the connection it came on
Item = tuple[str, bytes, Callable[[], None] | None, float, aiomqtt.Client]
UP_FILTER = "up/+/+"


# Publishes taken in and not yet handled, past which taking in more waits (admission control,
# when on, refuses long before: --max-pending). Each device's wait in a lane of its own, handled
# by a task while it holds any. Before, 256 workers each served the devices hashed to it, one
# request at a time: a request that waited on the store (a number asked of a bridge that had
# died, up to 5 s until its partition was taken over) held up every device behind it on its
# worker, and 256 such requests at once held them all: the bridge served no one meanwhile. Now
# what is handled at once is bounded by admission control alone, as on the embedded broker,
# whose devices' requests each wait in a queue of their own too.
MAX_TAKEN_IN = 100_000
# QoS-1 publishes of the bridge awaiting their PUBACK (paho's default of 20 would queue the
# replies of a busy bridge behind each other's round trips).
MAX_INFLIGHT = 256
# replies and events handed to the outgoing connection and not yet acknowledged by the broker,
# beyond which publishing waits (see publish_all)
MAX_QUEUED = 10_000


# A receiving session's probe topic (see the module's docstring), and how often it is probed.
PROBE_PREFIX = "up/~probe/"
PROBE_EVERY_S = 0.25
# A session that reads nothing for this many periods (60 s) gets no more probes until one comes
# back: the oldest on its way already says how long it has waited.
PROBE_MAX_ON_WAY = 240

# Publishes one session takes in (or refuses) per turn of the event loop at most. A session's
# socket is read many packets at a wake-up (bridge/mqtt_reads.py), and taking in all of them at
# once made the loop's turns long under a flood: a login, a dozen store and broker round trips
# each waiting for the next turn, took up to 1.1-2.6 s (0.6-0.7 s before; BENCHMARKS.md,
# 2026-12-02, with 8 here: up to 0.8-1.2 s).
TAKE_PER_TURN = 8

# Topics per SUBSCRIBE when a partition's session subscribes to its users' device topics.
SUBSCRIBE_CHUNK = 100
SESSION_READY_S = 5.0
# A login waits this long at most for the SUBACK of its user's device topics. The broker takes a
# subscription when it reads the SUBSCRIBE, which goes out at once on a connection that carries
# little from the bridge; its SUBACK comes back behind every publish already queued toward the
# bridge, and under a flood that was seconds, so logins took 3-5 s and more (BENCHMARKS.md,
# 2026-11-30 dusk). Past this wait the SUBACK is still awaited, and a refusal is logged.
SUBACK_WAIT_S = 0.3


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class IngestError(PigeonError):
    """The bridge could not reach the broker in time."""


def _late_suback(fut: asyncio.Future[Any], part: int, user_id: str) -> None:
    """The end of a subscription a login stopped waiting for (SUBACK_WAIT_S): only a failure is news."""
    if fut.cancelled():
        log.warning("partition %d: the subscription to %s's device topics was cancelled", part, user_id)
    elif fut.exception() is not None:
        log.error("partition %d: subscribing to %s's device topics failed late: %s", part, user_id,
                  fut.exception())


class _Probe:
    """How long one receiving session's publishes wait before the bridge reads them (the
    module's docstring)."""

    def __init__(self, client_id: str) -> None:
        self.topic = PROBE_PREFIX + client_id
        # when each of the probes on their way was sent, oldest first
        self.on_way: deque[float] = deque()
        self.last = 0.0  # the round trip of the last one that came back
        self.seen = False  # one came back: the broker lets the bridge probe
        self._tag = f"{os.getpid()}:"

    def payload(self, now: float) -> bytes:
        return f"{self._tag}{now!r}".encode()

    def due(self) -> bool:
        """Whether to send the next probe (one goes every PROBE_EVERY_S): not past PROBE_MAX_ON_WAY."""
        return len(self.on_way) < PROBE_MAX_ON_WAY

    def sent(self, now: float) -> None:
        self.on_way.append(now)

    def lost(self) -> None:
        """The probes on their way went with the connection that sent them."""
        self.on_way.clear()

    def came_back(self, payload: bytes, received_at: float) -> None:
        tag, _, sent = payload.decode(errors="replace").rpartition(":")
        if tag + ":" != self._tag:
            return  # another process's (a bridge that held this session before)
        try:
            sent_at = float(sent)
        except ValueError:
            return
        self.last = max(0.0, received_at - sent_at)
        self.seen = True
        # the broker keeps a session's order: any sent before this one that is still counted
        # was lost on its way (with a connection), not delayed
        while self.on_way and self.on_way[0] <= sent_at:
            self.on_way.popleft()

    def lag(self, now: float) -> float:
        """The least a publish read now has waited: as long as the oldest probe on its way has
        been gone (0 with none on its way, or before any came back: a broker that does not let
        the bridge probe gives 0)."""
        if not self.on_way or not self.seen:
            return 0.0
        return max(0.0, now - self.on_way[0])


class _Received(aiomqtt.Message):
    """A publish with the time paho read it off the socket: aiomqtt's message drops it, and the
    wait in aiomqtt's queue, before the bridge takes the publish in, is part of a request's wait."""

    received_at = 0.0


def _stamp_receipts(client: aiomqtt.Client) -> None:
    """Queue this client's incoming publishes as aiomqtt does, with their time of receipt."""
    queue = client._queue

    def on_message(_client: object, _userdata: object, message: MQTTMessage) -> None:
        m = _Received._from_paho_message(message)
        m.received_at = message.timestamp  # paho's time_func: time.monotonic()
        queue.put_nowait(m)

    client._client.on_message = on_message


_DISCONNECTED: Any = object()  # put in a client's queue when its connection ends


async def _incoming(client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Message]:
    """The publishes ``client`` receives, as ``client.messages`` gives them, until its connection
    ends (then :class:`aiomqtt.MqttError`, as there). ``client.messages`` starts a task for each
    publish it waits for and races it against the end of the connection with ``asyncio.wait``:
    8-10 µs a publish against 3.5 µs for waiting on the queue itself, and the task was one of
    the ten or so each message made (BENCHMARKS.md, 2026-12-02 afternoon). Here the end of the
    connection puts a marker in the queue, behind what was received before it."""
    queue = client._queue
    disconnected = client._disconnected

    def wake(_: asyncio.Future[None]) -> None:
        queue.put_nowait(_DISCONNECTED)

    disconnected.add_done_callback(wake)
    try:
        while True:
            message = await queue.get()
            if message is _DISCONNECTED:
                queue.put_nowait(_DISCONNECTED)  # (for _take_queued, should it look again)
                cause = None if disconnected.cancelled() else disconnected.exception()
                raise aiomqtt.MqttError("Disconnected during message iteration") from cause
            yield message
    finally:
        disconnected.remove_done_callback(wake)


@runtime_checkable
class Partitions(Protocol):
    """Which users' device traffic this process takes: those of the partitions it holds (the
    store's partition leases, see storage/cassandra_owner.py)."""

    @property
    def partition_scope(self) -> str:
        """What one deployment's partitions are called (its keyspace): their broker sessions are
        named after it, so two deployments on one broker never take each other's."""

    def held_partitions(self) -> list[int]: ...

    def leased_here(self, part: int) -> bool:
        """Whether this process's lease on the partition still stands: held, or being given
        back (then not among ``held_partitions``, and no other process holds it yet)."""

    def queue_of(self, part: int) -> str:
        """Where requests for the holder of that partition wait (see storage/state_redis.py)."""

    async def partitions_changed(self) -> None: ...

    def partition_of_user(self, user_id: str) -> int: ...

    async def partition_users(self, part: int) -> list[str]: ...


AskHolder = Callable[[int, dict[str, object], float], Awaitable[dict[str, object]]]


class MqttIngest:
    def __init__(
        self, host: str, port: int, *, username: str, password: str, client_id: str, handle: Handle,
        max_taken_in: int = MAX_TAKEN_IN, max_backoff_s: float = 30.0,
        persistent: bool = False, partitions: Partitions | None = None, ask_holder: AskHolder | None = None,
        tls_context: ssl.SSLContext | None = None, admit: Admit | None = None, release: Release | None = None,
        start: Start | None = None, on_session: Callable[[int], Awaitable[None]] | None = None,
        recorded: Recorded | None = None,
    ) -> None:
        """``on_session``: awaited each time a partition's session is connected, before any of
        its publishes is taken in (the bridge adopts the devices' refusal windows the partition's
        previous holder recorded). ``recorded``: a publish whose handling opened, grew or closed
        its device's window is acknowledged once the window is recorded, so that a bridge dying
        first leaves it to the partition's next holder (the broker hands it again), in the
        device's order, rather than acknowledged with no window to hold its later sends."""
        self._on_session, self._recorded = on_session, recorded
        self._host, self._port = host, port
        self._tls = tls_context  # None: plain MQTT
        self._username, self._password, self._client_id = username, password, client_id
        self._handle = handle
        self._admit, self._release, self._start = admit, release, start
        self._persistent = persistent
        # device topic -> its publishes taken in and not yet handled (the first being handled)
        self._lanes: dict[str, deque[Item]] = {}
        # connections of partitions given up: what they brought and is not handled yet is left to
        # the partition's next holder, to whom the broker hands it (it was not acknowledged)
        self._given_up: weakref.WeakSet[aiomqtt.Client] = weakref.WeakSet()
        # each partition's session connections, the lost ones too while what came on them waits
        # in a lane: all are given up with the partition (one lost before it went was not)
        self._connections: dict[int, weakref.WeakSet[aiomqtt.Client]] = {}
        self._taken_in, self._max_taken_in = 0, max_taken_in
        self._room = asyncio.Event()  # set when taking in no longer waits for room
        self._room.set()
        self._tasks: asyncio.TaskGroup | None = None  # run()'s, which the lanes' tasks join
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._max_backoff = max_backoff_s
        self._partitions = partitions
        self._ask_holder = ask_holder
        # partition -> its session's connection, once subscribed (partitioned mode)
        self._sessions: dict[int, aiomqtt.Client] = {}
        self.slow_subacks = 0  # logins that went on before their SUBACK came (see SUBACK_WAIT_S)
        self._session_ready: dict[int, asyncio.Event] = {}
        # receiving client id -> its probe (see the module's docstring)
        self._probes: dict[str, _Probe] = {}

    async def wait_connected(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError as exc:
            raise IngestError(f"no connection to the broker at {self._host}:{self._port} in {timeout}s") from exc

    async def publish_all(self, items: Sequence[tuple[str, bytes, int]]) -> None:
        """Hand publishes to the outgoing connection in order, without waiting for the broker to
        acknowledge each: the client keeps their order on the wire and resends what is not
        acknowledged, and the request that made them waits neither a broker round trip nor a
        task per publish. Waits while there is no connection or MAX_QUEUED are unacknowledged
        or not yet written;
        what cannot be handed over within 5 s is dropped (live delivery is best effort: devices
        catch up from the store)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        i = 0
        while True:
            client = self._client
            rc = MQTT_ERR_NO_CONN
            if client is not None:
                paho = client._client
                while i < len(items):
                    if len(paho._out_packet) >= MAX_QUEUED:  # not written yet (QoS 0 ones have no other bound)
                        rc = MQTT_ERR_QUEUE_SIZE
                        break
                    topic, payload, qos = items[i]
                    rc = paho.publish(topic, payload, qos).rc
                    if rc not in (MQTT_ERR_SUCCESS, MQTT_ERR_NO_CONN, MQTT_ERR_QUEUE_SIZE):
                        log.warning("publish on %s refused (%s): dropped", topic, rc)
                    elif rc != MQTT_ERR_SUCCESS:
                        break
                    i += 1
                if i == len(items):
                    return
            if loop.time() >= deadline:
                log.warning("dropping %d live publishes: broker unreachable or not acknowledging", len(items) - i)
                return
            if rc == MQTT_ERR_QUEUE_SIZE:
                await asyncio.sleep(0.01)  # let acknowledgements come in
            else:  # no connection (a publish it took is gone with it): wait for the next one
                await self._next_connection(client, deadline - loop.time())

    async def _next_connection(self, old: aiomqtt.Client | None, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                while self._client is None or self._client is old:
                    if self._client is None:
                        await self._connected.wait()
                    else:  # the old connection is still being given up
                        await asyncio.sleep(0.05)
        except TimeoutError:
            pass

    async def run(self) -> None:
        """Consume until cancelled."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tasks = tg
                tg.create_task(self._consume(), name="ingest-consumer")
                tg.create_task(self._probe(), name="ingest-probe")
                if self._partitions is not None:
                    tg.create_task(self._follow_partitions(), name="ingest-partitions")
        finally:
            self._tasks = None

    # -- partitioned: one broker session per partition held ---------------------------------------
    async def _follow_partitions(self) -> None:
        """Hold one persistent broker session for each partition this process holds, under the
        partition's own client id: whoever holds a partition takes over its session, with what
        the broker kept for it meanwhile (a new connection under a client id closes the old)."""
        assert self._partitions is not None
        running: dict[int, asyncio.Task[None]] = {}
        try:
            while True:
                held = set(self._partitions.held_partitions())
                for part in held - running.keys():
                    self._session_ready.setdefault(part, asyncio.Event())
                    running[part] = asyncio.create_task(self._session(part), name=f"ingest-p{part}")
                for part in list(running.keys() - held):
                    running.pop(part).cancel()
                    self._sessions.pop(part, None)
                    self._given_up.update(self._connections.pop(part, ()))
                    self._session_ready.pop(part, None)
                    log.info("gave up the broker session of partition %d", part)
                try:
                    async with asyncio.timeout(1.0):
                        await self._partitions.partitions_changed()
                except TimeoutError:
                    pass
        finally:
            for task in running.values():
                task.cancel()
            await asyncio.gather(*running.values(), return_exceptions=True)

    def _session_id(self, part: int) -> str:
        assert self._partitions is not None
        return f"{self._username}-{self._partitions.partition_scope}-p{part}"

    async def _session(self, part: int) -> None:
        assert self._partitions is not None
        backoff = 0.2
        while True:
            client = self._new_client(self._session_id(part), persistent=True)
            self._connections.setdefault(part, weakref.WeakSet()).add(client)
            try:
                async with client:
                    users = await self._partitions.partition_users(part)
                    # Subscriptions live in the session: renewing them is idempotent, and covers a
                    # broker that lost its sessions (a restart without persistence).
                    for start in range(0, len(users), SUBSCRIBE_CHUNK):
                        await client.subscribe([(f"up/{u}/+", 1) for u in users[start:start + SUBSCRIBE_CHUNK]])
                    await self._start_probe(client)
                    if self._on_session is not None:
                        await self._on_session(part)
                    self._sessions[part] = client
                    self._session_ready.setdefault(part, asyncio.Event()).set()
                    log.info("holding the broker session of partition %d (%d users)", part, len(users))
                    backoff = 0.2
                    async for message in _incoming(client):
                        await self._take(client, message)
                        await self._take_queued(client)
            except aiomqtt.MqttError as exc:
                log.warning("broker session of partition %d lost: %s", part, exc)
            except Exception:  # noqa: BLE001 - the session is retried; a store hiccup must not end it
                log.exception("broker session of partition %d failed", part)
            finally:
                if self._sessions.get(part) is client:
                    del self._sessions[part]
                    ready = self._session_ready.get(part)
                    if ready is not None:
                        ready.clear()
            await asyncio.sleep(backoff * (1 + random.random()))
            backoff = min(self._max_backoff, backoff * 2)

    async def watch_user(self, user_id: str) -> None:
        """Make sure the device topics of this user reach the holder of the user's partition
        (at login, before the device is handed its credentials)."""
        if self._partitions is None:
            return
        part = self._partitions.partition_of_user(user_id)
        if part in self._partitions.held_partitions():
            await self.subscribe_user(part, user_id)
            return
        if self._ask_holder is None:
            raise IngestError(f"partition {part} is held by another bridge, which this one cannot reach")
        reply = await self._ask_holder(part, {"kind": "subscribe", "user": user_id}, SESSION_READY_S)
        if "error" in reply:
            raise IngestError(f"partition {part}: {reply['error']}")

    async def subscribe_user(self, part: int, user_id: str) -> None:
        ready = self._session_ready.setdefault(part, asyncio.Event())
        try:
            async with asyncio.timeout(SESSION_READY_S):
                await ready.wait()
        except TimeoutError as exc:
            raise IngestError(f"the broker session of partition {part} is not up") from exc
        client = self._sessions.get(part)
        if client is None:
            raise IngestError(f"the broker session of partition {part} is not up")
        subscribing = asyncio.ensure_future(client.subscribe(f"up/{user_id}/+", qos=1))
        done, _ = await asyncio.wait({subscribing}, timeout=SUBACK_WAIT_S)
        if done:
            subscribing.result()  # a refusal or a lost connection is the login's error
            return
        self.slow_subacks += 1
        subscribing.add_done_callback(lambda f: _late_suback(f, part, user_id))

    def _ack_when_recorded(self, topic: str, ack: Callable[[], None]) -> None:
        """Acknowledge a handled publish now, or once its device's window is recorded (without
        waiting here: the session reads on, the device's lane goes on)."""
        recording = self._recorded(topic) if self._recorded is not None else None
        if recording is None:
            ack()
        else:
            recording.add_done_callback(lambda _recorded: ack())

    async def serve_subscribe(self, request: dict[str, object]) -> dict[str, object]:
        """Another bridge asks this one, the holder, to take a user's device topics."""
        if self._partitions is None:
            return {"error": "this bridge does not partition its ingest"}
        user = str(request.get("user", ""))
        part = self._partitions.partition_of_user(user)
        if not user or part not in self._partitions.held_partitions():
            return {"error": f"partition {part} is not held here"}
        try:
            await self.subscribe_user(part, user)
        except (IngestError, aiomqtt.MqttError) as exc:
            return {"error": str(exc)}
        return {"ok": True}

    def _new_client(self, client_id: str, persistent: bool) -> aiomqtt.Client:
        client = aiomqtt.Client(
            self._host, self._port, identifier=client_id, username=self._username,
            password=self._password, clean_session=not persistent, keepalive=30,
            protocol=aiomqtt.ProtocolVersion.V311, max_inflight_messages=MAX_INFLIGHT, tls_context=self._tls,
        )
        coalesce_writes(client._client)
        no_delay(client._client)
        write_soon(client)
        buffered_reads(client._client)
        cycle_free_lookups(client._client)
        _stamp_receipts(client)
        if persistent:
            # aiomqtt 2.5 has no option for it: PUBACK only once handled (see _acker)
            client._client.manual_ack_set(True)
        else:  # the outgoing connection: a bound on what publish_all leaves in its queue
            client._client.max_queued_messages_set(MAX_QUEUED)
        # hundreds of replies and events in flight at once are the normal load, not a warning sign
        client.pending_calls_threshold = 20 * MAX_INFLIGHT
        return client

    async def _take_queued(self, client: aiomqtt.Client, persistent: bool = True) -> None:
        """Take what is already waiting in the client's queue: ``client.messages`` starts a
        task per message to wait for the next one, which the queue's head does not need."""
        queue = client._queue
        taken = 0
        while not queue.empty():
            message = queue.get_nowait()
            if message is _DISCONNECTED:  # the connection ended: _incoming says so next
                queue.put_nowait(message)
                return
            await self._take(client, message, persistent)
            taken += 1
            if taken % TAKE_PER_TURN == 0:
                await asyncio.sleep(0)  # the rest in a later turn of the loop (TAKE_PER_TURN)

    async def _take(self, client: aiomqtt.Client, message: aiomqtt.Message, persistent: bool = True) -> None:
        """Queue one ``up/`` publish in its device's lane, with what acknowledges it."""
        payload = message.payload
        data = payload if isinstance(payload, bytes) else str(payload).encode()
        topic = message.topic.value
        ack = self._acker(client, message) if persistent else None
        received_at = message.received_at if isinstance(message, _Received) else time.monotonic()
        probe = self._probes.get(client.identifier)
        if topic.startswith(PROBE_PREFIX):
            if probe is not None:
                probe.came_back(data, received_at)
            if ack is not None:
                ack()
            return
        if probe is not None:  # it waited before it was read, too
            received_at -= probe.lag(received_at)
        if self._admit is not None:
            lane = self._lanes.get(topic)
            try:
                refused = self._admit(topic, data, received_at, 0 if lane is None else len(lane))
            except Exception:  # noqa: BLE001 - one publish admission control cannot take is dropped, not
                # the session: taken again after a reconnect, it would stop it again and again
                log.exception("admission control failed on a publish on %s: dropped unanswered", topic)
                if ack is not None:
                    ack()
                return
            if refused is not None:  # answered at once, never queued
                await refused
                if ack is not None:
                    self._ack_when_recorded(topic, ack)
                return
        while self._taken_in >= self._max_taken_in:
            self._room.clear()
            await self._room.wait()
        self._taken_in += 1
        item = (topic, data, ack, received_at, client)
        lane = self._lanes.get(topic)
        if lane is not None:
            lane.append(item)
            return
        lane = deque((item,))
        handling = self._lane(topic, lane)
        try:
            if self._tasks is None:
                raise RuntimeError("not running")
            self._tasks.create_task(handling, name=f"ingest {topic}")
        except RuntimeError:  # run() is ending: not taken in (nor acknowledged: the broker keeps it)
            handling.close()
            self._taken_in -= 1
            if self._release is not None:
                self._release()
            return
        self._lanes[topic] = lane

    async def _start_probe(self, client: aiomqtt.Client) -> None:
        probe = _Probe(client.identifier)
        await client.subscribe(probe.topic, qos=1)
        self._probes[client.identifier] = probe

    async def _probe(self) -> None:
        """Send each receiving session a probe every PROBE_EVERY_S."""
        while True:
            await asyncio.sleep(PROBE_EVERY_S)
            client = self._client
            if client is None:
                continue
            live = {c.identifier for c in self._sessions.values()}
            if self._partitions is None:
                live.add(client.identifier)
            for name in list(self._probes):
                if name not in live:
                    del self._probes[name]
            now = time.monotonic()
            paho = client._client
            for probe in self._probes.values():
                if probe.due() and paho.publish(probe.topic, probe.payload(now), 1).rc == MQTT_ERR_SUCCESS:
                    probe.sent(now)

    def backlog(self) -> int:
        """Replies and events handed to the outgoing connection and not yet acknowledged by the
        broker (paho's queue): admission control bounds them with the requests."""
        client = self._client
        if client is None:
            return 0
        paho = client._client
        # QoS 1 ones wait for their PUBACK; any (QoS 0 too) may still wait to be written
        return len(paho._out_messages) + len(paho._out_packet)

    def lag(self) -> float:
        """The longest wait before reading among the receiving sessions (their probes)."""
        now = time.monotonic()
        return max((p.lag(now) for p in self._probes.values()), default=0.0)

    def intake(self) -> int:
        """Publishes received and not yet taken in (aiomqtt's queues), and taken in and waiting
        behind their device's publish being handled (each lane's first is being handled)."""
        clients = [self._client, *self._sessions.values()]
        return sum(c._queue.qsize() for c in clients if c is not None) + self._taken_in - len(self._lanes)

    async def _consume(self) -> None:
        """The connection replies and events go out on; without partitions, also the one that
        receives every ``up/`` publish."""
        backoff = 0.2
        partitioned = self._partitions is not None
        while True:
            client = self._new_client(self._client_id, persistent=self._persistent and not partitioned)
            try:
                async with client:
                    if not partitioned:
                        await client.subscribe(UP_FILTER, qos=1)  # the probe topic included
                        self._probes[client.identifier] = _Probe(client.identifier)
                        log.info("bridge subscribed to %s on %s:%d", UP_FILTER, self._host, self._port)
                    self._client = client
                    for probe in self._probes.values():
                        probe.lost()  # those still on their way went with the last connection
                    self._connected.set()
                    backoff = 0.2
                    async for message in _incoming(client):
                        await self._take(client, message, self._persistent)
                        await self._take_queued(client, self._persistent)
            except aiomqtt.MqttError as exc:
                log.warning("bridge connection to %s:%d lost: %s", self._host, self._port, exc)
            except Exception:  # noqa: BLE001 - connected again, as a partition's session is; never the end of the intake
                log.exception("bridge connection to %s:%d failed", self._host, self._port)
            finally:
                self._client = None
                self._connected.clear()
            await asyncio.sleep(backoff * (1 + random.random()))
            backoff = min(self._max_backoff, backoff * 2)

    def _acker(self, client: aiomqtt.Client, message: aiomqtt.Message) -> Callable[[], None] | None:
        """What sends the PUBACK of ``message``, if it needs one, on the connection it came in on."""
        if message.qos != 1:
            return None
        mid = message.mid

        def ack() -> None:
            # After a reconnect the broker sends the publish again (it was never acknowledged);
            # a packet id of the old connection means nothing on the new one.
            if self._client is client or client in self._sessions.values():
                client._client.ack(mid, 1)

        return ack

    async def _lane(self, topic: str, lane: deque[Item]) -> None:
        """Handle one device's publishes in order until its lane is empty, then end."""
        try:
            while lane:
                _, payload, ack, taken_at, came_on = lane[0]
                try:
                    if self._given_up and came_on in self._given_up:  # (empty but after a rebalance)
                        # its partition went to another bridge: handled there, in the device's
                        # order, and not here as well (nor acknowledged, below)
                        ack = None
                    elif (expired := self._start and self._start(topic, payload, taken_at)) is not None:
                        await expired  # waited past admission control's bound: answered instead
                    else:
                        await self._handle(topic, payload)
                except asyncio.CancelledError:
                    if _being_cancelled():
                        raise
                    # something the handler awaited was cancelled, not this lane: as below
                    log.exception("handling a publish on %s was cancelled", topic)
                except Exception:
                    # a handler that raised is a bug, not a state the same publish would leave
                    log.exception("failed to handle a publish on %s", topic)
                finally:
                    if self._release is not None:
                        self._release()
                lane.popleft()
                self._taken_in -= 1
                if not self._room.is_set() and self._taken_in < self._max_taken_in:
                    self._room.set()
                if ack is not None:  # stored and answered (or answered with an error): the broker may forget it
                    self._ack_when_recorded(topic, ack)
        finally:
            if self._lanes.get(topic) is lane:
                del self._lanes[topic]
            if lane:  # cancelled (run() ending) while handling the first, which was given back
                self._taken_in -= len(lane)
                for _ in range(len(lane) - 1):
                    if self._release is not None:
                        self._release()
                lane.clear()  # not acknowledged: the broker hands them out again
                self._room.set()
