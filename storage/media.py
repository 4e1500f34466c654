"""Where media bytes live: one Protocol, one module per backend.

Devices never send media through the bridge. They get a presigned URL, talk to the object
store directly, and the bridge checks what arrived before the key becomes usable.

Errors: :class:`storage.base.StorageUnavailable` when the object store cannot be reached.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class UploadTicket:
    """How a device uploads one object: the method, URL and any form fields or headers."""

    method: Literal["PUT", "POST"]
    url: str
    expires: int
    fields: Mapping[str, str] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoredObject:
    size: int
    sha256: str


class MediaStore(Protocol):
    async def open(self) -> None:
        """Create the bucket or folder if missing."""

    async def close(self) -> None: ...

    async def presign_upload(self, key: str, size: int, mime: str, expires: int) -> UploadTicket:
        """A URL that accepts exactly one object of at most ``size`` bytes under ``key`` until
        ``expires`` (ms since the epoch); the storage server itself refuses larger bodies."""

    async def presign_download(self, key: str, expires: int) -> str:
        """A URL that serves the object until ``expires`` (ms since the epoch)."""

    async def inspect(self, key: str) -> StoredObject | None:
        """Size and SHA-256 (hex) of the stored object, computed from its bytes; None if absent."""

    async def delete(self, key: str) -> None:
        """Remove the object if present."""
