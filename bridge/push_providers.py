"""The push services' wire protocols: Web Push, FCM HTTP v1, APNs and a plain webhook.

Each provider checks the ``token`` a device registers (and returns the form kept in the store),
and sends one content-free wake to it, telling the caller what the service answered as an
:class:`Outcome`: accepted, gone (the service dropped the subscription, as each service says
it: Web Push 404/410, FCM 404 ``UNREGISTERED``, APNs 410, a webhook 404/410), worth a retry
(429, 5xx, a network failure; with the service's ``Retry-After``), or rejected for good.

- Web Push (RFC 8030): the body encrypted with ``aes128gcm`` (RFC 8291, by ``http_ece``) for the
  subscription's keys, signed with VAPID (RFC 8292, ES256, by ``py_vapid``).
- FCM HTTP v1: ``POST {fcm_url}/v1/projects/PROJECT/messages:send`` with an OAuth2 access token
  obtained from the service account's ``token_uri`` by a signed JWT grant (RFC 7523), kept
  until shortly before it expires.
- APNs: HTTP/2 ``POST {apns_url}/3/device/TOKEN`` with a provider token (an ES256 JWT signed by
  the ``.p8`` key), renewed every 40 minutes (Apple accepts one for an hour).
- webhook: the wake as a JSON POST.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import email.utils
import ipaddress
import json
import logging
import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import http_ece
import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from py_vapid import Vapid02, VapidException

from .config import Settings
from .errors import BadRequest, ConfigError

log = logging.getLogger(__name__)
SEND_TIMEOUT_S = 15.0  # one send in all (token requests included); httpx's timeouts bound each phase
MAX_REPLY_BYTES = 4096  # of a push service's answer: what is past it is not read
APNS_TOKEN_TTL_S = 40 * 60  # Apple refuses provider tokens older than an hour, and renewals more often than 20 min
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
FCM_TOKEN_RE = re.compile(r"^[A-Za-z0-9_:\-]{16,4096}$")
APNS_TOKEN_RE = re.compile(r"^(?:[0-9a-fA-F]{2}){32,100}$")
WEBPUSH_TOPIC = "pigeon-wake"  # a newer wake replaces an older one still held by the push service
USER_AGENT = "pigeon-push/1"
GONE_WEBPUSH = frozenset({404, 410})  # RFC 8030: the subscription no longer exists
GONE_WEBHOOK = frozenset({404, 410})  # protocol section 7: a 404 or 410 says the hook is gone
GONE_APNS = frozenset({410})  # Unregistered; 400 BadDeviceToken also comes for a sandbox token sent to production


@dataclass(frozen=True, slots=True)
class Wake:
    """What one push says: ``{"type": "wake"}`` and how many inbox events it covers."""

    events: int
    ttl_s: int  # how long the push service may hold it
    urgent: bool  # it covers a message (sent at once, with an alert); receipts alone are not urgent

    def body(self) -> dict[str, Any]:
        return {"type": "wake", "events": self.events}


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Literal["accepted", "gone", "retry", "rejected"]
    status: int | None = None
    retry_after_s: float | None = None
    detail: str = ""


class Provider(Protocol):
    name: str

    def check(self, token: object, dev: bool) -> str:
        """The token as stored, or :class:`BadRequest` saying what is wrong with it."""

    async def send(self, token: str, wake: Wake) -> Outcome: ...

    async def aclose(self) -> None: ...


# -- helpers ------------------------------------------------------------------------------------------
def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _jwt(header: Mapping[str, Any], claims: Mapping[str, Any], sign: Any) -> str:
    head = b64url(json.dumps(header, separators=(",", ":")).encode())
    body = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{head}.{body}".encode()
    return f"{head}.{body}.{b64url(sign(signing_input))}"


def es256(key: ec.EllipticCurvePrivateKey) -> Any:
    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    return sign


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """An address a public push service or webhook may have: globally routable, not multicast
    (private, loopback, link-local, shared 100.64.0.0/10, documentation, IPv4-mapped ... are not)."""
    return ip.is_global and not ip.is_multicast


def _numeric_host(host: str) -> bool:
    """A host a URL parser or resolver takes as an IPv4 address however it is written: its last
    label is a number (``127.1``, ``2130706433``, ``0x7f000001``, ``0177.0.0.1``)."""
    last = host.rstrip(".").rsplit(".", 1)[-1].lower()
    return bool(re.fullmatch(r"[0-9]+|0x[0-9a-f]*", last))


def _is_internal(host: str) -> bool:
    """An address literal no public push service or webhook has (a DNS name is resolved when the
    push is sent: :func:`check_resolved`)."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not _is_public(ip)


async def check_resolved(url: str) -> str | None:
    """Why the URL's host must not be pushed to (it resolves to an address that is not public:
    a DNS name pointing inside), or ``None``. A failure to resolve is left to the request."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
    except OSError:
        return None
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if not _is_public(ip):
            return f"{host} resolves to {ip}, not a public address"
    return None


def check_url(url: object, what: str, dev: bool) -> str:
    """An ``https`` URL (not to an internal address literal), or ``http`` on a loopback address
    when the server runs with ``--dev``."""
    if not isinstance(url, str) or not 0 < len(url) <= 2048:
        raise BadRequest(f"{what} must be a URL of at most 2048 characters")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as exc:
        raise BadRequest(f"{what} is not a valid URL") from exc
    if not host:
        raise BadRequest(f"{what} must name a host")
    if _numeric_host(host):
        try:
            canonical = str(ipaddress.IPv4Address(host)) == host
        except ValueError:
            canonical = False
        if not canonical:
            raise BadRequest(f"{what} must write an IPv4 address as four decimal numbers (a.b.c.d)")
    if parts.scheme == "https":
        if not dev and _is_internal(host):
            raise BadRequest(f"{what} must not name a private, loopback or link-local address")
        return url
    if parts.scheme == "http" and dev and _is_loopback(host):
        return url
    raise BadRequest(f"{what} must be an https URL" + (" (or http on a loopback address)" if dev else ""))


@dataclass(frozen=True, slots=True)
class Reply:
    """A push service's answer: its status, headers and at most ``MAX_REPLY_BYTES`` of its body."""

    status: int
    headers: httpx.Headers
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body as JSON (``ValueError`` if it is not, or was cut at ``MAX_REPLY_BYTES``)."""
        return json.loads(self.body)


def origin(url: str) -> str:
    """The URL's origin as serialized (RFC 6454): scheme, host and the port unless it is the
    scheme's default; no user info. VAPID's ``aud``."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    default = {"https": 443, "http": 80}.get(parts.scheme)
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


def classify(resp: Reply, gone: frozenset[int] = frozenset()) -> Outcome:
    """What a push service's status code means for the wake; ``gone`` are the statuses by which
    this service says the target no longer exists."""
    status = resp.status
    if 200 <= status < 300:
        return Outcome("accepted", status)
    if status in gone:
        return Outcome("gone", status, detail=resp.text[:200])
    if status == 429 or status >= 500:
        return Outcome("retry", status, retry_after(resp.headers.get("retry-after")), resp.text[:200])
    return Outcome("rejected", status, detail=resp.text[:200])


def retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: a number of seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT (RFC 9110), written with a zone or not
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - time.time())


async def _post(client: httpx.AsyncClient, url: str, **kw: Any) -> Reply | Outcome:
    """POST, and read at most ``MAX_REPLY_BYTES`` of the answer: the response is streamed, so a
    service (or a webhook) that answers with an endless body costs no memory. How long it may
    take in all is bounded by the caller (``Pusher`` wraps each send in ``SEND_TIMEOUT_S``)."""
    kw["headers"] = {"Accept-Encoding": "identity", **kw.get("headers", {})}  # raw bytes: no inflating bombs
    try:
        async with client.stream("POST", url, **kw) as resp:
            body = bytearray()
            async for chunk in resp.aiter_raw():
                body += chunk[:MAX_REPLY_BYTES - len(body)]
                if len(body) >= MAX_REPLY_BYTES:
                    break
            return Reply(resp.status_code, resp.headers, bytes(body))
    except httpx.HTTPError as exc:  # refused, reset, timed out: the service may be back later
        return Outcome("retry", None, detail=f"{type(exc).__name__}: {exc}")


# -- webhook --------------------------------------------------------------------------------------------
class Webhook:
    name = "webhook"

    def __init__(self, client: httpx.AsyncClient, *, dev: bool) -> None:
        self._client = client
        self._dev = dev  # off --dev, the URL's host must resolve to public addresses only

    def check(self, token: object, dev: bool) -> str:
        return check_url(token, "a webhook token (its URL)", dev)

    async def send(self, token: str, wake: Wake) -> Outcome:
        if not self._dev and (why := await check_resolved(token)):
            return Outcome("rejected", None, detail=why)
        got = await _post(self._client, token, json=wake.body(), headers={"User-Agent": USER_AGENT})
        return got if isinstance(got, Outcome) else classify(got, GONE_WEBHOOK)

    async def aclose(self) -> None:
        return None


# -- Web Push ---------------------------------------------------------------------------------------------
def load_vapid_key(path: Path | None, data_dir: Path) -> ec.EllipticCurvePrivateKey:
    """The VAPID key from ``path``, or from ``DATA_DIR/vapid.pem``, made there on first use."""
    if path is None:
        path = data_dir / "vapid.pem"
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            made = ec.generate_private_key(ec.SECP256R1())
            pem = made.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
            log.info("made a VAPID key for Web Push at %s", path)
    return load_p256_key(path, "vapid_key_file", "a readable PEM private key", "a P-256 (prime256v1) key")


def load_p256_key(path: Path, setting: str, readable: str, p256: str) -> ec.EllipticCurvePrivateKey:
    """The P-256 private key in the PEM file ``path``; a :class:`ConfigError` naming the setting
    that gave it otherwise."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{setting} {path} is not {readable}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"{setting} {path} must hold {p256}")
    return key


class WebPush:
    name = "webpush"

    def __init__(self, client: httpx.AsyncClient, key: ec.EllipticCurvePrivateKey, subject: str, *,
                 dev: bool) -> None:
        self._client = client
        self._dev = dev  # off --dev, the endpoint's host must resolve to public addresses only
        self._vapid = Vapid02(private_key=key)
        self._subject = subject
        try:  # what py_vapid will not sign with would fail every push: refuse to start instead
            self._vapid.sign({"aud": "https://push.example.org", "sub": subject})
        except VapidException as exc:
            raise ConfigError(f"vapid_subject (PIGEON_VAPID_SUBJECT) {subject!r} is refused by VAPID: it must be "
                              "mailto:ADDRESS or an https://HOST URL with no path") from exc
        self.public_key = b64url(key.public_key().public_bytes(serialization.Encoding.X962,
                                                               serialization.PublicFormat.UncompressedPoint))

    def check(self, token: object, dev: bool) -> str:
        if isinstance(token, str):
            try:
                token = json.loads(token)
            except ValueError as exc:
                raise BadRequest("a webpush token must be the subscription object (endpoint and keys)") from exc
        if not isinstance(token, dict) or not isinstance(token.get("keys"), dict):
            raise BadRequest("a webpush token must be {\"endpoint\": URL, \"keys\": {\"p256dh\", \"auth\"}}")
        endpoint = check_url(token.get("endpoint"), "the webpush endpoint", dev)
        try:
            self._claims(endpoint)
        except VapidException as exc:
            raise BadRequest(f"the webpush endpoint's origin {origin(endpoint)} cannot be signed for by VAPID "
                             "(an IPv6 address literal?); use a host name") from exc
        keys = token["keys"]
        p256dh, auth = keys.get("p256dh"), keys.get("auth")
        try:
            if not isinstance(p256dh, str) or not isinstance(auth, str):
                raise ValueError("not strings")
            ua_public = b64url_decode(p256dh)
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ua_public)
            secret = b64url_decode(auth)
        except (ValueError, TypeError) as exc:
            raise BadRequest("webpush keys.p256dh must be a base64url P-256 point and keys.auth base64url") from exc
        if len(ua_public) != 65 or len(secret) != 16:
            raise BadRequest("webpush keys.p256dh must be 65 bytes (uncompressed point) and keys.auth 16 bytes")
        return json.dumps({"endpoint": endpoint, "keys": {"p256dh": p256dh, "auth": auth}}, separators=(",", ":"))

    def _claims(self, endpoint: str) -> dict[str, str]:
        """The VAPID ``Authorization`` for a push to ``endpoint`` (``VapidException`` if py_vapid
        refuses its origin)."""
        claims = {"aud": origin(endpoint), "exp": int(time.time()) + 12 * 3600, "sub": self._subject}
        return dict(self._vapid.sign(claims))

    async def send(self, token: str, wake: Wake) -> Outcome:
        sub = json.loads(token)
        endpoint = sub["endpoint"]
        if not self._dev and (why := await check_resolved(endpoint)):
            return Outcome("rejected", None, detail=why)
        body = http_ece.encrypt(
            json.dumps(wake.body(), separators=(",", ":")).encode(),
            private_key=ec.generate_private_key(ec.SECP256R1()),  # a new sender key for every message
            dh=b64url_decode(sub["keys"]["p256dh"]), auth_secret=b64url_decode(sub["keys"]["auth"]),
            version="aes128gcm",
        )
        headers = {
            **self._claims(endpoint),
            "TTL": str(max(0, wake.ttl_s)), "Urgency": "high" if wake.urgent else "normal", "Topic": WEBPUSH_TOPIC,
            "Content-Encoding": "aes128gcm", "Content-Type": "application/octet-stream", "User-Agent": USER_AGENT,
        }
        got = await _post(self._client, endpoint, content=body, headers=headers)
        return got if isinstance(got, Outcome) else classify(got, GONE_WEBPUSH)

    async def aclose(self) -> None:
        return None


def _fcm_error_code(reply: Reply) -> str:
    """The ``errorCode`` of an FCM v1 error's ``FcmError`` detail, or ``""``."""
    try:
        details = reply.json()["error"]["details"]
        codes = [d.get("errorCode", "") for d in details if isinstance(d, dict)]
    except (ValueError, KeyError, TypeError):
        return ""
    return str(codes[0]) if codes else ""


# -- FCM HTTP v1 -------------------------------------------------------------------------------------------
class Fcm:
    name = "fcm"

    def __init__(self, client: httpx.AsyncClient, credentials_file: Path, base_url: str) -> None:
        try:
            creds = json.loads(credentials_file.read_text())
            self._project = str(creds["project_id"])
            self._email = str(creds["client_email"])
            self._token_uri = str(creds.get("token_uri") or "https://oauth2.googleapis.com/token")
            self._key_id = creds.get("private_key_id")
            key = serialization.load_pem_private_key(str(creds["private_key"]).encode(), password=None)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"fcm_credentials_file {credentials_file} is not a service account key: {exc}") from exc
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(f"fcm_credentials_file {credentials_file}: private_key must be an RSA key")
        if not self._token_uri.startswith(("https://", "http://")):
            raise ConfigError(f"fcm_credentials_file {credentials_file}: token_uri must be an http(s) URL")
        self._key = key
        self._client = client
        self._url = f"{base_url.rstrip('/')}/v1/projects/{self._project}/messages:send"
        self._access: tuple[str, float] | None = None  # token, monotonic time to renew it
        self._renewing = asyncio.Lock()  # one token request at a time: the sends waiting share its token

    def check(self, token: object, dev: bool) -> str:
        if not isinstance(token, str) or not FCM_TOKEN_RE.match(token):
            raise BadRequest("an fcm token must be the app's FCM registration token (16 to 4096 of A-Z a-z 0-9 _ : -)")
        return token

    def _sign(self, data: bytes) -> bytes:
        return self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    async def _access_token(self) -> str | Outcome:
        if self._access is not None and time.monotonic() < self._access[1]:
            return self._access[0]
        async with self._renewing:
            if self._access is not None and time.monotonic() < self._access[1]:  # renewed while waiting
                return self._access[0]
            return await self._request_access_token()

    async def _request_access_token(self) -> str | Outcome:
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", **({"kid": self._key_id} if self._key_id else {})}
        claims = {"iss": self._email, "scope": FCM_SCOPE, "aud": self._token_uri, "iat": now, "exp": now + 3600}
        assertion = _jwt(header, claims, self._sign)
        got = await _post(self._client, self._token_uri, data={
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion})
        if isinstance(got, Outcome):
            return got
        if got.status != 200:
            out = classify(got)
            # a refused grant is the credentials' fault, not the device's: try again later
            return Outcome("retry", got.status, out.retry_after_s, f"token endpoint: {got.text[:200]}")
        try:
            reply = got.json()
            token, expires = str(reply["access_token"]), float(reply.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError):
            return Outcome("retry", got.status, detail="token endpoint answered without an access_token")
        self._access = (token, time.monotonic() + max(0.0, expires - 60))
        return token

    async def send(self, token: str, wake: Wake) -> Outcome:
        access = await self._access_token()
        if isinstance(access, Outcome):
            return access
        message = {"message": {
            "token": token,
            "data": {k: str(v) for k, v in wake.body().items()},  # FCM data values are strings
            "android": {"priority": "HIGH" if wake.urgent else "NORMAL", "ttl": f"{max(0, wake.ttl_s)}s",
                        "collapse_key": WEBPUSH_TOPIC},
        }}
        got = await _post(self._client, self._url, json=message,
                          headers={"Authorization": f"Bearer {access}", "User-Agent": USER_AGENT})
        if isinstance(got, Outcome):
            return got
        if got.status == 401:  # the access token was revoked or expired early: a new one next time
            self._access = None
            return Outcome("retry", 401, 0.0, "access token refused")
        if got.status == 404 and _fcm_error_code(got) == "UNREGISTERED":  # the app's token is dead
            return Outcome("gone", 404, detail="UNREGISTERED")
        return classify(got)  # a 404 without UNREGISTERED: e.g. a wrong project_id, not the device's fault

    async def aclose(self) -> None:
        return None


# -- APNs ----------------------------------------------------------------------------------------------------
class Apns:
    name = "apns"

    def __init__(self, key_file: Path, key_id: str, team_id: str, topic: str, base_url: str) -> None:
        key = load_p256_key(key_file, "apns_key_file", "a readable .p8 key", "a P-256 key (an APNs .p8 auth key)")
        self._sign = es256(key)
        self._key_id, self._team_id, self._topic = key_id, team_id, topic
        self._base = base_url.rstrip("/")
        # HTTP/2 only, as APNs requires (over http://, with prior knowledge: a loopback test service)
        self._client = httpx.AsyncClient(http1=False, http2=True, timeout=SEND_TIMEOUT_S)
        self._bearer: tuple[str, float] | None = None

    def check(self, token: object, dev: bool) -> str:
        if not isinstance(token, str) or not APNS_TOKEN_RE.match(token):
            raise BadRequest("an apns token must be the device token in hex (64 to 200 hex digits)")
        return token.lower()

    def _provider_token(self) -> str:
        if self._bearer is None or time.monotonic() >= self._bearer[1]:
            jwt = _jwt({"alg": "ES256", "kid": self._key_id}, {"iss": self._team_id, "iat": int(time.time())},
                       self._sign)
            self._bearer = (jwt, time.monotonic() + APNS_TOKEN_TTL_S)
        return self._bearer[0]

    async def send(self, token: str, wake: Wake) -> Outcome:
        if wake.urgent:
            # an alert the app's notification service extension turns into text after it syncs;
            # the payload itself names nothing (loc-key is a key of the app's own strings)
            aps: dict[str, Any] = {"alert": {"loc-key": "PIGEON_WAKE"}, "mutable-content": 1, "sound": "default"}
            push_type, priority = "alert", "10"
        else:  # receipts only: a silent background push (Apple: priority 5, no alert, sound or badge)
            aps, push_type, priority = {"content-available": 1}, "background", "5"
        payload = {"aps": aps, **wake.body()}
        headers = {
            "authorization": f"bearer {self._provider_token()}", "apns-topic": self._topic,
            "apns-push-type": push_type, "apns-priority": priority, "apns-collapse-id": WEBPUSH_TOPIC,
            "apns-expiration": str(int(time.time()) + max(0, wake.ttl_s)),
        }
        got = await _post(self._client, f"{self._base}/3/device/{token}", json=payload, headers=headers)
        if isinstance(got, Outcome):
            return got
        reason = ""
        try:
            reason = str(got.json().get("reason", "")) if got.body else ""
        except ValueError:
            pass
        if got.status == 403 and reason == "ExpiredProviderToken":
            self._bearer = None
            return Outcome("retry", 403, 0.0, reason)
        out = classify(got, GONE_APNS)  # BadDeviceToken (400) and BadPath (404) are refusals, not a dead token
        return Outcome(out.kind, out.status, out.retry_after_s, reason or out.detail)

    async def aclose(self) -> None:
        await self._client.aclose()


def build_providers(s: Settings) -> tuple[dict[str, Provider], WebPush, httpx.AsyncClient]:
    """The providers these settings allow: webhook and Web Push always, FCM and APNs when their
    credentials are given. Returns them, the Web Push provider (for its public key) and the
    HTTP client they share (to close)."""
    client = httpx.AsyncClient(http2=True, timeout=SEND_TIMEOUT_S, follow_redirects=False)
    webpush = WebPush(client, load_vapid_key(s.vapid_key_file, s.data_dir), s.vapid_subject, dev=s.dev)
    providers: dict[str, Provider] = {"webhook": Webhook(client, dev=s.dev), "webpush": webpush}
    if s.fcm_credentials_file is not None:
        providers["fcm"] = Fcm(client, s.fcm_credentials_file, s.fcm_url)
    if s.apns_key_file is not None:
        assert s.apns_key_id and s.apns_team_id and s.apns_topic  # checked by Settings.validated
        providers["apns"] = Apns(s.apns_key_file, s.apns_key_id, s.apns_team_id, s.apns_topic, s.apns_url)
    return providers, webpush, client
