"""One frozen settings object per process, read once from flags and ``PIGEON_*`` variables."""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from .errors import ConfigError
from .tls import client_context, server_context

DAY_S = 86_400
BROKER_AUTH = ("dynsec", "plugin")
# what VAPID (RFC 8292, as py_vapid checks it) takes as a subject: a mail address or an https origin
VAPID_SUBJECT_RE = re.compile(r"^(mailto:[^@\s]+@(localhost|[\w%-]+(\.[\w%-]+)+)|https://(localhost|[\w-]+\.[\w.-]+))$")


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path = Path(".pigeon")
    host: str = "127.0.0.1"
    public_host: str | None = None
    public_url: str | None = None  # the HTTP base devices use, e.g. https://chat.example.com behind a proxy
    public_ws_url: str | None = None  # the MQTT-over-WebSocket URL login returns, e.g. wss://chat.example.com/mqtt
    mqtt_port: int = 1883
    ws_port: int = 8083
    http_port: int = 8080
    # TLS (both files given): MQTT, MQTT over WebSocket and HTTP each get a TLS listener on these
    # ports, and login names only them; plaintext=False turns the plain listeners off
    tls_cert: Path | None = None
    tls_key: Path | None = None
    mqtts_port: int = 8883
    wss_port: int = 8084
    https_port: int = 8443
    plaintext: bool = True
    dev: bool = False
    store: str | None = field(default=None, repr=False)  # (URLs that may carry a password)
    media: str | None = field(default=None, repr=False)
    redis: str | None = None
    # with Redis: the address this bridge answers other bridges' requests on, directly
    # (storage/peers.py), and gives them; "": through Redis lists only
    peer_host: str = "127.0.0.1"
    broker: str | None = None
    broker_credentials_file: Path | None = None
    broker_ca_file: Path | None = None  # with an mqtts:// broker: the CA its certificate is checked against
    # how an external Mosquitto knows devices: "dynsec", a dynamic-security client per device made
    # at login; "plugin", Pigeon's plugin checks their tokens with this deployment's secret
    broker_auth: str = "dynsec"
    secret: bytes = field(default=b"", repr=False)
    sms_webhook: str | None = None
    max_payload: int = 64 * 1024
    rate_per_s: float = 50.0
    rate_burst: int = 200
    max_group: int = 100
    token_ttl_s: int = 30 * DAY_S
    code_ttl_s: int = 300
    code_max_attempts: int = 5
    code_lock_s: int = 900
    media_url_ttl_s: int = 600
    media_max_bytes: int = 100 * 1024 * 1024
    upload_ttl_s: int = DAY_S
    log_level: str = "INFO"
    ingest: str = "inprocess"
    # push (section 7): coalescing window, how long a wake is tried, providers' credentials and URLs
    push_window_s: float = 10.0
    push_max_age_s: int = DAY_S
    vapid_key_file: Path | None = None
    vapid_subject: str = "mailto:admin@localhost"
    fcm_credentials_file: Path | None = None
    fcm_url: str = "https://fcm.googleapis.com"
    apns_key_file: Path | None = None
    apns_key_id: str | None = None
    apns_team_id: str | None = None
    apns_topic: str | None = None
    apns_url: str = "https://api.push.apple.com"
    # the embedded broker closes a connection that sends no whole CONNECT within this many seconds
    connect_timeout_s: float = 10.0
    # admission control (bridge/admission.py): requests held before new ones are refused, the
    # level from which typing and presence fan-out are shed (None: half), the longest requests
    # may have been held before new ones are refused (0: no bound by delay), and the least retry hint
    max_pending: int = 2048
    max_pending_device: int = 200  # of one device's own: the per-device burst
    shed_pending: int | None = None
    overload_retry_ms: int = 1000
    max_queue_delay_ms: int = 2000
    # a device refused by its rate limit this many times within 10 s is disconnected (0: never)
    kick_after: int = 200

    @property
    def advertised_host(self) -> str:
        if self.public_host:
            return self.public_host
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite://{(self.data_dir / 'pigeon.db').resolve()}"

    @property
    def media_url(self) -> str:
        return self.media or f"file://{(self.data_dir / 'media').resolve()}"

    def validated(self) -> Settings:
        """Check every value, fill the secret, and return the settings to run with."""
        for name in ("mqtt_port", "ws_port", "http_port", "mqtts_port", "wss_port", "https_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be between 0 and 65535, got {port}")
        positive = ("max_payload", "rate_burst", "max_group", "token_ttl_s", "code_ttl_s",
                    "code_max_attempts", "code_lock_s", "media_url_ttl_s", "media_max_bytes")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.connect_timeout_s <= 3600:
            raise ConfigError(f"connect_timeout_s must be between 0 and 3600 seconds, got {self.connect_timeout_s}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_cert and tls_key (--tls-cert/--tls-key, PIGEON_TLS_CERT/PIGEON_TLS_KEY) "
                              "go together: give both or neither")
        if not self.plaintext and not self.tls:
            raise ConfigError("turning the plaintext listeners off (--no-plaintext, PIGEON_PLAINTEXT=false) "
                              "needs TLS: give --tls-cert and --tls-key")
        if self.tls_cert is not None and self.tls_key is not None:
            server_context(self.tls_cert, self.tls_key)  # a missing or unusable file is a ConfigError now
        if not 1 <= self.max_pending <= 10_000_000:
            raise ConfigError(f"max_pending (PIGEON_MAX_PENDING) must be between 1 and 10000000, "
                              f"got {self.max_pending}")
        if not 1 <= self.max_pending_device <= 1_000_000:
            raise ConfigError(f"max_pending_device (PIGEON_MAX_PENDING_DEVICE) must be between 1 and 1000000, "
                              f"got {self.max_pending_device}")
        if self.shed_pending is not None and not 0 <= self.shed_pending <= self.max_pending:
            raise ConfigError(f"shed_pending (PIGEON_SHED_PENDING) must be between 0 and max_pending "
                              f"({self.max_pending}), got {self.shed_pending}")
        if not 1 <= self.overload_retry_ms <= 3_600_000:
            raise ConfigError(f"overload_retry_ms (PIGEON_OVERLOAD_RETRY_MS) must be between 1 and 3600000, "
                              f"got {self.overload_retry_ms}")
        if not 0 <= self.max_queue_delay_ms <= 600_000:
            raise ConfigError(f"max_queue_delay_ms (PIGEON_MAX_QUEUE_DELAY_MS) must be between 0 (no bound by "
                              f"delay) and 600000, got {self.max_queue_delay_ms}")
        if self.kick_after < 0:
            raise ConfigError(f"kick_after (PIGEON_KICK_AFTER) must be 0 (never) or more, got {self.kick_after}")
        if self.rate_per_s <= 0:
            raise ConfigError(f"rate_per_s must be positive, got {self.rate_per_s}")
        if self.broker is not None:
            if not self.broker.startswith(("mqtt://", "mqtts://")):
                raise ConfigError(f"broker must be an mqtt://HOST:PORT or mqtts://HOST:PORT URL, got {self.broker!r}")
            if self.broker_credentials_file is None:
                raise ConfigError("broker_credentials_file (PIGEON_BROKER_CREDENTIALS_FILE) is required with broker")
            _check_public(self.broker)
        if self.broker_auth not in BROKER_AUTH:
            raise ConfigError(f"broker_auth (PIGEON_BROKER_AUTH) must be one of {', '.join(BROKER_AUTH)}, "
                              f"got {self.broker_auth!r}")
        if self.broker_ca_file is not None:
            client_context(self.broker_ca_file)  # a missing or unusable CA file is a ConfigError now
        if self.ingest not in ("inprocess", "mqtt"):
            raise ConfigError(f"ingest must be 'inprocess' or 'mqtt', got {self.ingest!r}")
        if self.max_group < 2:
            raise ConfigError("max_group must be at least 2")
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            raise ConfigError(f"public_url must be an http(s) URL, got {self.public_url!r}")
        if self.public_ws_url and not self.public_ws_url.startswith(("ws://", "wss://")):
            raise ConfigError(f"public_ws_url must be a ws(s):// URL, got {self.public_ws_url!r}")
        if self.sms_webhook and not self.sms_webhook.startswith(("http://", "https://")):
            raise ConfigError(f"sms_webhook must be an http(s) URL, got {self.sms_webhook!r}")
        if self.push_window_s < 0:
            raise ConfigError(f"push_window_s (PIGEON_PUSH_WINDOW) must not be negative, got {self.push_window_s}")
        if self.push_max_age_s <= 0:
            raise ConfigError(f"push_max_age_s (PIGEON_PUSH_MAX_AGE) must be positive, got {self.push_max_age_s}")
        for name in ("fcm_url", "apns_url"):
            if not getattr(self, name).startswith(("http://", "https://")):
                raise ConfigError(f"{name} must be an http(s) URL, got {getattr(self, name)!r}")
        if not VAPID_SUBJECT_RE.match(self.vapid_subject):
            raise ConfigError(f"vapid_subject (PIGEON_VAPID_SUBJECT) must be mailto:ADDRESS or an https://HOST URL "
                              f"with no path, got {self.vapid_subject!r}")
        if self.apns_key_file is not None:
            missing = [n for n in ("apns_key_id", "apns_team_id", "apns_topic") if not getattr(self, n)]
            if missing:
                raise ConfigError(f"apns_key_file needs {', '.join(missing)} too "
                                  f"({', '.join('PIGEON_' + n.upper() for n in missing)})")
        secret = self.secret or _load_or_create_secret(self.data_dir)
        if len(secret) < 16:
            raise ConfigError("secret (PIGEON_SECRET / PIGEON_SECRET_FILE) must be at least 16 bytes")
        return replace(self, secret=secret)


def _check_public(broker: str) -> None:
    """The broker URL's ``public=`` (what login names) must be HOST:PORT or mqtt(s)://HOST:PORT."""
    query = parse_qs(urlparse(broker).query)
    for public in query.get("public", []):
        url = urlparse(public if "://" in public else f"mqtt://{public}")
        try:
            port = url.port
        except ValueError:
            port = None
        if url.scheme not in ("mqtt", "mqtts") or not url.hostname or port is None:
            raise ConfigError(f"the broker's public= must be HOST:PORT, mqtt://HOST:PORT or mqtts://HOST:PORT, "
                              f"got {public!r}")


def _load_or_create_secret(data_dir: Path) -> bytes:
    path = data_dir / "secret"
    if path.exists():
        return path.read_bytes().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(value)
    return value


def read_credentials(path: Path) -> tuple[str, str]:
    """``username:password`` from a file (a secret kept off the command line)."""
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"broker credentials file {path} cannot be read: {exc}") from exc
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ConfigError(f"broker credentials file {path} must hold username:password")
    return user, password


def secret_from_env(env: dict[str, str] | None = None) -> bytes:
    """``PIGEON_SECRET`` or the contents of ``PIGEON_SECRET_FILE``; empty when neither is set."""
    env = dict(os.environ) if env is None else env
    if env.get("PIGEON_SECRET"):
        return env["PIGEON_SECRET"].encode()
    if env.get("PIGEON_SECRET_FILE"):
        try:
            return Path(env["PIGEON_SECRET_FILE"]).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"PIGEON_SECRET_FILE cannot be read: {exc}") from exc
    return b""


def settings(**values: Any) -> Settings:
    """Build settings from keyword values, ignoring None (the flag was not given)."""
    return Settings(**{k: v for k, v in values.items() if v is not None})
