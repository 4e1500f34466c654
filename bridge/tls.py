"""TLS for what devices reach: one server context per process, shared by the MQTT, WebSocket
and HTTPS listeners, and reloadable in place (new handshakes use the new certificate)."""

from __future__ import annotations

import ssl
from pathlib import Path

from .errors import ConfigError


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2 or newer, no compression, no renegotiation, the server's cipher order; no client
    certificates are asked for (devices prove who they are with their token)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.verify_mode = ssl.CERT_NONE
    load_certificate(ctx, cert, key)
    return ctx


def client_context(ca_file: Path | None = None, *, pinned: bool = False) -> ssl.SSLContext:
    """For the bridge's own TLS connections (to an mqtts:// broker): TLS 1.2 or newer, the
    certificate and host name checked against ``ca_file`` (None: the system's CAs). ``pinned``:
    ``ca_file`` is the server's own certificate, trusted as it is, whatever name it holds (the
    bridge reaching its own embedded broker on loopback)."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"CA file {ca_file} cannot be loaded: {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if pinned:
        ctx.check_hostname = False
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a certificate that is no CA is the anchor
    return ctx


def load_certificate(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    """Load (or reload) the certificate chain and its key; a bad file raises ConfigError and
    leaves ``ctx`` as it was (the files are tried on a scratch context first, since OpenSSL
    may have taken a new certificate before it finds the key does not match it)."""
    _load(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key)
    _load(ctx, cert, key)


def _load(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except FileNotFoundError as exc:
        raise ConfigError(f"TLS certificate or key not found: {exc.filename or cert}") from exc
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"TLS certificate {cert} and key {key} cannot be loaded: {exc}") from exc
