"""LockBlock rules: validation order, store lookup, key prefixes and error mapping."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any

import pytest

from pillion.blocks.lock import IllegalKey, LockBlock, LockEntry, check_key_prefix
from pillion.components.lock.api import Feature, LockError, LockStore, UnlockStatus
from pillion.components.metadata import ComponentInfo
from pillion.errors import Code, GrpcCode, PillionError


class FakeLockStore(LockStore):
    """Records the keys it is asked about; answers from a dict, or raises `fail`."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.held: dict[str, str] = {}
        self.calls: list[tuple[str, str, str, int]] = []
        self.fail = fail

    async def init(self, info: ComponentInfo) -> None:
        return None

    def features(self) -> frozenset[Feature]:
        return frozenset()

    async def try_lock(self, resource_id: str, lock_owner: str, expiry_seconds: int) -> bool:
        self.calls.append(("lock", resource_id, lock_owner, expiry_seconds))
        if self.fail is not None:
            raise self.fail
        if resource_id in self.held:
            return False
        self.held[resource_id] = lock_owner
        return True

    async def unlock(self, resource_id: str, lock_owner: str) -> UnlockStatus:
        self.calls.append(("unlock", resource_id, lock_owner, 0))
        if self.fail is not None:
            raise self.fail
        owner = self.held.get(resource_id)
        if owner is None:
            return UnlockStatus.LOCK_DOES_NOT_EXIST
        if owner != lock_owner:
            return UnlockStatus.LOCK_BELONGS_TO_OTHERS
        del self.held[resource_id]
        return UnlockStatus.SUCCESS


def block(
    store: LockStore | None = None, *, prefix: str = "appid", app_id: str = "app"
) -> LockBlock:
    s = store if store is not None else FakeLockStore()
    return LockBlock(app_id, {"lockstore": LockEntry("lockstore", s, prefix)})


def run(aw: Awaitable[Any]) -> Any:
    async def go() -> Any:
        return await aw

    return asyncio.run(go())


def raises(aw: Awaitable[Any]) -> PillionError:
    async def go() -> PillionError:
        with pytest.raises(PillionError) as info:
            await aw
        return info.value

    return asyncio.run(go())


def assert_legacy(
    err: PillionError, code: str, status: int, grpc: GrpcCode, message: str | None = None
) -> None:
    assert (err.code, err.http_status, err.grpc_code) == (code, status, grpc), err
    # Dapr's lock errors are legacy: exactly errorCode and message, no details.
    body = json.loads(err.to_json())
    assert set(body) == {"errorCode", "message"}
    if message is not None:
        assert err.message == message


# --- operations --------------------------------------------------------------------------------


def test_lock_and_unlock_pass_through() -> None:
    b = block()
    assert run(b.try_lock("lockstore", "r", "o1", 10)) is True
    assert run(b.try_lock("lockstore", "r", "o2", 10)) is False
    assert run(b.unlock("lockstore", "r", "o2")) == UnlockStatus.LOCK_BELONGS_TO_OTHERS
    assert run(b.unlock("lockstore", "r", "o1")) == UnlockStatus.SUCCESS
    assert run(b.unlock("lockstore", "r", "o1")) == UnlockStatus.LOCK_DOES_NOT_EXIST


def test_expiry_reaches_the_store() -> None:
    store = FakeLockStore()
    run(block(store).try_lock("lockstore", "r", "o", 42))
    assert store.calls == [("lock", "lock||app||r", "o", 42)]


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("expiry", [0, -1])
def test_expiry_must_be_positive(expiry: int) -> None:
    err = raises(block().try_lock("lockstore", "r", "o", expiry))
    assert_legacy(
        err,
        Code.MALFORMED_REQUEST,
        400,
        GrpcCode.INVALID_ARGUMENT,
        "ExpiryInSeconds is not positive in lock store lockstore",
    )


def test_expiry_is_checked_before_anything_else() -> None:
    # Dapr checks the expiry first: even with no lock store, and with empty fields.
    err = raises(LockBlock("app", {}).try_lock("s", "", "", 0))
    assert err.message == "ExpiryInSeconds is not positive in lock store s"


def test_empty_resource_id() -> None:
    for aw in (
        block().try_lock("lockstore", "", "o", 10),
        block().unlock("lockstore", "", "o"),
    ):
        assert_legacy(
            raises(aw),
            Code.MALFORMED_REQUEST,
            400,
            GrpcCode.INVALID_ARGUMENT,
            "ResourceId is empty in lock store lockstore",
        )


def test_empty_lock_owner() -> None:
    for aw in (
        block().try_lock("lockstore", "r", "", 10),
        block().unlock("lockstore", "r", ""),
    ):
        assert_legacy(
            raises(aw),
            Code.MALFORMED_REQUEST,
            400,
            GrpcCode.INVALID_ARGUMENT,
            "LockOwner is empty in lock store lockstore",
        )


def test_no_lock_store_configured() -> None:
    b = LockBlock("app", {})
    for aw in (b.try_lock("s", "r", "o", 10), b.unlock("s", "r", "o"), b.unlock("s", "", "")):
        assert_legacy(
            raises(aw),
            Code.LOCK_STORE_NOT_CONFIGURED,
            500,
            GrpcCode.FAILED_PRECONDITION,
            "lock store is not configured",
        )


def test_unknown_store() -> None:
    for aw in (block().try_lock("nope", "r", "o", 10), block().unlock("nope", "r", "o")):
        assert_legacy(
            raises(aw),
            Code.LOCK_STORE_NOT_FOUND,
            400,
            GrpcCode.INVALID_ARGUMENT,
            "lock store nope not found",
        )


def test_fields_are_checked_before_the_store_lookup() -> None:
    err = raises(block().try_lock("nope", "", "o", 10))
    assert err.message == "ResourceId is empty in lock store nope"


# --- keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "app_id", "key"),
    [
        ("appid", "app", "lock||app||order-1"),
        ("appid", "", "lock||order-1"),
        ("name", "app", "lock||lockstore||order-1"),
        ("none", "app", "lock||order-1"),
        ("myprefix", "app", "lock||myprefix||order-1"),
    ],
)
def test_key_prefix_strategies(prefix: str, app_id: str, key: str) -> None:
    store = FakeLockStore()
    b = block(store, prefix=prefix, app_id=app_id)
    run(b.try_lock("lockstore", "order-1", "o", 5))
    run(b.unlock("lockstore", "order-1", "o"))
    assert [c[1] for c in store.calls] == [key, key]


@pytest.mark.parametrize(
    ("raw", "strategy"),
    [("", "appid"), ("AppID", "appid"), ("Name", "name"), ("NONE", "none"), ("MyApp", "myapp")],
)
def test_check_key_prefix(raw: str, strategy: str) -> None:
    assert check_key_prefix(raw) == strategy


def test_key_prefix_with_separator_is_illegal() -> None:
    with pytest.raises(IllegalKey, match=r"input key/keyPrefix 'a\|\|b' can't contain '\|\|'"):
        check_key_prefix("a||b")


def test_resource_id_with_separator_fails_as_dapr_does() -> None:
    store = FakeLockStore()
    err = raises(block(store).try_lock("lockstore", "a||b", "o", 10))
    assert_legacy(
        err,
        Code.TRY_LOCK,
        500,
        GrpcCode.INTERNAL,
        "failed to try acquiring lock: input key/keyPrefix 'a||b' can't contain '||'",
    )
    err = raises(block(store).unlock("lockstore", "a||b", "o"))
    assert_legacy(
        err,
        Code.UNLOCK,
        500,
        GrpcCode.INTERNAL,
        "failed to release lock: input key/keyPrefix 'a||b' can't contain '||'",
    )
    assert store.calls == []


# --- store failures ----------------------------------------------------------------------------


def test_store_errors_map_to_try_lock_and_unlock() -> None:
    b = block(FakeLockStore(fail=LockError("connection refused")))
    assert_legacy(
        raises(b.try_lock("lockstore", "r", "o", 10)),
        Code.TRY_LOCK,
        500,
        GrpcCode.INTERNAL,
        "failed to try acquiring lock: connection refused",
    )
    assert_legacy(
        raises(b.unlock("lockstore", "r", "o")),
        Code.UNLOCK,
        500,
        GrpcCode.INTERNAL,
        "failed to release lock: connection refused",
    )
