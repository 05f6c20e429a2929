"""The distributed lock building block (alpha): validation, store lookup, key prefixes, errors."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pillion.blocks.guard import component_call
from pillion.components.lock.api import LockError, LockStore, UnlockStatus
from pillion.errors import Code, GrpcCode, PillionError
from pillion.resiliency import CircuitOpen

if TYPE_CHECKING:
    from pillion.resiliency import Resiliency

SEPARATOR = "||"
# Every stored lock key starts with this, whatever the keyPrefix strategy.
API_PREFIX = "lock"


class IllegalKey(ValueError):
    """A resource id or keyPrefix contains `||`."""

    def __init__(self, key: str) -> None:
        super().__init__(f"input key/keyPrefix '{key}' can't contain '{SEPARATOR}'")


def check_key_prefix(value: str) -> str:
    """The keyPrefix strategy of a lock component, lowercased as Dapr stores it.

    Empty means the default, `appid`. Raises IllegalKey for a value with `||`.
    """
    if SEPARATOR in value:
        raise IllegalKey(value)
    return value.lower() or "appid"


@dataclass(frozen=True)
class LockEntry:
    """A loaded lock store as the block sees it."""

    name: str
    store: LockStore
    key_prefix: str = "appid"


class LockBlock:
    """Every lock API rule lives here, once, for HTTP and gRPC alike (dapr-api.md §8)."""

    def __init__(self, app_id: str, stores: Mapping[str, LockEntry]) -> None:
        self.app_id = app_id
        self.stores = dict(stores)
        self.resiliency: Resiliency | None = None  # outbound policies, set by the runtime

    def storage_key(self, e: LockEntry, resource_id: str) -> str:
        """`lock||{appId}||{id}` and the other keyPrefix strategies (appid, name, none, custom)."""
        if SEPARATOR in resource_id:
            raise IllegalKey(resource_id)
        strategy = e.key_prefix
        if strategy == "none":
            return f"{API_PREFIX}{SEPARATOR}{resource_id}"
        if strategy == "name":
            return f"{API_PREFIX}{SEPARATOR}{e.name}{SEPARATOR}{resource_id}"
        if strategy == "appid":
            if not self.app_id:
                return f"{API_PREFIX}{SEPARATOR}{resource_id}"
            return f"{API_PREFIX}{SEPARATOR}{self.app_id}{SEPARATOR}{resource_id}"
        return f"{API_PREFIX}{SEPARATOR}{strategy}{SEPARATOR}{resource_id}"

    async def try_lock(
        self, store: str, resource_id: str, lock_owner: str, expiry_in_seconds: int
    ) -> bool:
        # Dapr checks the expiry before anything else, even before the store lookup.
        if expiry_in_seconds <= 0:
            raise _malformed(f"ExpiryInSeconds is not positive in lock store {store}")
        e = self._validate(store, resource_id, lock_owner)
        try:
            key = self.storage_key(e, resource_id)
            return await component_call(
                self.resiliency,
                store,
                "lock",
                lambda: e.store.try_lock(key, lock_owner, expiry_in_seconds),
            )
        except (IllegalKey, LockError, TimeoutError, CircuitOpen) as exc:
            raise PillionError(
                Code.TRY_LOCK,
                f"failed to try acquiring lock: {exc}",
                500,
                GrpcCode.INTERNAL,
            ) from exc

    async def unlock(self, store: str, resource_id: str, lock_owner: str) -> UnlockStatus:
        e = self._validate(store, resource_id, lock_owner)
        try:
            key = self.storage_key(e, resource_id)
            return await component_call(
                self.resiliency, store, "lock", lambda: e.store.unlock(key, lock_owner)
            )
        except (IllegalKey, LockError, TimeoutError, CircuitOpen) as exc:
            raise PillionError(
                Code.UNLOCK, f"failed to release lock: {exc}", 500, GrpcCode.INTERNAL
            ) from exc

    def _validate(self, store: str, resource_id: str, lock_owner: str) -> LockEntry:
        """Dapr's order: no stores, empty resource id, empty owner, unknown store."""
        if not self.stores:
            raise PillionError(
                Code.LOCK_STORE_NOT_CONFIGURED,
                "lock store is not configured",
                500,
                GrpcCode.FAILED_PRECONDITION,
            )
        if not resource_id:
            raise _malformed(f"ResourceId is empty in lock store {store}")
        if not lock_owner:
            raise _malformed(f"LockOwner is empty in lock store {store}")
        e = self.stores.get(store)
        if e is None:
            raise PillionError(
                Code.LOCK_STORE_NOT_FOUND,
                f"lock store {store} not found",
                400,
                GrpcCode.INVALID_ARGUMENT,
            )
        return e


def _malformed(message: str) -> PillionError:
    return PillionError(Code.MALFORMED_REQUEST, message, 400, GrpcCode.INVALID_ARGUMENT)
