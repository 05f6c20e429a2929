"""The state store contract: requests, features, errors and the store interfaces."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from pillion.components.metadata import ComponentInfo


class Feature(StrEnum):
    """Capabilities a store declares; `GET /v1.0/metadata` lists them."""

    ETAG = "ETAG"
    TRANSACTIONAL = "TRANSACTIONAL"
    TTL = "TTL"
    QUERY_API = "QUERY_API"
    # Not declared by stores: the runtime adds it to a store with actorStateStore=true.
    ACTOR = "ACTOR"


class Concurrency(StrEnum):
    UNSPECIFIED = ""
    FIRST_WRITE = "first-write"
    LAST_WRITE = "last-write"


class Consistency(StrEnum):
    UNSPECIFIED = ""
    EVENTUAL = "eventual"
    STRONG = "strong"


# Request metadata key for a per-item TTL in seconds (-1: never expire).
TTL_KEY = "ttlInSeconds"
# Response metadata key carrying the expiry time (RFC 3339, UTC).
TTL_EXPIRE_KEY = "ttlExpireTime"


@dataclass(frozen=True, slots=True)
class GetRequest:
    key: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    consistency: Consistency = Consistency.UNSPECIFIED


@dataclass(frozen=True, slots=True)
class GetResponse:
    data: bytes
    etag: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SetRequest:
    """Write `value` (stored bytes, returned verbatim by get) under the storage key `key`."""

    key: str
    value: bytes
    etag: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    concurrency: Concurrency = Concurrency.UNSPECIFIED
    consistency: Consistency = Consistency.UNSPECIFIED


@dataclass(frozen=True, slots=True)
class DeleteRequest:
    key: str
    etag: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    concurrency: Concurrency = Concurrency.UNSPECIFIED
    consistency: Consistency = Consistency.UNSPECIFIED


Operation = SetRequest | DeleteRequest


@dataclass(frozen=True, slots=True)
class BulkGetItem:
    key: str
    data: bytes | None = None
    etag: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None


class StateError(Exception):
    """Base of the errors a store raises; the state block maps them to API codes."""


class ETagMismatch(StateError):
    """The etag given does not match the stored one (or first-write found the key)."""


class ETagInvalid(StateError):
    """The etag given cannot be an etag of this store (e.g. not a number for redis)."""


class StateStore(ABC):
    """A state store. Keys reaching it are already prefixed (`appid||key`)."""

    @abstractmethod
    async def init(self, info: ComponentInfo) -> None:
        """Decode metadata, open connections; raise ComponentConfigError on bad metadata."""

    @abstractmethod
    def features(self) -> frozenset[Feature]: ...

    @abstractmethod
    async def get(self, req: GetRequest) -> GetResponse | None:
        """The stored bytes, or None when the key is absent or expired."""

    @abstractmethod
    async def set(self, req: SetRequest) -> None:
        """Raise ETagMismatch / ETagInvalid as the etag and concurrency rules say."""

    @abstractmethod
    async def delete(self, req: DeleteRequest) -> None:
        """Deleting an absent key without an etag succeeds."""

    async def bulk_get(self, reqs: Sequence[GetRequest]) -> list[BulkGetItem]:
        """Default: one get per key; stores with a batch read override it."""
        out: list[BulkGetItem] = []
        for r in reqs:
            try:
                resp = await self.get(r)
            except StateError as exc:
                out.append(BulkGetItem(r.key, error=str(exc)))
                continue
            if resp is None:
                out.append(BulkGetItem(r.key))
            else:
                out.append(BulkGetItem(r.key, resp.data, resp.etag, resp.metadata))
        return out

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and background tasks."""


@runtime_checkable
class TransactionalStore(Protocol):
    """A store that applies several operations atomically (feature TRANSACTIONAL)."""

    async def multi(self, ops: Sequence[Operation], metadata: Mapping[str, str]) -> None:
        """All or nothing; an etag failure raises ETagMismatch and nothing is written."""
        ...

    def max_ops(self) -> int:
        """Most operations one transaction may hold (0 = unbounded)."""
        ...


@dataclass(frozen=True, slots=True)
class QueryItem:
    """One query result: the storage key, its stored bytes and etag (or a per-item error)."""

    key: str
    data: bytes = b""
    etag: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class QueryResponse:
    """A page of results; `token` continues after it ("" when the query had no page limit)."""

    results: list[QueryItem]
    token: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)


class InvalidQuery(ValueError):
    """The query document does not follow Dapr's state query language."""


@runtime_checkable
class Querier(Protocol):
    """A store that answers Dapr's state query language (feature QUERY_API)."""

    async def query(
        self, q: Mapping[str, Any] | bytes | str, metadata: Mapping[str, str]
    ) -> QueryResponse:
        """Run `q` (the query JSON, raw or decoded); raise InvalidQuery or StateError."""
        ...
