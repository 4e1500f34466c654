"""The HTTP edge: ``/v1`` JSON routes, ``/healthz``, ``/metrics`` and local media blobs.

Routes parse and validate, call a handler, publish what it returns, and answer. Every error
is ``{"error": {"code", "message"}}`` with the protocol's code and the fitting status. Each
route declares its request body, query parameters, answer and error statuses with the models
of ``bridge.http_models``, so ``/openapi.json`` describes all of them; what a route returns is
checked against its answer's model.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from storage.base import Chat, StoreOps
from storage.media_local import LocalMediaStore, SignatureError, UploadTooLarge

from .accounts import PHONE_PATTERN, Accounts
from .admission import Admission
from .clock import Clock
from .errors import BadRequest, Forbidden, NotFound, ProtocolError, RateLimited, TooLarge, Unauthorized
from .handling import Caller
from .http_models import (
    AddMemberRequest,
    ChatsReply,
    ChatView,
    CodeReply,
    CodeRequest,
    DevicesReply,
    DirectChatRequest,
    GroupChatRequest,
    HealthReply,
    HistoryReply,
    LoginReply,
    MediaUrlReply,
    MemberRemovedReply,
    MeReply,
    PresenceReply,
    PushClearedReply,
    PushReply,
    PushRequest,
    ReadyReply,
    ReceiptsReply,
    RefreshReply,
    RenameRequest,
    SendRequest,
    SentReply,
    UnlinkedReply,
    UploadReply,
    UploadRequest,
    UserCard,
    UserIdReply,
    VapidReply,
    VerifyRequest,
    errors,
)
from .media import Media
from .messaging import Messenger
from .metrics import Metrics
from .outbox import Out
from .presence import PresenceTracker
from .protocol import MediaUpload, Send, Sent, request_id
from .push import PushTargets

log = logging.getLogger(__name__)
Publish = Callable[[Sequence[Out]], Awaitable[None]]


@dataclass(slots=True)
class Endpoints:
    """Where devices reach the broker and the HTTP API, filled in once the listeners are bound:
    what login names. With ``mqtt_tls`` the ports are the TLS listeners' (mqtts, wss)."""

    host: str = "127.0.0.1"
    mqtt_port: int = 0
    ws_port: int = 0
    ws_url: str | None = None  # an external broker's WebSocket URL, when it has one
    mqtt_tls: bool = False
    http_url: str | None = None  # the HTTP base devices use

    def websocket(self) -> str | None:
        if self.ws_url is not None or not self.ws_port:
            return self.ws_url
        return f"{'wss' if self.mqtt_tls else 'ws'}://{self.host}:{self.ws_port}/mqtt"

    def mqtt_url(self) -> str:
        return f"{'mqtts' if self.mqtt_tls else 'mqtt'}://{self.host}:{self.mqtt_port}"


@dataclass(slots=True)
class HttpDeps:
    accounts: Accounts
    messenger: Messenger
    presence: PresenceTracker
    media: Media
    blobs: LocalMediaStore | None
    metrics: Metrics
    clock: Clock
    publish: Publish
    endpoints: Endpoints
    dev: bool
    max_payload: int
    ready: asyncio.Event
    connected: Callable[[], Awaitable[int]]
    store_ops: Callable[[], StoreOps]  # what the store has asked of its database so far
    partitions_held: Callable[[], int] = lambda: 0  # store partitions this process holds
    push: PushTargets | None = None  # always given by the server; optional for tests of other routes
    push_depth: Callable[[], Awaitable[int]] | None = None  # wakes waiting in the push queue
    web_root: Path | None = None  # the web client's static files, served at / when given
    admission: Admission | None = None  # past its limit, sends are refused with 429 as over MQTT


def _error(exc: ProtocolError) -> JSONResponse:
    body: dict[str, Any] = {"error": {"code": exc.code, "message": exc.message}}
    headers = {}
    if isinstance(exc, RateLimited):
        body["error"]["retry_after_ms"] = exc.retry_after_ms
        headers["Retry-After"] = str(max(1, exc.retry_after_ms // 1000))
    return JSONResponse(body, status_code=exc.http_status, headers=headers)


async def _json(request: Request, max_bytes: int) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > max_bytes:
        raise TooLarge(f"body is larger than {max_bytes} bytes")
    try:
        data = json.loads(raw or b"{}")
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadRequest("body is not JSON") from exc
    except RecursionError as exc:  # arrays or objects within each other past the parser's depth
        raise BadRequest("body is nested too deeply") from exc
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    return data


def _int_param(request: Request, name: str, default: int | None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise BadRequest(f"'{name}' must be an integer") from exc


# -- the OpenAPI document's request bodies and query parameters ------------------------------------------
_REQUEST_MODELS: list[type[BaseModel]] = []


def _ref(model: type[BaseModel]) -> dict[str, str]:
    if model not in _REQUEST_MODELS:
        _REQUEST_MODELS.append(model)
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _body(*models: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a JSON body of one of ``models`` (the route reads it itself)."""
    schema: dict[str, Any] = _ref(models[0]) if len(models) == 1 else {"oneOf": [_ref(m) for m in models]}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _query(*params: tuple[str, dict[str, Any], bool]) -> dict[str, Any]:
    """``openapi_extra`` for query parameters ``(name, schema, required)`` (the route reads them itself)."""
    return {"parameters": [{"name": n, "in": "query", "required": req, "schema": schema} for n, schema, req in params]}


def _document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document: the routes', plus the request models, without the 422 answers
    FastAPI assumes (a malformed request is answered 400 here)."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in _REQUEST_MODELS:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        for item in doc["paths"].values():
            for op in item.values():
                op["responses"].pop("422", None)
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        app.openapi_schema = doc
    return app.openapi_schema


# a signed URL's query (bridge.media): what it is for, until when (ms), how many bytes, signature
_BLOB_QUERY = (("op", {"type": "string", "enum": ["put", "get"]}, True), ("exp", {"type": "integer"}, True),
               ("max", {"type": "integer"}, True), ("sig", {"type": "string"}, True))
_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
JSON_REPLY: dict[str, Any] = {"response_model_exclude_unset": True}  # optional fields absent stay absent


def _chat_json(chat: Chat) -> dict[str, Any]:
    return {
        "chat": chat.chat_id, "kind": chat.kind, "title": chat.title,
        "members": chat.member_ids, "admins": [m.user_id for m in chat.members if m.role == "admin"],
        "last_seq": chat.last_seq,
    }


def create_app(deps: HttpDeps) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        deps.ready.set()
        yield

    app = FastAPI(title="Pigeon", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.openapi = lambda: _document(app)  # type: ignore[method-assign]
    acc, msgr, m = deps.accounts, deps.messenger, deps.media

    @app.exception_handler(ProtocolError)
    async def on_protocol_error(_request: Request, exc: ProtocolError) -> JSONResponse:
        deps.metrics.errors.labels(exc.code, "http").inc()
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(BadRequest("malformed request"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _error(NotFound("no such route"))
        if exc.status_code == 405:
            return JSONResponse({"error": {"code": "bad_request", "message": "method not allowed"}}, 405)
        return JSONResponse({"error": {"code": "bad_request", "message": str(exc.detail)}}, exc.status_code)

    def push() -> PushTargets:
        if deps.push is None:
            raise NotFound("push is not configured on this server")
        return deps.push

    async def caller(request: Request) -> Caller:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing bearer token")
        return await acc.authenticate(token.strip())

    # -- auth ------------------------------------------------------------------------------------
    @app.post("/v1/auth/code", status_code=202, response_model=CodeReply, **JSON_REPLY,
              responses=errors(400, 413, 429), openapi_extra=_body(CodeRequest))
    async def auth_code(request: Request) -> dict[str, Any]:
        body = await _json(request, deps.max_payload)
        code = await acc.request_code(body.get("phone"))  # type: ignore[arg-type]
        reply: dict[str, Any] = {"status": "sent"}
        if deps.dev:
            reply["dev_code"] = code
        return reply

    @app.post("/v1/auth/verify", response_model=LoginReply, responses=errors(400, 401, 413, 429),
              openapi_extra=_body(VerifyRequest))
    async def auth_verify(request: Request) -> dict[str, Any]:
        body = await _json(request, deps.max_payload)
        name, platform = body.get("device_name"), body.get("platform")
        if not isinstance(name, str | None) or not isinstance(platform, str | None) \
                or len(name or "") > 64 or len(platform or "") > 32:
            raise BadRequest("'device_name' and 'platform' must be short strings")
        name, platform = name or "device", platform or "unknown"
        proto = body.get("proto")
        login = await acc.verify(body.get("phone"), body.get("code"), name, platform,  # type: ignore[arg-type]
                                 1 if proto is None else proto)
        ep = deps.endpoints
        return {
            "user_id": login.user.user_id, "device_id": login.device.device_id, "token": login.token,
            "expires_at": login.expires_at, "proto": login.device.proto,
            "http_url": ep.http_url,
            "mqtt": {"host": ep.host, "port": ep.mqtt_port, "ws_url": ep.websocket(), "url": ep.mqtt_url(),
                     "tls": ep.mqtt_tls},
        }

    @app.post("/v1/auth/refresh", response_model=RefreshReply, responses=errors(401))
    async def auth_refresh(request: Request) -> dict[str, Any]:
        c = await caller(request)
        token, expires = await acc.refresh(c)
        return {"user_id": c.user_id, "device_id": c.device_id, "token": token, "expires_at": expires}

    # -- me, users, devices ------------------------------------------------------------------------
    @app.get("/v1/me", response_model=MeReply, responses=errors(401))
    async def me(request: Request) -> dict[str, Any]:
        c = await caller(request)
        user = await acc.me(c)
        return {"user_id": user.user_id, "phone": user.phone, "name": user.name, "device_id": c.device_id}

    @app.patch("/v1/me", response_model=MeReply, responses=errors(400, 401, 413), openapi_extra=_body(RenameRequest))
    async def patch_me(request: Request) -> dict[str, Any]:
        c = await caller(request)
        body = await _json(request, deps.max_payload)
        user = await acc.rename(c, body.get("name"))
        return {"user_id": user.user_id, "phone": user.phone, "name": user.name, "device_id": c.device_id}

    @app.get("/v1/users", response_model=UserIdReply, responses=errors(400, 401, 404),
             openapi_extra=_query(("phone", {"type": "string", "pattern": PHONE_PATTERN}, True)))
    async def find_user(request: Request) -> dict[str, Any]:
        await caller(request)
        phone = request.query_params.get("phone", "")
        user = await acc.find(phone)
        return {"user_id": user.user_id}

    @app.get("/v1/users/{user_id}", response_model=UserCard, responses=errors(401, 403, 404))
    async def user_card(user_id: str, request: Request) -> dict[str, Any]:
        c = await caller(request)
        if user_id != c.user_id and not await msgr.share_chat(c.user_id, user_id):
            raise Forbidden("you share no chat with that user")
        user = await acc.user(user_id)
        return {"user_id": user.user_id, "phone": user.phone, "name": user.name}

    @app.get("/v1/users/{user_id}/presence", response_model=PresenceReply, responses=errors(401, 403, 404))
    async def user_presence(user_id: str, request: Request) -> dict[str, Any]:
        c = await caller(request)
        if user_id != c.user_id and not await msgr.share_chat(c.user_id, user_id):
            raise Forbidden("you share no chat with that user")
        online = await deps.presence.is_online(user_id)
        return {"user": user_id, "online": online, "last_seen": await deps.presence.last_seen(user_id)}

    @app.delete("/v1/devices/{device_id}", response_model=UnlinkedReply, responses=errors(401, 403, 404))
    async def unlink_device(device_id: str, request: Request) -> dict[str, Any]:
        c = await caller(request)
        await acc.unlink(c, device_id)
        return {"device_id": device_id, "unlinked": True}

    @app.get("/v1/devices", response_model=DevicesReply, responses=errors(401, 404))
    async def list_devices(request: Request) -> dict[str, Any]:
        c = await caller(request)
        devices = await push().devices(c)
        return {"devices": [
            {"device_id": d.device_id, "name": d.name, "platform": d.platform, "push": d.push_provider,
             "proto": d.proto,
             # the calling device is being seen now; others' times are not kept per device
             "last_seen": deps.clock.now_ms() if d.device_id == c.device_id else None}
            for d in devices
        ]}

    @app.put("/v1/devices/{device_id}/push", response_model=PushReply, responses=errors(400, 401, 403, 404, 413),
             openapi_extra=_body(PushRequest))
    async def set_push(device_id: str, request: Request) -> dict[str, Any]:
        c = await caller(request)
        body = await _json(request, deps.max_payload)
        d = await push().set(c, device_id, body.get("provider"), body.get("token"))
        return {"device_id": d.device_id, "provider": d.push_provider}

    @app.delete("/v1/devices/{device_id}/push", response_model=PushClearedReply, responses=errors(401, 403, 404))
    async def clear_push(device_id: str, request: Request) -> dict[str, Any]:
        c = await caller(request)
        removed = await push().clear(c, device_id)
        return {"device_id": device_id, "provider": None, "removed": removed}

    @app.get("/v1/push/vapid", response_model=VapidReply, responses=errors(401, 404))
    async def vapid_key(request: Request) -> dict[str, Any]:
        await caller(request)
        return {"public_key": push().vapid_public_key}

    # -- chats ---------------------------------------------------------------------------------------
    @app.get("/v1/chats", response_model=ChatsReply, responses=errors(401))
    async def list_chats(request: Request) -> dict[str, Any]:
        c = await caller(request)
        return {"chats": [_chat_json(ch) for ch in await msgr.chats(c)]}

    @app.post("/v1/chats", response_model=ChatView,
              responses={201: {"model": ChatView, "description": "a group, created"},
                         **errors(400, 401, 403, 404, 409, 413)},
              openapi_extra=_body(DirectChatRequest, GroupChatRequest))
    async def create_chat(request: Request, response: Response) -> dict[str, Any]:
        c = await caller(request)
        body = await _json(request, deps.max_payload)
        kind = body.get("kind")
        if kind == "direct":
            peer = body.get("peer")
            if not isinstance(peer, str) or not peer:
                raise BadRequest("'peer' must be a user id")
            chat = await msgr.open_direct(c, peer)
            return _chat_json(chat)  # 200: the direct chat, new or the one already there
        if kind == "group":
            title, members = body.get("title"), body.get("members", [])
            if not isinstance(title, str) or len(title) > 128 or not title.strip():
                raise BadRequest("'title' must be 1 to 128 characters")
            if not isinstance(members, list) or not all(isinstance(u, str) and u for u in members):
                raise BadRequest("'members' must be a list of user ids")
            chat, outs = await msgr.create_group(c, title.strip(), members)
            await deps.publish(outs)
            response.status_code = 201
            return _chat_json(chat)
        raise BadRequest("'kind' must be 'direct' or 'group'")

    @app.get("/v1/chats/{chat_id}", response_model=ChatView, responses=errors(401, 403, 404))
    async def get_chat(chat_id: str, request: Request) -> dict[str, Any]:
        c = await caller(request)
        return _chat_json(await msgr.get_chat(c, chat_id))

    @app.get("/v1/chats/{chat_id}/messages", response_model=HistoryReply, **JSON_REPLY,
             responses=errors(400, 401, 403, 404),
             openapi_extra=_query(("before", {"type": "integer", "minimum": 1}, False),
                                  ("limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50}, False)))
    async def history(chat_id: str, request: Request) -> dict[str, Any]:
        c = await caller(request)
        before = _int_param(request, "before", None)
        limit = _int_param(request, "limit", 50)
        assert limit is not None
        msgs, next_before = await msgr.history(c, chat_id, before, limit)
        return {"messages": [x.to_json() for x in msgs], "next_before": next_before}

    @app.post("/v1/chats/{chat_id}/messages", response_model=SentReply,
              responses=errors(400, 401, 403, 404, 413, 429),
              openapi_extra=_body(SendRequest))
    async def post_message(chat_id: str, request: Request) -> dict[str, Any]:
        c = await caller(request)
        body = await _json(request, deps.max_payload)
        fields = {k: v for k, v in body.items() if k not in ("to", "chat")}
        req = Send.from_json({**fields, "chat": chat_id}, request_id(body))
        if deps.admission is not None:
            deps.admission.check_http()
        result = await msgr.send(c, req)
        await deps.publish(result.outs)
        sent = result.reply
        assert isinstance(sent, Sent)
        return {"type": "sent", "id": sent.id, "chat": sent.chat, "seq": sent.seq, "ts": sent.ts}

    @app.post("/v1/chats/{chat_id}/members", response_model=ChatView,
              responses=errors(400, 401, 403, 404, 409, 413), openapi_extra=_body(AddMemberRequest))
    async def add_member(chat_id: str, request: Request) -> dict[str, Any]:
        c = await caller(request)
        body = await _json(request, deps.max_payload)
        uid = body.get("user_id")
        if not isinstance(uid, str) or not uid:
            raise BadRequest("'user_id' must be a user id")
        chat, outs = await msgr.add_member(c, chat_id, uid)
        await deps.publish(outs)
        return _chat_json(chat)

    @app.delete("/v1/chats/{chat_id}/members/{user_id}", response_model=MemberRemovedReply,
                responses=errors(400, 401, 403, 404))
    async def remove_member(chat_id: str, user_id: str, request: Request) -> dict[str, Any]:
        c = await caller(request)
        outs = await msgr.remove_member(c, chat_id, user_id)
        await deps.publish(outs)
        return {"chat": chat_id, "removed": user_id}

    @app.get("/v1/chats/{chat_id}/receipts", response_model=ReceiptsReply, responses=errors(401, 403, 404))
    async def receipts(chat_id: str, request: Request) -> dict[str, Any]:
        c = await caller(request)
        return {"receipts": [{"user": r.user_id, "delivered": r.delivered, "read": r.read}
                             for r in await msgr.receipts(c, chat_id)]}

    # -- media -----------------------------------------------------------------------------------------
    @app.post("/v1/media/uploads", response_model=UploadReply, **JSON_REPLY,
              responses=errors(400, 401, 409, 413), openapi_extra=_body(UploadRequest))
    async def media_upload(request: Request) -> dict[str, Any]:
        c = await caller(request)
        body = await _json(request, deps.max_payload)
        req = MediaUpload.from_json(body, "http")
        reply = await m.upload(c, "http", req.sha256, req.size, req.mime)
        out: dict[str, Any] = {"key": reply.key, "exists": reply.exists}
        if reply.upload is not None:
            out["upload"] = reply.upload.to_json()
        return out

    @app.post("/v1/media/{key}/done", response_model=ReadyReply, responses=errors(400, 401, 403, 404))
    async def media_done(key: str, request: Request) -> dict[str, Any]:
        c = await caller(request)
        await m.done(c, "http", key)
        return {"key": key, "ready": True}

    @app.get("/v1/media/{key}", response_model=MediaUrlReply, responses=errors(400, 401, 403, 404),
             openapi_extra=_query(("chat", {"type": "string", "minLength": 1}, True)))
    async def media_url(key: str, request: Request) -> dict[str, Any]:
        c = await caller(request)
        chat = request.query_params.get("chat")
        if not chat:
            raise BadRequest("'chat' is required")
        reply = await m.url(c, "http", key, chat)
        return {"key": reply.key, "url": reply.url, "expires": reply.expires}

    # -- local blobs (file:// media only) --------------------------------------------------------------
    def _check_blob(request: Request, key: str, op: str) -> int:
        if deps.blobs is None:
            raise NotFound("no such route")
        q = request.query_params
        try:
            exp, limit = int(q.get("exp", "")), int(q.get("max", ""))
        except ValueError as exc:
            raise Forbidden("malformed signed URL") from exc
        if q.get("op") != op:
            raise Forbidden("this URL is not for that operation")
        try:
            deps.blobs.check_signature(op, key, exp, limit, q.get("sig", ""), deps.clock.now_ms())
        except SignatureError as exc:
            raise Forbidden(f"signed URL refused: {exc}") from exc
        return limit

    @app.put("/v1/blobs/{key}", response_class=Response,
             responses={200: {"description": "stored", "content": {}}, **errors(403, 404, 413)},
             openapi_extra={**_query(*_BLOB_QUERY),
                            "requestBody": {"required": True, "content": _BINARY}})
    async def put_blob(key: str, request: Request) -> Response:
        limit = _check_blob(request, key, "put")
        assert deps.blobs is not None
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise TooLarge(f"this upload may be at most {limit} bytes")
        try:
            await deps.blobs.write(key, request.stream(), min(limit, m.max_bytes))
        except UploadTooLarge as exc:
            raise TooLarge(str(exc)) from exc
        return Response(status_code=200)

    @app.get("/v1/blobs/{key}", response_class=Response,
             responses={200: {"description": "the object's bytes, with its content type",
                              "content": _BINARY},
                        **errors(403, 404)},
             openapi_extra=_query(*_BLOB_QUERY))
    async def get_blob(key: str, request: Request) -> Response:
        _check_blob(request, key, "get")
        assert deps.blobs is not None
        path = deps.blobs.path_for(key)
        if not path.exists():
            raise NotFound("no such object")
        return FileResponse(path, media_type=await m.mime(key))

    # -- health and metrics ----------------------------------------------------------------------------
    @app.get("/healthz", response_model=HealthReply,
             responses={503: {"model": HealthReply, "description": "still starting"}})
    async def healthz() -> JSONResponse:
        if not deps.ready.is_set():
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=Response,
             responses={200: {"description": "Prometheus text format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        deps.metrics.connected.set(await deps.connected())
        deps.metrics.online.set(await deps.presence.online_devices())
        deps.metrics.store_ops.update(deps.store_ops())
        deps.metrics.partitions.set(deps.partitions_held())
        if deps.push_depth is not None:
            deps.metrics.push_queue.set(await deps.push_depth())
        return Response(deps.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- the web client (last: every route above takes precedence) ------------------------------------
    if deps.web_root is not None:
        app.mount("/", StaticFiles(directory=deps.web_root, html=True), name="web")

    return app
