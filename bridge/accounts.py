"""Login by phone number and one-time code; device tokens.

Codes are six digits, stored only as an HMAC, expire after ``code_ttl_s``, and after
``code_max_attempts`` wrong guesses the phone is locked for ``code_lock_s``. Asking for a new
code does not reset the count of wrong guesses.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from storage.base import Device, LoginCode, Store, User

from .clock import Clock
from .errors import BadRequest, NotFound, RateLimited, Unauthorized, Unavailable
from .handling import Caller, storage_errors
from .tokens import TokenSigner
from .wire import V1_KNOWN_S

log = logging.getLogger(__name__)
# E.164; the pattern is also the OpenAPI document's. Python's "$" also matches before a final
# newline, so the check is a full match of the pattern without its anchors.
PHONE_PATTERN = r"^\+[1-9][0-9]{6,14}$"
PHONE_RE = re.compile(PHONE_PATTERN[1:-1])
CODE_RE = re.compile(r"[0-9]{6}")  # ASCII digits only: str.isdigit() also takes other scripts' digits
KNOWN_DEVICE_S = 60.0


class DeviceRegistry(Protocol):
    """Where devices must be known to connect (an external broker's own client list)."""

    async def register_device(self, user_id: str, device_id: str, token: str, expires_at: int) -> None: ...

    async def remove_device(self, device_id: str) -> None: ...


class CodeSender(Protocol):
    async def send_code(self, phone: str, code: str) -> None:
        """Deliver the code to the phone; raise on failure."""


@dataclass(frozen=True, slots=True)
class Login:
    user: User
    device: Device
    token: str
    expires_at: int


def check_phone(phone: object) -> str:
    if not isinstance(phone, str) or not PHONE_RE.fullmatch(phone):
        raise BadRequest("'phone' must be an E.164 number such as +15550001111")
    return phone


class Accounts:
    def __init__(
        self, store: Store, clock: Clock, signer: TokenSigner, secret: bytes, *,
        sender: CodeSender | None, code_ttl_s: int, max_attempts: int, lock_s: int, token_ttl_s: int,
    ) -> None:
        self._store = store
        self._clock = clock
        self._signer = signer
        self._secret = secret
        self._sender = sender
        self._code_ttl = code_ttl_s * 1000
        self._max_attempts = max_attempts
        self._lock = lock_s * 1000
        self._token_ttl = token_ttl_s * 1000
        # device -> (user, monotonic time it was checked); re-checked after KNOWN_DEVICE_S so
        # a device unlinked through another process stops working here too
        self._known_devices: dict[str, tuple[str, float]] = {}
        self.registry: DeviceRegistry | None = None
        # told (awaited) the user whenever one of their devices is linked or unlinked
        self.devices_changed: Callable[[str], Awaitable[None]] | None = None
        self._telling: set[asyncio.Task[None]] = set()

    def _hash(self, phone: str, code: str) -> str:
        return hmac.new(self._secret, f"login|{phone}|{code}".encode(), hashlib.sha256).hexdigest()

    async def request_code(self, phone: str) -> str:
        """Create and deliver a code; return it (the edge shows it only in dev mode)."""
        phone = check_phone(phone)
        now = self._clock.now_ms()
        async with storage_errors():
            prev = await self._store.get_login_code(phone)
            attempts = 0
            if prev is not None:
                if prev.locked_until > now:
                    raise RateLimited("too many wrong codes; try later", retry_after_ms=prev.locked_until - now)
                attempts = prev.attempts
            code = f"{secrets.randbelow(1_000_000):06d}"
            await self._store.put_login_code(
                LoginCode(phone=phone, code_hash=self._hash(phone, code), expires_at=now + self._code_ttl,
                          attempts=attempts, locked_until=0)
            )
        if self._sender is not None:
            await self._sender.send_code(phone, code)
        return code

    async def verify(self, phone: str, code: object, device_name: str, platform: str, proto: object = 1) -> Login:
        """``proto``: the protocol the new device reads user events in (protocol section 1)."""
        phone = check_phone(phone)
        if not isinstance(code, str) or not CODE_RE.fullmatch(code):
            raise BadRequest("'code' must be six digits")
        if type(proto) is not int or proto not in (1, 2):
            raise BadRequest("'proto' must be 1 or 2")
        now = self._clock.now_ms()
        async with storage_errors():
            lc = await self._store.get_login_code(phone)
            if lc is None:
                raise Unauthorized("no code was requested for this phone")
            if lc.locked_until > now:
                raise RateLimited("too many wrong codes; try later", retry_after_ms=lc.locked_until - now)
            if not hmac.compare_digest(lc.code_hash, self._hash(phone, code)):
                attempts = lc.attempts + 1
                locked = now + self._lock if attempts >= self._max_attempts else 0
                await self._store.put_login_code(
                    LoginCode(phone=phone, code_hash=lc.code_hash, expires_at=lc.expires_at,
                              attempts=0 if locked else attempts, locked_until=locked)
                )
                if locked:
                    raise RateLimited("too many wrong codes; try later", retry_after_ms=self._lock)
                raise Unauthorized("wrong code")
            if lc.expires_at <= now:
                raise Unauthorized("code expired; request a new one")
            await self._store.delete_login_code(phone)
            user = await self._store.create_user(phone, now)
            device = await self._store.add_device(user.user_id, device_name, platform, now, proto)
        expires = now + self._token_ttl
        token = self._signer.issue(user.user_id, device.device_id, expires)
        await self._register(user.user_id, device.device_id, token, expires)
        await self._tell_devices_changed(user.user_id)
        self._known_devices[device.device_id] = (user.user_id, self._clock.monotonic())
        log.info("device %s linked to user %s", device.device_id, user.user_id)
        return Login(user=user, device=device, token=token, expires_at=expires)

    async def authenticate(self, token: str) -> Caller:
        """The device a token was issued to; Unauthorized if forged, expired or unlinked."""
        claims = self._signer.verify(token, self._clock.now_ms())
        known = self._known_devices.get(claims.device_id)
        now = self._clock.monotonic()
        if known is None or known[0] != claims.user_id or now - known[1] > KNOWN_DEVICE_S:
            async with storage_errors():
                device = await self._store.get_device(claims.device_id)
            if device is None or device.user_id != claims.user_id:
                self._known_devices.pop(claims.device_id, None)
                raise Unauthorized("device is not linked")
            if len(self._known_devices) > 500_000:
                self._known_devices.clear()
            self._known_devices[claims.device_id] = (claims.user_id, now)
        return Caller(user_id=claims.user_id, device_id=claims.device_id)

    async def refresh(self, caller: Caller) -> tuple[str, int]:
        """A new token (and expiry) for the caller's device; the broker learns it before it is
        returned. Where the broker keeps passwords, the old token stops working for MQTT."""
        expires = self._clock.now_ms() + self._token_ttl
        token = self._signer.issue(caller.user_id, caller.device_id, expires)
        await self._register(caller.user_id, caller.device_id, token, expires)
        return token, expires

    async def _register(self, user_id: str, device_id: str, token: str, expires: int) -> None:
        """Tell the broker (when it keeps its own device list) before the token is handed out."""
        if self.registry is None:
            return
        try:
            await self.registry.register_device(user_id, device_id, token, expires)
        except Exception as exc:
            log.warning("broker refused device %s: %s", device_id, exc)
            raise Unavailable("the broker could not register this device's token; retry") from exc

    async def unlink(self, caller: Caller, device_id: str) -> None:
        """Unlink one of the caller's own devices: its token stops working and, where the broker
        checks devices itself, the broker refuses it from now on (closing its connection) first:
        should the broker not take that, the unlink fails (``unavailable``) and may be tried again."""
        async with storage_errors():
            device = await self._store.get_device(device_id)
        if device is None or device.user_id != caller.user_id:
            raise NotFound("you have no such device")
        if self.registry is not None:
            try:
                await self.registry.remove_device(device_id)
            except Exception as exc:  # its token would still open the broker: nothing is changed
                log.warning("broker did not remove device %s: %s", device_id, exc)
                raise Unavailable("the broker could not be told to refuse this device; retry") from exc
        async with storage_errors():
            await self._store.remove_device(device_id)
        self._known_devices.pop(device_id, None)
        await self._tell_devices_changed(caller.user_id)
        log.info("device %s unlinked from user %s", device_id, caller.user_id)

    async def _tell_devices_changed(self, user_id: str) -> None:
        """Every bridge forgets whether the user has v1 readers (bridge.wire.V1Readers). Should
        that fail, the login or unlink stands and the news is sent again in the background, each
        second until it goes or until every answer kept before the change has expired."""
        if self.devices_changed is None:
            return
        try:
            await self.devices_changed(user_id)
        except Exception as exc:
            log.warning("could not tell the bridges that %s's devices changed (%s): trying again", user_id, exc)
            task = asyncio.get_running_loop().create_task(self._tell_again(user_id))
            self._telling.add(task)
            task.add_done_callback(self._telling.discard)

    async def _tell_again(self, user_id: str) -> None:
        assert self.devices_changed is not None
        for _ in range(int(V1_KNOWN_S)):
            await asyncio.sleep(1.0)
            try:
                await self.devices_changed(user_id)
                return
            except Exception as exc:
                log.debug("telling of %s's devices again: %s", user_id, exc)

    async def me(self, caller: Caller) -> User:
        async with storage_errors():
            user = await self._store.get_user(caller.user_id)
        if user is None:
            raise NotFound("user not found")
        return user

    async def user(self, user_id: str) -> User:
        """Any user by id (the edge decides who may see whom); NotFound if there is none."""
        async with storage_errors():
            user = await self._store.get_user(user_id)
        if user is None:
            raise NotFound("no such user")
        return user

    async def rename(self, caller: Caller, name: object) -> User:
        if not isinstance(name, str) or len(name) > 64 or not name.strip():
            raise BadRequest("'name' must be 1 to 64 characters")
        async with storage_errors():
            return await self._store.set_user_name(caller.user_id, name.strip())

    async def find(self, phone: str) -> User:
        phone = check_phone(phone)
        async with storage_errors():
            user = await self._store.user_by_phone(phone)
        if user is None:
            raise NotFound("no user with that phone")
        return user
