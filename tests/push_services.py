"""Loopback stand-ins for the push services, each speaking its provider's real wire protocol.

They run on 127.0.0.1 in a thread of their own (so module-scoped fixtures and any test's event
loop can share them), check every request the way the real service would (signatures, tokens,
headers, encryption) and record what was pushed. A check that fails is answered with the
service's own error status and noted in ``errors``; tests assert there were none. Answers can be
scripted per target (``script``) to play a service that is down, throttling or has dropped a
subscription.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import uvicorn
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Pushed:
    """One push a service accepted (or answered with a scripted status)."""

    target: str
    body: dict[str, Any]
    headers: dict[str, str]
    status: int
    at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Drip:
    """A scripted body that never ends: ``chunk`` every ``every_s`` seconds until the client
    goes (a slow drip, or with a big chunk and no pause, an endless flood)."""

    chunk: bytes
    every_s: float

    async def stream(self) -> AsyncIterator[bytes]:
        while True:
            yield self.chunk
            await asyncio.sleep(self.every_s)


Reply = tuple[int, dict[str, str], "bytes | Drip"]


class Recorder:
    """What a service received, read from any thread; scripted answers per target."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pushed: list[Pushed] = []
        self.errors: list[str] = []
        self._script: dict[str, list[Reply]] = {}

    def script(self, target: str, *replies: Reply) -> None:
        """Answer the next pushes to ``target`` with these, in order (then accept again)."""
        with self._lock:
            self._script.setdefault(target, []).extend(replies)

    def _next_reply(self, target: str) -> Reply | None:
        with self._lock:
            queue = self._script.get(target)
            return queue.pop(0) if queue else None

    def _record(self, p: Pushed) -> None:
        with self._lock:
            self._pushed.append(p)

    def _error(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)

    def pushed(self, target: str | None = None, *, accepted_only: bool = False) -> list[Pushed]:
        with self._lock:
            return [p for p in self._pushed if (target is None or p.target == target)
                    and (not accepted_only or 200 <= p.status < 300)]

    async def wait(self, target: str, count: int, timeout: float = 10.0, *,
                   accepted_only: bool = False) -> list[Pushed]:
        """Wait until ``count`` pushes reached ``target``; return them."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.pushed(target, accepted_only=accepted_only)
            if len(got) >= count:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(got)} pushes reached {target} in {timeout} s, expected {count}; "
                                     f"errors: {self.errors}")
            await asyncio.sleep(0.05)


def _verify_es256(public: ec.EllipticCurvePublicKey, jwt: str) -> tuple[dict[str, Any], dict[str, Any]]:
    head, body, sig = jwt.split(".")
    raw = b64d(sig)
    if len(raw) != 64:
        raise ValueError("an ES256 signature is 64 bytes (r || s)")
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    public.verify(der, f"{head}.{body}".encode(), ec.ECDSA(hashes.SHA256()))
    return json.loads(b64d(head)), json.loads(b64d(body))


class _Http:
    """An ASGI app served by uvicorn on a free loopback port, in the services' thread."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.server: uvicorn.Server | None = None

    def app(self) -> Starlette:
        raise NotImplementedError

    async def serve(self) -> None:
        config = uvicorn.Config(self.app(), log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        await self.server.serve(sockets=[self.sock])


class WebPushService(_Http):
    """A loopback stand-in for a Web Push service (RFC 8030) speaking the real wire protocol: it
    hands out subscriptions with their own P-256 keys and auth secrets, checks each push's VAPID
    ``Authorization: vapid t=JWT, k=KEY`` (RFC 8292: ES256 signature, ``aud`` the endpoint's
    origin, ``exp`` within 24 h, a ``sub``), the ``TTL``, ``Urgency`` and ``Topic`` headers, and
    decrypts the ``aes128gcm`` body (RFC 8291/8188) with the subscription's private key. Answers
    201 Created, or what was scripted (e.g. 410 Gone)."""

    def __init__(self) -> None:
        super().__init__()
        self.recorder = Recorder()
        self._subs: dict[str, tuple[ec.EllipticCurvePrivateKey, bytes]] = {}

    def subscription(self) -> dict[str, Any]:
        """A new subscription, as a browser's ``PushSubscription.toJSON()`` gives it."""
        sid = uuid.uuid4().hex
        key = ec.generate_private_key(ec.SECP256R1())
        auth = os.urandom(16)
        self._subs[sid] = (key, auth)
        public = key.public_key().public_bytes(serialization.Encoding.X962,
                                               serialization.PublicFormat.UncompressedPoint)
        return {"endpoint": f"{self.base}/push/{sid}", "keys": {"p256dh": b64e(public), "auth": b64e(auth)}}

    @staticmethod
    def target(sub: dict[str, Any]) -> str:
        return str(sub["endpoint"]).rsplit("/", 1)[-1]

    def _decrypt(self, sid: str, body: bytes) -> bytes:
        key, auth = self._subs[sid]
        salt, rs, idlen = body[:16], int.from_bytes(body[16:20], "big"), body[20]
        sender = body[21:21 + idlen]
        ciphertext = body[21 + idlen:]
        if idlen != 65 or len(ciphertext) > rs:
            raise ValueError("expected the sender's 65-byte key as keyid and one record")
        ua_public = key.public_key().public_bytes(serialization.Encoding.X962,
                                                  serialization.PublicFormat.UncompressedPoint)
        shared = key.exchange(ec.ECDH(), ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), sender))
        ikm = HKDF(hashes.SHA256(), 32, auth, b"WebPush: info\x00" + ua_public + sender).derive(shared)
        cek = HKDF(hashes.SHA256(), 16, salt, b"Content-Encoding: aes128gcm\x00").derive(ikm)
        nonce = HKDF(hashes.SHA256(), 12, salt, b"Content-Encoding: nonce\x00").derive(ikm)
        plain = AESGCM(cek).decrypt(nonce, ciphertext, None).rstrip(b"\x00")
        if not plain.endswith(b"\x02"):
            raise ValueError("the last record must end with the 0x02 delimiter")
        return plain[:-1]

    def _check_vapid(self, request: Request) -> str:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("vapid "):
            raise ValueError("no 'Authorization: vapid' header")
        params = dict(part.strip().split("=", 1) for part in auth[6:].split(","))
        public_raw = b64d(params["k"])
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public_raw)
        header, claims = _verify_es256(public, params["t"])
        if header.get("alg") != "ES256":
            raise ValueError(f"VAPID JWT alg is {header.get('alg')}")
        if claims.get("aud") != self.base:
            raise ValueError(f"VAPID aud {claims.get('aud')!r} is not the endpoint's origin {self.base}")
        exp = int(claims.get("exp", 0))
        if not time.time() < exp <= time.time() + 86400:
            raise ValueError("VAPID exp must be in the future and within 24 h")
        if not str(claims.get("sub", "")).startswith(("mailto:", "https:")):
            raise ValueError("VAPID sub must be a mailto: or https: URL")
        return b64e(public_raw)

    def app(self) -> Starlette:
        async def push(request: Request) -> Response:
            sid = request.path_params["sid"]
            if sid not in self._subs:
                return Response(status_code=404)
            body = await request.body()
            try:
                vapid_key = self._check_vapid(request)
                if request.headers.get("content-encoding") != "aes128gcm":
                    raise ValueError("Content-Encoding must be aes128gcm")
                for h in ("ttl", "urgency", "topic"):
                    if h not in request.headers:
                        raise ValueError(f"missing {h} header")
                payload = json.loads(self._decrypt(sid, body))
            except (ValueError, KeyError, InvalidSignature) as exc:
                self.recorder._error(f"webpush {sid}: {type(exc).__name__}: {exc}")  # noqa: SLF001
                return Response(status_code=400)
            headers = {k: request.headers[k] for k in ("ttl", "urgency", "topic")} | {"vapid-key": vapid_key}
            status, extra, reply = self.recorder._next_reply(sid) or (201, {}, b"")  # noqa: SLF001
            self.recorder._record(Pushed(sid, payload, headers, status))  # noqa: SLF001
            if status == 201:
                extra = {"location": f"{self.base}/message/{uuid.uuid4().hex}", **extra}
            return Response(reply, status_code=status, headers=extra)

        return Starlette(routes=[Route("/push/{sid}", push, methods=["POST"])])


class FcmService(_Http):
    """A loopback stand-in for Firebase Cloud Messaging speaking the real wire protocol: Google's
    OAuth2 token endpoint (``POST /token``, the JWT bearer grant of RFC 7523 signed RS256 by the
    service account's key, checked against its public key) and the HTTP v1 API
    (``POST /v1/projects/PROJECT/messages:send`` with ``Authorization: Bearer`` an access token
    it issued). It writes the service account file a server is given. Answers 200 with the
    message name, or what was scripted per registration token (404 UNREGISTERED, 503 ...)."""

    PROJECT = "pigeon-test"

    def __init__(self) -> None:
        super().__init__()
        self.recorder = Recorder()
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.email = "pigeon-push@pigeon-test.iam.gserviceaccount.com"
        self.tokens_issued = 0
        self._access: set[str] = set()

    @staticmethod
    def error(code: int, status: str, error_code: str | None = None) -> Reply:
        """An FCM v1 error answer to script: ``error(404, "NOT_FOUND", "UNREGISTERED")`` is a dead
        registration token; ``error(404, "NOT_FOUND")`` what a wrong project gets."""
        details = [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": error_code}]
        body = {"error": {"code": code, "status": status, **({"details": details} if error_code else {})}}
        return code, {}, json.dumps(body).encode()

    def credentials(self) -> dict[str, Any]:
        pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()).decode()
        return {"type": "service_account", "project_id": self.PROJECT, "private_key_id": "k1", "private_key": pem,
                "client_email": self.email, "token_uri": f"{self.base}/token"}

    def app(self) -> Starlette:
        async def token(request: Request) -> Response:
            form = parse_qs((await request.body()).decode())
            try:
                if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"]:
                    raise ValueError(f"grant_type {form.get('grant_type')}")
                head, body, sig = form["assertion"][0].split(".")
                self._key.public_key().verify(b64d(sig), f"{head}.{body}".encode(), padding.PKCS1v15(),
                                              hashes.SHA256())
                header, claims = json.loads(b64d(head)), json.loads(b64d(body))
                if header.get("alg") != "RS256" or claims.get("iss") != self.email:
                    raise ValueError("alg must be RS256 and iss the service account")
                if claims.get("aud") != f"{self.base}/token" or "firebase.messaging" not in claims.get("scope", ""):
                    raise ValueError("aud must be the token endpoint and scope firebase.messaging")
                if not claims["iat"] - 60 <= time.time() < claims["exp"] <= claims["iat"] + 3600:
                    raise ValueError("iat/exp out of range")
            except (ValueError, KeyError, InvalidSignature) as exc:
                self.recorder._error(f"fcm token: {type(exc).__name__}: {exc}")  # noqa: SLF001
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
            access = "ya29." + secrets.token_urlsafe(24)
            self._access.add(access)
            self.tokens_issued += 1
            return JSONResponse({"access_token": access, "expires_in": 3599, "token_type": "Bearer"})

        async def send(request: Request) -> Response:
            auth = request.headers.get("authorization", "")
            if request.path_params["project"] != self.PROJECT:
                return JSONResponse({"error": {"code": 404, "status": "NOT_FOUND"}}, status_code=404)
            if not auth.startswith("Bearer ") or auth[7:] not in self._access:
                self.recorder._error("fcm send without a valid access token")  # noqa: SLF001
                return JSONResponse({"error": {"code": 401, "status": "UNAUTHENTICATED"}}, status_code=401)
            message = (await request.json()).get("message", {})
            target = message.get("token", "")
            data = message.get("data", {})
            if not target or not all(isinstance(v, str) for v in data.values()):
                self.recorder._error(f"fcm message malformed: {message}")  # noqa: SLF001
                return JSONResponse({"error": {"code": 400, "status": "INVALID_ARGUMENT"}}, status_code=400)
            status, extra, reply = self.recorder._next_reply(target) or (200, {}, b"")  # noqa: SLF001
            self.recorder._record(Pushed(target, data, {"priority": message.get("android", {}).get("priority", "")},  # noqa: SLF001
                                         status))
            if status == 200:
                reply = json.dumps({"name": f"projects/{self.PROJECT}/messages/{uuid.uuid4().int}"}).encode()
            return Response(reply, status_code=status, headers={"content-type": "application/json", **extra})

        return Starlette(routes=[Route("/token", token, methods=["POST"]),
                                 Route("/v1/projects/{project}/messages:send", send, methods=["POST"])])


class WebhookReceiver(_Http):
    """A loopback webhook receiver: the plain JSON POST a ``webhook`` target gets. Answers 200, or
    what was scripted per path (a :class:`Drip` body is streamed until the client goes)."""

    def __init__(self) -> None:
        super().__init__()
        self.recorder = Recorder()

    def url(self, name: str) -> str:
        return f"{self.base}/hook/{name}"

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            name = request.path_params["name"]
            try:
                body = await request.json()
            except ValueError:
                self.recorder._error(f"webhook {name}: body is not JSON")  # noqa: SLF001
                return Response(status_code=400)
            status, extra, reply = self.recorder._next_reply(name) or (200, {}, b"")  # noqa: SLF001
            self.recorder._record(Pushed(name, body, {"content-type": request.headers.get("content-type", "")},  # noqa: SLF001
                                         status))
            if isinstance(reply, Drip):
                return StreamingResponse(reply.stream(), status_code=status, headers=extra)
            return Response(reply, status_code=status, headers=extra)

        return Starlette(routes=[Route("/hook/{name}", hook, methods=["POST"])])


class ApnsService:
    """A loopback stand-in for the Apple Push Notification service speaking its real wire
    protocol: HTTP/2 only (cleartext with prior knowledge here, where Apple uses TLS), ``POST
    /3/device/TOKEN`` with ``authorization: bearer JWT`` (ES256, signed by the team's .p8 key, with
    ``kid`` the key id and ``iss`` the team id, checked against the key's public half),
    ``apns-topic`` the app's bundle id, ``apns-push-type`` and an ``aps`` dictionary in the JSON
    body. Answers 200 with an ``apns-id``, or what was scripted per device token (410
    ``Unregistered`` ...), with Apple's ``{"reason": ...}`` bodies."""

    KEY_ID = "ABC123DEFG"
    TEAM_ID = "TEAM123456"
    TOPIC = "org.pigeon.app"

    def __init__(self) -> None:
        self.recorder = Recorder()
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self._server: asyncio.Server | None = None

    def p8(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def _answer(self, headers: dict[str, str], body: bytes) -> Reply:
        path = headers.get(":path", "")
        if headers.get(":method") != "POST" or not path.startswith("/3/device/"):
            return 404, {}, b'{"reason":"BadPath"}'
        token = path.rsplit("/", 1)[-1]
        try:
            auth = headers.get("authorization", "")
            if not auth.startswith("bearer "):
                raise ValueError("no bearer provider token")
            header, claims = _verify_es256(self.key.public_key(), auth[7:])
            if header.get("kid") != self.KEY_ID or claims.get("iss") != self.TEAM_ID:
                raise ValueError("kid must be the key id and iss the team id")
            if not time.time() - 3600 < claims["iat"] <= time.time() + 60:
                raise ValueError("provider token too old")
            if headers.get("apns-topic") != self.TOPIC:
                raise ValueError(f"apns-topic {headers.get('apns-topic')!r}")
            if headers.get("apns-push-type") not in ("alert", "background"):
                raise ValueError("apns-push-type missing")
            payload = json.loads(body)
            if not isinstance(payload.get("aps"), dict):
                raise ValueError("no aps dictionary")
            if headers["apns-push-type"] == "background":  # Apple's rules for a background update
                aps = payload["aps"]
                if aps.get("content-available") != 1 or {"alert", "sound", "badge"} & set(aps):
                    raise ValueError("a background push has content-available 1 and no alert, sound or badge")
                if headers.get("apns-priority") != "5":
                    raise ValueError("a background push must have apns-priority 5")
        except (ValueError, KeyError, InvalidSignature) as exc:
            self.recorder._error(f"apns {token}: {type(exc).__name__}: {exc}")  # noqa: SLF001
            return 403, {}, b'{"reason":"InvalidProviderToken"}'
        status, extra, reply = self.recorder._next_reply(token) or (200, {}, b"")  # noqa: SLF001
        kept = {k: v for k, v in headers.items() if k.startswith("apns-")}
        self.recorder._record(Pushed(token, payload, kept, status))  # noqa: SLF001
        return status, {"apns-id": str(uuid.uuid4()), **extra}, reply

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        streams: dict[int, tuple[dict[str, str], bytearray]] = {}
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        streams[ev.stream_id] = ({str(k): str(v) for k, v in ev.headers}, bytearray())
                    elif isinstance(ev, h2.events.DataReceived):
                        streams[ev.stream_id][1].extend(ev.data)
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded):
                        headers, body = streams.pop(ev.stream_id)
                        status, extra, reply = self._answer(headers, bytes(body))
                        out = [(":status", str(status)), *extra.items()]
                        if reply:
                            out += [("content-type", "application/json"), ("content-length", str(len(reply)))]
                        conn.send_headers(ev.stream_id, out, end_stream=not reply)
                        if reply:
                            conn.send_data(ev.stream_id, reply, end_stream=True)
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        return
                writer.write(conn.data_to_send())
                await writer.drain()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            writer.close()

    async def serve(self) -> None:
        self._server = await asyncio.start_server(self._connection, sock=self.sock)
        async with self._server:
            await self._server.serve_forever()


class PushServices:
    """Every stand-in above, served from one background thread until ``close``."""

    def __init__(self) -> None:
        self.webpush = WebPushService()
        self.fcm = FcmService()
        self.apns = ApnsService()
        self.webhook = WebhookReceiver()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="push-services", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the loopback push services did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._tasks = [asyncio.create_task(s.serve()) for s in (self.webpush, self.fcm, self.apns, self.webhook)]
            self._ready.set()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        self._loop.run_until_complete(main())

    def errors(self) -> list[str]:
        return [e for s in (self.webpush, self.fcm, self.apns, self.webhook) for e in s.recorder.errors]

    def close(self) -> None:
        def stop() -> None:
            for s in (self.webpush, self.fcm, self.webhook):
                if s.server is not None:
                    s.server.should_exit = True
            for t in self._tasks[2:3]:  # the APNs server has no exit flag
                t.cancel()

        self._loop.call_soon_threadsafe(stop)
        self._thread.join(10)

    def flags(self, tmp: Any) -> list[str]:
        """``pigeon serve`` flags that point every provider at these services."""
        creds = tmp / "fcm.json"
        creds.write_text(json.dumps(self.fcm.credentials()))
        p8 = tmp / "apns.p8"
        p8.write_bytes(self.apns.p8())
        return ["--fcm-credentials-file", str(creds), "--fcm-url", self.fcm.base,
                "--apns-key-file", str(p8), "--apns-key-id", ApnsService.KEY_ID,
                "--apns-team-id", ApnsService.TEAM_ID, "--apns-topic", ApnsService.TOPIC,
                "--apns-url", self.apns.base]

