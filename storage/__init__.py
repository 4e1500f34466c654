"""Storage backends, chosen by URL.

``sqlite:///PATH`` is the embedded default. Other schemes import their driver only when
chosen, so the embedded default needs none of them installed.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from .base import NotStored, StorageError, StorageUnavailable, Store
from .media import MediaStore


class BackendConfigError(StorageError):
    """A storage URL names an unknown scheme or lacks a part it needs."""


def open_store(url: str) -> Store:
    """The message store for a URL (not yet opened: call ``await store.open()``)."""
    parsed = urlparse(url)
    if parsed.scheme == "sqlite":
        path = parsed.path if not parsed.netloc else parsed.netloc + parsed.path
        if not path:
            raise BackendConfigError(f"sqlite URL needs a path: {url!r}")
        from .sqlite import SqliteStore

        return SqliteStore(Path(path))
    raise BackendConfigError(f"unknown store scheme {parsed.scheme!r} in {url!r} (expected sqlite://)")


def open_media(url: str, *, secret: bytes, public_base: str) -> MediaStore:
    """The media store for a URL; ``file://`` serves through Pigeon's own HTTP server."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        from .media_local import LocalMediaStore

        return LocalMediaStore(Path(parsed.path), secret, public_base)
    raise BackendConfigError(f"unknown media scheme {parsed.scheme!r} in {url!r} (expected file://)")


__all__ = [
    "BackendConfigError", "MediaStore", "NotStored", "StorageError", "StorageUnavailable", "Store",
    "open_media", "open_store",
]
