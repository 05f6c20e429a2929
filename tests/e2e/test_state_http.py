"""The state API over HTTP against real sidecars: CRUD, etags, bulk, transactions, TTL, errors."""

from __future__ import annotations

import json
import time

import pytest

from pillion.testing.procs import wait_until
from tests.e2e.conftest import Pair, call

STORES = ["statestore", "memstore"]


def save(port: int, store: str, items: list[dict[str, object]], q: str = "") -> int:
    return call(port, "POST", f"/v1.0/state/{store}{q}", body=json.dumps(items)).status


@pytest.mark.parametrize("store", STORES)
def test_crud(pair: Pair, store: str) -> None:
    p = pair.alpha.http_port
    assert save(p, store, [{"key": "k1", "value": {"a": 1}}, {"key": "k2", "value": "text"}]) == 204
    r = call(p, "GET", f"/v1.0/state/{store}/k1")
    assert r.status == 200
    assert json.loads(r.body) == {"a": 1}
    assert r.headers["content-type"] == "application/json"
    assert r.headers["etag"]
    assert call(p, "GET", f"/v1.0/state/{store}/k2").body == b'"text"'
    assert call(p, "DELETE", f"/v1.0/state/{store}/k1").status == 204
    r = call(p, "GET", f"/v1.0/state/{store}/k1")
    assert (r.status, r.body) == (204, b"")
    assert call(p, "DELETE", f"/v1.0/state/{store}/never-was").status == 204
    assert save(p, store, []) == 204


@pytest.mark.parametrize("store", STORES)
def test_etags(pair: Pair, store: str) -> None:
    p = pair.alpha.http_port
    assert save(p, store, [{"key": "e", "value": 1}]) == 204
    etag = call(p, "GET", f"/v1.0/state/{store}/e").headers["etag"]
    assert save(p, store, [{"key": "e", "value": 2, "etag": etag}]) == 204
    r = call(
        p, "POST", f"/v1.0/state/{store}", body=json.dumps([{"key": "e", "value": 3, "etag": etag}])
    )
    assert r.status == 409
    assert r.json()["errorCode"] == "ERR_STATE_SAVE"
    assert call(p, "GET", f"/v1.0/state/{store}/e").body == b"2"
    # last-write ignores the stale etag
    item = {"key": "e", "value": 4, "etag": etag, "options": {"concurrency": "last-write"}}
    assert save(p, store, [item]) == 204
    # first-write without etag: insert only
    fw = {"key": "e", "value": 5, "options": {"concurrency": "first-write"}}
    assert save(p, store, [fw]) == 409
    new = call(p, "GET", f"/v1.0/state/{store}/e").headers["etag"]
    r = call(p, "DELETE", f"/v1.0/state/{store}/e", headers={"If-Match": etag})
    assert r.status == 409 and r.json()["errorCode"] == "ERR_STATE_DELETE"
    assert call(p, "DELETE", f"/v1.0/state/{store}/e", headers={"If-Match": new}).status == 204


def test_bad_etag_in_memory_store(pair: Pair) -> None:
    p = pair.alpha.http_port
    save(p, "memstore", [{"key": "be", "value": 1}])
    r = call(
        p, "POST", "/v1.0/state/memstore", body=json.dumps([{"key": "be", "value": 1, "etag": "x"}])
    )
    assert r.status == 400 and r.json()["errorCode"] == "ERR_STATE_SAVE"


@pytest.mark.parametrize("store", STORES)
def test_bulk_get(pair: Pair, store: str) -> None:
    p = pair.alpha.http_port
    save(p, store, [{"key": "b1", "value": {"x": 1}}, {"key": "b2", "value": "two"}])
    r = call(
        p, "POST", f"/v1.0/state/{store}/bulk", body=json.dumps({"keys": ["b2", "nope", "b1"]})
    )
    assert r.status == 200
    items = r.json()
    assert [i["key"] for i in items] == ["b2", "nope", "b1"]
    assert items[0]["data"] == "two" and items[2]["data"] == {"x": 1}
    assert "data" not in items[1]
    assert items[0]["etag"]


@pytest.mark.parametrize("store", STORES)
def test_transactions(pair: Pair, store: str) -> None:
    p = pair.alpha.http_port
    save(p, store, [{"key": "t-del", "value": 1}])
    body = {
        "operations": [
            {"operation": "upsert", "request": {"key": "t1", "value": "one"}},
            {"operation": "delete", "request": {"key": "t-del"}},
        ]
    }
    assert call(p, "POST", f"/v1.0/state/{store}/transaction", body=json.dumps(body)).status == 204
    assert call(p, "GET", f"/v1.0/state/{store}/t1").body == b'"one"'
    assert call(p, "GET", f"/v1.0/state/{store}/t-del").status == 204
    etag = call(p, "GET", f"/v1.0/state/{store}/t1").headers["etag"]
    failing = {
        "operations": [
            {"operation": "upsert", "request": {"key": "t2", "value": "two"}},
            {"operation": "upsert", "request": {"key": "t1", "value": "x", "etag": etag + "0"}},
        ]
    }
    r = call(p, "POST", f"/v1.0/state/{store}/transaction", body=json.dumps(failing))
    assert r.status == 500 and r.json()["errorCode"] == "ERR_STATE_TRANSACTION"
    assert call(p, "GET", f"/v1.0/state/{store}/t2").status == 204  # rolled back
    bad = {"operations": [{"operation": "merge", "request": {"key": "t1"}}]}
    r = call(p, "POST", f"/v1.0/state/{store}/transaction", body=json.dumps(bad))
    assert r.status == 400 and r.json()["errorCode"] == "ERR_NOT_SUPPORTED_STATE_OPERATION"
    assert call(p, "POST", f"/v1.0/state/{store}/transaction", body="{}").status == 204


@pytest.mark.parametrize("store", STORES)
def test_ttl(pair: Pair, store: str) -> None:
    p = pair.alpha.http_port
    assert save(p, store, [{"key": "ttl", "value": 1, "metadata": {"ttlInSeconds": "1"}}]) == 204
    r = call(p, "GET", f"/v1.0/state/{store}/ttl")
    assert r.status == 200
    assert "metadata.ttlexpiretime" in r.headers
    wait_until(lambda: call(p, "GET", f"/v1.0/state/{store}/ttl").status == 204, 5, "ttl expiry")
    # metadata.ttlInSeconds as a query parameter
    assert save(p, store, [{"key": "ttl2", "value": 1}], "?metadata.ttlInSeconds=1") == 204
    assert "metadata.ttlexpiretime" in call(p, "GET", f"/v1.0/state/{store}/ttl2").headers
    r = call(
        p,
        "POST",
        f"/v1.0/state/{store}",
        body=json.dumps([{"key": "ttl3", "value": 1, "metadata": {"ttlInSeconds": "soon"}}]),
    )
    assert r.status == 500 and r.json()["errorCode"] == "ERR_STATE_SAVE"


def test_key_prefixes(pair: Pair) -> None:
    a, b = pair.alpha.http_port, pair.beta.http_port
    save(a, "statestore", [{"key": "mine", "value": "alpha's"}])
    assert call(b, "GET", "/v1.0/state/statestore/mine").status == 204  # appid prefix isolates
    save(a, "shared", [{"key": "common", "value": "both"}])  # keyPrefix none
    assert call(b, "GET", "/v1.0/state/shared/common").body == b'"both"'
    save(a, "byname", [{"key": "n", "value": "named"}])  # keyPrefix name: shared by store name
    assert call(b, "GET", "/v1.0/state/byname/n").body == b'"named"'
    # the raw storage keys, seen through the un-prefixed store
    assert call(a, "GET", "/v1.0/state/shared/alpha||mine").status == 400  # illegal key
    r = call(a, "POST", "/v1.0/state/shared/bulk", body=json.dumps({"keys": ["byname"]}))
    assert r.status == 200


def test_errors(pair: Pair) -> None:
    p = pair.alpha.http_port
    r = call(p, "GET", "/v1.0/state/nostore/k")
    assert r.status == 400
    err = r.json()
    assert err["errorCode"] == "ERR_STATE_STORE_NOT_FOUND"
    assert err["message"] == "state store nostore is not found"
    info = err["details"][0]
    assert info["reason"] == "DAPR_STATE_NOT_FOUND" and info["domain"] == "dapr.io"
    r = call(p, "POST", "/v1.0/state/statestore", body=json.dumps([{"key": "a||b", "value": 1}]))
    assert r.status == 400
    assert r.json()["errorCode"] == "ERR_MALFORMED_REQUEST"
    assert r.json()["details"][0]["reason"] == "DAPR_STATE_ILLEGAL_KEY"
    r = call(p, "GET", "/v1.0/state/statestore/a||b")
    assert r.status == 400
    for body in ["{not json", "", '{"key": "x"}', '[{"value": 1}]', "[1]"]:
        r = call(p, "POST", "/v1.0/state/statestore", body=body)
        assert r.status == 400, body
        assert r.json()["errorCode"] == "ERR_MALFORMED_REQUEST", body
    r = call(p, "POST", "/v1.0/state/statestore/bulk", body="[]")
    assert r.status == 400 and r.json()["errorCode"] == "ERR_MALFORMED_REQUEST"
    r = call(p, "POST", "/v1.0-alpha1/state/memstore/query", body="{}")
    assert r.status == 500 and r.json()["errorCode"] == "ERR_STATE_STORE_NOT_SUPPORTED"
    r = call(p, "POST", "/v1.0-alpha1/jobs/x", body="{}")
    assert r.status == 501 and r.json()["errorCode"] == "ERR_API_UNIMPLEMENTED"


def test_concurrent_etag_race(pair: Pair) -> None:
    """50 writers with the same etag: exactly one wins (grouped commits keep etag checks)."""
    import concurrent.futures

    p = pair.alpha.http_port
    save(p, "statestore", [{"key": "race", "value": 0}])
    etag = call(p, "GET", "/v1.0/state/statestore/race").headers["etag"]

    def attempt(i: int) -> int:
        return save(p, "statestore", [{"key": "race", "value": i, "etag": etag}])

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        codes = list(ex.map(attempt, range(50)))
    assert time.monotonic() - t0 < 30
    assert codes.count(204) == 1 and codes.count(409) == 49
