"""The state building block: store lookup, key prefixing, feature gates and error mapping."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from pillion.blocks.guard import component_call, recorder
from pillion.components.state.api import (
    BulkGetItem,
    Concurrency,
    Consistency,
    DeleteRequest,
    ETagInvalid,
    ETagMismatch,
    Feature,
    GetRequest,
    Operation,
    Querier,
    QueryItem,
    QueryResponse,
    SetRequest,
    StateError,
    StateStore,
    TransactionalStore,
)
from pillion.errors import Code, FieldViolation, GrpcCode, PillionError
from pillion.resiliency import CircuitOpen

if TYPE_CHECKING:
    from pillion.observability.dapr_metrics import DaprMetrics
    from pillion.resiliency import Resiliency

T = TypeVar("T")

SEPARATOR = "||"


@dataclass(frozen=True)
class OutboxConfig:
    """A store's transactional outbox (component metadata `outbox*`, dapr-api.md §2)."""

    publish_pubsub: str  # outboxPublishPubsub: where the app's events go
    publish_topic: str  # outboxPublishTopic
    pubsub: str  # outboxPubsub: the internal topic's pubsub (default: publish_pubsub)
    discard_when_missing_state: bool = False  # outboxDiscardWhenMissingState


@dataclass(frozen=True)
class StoreEntry:
    """A loaded state store as the block sees it."""

    name: str
    store: StateStore
    key_prefix: str = "appid"
    actor_store: bool = False
    outbox: OutboxConfig | None = None

    def capabilities(self) -> list[str]:
        caps = sorted(str(f) for f in self.store.features())
        if self.actor_store:
            caps.append(str(Feature.ACTOR))
        return caps


@dataclass(frozen=True, slots=True)
class SaveItem:
    key: str
    value: bytes
    etag: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    concurrency: Concurrency = Concurrency.UNSPECIFIED
    consistency: Consistency = Consistency.UNSPECIFIED


@dataclass(frozen=True, slots=True)
class TxOperation:
    """One operation of a transaction: `op` is "upsert" or "delete"."""

    op: str
    item: SaveItem


@dataclass(frozen=True, slots=True)
class GetResult:
    data: bytes
    etag: str | None
    metadata: Mapping[str, str]


def parse_concurrency(value: str | None) -> Concurrency:
    if not value:
        return Concurrency.UNSPECIFIED
    try:
        return Concurrency(value)
    except ValueError:
        raise PillionError(
            Code.MALFORMED_REQUEST,
            f"invalid concurrency {value!r}: expected first-write or last-write",
            400,
            GrpcCode.INVALID_ARGUMENT,
        ) from None


def parse_consistency(value: str | None) -> Consistency:
    if not value:
        return Consistency.UNSPECIFIED
    try:
        return Consistency(value)
    except ValueError:
        raise PillionError(
            Code.MALFORMED_REQUEST,
            f"invalid consistency {value!r}: expected eventual or strong",
            400,
            GrpcCode.INVALID_ARGUMENT,
        ) from None


class OutboxHook(Protocol):
    """Phase 1 of the transactional outbox (pillion.blocks.outbox.Outbox)."""

    async def prepare(self, e: StoreEntry, upserts: Sequence[SaveItem]) -> str:
        """Publish the internal message; return the marker key the transaction must write."""
        ...

    def finished(self, marker: str, committed: bool) -> None:
        """The transaction writing `marker` is over."""
        ...


class StateBlock:
    """Every state API rule lives here, once, for HTTP and gRPC alike."""

    def __init__(self, app_id: str, namespace: str, stores: Mapping[str, StoreEntry]) -> None:
        self.app_id = app_id
        self.namespace = namespace
        self.stores = dict(stores)
        self.outbox: OutboxHook | None = None  # set by the runtime when a store has an outbox
        # Set by the runtime: per-call metrics and the stores' outbound resiliency policies.
        self.metrics: DaprMetrics | None = None
        self.resiliency: Resiliency | None = None

    # --- lookup and keys ------------------------------------------------------------------------

    def entry(self, name: str) -> StoreEntry:
        if not self.stores:
            raise PillionError(
                Code.STATE_STORE_NOT_CONFIGURED,
                "state store is not configured",
                500,
                GrpcCode.FAILED_PRECONDITION,
                reason="DAPR_STATE_NOT_CONFIGURED",
                metadata={"appID": self.app_id},
                resource_type="state",
                resource_name=name,
            )
        e = self.stores.get(name)
        if e is None:
            raise PillionError(
                Code.STATE_STORE_NOT_FOUND,
                f"state store {name} is not found",
                400,
                GrpcCode.INVALID_ARGUMENT,
                reason="DAPR_STATE_NOT_FOUND",
                metadata={"appID": self.app_id},
                resource_type="state",
                resource_name=name,
            )
        return e

    def storage_key(self, e: StoreEntry, key: str) -> str:
        """`appid||key` and the other keyPrefix strategies of dapr-api.md §2."""
        if SEPARATOR in key:
            raise _illegal_key(e.name, key)
        strategy = e.key_prefix
        low = strategy.lower()
        if low == "none":
            return key
        if low == "appid":
            prefix = self.app_id
        elif low == "name":
            prefix = e.name
        elif low == "namespace":
            prefix = f"{self.namespace}.{self.app_id}" if self.namespace else self.app_id
        else:
            if SEPARATOR in strategy:
                raise _illegal_key(e.name, strategy)
            prefix = low  # Dapr lowercases a custom prefix
        if not prefix:
            return key
        return f"{prefix}{SEPARATOR}{key}"

    @staticmethod
    def original_key(stored: str) -> str:
        _, sep, rest = stored.partition(SEPARATOR)
        return rest if sep else stored

    async def _call(self, store: str, operation: str, fn: Callable[[], Awaitable[T]]) -> T:
        """One call into a store (resiliency, metrics); a timeout or an open circuit comes out
        as a StateError, so every operation maps it to its own code like any store failure."""
        record = recorder(self.metrics, "component_state", store, operation)
        try:
            return await component_call(
                self.resiliency, store, "state", fn, record=record, retryable=_retryable
            )
        except TimeoutError as exc:
            raise StateError("timeout waiting for the state store") from exc
        except CircuitOpen as exc:
            raise StateError(str(exc)) from exc

    # --- operations -------------------------------------------------------------------------------

    async def get(
        self,
        store: str,
        key: str,
        *,
        consistency: Consistency = Consistency.UNSPECIFIED,
        metadata: Mapping[str, str] | None = None,
    ) -> GetResult | None:
        e = self.entry(store)
        skey = self.storage_key(e, key)
        try:
            resp = await self._call(
                store, "get", lambda: e.store.get(GetRequest(skey, metadata or {}, consistency))
            )
        except (StateError, ValueError) as exc:
            raise PillionError(
                Code.STATE_GET,
                f"fail to get {key} from state store {store}: {exc}",
                500,
                GrpcCode.INTERNAL,
            ) from exc
        if resp is None:
            return None
        return GetResult(resp.data, resp.etag, resp.metadata)

    async def bulk_get(
        self,
        store: str,
        keys: Sequence[str],
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> list[BulkGetItem]:
        e = self.entry(store)
        md = metadata or {}
        reqs = [GetRequest(self.storage_key(e, k), md) for k in keys]
        try:
            items = await self._call(store, "bulk_get", lambda: e.store.bulk_get(reqs))
        except (StateError, ValueError) as exc:
            raise PillionError(
                Code.STATE_BULK_GET,
                f"failed getting bulk state from state store {store}: {exc}",
                500,
                GrpcCode.INTERNAL,
            ) from exc
        # Give back the caller's keys, in the caller's order.
        return [
            BulkGetItem(k, it.data, it.etag, it.metadata, it.error)
            for k, it in zip(keys, items, strict=True)
        ]

    async def save(self, store: str, items: Sequence[SaveItem]) -> None:
        e = self.entry(store)
        for it in items:
            if not it.key:
                raise PillionError(
                    Code.MALFORMED_REQUEST,
                    '"key" is a required field',
                    400,
                    GrpcCode.INVALID_ARGUMENT,
                )
        reqs = [self._set_request(e, it) for it in items]
        if not reqs:
            return
        if len(reqs) == 1:
            results: list[BaseException | None] = [
                await _capture(self._call(store, "set", lambda: e.store.set(reqs[0])))
            ]
        else:
            # Concurrent sets let a store group them into one commit.
            results = await asyncio.gather(
                *(_capture(self._call(store, "set", _bind(e.store.set, r))) for r in reqs),
                return_exceptions=False,
            )
        for exc in results:
            if exc is not None:
                raise _write_error(
                    Code.STATE_SAVE, f"failed saving state in state store {store}", exc
                )

    async def delete(
        self,
        store: str,
        key: str,
        *,
        etag: str | None = None,
        concurrency: Concurrency = Concurrency.UNSPECIFIED,
        consistency: Consistency = Consistency.UNSPECIFIED,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        e = self.entry(store)
        req = self._delete_request(
            e, SaveItem(key, b"", etag or None, metadata or {}, concurrency, consistency)
        )
        exc = await _capture(self._call(store, "delete", lambda: e.store.delete(req)))
        if exc is not None:
            raise _write_error(Code.STATE_DELETE, f"failed deleting state with key {key}", exc)

    async def bulk_delete(self, store: str, items: Sequence[SaveItem]) -> None:
        e = self.entry(store)
        reqs = [self._delete_request(e, it) for it in items]
        results = await asyncio.gather(
            *(_capture(self._call(store, "delete", _bind(e.store.delete, r))) for r in reqs)
        )
        for exc in results:
            if exc is not None:
                raise _write_error(
                    Code.STATE_BULK_DELETE, f"failed deleting state in state store {store}", exc
                )

    async def transaction(
        self,
        store: str,
        operations: Sequence[TxOperation],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        e = self.entry(store)
        st = e.store
        if Feature.TRANSACTIONAL not in st.features() or not isinstance(st, TransactionalStore):
            raise PillionError(
                Code.STATE_STORE_NOT_SUPPORTED,
                f"state store {store} doesn't support transactions",
                500,
                GrpcCode.UNIMPLEMENTED,
                reason="DAPR_STATE_TRANSACTIONS_NOT_SUPPORTED",
                resource_type="state",
                resource_name=store,
            )
        limit = st.max_ops()
        if limit and len(operations) > limit:
            raise PillionError(
                Code.STATE_STORE_TOO_MANY_TRANSACTIONS,
                f"the transaction contains {len(operations)} operations, which is more than "
                f"what the state store supports: {limit}",
                400,
                GrpcCode.INVALID_ARGUMENT,
                reason="DAPR_STATE_TOO_MANY_TRANSACTIONS",
                metadata={
                    "currentOpsTransaction": str(len(operations)),
                    "maxOpsPerTransaction": str(limit),
                },
                resource_type="state",
                resource_name=store,
            )
        ops: list[Operation] = []
        for o in operations:
            if o.op == "upsert":
                ops.append(self._set_request(e, o.item))
            elif o.op == "delete":
                ops.append(self._delete_request(e, o.item))
            else:
                raise PillionError(
                    Code.NOT_SUPPORTED_STATE_OPERATION,
                    f"operation type {o.op} not supported",
                    400,
                    GrpcCode.INVALID_ARGUMENT,
                )
        if not ops:
            return
        if e.outbox is not None:
            upserts = [o.item for o in operations if o.op == "upsert"]
            if upserts:
                if self.outbox is None:
                    raise outbox_error(store, "the outbox is not running")
                # Phase 1: the internal message goes out first; the marker commits with the
                # transaction, so the event is published iff the transaction committed.
                marker = await self.outbox.prepare(e, upserts)
                ops.append(SetRequest(self.storage_key(e, marker), b"1"))
                committed = False
                try:
                    await self._multi(store, st, ops, metadata)
                    committed = True
                finally:
                    self.outbox.finished(marker, committed)
                return
        await self._multi(store, st, ops, metadata)

    async def _multi(
        self,
        store: str,
        st: TransactionalStore,
        ops: list[Operation],
        metadata: Mapping[str, str] | None,
    ) -> None:
        try:
            await self._call(store, "multi", lambda: st.multi(ops, metadata or {}))
        except (StateError, ValueError) as exc:
            raise PillionError(
                Code.STATE_TRANSACTION,
                f"error while executing state transaction: {exc}",
                500,
                GrpcCode.INTERNAL,
            ) from exc

    async def query(self, store: str, query: bytes, metadata: Mapping[str, str]) -> QueryResponse:
        """The state query API (alpha) for stores that declare QUERY_API."""
        e = self.entry(store)
        st = e.store
        if Feature.QUERY_API not in st.features() or not isinstance(st, Querier):
            raise PillionError(
                Code.STATE_STORE_NOT_SUPPORTED,
                f"state store {store} doesn't support query",
                500,
                GrpcCode.INTERNAL,
                reason="DAPR_STATE_QUERYING_NOT_SUPPORTED",
                resource_type="state",
                resource_name=store,
            )
        try:
            resp = await self._call(store, "query", lambda: st.query(query, metadata))
        except (StateError, ValueError) as exc:  # InvalidQuery is a ValueError
            raise PillionError(
                Code.STATE_QUERY,
                f"failed query in state store {store}: {exc}",
                500,
                GrpcCode.INTERNAL,
                reason="DAPR_STATE_QUERY_FAILED",
                resource_type="state",
                resource_name=store,
            ) from exc
        # Give back the caller's keys (the part after the prefix), as Dapr does.
        items = [
            QueryItem(self.original_key(it.key), it.data, it.etag, it.error) for it in resp.results
        ]
        return QueryResponse(items, resp.token, resp.metadata)

    def _delete_request(self, e: StoreEntry, it: SaveItem) -> DeleteRequest:
        return DeleteRequest(
            self.storage_key(e, it.key),
            it.etag or None,
            it.metadata,
            it.concurrency,
            it.consistency,
        )

    def _set_request(self, e: StoreEntry, it: SaveItem) -> SetRequest:
        if not it.key:
            raise PillionError(
                Code.MALFORMED_REQUEST, '"key" is a required field', 400, GrpcCode.INVALID_ARGUMENT
            )
        return SetRequest(
            self.storage_key(e, it.key),
            it.value,
            it.etag or None,
            it.metadata,
            it.concurrency,
            it.consistency,
        )


def _retryable(exc: BaseException) -> bool:
    """ETag conflicts and bad requests fail the same way again: only other errors are retried."""
    return not isinstance(exc, ETagMismatch | ETagInvalid | ValueError)


def _bind(fn: Callable[[T], Awaitable[None]], arg: T) -> Callable[[], Awaitable[None]]:
    return lambda: fn(arg)


async def _capture(aw: object) -> BaseException | None:
    """Await `aw` and return its store-level exception instead of raising it."""
    try:
        await aw  # type: ignore[misc]
    except (StateError, ValueError) as exc:
        return exc
    return None


def _write_error(code: Code, prefix: str, exc: BaseException) -> PillionError:
    if isinstance(exc, ETagMismatch):
        return PillionError(
            code,
            f"{prefix}: possible etag mismatch. error from state store: {exc}",
            409,
            GrpcCode.ABORTED,
            reason=str(code),
            http_legacy=True,
        )
    if isinstance(exc, ETagInvalid):
        return PillionError(
            code,
            f"{prefix}: invalid etag value: {exc}",
            400,
            GrpcCode.INVALID_ARGUMENT,
            reason=str(code),
            http_legacy=True,
        )
    if isinstance(exc, ValueError):  # e.g. a bad ttlInSeconds: Dapr answers 500 here too
        return PillionError(
            code, f"{prefix}: {exc}", 500, GrpcCode.INTERNAL, reason=str(code), http_legacy=True
        )
    return PillionError(
        code, f"{prefix}: {exc}", 500, GrpcCode.INTERNAL, reason=str(code), http_legacy=True
    )


def outbox_error(store: str, message: str) -> PillionError:
    return PillionError(
        Code.PUBLISH_OUTBOX,
        f"error while publishing outbox message for state store {store}: {message}",
        500,
        GrpcCode.INTERNAL,
        reason="DAPR_PUBSUB_OUTBOX",
        resource_type="state",
        resource_name=store,
    )


def _illegal_key(store: str, key: str) -> PillionError:
    return PillionError(
        Code.MALFORMED_REQUEST,
        f"input key/keyPrefix '{key}' can't contain '{SEPARATOR}'",
        400,
        GrpcCode.INVALID_ARGUMENT,
        reason="DAPR_STATE_ILLEGAL_KEY",
        resource_type="state",
        resource_name=store,
        violations=(FieldViolation(key, f"input key/keyPrefix '{key}' can't contain '||'"),),
    )
