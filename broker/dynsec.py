"""Devices on an external Mosquitto: one dynamic-security client per device.

The bridge holds Mosquitto's dynamic-security admin credential and manages clients over
``$CONTROL/dynamic-security/v1`` (replies on ``…/response``, matched by ``correlationData``).
Each device gets a client whose username and client id are its device id and whose password is
its token, and a role of its own with exactly the permissions of protocol section 2, written as
literal topics (Mosquitto 2.0's dynamic-security ACLs do not substitute ``%c``/``%u``):

* publish: ``up/{user}/{device}``
* subscribe: ``down/{user}``, ``down/{user}/{device}`` and ``down/{user}/v2`` (protocol v2)

Everything else stays refused by the default ACL access (publish and subscribe denied). The
bridge's own role adds publishing under ``down/`` and subscribing to ``up/+/+``.

Errors: :class:`DynSecError` when the broker refuses a command or does not answer in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import aiomqtt

log = logging.getLogger(__name__)
CONTROL = "$CONTROL/dynamic-security/v1"
BRIDGE_ROLE = "pigeon-bridge-io"
EXPIRY_NOTE = "pigeon token expires "


class DynSecError(Exception):
    """Mosquitto refused a dynamic-security command, or did not answer."""


def device_role(device_id: str) -> str:
    return f"pigeon-device-{device_id}"


def device_acls(user_id: str, device_id: str) -> list[dict[str, Any]]:
    return [
        {"acltype": "publishClientSend", "topic": f"up/{user_id}/{device_id}", "allow": True},
        {"acltype": "subscribeLiteral", "topic": f"down/{user_id}", "allow": True},
        {"acltype": "subscribeLiteral", "topic": f"down/{user_id}/{device_id}", "allow": True},
        {"acltype": "subscribeLiteral", "topic": f"down/{user_id}/v2", "allow": True},
    ]


class DynSecAdmin:
    """An async context manager holding one control connection to the broker."""

    def __init__(self, host: str, port: int, username: str, password: str, *, timeout_s: float = 10.0,
                 tls_context: ssl.SSLContext | None = None) -> None:
        self._where = (host, port, password, tls_context)
        self._username = username
        self._client = self._new_client()
        self._timeout = timeout_s
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def _new_client(self) -> aiomqtt.Client:
        host, port, password, tls_context = self._where
        return aiomqtt.Client(host, port, username=self._username, password=password,
                              identifier=f"{self._username}-admin-{uuid.uuid4().hex[:8]}", clean_session=True,
                              protocol=aiomqtt.ProtocolVersion.V311, tls_context=tls_context)

    async def __aenter__(self) -> DynSecAdmin:
        await self._open()
        return self

    async def _open(self) -> None:
        try:
            await self._client.__aenter__()
            await self._client.subscribe(f"{CONTROL}/response", qos=1)
        except aiomqtt.MqttError as exc:
            raise DynSecError(f"cannot open the dynamic-security control connection: {exc}") from exc
        self._reader = asyncio.create_task(self._read(self._client), name="dynsec-replies")

    async def _close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.__aexit__(None, None, None)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._close()

    async def _publish(self, topic: str, payload: str) -> None:
        """Publish at QoS 1 (under the lock); a connection the broker lost (it restarted, or
        closed it) is opened again once, and the publish made on the new one."""
        try:
            await self._client.publish(topic, payload, qos=1, timeout=self._timeout)
            return
        except aiomqtt.MqttError as exc:
            if self._reader is not None and not self._reader.done():
                raise  # the connection is there: the broker did not acknowledge in time
            log.warning("broker control connection lost (%s): connecting again", exc)
        await self._close()
        self._client = self._new_client()
        await self._open()
        await self._client.publish(topic, payload, qos=1, timeout=self._timeout)

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            try:
                body = json.loads(message.payload if isinstance(message.payload, (bytes, str)) else b"{}")
            except ValueError:
                continue
            for reply in body.get("responses", []):
                fut = self._waiting.pop(str(reply.get("correlationData")), None)
                if fut is not None and not fut.done():
                    fut.set_result(reply)

    async def run(self, commands: Sequence[dict[str, Any]], *, tolerate: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Send commands; return their replies. A reply with an error not in ``tolerate`` raises."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[dict[str, Any]]] = []
        sent: list[dict[str, Any]] = []
        for cmd in commands:
            cid = uuid.uuid4().hex
            self._waiting[cid] = loop.create_future()
            futures.append(self._waiting[cid])
            sent.append({**cmd, "correlationData": cid})
        try:
            async with self._lock:
                await self._publish(CONTROL, json.dumps({"commands": sent}))
            replies = await asyncio.wait_for(asyncio.gather(*futures), self._timeout)
        except (TimeoutError, aiomqtt.MqttError) as exc:
            raise DynSecError(f"the broker did not answer {[c['command'] for c in commands]}: {exc!r}") from exc
        finally:
            for s in sent:
                self._waiting.pop(s["correlationData"], None)
        for cmd, reply in zip(commands, replies, strict=True):
            error = reply.get("error")
            if error and not any(t in error for t in tolerate):
                raise DynSecError(f"{cmd['command']} refused: {error}")
        return list(replies)

    async def control(self, topic: str, payload: str) -> None:
        """Publish a command at QoS 1 on another plugin's control topic and wait for Mosquitto's
        acknowledgement, which it sends once the plugin has carried the command out."""
        try:
            async with self._lock:
                await self._publish(topic, payload)
        except aiomqtt.MqttError as exc:
            raise DynSecError(f"the broker did not take a command on {topic}: {exc!r}") from exc

    async def check_bridge_role(self) -> None:
        """The bridge's client must hold BRIDGE_ROLE (publish under down/, subscribe up/+/+).

        Granted when the broker is set up (see ``scripts/services.py``), not from here: Mosquitto
        disconnects a client whose roles change, which would cut this very connection."""
        reply = (await self.run([{"command": "getClient", "username": self._username}]))[0]
        roles = {r.get("rolename") for r in reply.get("data", {}).get("client", {}).get("roles", [])}
        if BRIDGE_ROLE not in roles:
            raise DynSecError(f"broker client {self._username} lacks the role {BRIDGE_ROLE}; "
                              "see docs/deploy.md for the broker setup")

    async def register_device(self, user_id: str, device_id: str, token: str, expires_at: int) -> None:
        """Let the device connect with its token, with exactly its own permissions, until
        ``expires_at`` (kept in the client's description for :meth:`remove_expired`)."""
        role = device_role(device_id)
        note = f"{EXPIRY_NOTE}{expires_at}"
        # One message, one round trip: the broker runs its commands in order, so the role exists
        # before the client that names it (two round trips made a login under a flood wait twice
        # behind everything else the broker had to do). A role made before protocol v2 gets its
        # v2 topic added; one that has it answers "already exists".
        acls = device_acls(user_id, device_id)
        replies = await self.run([
            {"command": "createRole", "rolename": role, "acls": acls},
            {"command": "addRoleACL", "rolename": role, **acls[-1]},
            {"command": "createClient", "username": device_id, "password": token, "clientid": device_id,
             "textdescription": note, "roles": [{"rolename": role}]},
        ], tolerate=["already exists"])
        if replies[2].get("error"):  # a renewed token replaces the old one
            await self.run([{"command": "setClientPassword", "username": device_id, "password": token},
                            {"command": "modifyClient", "username": device_id, "textdescription": note}])
        log.debug("device %s registered with the broker", device_id)

    async def remove_expired(self, now_ms: int, page: int = 500) -> int:
        """Remove every device client whose token has expired; return how many."""
        expired: list[str] = []
        offset = 0
        while True:
            reply = (await self.run([{"command": "listClients", "verbose": True, "count": page,
                                      "offset": offset}]))[0]
            clients = reply.get("data", {}).get("clients", [])
            for c in clients:
                note = str(c.get("textdescription") or "")
                if note.startswith(EXPIRY_NOTE) and int(note[len(EXPIRY_NOTE):] or 0) <= now_ms:
                    expired.append(str(c["username"]))
            if len(clients) < page:
                break
            offset += page
        for device_id in expired:
            await self.remove_device(device_id)
        if expired:
            log.info("removed %d devices whose tokens expired from the broker", len(expired))
        return len(expired)

    async def kick_device(self, device_id: str) -> None:
        """Disconnect the device now: Mosquitto closes the connections of a client it disables;
        enabled again at once, it may connect again (with its token, as before)."""
        await self.run([{"command": "disableClient", "username": device_id}], tolerate=["not found"])
        await self.run([{"command": "enableClient", "username": device_id}], tolerate=["not found"])

    async def remove_device(self, device_id: str) -> None:
        """The device can no longer connect (unlinked, or its token expired)."""
        await self.run([{"command": "deleteClient", "username": device_id}], tolerate=["not found"])
        await self.run([{"command": "deleteRole", "rolename": device_role(device_id)}], tolerate=["not found"])
