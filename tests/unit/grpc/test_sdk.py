"""The official Python SDK (dapr 1.19) against the gRPC API: what its users see."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator

import grpc
import pytest
from dapr.aio.clients import DaprClient as AsyncDaprClient
from dapr.clients import DaprClient
from dapr.clients.exceptions import DaprGrpcError
from dapr.clients.grpc._jobs import Job
from dapr.clients.grpc._request import TransactionalStateOperation, TransactionOperationType
from dapr.clients.grpc._state import Concurrency, StateOptions

from pillion.blocks.invoke import InvokeResponse
from tests.unit.grpc.conftest import GrpcSidecar

STORE = "statestore"


@pytest.fixture
def sdk_env(healthz_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAPR_HTTP_PORT", str(healthz_port))
    monkeypatch.setenv("DAPR_HEALTH_TIMEOUT", "5")
    monkeypatch.setenv("DAPR_API_METHOD_INVOCATION_PROTOCOL", "grpc")
    monkeypatch.delenv("DAPR_API_TOKEN", raising=False)
    monkeypatch.delenv("DAPR_GRPC_ENDPOINT", raising=False)


@pytest.fixture
def client(sidecar: GrpcSidecar, sdk_env: None) -> Iterator[DaprClient]:
    with DaprClient(address=sidecar.address) as c:
        yield c


def test_state_crud_with_etags(client: DaprClient) -> None:
    client.save_state(STORE, "sdk-k", "hello")
    got = client.get_state(STORE, "sdk-k")
    assert got.data == b"hello" and got.etag
    client.save_state(STORE, "sdk-k", "again", etag=got.etag)
    with pytest.raises(DaprGrpcError) as info:
        client.save_state(STORE, "sdk-k", "stale", etag=got.etag)
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert info.value.error_code() == "ERR_STATE_SAVE"
    with pytest.raises(DaprGrpcError) as info:
        client.save_state(
            STORE, "sdk-k", "x", options=StateOptions(concurrency=Concurrency.first_write)
        )
    assert info.value.error_code() == "ERR_STATE_SAVE"
    with pytest.raises(DaprGrpcError) as info:
        client.delete_state(STORE, "sdk-k", etag=got.etag)
    assert info.value.error_code() == "ERR_STATE_DELETE"
    client.delete_state(STORE, "sdk-k", etag=client.get_state(STORE, "sdk-k").etag)
    assert client.get_state(STORE, "sdk-k").data == b""


def test_unknown_store_and_illegal_key(client: DaprClient) -> None:
    with pytest.raises(DaprGrpcError) as info:
        client.get_state("nope", "k")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.error_code() == "DAPR_STATE_NOT_FOUND"
    with pytest.raises(DaprGrpcError) as info:
        client.save_state(STORE, "a||b", "v")
    assert info.value.error_code() == "DAPR_STATE_ILLEGAL_KEY"
    bad = info.value.status_details().bad_request
    assert bad["field_violations"][0]["field"] == "a||b"


def test_bulk_transaction_and_query(client: DaprClient) -> None:
    client.execute_state_transaction(
        STORE,
        [
            TransactionalStateOperation("sdk-t1", "one"),
            TransactionalStateOperation("sdk-t2", "two"),
        ],
    )
    client.execute_state_transaction(
        STORE,
        [TransactionalStateOperation("sdk-t2", operation_type=TransactionOperationType.delete)],
    )
    items = client.get_bulk_state(STORE, ["sdk-t2", "sdk-t1"]).items
    assert [(i.key, i.data) for i in items] == [("sdk-t2", b""), ("sdk-t1", b"one")]
    with warnings.catch_warnings(), pytest.raises(DaprGrpcError) as info:
        warnings.simplefilter("ignore", UserWarning)  # "an Alpha version"
        client.query_state(STORE, '{"filter": {}}')
    assert info.value.error_code() == "DAPR_STATE_QUERYING_NOT_SUPPORTED"


def test_metadata_and_shutdown(sidecar: GrpcSidecar, client: DaprClient) -> None:
    client.set_metadata("sdk-attr", "on")
    md = client.get_metadata()
    assert md.application_id == "app"
    assert md.extended_metadata["sdk-attr"] == "on"
    assert [c.name for c in md.registered_components] == [STORE]
    before = sidecar.shutdowns
    client.shutdown()
    assert sidecar.shutdowns == before + 1


def test_invoke_method_over_grpc(sidecar: GrpcSidecar, client: DaprClient) -> None:
    sidecar.link.calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        resp = client.invoke_method(
            "other",
            "orders",
            data=b'{"id": 1}',
            content_type="application/json",
            http_verb="GET",
            http_querystring=(("page", "2"),),
        )
        assert resp.data == b"remote"
        assert resp.content_type == "text/plain"
        assert resp.headers["dapr-http-status"] == ["200"]
        call = sidecar.link.calls[-1]
        assert (call.verb, call.target, call.body) == ("GET", b"/orders?page=2", b'{"id": 1}')
        assert call.header(b"content-type") == b"application/json"

        sidecar.link.responses.append(InvokeResponse(404, b"Not Found", [], b"no such order"))
        # invoke_method lets the raw RpcError through; DaprGrpcError is how users decode it.
        with pytest.raises(grpc.RpcError) as raw:
            client.invoke_method("other", "orders", data=b"", http_verb="GET")
        err = DaprGrpcError(raw.value)
        assert err.code() == grpc.StatusCode.NOT_FOUND
        assert err.error_code() == "Not Found"
        assert err.status_details().error_info["metadata"] == {
            "http.code": "404",
            "http.error_message": "no such order",
        }


def test_unimplemented_blocks_and_sdk_fallbacks(client: DaprClient) -> None:
    with pytest.raises(DaprGrpcError) as info:
        client.publish_event("pubsub", "topic", b"{}")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "pub/sub" in (info.value.details() or "")
    # schedule_job retries ScheduleJobAlpha1 on UNIMPLEMENTED; both answer it.
    with pytest.raises(DaprGrpcError) as info:
        client.schedule_job(Job(name="j", schedule="@every 1s"))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "jobs" in (info.value.details() or "")


def test_async_client(sidecar: GrpcSidecar, sdk_env: None) -> None:
    async def main() -> None:
        async with AsyncDaprClient(address=sidecar.address) as c:
            await c.save_state(STORE, "sdk-async", "v")
            assert (await c.get_state(STORE, "sdk-async")).data == b"v"
            with pytest.raises(DaprGrpcError) as info:
                await c.get_state("nope", "k")
            assert info.value.error_code() == "DAPR_STATE_NOT_FOUND"

    asyncio.run(main())


def test_api_token(sdk_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with GrpcSidecar(api_token="s3cret") as sc:
        with DaprClient(address=sc.address) as c, pytest.raises(DaprGrpcError) as info:
            c.get_state(STORE, "k")
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        monkeypatch.setenv("DAPR_API_TOKEN", "s3cret")
        with DaprClient(address=sc.address) as c:
            assert c.get_state(STORE, "k").data == b""
