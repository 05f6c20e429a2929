"""The `state.in-memory` store: a dict with integer-version etags, TTLs and transactions."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import Callable, Mapping, Sequence

from pillion.components.metadata import ComponentInfo
from pillion.components.state.api import (
    Concurrency,
    DeleteRequest,
    ETagInvalid,
    ETagMismatch,
    Feature,
    GetRequest,
    GetResponse,
    Operation,
    SetRequest,
    StateStore,
)
from pillion.components.state.ttl import expiry_metadata, parse_ttl

_FEATURES = frozenset({Feature.ETAG, Feature.TRANSACTIONAL, Feature.TTL})


class _Entry:
    __slots__ = ("expire", "value", "version")

    def __init__(self, value: bytes, version: int, expire: float | None) -> None:
        self.value = value
        self.version = version
        self.expire = expire


# Looks a key up as the operation being planned should see it (store, or a transaction's overlay).
_View = Callable[[str], _Entry | None]


def _parse_etag(key: str, etag: str) -> int:
    if not etag.isdigit() or not etag.isascii():
        raise ETagInvalid(f"invalid etag {etag!r} for key {key!r}: expected a decimal version")
    return int(etag)


class InMemoryStateStore(StateStore):
    """Process-local state; etags are a store-wide version counter ("1", "2", ...).

    A store-wide counter rather than a per-key one means an etag never matches again after the
    key is deleted and recreated.
    """

    # Seconds between sweeps of expired keys; reads also drop them lazily.
    sweep_interval: float = 1.0

    def __init__(self) -> None:
        self._data: dict[str, _Entry] = {}
        self._version = 0
        # (expire, key) for every write with a TTL; stale pairs are skipped when popped.
        self._expiries: list[tuple[float, str]] = []
        self._sweeper: asyncio.Task[None] | None = None

    async def init(self, info: ComponentInfo) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(
            self._sweep_forever(), name=f"state.in-memory sweep {info.name}"
        )

    def features(self) -> frozenset[Feature]:
        return _FEATURES

    def max_ops(self) -> int:
        return 0

    async def get(self, req: GetRequest) -> GetResponse | None:
        entry = self._live(req.key, time.time())
        if entry is None:
            return None
        return GetResponse(entry.value, str(entry.version), expiry_metadata(entry.expire))

    async def set(self, req: SetRequest) -> None:
        ttl = parse_ttl(req.metadata)
        now = time.time()
        self._store(req.key, self._plan_set(lambda k: self._live(k, now), req, ttl, now))

    async def delete(self, req: DeleteRequest) -> None:
        now = time.time()
        self._plan_delete(lambda k: self._live(k, now), req)
        self._data.pop(req.key, None)

    async def multi(self, ops: Sequence[Operation], metadata: Mapping[str, str]) -> None:
        ttls = [parse_ttl(op.metadata) if isinstance(op, SetRequest) else None for op in ops]
        now = time.time()
        # Plan every operation against an overlay first, so a failure leaves the store untouched.
        overlay: dict[str, _Entry | None] = {}

        def view(key: str) -> _Entry | None:
            return overlay[key] if key in overlay else self._live(key, now)

        for op, ttl in zip(ops, ttls, strict=True):
            if isinstance(op, SetRequest):
                overlay[op.key] = self._plan_set(view, op, ttl, now)
            elif isinstance(op, DeleteRequest):
                self._plan_delete(view, op)
                overlay[op.key] = None
            else:
                raise ValueError(f"unsupported transaction operation {op!r}")
        for key, entry in overlay.items():
            if entry is None:
                self._data.pop(key, None)
            else:
                self._store(key, entry)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    def _live(self, key: str, now: float) -> _Entry | None:
        entry = self._data.get(key)
        if entry is not None and entry.expire is not None and entry.expire <= now:
            del self._data[key]
            return None
        return entry

    def _plan_set(self, view: _View, req: SetRequest, ttl: int | None, now: float) -> _Entry:
        if req.concurrency != Concurrency.LAST_WRITE:
            if req.etag:
                want = _parse_etag(req.key, req.etag)
                current = view(req.key)
                if current is None or current.version != want:
                    raise ETagMismatch(f"etag mismatch for key {req.key!r}")
            elif req.concurrency == Concurrency.FIRST_WRITE and view(req.key) is not None:
                raise ETagMismatch(f"key {req.key!r} already exists (first-write)")
        self._version += 1
        return _Entry(req.value, self._version, None if ttl is None else now + ttl)

    def _plan_delete(self, view: _View, req: DeleteRequest) -> None:
        if req.etag and req.concurrency != Concurrency.LAST_WRITE:
            want = _parse_etag(req.key, req.etag)
            current = view(req.key)
            if current is None or current.version != want:
                raise ETagMismatch(f"etag mismatch for key {req.key!r}")

    def _store(self, key: str, entry: _Entry) -> None:
        self._data[key] = entry
        if entry.expire is not None:
            heapq.heappush(self._expiries, (entry.expire, key))

    def sweep(self, now: float | None = None) -> int:
        """Drop expired keys; returns how many went."""
        now = time.time() if now is None else now
        heap, removed = self._expiries, 0
        while heap and heap[0][0] <= now:
            expire, key = heapq.heappop(heap)
            entry = self._data.get(key)
            # The pair is stale when the key was rewritten since; its entry has another expiry.
            if entry is not None and entry.expire == expire:
                del self._data[key]
                removed += 1
        # Rewrites with a TTL leave stale pairs behind; rebuild before they dominate the heap.
        if len(heap) > 2 * len(self._data) + 1024:
            self._expiries = [(e.expire, k) for k, e in self._data.items() if e.expire is not None]
            heapq.heapify(self._expiries)
        return removed

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            self.sweep()
