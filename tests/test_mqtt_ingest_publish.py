"""The bridge's outgoing publishes (``MqttIngest.publish_all``) on a real broker (the embedded
one): handed over in order without waiting for each acknowledgement, held while there is no
connection, never reordered."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.client import MQTT_ERR_NO_CONN

from bridge.mqtt_ingest import PROBE_EVERY_S, TAKE_PER_TURN, MqttIngest, _Probe
from tests.conftest import embedded_broker, tok_tokens

USER, DEVICE, BRIDGE, SECRET = "u1", "d1", "pigeon-bridge", "bridge-secret"


async def test_publish_all_keeps_order_and_waits_for_a_connection() -> None:
    broker, port = await embedded_broker(tok_tokens(USER), (BRIDGE, SECRET))

    async def ignore(topic: str, payload: bytes) -> None:
        return None

    ingest = MqttIngest("127.0.0.1", port, username=BRIDGE, password=SECRET, client_id=f"{BRIDGE}-t",
                        handle=ignore)
    topic = f"down/{USER}/{DEVICE}"
    items = [(topic, str(i).encode(), 1) for i in range(600)]
    runner: asyncio.Task[None] | None = None
    try:
        async with aiomqtt.Client("127.0.0.1", port, identifier=DEVICE, username=DEVICE,
                                  password=f"tok-{DEVICE}") as device:
            await device.subscribe(topic, qos=1)
            early = asyncio.create_task(ingest.publish_all(items[:100]))  # no connection yet: held
            await asyncio.sleep(0.3)
            assert not early.done()
            runner = asyncio.create_task(ingest.run())
            await asyncio.wait_for(early, 5)
            await ingest.publish_all(items[100:])  # returns once handed over, not once acknowledged
            got: list[int] = []
            async with asyncio.timeout(20):
                async for message in device.messages:
                    assert isinstance(message.payload, bytes)
                    got.append(int(message.payload))
                    if len(got) == len(items):
                        break
            assert got == list(range(len(items)))
    finally:
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        await broker.shutdown()


def test_a_probe_measures_the_wait_before_reading_and_trusts_nothing_until_one_came_back() -> None:
    probe = _Probe("pigeon-bridge-ks-p3")
    assert probe.topic == "up/~probe/pigeon-bridge-ks-p3"
    probe.sent(100.0)
    assert probe.lag(160.0) == 0.0  # none came back yet: a broker that drops probes means 0
    probe.came_back(probe.payload(100.0), 100.5)
    assert probe.seen and probe.last == pytest.approx(0.5) and not probe.on_way
    assert probe.lag(200.0) == 0.0  # none on its way: nothing known to wait
    for k in range(4):
        probe.sent(200.0 + k / 4)
    assert probe.lag(202.0) == pytest.approx(2.0)  # the oldest on its way for 2 s: at least that
    probe.came_back(b"1:199.0", 203.0)  # another process's: ignored
    assert probe.lag(203.0) == pytest.approx(3.0)
    probe.came_back(probe.payload(200.0), 203.0)
    assert probe.lag(203.0) == pytest.approx(2.75)  # the next one's age, not the 3 s just measured
    probe.came_back(probe.payload(200.5), 203.1)  # 200.25 was lost on its way: the broker keeps order
    assert list(probe.on_way) == [200.75] and probe.lag(203.2) == pytest.approx(2.45)
    probe.came_back(probe.payload(200.75), 203.2)
    assert probe.lag(300.0) == 0.0 and probe.last == pytest.approx(2.45)
    probe.sent(301.0)
    probe.lost()  # with its connection
    assert probe.lag(309.0) == 0.0


def test_the_wait_a_probe_counts_follows_a_draining_backlog_down() -> None:
    """A session whose broker queue holds 4 s of publishes, read at once after the flood: each
    publish read is counted at least as old as it is (never more than a probe period less),
    and those that waited under 2 s are counted under 2 s as soon as they are read (the last
    probe's round trip, the old count, kept them at 3.5 s and more for a second round trip)."""
    probe = _Probe("p")
    probe.sent(0.0)
    probe.came_back(probe.payload(0.0), 0.001)
    # what the broker holds, in order: publishes and probes, each with when it reached it
    queue: list[tuple[str, float]] = []
    t = 1.0
    while t < 5.0:  # publishes every 10 ms, a probe every 250 ms
        queue.append(("publish", t))
        if round(t * 100) % 25 == 0:
            probe.sent(t)
            queue.append(("probe", t))
        t = round(t + 0.01, 2)
    probe.sent(5.0)  # as the bridge starts reading, at 2,000 a second: what comes next queues behind
    queue.append(("probe", 5.0))
    counted: list[tuple[float, float]] = []  # (true wait, counted wait)
    now = 5.0
    for kind, at in queue:
        now += 0.0005
        if kind == "probe":
            probe.came_back(probe.payload(at), now)
        else:
            counted.append((now - at, probe.lag(now)))
    assert all(true - PROBE_EVERY_S - 1e-9 <= seen <= true + 1e-9 for true, seen in counted)
    assert all(seen < 2.0 for true, seen in counted if true < 2.0 - PROBE_EVERY_S)


async def test_probes_come_back_through_the_broker_and_are_never_handled_as_requests() -> None:
    broker, port = await embedded_broker(tok_tokens(USER), (BRIDGE, SECRET))
    handled: list[str] = []
    got = asyncio.Event()

    async def handle(topic: str, payload: bytes) -> None:
        handled.append(topic)
        got.set()

    ingest = MqttIngest("127.0.0.1", port, username=BRIDGE, password=SECRET, client_id=f"{BRIDGE}-p",
                        handle=handle, persistent=True)
    runner = asyncio.create_task(ingest.run())
    try:
        await ingest.wait_connected(10)
        for _ in range(200):  # 10 s
            if any(p.seen for p in ingest._probes.values()):
                break
            await asyncio.sleep(0.05)
        probe = next(iter(ingest._probes.values()))
        assert probe.seen, "no probe came back within 10 s"
        assert 0.0 <= probe.lag(time.monotonic()) < 5.0
        async with aiomqtt.Client("127.0.0.1", port, identifier=DEVICE, username=DEVICE,
                                  password=f"tok-{DEVICE}") as device:
            await device.publish(f"up/{USER}/{DEVICE}", b"{}", qos=1)
            await asyncio.wait_for(got.wait(), 10)
            await asyncio.sleep(0.6)  # time for more probes to go round
        assert handled == [f"up/{USER}/{DEVICE}"]  # the device's; no probe among them
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await broker.shutdown()


async def test_a_session_takes_in_at_most_a_share_of_what_it_read_per_turn_of_the_loop() -> None:
    """What a session's socket held is taken in TAKE_PER_TURN at a time, with the loop's other
    work (a login's next step) let in between."""

    async def ignore(topic: str, payload: bytes) -> None:
        return None

    ingest = MqttIngest("127.0.0.1", 9, username=BRIDGE, password=SECRET, client_id=f"{BRIDGE}-t", handle=ignore)
    order: list[str] = []

    async def take(client: object, message: object, persistent: bool = True) -> None:
        order.append("take")

    ingest._take = take  # type: ignore[method-assign]

    class Session:
        _queue: asyncio.Queue[object] = asyncio.Queue()

    session = Session()
    for _ in range(5 * TAKE_PER_TURN):
        session._queue.put_nowait(object())
    taking = asyncio.create_task(ingest._take_queued(session, persistent=False))  # type: ignore[arg-type]
    while not taking.done():
        order.append("other")
        await asyncio.sleep(0)
    runs = "".join("t" if x == "take" else "o" for x in order).split("o")
    assert max(len(r) for r in runs) == TAKE_PER_TURN and order.count("take") == 5 * TAKE_PER_TURN


def _sharing_a_hash(first: str, buckets: int = 256) -> str:
    """A device id whose topic hashes like ``first``'s into ``buckets``: under the old ingest,
    whose 256 workers each served the devices hashed to it, the two devices shared one."""
    want = zlib.crc32(f"up/{USER}/{first}".encode()) % buckets
    return next(d for d in (f"d{i}" for i in itertools.count(2))
                if zlib.crc32(f"up/{USER}/{d}".encode()) % buckets == want)


@contextlib.asynccontextmanager
async def running_ingest(handle: Callable[[str, bytes], Awaitable[None]], devices: list[str],
                         **options: Any) -> AsyncIterator[tuple[MqttIngest, list[aiomqtt.Client]]]:
    """A persistent ingest on the embedded broker, and a connected client for each device."""
    broker, port = await embedded_broker(tok_tokens(USER), (BRIDGE, SECRET))
    ingest = MqttIngest("127.0.0.1", port, username=BRIDGE, password=SECRET, client_id=f"{BRIDGE}-l",
                        handle=handle, persistent=True, **options)
    runner = asyncio.create_task(ingest.run())
    try:
        await ingest.wait_connected(10)
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(aiomqtt.Client(
                "127.0.0.1", port, identifier=d, username=d, password=f"tok-{d}")) for d in devices]
            yield ingest, clients
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await broker.shutdown()


async def _until(done: Callable[[], bool]) -> None:
    for _ in range(200):  # 10 s
        if done():
            return
        await asyncio.sleep(0.05)


async def test_a_device_whose_request_hangs_holds_up_only_its_own_later_requests() -> None:
    """One device's request waits on the store (a partition whose holder died): its next request
    waits behind it, in order, and another device's are handled meanwhile, also one whose topic
    hashes like the first's. Admission control is told how many of each device's are held."""
    other = _sharing_a_hash(DEVICE)
    hanging, release = asyncio.Event(), asyncio.Event()
    handled: list[tuple[str, bytes]] = []

    async def handle(topic: str, payload: bytes) -> None:
        if payload == b'{"n":1}' and topic.endswith(f"/{DEVICE}"):
            hanging.set()
            await release.wait()
        handled.append((topic.rsplit("/", 1)[1], payload))

    admitted: list[tuple[str, int]] = []

    def admit(topic: str, payload: bytes, received_at: float, queued: int) -> None:
        admitted.append((topic.rsplit("/", 1)[1], queued))

    async with running_ingest(handle, [DEVICE, other], admit=admit) as (ingest, (first, second)):
        await first.publish(f"up/{USER}/{DEVICE}", b'{"n":1}', qos=1)
        await asyncio.wait_for(hanging.wait(), 10)
        await first.publish(f"up/{USER}/{DEVICE}", b'{"n":2}', qos=1)
        await second.publish(f"up/{USER}/{other}", b'{"n":1}', qos=1)
        await _until(lambda: bool(handled))
        assert handled == [(other, b'{"n":1}')]  # the first device's second waits behind its first
        assert ingest.intake() == 1  # waiting: the first device's second (its first is being handled)
        assert admitted == [(DEVICE, 0), (DEVICE, 1), (other, 0)]
        release.set()
        await _until(lambda: len(handled) == 3)
        assert handled[1:] == [(DEVICE, b'{"n":1}'), (DEVICE, b'{"n":2}')]
        assert ingest.intake() == 0 and not ingest._lanes and ingest._taken_in == 0


async def test_a_handler_whose_await_was_cancelled_leaves_its_devices_next_requests_handled() -> None:
    """A cancellation from inside the handling (something it awaited was cancelled), not of the
    lane itself, is logged like any failure: the device's next publish is still handled."""
    handled: list[bytes] = []

    async def handle(topic: str, payload: bytes) -> None:
        if payload == b'{"n":1}':
            raise asyncio.CancelledError()
        handled.append(payload)

    async with running_ingest(handle, [DEVICE]) as (ingest, (device,)):
        await device.publish(f"up/{USER}/{DEVICE}", b'{"n":1}', qos=1)
        await device.publish(f"up/{USER}/{DEVICE}", b'{"n":2}', qos=1)
        await _until(lambda: bool(handled))
        assert handled == [b'{"n":2}']
        await _until(lambda: not ingest._lanes)
        assert ingest._taken_in == 0


async def test_a_publish_admission_control_fails_on_is_dropped_and_the_intake_goes_on() -> None:
    """Admission control failing on a publish (a payload it could not read: a RecursionError once)
    drops that publish (logged, acknowledged: taken again it would fail again), not the session:
    the device's later ones are handled."""
    handled: list[bytes] = []
    failed: list[bytes] = []

    async def handle(topic: str, payload: bytes) -> None:
        handled.append(payload)

    def admit(topic: str, payload: bytes, received_at: float, queued: int) -> None:
        if payload == b'{"n":1}' and not failed:
            failed.append(payload)
            raise RecursionError("maximum recursion depth exceeded")

    async with running_ingest(handle, [DEVICE], admit=admit) as (ingest, (device,)):
        await device.publish(f"up/{USER}/{DEVICE}", b'{"n":1}', qos=1)
        await device.publish(f"up/{USER}/{DEVICE}", b'{"n":2}', qos=1)
        await _until(lambda: bool(handled))
        assert failed and handled == [b'{"n":2}']
        assert ingest.intake() == 0 and ingest._taken_in == 0


class OnePartition:
    """The store's partitions as the ingest sees them: partition 0, with USER in it, held until
    ``give_up``."""

    partition_scope = "t"

    def __init__(self) -> None:
        self.held = [0]
        self.changed = asyncio.Event()

    def held_partitions(self) -> list[int]:
        return self.held

    def leased_here(self, part: int) -> bool:
        return part in self.held

    def queue_of(self, part: int) -> str:
        return f"t:p{part}"

    async def partitions_changed(self) -> None:
        await self.changed.wait()
        self.changed.clear()

    def partition_of_user(self, user_id: str) -> int:
        return 0

    async def partition_users(self, part: int) -> list[str]:
        return [USER]

    def give_up(self) -> None:
        self.held = []
        self.changed.set()


class HeldHandler:
    """A publish handler that, for each publish, says it is handling one (``handling``) and
    holds it until ``release`` is set; what it finished is in ``handled``."""

    def __init__(self) -> None:
        self.handling, self.release = asyncio.Event(), asyncio.Event()
        self.handled: list[bytes] = []

    async def __call__(self, topic: str, payload: bytes) -> None:
        self.handling.set()
        await self.release.wait()
        self.handled.append(payload)


class FakeConnection:
    """A broker connection as the ingest reads it (aiomqtt's client: its queue of publishes),
    recording the acknowledgements it sends. (The embedded broker hands ``up/`` publishes only
    to a subscription of ``up/+/+``, so a partition's session is not tried on it.)"""

    def __init__(self, identifier: str) -> None:
        self.identifier = identifier
        self.acked: list[int] = []
        self._client = self
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._disconnected: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append(mid)

    def publish(self, topic: str, payload: bytes, qos: int) -> Any:
        """(The ingest's probes, every PROBE_EVERY_S: not sent, as on a connection that is down.)"""
        return SimpleNamespace(rc=MQTT_ERR_NO_CONN)

    async def __aenter__(self) -> FakeConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def subscribe(self, *args: Any, **kwargs: Any) -> None:
        return None


async def test_what_waits_in_a_lane_of_a_partition_given_up_is_left_to_its_next_holder() -> None:
    """A partition goes to another bridge while one of its devices' publishes is being handled
    and the next waits behind it: the broker hands the unacknowledged one to the next holder, so
    it is neither handled nor acknowledged here as well (two bridges at once, out of the
    device's order)."""
    partitions = OnePartition()
    handle = HeldHandler()
    handling, release, handled = handle.handling, handle.release, handle.handled
    released: list[int] = []

    ingest = MqttIngest("127.0.0.1", 1, username=BRIDGE, password=SECRET, client_id=f"{BRIDGE}-g",
                        handle=handle, persistent=True, partitions=partitions,
                        release=lambda: released.append(1))
    connections: dict[str, FakeConnection] = {}

    def new_client(identifier: str, persistent: bool) -> FakeConnection:
        connections[identifier] = FakeConnection(identifier)
        return connections[identifier]

    ingest._new_client = new_client  # type: ignore[assignment,method-assign]
    runner = asyncio.create_task(ingest.run())
    try:
        await _until(lambda: 0 in ingest._sessions)
        session = connections[ingest._session_id(0)]
        for mid in (1, 2):
            session._queue.put_nowait(aiomqtt.Message(f"up/{USER}/{DEVICE}", b'{"n":%d}' % mid, 1, False, mid, None))
        await asyncio.wait_for(handling.wait(), 10)
        await _until(lambda: ingest._taken_in == 2)
        partitions.give_up()
        await _until(lambda: 0 not in ingest._sessions)
        release.set()  # the first was already being handled: it ends
        await _until(lambda: not ingest._lanes)
        assert handled == [b'{"n":1}'] and ingest._taken_in == 0 and len(released) == 2
        assert session.acked == []  # (the connection is not the partition's any more)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_what_waits_from_a_lost_connection_of_a_partition_given_up_is_left_to_its_next_holder() -> None:
    """A partition's broker connection is lost while one of its devices' publishes is being
    handled and the next waits behind it; the partition then goes to another bridge before the
    session is back. The one waiting is the next holder's (the broker hands it over), not
    handled here as well."""
    partitions = OnePartition()
    handle = HeldHandler()
    handling, release, handled = handle.handling, handle.release, handle.handled

    ingest = MqttIngest("127.0.0.1", 1, username=BRIDGE, password=SECRET, client_id=f"{BRIDGE}-l",
                        handle=handle, persistent=True, partitions=partitions)
    connections: list[FakeConnection] = []

    def new_client(identifier: str, persistent: bool) -> FakeConnection:
        connections.append(FakeConnection(identifier))
        return connections[-1]

    def sessions() -> list[FakeConnection]:
        return [c for c in connections if c.identifier == ingest._session_id(0)]

    ingest._new_client = new_client  # type: ignore[assignment,method-assign]
    runner = asyncio.create_task(ingest.run())
    try:
        await _until(lambda: 0 in ingest._sessions)
        [session] = sessions()
        for mid in (1, 2):
            session._queue.put_nowait(aiomqtt.Message(f"up/{USER}/{DEVICE}", b'{"n":%d}' % mid, 1, False, mid, None))
        await asyncio.wait_for(handling.wait(), 10)
        await _until(lambda: ingest._taken_in == 2)
        session._disconnected.set_exception(aiomqtt.MqttError("the connection was lost"))
        await _until(lambda: 0 not in ingest._sessions)
        partitions.give_up()  # (the session waits to connect again meanwhile)
        await asyncio.sleep(0.05)
        release.set()
        await _until(lambda: not ingest._lanes)
        assert handled == [b'{"n":1}'] and ingest._taken_in == 0
        assert session.acked == [] and sessions() == [session]  # (not connected again)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_partition_session_takes_in_nothing_before_its_windows_are_adopted() -> None:
    """Each time a partition's session connects, ``on_session`` is awaited before any of its
    publishes is taken in (the bridge adopts the refusal windows of the partition's devices
    first): publishes the broker hands at once wait for it."""
    adopting, adopted = asyncio.Event(), asyncio.Event()
    sessions_started: list[int] = []

    async def on_session(part: int) -> None:
        sessions_started.append(part)
        adopting.set()
        await adopted.wait()

    handled: list[bytes] = []

    async def handle(topic: str, payload: bytes) -> None:
        handled.append(payload)

    ingest = MqttIngest("127.0.0.1", 1, username=BRIDGE, password=SECRET, client_id=f"{BRIDGE}-w",
                        handle=handle, persistent=True, partitions=OnePartition(), on_session=on_session)
    connections: list[FakeConnection] = []

    def new_client(identifier: str, persistent: bool) -> FakeConnection:
        connections.append(FakeConnection(identifier))
        if identifier == ingest._session_id(0):  # the broker hands what it kept at once
            connections[-1]._queue.put_nowait(aiomqtt.Message(f"up/{USER}/{DEVICE}", b'{"n":1}', 1, False, 1, None))
        return connections[-1]

    ingest._new_client = new_client  # type: ignore[assignment,method-assign]
    runner = asyncio.create_task(ingest.run())
    try:
        await asyncio.wait_for(adopting.wait(), 10)
        await asyncio.sleep(0.05)
        assert handled == [] and ingest._taken_in == 0 and 0 not in ingest._sessions
        adopted.set()
        await _until(lambda: handled == [b'{"n":1}'])
        assert sessions_started == [0]
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_publish_that_moved_its_devices_window_is_acknowledged_once_the_window_is_recorded() -> None:
    """A refusal (at admission) or a failed send (in the device's lane) opened or moved the
    device's refusal window: that publish, and the device's later ones, are acknowledged to the
    broker only once the window is recorded for the partition's next holder. Had the bridge died
    before, the broker would hand them to that holder in the device's order. Meanwhile the
    session reads on and another device's publishes are acknowledged as they are handled."""
    a, b = f"up/{USER}/{DEVICE}", f"up/{USER}/d2"
    recording: dict[str, asyncio.Future[None]] = {}

    def recorded(topic: str) -> asyncio.Future[None] | None:
        fut = recording.get(topic)
        return None if fut is None or fut.done() else fut

    def admit(topic: str, payload: bytes, received_at: float, queued: int) -> Awaitable[None] | None:
        if payload != b'{"refused":1}':
            return None
        recording[topic] = asyncio.get_running_loop().create_future()  # (the window opened)
        return asyncio.sleep(0)  # (publishing the refusal)

    handled: list[tuple[str, bytes]] = []

    async def handle(topic: str, payload: bytes) -> None:
        handled.append((topic, payload))
        if payload == b'{"failed":1}':
            recording[topic] = asyncio.get_running_loop().create_future()

    ingest = MqttIngest("127.0.0.1", 1, username=BRIDGE, password=SECRET, client_id=f"{BRIDGE}-r",
                        handle=handle, persistent=True, partitions=OnePartition(), admit=admit,
                        release=lambda: None, recorded=recorded)
    connections: list[FakeConnection] = []

    def new_client(identifier: str, persistent: bool) -> FakeConnection:
        connections.append(FakeConnection(identifier))
        if identifier == ingest._session_id(0):
            for mid, (topic, payload) in enumerate([(a, b'{"refused":1}'), (b, b'{"n":1}'), (b, b'{"failed":1}'),
                                                    (a, b'{"n":2}'), (b, b'{"n":3}')], start=1):
                connections[-1]._queue.put_nowait(aiomqtt.Message(topic, payload, 1, False, mid, None))
        return connections[-1]

    ingest._new_client = new_client  # type: ignore[assignment,method-assign]
    runner = asyncio.create_task(ingest.run())
    try:
        await _until(lambda: len(handled) == 4)
        session = connections[-1]
        await asyncio.sleep(0.05)
        assert session.acked == [2]  # b's first only: a's refusal, and b's failure and the one behind it, wait
        recording[a].set_result(None)
        await _until(lambda: len(session.acked) == 3)
        assert sorted(session.acked) == [1, 2, 4]
        recording[b].set_result(None)
        await _until(lambda: len(session.acked) == 5)
        assert sorted(session.acked) == [1, 2, 3, 4, 5]
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_a_publish_read_while_the_ingest_stops_is_not_taken_in() -> None:
    """Between run()'s end and a session's, a publish read is neither handled nor counted: it was
    never acknowledged, so the broker hands it out again."""
    released: list[int] = []

    async def handle(topic: str, payload: bytes) -> None:
        raise AssertionError("handled after the ingest stopped")

    ingest = MqttIngest("127.0.0.1", 9, username=BRIDGE, password=SECRET, client_id=f"{BRIDGE}-s", handle=handle,
                        admit=lambda topic, payload, at, queued: None, release=lambda: released.append(1))
    message = aiomqtt.Message(f"up/{USER}/{DEVICE}", b"{}", 1, False, 7, None)
    session = type("Session", (), {"identifier": f"{BRIDGE}-p0"})()
    await ingest._take(session, message, persistent=False)
    assert released == [1] and ingest._taken_in == 0 and not ingest._lanes and ingest.intake() == 0
