"""State RPCs over generated grpc.aio stubs: Dapr's semantics and error details."""

from __future__ import annotations

import grpc
import pytest
from dapr.proto.common.v1 import common_pb2
from dapr.proto.runtime.v1 import dapr_pb2_grpc, state_pb2

from tests.unit.grpc.conftest import GrpcSidecar
from tests.unit.grpc.rich import details_of

Stub = dapr_pb2_grpc.DaprStub
Opts = common_pb2.StateOptions
STORE = "statestore"


def item(
    key: str, value: bytes = b"v", etag: str | None = None, **kw: object
) -> common_pb2.StateItem:
    it = common_pb2.StateItem(key=key, value=value, **kw)  # type: ignore[arg-type]
    if etag is not None:
        it.etag.value = etag
    return it


async def save(stub: Stub, *items: common_pb2.StateItem, store: str = STORE) -> None:
    await stub.SaveState(state_pb2.SaveStateRequest(store_name=store, states=list(items)))


async def get(stub: Stub, key: str, store: str = STORE) -> state_pb2.GetStateResponse:
    return await stub.GetState(state_pb2.GetStateRequest(store_name=store, key=key))


def failure(sidecar: GrpcSidecar, fn) -> grpc.aio.AioRpcError:  # type: ignore[no-untyped-def]
    async def main(stub: Stub) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await fn(stub)
        return info.value

    return sidecar.run(main)


def test_missing_key_is_an_empty_response(sidecar: GrpcSidecar) -> None:
    resp = sidecar.run(lambda stub: get(stub, "never-written"))
    assert (resp.data, resp.etag, dict(resp.metadata)) == (b"", "", {})


def test_save_get_and_etags(sidecar: GrpcSidecar) -> None:
    async def main(stub: Stub) -> None:
        await save(stub, item("crud", b"\x00raw bytes"))
        first = await get(stub, "crud")
        assert first.data == b"\x00raw bytes"  # gRPC values are stored as-is
        assert first.etag
        await save(stub, item("crud", b"two", etag=first.etag))
        second = await get(stub, "crud")
        assert second.data == b"two" and second.etag != first.etag
        # An empty etag message means "no etag": an unconditional write.
        await save(stub, item("crud", b"three", etag=""))
        # last-write ignores a stale etag.
        await save(
            stub,
            item(
                "crud",
                b"four",
                etag=first.etag,
                options=Opts(concurrency=Opts.CONCURRENCY_LAST_WRITE),
            ),
        )
        assert (await get(stub, "crud")).data == b"four"

    sidecar.run(main)


def test_etag_mismatch_is_aborted_with_err_state_save(sidecar: GrpcSidecar) -> None:
    sidecar.run(lambda stub: save(stub, item("mismatch")))
    err = failure(sidecar, lambda stub: save(stub, item("mismatch", etag="999999")))
    assert err.code() == grpc.StatusCode.ABORTED
    assert "possible etag mismatch" in (err.details() or "")
    assert details_of(err)["ErrorInfo"].reason == "ERR_STATE_SAVE"
    assert details_of(err)["ErrorInfo"].domain == "dapr.io"


def test_invalid_etag_is_invalid_argument(sidecar: GrpcSidecar) -> None:
    err = failure(sidecar, lambda stub: save(stub, item("badetag", etag="not-a-number")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(err)["ErrorInfo"].reason == "ERR_STATE_SAVE"


def test_first_write_refuses_an_existing_key(sidecar: GrpcSidecar) -> None:
    first = item("fw", options=Opts(concurrency=Opts.CONCURRENCY_FIRST_WRITE))
    sidecar.run(lambda stub: save(stub, first))
    err = failure(sidecar, lambda stub: save(stub, first))
    assert err.code() == grpc.StatusCode.ABORTED


def test_delete_with_etags(sidecar: GrpcSidecar) -> None:
    async def main(stub: Stub) -> None:
        await save(stub, item("del"))
        etag = (await get(stub, "del")).etag
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.DeleteState(
                state_pb2.DeleteStateRequest(
                    store_name=STORE, key="del", etag=common_pb2.Etag(value="12345678")
                )
            )
        assert info.value.code() == grpc.StatusCode.ABORTED
        assert details_of(info.value)["ErrorInfo"].reason == "ERR_STATE_DELETE"
        await stub.DeleteState(
            state_pb2.DeleteStateRequest(
                store_name=STORE, key="del", etag=common_pb2.Etag(value=etag)
            )
        )
        assert (await get(stub, "del")).data == b""
        # Deleting an absent key without an etag succeeds.
        await stub.DeleteState(state_pb2.DeleteStateRequest(store_name=STORE, key="del"))

    sidecar.run(main)


def test_unknown_store_is_invalid_argument_dapr_state_not_found(sidecar: GrpcSidecar) -> None:
    err = failure(sidecar, lambda stub: get(stub, "k", store="nope"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "state store nope is not found"
    d = details_of(err)
    assert d["ErrorInfo"].reason == "DAPR_STATE_NOT_FOUND"
    assert dict(d["ErrorInfo"].metadata) == {"appID": "app"}
    assert (d["ResourceInfo"].resource_type, d["ResourceInfo"].resource_name) == ("state", "nope")


def test_illegal_key_has_a_bad_request_detail(sidecar: GrpcSidecar) -> None:
    err = failure(sidecar, lambda stub: save(stub, item("a||b")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    d = details_of(err)
    assert d["ErrorInfo"].reason == "DAPR_STATE_ILLEGAL_KEY"
    assert [v.field for v in d["BadRequest"].field_violations] == ["a||b"]


def test_missing_key_field_is_malformed(sidecar: GrpcSidecar) -> None:
    err = failure(sidecar, lambda stub: save(stub, item("")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == '"key" is a required field'


def test_bulk_get_keeps_key_order_and_reports_missing_keys(sidecar: GrpcSidecar) -> None:
    async def main(stub: Stub) -> state_pb2.GetBulkStateResponse:
        await save(stub, item("b1", b"1"), item("b2", b"2"))
        return await stub.GetBulkState(
            state_pb2.GetBulkStateRequest(
                store_name=STORE, keys=["b2", "missing", "b1"], parallelism=7
            )
        )

    resp = sidecar.run(main)
    assert [(i.key, i.data, bool(i.etag), i.error) for i in resp.items] == [
        ("b2", b"2", True, ""),
        ("missing", b"", False, ""),
        ("b1", b"1", True, ""),
    ]


def test_delete_bulk_state(sidecar: GrpcSidecar) -> None:
    async def main(stub: Stub) -> list[bytes]:
        await save(stub, item("d1"), item("d2"), item("d3"))
        await stub.DeleteBulkState(
            state_pb2.DeleteBulkStateRequest(store_name=STORE, states=[item("d1"), item("d2")])
        )
        return [(await get(stub, k)).data for k in ("d1", "d2", "d3")]

    assert sidecar.run(main) == [b"", b"", b"v"]


def test_transaction_upserts_and_deletes(sidecar: GrpcSidecar) -> None:
    async def main(stub: Stub) -> list[bytes]:
        await save(stub, item("t-old"))
        await stub.ExecuteStateTransaction(
            state_pb2.ExecuteStateTransactionRequest(
                storeName=STORE,
                operations=[
                    state_pb2.TransactionalStateOperation(
                        operationType="upsert", request=item("t-new", b"n")
                    ),
                    state_pb2.TransactionalStateOperation(
                        operationType="delete", request=item("t-old")
                    ),
                ],
            )
        )
        return [(await get(stub, k)).data for k in ("t-new", "t-old")]

    assert sidecar.run(main) == [b"n", b""]


def test_transaction_errors(sidecar: GrpcSidecar) -> None:
    def tx(store: str, op: str):  # type: ignore[no-untyped-def]
        return lambda stub: stub.ExecuteStateTransaction(
            state_pb2.ExecuteStateTransactionRequest(
                storeName=store,
                operations=[
                    state_pb2.TransactionalStateOperation(operationType=op, request=item("x"))
                ],
            )
        )

    err = failure(sidecar, tx(STORE, "merge"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "operation type merge not supported"
    err = failure(sidecar, tx("notx", "upsert"))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert details_of(err)["ErrorInfo"].reason == "DAPR_STATE_TRANSACTIONS_NOT_SUPPORTED"
    # A stale etag inside a transaction fails the whole transaction.
    stale = state_pb2.ExecuteStateTransactionRequest(
        storeName=STORE,
        operations=[
            state_pb2.TransactionalStateOperation(operationType="upsert", request=item("tx-a")),
            state_pb2.TransactionalStateOperation(
                operationType="upsert", request=item("tx-b", etag="424242")
            ),
        ],
    )
    err = failure(sidecar, lambda stub: stub.ExecuteStateTransaction(stale))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert sidecar.run(lambda stub: get(stub, "tx-a")).data == b""


def test_query_looks_up_the_store_then_reports_no_query_support(sidecar: GrpcSidecar) -> None:
    def query(store: str):  # type: ignore[no-untyped-def]
        return lambda stub: stub.QueryStateAlpha1(
            state_pb2.QueryStateRequest(store_name=store, query='{"filter": {}}')
        )

    err = failure(sidecar, query("nope"))
    assert details_of(err)["ErrorInfo"].reason == "DAPR_STATE_NOT_FOUND"
    err = failure(sidecar, query(STORE))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert details_of(err)["ErrorInfo"].reason == "DAPR_STATE_QUERYING_NOT_SUPPORTED"


def test_request_and_response_metadata_travel(sidecar: GrpcSidecar) -> None:
    async def main(stub: Stub) -> state_pb2.GetStateResponse:
        await save(stub, item("ttl", metadata={"ttlInSeconds": "100"}))
        return await get(stub, "ttl")

    assert "ttlExpireTime" in sidecar.run(main).metadata
