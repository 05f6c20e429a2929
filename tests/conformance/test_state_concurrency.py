"""Optimistic concurrency under contention for the server-backed state stores.

Two store instances on one server stand for two sidecars sharing a store: of many writers racing
with the same etag exactly one wins, and a get->set-with-etag counter loses no update.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from pillion.components import registry
from pillion.components.metadata import ComponentInfo, Properties
from pillion.components.state.api import ETagMismatch, GetRequest, SetRequest, StateStore
from tests.conformance.conftest import require_server
from tests.conformance.test_state import BACKENDS

SERVER_TYPES = ["state.mysql", "state.postgresql", "state.redis"]
ROUNDS = 100
WRITERS = 50
CAS_WORKERS = 16
CAS_ATTEMPTS = 30


@pytest.fixture(params=SERVER_TYPES)
def stores(
    request: pytest.FixtureRequest, aio: asyncio.Runner, tmp_path: Path
) -> Iterator[tuple[StateStore, StateStore]]:
    """Two instances of one store type over the same table/db."""
    component_type: str = request.param
    backend = BACKENDS[component_type]
    assert backend.server is not None
    require_server(*backend.server)
    props = backend.properties(tmp_path)
    if backend.reset is not None:
        backend.reset(props)
    info = ComponentInfo(
        name="statestore",
        type=component_type,
        version="v1",
        app_id="app",
        properties=Properties(props),
    )
    pair: list[StateStore] = []
    try:
        for _ in range(2):  # one after the other: the first creates the table
            instance: StateStore = registry.load(component_type, "v1")()
            aio.run(instance.init(info))
            pair.append(instance)
        yield pair[0], pair[1]
    finally:
        for instance in pair:
            aio.run(instance.close())
        if backend.reset is not None:
            backend.reset(props)


async def _try_set(store: StateStore, req: SetRequest) -> bool:
    try:
        await store.set(req)
    except ETagMismatch:
        return False
    return True


async def test_same_etag_has_exactly_one_winner(
    aio: asyncio.Runner, stores: tuple[StateStore, StateStore]
) -> None:
    a, b = stores
    key = "contended"
    for rnd in range(ROUNDS):
        await a.set(SetRequest(key, f"round-{rnd}".encode()))
        etag = (await a.get(GetRequest(key))).etag
        assert etag
        results = await asyncio.gather(
            *(
                _try_set(a if i % 2 == 0 else b, SetRequest(key, f"{rnd}-{i}".encode(), etag=etag))
                for i in range(WRITERS)
            )
        )
        winners = [i for i, ok in enumerate(results) if ok]
        assert len(winners) == 1, f"round {rnd}: {len(winners)} writers won with one etag"
        got = await b.get(GetRequest(key))
        assert got.data == f"{rnd}-{winners[0]}".encode(), f"round {rnd}"
        assert got.etag != etag


async def test_cas_counter_loses_no_update(
    aio: asyncio.Runner, stores: tuple[StateStore, StateStore]
) -> None:
    a, b = stores
    key = "counter"
    await a.set(SetRequest(key, b"0"))

    async def worker(store: StateStore) -> int:
        wins = 0
        for _ in range(CAS_ATTEMPTS):
            cur = await store.get(GetRequest(key))
            assert cur.etag
            nxt = str(int(cur.data) + 1).encode()
            if await _try_set(store, SetRequest(key, nxt, etag=cur.etag)):
                wins += 1
        return wins

    wins = await asyncio.gather(*(worker(a if i % 2 == 0 else b) for i in range(CAS_WORKERS)))
    total = sum(wins)
    assert total >= 1
    assert int((await b.get(GetRequest(key))).data) == total
