"""Recording fakes for the invoke block's parts and for state stores, shared by the unit tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

from pillion.blocks.invoke import Address, Headers, InvokeResponse
from pillion.components.metadata import ComponentInfo, Properties
from pillion.components.state.api import (
    BulkGetItem,
    DeleteRequest,
    Feature,
    GetRequest,
    GetResponse,
    Operation,
    SetRequest,
    StateError,
    StateStore,
)
from pillion.components.state.inmemory import InMemoryStateStore

# --- service invocation -------------------------------------------------------------------------


@dataclass(frozen=True)
class Addr:
    host: str
    port: int


def ok(body: bytes = b"ok", status: int = 200) -> InvokeResponse:
    return InvokeResponse(status, b"OK", [(b"content-type", b"text/plain")], body)


@dataclass
class FakeResolver:
    """Answers 127.0.0.1:<9000 + n> on the n-th lookup of a known app; LookupError otherwise."""

    known: set[str] = field(default_factory=lambda: {"other"})
    resolved: list[tuple[str, str]] = field(default_factory=list)
    invalidated: list[tuple[str, str]] = field(default_factory=list)

    async def resolve(self, app_id: str, namespace: str = "") -> Addr:
        self.resolved.append((app_id, namespace))
        if app_id not in self.known:
            raise LookupError(app_id)
        return Addr("127.0.0.1", 9000 + len(self.resolved))

    def invalidate(self, app_id: str, namespace: str = "") -> None:
        self.invalidated.append((app_id, namespace))


@dataclass
class LinkCall:
    addr: Address
    verb: str
    target: bytes
    headers: Headers
    body: bytes


@dataclass
class FakeLink:
    """Plays `outcomes` in order (a response, or an exception to raise); then answers ok()."""

    outcomes: list[InvokeResponse | BaseException] = field(default_factory=list)
    calls: list[LinkCall] = field(default_factory=list)

    async def forward(
        self, addr: Address, verb: str, target: bytes, headers: Headers, body: bytes
    ) -> InvokeResponse:
        self.calls.append(LinkCall(addr, verb, target, list(headers), body))
        out = self.outcomes.pop(0) if self.outcomes else ok(b"remote")
        if isinstance(out, BaseException):
            raise out
        return out


@dataclass
class AppCall:
    verb: str
    target: bytes
    headers: Headers
    body: bytes


@dataclass
class FakeApp:
    outcomes: list[InvokeResponse | BaseException] = field(default_factory=list)
    calls: list[AppCall] = field(default_factory=list)

    async def invoke(
        self, verb: str, target: bytes, headers: Headers, body: bytes
    ) -> InvokeResponse:
        self.calls.append(AppCall(verb, target, list(headers), body))
        out = self.outcomes.pop(0) if self.outcomes else ok(b"local")
        if isinstance(out, BaseException):
            raise out
        return out


# --- state stores -------------------------------------------------------------------------------


def component_info(name: str = "statestore", app_id: str = "app") -> ComponentInfo:
    return ComponentInfo(
        name=name, type="state.in-memory", version="v1", app_id=app_id, properties=Properties()
    )


@contextlib.asynccontextmanager
async def memory_store(name: str = "statestore") -> AsyncIterator[InMemoryStateStore]:
    """An initialised in-memory store, closed (sweeper stopped) on exit."""
    store = InMemoryStateStore()
    await store.init(component_info(name))
    try:
        yield store
    finally:
        await store.close()


class RecordingMemoryStore(InMemoryStateStore):
    """The in-memory store, remembering every request the block sends it."""

    def __init__(self, max_ops: int = 0) -> None:
        super().__init__()
        self._max = max_ops
        self.gets: list[GetRequest] = []
        self.sets: list[SetRequest] = []
        self.deletes: list[DeleteRequest] = []
        self.multis: list[tuple[list[Operation], dict[str, str]]] = []

    def max_ops(self) -> int:
        return self._max

    async def get(self, req: GetRequest) -> GetResponse | None:
        self.gets.append(req)
        return await super().get(req)

    async def set(self, req: SetRequest) -> None:
        self.sets.append(req)
        await super().set(req)

    async def delete(self, req: DeleteRequest) -> None:
        self.deletes.append(req)
        await super().delete(req)

    async def multi(self, ops: Sequence[Operation], metadata: Mapping[str, str]) -> None:
        self.multis.append((list(ops), dict(metadata)))
        await super().multi(ops, metadata)


class PlainStore(StateStore):
    """A non-transactional dict store with switchable failures.

    `fail` is raised by every get/set/delete; `fail_keys` makes reads of those storage keys raise
    StateError (bulk-get item errors); `bulk_fail` is raised by bulk_get itself.
    """

    def __init__(
        self,
        fail: BaseException | None = None,
        *,
        features: frozenset[Feature] = frozenset({Feature.ETAG}),
        fail_keys: frozenset[str] = frozenset(),
        bulk_fail: BaseException | None = None,
    ) -> None:
        self.fail = fail
        self._features = features
        self.fail_keys = fail_keys
        self.bulk_fail = bulk_fail
        self.data: dict[str, bytes] = {}

    async def init(self, info: ComponentInfo) -> None:
        return None

    def features(self) -> frozenset[Feature]:
        return self._features

    async def get(self, req: GetRequest) -> GetResponse | None:
        if self.fail is not None:
            raise self.fail
        if req.key in self.fail_keys:
            raise StateError(f"cannot read {req.key}")
        v = self.data.get(req.key)
        return None if v is None else GetResponse(v, "e1")

    async def set(self, req: SetRequest) -> None:
        if self.fail is not None:
            raise self.fail
        self.data[req.key] = req.value

    async def delete(self, req: DeleteRequest) -> None:
        if self.fail is not None:
            raise self.fail
        self.data.pop(req.key, None)

    async def bulk_get(self, reqs: Sequence[GetRequest]) -> list[BulkGetItem]:
        if self.bulk_fail is not None:
            raise self.bulk_fail
        return await super().bulk_get(reqs)


class TxOnlyByFeature(PlainStore):
    """Declares TRANSACTIONAL but has no multi(): must still be refused."""

    def __init__(self) -> None:
        super().__init__(features=frozenset({Feature.ETAG, Feature.TRANSACTIONAL}))


class MultiWithoutFeature(PlainStore):
    """Has multi() and max_ops() but does not declare TRANSACTIONAL: must be refused too."""

    async def multi(self, ops: Sequence[Operation], metadata: Mapping[str, str]) -> None:
        raise AssertionError("multi() must not be called on a store without TRANSACTIONAL")

    def max_ops(self) -> int:
        return 0
