"""Fuzzing the HTTP API with Schemathesis, from the OpenAPI document the server itself serves.

Every operation is called with generated requests (valid by the schema, and negative ones that
break it), authenticated as a real user (its token, so the routes answer past 401): no answer
may be a 5xx; every answer's status must be one the document lists for that operation, with the
documented content type and a body matching the documented schema (errors included); and a
request that breaks the documented schema must be refused with a 4xx.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.errors import FailedHealthCheck, Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from clients.launch import ServerProc
from clients.sdk import Profile, login
from tests.conftest import fresh_phone
from tests.fuzz import TIMEOUT_S, examples, wrong_values


def _load_schemathesis_now() -> None:
    """Have Schemathesis import what it imports on first use, while this module is collected.
    pytest rewrites a plugin's modules as they are imported, with ``ast.parse``; on CPython
    3.11.2 (Debian's) that once failed in the middle of a fresh-clone run with "SystemError: AST
    constructor recursion depth mismatch", a fault of CPython 3.11's AST recursion counting
    (python/cpython#106905) seen only now and then. Done at collection, before any test has run
    and any server thread is up, the imports do not happen in the middle of the run."""
    tiny = schemathesis.openapi.from_dict({"openapi": "3.0.0", "info": {"title": "warm-up", "version": "1"},
                                           "paths": {"/x": {"get": {"responses": {"200": {"description": "ok"}}}}}})
    for found in tiny.get_all_operations():
        found.ok().as_strategy()


_load_schemathesis_now()


@pytest.fixture(scope="module")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = ServerProc.start(tmp_path_factory.mktemp("fuzz-http"), "--rate", "100000", "--burst", "100000")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http_user(http_server: ServerProc) -> Profile:
    return asyncio.run(login(http_server.http, fresh_phone()))


# a refusal of a request that breaks the document: Schemathesis' list, and 413 (too large)
REFUSED = [400, 401, 403, 404, 405, 409, 413, 429]


CODE_CHECKED = {"POST /v1/auth/verify"}  # answers 401 to a wrong login code, whatever the token


def operations(base: str) -> list[Any]:
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    schema.config.checks.negative_data_rejection.expected_statuses = [str(s) for s in REFUSED]
    return [result.ok() for result in schema.get_all_operations()]


# Schemathesis' pytest plugin does not run under this pytest (it reads a node attribute pytest 9
# renamed), so each operation's strategy is run by Hypothesis directly.
@pytest.mark.timeout(TIMEOUT_S)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_http_request_gets_a_5xx_or_an_answer_off_its_schema(
    http_server: ServerProc, http_user: Profile, mode: GenerationMode,
) -> None:
    token = [http_user.token]
    ops = operations(http_server.http)
    assert len(ops) >= 24, [op.label for op in ops]
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    if mode is GenerationMode.NEGATIVE:
        checks.append(negative_data_rejection)
    calls: dict[int, int] = {}
    past_auth: dict[str, int] = {}  # answers other than 401 per operation: the token got it past the check
    unsatisfiable: list[str] = []
    relinked = 0
    for op in ops:
        @examples(30)
        @given(case=op.as_strategy(generation_mode=mode))
        def call(case: Any) -> None:
            nonlocal relinked
            headers = {"Authorization": f"Bearer {token[0]}"}
            response = case.call_and_validate(base_url=http_server.http, headers=headers, checks=checks)
            calls[response.status_code] = calls.get(response.status_code, 0) + 1
            if response.status_code != 401:
                past_auth[case.operation.label] = past_auth.get(case.operation.label, 0) + 1
            elif httpx.get(f"{http_server.http}/v1/me", headers=headers).status_code == 401:
                # a generated DELETE /v1/devices/{id} hit this device: link another of the same user
                token[0] = asyncio.run(login(http_server.http, http_user.phone)).token
                relinked += 1

        try:
            call()
        except (Unsatisfiable, FailedHealthCheck):  # nothing in this operation can be made invalid
            assert mode is GenerationMode.NEGATIVE, op.label
            unsatisfiable.append(op.label)
    print(f"{mode.value}: {sum(calls.values())} requests over {len(ops)} operations, statuses {sorted(calls.items())}"
          f"; no negative case for {unsatisfiable}; device linked again {relinked} times")
    assert not any(status >= 500 for status in calls)
    if mode is GenerationMode.POSITIVE:
        # every route that takes the bearer token was reached past its check at least once; a 401
        # from verify is a wrong generated code (it reads no token), so it says nothing of that
        bearer = {op.label for op in ops} - CODE_CHECKED
        assert bearer <= set(past_auth), [label for label in sorted(bearer) if label not in past_auth]


# -- bodies, paths and queries the OpenAPI document does not describe ---------------------------
# The document declares no request bodies (the routes read their JSON themselves), so
# Schemathesis sends none: here every route of the document gets bodies with the fields the
# protocol names, of the right and of the wrong types, and bytes that are not JSON at all.
FIELDS = ["phone", "code", "device_name", "platform", "name", "provider", "token", "kind", "peer", "title",
          "members", "id", "body", "media", "user_id", "sha256", "size", "mime"]
ERROR_BODY_CODES = {"bad_request", "unknown_type", "too_large", "unauthorized", "forbidden", "not_found",
                    "conflict", "rate_limited", "unavailable"}


def http_values(real: list[str]) -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from(real), wrong_values, st.text(min_size=1, max_size=30),
                     st.lists(st.sampled_from(real), max_size=3))


@st.composite
def http_request(draw: st.DrawFn, routes: list[tuple[str, str]], real: list[str]) -> tuple[str, str, dict[str, str],
                                                                                           bytes | None]:
    method, template = draw(st.sampled_from(routes))
    path = template
    while "{" in path:
        start, end = path.index("{"), path.index("}")
        value = draw(st.one_of(st.sampled_from(real), st.text(min_size=1, max_size=40),
                               st.integers(65, 3000).map(lambda n: "k" * n)))
        path = path[:start] + quote(value, safe="") + path[end + 1:]
    query = draw(st.dictionaries(st.sampled_from(["phone", "before", "limit", "chat", "exp", "max", "op", "sig"]),
                                 st.one_of(st.sampled_from(real), st.integers(-(10**20), 10**20).map(str),
                                           st.text(max_size=20)), max_size=3))
    how = draw(st.sampled_from(["fields", "fields", "any json", "not json", "invalid utf-8", "none"]))
    body: bytes | None
    if how == "fields":
        body = json.dumps(draw(st.dictionaries(st.sampled_from(FIELDS), http_values(real), max_size=5)),
                          ensure_ascii=False).encode()
    elif how == "any json":
        body = json.dumps(draw(st.one_of(wrong_values, st.lists(wrong_values, max_size=3))),
                          ensure_ascii=False).encode()
    elif how == "not json":
        body = draw(st.binary(max_size=100))
    elif how == "invalid utf-8":
        body = b'{"name":"\xff\xfe", "phone":"\xed\xa0\x80"}'
    else:
        body = None
    return method, path, query, body


@pytest.mark.timeout(TIMEOUT_S)
def test_no_route_answers_any_body_with_a_5xx(http_server: ServerProc, http_user: Profile) -> None:
    async def setup() -> str:
        async with httpx.AsyncClient(base_url=http_server.http,
                                     headers={"Authorization": f"Bearer {http_user.token}"}) as http:
            peer = await login(http_server.http, fresh_phone())
            chat = await http.post("/v1/chats", json={"kind": "direct", "peer": peer.user_id})
            chat.raise_for_status()
            return str(chat.json()["chat"])

    chat = asyncio.run(setup())
    # not the user's phone: generated wrong codes for it would lock it out, and the test links again with it
    real = [http_user.user_id, http_user.device_id, chat, "direct", "group", "webhook", "0" * 64]
    routes = [(m.upper(), path) for path, ops in httpx.get(f"{http_server.http}/openapi.json").json()["paths"].items()
              for m in ops]
    statuses: dict[int, int] = {}
    token = [http_user.token]
    relinked = 0
    with httpx.Client(base_url=http_server.http, timeout=30) as http:
        @examples(700)
        @given(req=http_request(routes, real), auth=st.sampled_from([True, True, True, False]))
        def call(req: tuple[str, str, dict[str, str], bytes | None], auth: bool) -> None:
            nonlocal relinked
            method, path, query, body = req
            headers = {"Authorization": f"Bearer {token[0]}"} if auth else {}
            if body is not None:
                headers["Content-Type"] = "application/json"
            response = http.request(method, path, params=query, content=body, headers=headers)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if auth and response.status_code == 401 and http.get("/v1/me", headers=headers).status_code == 401:
                # a generated DELETE /v1/devices/{id} unlinked this device: link a new one of the
                # same user, or every later request would stop at the token check
                token[0] = asyncio.run(login(http_server.http, http_user.phone)).token
                relinked += 1
            assert response.status_code < 500, (method, path, query, body, response.text[:300])
            if response.status_code >= 400 and not path.startswith("/v1/blobs/"):
                error = response.json().get("error")
                assert isinstance(error, dict) and error.get("code") in ERROR_BODY_CODES, (method, path, response.text)
                assert isinstance(error.get("message"), str)

        call()
    print(f"routes fuzzed with bodies: {sum(statuses.values())} requests, statuses {sorted(statuses.items())}, "
          f"device linked again {relinked} times")
