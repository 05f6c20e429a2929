"""TryLockAlpha1 / UnlockAlpha1 over a real lock.sqlite store, with raw stubs and the SDK."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from dapr.clients import DaprClient
from dapr.clients.exceptions import DaprGrpcError
from dapr.clients.grpc._response import TryLockResponse, UnlockResponse, UnlockResponseStatus
from dapr.proto.runtime.v1 import dapr_pb2_grpc, lock_pb2
from google.rpc import status_pb2

from pillion.api.grpc.dapr_api import DaprApi
from pillion.api.grpc.server import start_grpc_server
from pillion.blocks.invoke import InvokeBlock
from pillion.blocks.lock import LockBlock, LockEntry
from pillion.blocks.metadata import MetadataBlock
from pillion.blocks.state import StateBlock
from pillion.components.lock.sqlite import SQLiteLockStore
from pillion.components.metadata import ComponentInfo, Properties
from tests.unit.grpc.conftest import GrpcSidecar, Link, Resolver

APP_ID = "app"
STORE = "lockstore"


class LockSidecar:
    """The gRPC API with one lock.sqlite store, on its own loop in a background thread."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> LockSidecar:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        self.store = SQLiteLockStore()
        props = Properties({"connectionString": str(self.db)})
        await self.store.init(ComponentInfo(STORE, "lock.sqlite", "v1", APP_ID, props))
        api = DaprApi(
            state=StateBlock(APP_ID, "", {}),
            invoke=InvokeBlock(APP_ID, "", Resolver(), Link(), None),
            metadata=MetadataBlock(APP_ID, lambda: []),
            request_shutdown=lambda: None,
            app_id=APP_ID,
            lock=LockBlock(APP_ID, {STORE: LockEntry(STORE, self.store)}),
        )
        self.server, self.port = await start_grpc_server(
            api, host="127.0.0.1", port=0, max_message_size=4 << 20, api_token=None
        )

    async def _stop(self) -> None:
        await self.server.stop(None)
        await self.store.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def lock_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LockSidecar]:
    with LockSidecar(tmp_path_factory.mktemp("lock") / "lock.db") as s:
        yield s


@pytest.fixture
def stub(lock_sidecar: LockSidecar) -> Iterator[dapr_pb2_grpc.DaprStub]:
    with grpc.insecure_channel(lock_sidecar.address) as ch:
        yield dapr_pb2_grpc.DaprStub(ch)


def try_lock(
    stub: dapr_pb2_grpc.DaprStub, resource: str, owner: str, expiry: int = 10, store: str = STORE
) -> bool:
    req = lock_pb2.TryLockRequest(
        store_name=store, resource_id=resource, lock_owner=owner, expiry_in_seconds=expiry
    )
    return bool(stub.TryLockAlpha1(req).success)


def unlock(stub: dapr_pb2_grpc.DaprStub, resource: str, owner: str, store: str = STORE) -> int:
    req = lock_pb2.UnlockRequest(store_name=store, resource_id=resource, lock_owner=owner)
    return int(stub.UnlockAlpha1(req).status)


def test_try_lock_and_unlock(stub: dapr_pb2_grpc.DaprStub) -> None:
    assert try_lock(stub, "stub-r", "o1") is True
    assert try_lock(stub, "stub-r", "o2") is False
    assert unlock(stub, "stub-r", "o2") == lock_pb2.UnlockResponse.LOCK_BELONGS_TO_OTHERS
    assert unlock(stub, "stub-r", "o1") == lock_pb2.UnlockResponse.SUCCESS
    assert unlock(stub, "stub-r", "o1") == lock_pb2.UnlockResponse.LOCK_DOES_NOT_EXIST


def test_keys_are_prefixed_in_the_store(
    stub: dapr_pb2_grpc.DaprStub, lock_sidecar: LockSidecar
) -> None:
    assert try_lock(stub, "prefixed", "o1")
    with sqlite3.connect(lock_sidecar.db) as c:
        rows = c.execute("SELECT resource, owner FROM locks WHERE owner = 'o1'").fetchall()
    assert ("lock||app||prefixed", "o1") in rows
    assert unlock(stub, "prefixed", "o1") == 0


@pytest.mark.parametrize(
    ("kwargs", "code", "details"),
    [
        (
            {"expiry": 0},
            grpc.StatusCode.INVALID_ARGUMENT,
            "ExpiryInSeconds is not positive in lock store lockstore",
        ),
        (
            {"resource": ""},
            grpc.StatusCode.INVALID_ARGUMENT,
            "ResourceId is empty in lock store lockstore",
        ),
        (
            {"owner": ""},
            grpc.StatusCode.INVALID_ARGUMENT,
            "LockOwner is empty in lock store lockstore",
        ),
        ({"store": "nope"}, grpc.StatusCode.INVALID_ARGUMENT, "lock store nope not found"),
        (
            {"resource": "a||b"},
            grpc.StatusCode.INTERNAL,
            "failed to try acquiring lock: input key/keyPrefix 'a||b' can't contain '||'",
        ),
    ],
)
def test_try_lock_errors(
    stub: dapr_pb2_grpc.DaprStub, kwargs: dict[str, object], code: grpc.StatusCode, details: str
) -> None:
    args: dict[str, object] = {"resource": "r", "owner": "o", "expiry": 10, "store": STORE}
    args.update(kwargs)
    with pytest.raises(grpc.RpcError) as info:
        try_lock(stub, **args)  # type: ignore[arg-type]
    err = info.value
    assert err.code() == code
    assert err.details() == details
    # Legacy errors: no rich details (no ErrorInfo) in the status.
    trailing = dict(err.trailing_metadata() or ())
    raw = trailing.get("grpc-status-details-bin")
    assert raw is None or list(status_pb2.Status.FromString(raw).details) == []


def test_unlock_errors(stub: dapr_pb2_grpc.DaprStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        unlock(stub, "r", "o", store="nope")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        unlock(stub, "a||b", "o")
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == (
        "failed to release lock: input key/keyPrefix 'a||b' can't contain '||'"
    )


def test_no_lock_store_is_failed_precondition(sidecar: GrpcSidecar) -> None:
    # The shared test sidecar has no lock store at all.
    async def main(s: dapr_pb2_grpc.DaprStub) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.TryLockAlpha1(
                lock_pb2.TryLockRequest(
                    store_name="l", resource_id="r", lock_owner="o", expiry_in_seconds=5
                )
            )
        return info.value

    err = sidecar.run(main)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == "lock store is not configured"


# --- the official SDK --------------------------------------------------------------------------


@pytest.fixture
def client(
    lock_sidecar: LockSidecar, healthz_port: int, monkeypatch: pytest.MonkeyPatch
) -> Iterator[DaprClient]:
    monkeypatch.setenv("DAPR_HTTP_PORT", str(healthz_port))
    monkeypatch.setenv("DAPR_HEALTH_TIMEOUT", "5")
    monkeypatch.delenv("DAPR_API_TOKEN", raising=False)
    monkeypatch.delenv("DAPR_GRPC_ENDPOINT", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The Distributed Lock API is an Alpha"
        with DaprClient(address=lock_sidecar.address) as c:
            yield c


def test_sdk_try_lock_and_unlock(client: DaprClient) -> None:
    first = client.try_lock(STORE, "sdk-r", "owner-1", 10)
    assert isinstance(first, TryLockResponse)
    assert first.success and bool(first)
    assert not client.try_lock(STORE, "sdk-r", "owner-2", 10)
    other = client.unlock(STORE, "sdk-r", "owner-2")
    assert isinstance(other, UnlockResponse)
    assert other.status == UnlockResponseStatus.lock_belongs_to_others
    assert client.unlock(STORE, "sdk-r", "owner-1").status == UnlockResponseStatus.success
    gone = client.unlock(STORE, "sdk-r", "owner-1")
    assert gone.status == UnlockResponseStatus.lock_does_not_exist


def test_sdk_context_manager_unlocks(client: DaprClient) -> None:
    with client.try_lock(STORE, "sdk-cm", "owner-1", 60) as lock:
        assert lock
        assert not client.try_lock(STORE, "sdk-cm", "owner-2", 60)
    # Left the block: unlocked, so someone else gets it at once.
    with client.try_lock(STORE, "sdk-cm", "owner-2", 60) as again:
        assert again


def test_sdk_errors(client: DaprClient) -> None:
    # try_lock lets the raw RpcError through; DaprGrpcError is how users decode it.
    with pytest.raises(grpc.RpcError) as info:
        client.try_lock("nope", "r", "o", 10)
    err = DaprGrpcError(info.value)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "lock store nope not found"
    assert err.error_code() == "UNKNOWN"  # legacy: no ErrorInfo reason
