"""StateBlock rules: store lookup, key prefixes, illegal keys, operations and error mapping."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from pillion.blocks.state import (
    SaveItem,
    StateBlock,
    StoreEntry,
    TxOperation,
    parse_concurrency,
    parse_consistency,
)
from pillion.components.state.api import (
    TTL_KEY,
    Concurrency,
    Consistency,
    DeleteRequest,
    ETagInvalid,
    ETagMismatch,
    SetRequest,
    StateError,
)
from pillion.components.state.inmemory import InMemoryStateStore
from pillion.errors import Code, GrpcCode, PillionError
from tests.unit.blocks.fakes import (
    MultiWithoutFeature,
    PlainStore,
    RecordingMemoryStore,
    TxOnlyByFeature,
    memory_store,
)


def run(fn: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(fn())  # type: ignore[arg-type]


def block(
    store: Any, *, name: str = "statestore", prefix: str = "appid", ns: str = ""
) -> StateBlock:
    return StateBlock("app", ns, {name: StoreEntry(name, store, prefix)})


def raises(aw: Awaitable[Any]) -> PillionError:
    async def go() -> PillionError:
        with pytest.raises(PillionError) as info:
            await aw
        return info.value

    return asyncio.run(go())


# --- store lookup -----------------------------------------------------------------------------


def test_no_stores_is_not_configured() -> None:
    err = raises(StateBlock("app", "", {}).get("statestore", "k"))
    assert err.code == Code.STATE_STORE_NOT_CONFIGURED.value == "ERR_STATE_STORE_NOT_CONFIGURED"
    assert err.http_status == 500
    assert err.grpc_code == GrpcCode.FAILED_PRECONDITION
    assert err.reason == "DAPR_STATE_NOT_CONFIGURED"
    assert err.message == "state store is not configured"


def test_unknown_store_is_not_found_with_app_id() -> None:
    err = raises(block(InMemoryStateStore()).get("nope", "k"))
    assert err.code == "ERR_STATE_STORE_NOT_FOUND"
    assert err.http_status == 400
    assert err.grpc_code == GrpcCode.INVALID_ARGUMENT
    assert err.message == "state store nope is not found"
    assert err.reason == "DAPR_STATE_NOT_FOUND"
    assert err.metadata == {"appID": "app"}
    assert (err.resource_type, err.resource_name) == ("state", "nope")


@pytest.mark.parametrize(
    "call",
    [
        lambda b: b.save("nope", [SaveItem("k", b"1")]),
        lambda b: b.delete("nope", "k"),
        lambda b: b.bulk_get("nope", ["k"]),
        lambda b: b.transaction("nope", []),
    ],
    ids=["save", "delete", "bulk_get", "transaction"],
)
def test_every_operation_looks_the_store_up(call: Callable[[StateBlock], Awaitable[Any]]) -> None:
    assert raises(call(block(InMemoryStateStore()))).code == "ERR_STATE_STORE_NOT_FOUND"


def test_capabilities_sorted_and_actor_flag() -> None:
    store = InMemoryStateStore()
    assert StoreEntry("s", store).capabilities() == ["ETAG", "TRANSACTIONAL", "TTL"]
    assert StoreEntry("s", store, actor_store=True).capabilities() == [
        "ETAG",
        "TRANSACTIONAL",
        "TTL",
        "ACTOR",
    ]


# --- storage keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "namespace", "expected"),
    [
        ("appid", "", "app||k"),
        ("AppID", "", "app||k"),
        ("name", "", "statestore||k"),
        ("namespace", "prod", "prod.app||k"),
        ("namespace", "", "app||k"),
        ("none", "", "k"),
        ("NONE", "", "k"),
        ("shared", "", "shared||k"),
    ],
)
def test_storage_key_strategies(prefix: str, namespace: str, expected: str) -> None:
    b = block(InMemoryStateStore(), prefix=prefix, ns=namespace)
    assert b.storage_key(b.entry("statestore"), "k") == expected


def test_custom_prefix_is_lowercased_like_dapr() -> None:
    b = block(InMemoryStateStore(), prefix="MyPrefix")
    assert b.storage_key(b.entry("statestore"), "k") == "myprefix||k"


def test_appid_prefix_with_empty_app_id_is_the_bare_key() -> None:
    b = StateBlock("", "", {"s": StoreEntry("s", InMemoryStateStore())})
    assert b.storage_key(b.entry("s"), "k") == "k"


def test_illegal_key_is_a_rich_malformed_request() -> None:
    b = block(InMemoryStateStore())
    with pytest.raises(PillionError) as info:
        b.storage_key(b.entry("statestore"), "a||b")
    err = info.value
    assert err.code == "ERR_MALFORMED_REQUEST"
    assert err.http_status == 400
    assert err.grpc_code == GrpcCode.INVALID_ARGUMENT
    assert err.reason == "DAPR_STATE_ILLEGAL_KEY"
    assert err.message == "input key/keyPrefix 'a||b' can't contain '||'"
    assert [v.field for v in err.violations] == ["a||b"]


def test_illegal_custom_prefix_is_rejected() -> None:
    b = block(InMemoryStateStore(), prefix="x||y")
    with pytest.raises(PillionError) as info:
        b.storage_key(b.entry("statestore"), "k")
    assert info.value.reason == "DAPR_STATE_ILLEGAL_KEY"
    assert "'x||y'" in info.value.message


@pytest.mark.parametrize(
    "call",
    [
        lambda b: b.get("statestore", "a||b"),
        lambda b: b.save("statestore", [SaveItem("a||b", b"1")]),
        lambda b: b.delete("statestore", "a||b"),
        lambda b: b.bulk_get("statestore", ["ok", "a||b"]),
        lambda b: b.transaction("statestore", [TxOperation("upsert", SaveItem("a||b", b"1"))]),
    ],
    ids=["get", "save", "delete", "bulk_get", "transaction"],
)
def test_every_operation_rejects_illegal_keys(call: Callable[[StateBlock], Any]) -> None:
    store = RecordingMemoryStore()
    err = raises(call(block(store)))
    assert (err.http_status, err.reason) == (400, "DAPR_STATE_ILLEGAL_KEY")
    assert not store.sets and not store.deletes and not store.multis and not store._data


def test_original_key() -> None:
    assert StateBlock.original_key("app||k") == "k"
    assert StateBlock.original_key("k") == "k"


# --- operations over the in-memory store ------------------------------------------------------


def test_save_get_delete_round_trip_with_prefixed_storage() -> None:
    async def main() -> None:
        async with memory_store() as store:
            b = block(store)
            await b.save("statestore", [SaveItem("k", b'"v"'), SaveItem("j", b"{}")])
            assert sorted(store._data) == ["app||j", "app||k"]
            got = await b.get("statestore", "k")
            assert got is not None
            assert got.data == b'"v"'
            assert got.etag is not None and got.etag.isdigit()
            assert dict(got.metadata) == {}
            await b.delete("statestore", "k")
            assert await b.get("statestore", "k") is None
            assert sorted(store._data) == ["app||j"]

    run(main)


def test_get_absent_key_is_none() -> None:
    async def main() -> None:
        async with memory_store() as store:
            assert await block(store).get("statestore", "missing") is None

    run(main)


def test_get_passes_consistency_and_metadata() -> None:
    async def main() -> None:
        store = RecordingMemoryStore()
        await block(store).get(
            "statestore", "k", consistency=Consistency.STRONG, metadata={"a": "1"}
        )
        (req,) = store.gets
        assert (req.key, dict(req.metadata), req.consistency) == (
            "app||k",
            {"a": "1"},
            Consistency.STRONG,
        )

    run(main)


def test_save_empty_list_is_a_no_op() -> None:
    async def main() -> None:
        store = RecordingMemoryStore()
        await block(store).save("statestore", [])
        assert store.sets == []

    run(main)


def test_save_missing_key_rejects_the_whole_batch() -> None:
    store = RecordingMemoryStore()
    err = raises(block(store).save("statestore", [SaveItem("ok", b"1"), SaveItem("", b"2")]))
    assert err.code == "ERR_MALFORMED_REQUEST"
    assert err.http_status == 400
    assert err.message == '"key" is a required field'
    assert store.sets == [] and store._data == {}


def test_save_passes_item_fields_to_the_store() -> None:
    async def main() -> None:
        store = RecordingMemoryStore()
        await block(store).save(
            "statestore",
            [
                SaveItem(
                    "k",
                    b"1",
                    None,
                    {"m": "v"},
                    Concurrency.LAST_WRITE,
                    Consistency.EVENTUAL,
                )
            ],
        )
        assert store.sets == [
            SetRequest(
                "app||k", b"1", None, {"m": "v"}, Concurrency.LAST_WRITE, Consistency.EVENTUAL
            )
        ]

    run(main)


def test_empty_etag_means_no_etag() -> None:
    async def main() -> None:
        store = RecordingMemoryStore()
        b = block(store)
        await b.save("statestore", [SaveItem("k", b"1", etag="")])
        await b.delete("statestore", "k", etag="")
        assert store.sets[0].etag is None
        assert store.deletes[0].etag is None

    run(main)


def test_save_etag_mismatch_is_409_aborted() -> None:
    async def main() -> PillionError:
        async with memory_store() as store:
            b = block(store)
            await b.save("statestore", [SaveItem("k", b"1")])
            with pytest.raises(PillionError) as info:
                await b.save("statestore", [SaveItem("k", b"2", etag="999")])
            got = await b.get("statestore", "k")
            assert got is not None and got.data == b"1"
            return info.value

    err = run(main)
    assert err.code == "ERR_STATE_SAVE"
    assert err.http_status == 409
    assert err.grpc_code == GrpcCode.ABORTED
    assert err.message.startswith(
        "failed saving state in state store statestore: possible etag mismatch. "
        "error from state store: "
    )


def test_save_invalid_etag_is_400() -> None:
    async def main() -> PillionError:
        async with memory_store() as store:
            with pytest.raises(PillionError) as info:
                await block(store).save("statestore", [SaveItem("k", b"2", etag="not-a-number")])
            return info.value

    err = run(main)
    assert (err.code, err.http_status, err.grpc_code, err.reason) == (
        "ERR_STATE_SAVE",
        400,
        GrpcCode.INVALID_ARGUMENT,
        "ERR_STATE_SAVE",
    )
    assert err.http_legacy
    assert err.message.startswith("failed saving state in state store statestore: invalid etag")


def test_save_bad_ttl_value_error_is_500() -> None:
    async def main() -> PillionError:
        async with memory_store() as store:
            with pytest.raises(PillionError) as info:
                await block(store).save("statestore", [SaveItem("k", b"1", None, {TTL_KEY: "x"})])
            return info.value

    err = run(main)
    assert (err.code, err.http_status, err.grpc_code, err.reason) == (
        "ERR_STATE_SAVE",
        500,
        GrpcCode.INTERNAL,
        "ERR_STATE_SAVE",
    )
    assert err.http_legacy
    assert err.message.startswith("failed saving state in state store statestore: metadata ")


def test_first_write_on_existing_key_is_409() -> None:
    async def main() -> PillionError:
        async with memory_store() as store:
            b = block(store)
            await b.save("statestore", [SaveItem("k", b"1")])
            with pytest.raises(PillionError) as info:
                await b.save(
                    "statestore", [SaveItem("k", b"2", concurrency=Concurrency.FIRST_WRITE)]
                )
            return info.value

    assert run(main).http_status == 409


def test_store_error_is_500_internal() -> None:
    err = raises(
        block(PlainStore(StateError("disk on fire"))).save("statestore", [SaveItem("k", b"1")])
    )
    assert (err.code, err.http_status, err.grpc_code) == ("ERR_STATE_SAVE", 500, GrpcCode.INTERNAL)
    assert err.message == "failed saving state in state store statestore: disk on fire"


def test_save_many_items_reports_a_failure() -> None:
    err = raises(
        block(PlainStore(ETagMismatch("x"))).save(
            "statestore", [SaveItem("a", b"1"), SaveItem("b", b"2"), SaveItem("c", b"3")]
        )
    )
    assert (err.code, err.http_status) == ("ERR_STATE_SAVE", 409)


def test_get_store_error_is_err_state_get() -> None:
    err = raises(block(PlainStore(StateError("boom"))).get("statestore", "k"))
    assert (err.code, err.http_status, err.grpc_code) == ("ERR_STATE_GET", 500, GrpcCode.INTERNAL)
    assert err.message == "fail to get k from state store statestore: boom"


def test_delete_error_mapping() -> None:
    mismatch = raises(block(PlainStore(ETagMismatch("m"))).delete("statestore", "k", etag="1"))
    assert (mismatch.code, mismatch.http_status, mismatch.grpc_code) == (
        "ERR_STATE_DELETE",
        409,
        GrpcCode.ABORTED,
    )
    assert mismatch.message.startswith("failed deleting state with key k: possible etag mismatch")
    invalid = raises(block(PlainStore(ETagInvalid("i"))).delete("statestore", "k", etag="x"))
    assert (invalid.code, invalid.http_status) == ("ERR_STATE_DELETE", 400)
    other = raises(block(PlainStore(StateError("down"))).delete("statestore", "k"))
    assert (other.code, other.http_status) == ("ERR_STATE_DELETE", 500)
    assert other.message == "failed deleting state with key k: down"


def test_delete_passes_request_fields() -> None:
    async def main() -> None:
        store = RecordingMemoryStore()
        await block(store).delete(
            "statestore",
            "k",
            concurrency=Concurrency.FIRST_WRITE,
            consistency=Consistency.STRONG,
            metadata={"a": "b"},
        )
        assert store.deletes == [
            DeleteRequest("app||k", None, {"a": "b"}, Concurrency.FIRST_WRITE, Consistency.STRONG)
        ]

    run(main)


def test_delete_with_etag_mismatch_over_memory_keeps_the_key() -> None:
    async def main() -> PillionError:
        async with memory_store() as store:
            b = block(store)
            await b.save("statestore", [SaveItem("k", b"1")])
            with pytest.raises(PillionError) as info:
                await b.delete("statestore", "k", etag="12345")
            assert await b.get("statestore", "k") is not None
            return info.value

    assert run(main).http_status == 409


def test_bulk_delete_maps_errors() -> None:
    err = raises(block(PlainStore(StateError("x"))).bulk_delete("statestore", [SaveItem("a", b"")]))
    assert (err.code, err.http_status) == ("ERR_STATE_BULK_DELETE", 500)


def test_bulk_get_gives_back_callers_keys_in_order() -> None:
    async def main() -> None:
        async with memory_store() as store:
            b = block(store)
            await b.save("statestore", [SaveItem("b", b"2"), SaveItem("a", b"1")])
            items = await b.bulk_get("statestore", ["a", "missing", "b", "a"])
            assert [i.key for i in items] == ["a", "missing", "b", "a"]
            assert [i.data for i in items] == [b"1", None, b"2", b"1"]
            assert items[1].etag is None and items[1].error is None
            assert items[0].etag is not None

    run(main)


def test_bulk_get_per_item_error_is_kept() -> None:
    async def main() -> None:
        store = PlainStore(fail_keys=frozenset({"app||bad"}))
        store.data["app||good"] = b"1"
        items = await block(store).bulk_get("statestore", ["good", "bad"])
        assert items[0].data == b"1" and items[0].error is None
        assert items[1].key == "bad" and items[1].data is None
        assert items[1].error == "cannot read app||bad"

    run(main)


def test_bulk_get_store_failure_is_err_state_bulk_get() -> None:
    err = raises(block(PlainStore(bulk_fail=StateError("gone"))).bulk_get("statestore", ["a"]))
    assert (err.code, err.http_status) == ("ERR_STATE_BULK_GET", 500)
    assert err.message == "failed getting bulk state from state store statestore: gone"


def test_unexpected_exceptions_are_not_swallowed() -> None:
    # Only store errors are mapped; anything else is a bug the adapter reports as ERROR.
    async def main() -> None:
        with pytest.raises(RuntimeError):
            await block(PlainStore(RuntimeError("bug"))).save("statestore", [SaveItem("k", b"1")])
        with pytest.raises(RuntimeError):
            await block(PlainStore(RuntimeError("bug"))).get("statestore", "k")

    run(main)


# --- transactions -----------------------------------------------------------------------------


def test_transaction_applies_prefixed_ops_with_metadata() -> None:
    async def main() -> None:
        store = RecordingMemoryStore()
        b = block(store)
        await b.save("statestore", [SaveItem("gone", b"0")])
        await b.transaction(
            "statestore",
            [
                TxOperation("upsert", SaveItem("k", b"1")),
                TxOperation("delete", SaveItem("gone", b"")),
            ],
            {"tx": "md"},
        )
        ((ops, md),) = store.multis
        assert md == {"tx": "md"}
        assert [type(o).__name__ for o in ops] == ["SetRequest", "DeleteRequest"]
        assert [o.key for o in ops] == ["app||k", "app||gone"]
        assert sorted(store._data) == ["app||k"]

    run(main)


def test_empty_transaction_does_not_call_the_store() -> None:
    async def main() -> None:
        store = RecordingMemoryStore()
        await block(store).transaction("statestore", [])
        assert store.multis == []

    run(main)


@pytest.mark.parametrize("store", [PlainStore(), TxOnlyByFeature(), MultiWithoutFeature()])
def test_non_transactional_store_is_refused(store: PlainStore) -> None:
    err = raises(
        block(store).transaction("statestore", [TxOperation("upsert", SaveItem("k", b"1"))])
    )
    assert err.code == "ERR_STATE_STORE_NOT_SUPPORTED"
    assert err.http_status == 500
    assert err.grpc_code == GrpcCode.UNIMPLEMENTED
    assert err.reason == "DAPR_STATE_TRANSACTIONS_NOT_SUPPORTED"
    assert err.message == "state store statestore doesn't support transactions"


def test_too_many_operations() -> None:
    store = RecordingMemoryStore(max_ops=2)
    ops = [TxOperation("upsert", SaveItem(f"k{i}", b"1")) for i in range(3)]
    err = raises(block(store).transaction("statestore", ops))
    assert err.code == "ERR_STATE_STORE_TOO_MANY_TRANSACTIONS"
    assert err.http_status == 400
    assert err.grpc_code == GrpcCode.INVALID_ARGUMENT
    assert err.reason == "DAPR_STATE_TOO_MANY_TRANSACTIONS"
    assert err.metadata == {"currentOpsTransaction": "3", "maxOpsPerTransaction": "2"}
    assert store.multis == []


def test_at_the_operation_limit_is_fine() -> None:
    async def main() -> None:
        store = RecordingMemoryStore(max_ops=2)
        ops = [TxOperation("upsert", SaveItem(f"k{i}", b"1")) for i in range(2)]
        await block(store).transaction("statestore", ops)
        assert len(store.multis) == 1

    run(main)


def test_unknown_transaction_operation() -> None:
    store = RecordingMemoryStore()
    err = raises(block(store).transaction("statestore", [TxOperation("merge", SaveItem("k", b""))]))
    assert err.code == "ERR_NOT_SUPPORTED_STATE_OPERATION"
    assert err.http_status == 400
    assert err.message == "operation type merge not supported"
    assert store.multis == []


def test_transaction_upsert_without_key() -> None:
    err = raises(
        block(RecordingMemoryStore()).transaction(
            "statestore", [TxOperation("upsert", SaveItem("", b"1"))]
        )
    )
    assert (err.code, err.message) == ("ERR_MALFORMED_REQUEST", '"key" is a required field')


def test_transaction_etag_failure_is_500_and_atomic() -> None:
    async def main() -> PillionError:
        async with memory_store() as store:
            b = block(store)
            await b.save("statestore", [SaveItem("k", b"1")])
            with pytest.raises(PillionError) as info:
                await b.transaction(
                    "statestore",
                    [
                        TxOperation("upsert", SaveItem("new", b"n")),
                        TxOperation("upsert", SaveItem("k", b"2", etag="999")),
                    ],
                )
            assert await b.get("statestore", "new") is None
            return info.value

    err = run(main)
    assert (err.code, err.http_status, err.grpc_code) == (
        "ERR_STATE_TRANSACTION",
        500,
        GrpcCode.INTERNAL,
    )
    assert err.message.startswith("error while executing state transaction: ")


# --- option parsing ----------------------------------------------------------------------------


def test_parse_options() -> None:
    assert parse_concurrency(None) is Concurrency.UNSPECIFIED
    assert parse_concurrency("") is Concurrency.UNSPECIFIED
    assert parse_concurrency("first-write") is Concurrency.FIRST_WRITE
    assert parse_concurrency("last-write") is Concurrency.LAST_WRITE
    assert parse_consistency(None) is Consistency.UNSPECIFIED
    assert parse_consistency("eventual") is Consistency.EVENTUAL
    assert parse_consistency("strong") is Consistency.STRONG


def test_parse_option_errors() -> None:
    with pytest.raises(PillionError) as c:
        parse_concurrency("sometimes")
    assert (c.value.code, c.value.http_status) == ("ERR_MALFORMED_REQUEST", 400)
    assert c.value.message == "invalid concurrency 'sometimes': expected first-write or last-write"
    with pytest.raises(PillionError) as s:
        parse_consistency("STRONG")
    assert (s.value.code, s.value.http_status) == ("ERR_MALFORMED_REQUEST", 400)
    assert s.value.message == "invalid consistency 'STRONG': expected eventual or strong"
