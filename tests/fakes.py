"""Fakes for handler tests only: never used as a backend."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Callable
from typing import Any

from storage.base import StorageUnavailable, Store
from storage.media import StoredObject, UploadTicket


async def until(check: Callable[[], object], want: object = True, timeout: float = 5.0) -> None:
    """Until ``check()`` (awaited if it gives a coroutine) gives ``want``, or fail after ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got == want:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still {got!r}, waiting for {want!r}")
        await asyncio.sleep(0.05)


class FlakyStore:
    """Wraps a real store; the methods named in ``failing`` raise StorageUnavailable (those in
    ``failing_when``, when its test of the call's arguments says so), those named in ``held``
    wait until their event is set."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.failing: set[str] = set()
        self.failing_when: dict[str, Callable[..., bool]] = {}
        self.held: dict[str, asyncio.Event] = {}
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        async def call(*args: Any, **kw: Any) -> Any:
            self.calls[name] += 1
            if name in self.held:
                await self.held[name].wait()
            if name in self.failing or (name in self.failing_when and self.failing_when[name](*args, **kw)):
                raise StorageUnavailable(f"injected failure in {name}")
            return await attr(*args, **kw)

        return call


class MemoryBlobs:
    """An in-memory MediaStore whose 'uploads' tests perform by calling ``put``."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.down = False

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _check(self) -> None:
        if self.down:
            raise StorageUnavailable("object store down")

    async def presign_upload(self, key: str, size: int, mime: str, expires: int) -> UploadTicket:
        self._check()
        return UploadTicket(method="PUT", url=f"mem://{key}?max={size}", expires=expires)

    async def presign_download(self, key: str, expires: int) -> str:
        self._check()
        return f"mem://{key}?exp={expires}"

    async def inspect(self, key: str) -> StoredObject | None:
        self._check()
        data = self.objects.get(key)
        return None if data is None else StoredObject(size=len(data), sha256=hashlib.sha256(data).hexdigest())

    async def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    def put(self, key: str, data: bytes) -> None:
        self.objects[key] = data


class CapturingSms:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def send_code(self, phone: str, code: str) -> None:
        self.sent.append((phone, code))
