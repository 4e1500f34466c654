"""One ``send`` for every packet a paho client has queued, instead of one per packet.

paho writes its queue one packet per ``socket.send``. The bridge hands the broker dozens to
hundreds of publishes at once (a group message is a publish to each member's devices, and the
replies and events of one loop turn go together), and a profile of a 100-member group run had
about 7 % of the bridge's CPU in those sends. :func:`coalesce_writes` replaces the client's
packet writer with one that joins the queued packets into one buffer and sends it at once,
keeping everything paho does after a write: a partly written packet stays first in the queue
with its position; a QoS 0 PUBLISH, once wholly written, is marked published and reported to
``on_publish`` as paho's writer does (with one shared reason code and property set instead of
two new objects each: nobody reads them for a QoS 0 publish); a DISCONNECT, after which paho
closes the connection, is left to paho's own writer. Before, QoS 0 publishes went to paho's
writer too, one ``send`` each, and protocol v2 sends its live events at QoS 0.

This leans on paho 2.x's private queue (``_out_packet``, each packet a dict with ``packet``,
``pos``, ``to_process``, ``command`` and ``qos``), which the tests check on every run.

:func:`no_delay` turns Nagle's algorithm off on a paho client's socket, as asyncio does on
every TCP connection it opens and Mosquitto does with ``set_tcp_nodelay``. paho leaves it on.
With it on, a write waits while an earlier one is unacknowledged, and a peer that has nothing
to send back (the broker, taking QoS 0 publishes) acknowledges only on its delayed-ACK timer, up
to 40 ms on Linux: the bridge's outgoing connection sends protocol v2's events at QoS 0.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import deque
from typing import Any

import aiomqtt
from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)

MAX_JOINED = 1024  # packets joined into one send at most
_PUBLISH, _DISCONNECT = 0x30, 0xE0


def _paho_acts_after(packet: Any) -> bool:
    """Packets paho's own writer must finish (it closes the connection once they are written)."""
    return bool(packet["command"] & 0xF0 == _DISCONNECT)


def _is_qos0_publish(packet: Any) -> bool:
    return bool(packet["command"] & 0xF0 == _PUBLISH and packet["qos"] == 0)


def coalesce_writes(client: paho.Client) -> None:
    """Make ``client`` send its queued packets with one ``send`` for as many as the socket takes."""
    own_writer = client._packet_write
    reason, properties = ReasonCode(PacketTypes.PUBACK), Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]

    def published(packet: Any) -> None:
        """What paho's writer does once a QoS 0 publish is wholly written."""
        on_publish: Any = client.on_publish
        if on_publish is not None:
            with client._in_callback_mutex:
                try:
                    if client._callback_api_version == CallbackAPIVersion.VERSION1:
                        on_publish(client, client._userdata, packet["mid"])
                    else:
                        on_publish(client, client._userdata, packet["mid"], reason, properties)
                except Exception:  # logged; the packets after it still go out
                    log.exception("mqtt: on_publish failed")
        info = packet.get("info")
        if info is not None:
            info._set_as_published()

    def packet_write() -> MQTTErrorCode:
        while client._out_packet:
            queue = client._out_packet
            if _paho_acts_after(queue[0]):
                # paho's writer, on this one packet alone; the rest follows it
                head = queue.popleft()
                client._out_packet = deque([head])
                try:
                    rc = own_writer()
                finally:
                    left = client._out_packet
                    left.extend(queue)
                    client._out_packet = left
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or (left and left[0] is head) or client._sock is None:
                    return rc  # an error, the packet went out only in part, or the connection closed
                continue
            run: list[Any] = []
            for packet in queue:
                if _paho_acts_after(packet) or len(run) == MAX_JOINED:
                    break
                run.append(packet)
            data = b"".join(p["packet"][p["pos"]:] if p["pos"] else p["packet"] for p in run)
            try:
                sent = client._sock_send(data)
            except (AttributeError, ValueError):
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            except BlockingIOError:
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError as err:
                log.warning("mqtt: sending to the broker failed: %s", err)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            for packet in run:
                left_to_send = packet["to_process"]
                if sent < left_to_send:  # this one went out in part: the socket is full
                    packet["pos"] += sent
                    packet["to_process"] -= sent
                    break
                sent -= left_to_send
                packet["pos"] += left_to_send
                packet["to_process"] = 0
                queue.popleft()
                if _is_qos0_publish(packet):
                    published(packet)
            else:
                continue
            break
        with client._msgtime_mutex:
            client._last_msg_out = paho.time_func()
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    client._packet_write = packet_write  # type: ignore[method-assign]


def no_delay(client: paho.Client) -> None:
    """Have ``client`` send each write at once (``TCP_NODELAY``) on every socket it opens."""
    opened = client.on_socket_open  # aiomqtt's, which registers the socket with its loop

    def on_socket_open(c: paho.Client, userdata: Any, sock: Any) -> None:
        raw = getattr(sock, "_socket", sock)  # paho's WebSocket wrapper holds the TCP socket
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (AttributeError, OSError) as exc:  # not a TCP socket (a Unix socket): nothing to turn off
            log.debug("mqtt: TCP_NODELAY not set: %s", exc)
        if opened is not None:
            opened(c, userdata, sock)

    client.on_socket_open = on_socket_open


def write_soon(client: aiomqtt.Client) -> None:
    """Have ``client`` write what it queued two turns of its event loop later, watching the socket
    only while the socket is full.

    aiomqtt writes when the loop reports the socket writable: each time paho queues a packet on
    an empty queue, aiomqtt hands ``add_writer`` to the loop with ``call_soon_threadsafe`` (a write
    to the loop's wake-up descriptor), the loop polls once more to be told the socket is writable,
    which it nearly always is, and paho's writer then has the loop stop watching. That is two
    ``epoll_ctl`` calls, a wake-up write and an extra turn of the loop for every batch of replies
    and events; a bridge at a few hundred messages a second made about two of each per message
    (BENCHMARKS.md, 2026-12-02, mid-morning). Here the queue is written by a callback two turns of the
    loop later, when aiomqtt's writer wrote too, so what the next turn queues joins it (written
    one turn later, the bridge's full speed measured 8 % lower: more, smaller writes). The socket
    is watched only when a write left packets waiting (the kernel's buffer was full), until paho
    has written them. Must be called from the loop's thread, as the client is made there."""
    _SoonWriter(client)


class _SoonWriter:
    """:func:`write_soon`'s callbacks for one client."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client, self.paho, self.loop = client, client._client, client._loop
        self.thread = threading.get_ident()
        self.due = False
        self.watched: int | None = None  # the socket's descriptor while the loop watches it
        self.paho.on_socket_register_write = self.register
        self.paho.on_socket_unregister_write = self.unregister

    def write(self) -> None:
        self.due = False
        try:
            self.paho.loop_write()
        except Exception as exc:  # a broken connection, as aiomqtt's own writer treats it
            if not self.client._disconnected.done():
                self.client._disconnected.set_exception(exc)
            return
        sock = self.paho._sock
        if self.paho.want_write() and sock is not None and self.watched is None:
            self.watched = sock.fileno()  # the socket is full: written again once it drains
            self.loop.add_writer(self.watched, self.write)

    def register(self, c: paho.Client, userdata: Any, sock: Any) -> None:
        if self.due or self.watched is not None:
            return
        self.due = True
        if threading.get_ident() == self.thread:
            self.loop.call_soon(self.loop.call_soon, self.write)
        else:  # paho's connect, which aiomqtt runs on an executor thread
            self.loop.call_soon_threadsafe(self.write)

    def unregister(self, c: paho.Client, userdata: Any, sock: Any) -> None:
        if self.watched is not None:
            self.loop.remove_writer(self.watched)
            self.watched = None
