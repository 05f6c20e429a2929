"""Distributed lock through real sidecars: HTTP and the official SDK, lock.sqlite and lock.redis."""

from __future__ import annotations

import socket
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from dapr.clients import DaprClient
from dapr.clients.exceptions import DaprGrpcError
from dapr.clients.grpc._response import TryLockResponse, UnlockResponse, UnlockResponseStatus

from pillion.testing.procs import Sidecar, start_sidecar
from tests.conformance.conftest import require_server
from tests.e2e.conftest import call

RUN = uuid.uuid4().hex[:8]
REDIS_DB = "11"


def _component(name: str, kind: str, md: dict[str, str]) -> str:
    items = "".join(f'  - name: {k}\n    value: "{v}"\n' for k, v in md.items())
    return (
        f"apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\n"
        f"spec:\n  type: {kind}\n  version: v1\n  metadata:\n{items}"
    )


def _redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class Locks:
    alpha: Sidecar
    beta: Sidecar
    redis: bool


@pytest.fixture(scope="module")
def locks(tmp_path_factory: pytest.TempPathFactory, home: Path) -> Iterator[Locks]:
    """Two sidecars (apps alpha-*, beta-*) over one lock.db, plus lock.redis when Redis runs."""
    res = tmp_path_factory.mktemp("locks")
    db = str(res / "lock.db")
    docs = [
        _component("lockstore", "lock.sqlite", {"connectionString": db}),
        # keyPrefix none: both apps name the same lock, so their sidecars contend for it.
        _component("sharedlock", "lock.sqlite", {"connectionString": db, "keyPrefix": "none"}),
    ]
    redis = _redis_up()
    if redis:
        docs.append(
            _component(
                "redislock", "lock.redis", {"redisHost": "127.0.0.1:6379", "redisDB": REDIS_DB}
            )
        )
    (res / "locks.yaml").write_text("---\n".join(docs))
    alpha = start_sidecar(f"alpha-{RUN}", home=home, resources=[res])
    beta = start_sidecar(f"beta-{RUN}", home=home, resources=[res])
    yield Locks(alpha, beta, redis)
    alpha.proc.stop()
    beta.proc.stop()
    if redis:
        import redis as redis_py

        r = redis_py.Redis(host="127.0.0.1", port=6379, db=int(REDIS_DB))
        for key in r.scan_iter(f"lock||*{RUN}*"):
            r.delete(key)
        r.close()


STORES = ["lockstore", "redislock"]


def _store(locks: Locks, store: str) -> str:
    if store == "redislock":
        require_server("redis", "127.0.0.1", 6379)
        assert locks.redis, "redis came up after the sidecars started"
    return store


def lock(port: int, store: str, resource: str, owner: str, expiry: int = 30) -> bytes:
    body = f'{{"resourceId":"{resource}","lockOwner":"{owner}","expiryInSeconds":{expiry}}}'
    r = call(port, "POST", f"/v1.0-alpha1/lock/{store}", body=body)
    assert r.status == 200, r.body
    assert r.headers["content-type"] == "application/json"
    return r.body


def unlock(port: int, store: str, resource: str, owner: str) -> bytes:
    body = f'{{"resourceId":"{resource}","lockOwner":"{owner}"}}'
    r = call(port, "POST", f"/v1.0-alpha1/unlock/{store}", body=body)
    assert r.status == 200, r.body
    assert r.headers["content-type"] == "application/json"
    return r.body


# --- HTTP --------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", STORES)
def test_http_lock_and_unlock(locks: Locks, store: str) -> None:
    store = _store(locks, store)
    p, res = locks.alpha.http_port, f"http-{RUN}"
    assert lock(p, store, res, "owner-1") == b'{"success":true}'
    assert lock(p, store, res, "owner-2") == b'{"success":false}'
    assert unlock(p, store, res, "owner-2") == b'{"status":2}'
    assert unlock(p, store, res, "owner-1") == b'{"status":0}'
    assert unlock(p, store, res, "owner-1") == b'{"status":1}'


@pytest.mark.parametrize("store", STORES)
def test_http_expiry(locks: Locks, store: str) -> None:
    from pillion.testing.procs import wait_until

    store = _store(locks, store)
    p, res = locks.alpha.http_port, f"expiry-{RUN}"
    assert lock(p, store, res, "owner-1", expiry=1) == b'{"success":true}'
    wait_until(lambda: lock(p, store, res, "owner-2") == b'{"success":true}', 5, "lock expiry")
    assert unlock(p, store, res, "owner-1") == b'{"status":2}'
    assert unlock(p, store, res, "owner-2") == b'{"status":0}'


def test_http_errors(locks: Locks) -> None:
    p = locks.alpha.http_port
    r = call(p, "POST", "/v1.0-alpha1/lock/lockstore", body='{"resourceId":"r","lockOwner":"o"}')
    assert r.status == 400
    assert r.json() == {
        "errorCode": "ERR_MALFORMED_REQUEST",
        "message": "ExpiryInSeconds is not positive in lock store lockstore",
    }
    r = call(p, "POST", "/v1.0-alpha1/unlock/lockstore", body='{"lockOwner":"o"}')
    assert (r.status, r.json()["message"]) == (400, "ResourceId is empty in lock store lockstore")
    r = call(
        p,
        "POST",
        "/v1.0-alpha1/lock/nope",
        body='{"resourceId":"r","lockOwner":"o","expiryInSeconds":5}',
    )
    assert r.status == 400
    assert r.json() == {
        "errorCode": "ERR_LOCK_STORE_NOT_FOUND",
        "message": "lock store nope not found",
    }
    r = call(p, "POST", "/v1.0-alpha1/lock/lockstore", body="{oops")
    assert r.status == 400 and r.json()["errorCode"] == "ERR_MALFORMED_REQUEST"
    r = call(
        p,
        "POST",
        "/v1.0-alpha1/lock/lockstore",
        body='{"resourceId":"a||b","lockOwner":"o","expiryInSeconds":5}',
    )
    assert r.status == 500
    assert r.json() == {
        "errorCode": "ERR_TRY_LOCK",
        "message": "failed to try acquiring lock: input key/keyPrefix 'a||b' can't contain '||'",
    }


def test_no_lock_store(home: Path, tmp_path: Path) -> None:
    sc = start_sidecar(f"nolock-{RUN}", home=home, resources=[tmp_path])
    try:
        for op in ("lock", "unlock"):
            r = call(
                sc.http_port,
                "POST",
                f"/v1.0-alpha1/{op}/lockstore",
                body='{"resourceId":"r","lockOwner":"o","expiryInSeconds":5}',
            )
            assert r.status == 500
            assert r.json() == {
                "errorCode": "ERR_LOCK_STORE_NOT_CONFIGURED",
                "message": "lock store is not configured",
            }
    finally:
        sc.proc.stop()


def test_metadata_lists_lock_stores(locks: Locks) -> None:
    md = call(locks.alpha.http_port, "GET", "/v1.0/metadata").json()
    comps = {c["name"]: c for c in md["components"]}
    assert comps["lockstore"]["type"] == "lock.sqlite"
    assert comps["lockstore"]["version"] == "v1"
    assert "capabilities" not in comps["lockstore"]  # lock stores declare no features
    if locks.redis:
        assert comps["redislock"]["type"] == "lock.redis"


# --- two sidecars ------------------------------------------------------------------------------


def test_two_sidecars_contend_for_one_lock(locks: Locks) -> None:
    res = f"contended-{RUN}"
    ports = [locks.alpha.http_port, locks.beta.http_port]
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(
            pool.map(
                lambda i: lock(ports[i % 2], "sharedlock", res, f"owner-{i}"),
                range(20),
            )
        )
    assert answers.count(b'{"success":true}') == 1, answers
    assert answers.count(b'{"success":false}') == 19
    winner = answers.index(b'{"success":true}')
    other = ports[(winner + 1) % 2]
    # The other sidecar sees the lock as someone else's; its owner releases it through either.
    assert unlock(other, "sharedlock", res, "intruder") == b'{"status":2}'
    assert unlock(other, "sharedlock", res, f"owner-{winner}") == b'{"status":0}'


def test_default_prefix_keeps_apps_apart(locks: Locks) -> None:
    # keyPrefix appid (the default): the same resource id is a different lock per app.
    res = f"per-app-{RUN}"
    assert lock(locks.alpha.http_port, "lockstore", res, "a") == b'{"success":true}'
    assert lock(locks.beta.http_port, "lockstore", res, "b") == b'{"success":true}'
    # Beta's lock of that name is b's: alpha's owner cannot release it there.
    assert unlock(locks.beta.http_port, "lockstore", res, "a") == b'{"status":2}'
    assert unlock(locks.alpha.http_port, "lockstore", res, "a") == b'{"status":0}'
    assert unlock(locks.beta.http_port, "lockstore", res, "b") == b'{"status":0}'


# --- the official SDK over gRPC ----------------------------------------------------------------


@pytest.fixture
def sdk(locks: Locks, monkeypatch: pytest.MonkeyPatch) -> Iterator[DaprClient]:
    monkeypatch.setenv("DAPR_HTTP_PORT", str(locks.alpha.http_port))
    monkeypatch.setenv("DAPR_GRPC_PORT", str(locks.alpha.grpc_port))
    monkeypatch.delenv("DAPR_GRPC_ENDPOINT", raising=False)
    monkeypatch.delenv("DAPR_API_TOKEN", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the SDK warns that the lock API is alpha
        with DaprClient() as d:
            yield d


@pytest.mark.parametrize("store", STORES)
def test_sdk_try_lock_and_unlock(locks: Locks, sdk: DaprClient, store: str) -> None:
    store = _store(locks, store)
    res = f"sdk-{RUN}"
    got = sdk.try_lock(store, res, "owner-1", 30)
    assert isinstance(got, TryLockResponse)
    assert got.success and bool(got)
    refused = sdk.try_lock(store, res, "owner-2", 30)
    assert not refused.success and not refused
    resp = sdk.unlock(store, res, "owner-2")
    assert isinstance(resp, UnlockResponse)
    assert resp.status == UnlockResponseStatus.lock_belongs_to_others
    assert sdk.unlock(store, res, "owner-1").status == UnlockResponseStatus.success
    assert sdk.unlock(store, res, "owner-1").status == UnlockResponseStatus.lock_does_not_exist


@pytest.mark.parametrize("store", STORES)
def test_sdk_context_manager(locks: Locks, sdk: DaprClient, store: str) -> None:
    store = _store(locks, store)
    res = f"sdk-cm-{RUN}"
    with sdk.try_lock(store, res, "owner-1", 60) as held:
        assert held
        # Held: another owner, here over HTTP on the same sidecar, is refused.
        assert lock(locks.alpha.http_port, store, res, "owner-2") == b'{"success":false}'
    # The with-block unlocked it.
    assert unlock(locks.alpha.http_port, store, res, "owner-1") == b'{"status":1}'


def test_sdk_errors(sdk: DaprClient) -> None:
    with pytest.raises(grpc.RpcError) as info:
        sdk.try_lock("nope", "r", "o", 10)
    err = DaprGrpcError(info.value)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "lock store nope not found"
    with pytest.raises(ValueError):
        sdk.try_lock("lockstore", "r", "o", 0)  # the SDK checks this before calling
