"""In-memory state store specifics: expired keys are swept from its structures, not only hidden."""

from __future__ import annotations

import asyncio
import time
import types

import pytest

from pillion.components.metadata import ComponentInfo, Properties
from pillion.components.state import inmemory
from pillion.components.state.api import (
    TTL_EXPIRE_KEY,
    TTL_KEY,
    DeleteRequest,
    GetRequest,
    SetRequest,
)
from pillion.components.state.inmemory import InMemoryStateStore


def info() -> ComponentInfo:
    return ComponentInfo("statestore", "state.in-memory", "v1", "app", Properties())


def ttl(seconds: int) -> dict[str, str]:
    return {TTL_KEY: str(seconds)}


def test_sweep_removes_expired_keys_from_data_and_heap() -> None:
    async def main() -> None:
        store = InMemoryStateStore()
        await store.set(SetRequest("short", b"1", metadata=ttl(10)))
        await store.set(SetRequest("long", b"2", metadata=ttl(1000)))
        await store.set(SetRequest("forever", b"3"))
        now = time.time()
        assert store.sweep(now) == 0
        assert sorted(store._data) == ["forever", "long", "short"]
        assert store.sweep(now + 11) == 1
        assert sorted(store._data) == ["forever", "long"]
        assert [k for _, k in store._expiries] == ["long"]
        assert store.sweep(now + 1001) == 1
        assert list(store._data) == ["forever"]
        assert store._expiries == []

    asyncio.run(main())


def test_sweep_skips_stale_pairs_of_rewritten_keys() -> None:
    async def main() -> None:
        store = InMemoryStateStore()
        await store.set(SetRequest("a", b"1", metadata=ttl(10)))
        await store.set(SetRequest("a", b"2"))  # rewritten without a TTL
        await store.set(SetRequest("b", b"1", metadata=ttl(10)))
        await store.set(SetRequest("b", b"2", metadata=ttl(1000)))  # TTL extended
        now = time.time()
        assert store.sweep(now + 11) == 0
        assert sorted(store._data) == ["a", "b"]
        got = await store.get(GetRequest("b"))
        assert got is not None and got.data == b"2"
        assert store.sweep(now + 1001) == 1
        assert list(store._data) == ["a"]

    asyncio.run(main())


def test_sweep_after_delete_is_harmless() -> None:
    async def main() -> None:
        store = InMemoryStateStore()
        await store.set(SetRequest("k", b"1", metadata=ttl(10)))
        await store.delete(DeleteRequest("k"))
        assert store.sweep(time.time() + 11) == 0
        assert store._data == {} and store._expiries == []

    asyncio.run(main())


def test_transaction_writes_are_swept_too() -> None:
    async def main() -> None:
        store = InMemoryStateStore()
        await store.multi([SetRequest("t", b"1", metadata=ttl(5))], {})
        assert store.sweep(time.time() + 6) == 1
        assert store._data == {}

    asyncio.run(main())


def test_heap_of_stale_pairs_is_rebuilt() -> None:
    async def main() -> None:
        store = InMemoryStateStore()
        for _ in range(1100):
            await store.set(SetRequest("k", b"v", metadata=ttl(1000)))
        assert len(store._expiries) == 1100
        assert store.sweep() == 0
        assert len(store._expiries) == 1
        assert store._expiries[0][1] == "k"
        assert store.sweep(time.time() + 1001) == 1
        assert store._data == {} and store._expiries == []

    asyncio.run(main())


def test_expired_keys_are_hidden_before_the_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        store = InMemoryStateStore()
        await store.set(SetRequest("k", b"1", metadata=ttl(10)))
        got = await store.get(GetRequest("k"))
        assert got is not None and TTL_EXPIRE_KEY in got.metadata
        later = time.time() + 11
        monkeypatch.setattr(inmemory, "time", types.SimpleNamespace(time=lambda: later))
        assert await store.get(GetRequest("k")) is None
        assert store._data == {}  # the lazy read also dropped it

    asyncio.run(main())


def test_periodic_sweeper_removes_expired_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        store = InMemoryStateStore()
        store.sweep_interval = 0.01
        await store.init(info())
        try:
            await store.set(SetRequest("k", b"1", metadata=ttl(10)))
            await store.set(SetRequest("keep", b"2"))
            later = time.time() + 11
            monkeypatch.setattr(inmemory, "time", types.SimpleNamespace(time=lambda: later))
            deadline = asyncio.get_running_loop().time() + 2.0
            while "k" in store._data:
                assert asyncio.get_running_loop().time() < deadline, "sweeper never ran"
                await asyncio.sleep(0.01)
            assert list(store._data) == ["keep"]
            assert store._expiries == []
        finally:
            await store.close()
        assert store._sweeper is None

    asyncio.run(main())


def test_close_stops_the_sweeper_and_is_idempotent() -> None:
    async def main() -> None:
        store = InMemoryStateStore()
        await store.init(info())
        task = store._sweeper
        assert task is not None and not task.done()
        await store.close()
        assert task.cancelled()
        await store.close()

    asyncio.run(main())
