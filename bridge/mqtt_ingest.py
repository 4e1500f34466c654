"""The bridge as an MQTT client: consume ``up/+/+`` from a broker, publish replies and events.

Used with any broker the bridge does not run itself, and selectable on the embedded one
(``--ingest mqtt``). Publishes are spread over workers by device, so one device's requests are
handled one at a time and in order while different devices proceed in parallel. The connection
is re-established with capped, jittered backoff.

Several bridge processes share the load by partition (``partition=(I, N)``): every process
receives every ``up/`` publish and handles those of the devices with ``crc32(device) % N == I``,
so each device is always handled by the same process, in order, whatever the broker.

On an external broker the ingest is ``persistent``: the bridge keeps a persistent session
(``clean_session=False``) under a client id that is the same every time its partition starts,
and acknowledges each ``up/`` publish only once it has been handled (paho's manual ack). What
the broker accepted while the bridge was down, or was still handling when it died, is
delivered again when it comes back. Acknowledgements go out as handling finishes, so not
always in the order the publishes arrived: MQTT 3.1.1 asks a client to acknowledge in order
(4.6.0-2), which would make every device wait behind the slowest one; Mosquitto matches a
PUBACK to its publish by packet id and accepts them in any order.
"""

from __future__ import annotations

import asyncio
import logging
import random
import zlib
from collections.abc import Awaitable, Callable

import aiomqtt

from .errors import PigeonError

log = logging.getLogger(__name__)
Handle = Callable[[str, bytes], Awaitable[None]]
# topic, payload, and what acknowledges it once handled (None: nothing to acknowledge)
Item = tuple[str, bytes, Callable[[], None] | None]
UP_FILTER = "up/+/+"


# Requests waiting on the store in parallel. Each worker handles its devices one request at a
# time, and a request spends most of its life waiting for store round trips (tens of ms on
# Cassandra), so a few workers would cap the whole bridge at a few dozen requests a second with
# the CPU idle. Workers are asyncio tasks: hundreds cost little.
INGEST_WORKERS = 256
# QoS-1 publishes of the bridge awaiting their PUBACK (paho's default of 20 would queue the
# replies of a busy bridge behind each other's round trips).
MAX_INFLIGHT = 256


class IngestError(PigeonError):
    """The bridge could not reach the broker in time."""


class MqttIngest:
    def __init__(
        self, host: str, port: int, *, username: str, password: str, client_id: str, handle: Handle,
        workers: int = INGEST_WORKERS, queue_size: int = 1_000, max_backoff_s: float = 30.0,
        partition: tuple[int, int] = (0, 1), persistent: bool = False,
    ) -> None:
        self._host, self._port = host, port
        self._username, self._password, self._client_id = username, password, client_id
        self._handle = handle
        self._persistent = persistent
        self._queues: list[asyncio.Queue[Item]] = [
            asyncio.Queue(maxsize=queue_size) for _ in range(workers)
        ]
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._max_backoff = max_backoff_s
        self._part, self._parts = partition

    async def wait_connected(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError as exc:
            raise IngestError(f"no connection to the broker at {self._host}:{self._port} in {timeout}s") from exc

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        """Publish once connected; waits (briefly) through a reconnect rather than dropping."""
        for _attempt in range(3):
            client = self._client
            if client is not None:
                try:
                    await client.publish(topic, payload, qos=qos)
                    return
                except aiomqtt.MqttError as exc:
                    log.warning("publish on %s failed: %s", topic, exc)
            try:
                async with asyncio.timeout(5):
                    await self._connected.wait()
            except TimeoutError:
                break
        # Devices recover anything missed from the store (sync on gap), so this is not a loss.
        log.warning("dropping live publish on %s: broker unreachable", topic)

    async def run(self) -> None:
        """Consume until cancelled."""
        async with asyncio.TaskGroup() as tg:
            for i, q in enumerate(self._queues):
                tg.create_task(self._work(q), name=f"ingest-worker-{i}")
            tg.create_task(self._consume(), name="ingest-consumer")

    async def _consume(self) -> None:
        backoff = 0.2
        while True:
            client = aiomqtt.Client(
                self._host, self._port, identifier=self._client_id, username=self._username,
                password=self._password, clean_session=not self._persistent, keepalive=30,
                protocol=aiomqtt.ProtocolVersion.V311, max_inflight_messages=MAX_INFLIGHT,
            )
            if self._persistent:
                # aiomqtt 2.5 has no option for it: PUBACK only once handled (see _acker)
                client._client.manual_ack_set(True)
            # hundreds of replies and events in flight at once are the normal load, not a warning sign
            client.pending_calls_threshold = 20 * MAX_INFLIGHT
            try:
                async with client:
                    await client.subscribe(UP_FILTER, qos=1)
                    self._client = client
                    self._connected.set()
                    log.info("bridge subscribed to %s on %s:%d", UP_FILTER, self._host, self._port)
                    backoff = 0.2
                    async for message in client.messages:
                        payload = message.payload
                        data = payload if isinstance(payload, bytes) else str(payload).encode()
                        topic = message.topic.value
                        device = topic.rsplit("/", 1)[-1].encode()
                        ack = self._acker(client, message) if self._persistent else None
                        if zlib.crc32(device) % self._parts != self._part:
                            if ack is not None:
                                ack()
                            continue  # another bridge process owns this device
                        q = self._queues[zlib.crc32(topic.encode()) % len(self._queues)]
                        await q.put((topic, data, ack))
            except aiomqtt.MqttError as exc:
                log.warning("bridge connection to %s:%d lost: %s", self._host, self._port, exc)
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
            if self._client is client:
                client._client.ack(mid, 1)

        return ack

    async def _work(self, queue: asyncio.Queue[Item]) -> None:
        while True:
            topic, payload, ack = await queue.get()
            try:
                await self._handle(topic, payload)
            except Exception:
                # a handler that raised is a bug, not a state the same publish would leave
                log.exception("failed to handle a publish on %s", topic)
            if ack is not None:
                ack()  # stored and answered (or answered with an error): the broker may forget it
