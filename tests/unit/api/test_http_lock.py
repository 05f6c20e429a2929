"""The lock routes of the HTTP API: bodies decoded as Dapr's protojson, 200 JSON answers, errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pillion.blocks.lock import LockBlock, LockEntry
from pillion.components.lock.api import LockError, UnlockStatus
from tests.unit.api.test_http_router import JSON_CT, Rig, assert_error, rig
from tests.unit.blocks.test_lock import FakeLockStore

LOCK = "/v1.0-alpha1/lock/lockstore"
UNLOCK = "/v1.0-alpha1/unlock/lockstore"


def lock_rig(store: FakeLockStore | None = None, **kw: Any) -> tuple[Rig, FakeLockStore]:
    r = rig(**kw)
    s = store if store is not None else FakeLockStore()
    r.api.lock = LockBlock("me", {"lockstore": LockEntry("lockstore", s)})
    return r, s


def body(resource: str = "r", owner: str = "o", expiry: int | None = 10) -> dict[str, Any]:
    out: dict[str, Any] = {"resourceId": resource, "lockOwner": owner}
    if expiry is not None:
        out["expiryInSeconds"] = expiry
    return out


def test_lock_and_unlock_answer_200_json() -> None:
    r, store = lock_rig()
    resp = r("POST", LOCK, body=body(owner="o1"))
    assert (resp.status, resp.body) == (200, b'{"success":true}')
    assert JSON_CT in resp.headers
    # A refusal is an answer too, with false written out.
    resp = r("POST", LOCK, body=body(owner="o2"))
    assert (resp.status, resp.body) == (200, b'{"success":false}')
    resp = r("POST", UNLOCK, body=body(owner="o2", expiry=None))
    assert (resp.status, resp.body) == (200, b'{"status":2}')
    resp = r("POST", UNLOCK, body=body(owner="o1", expiry=None))
    assert (resp.status, resp.body) == (200, b'{"status":0}')
    resp = r("POST", UNLOCK, body=body(owner="o1", expiry=None))
    assert (resp.status, resp.body) == (200, b'{"status":1}')
    assert JSON_CT in resp.headers
    assert store.calls[0] == ("lock", "lock||me||r", "o1", 10)


def test_internal_error_status_passes_through() -> None:
    class Broken(FakeLockStore):
        async def unlock(self, resource_id: str, lock_owner: str) -> UnlockStatus:
            return UnlockStatus.INTERNAL_ERROR

    r, _ = lock_rig(Broken())
    resp = r("POST", UNLOCK, body=body(expiry=None))
    assert (resp.status, resp.body) == (200, b'{"status":3}')


@pytest.mark.parametrize(
    "payload",
    [
        {"resource_id": "snake", "lock_owner": "o", "expiry_in_seconds": 10},
        {"resourceId": "snake", "lockOwner": "o", "expiryInSeconds": "10"},
        {"resourceId": "snake", "lockOwner": "o", "expiryInSeconds": 10, "storeName": "x", "y": 1},
    ],
    ids=["proto-names", "string-number", "unknown-fields"],
)
def test_bodies_decode_as_protojson_does(payload: dict[str, Any]) -> None:
    r, store = lock_rig()
    resp = r("POST", LOCK, body=payload)
    assert (resp.status, resp.body) == (200, b'{"success":true}')
    # The path names the store, never the body.
    assert store.calls == [("lock", "lock||me||snake", "o", 10)]


@pytest.mark.parametrize(
    ("target", "payload", "message"),
    [
        (LOCK, b"", "ExpiryInSeconds is not positive in lock store lockstore"),
        (LOCK, body(expiry=0), "ExpiryInSeconds is not positive in lock store lockstore"),
        (LOCK, body(expiry=-5), "ExpiryInSeconds is not positive in lock store lockstore"),
        (LOCK, body(resource=""), "ResourceId is empty in lock store lockstore"),
        (LOCK, body(owner=""), "LockOwner is empty in lock store lockstore"),
        (UNLOCK, b"", "ResourceId is empty in lock store lockstore"),
        (UNLOCK, {"resourceId": "r"}, "LockOwner is empty in lock store lockstore"),
    ],
)
def test_missing_fields_are_malformed(target: str, payload: Any, message: str) -> None:
    r, store = lock_rig()
    assert_error(r("POST", target, body=payload), 400, "ERR_MALFORMED_REQUEST", message)
    assert store.calls == []


BAD_BODIES = [
    b"{not json",
    b"[1, 2]",
    b'"text"',
    b"\xff\xfe",
    b'{"resourceId": 5, "lockOwner": "o"}',
    b'{"resourceId": "r", "lockOwner": ["o"]}',
]
# Only TryLockRequest has the field: an unlock body ignores it as unknown.
BAD_EXPIRIES = [
    b'{"resourceId": "r", "lockOwner": "o", "expiryInSeconds": 1.5}',
    b'{"resourceId": "r", "lockOwner": "o", "expiryInSeconds": true}',
    b'{"resourceId": "r", "lockOwner": "o", "expiryInSeconds": "soon"}',
    b'{"resourceId": "r", "lockOwner": "o", "expiryInSeconds": 3000000000}',
]


@pytest.mark.parametrize(
    ("target", "payload"),
    [(t, b) for b in BAD_BODIES for t in (LOCK, UNLOCK)] + [(LOCK, b) for b in BAD_EXPIRIES],
)
def test_undecodable_bodies(target: str, payload: bytes) -> None:
    r, store = lock_rig()
    resp = r("POST", target, body=payload)
    assert_error(resp, 400, "ERR_MALFORMED_REQUEST")
    assert json.loads(resp.body)["message"].startswith("failed deserializing HTTP body: ")
    assert store.calls == []


def test_no_lock_store_configured() -> None:
    r = rig()  # no lock block at all
    for target in (LOCK, UNLOCK):
        assert_error(
            r("POST", target, body=body()),
            500,
            "ERR_LOCK_STORE_NOT_CONFIGURED",
            "lock store is not configured",
        )


def test_unknown_store() -> None:
    r, _ = lock_rig()
    for target in ("/v1.0-alpha1/lock/nope", "/v1.0-alpha1/unlock/nope"):
        assert_error(
            r("POST", target, body=body()),
            400,
            "ERR_LOCK_STORE_NOT_FOUND",
            "lock store nope not found",
        )


def test_store_failures() -> None:
    r, _ = lock_rig(FakeLockStore(fail=LockError("boom")))
    assert_error(
        r("POST", LOCK, body=body()), 500, "ERR_TRY_LOCK", "failed to try acquiring lock: boom"
    )
    assert_error(r("POST", UNLOCK, body=body()), 500, "ERR_UNLOCK", "failed to release lock: boom")


def test_store_name_is_url_decoded() -> None:
    r, store = lock_rig()
    r.api.lock = LockBlock("me", {"my store": LockEntry("my store", store)})
    resp = r("POST", "/v1.0-alpha1/lock/my%20store", body=body())
    assert resp.status == 200


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_only_post(method: str) -> None:
    r, _ = lock_rig()
    assert r(method, LOCK, body=body()).status == 405
    assert r(method, UNLOCK, body=body()).status == 405


@pytest.mark.parametrize(
    "target",
    [
        "/v1.0/lock/lockstore",
        "/v1.0/unlock/lockstore",
        "/v1.0-alpha1/lock",
        "/v1.0-alpha1/lock/",
        "/v1.0-alpha1/unlock/lockstore/extra",
    ],
)
def test_other_lock_paths_are_404(target: str) -> None:
    r, store = lock_rig()
    assert_error(r("POST", target, body=body()), 404, "ERR_BAD_REQUEST")
    assert store.calls == [] and r.app.calls == [] and r.link.calls == []


def test_token_is_required() -> None:
    r, store = lock_rig(token="s3cret")
    assert r("POST", LOCK, body=body()).status == 401
    resp = r("POST", LOCK, body=body(), headers=[(b"dapr-api-token", b"s3cret")])
    assert resp.status == 200
    assert len(store.calls) == 1
