"""Storage backends, chosen by URL.

``sqlite:///PATH`` is the embedded default. Other schemes import their driver only when
chosen, so the embedded default needs none of them installed.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

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
    if parsed.scheme == "cassandra":
        return _cassandra(url)
    raise BackendConfigError(f"unknown store scheme {parsed.scheme!r} in {url!r} (expected sqlite:// or cassandra://)")


def _cassandra(url: str) -> Store:
    """``cassandra://HOST[,HOST...][:PORT]/KEYSPACE[?replication=JSON&inbox_ttl_days=N&writes=direct|driver]``
    (``writes=driver`` sends plain writes through the driver too, see storage/cql_wire.py)."""
    parsed = urlparse(url)
    keyspace = parsed.path.strip("/")
    if not parsed.netloc or not keyspace:
        raise BackendConfigError(f"cassandra URL needs hosts and a keyspace: {url!r}")
    hostpart = parsed.netloc.rsplit("@", 1)[-1]
    port = 9042
    if ":" in hostpart.rsplit(",", 1)[-1]:
        hostpart, _, p = hostpart.rpartition(":")
        if not p.isdigit():
            raise BackendConfigError(f"cassandra URL has a bad port: {url!r}")
        port = int(p)
    hosts = [h for h in hostpart.split(",") if h]
    query = parse_qs(parsed.query)
    from .cassandra import INBOX_TTL_S, CassandraStore

    kw: dict[str, object] = {}
    if "replication" in query:
        kw["replication"] = unquote(query["replication"][0])
    if "writes" in query:
        writes = query["writes"][0]
        if writes not in ("direct", "driver"):
            raise BackendConfigError(f"cassandra URL: writes must be direct or driver, got {writes!r}")
        kw["direct_writes"] = writes == "direct"
    if "inbox_ttl_days" in query:
        kw["inbox_ttl_s"] = int(query["inbox_ttl_days"][0]) * 86_400
    else:
        kw["inbox_ttl_s"] = INBOX_TTL_S
    return CassandraStore(hosts, port, keyspace, **kw)  # type: ignore[arg-type]


def open_media(url: str, *, secret: bytes, public_base: str) -> MediaStore:
    """The media store for a URL; ``file://`` serves through Pigeon's own HTTP server."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        from .media_local import LocalMediaStore

        return LocalMediaStore(Path(parsed.path), secret, public_base)
    if parsed.scheme in ("s3", "s3s"):
        bucket = parsed.path.strip("/")
        if not parsed.hostname or not bucket or parsed.username is None or parsed.password is None:
            raise BackendConfigError("media URL must look like s3://ACCESS:SECRET@HOST:PORT/BUCKET (s3s:// for TLS)")
        from .media_s3 import S3MediaStore

        endpoint = parsed.hostname + (f":{parsed.port}" if parsed.port else "")
        query = parse_qs(parsed.query)
        region = query.get("region", ["us-east-1"])[0]
        public = query.get("public", [None])[0]
        public_secure = public.startswith("https://") if public else None
        public_host = public.split("://", 1)[-1].rstrip("/") if public else None
        return S3MediaStore(endpoint, unquote(parsed.username), unquote(parsed.password), bucket,
                            secure=parsed.scheme == "s3s", region=region, public_endpoint=public_host,
                            public_secure=public_secure)
    raise BackendConfigError(f"unknown media scheme {parsed.scheme!r} in {url!r} (expected file://, s3://)")


__all__ = [
    "BackendConfigError", "MediaStore", "NotStored", "StorageError", "StorageUnavailable", "Store",
    "open_media", "open_store",
]
