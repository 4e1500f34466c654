"""Storage backends, chosen by URL.

``sqlite:///PATH`` is the embedded default. Other schemes import their driver only when
chosen, so the embedded default needs none of them installed.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any
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
    if parsed.scheme in ("cassandra", "cassandras"):
        return _cassandra(url)
    raise BackendConfigError(f"unknown store scheme {parsed.scheme!r} in {_shown(url)!r} "
                             "(expected sqlite://, cassandra:// or cassandras://)")


def _shown(url: str) -> str:
    """A URL as an error message may show it: everything up to its last '@' hidden (a password
    with an unencoded '/', '?' or '#' ends the URL's host part early, so the parsed one is not
    enough)."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}"


def cassandra_credentials(url: str) -> tuple[str, str] | None:
    """The (user, password) of a ``cassandra://USER:PASSWORD@HOSTS/KEYSPACE`` URL (each
    percent-decoded), None when it names none. A user without a password, or a password without
    a user, is refused: the cluster would be asked without them."""
    parsed = urlparse(url)
    if "@" not in parsed.netloc:
        return None
    userinfo = parsed.netloc.rsplit("@", 1)[0]
    user, colon, password = userinfo.partition(":")
    if not user or not colon or not password:
        raise BackendConfigError("cassandra URL: credentials must be USER:PASSWORD before the '@' "
                                 "(cassandra://USER:PASSWORD@HOST[:PORT]/KEYSPACE, each percent-encoded)")
    return unquote(user), unquote(password)


def cassandra_contact(url: str) -> tuple[list[str], int, str, tuple[str, str] | None]:
    """The hosts, port, keyspace and credentials of a ``cassandra://`` URL. Hosts are names or
    addresses, IPv6 ones in brackets; every host is asked on the same port (the driver's way),
    9042 unless given."""
    parsed = urlparse(url)
    if "@" in parsed.path or "@" in parsed.fragment:
        raise BackendConfigError("cassandra URL: percent-encode '/', '?', '#' and '%' in the user and password "
                                 f"({_shown(url)!r})")
    keyspace = parsed.path.strip("/")
    if not parsed.netloc or not keyspace:
        raise BackendConfigError(f"cassandra URL needs hosts and a keyspace: {_shown(url)!r}")
    hosts: list[str] = []
    ports: set[int] = set()
    for h in parsed.netloc.rsplit("@", 1)[-1].split(","):
        if h.startswith("["):
            host, _, rest = h[1:].partition("]")
            p = rest[1:] if rest.startswith(":") else ("" if not rest else "x")
        else:
            host, _, p = h.partition(":")
        if not host:
            raise BackendConfigError(f"cassandra URL has an empty host: {_shown(url)!r}")
        if p:
            if not p.isdigit() or not 0 < int(p) < 65536:
                raise BackendConfigError(f"cassandra URL has a bad port: {_shown(url)!r}")
            ports.add(int(p))
        hosts.append(host)
    if len(ports) > 1:
        raise BackendConfigError(f"cassandra URL: every host is asked on the same port, got {sorted(ports)}")
    return hosts, ports.pop() if ports else 9042, keyspace, cassandra_credentials(url)


def cassandra_tls(url: str) -> ssl.SSLContext | None:
    """For ``cassandras://`` (TLS to every node, the driver's connections and the bridge's own):
    a context that checks the nodes' certificates and names (TLS 1.2 or later), trusting the
    system's CAs or the PEM file of ``?ca=PATH``; None for ``cassandra://``."""
    parsed = urlparse(url)
    ca = parse_qs(parsed.query).get("ca", [""])[0]
    if parsed.scheme != "cassandras":
        if ca:
            raise BackendConfigError("cassandra URL: ca= is for TLS, which is cassandras://")
        return None
    try:  # (parse_qs has decoded it)
        ctx = ssl.create_default_context(cafile=ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise BackendConfigError(f"cassandra URL: the CA file {ca!r} cannot be used: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def cassandra_cluster(url: str, **kw: Any) -> Any:
    """A driver ``Cluster`` for the URL's hosts, port, credentials and TLS (not connected), for
    tools and tests that manage keyspaces; ``kw`` goes to ``Cluster``."""
    from cassandra.auth import PlainTextAuthProvider
    from cassandra.cluster import Cluster

    hosts, port, _keyspace, creds = cassandra_contact(url)
    return Cluster(hosts, port=port, auth_provider=PlainTextAuthProvider(*creds) if creds else None,
                   ssl_context=cassandra_tls(url), **kw)


def _cassandra(url: str) -> Store:
    """``cassandra[s]://[USER:PASSWORD@]HOST[,HOST...][:PORT]/KEYSPACE[?replication=JSON&inbox_ttl_days=N&writes=direct|driver&ca=PATH]``
    (``writes=driver`` sends plain writes through the driver too, see storage/cql_wire.py; the
    credentials are given to a cluster that asks for them, password authentication;
    ``cassandras`` connects with TLS, see :func:`cassandra_tls`)."""
    hosts, port, keyspace, credentials = cassandra_contact(url)
    parsed = urlparse(url)
    query = parse_qs(parsed.query)
    from .cassandra import INBOX_TTL_S, CassandraStore

    kw: dict[str, object] = {"credentials": credentials, "ssl_context": cassandra_tls(url)}
    if "replication" in query:
        kw["replication"] = unquote(query["replication"][0])
    if "writes" in query:
        writes = query["writes"][0]
        if writes not in ("direct", "driver"):
            raise BackendConfigError(f"cassandra URL: writes must be direct or driver, got {writes!r}")
        kw["direct_writes"] = writes == "direct"
    if "inbox_ttl_days" in query:
        days = query["inbox_ttl_days"][0]
        if not days.isdigit() or not 1 <= int(days) <= 3650:
            raise BackendConfigError(f"cassandra URL: inbox_ttl_days must be a whole number of days from 1 "
                                     f"to 3650, got {days!r}")
        kw["inbox_ttl_s"] = int(days) * 86_400
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
    raise BackendConfigError(f"unknown media scheme {parsed.scheme!r} in {_shown(url)!r} (expected file://, s3://)")


__all__ = [
    "BackendConfigError", "MediaStore", "NotStored", "StorageError", "StorageUnavailable", "Store",
    "cassandra_cluster", "cassandra_contact", "cassandra_credentials", "cassandra_tls", "open_media", "open_store",
]
