"""The OpenAPI document describes every route's bodies and answers, and the routes keep to it.

Each mismatch the schema fuzzing of tests/test_fuzz_http.py found has a test here that
reproduced it before the fix.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from clients.launch import ServerProc
from clients.sdk import Profile, login
from tests.conftest import fresh_phone


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    s = ServerProc.start(tmp_path_factory.mktemp("http-models"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def user(srv: ServerProc) -> Profile:
    return asyncio.run(login(srv.http, fresh_phone()))


@pytest.fixture(scope="module")
def doc(srv: ServerProc) -> dict[str, Any]:
    return dict(httpx.get(f"{srv.http}/openapi.json").json())


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


BODIES = {("post", "/v1/auth/code"), ("post", "/v1/auth/verify"), ("patch", "/v1/me"),
          ("put", "/v1/devices/{device_id}/push"), ("post", "/v1/chats"), ("post", "/v1/chats/{chat_id}/messages"),
          ("post", "/v1/chats/{chat_id}/members"), ("post", "/v1/media/uploads")}


def test_every_route_documents_its_request_body_and_every_answer(doc: dict[str, Any]) -> None:
    ops = [(method, path, op) for path, item in doc["paths"].items() for method, op in item.items()]
    assert len(ops) >= 24
    for method, path, op in ops:
        where = f"{method.upper()} {path}"
        responses = op["responses"]
        assert "422" not in responses, where  # the server never answers 422: malformed is 400
        ok = [s for s in responses if s.startswith("2")]
        assert ok, where
        if path.startswith("/v1/") and not path.startswith("/v1/blobs/"):
            for status in ok:
                schema = resolve(doc, responses[status]["content"]["application/json"]["schema"])
                assert schema.get("properties"), (where, status)
            for status, answer in responses.items():
                if status[0] in "45":
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema["$ref"].endswith("/ErrorReply"), (where, status)
            assert "503" in responses, where
            if path.startswith(("/v1/auth/code", "/v1/auth/verify")):
                assert "401" not in responses or path.endswith("verify"), where
            else:
                assert "401" in responses, where  # every other /v1 route needs a token
        if (method, path) == ("put", "/v1/blobs/{key}"):
            assert "application/octet-stream" in op["requestBody"]["content"], where
        elif (method, path) in BODIES:
            body = op["requestBody"]["content"]["application/json"]["schema"]
            assert resolve(doc, body).get("properties") or "oneOf" in resolve(doc, body), where
        else:
            assert "requestBody" not in op, where
        for name in ("path", "query"):
            for p in op.get("parameters", []):
                if p["in"] == name:
                    assert "schema" in p and "type" in p["schema"], (where, p)
    errors = resolve(doc, {"$ref": "#/components/schemas/ErrorDetail"})
    assert set(errors["properties"]["code"]["enum"]) == {
        "bad_request", "unknown_type", "too_large", "unauthorized", "forbidden", "not_found", "conflict",
        "rate_limited", "unavailable"}


def test_a_phone_with_a_trailing_newline_is_refused(srv: ServerProc, user: Profile) -> None:
    """The phone check matched ``^\\+[1-9][0-9]{6,14}$`` with Python's ``$``, which also matches
    before a final newline: "+15550001111\\n" got a code of its own, as another account."""
    phone = fresh_phone()
    r = httpx.post(f"{srv.http}/v1/auth/code", json={"phone": phone + "\n"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", r.text
    r = httpx.get(f"{srv.http}/v1/users", params={"phone": user.phone + "\n"},
                  headers={"Authorization": f"Bearer {user.token}"})
    assert r.status_code == 400, r.text


def test_a_code_of_other_scripts_digits_is_malformed_not_a_wrong_guess(srv: ServerProc) -> None:
    """The code check took any Unicode digits (str.isdigit): six Arabic-Indic digits were read
    as a wrong guess (401), one of the five before the phone locks, not as a malformed code."""
    phone = fresh_phone()
    assert httpx.post(f"{srv.http}/v1/auth/code", json={"phone": phone}).status_code == 202
    for _ in range(6):
        r = httpx.post(f"{srv.http}/v1/auth/verify", json={"phone": phone, "code": "\u0661" * 6})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", r.text
    code = httpx.post(f"{srv.http}/v1/auth/code", json={"phone": phone}).json()["dev_code"]
    assert httpx.post(f"{srv.http}/v1/auth/verify", json={"phone": phone, "code": code}).status_code == 200


@pytest.mark.parametrize("value", [False, 0, [], {}])
def test_a_device_name_or_platform_of_another_type_is_refused(srv: ServerProc, value: Any) -> None:
    """The document says a string or null; the route took any falsy value (false, 0, [], {})
    as absent and logged the device in as 'device' / 'unknown'."""
    for field in ("device_name", "platform"):
        phone = fresh_phone()
        code = httpx.post(f"{srv.http}/v1/auth/code", json={"phone": phone}).json()["dev_code"]
        r = httpx.post(f"{srv.http}/v1/auth/verify", json={"phone": phone, "code": code, field: value})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request", (field, r.text)


def test_names_and_titles_are_measured_with_their_spaces(srv: ServerProc, user: Profile) -> None:
    """The document gives at most 64 characters for a name and 128 for a title; the routes
    measured them after trimming, so 70 characters with spaces around 64 were taken."""
    auth = {"Authorization": f"Bearer {user.token}"}
    r = httpx.patch(f"{srv.http}/v1/me", json={"name": "   " + "n" * 64 + "   "}, headers=auth)
    assert r.status_code == 400, r.text
    r = httpx.post(f"{srv.http}/v1/chats", json={"kind": "group", "title": "  " + "t" * 128, "members": []},
                   headers=auth)
    assert r.status_code == 400, r.text
    # within the bounds, the spaces are still trimmed
    r = httpx.patch(f"{srv.http}/v1/me", json={"name": " Ann "}, headers=auth)
    assert r.status_code == 200 and r.json()["name"] == "Ann"
