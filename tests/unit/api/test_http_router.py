"""HttpApi routing over real blocks: state, invoke forms, health, metadata, shutdown and auth."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pytest

from pillion.api.http.router import HttpApi
from pillion.blocks.health import Health
from pillion.blocks.invoke import InvokeBlock, InvokeResponse
from pillion.blocks.metadata import ComponentView, MetadataBlock
from pillion.blocks.state import StateBlock, StoreEntry
from pillion.components.state.api import Consistency, GetRequest, GetResponse, StateStore
from pillion.transport.http import Request, Response
from tests.unit.blocks.fakes import (
    FakeApp,
    FakeLink,
    FakeResolver,
    PlainStore,
    RecordingMemoryStore,
)

JSON_CT = (b"content-type", b"application/json")
NO_APP_ID = "failed getting app id either from the URL path or the header dapr-app-id"


@dataclass
class Rig:
    api: HttpApi
    store: RecordingMemoryStore
    app: FakeApp
    link: FakeLink
    resolver: FakeResolver
    health: Health
    shutdowns: list[int] = field(default_factory=list)

    def __call__(
        self,
        method: str,
        target: str,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes | str | Any = b"",
    ) -> Response:
        path, _, query = target.partition("?")
        if not isinstance(body, bytes):
            body = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        request = Request(method, path, query.encode(), headers or [], body, peer="10.0.0.9")
        return asyncio.run(self.api(request))


def rig(
    *,
    token: str | None = None,
    stores: dict[str, StoreEntry] | None = None,
    ready: bool = True,
    api_logging: bool = False,
) -> Rig:
    store = RecordingMemoryStore()
    if stores is None:
        stores = {"statestore": StoreEntry("statestore", store)}
    app, link, resolver = FakeApp(), FakeLink(), FakeResolver()
    health = Health("me", outbound_ready=ready, ready=ready)
    shutdowns: list[int] = []
    api = HttpApi(
        app_id="me",
        health=health,
        state=StateBlock("me", "", stores),
        invoke=InvokeBlock("me", "", resolver, link, app, own_address="127.0.0.1:50002"),
        metadata=MetadataBlock(
            "me", lambda: [ComponentView("statestore", "state.in-memory", "v1", ("ETAG",))]
        ),
        request_shutdown=lambda: shutdowns.append(1),
        api_logging=api_logging,
        api_token=token,
    )
    return Rig(api, store, app, link, resolver, health, shutdowns)


def err_body(resp: Response) -> dict[str, Any]:
    assert JSON_CT in resp.headers, resp.headers
    out = json.loads(resp.body)
    assert isinstance(out, dict)
    return out


def assert_error(resp: Response, status: int, code: str, message: str | None = None) -> None:
    assert resp.status == status, (resp.status, resp.body)
    body = err_body(resp)
    assert body["errorCode"] == code
    if message is not None:
        assert body["message"] == message


def basic(user: str, password: str) -> tuple[bytes, bytes]:
    return (b"authorization", b"Basic " + base64.b64encode(f"{user}:{password}".encode()))


# --- state: save / get / delete -------------------------------------------------------------


@pytest.mark.parametrize("verb", ["POST", "PUT"])
def test_save_then_get(verb: str) -> None:
    r = rig()
    resp = r(verb, "/v1.0/state/statestore", body=[{"key": "k", "value": "v"}])
    assert (resp.status, resp.body, resp.headers) == (204, b"", [])
    assert r.store._data["me||k"].value == b'"v"'
    got = r("GET", "/v1.0/state/statestore/k")
    assert got.status == 200
    assert got.body == b'"v"'
    assert got.headers == [JSON_CT, (b"etag", b"1")]


def test_get_missing_key_is_204() -> None:
    resp = rig()("GET", "/v1.0/state/statestore/missing")
    assert (resp.status, resp.body) == (204, b"")


def test_save_empty_array_is_204() -> None:
    r = rig()
    assert r("POST", "/v1.0/state/statestore", body=b"[]").status == 204
    assert r.store.sets == []


def test_trailing_slash_is_ignored() -> None:
    r = rig()
    assert r("POST", "/v1.0/state/statestore/", body=[{"key": "k", "value": 1}]).status == 204
    assert r("GET", "/v1.0/state/statestore/k/").body == b"1"


def test_ttl_from_query_metadata_shows_as_response_header() -> None:
    r = rig()
    resp = r(
        "POST",
        "/v1.0/state/statestore?metadata.ttlInSeconds=100&metadata.extra=q",
        body=[{"key": "k", "value": 1, "metadata": {"extra": "body", "own": "b"}}],
    )
    assert resp.status == 204
    assert dict(r.store.sets[0].metadata) == {"ttlInSeconds": "100", "extra": "q", "own": "b"}
    got = r("GET", "/v1.0/state/statestore/k")
    names = [k for k, _ in got.headers]
    assert names == [b"content-type", b"etag", b"metadata.ttlExpireTime"]


def test_get_passes_query_metadata_and_consistency() -> None:
    r = rig()
    r("GET", "/v1.0/state/statestore/k?metadata.partitionKey=p&consistency=strong&x=1")
    (req,) = r.store.gets
    assert req == GetRequest("me||k", {"partitionKey": "p"}, Consistency.STRONG)


def test_first_query_value_wins() -> None:
    r = rig()
    r("GET", "/v1.0/state/statestore/k?metadata.a=1&metadata.a=2")
    assert dict(r.store.gets[0].metadata) == {"a": "1"}


def test_get_bad_consistency_is_400() -> None:
    assert_error(
        rig()("GET", "/v1.0/state/statestore/k?consistency=always"), 400, "ERR_MALFORMED_REQUEST"
    )


def test_percent_encoded_key_and_store() -> None:
    r = rig()
    r("POST", "/v1.0/state/statestore", body=[{"key": "a/b c", "value": 1}])
    assert r("GET", "/v1.0/state/statestore/a%2Fb%20c").body == b"1"
    assert r("GET", "/v1.0/state/statestore/a/b%20c").body == b"1"
    assert r("GET", "/v1.0/state/state%73tore/a%2Fb%20c").body == b"1"


def test_nested_key_delete() -> None:
    r = rig()
    r("POST", "/v1.0/state/statestore", body=[{"key": "a/b", "value": 1}])
    assert r("DELETE", "/v1.0/state/statestore/a/b").status == 204
    assert [d.key for d in r.store.deletes] == ["me||a/b"]
    assert r.store._data == {}


def test_get_key_named_bulk_or_transaction() -> None:
    r = rig()
    r("POST", "/v1.0/state/statestore", body=[{"key": "bulk", "value": 1}])
    assert r("GET", "/v1.0/state/statestore/bulk").body == b"1"
    assert r("GET", "/v1.0/state/statestore/transaction").status == 204


def test_delete_with_if_match() -> None:
    r = rig()
    r("POST", "/v1.0/state/statestore", body=[{"key": "k", "value": 1}])
    wrong = r("DELETE", "/v1.0/state/statestore/k", headers=[(b"if-match", b"99")])
    assert_error(wrong, 409, "ERR_STATE_DELETE")
    bad = r("DELETE", "/v1.0/state/statestore/k", headers=[(b"if-match", b"not-a-number")])
    assert_error(bad, 400, "ERR_STATE_DELETE")
    assert "me||k" in r.store._data
    right = r("DELETE", "/v1.0/state/statestore/k", headers=[(b"if-match", b"1")])
    assert (right.status, right.body) == (204, b"")
    assert r.store._data == {}


def test_delete_passes_options_from_query() -> None:
    r = rig()
    resp = r(
        "DELETE",
        "/v1.0/state/statestore/k?concurrency=last-write&consistency=eventual&metadata.m=1",
    )
    assert resp.status == 204
    (d,) = r.store.deletes
    assert (d.key, d.etag, d.concurrency, d.consistency, dict(d.metadata)) == (
        "me||k",
        None,
        "last-write",
        "eventual",
        {"m": "1"},
    )
    assert_error(
        r("DELETE", "/v1.0/state/statestore/k?concurrency=sometimes"), 400, "ERR_MALFORMED_REQUEST"
    )


def test_save_errors() -> None:
    r = rig()
    assert_error(r("POST", "/v1.0/state/statestore"), 400, "ERR_MALFORMED_REQUEST")
    assert_error(
        r("POST", "/v1.0/state/statestore", body=[{"value": 1}]),
        400,
        "ERR_MALFORMED_REQUEST",
        '"key" is a required field',
    )
    assert_error(
        r("POST", "/v1.0/state/statestore?metadata.ttlInSeconds=abc", body=[{"key": "k"}]),
        500,
        "ERR_STATE_SAVE",
    )
    r("POST", "/v1.0/state/statestore", body=[{"key": "k", "value": 1}])
    assert_error(
        r("POST", "/v1.0/state/statestore", body=[{"key": "k", "value": 2, "etag": "42"}]),
        409,
        "ERR_STATE_SAVE",
    )


def test_http_save_etag_error_body_is_legacy() -> None:
    r = rig()
    r("POST", "/v1.0/state/statestore", body=[{"key": "k", "value": 1}])
    resp = r("POST", "/v1.0/state/statestore", body=[{"key": "k", "value": 2, "etag": "42"}])
    assert set(err_body(resp)) == {"errorCode", "message"}


def test_unknown_store_is_rich_400() -> None:
    resp = rig()("GET", "/v1.0/state/nope/k")
    assert_error(resp, 400, "ERR_STATE_STORE_NOT_FOUND", "state store nope is not found")
    info = err_body(resp)["details"][0]
    assert (info["reason"], info["domain"], info["metadata"]) == (
        "DAPR_STATE_NOT_FOUND",
        "dapr.io",
        {"appID": "me"},
    )


def test_no_stores_is_500() -> None:
    assert_error(
        rig(stores={})("POST", "/v1.0/state/statestore", body=b"[]"),
        500,
        "ERR_STATE_STORE_NOT_CONFIGURED",
    )


def test_illegal_key_is_rich_400() -> None:
    resp = rig()("GET", "/v1.0/state/statestore/a||b")
    assert_error(resp, 400, "ERR_MALFORMED_REQUEST")
    details = err_body(resp)["details"]
    assert details[0]["reason"] == "DAPR_STATE_ILLEGAL_KEY"
    assert details[-1]["field_violations"][0]["field"] == "a||b"


# --- state: bulk and transaction --------------------------------------------------------------


@pytest.mark.parametrize("verb", ["POST", "PUT"])
def test_bulk_get(verb: str) -> None:
    r = rig()
    r("POST", "/v1.0/state/statestore", body=[{"key": "a", "value": {"x": 1}}, {"key": "b"}])
    resp = r(
        verb,
        "/v1.0/state/statestore/bulk?metadata.m=query",
        body={"keys": ["a", "missing"], "parallelism": 2, "metadata": {"m": "body", "n": "b"}},
    )
    assert resp.status == 200
    assert resp.headers == [JSON_CT]
    assert json.loads(resp.body) == [
        {"key": "a", "data": {"x": 1}, "etag": "1"},
        {"key": "missing"},
    ]
    assert [dict(g.metadata) for g in r.store.gets] == [{"m": "query", "n": "b"}] * 2


def test_bulk_get_bad_body() -> None:
    assert_error(
        rig()("POST", "/v1.0/state/statestore/bulk", body={"keys": "a"}),
        400,
        "ERR_MALFORMED_REQUEST",
    )


@pytest.mark.parametrize("verb", ["POST", "PUT"])
def test_transaction(verb: str) -> None:
    r = rig()
    r("POST", "/v1.0/state/statestore", body=[{"key": "old", "value": 0}])
    resp = r(
        verb,
        "/v1.0/state/statestore/transaction?metadata.m=query",
        body={
            "operations": [
                {"operation": "upsert", "request": {"key": "new", "value": "n"}},
                {"operation": "delete", "request": {"key": "old"}},
            ],
            "metadata": {"m": "body", "n": "b"},
        },
    )
    assert (resp.status, resp.body) == (204, b"")
    assert sorted(r.store._data) == ["me||new"]
    assert r.store._data["me||new"].value == b'"n"'
    assert r.store.multis[0][1] == {"m": "query", "n": "b"}


def test_transaction_errors() -> None:
    r = rig()
    assert_error(
        r(
            "POST",
            "/v1.0/state/statestore/transaction",
            body={"operations": [{"operation": "merge", "request": {"key": "k"}}]},
        ),
        400,
        "ERR_NOT_SUPPORTED_STATE_OPERATION",
        "operation type merge not supported",
    )
    assert_error(
        r(
            "POST",
            "/v1.0/state/statestore/transaction",
            body={"operations": [{"operation": "delete", "request": {"key": "k", "etag": "9"}}]},
        ),
        500,
        "ERR_STATE_TRANSACTION",
    )
    plain = rig(stores={"statestore": StoreEntry("statestore", PlainStore())})
    resp = plain("POST", "/v1.0/state/statestore/transaction", body={"operations": []})
    assert_error(resp, 500, "ERR_STATE_STORE_NOT_SUPPORTED")
    assert err_body(resp)["details"][0]["reason"] == "DAPR_STATE_TRANSACTIONS_NOT_SUPPORTED"


def test_query_api_is_not_supported() -> None:
    r = rig()
    resp = r("POST", "/v1.0-alpha1/state/statestore/query", body={"filter": {}})
    assert_error(resp, 500, "ERR_STATE_STORE_NOT_SUPPORTED")
    assert err_body(resp)["details"][0]["reason"] == "DAPR_STATE_QUERYING_NOT_SUPPORTED"
    assert_error(r("PUT", "/v1.0-alpha1/state/nope/query"), 400, "ERR_STATE_STORE_NOT_FOUND")
    assert r("GET", "/v1.0-alpha1/state/statestore/query").status == 405


# --- verbs and unknown routes -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("GET", "/v1.0/state/statestore"),
        ("DELETE", "/v1.0/state/statestore"),
        ("PUT", "/v1.0/state/statestore/k"),
        ("POST", "/v1.0/state/statestore/k"),
        ("PATCH", "/v1.0/state/statestore/k"),
        ("POST", "/v1.0/healthz"),
        ("PUT", "/v1.0/healthz/outbound"),
        ("POST", "/v1.0/metadata"),
        ("GET", "/v1.0/metadata/key"),
        ("GET", "/v1.0/shutdown"),
    ],
)
def test_wrong_verb_is_405(method: str, target: str) -> None:
    r = rig()
    assert_error(r(method, target), 405, "ERR_BAD_REQUEST")
    assert r.shutdowns == []
    assert r.store.sets == [] and r.store.deletes == []


@pytest.mark.parametrize(
    "target",
    [
        "/v1.0/state",
        "/v1.0/state/",
        "/v1.0-alpha1/state/statestore",
        "/v1.0-beta1/state/statestore/k",
        "/v1.0/metadata/a/b",
        "/v1.0/healthz/other",
        "/v1.0/invoke/app",
        "/v1.0/invoke/app/notmethod/x",
    ],
)
def test_unknown_api_routes_are_404(target: str) -> None:
    resp = rig()("GET", target)
    assert_error(resp, 404, "ERR_BAD_REQUEST")


@pytest.mark.parametrize(
    ("target", "block"),
    [
        ("/v1.0/actors/T/1/method/m", "actors"),
        ("/v1.0-beta1/workflows/dapr/wf/start", "workflow"),
        ("/v1.0-alpha1/jobs/j", "jobs"),
        ("/v1.0-alpha1/crypto/c/encrypt", "cryptography"),
        ("/v1.0-alpha2/conversation/c/converse", "conversation"),
    ],
)
def test_later_blocks_are_501(target: str, block: str) -> None:
    r = rig()
    resp = r("POST", target)
    assert_error(
        resp,
        501,
        "ERR_API_UNIMPLEMENTED",
        f"the {block} API is not implemented in this version of pillion",
    )
    assert r.app.calls == [] and r.link.calls == []


def test_configuration_without_stores_is_500() -> None:
    for target in ("/v1.0/configuration/c?key=a", "/v1.0-alpha1/configuration/c/subscribe"):
        assert_error(
            rig()("GET", target),
            500,
            "ERR_CONFIGURATION_STORE_NOT_CONFIGURED",
            "configuration stores not configured",
        )


@pytest.mark.parametrize("target", ["/", "/orders/1", "/v2.0/state/s", "/v1.0", "/v1.0/nope"])
def test_unmatched_without_app_id_is_404_direct_invoke(target: str) -> None:
    assert_error(rig()("POST", target), 404, "ERR_DIRECT_INVOKE", NO_APP_ID)


# --- service invocation forms -----------------------------------------------------------------


def test_invoke_path_form_remote() -> None:
    r = rig()
    r.link.outcomes.append(
        InvokeResponse(201, b"Created", [(b"content-type", b"text/plain"), (b"x-a", b"1")], b"hi")
    )
    resp = r(
        "PATCH",
        "/v1.0/invoke/other/method/orders/1?x=1",
        headers=[(b"content-type", b"application/json"), (b"dapr-api-token", b"t")],
        body=b"{}",
    )
    assert (resp.status, resp.reason, resp.body) == (201, b"Created", b"hi")
    assert resp.headers == [(b"content-type", b"text/plain"), (b"x-a", b"1")]
    (call,) = r.link.calls
    assert (call.verb, call.target, call.body) == ("PATCH", b"/orders/1?x=1", b"{}")
    hdrs = dict(call.headers)
    assert hdrs[b"dapr-callee-app-id"] == b"other"
    assert hdrs[b"x-forwarded-for"] == b"10.0.0.9"
    assert b"dapr-api-token" not in hdrs


def test_invoke_path_form_keeps_raw_method_and_cleans_it() -> None:
    r = rig()
    r("GET", "/v1.0/invoke/other/method/a%2Fb/./c//d/")
    assert r.link.calls[0].target == b"/a%2Fb/c/d"


def test_invoke_path_form_percent_encoded_app_id() -> None:
    r = rig()
    r("GET", "/v1.0/invoke/other%2Ens/method/x")
    assert r.resolver.resolved == [("other", "ns")]


def test_invoke_path_form_self_goes_to_app() -> None:
    r = rig()
    resp = r("GET", "/v1.0/invoke/me/method/health")
    assert resp.body == b"local"
    assert r.app.calls[0].target == b"/health"
    assert r.link.calls == []


def test_invoke_path_form_empty_app_id_is_404() -> None:
    assert_error(rig()("GET", "/v1.0/invoke//method/x"), 404, "ERR_DIRECT_INVOKE", NO_APP_ID)


def test_header_form() -> None:
    r = rig()
    resp = r("POST", "/orders/1?q=2", headers=[(b"dapr-app-id", b"other")], body=b"b")
    assert resp.body == b"remote"
    (call,) = r.link.calls
    assert (call.verb, call.target, call.body) == ("POST", b"/orders/1?q=2", b"b")
    assert b"dapr-app-id" not in dict(call.headers)


def test_header_form_wins_over_api_routes() -> None:
    # dapr-api.md §1.1: the header form is checked first, even on /v1.0/invoke/... paths.
    r = rig()
    r("GET", "/v1.0/invoke/third/method/x", headers=[(b"dapr-app-id", b"other")])
    assert r.resolver.resolved == [("other", "")]
    assert r.link.calls[0].target == b"/v1.0/invoke/third/method/x"


def test_header_form_self() -> None:
    r = rig()
    r("DELETE", "/items/9", headers=[(b"dapr-app-id", b"me")])
    assert [(c.verb, c.target) for c in r.app.calls] == [("DELETE", b"/items/9")]


@pytest.mark.parametrize("user", ["dapr-app-id", "DAPR-APP-ID", "Dapr-App-Id"])
def test_basic_auth_form(user: str) -> None:
    r = rig()
    resp = r("PUT", "/orders/7", headers=[basic(user, "other")])
    assert resp.body == b"remote"
    assert r.link.calls[0].target == b"/orders/7"
    assert r.resolver.resolved == [("other", "")]


@pytest.mark.parametrize(
    "header",
    [
        basic("someone", "other"),
        (b"authorization", b"Basic !!!not-base64"),
        (b"authorization", b"Bearer " + base64.b64encode(b"dapr-app-id:other")),
        (b"authorization", b"Basic " + base64.b64encode(b"\xff\xfe:other")),
    ],
    ids=["other-user", "bad-base64", "bearer", "not-utf8"],
)
def test_basic_auth_that_is_not_an_app_id_is_404(header: tuple[bytes, bytes]) -> None:
    r = rig()
    assert_error(r("GET", "/orders", headers=[header]), 404, "ERR_DIRECT_INVOKE", NO_APP_ID)
    assert r.link.calls == []


def test_header_form_beats_basic_auth() -> None:
    r = rig()
    r("GET", "/x", headers=[basic("dapr-app-id", "third"), (b"dapr-app-id", b"other")])
    assert r.resolver.resolved == [("other", "")]


def test_external_url_invocation_is_501() -> None:
    assert_error(
        rig()("GET", "/v1.0/invoke/http%3A%2F%2Fexample.com/method/x"),
        501,
        "ERR_API_UNIMPLEMENTED",
    )


def test_invoke_failure_is_500_json() -> None:
    r = rig()
    r.resolver.known.clear()
    assert_error(
        r("GET", "/v1.0/invoke/ghost/method/x"),
        500,
        "ERR_DIRECT_INVOKE",
        "failed to invoke, id: ghost, err: couldn't find service: ghost",
    )


# --- health, metadata, shutdown ---------------------------------------------------------------


@pytest.mark.parametrize("verb", ["GET", "HEAD"])
def test_healthz(verb: str) -> None:
    r = rig(ready=False)
    assert_error(r(verb, "/v1.0/healthz"), 500, "ERR_HEALTH_NOT_READY")
    assert_error(
        r(verb, "/v1.0/healthz/outbound"),
        500,
        "ERR_OUTBOUND_HEALTH_NOT_READY",
        "dapr outbound is not ready",
    )
    r.health.outbound_ready = True
    assert r(verb, "/v1.0/healthz/outbound").status == 204
    assert_error(r(verb, "/v1.0/healthz"), 500, "ERR_HEALTH_NOT_READY")
    r.health.ready = True
    resp = r(verb, "/v1.0/healthz")
    assert (resp.status, resp.body, resp.headers) == (204, b"", [])
    assert r(verb, "/v1.0/healthz?appid=me").status == 204
    assert_error(r(verb, "/v1.0/healthz?appid=other"), 500, "ERR_HEALTH_APPID_NOT_MATCH")


def test_metadata_get_and_put() -> None:
    r = rig()
    resp = r("GET", "/v1.0/metadata")
    assert resp.status == 200
    assert resp.headers == [JSON_CT]
    snap = json.loads(resp.body)
    assert snap["id"] == "me"
    assert snap["components"] == [
        {"name": "statestore", "type": "state.in-memory", "version": "v1", "capabilities": ["ETAG"]}
    ]
    put = r("PUT", "/v1.0/metadata/team%20name", body="blue ✓")
    assert (put.status, put.body) == (204, b"")
    assert json.loads(r("GET", "/v1.0/metadata/").body)["extended"]["team name"] == "blue ✓"


def test_shutdown() -> None:
    r = rig()
    resp = r("POST", "/v1.0/shutdown")
    assert (resp.status, resp.body) == (204, b"")
    assert r.shutdowns == [1]


# --- API token --------------------------------------------------------------------------------


def assert_unauthorized(resp: Response) -> None:
    assert resp.status == 401
    assert resp.headers == [(b"content-type", b"text/plain")]
    assert resp.body == b"invalid api token"


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/v1.0/metadata", []),
        ("PUT", "/v1.0/metadata/k", []),
        ("GET", "/v1.0/state/statestore/k", []),
        ("POST", "/v1.0/state/statestore", [(b"dapr-api-token", b"wrong")]),
        ("POST", "/v1.0/shutdown", [(b"dapr-api-token", b"")]),
        ("GET", "/v1.0/invoke/other/method/x", []),
        ("GET", "/orders", [(b"dapr-app-id", b"other")]),
        ("GET", "/orders", [basic("dapr-app-id", "other")]),
        ("GET", "/orders", []),
        ("POST", "/v1.0/publish/p/t", []),
    ],
)
def test_token_required(method: str, target: str, headers: list[tuple[bytes, bytes]]) -> None:
    r = rig(token="s3cret")
    assert_unauthorized(r(method, target, headers=headers, body=b"[]"))
    assert r.shutdowns == [] and r.app.calls == [] and r.link.calls == []
    assert r.store.gets == [] and r.store.sets == []


def test_token_accepted() -> None:
    r = rig(token="s3cret")
    ok = [(b"dapr-api-token", b"s3cret")]
    assert r("GET", "/v1.0/metadata", headers=ok).status == 200
    assert r("GET", "/v1.0/state/statestore/k", headers=ok).status == 204
    assert r("GET", "/v1.0/invoke/other/method/x", headers=ok).body == b"remote"
    assert b"dapr-api-token" not in dict(r.link.calls[0].headers)


def test_health_endpoints_skip_the_token() -> None:
    r = rig(token="s3cret")
    assert r("GET", "/v1.0/healthz").status == 204
    assert r("GET", "/v1.0/healthz/outbound").status == 204
    assert r("GET", "/v1.0/healthz", headers=[(b"dapr-api-token", b"wrong")]).status == 204


def test_with_env_reads_dapr_api_token(monkeypatch: pytest.MonkeyPatch) -> None:
    base = rig()
    kw: dict[str, Any] = {
        "app_id": "me",
        "health": base.health,
        "state": base.api.state,
        "invoke": base.api.invoke,
        "metadata": base.api.metadata,
        "request_shutdown": lambda: None,
    }
    monkeypatch.setenv("DAPR_API_TOKEN", "from-env")
    assert HttpApi.with_env(**kw).api_token == "from-env"
    monkeypatch.setenv("DAPR_API_TOKEN", "")
    assert HttpApi.with_env(**kw).api_token is None
    monkeypatch.delenv("DAPR_API_TOKEN")
    assert HttpApi.with_env(**kw).api_token is None


# --- unexpected failures and logging ----------------------------------------------------------


class ExplodingStore(StateStore):
    async def init(self, info: Any) -> None:
        return None

    def features(self) -> frozenset[Any]:
        return frozenset()

    async def get(self, req: GetRequest) -> GetResponse | None:
        raise KeyError("internal detail that must not leak")

    async def set(self, req: Any) -> None:
        raise ZeroDivisionError("boom")

    async def delete(self, req: Any) -> None:
        raise RuntimeError("boom")


@pytest.mark.parametrize(
    ("method", "target", "exc_name"),
    [
        ("GET", "/v1.0/state/statestore/k", "KeyError"),
        ("POST", "/v1.0/state/statestore", "ZeroDivisionError"),
        ("DELETE", "/v1.0/state/statestore/k", "RuntimeError"),
    ],
)
def test_unexpected_exception_is_500_error_json(
    method: str, target: str, exc_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    r = rig(stores={"statestore": StoreEntry("statestore", ExplodingStore())})
    with caplog.at_level(logging.ERROR, logger="pillion.api.http"):
        resp = r(method, target, body=[{"key": "k", "value": 1}])
    assert resp.status == 500
    assert err_body(resp) == {"errorCode": "ERROR", "message": f"internal error: {exc_name}"}
    assert b"Traceback" not in resp.body and b"must not leak" not in resp.body
    assert any(rec.exc_info for rec in caplog.records if rec.name == "pillion.api.http")


def test_unexpected_exception_in_app_channel_is_500_error_json() -> None:
    r = rig()
    r.app.outcomes.append(ValueError("bug in the channel"))
    resp = r("GET", "/v1.0/invoke/me/method/x")
    assert resp.status == 500
    assert err_body(resp) == {"errorCode": "ERROR", "message": "internal error: ValueError"}


def test_api_logging(caplog: pytest.LogCaptureFixture) -> None:
    r = rig(api_logging=True)
    with caplog.at_level(logging.INFO, logger="pillion.api.http.calls"):
        r("GET", "/v1.0/state/statestore/k", headers=[(b"user-agent", b"ua/1")])
    (rec,) = [x for x in caplog.records if x.name == "pillion.api.http.calls"]
    assert rec.getMessage() == "HTTP API Called"
    fields = rec.fields  # type: ignore[attr-defined]
    assert fields["method"] == "GET /v1.0/state/statestore/k"
    assert fields["code"] == 204
    assert fields["useragent"] == "ua/1"


def test_no_api_logging_by_default(caplog: pytest.LogCaptureFixture) -> None:
    r = rig()
    with caplog.at_level(logging.INFO, logger="pillion.api.http.calls"):
        r("GET", "/v1.0/state/statestore/k")
    assert [x for x in caplog.records if x.name == "pillion.api.http.calls"] == []
