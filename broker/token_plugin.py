"""Devices on a Mosquitto that checks their tokens itself: the ``pigeon_auth`` plugin
(``broker/mosquitto/pigeon_auth.c``, set up as docs/deploy.md says).

Holding the deployment's secret, the plugin checks a device's token at CONNECT and gives it the
topics of protocol section 2, so a login tells the broker nothing and the broker keeps nothing
per device. What the bridge still tells it, at QoS 1 on ``$CONTROL/pigeon-auth/v1`` (Mosquitto
acknowledges a control message only once the plugin has carried it out), over the bridge's
control connection (:class:`broker.dynsec.DynSecAdmin`):

* an unlinked device is revoked until every token it was given has expired, and closed;
* a device is closed on demand (``kick``), its will published, and may connect again.

Errors: :class:`broker.dynsec.DynSecError` when the broker does not take a command, or, from
:meth:`TokenPlugin.check`, does not take this deployment's tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
from collections.abc import Callable

import aiomqtt

from .dynsec import DynSecAdmin, DynSecError

log = logging.getLogger(__name__)
PLUGIN_CONTROL = "$CONTROL/pigeon-auth/v1"
# a revocation outlasts the device's last token by this much, for a broker whose clock runs behind
CLOCK_SLACK_MS = 300_000


class TokenPlugin:
    """``issue(user, device, expires_ms)`` signs a token as the bridges do; ``now_ms`` is the wall clock."""

    def __init__(self, admin: DynSecAdmin, issue: Callable[[str, str, int], str], now_ms: Callable[[], int],
                 token_ttl_ms: int, *, host: str, port: int, tls_context: ssl.SSLContext | None = None) -> None:
        self._admin = admin
        self._issue = issue
        self._now_ms = now_ms
        self._token_ttl = token_ttl_ms
        self._host, self._port, self._tls = host, port, tls_context

    async def check(self, timeout_s: float = 10.0) -> None:
        """That the broker takes this deployment's tokens and carries out the bridge's commands:
        a device made up for the check connects with a token signed here, then is closed by a
        ``kick`` (which also proves the bridge may publish on the control topic)."""
        device = f"~check-{secrets.token_hex(6)}"
        token = self._issue("~bridge", device, self._now_ms() + 60_000)
        probe = aiomqtt.Client(self._host, self._port, identifier=device, username=device, password=token,
                               clean_session=True, protocol=aiomqtt.ProtocolVersion.V311, tls_context=self._tls)
        try:
            await probe.__aenter__()
        except aiomqtt.MqttError as exc:
            raise DynSecError(f"the broker refused a token of this deployment ({exc}): is the pigeon_auth plugin "
                              "loaded with this deployment's secret? (docs/deploy.md)") from exc
        try:
            await self.kick_device(device)
            try:
                async with asyncio.timeout(timeout_s):
                    async for _ in probe.messages:
                        pass
            except aiomqtt.MqttError:
                return  # closed by the plugin, as asked
            except TimeoutError:
                pass
            raise DynSecError(f"the broker did not carry out a kick on {PLUGIN_CONTROL}: may the bridge's client "
                              "publish there? (docs/deploy.md)")
        finally:
            with contextlib.suppress(aiomqtt.MqttError):
                await probe.__aexit__(None, None, None)

    async def register_device(self, user_id: str, device_id: str, token: str, expires_at: int) -> None:
        """Nothing to tell: the broker checks the token itself when the device connects."""

    async def remove_device(self, device_id: str) -> None:
        """The device can no longer connect with any token it was given, and is closed now."""
        until = self._now_ms() + self._token_ttl + CLOCK_SLACK_MS
        await self._admin.control(PLUGIN_CONTROL, f"revoke {device_id} {until}\n")

    async def kick_device(self, device_id: str) -> None:
        """Close the device's connection now, its will published as when a connection is lost;
        it may connect again with its token."""
        await self._admin.control(PLUGIN_CONTROL, f"kick {device_id}\n")
