"""Lock store conformance: every registered `lock.*` type against the same contract."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pillion.components import registry
from pillion.components.lock.api import Feature, LockStore, UnlockStatus
from pillion.components.metadata import ComponentInfo, Properties
from tests.conformance.conftest import require_server


@dataclass(frozen=True)
class Backend:
    """How to reach one lock store type in tests."""

    properties: Callable[[Path], dict[str, str]]
    # (name, host, port) that must answer before the suite runs; None for embedded stores.
    server: tuple[str, str, int] | None = None
    # Run (with the row's properties) before the first init and after the last close.
    reset: Callable[[dict[str, str]], None] | None = None


def _flush_redis_db(props: dict[str, str]) -> None:
    import redis

    r = redis.Redis(host="127.0.0.1", port=6379, db=int(props["redisDB"]))
    r.flushdb()
    r.close()


# One row per registered lock type.
BACKENDS: dict[str, Backend] = {
    "lock.sqlite": Backend(lambda tmp: {"connectionString": str(tmp / "lock.db")}),
    # DB 13 is this suite's own: flushed before and after each test.
    "lock.redis": Backend(
        lambda _: {"redisHost": "127.0.0.1:6379", "redisDB": "13"},
        ("redis", "127.0.0.1", 6379),
        _flush_redis_db,
    ),
}

LOCK_TYPES = sorted({t for t, _ in registry.kinds() if registry.category(t) == "lock"})

# An expired lock is free again within this many seconds after its expiry.
EXPIRY_SLACK = 3.0

OpenStore = Callable[[], Coroutine[Any, Any, LockStore]]


@pytest.fixture(params=LOCK_TYPES)
def open_store(
    request: pytest.FixtureRequest, aio: asyncio.Runner, tmp_path: Path
) -> Iterator[OpenStore]:
    """Opens instances of one store type on the same backend, as separate sidecars would."""
    component_type: str = request.param
    backend = BACKENDS.get(component_type)
    if backend is None:
        pytest.fail(f"{component_type} is registered but has no row in BACKENDS")
    if backend.server is not None:
        require_server(*backend.server)
    props = backend.properties(tmp_path)
    if backend.reset is not None:
        backend.reset(props)
    opened: list[LockStore] = []

    async def open_one() -> LockStore:
        instance: LockStore = registry.load(component_type, "v1")()
        info = ComponentInfo("lockstore", component_type, "v1", "app", Properties(props))
        await instance.init(info)
        opened.append(instance)
        return instance

    try:
        yield open_one
    finally:
        for s in opened:
            aio.run(s.close())
        if backend.reset is not None:
            backend.reset(props)


@pytest.fixture
def store(open_store: OpenStore, aio: asyncio.Runner) -> LockStore:
    return aio.run(open_store())


@pytest.fixture
def r() -> Callable[[str], str]:
    """Unique resource ids per test, shaped as the block stores them."""
    run = uuid.uuid4().hex[:12]
    return lambda name: f"lock||app||{run}-{name}"


async def wait_for(cond: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout}s")
        await asyncio.sleep(0.05)


# -- acquire and release ------------------------------------------------------------------------


async def test_declares_only_known_features(store: LockStore) -> None:
    assert all(isinstance(f, Feature) for f in store.features())


async def test_acquire_then_second_owner_is_refused(
    store: LockStore, r: Callable[[str], str]
) -> None:
    assert await store.try_lock(r("res"), "owner-1", 10) is True
    assert await store.try_lock(r("res"), "owner-2", 10) is False
    # Not reentrant: the holder's second try fails too, as with Dapr's stores.
    assert await store.try_lock(r("res"), "owner-1", 10) is False


async def test_owner_unlocks_and_the_lock_is_free(
    store: LockStore, r: Callable[[str], str]
) -> None:
    assert await store.try_lock(r("res"), "owner-1", 10)
    assert await store.unlock(r("res"), "owner-1") == UnlockStatus.SUCCESS
    assert await store.try_lock(r("res"), "owner-2", 10) is True
    assert await store.unlock(r("res"), "owner-2") == UnlockStatus.SUCCESS


async def test_other_owner_cannot_unlock(store: LockStore, r: Callable[[str], str]) -> None:
    assert await store.try_lock(r("res"), "owner-1", 10)
    assert await store.unlock(r("res"), "owner-2") == UnlockStatus.LOCK_BELONGS_TO_OTHERS
    # Still held by its owner.
    assert await store.try_lock(r("res"), "owner-3", 10) is False
    assert await store.unlock(r("res"), "owner-1") == UnlockStatus.SUCCESS


async def test_unlock_missing_lock(store: LockStore, r: Callable[[str], str]) -> None:
    assert await store.unlock(r("never-locked"), "owner-1") == UnlockStatus.LOCK_DOES_NOT_EXIST


async def test_second_unlock_finds_no_lock(store: LockStore, r: Callable[[str], str]) -> None:
    assert await store.try_lock(r("res"), "owner-1", 10)
    assert await store.unlock(r("res"), "owner-1") == UnlockStatus.SUCCESS
    assert await store.unlock(r("res"), "owner-1") == UnlockStatus.LOCK_DOES_NOT_EXIST


async def test_resources_are_independent(store: LockStore, r: Callable[[str], str]) -> None:
    assert await store.try_lock(r("a"), "owner-1", 10)
    assert await store.try_lock(r("b"), "owner-2", 10)
    assert await store.unlock(r("a"), "owner-2") == UnlockStatus.LOCK_BELONGS_TO_OTHERS
    assert await store.unlock(r("b"), "owner-2") == UnlockStatus.SUCCESS
    assert await store.unlock(r("a"), "owner-1") == UnlockStatus.SUCCESS


async def test_odd_ids_round_trip(store: LockStore, r: Callable[[str], str]) -> None:
    resource = r("a/b:c ünïcødé 🔒 " + "x" * 500)
    owner = "owner with spaces, quotes \" ' and ünïcødé 🔑"
    assert await store.try_lock(resource, owner, 10)
    assert await store.unlock(resource, owner + " ") == UnlockStatus.LOCK_BELONGS_TO_OTHERS
    assert await store.unlock(resource, owner) == UnlockStatus.SUCCESS


# -- expiry -------------------------------------------------------------------------------------


async def test_expiry_frees_the_lock(store: LockStore, r: Callable[[str], str]) -> None:
    started = time.monotonic()
    assert await store.try_lock(r("res"), "owner-1", 1)
    assert await store.try_lock(r("res"), "owner-2", 1) is False

    await wait_for(
        lambda: store.try_lock(r("res"), "owner-2", 10), 1 + EXPIRY_SLACK, "lock expired"
    )
    assert time.monotonic() - started >= 0.9, "the lock expired early"
    # The first owner lost it: its unlock must not release the new holder's lock.
    assert await store.unlock(r("res"), "owner-1") == UnlockStatus.LOCK_BELONGS_TO_OTHERS
    assert await store.unlock(r("res"), "owner-2") == UnlockStatus.SUCCESS


async def test_expired_lock_cannot_be_unlocked(store: LockStore, r: Callable[[str], str]) -> None:
    assert await store.try_lock(r("res"), "owner-1", 1)
    # A probe locked just after it, with the same expiry, shows when it is over without
    # touching it: once the probe is free, the first lock's (earlier) expiry has passed too.
    assert await store.try_lock(r("probe"), "owner-1", 1)
    await wait_for(lambda: store.try_lock(r("probe"), "prober", 10), 1 + EXPIRY_SLACK, "expiry")
    assert await store.unlock(r("res"), "owner-1") == UnlockStatus.LOCK_DOES_NOT_EXIST


# -- contention and sharing ---------------------------------------------------------------------


async def test_concurrent_contenders_get_exactly_one_winner(
    open_store: OpenStore, r: Callable[[str], str]
) -> None:
    a, b = await open_store(), await open_store()
    stores = [a, b]
    results = await asyncio.gather(
        *(stores[i % 2].try_lock(r("contended"), f"owner-{i}", 10) for i in range(20))
    )
    assert sum(results) == 1, results
    winner = f"owner-{results.index(True)}"
    loser = "owner-0" if winner != "owner-0" else "owner-1"
    assert await b.unlock(r("contended"), loser) == UnlockStatus.LOCK_BELONGS_TO_OTHERS
    assert await a.unlock(r("contended"), winner) == UnlockStatus.SUCCESS


async def test_two_instances_share_locks(open_store: OpenStore, r: Callable[[str], str]) -> None:
    a, b = await open_store(), await open_store()
    assert await a.try_lock(r("shared"), "sidecar-a", 10)
    assert await b.try_lock(r("shared"), "sidecar-b", 10) is False
    assert await b.unlock(r("shared"), "sidecar-b") == UnlockStatus.LOCK_BELONGS_TO_OTHERS
    assert await a.unlock(r("shared"), "sidecar-a") == UnlockStatus.SUCCESS
    assert await b.try_lock(r("shared"), "sidecar-b", 10)
    assert await a.try_lock(r("shared"), "sidecar-a", 10) is False
    assert await a.unlock(r("shared"), "sidecar-b") == UnlockStatus.SUCCESS


async def test_lock_outlives_the_instance_that_took_it(
    open_store: OpenStore, r: Callable[[str], str]
) -> None:
    a = await open_store()
    assert await a.try_lock(r("kept"), "sidecar-a", 10)
    await a.close()
    b = await open_store()
    assert await b.try_lock(r("kept"), "sidecar-b", 10) is False
    assert await b.unlock(r("kept"), "sidecar-a") == UnlockStatus.SUCCESS
