"""State store conformance: every registered `state.*` type against the same contract."""

from __future__ import annotations

import asyncio
import calendar
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pillion.components import registry
from pillion.components.metadata import ComponentInfo, Properties
from pillion.components.state.api import (
    TTL_EXPIRE_KEY,
    TTL_KEY,
    Concurrency,
    DeleteRequest,
    ETagInvalid,
    ETagMismatch,
    Feature,
    GetRequest,
    Operation,
    SetRequest,
    StateStore,
    TransactionalStore,
)
from tests.conformance.conftest import require_server


@dataclass(frozen=True)
class Backend:
    """How to reach one store type in tests."""

    properties: Callable[[Path], dict[str, str]]
    # (name, host, port) that must answer before the suite runs; None for embedded stores.
    server: tuple[str, str, int] | None = None
    # Run (with the row's properties) before init and after close: servers keep data between
    # tests, so each test starts empty and leaves nothing behind.
    reset: Callable[[dict[str, str]], None] | None = None


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def _flush_redis_db(props: dict[str, str]) -> None:
    import redis

    r = redis.Redis(host="127.0.0.1", port=6379, db=int(props["redisDB"]))
    r.flushdb()
    r.close()


def _drop_pg_table(props: dict[str, str]) -> None:
    import psycopg

    with psycopg.connect(props["connectionString"], autocommit=True) as c:
        c.execute(f'DROP TABLE IF EXISTS "{props["tableName"]}"')
        c.execute(f'DROP TABLE IF EXISTS "{props["metadataTableName"]}"')


def _drop_mysql_table(props: dict[str, str]) -> None:
    import pymysql

    c = pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", database="test")
    try:
        with c.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS `{props['tableName']}`")
        c.commit()
    finally:
        c.close()


_PG = "host=127.0.0.1 port=5432 user=postgres dbname=test"
_MYSQL = "root:@tcp(127.0.0.1:3306)/?allowNativePasswords=true"


# One row per registered state type. Server-backed rows name their server, e.g.
#   "state.redis": Backend(lambda _: {"redisHost": "localhost:6379"}, ("redis", "localhost", 6379))
BACKENDS: dict[str, Backend] = {
    "state.in-memory": Backend(lambda _: {}),
    "state.sqlite": Backend(lambda tmp: {"connectionString": str(tmp / "state.db")}),
    # DB 15 is the suite's own: flushed before and after each test.
    "state.redis": Backend(
        lambda _: {"redisHost": "127.0.0.1:6379", "redisDB": "15"},
        ("redis", "127.0.0.1", 6379),
        _flush_redis_db,
    ),
    "state.postgresql": Backend(
        lambda _: {
            "connectionString": _PG,
            "tableName": _unique("state"),
            "metadataTableName": _unique("state_md"),
        },
        ("postgresql", "127.0.0.1", 5432),
        _drop_pg_table,
    ),
    "state.mysql": Backend(
        lambda _: {"connectionString": _MYSQL, "schemaName": "test", "tableName": _unique("state")},
        ("mariadb", "127.0.0.1", 3306),
        _drop_mysql_table,
    ),
}

STATE_TYPES = sorted({t for t, _ in registry.kinds() if registry.category(t) == "state"})


@pytest.fixture(params=STATE_TYPES)
def store(
    request: pytest.FixtureRequest, aio: asyncio.Runner, tmp_path: Path
) -> Iterator[StateStore]:
    component_type: str = request.param
    backend = BACKENDS.get(component_type)
    if backend is None:
        pytest.fail(f"{component_type} is registered but has no row in BACKENDS")
    if backend.server is not None:
        require_server(*backend.server)
    props = backend.properties(tmp_path)
    if backend.reset is not None:
        backend.reset(props)
    instance: StateStore = registry.load(component_type, "v1")()
    info = ComponentInfo(
        name="statestore",
        type=component_type,
        version="v1",
        app_id="app",
        properties=Properties(props),
    )
    aio.run(instance.init(info))
    try:
        yield instance
    finally:
        aio.run(instance.close())
        if backend.reset is not None:
            backend.reset(props)


@pytest.fixture
def k() -> Callable[[str], str]:
    """Unique storage keys per test, so server-backed stores need no flushing between tests."""
    run = uuid.uuid4().hex[:12]
    return lambda name: f"app||{run}-{name}"


def need(store: StateStore, feature: Feature) -> None:
    if feature not in store.features():
        pytest.skip(f"store does not declare {feature}")


def transactional(store: StateStore) -> TransactionalStore:
    need(store, Feature.TRANSACTIONAL)
    assert isinstance(store, TransactionalStore)
    return store


async def etag_of(store: StateStore, key: str) -> str:
    resp = await store.get(GetRequest(key))
    assert resp is not None, f"{key} should exist"
    assert resp.etag, "a store with ETAG must return an etag"
    return resp.etag


async def value_of(store: StateStore, key: str) -> bytes | None:
    resp = await store.get(GetRequest(key))
    return None if resp is None else resp.data


def expire_epoch(text: str) -> float:
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))


# -- basic CRUD ---------------------------------------------------------------------------------

VALUES = {
    "binary": bytes(range(256)) + b"\x00\xff\x00",
    "json-object": b'{"name": "pillion", "n": [1, 2.5, null], "u": "\\u00e9t\xc3\xa9"}',
    "json-string": b'"hello"',
    "empty": b"",
    "large": bytes(range(256)) * 1024,
}


@pytest.mark.parametrize("value", VALUES.values(), ids=VALUES.keys())
async def test_set_get_delete_round_trip(
    store: StateStore, k: Callable[[str], str], value: bytes
) -> None:
    key = k("round-trip")
    await store.set(SetRequest(key, value))
    resp = await store.get(GetRequest(key))
    assert resp is not None
    assert resp.data == value
    assert type(resp.data) is bytes
    await store.delete(DeleteRequest(key))
    assert await store.get(GetRequest(key)) is None


async def test_get_missing_key_is_none(store: StateStore, k: Callable[[str], str]) -> None:
    assert await store.get(GetRequest(k("never-written"))) is None


async def test_keys_are_distinct(store: StateStore, k: Callable[[str], str]) -> None:
    await store.set(SetRequest(k("one"), b"1"))
    await store.set(SetRequest(k("two"), b"2"))
    assert await value_of(store, k("one")) == b"1"
    assert await value_of(store, k("two")) == b"2"


async def test_overwrite_replaces_value(store: StateStore, k: Callable[[str], str]) -> None:
    await store.set(SetRequest(k("x"), b"old"))
    await store.set(SetRequest(k("x"), b"new"))
    assert await value_of(store, k("x")) == b"new"


# -- etags --------------------------------------------------------------------------------------


async def test_etag_changes_on_every_write(store: StateStore, k: Callable[[str], str]) -> None:
    need(store, Feature.ETAG)
    key, seen = k("versions"), []
    for i in range(3):
        await store.set(SetRequest(key, f"v{i}".encode()))
        seen.append(await etag_of(store, key))
    assert len(set(seen)) == 3, seen
    # Rewriting the same bytes is still a write.
    await store.set(SetRequest(key, b"v2"))
    assert await etag_of(store, key) not in seen


async def test_set_with_stale_etag_fails(store: StateStore, k: Callable[[str], str]) -> None:
    need(store, Feature.ETAG)
    key = k("stale")
    await store.set(SetRequest(key, b"1"))
    old = await etag_of(store, key)
    await store.set(SetRequest(key, b"2"))
    with pytest.raises(ETagMismatch):
        await store.set(SetRequest(key, b"3", etag=old))
    assert await value_of(store, key) == b"2"


async def test_set_with_current_etag_succeeds(store: StateStore, k: Callable[[str], str]) -> None:
    need(store, Feature.ETAG)
    key = k("current")
    await store.set(SetRequest(key, b"1"))
    current = await etag_of(store, key)
    await store.set(SetRequest(key, b"2", etag=current))
    assert await value_of(store, key) == b"2"
    assert await etag_of(store, key) != current


async def test_set_with_etag_on_missing_key_fails(
    store: StateStore, k: Callable[[str], str]
) -> None:
    need(store, Feature.ETAG)
    await store.set(SetRequest(k("other"), b"x"))
    foreign = await etag_of(store, k("other"))  # well-formed for this store, wrong key
    with pytest.raises(ETagMismatch):
        await store.set(SetRequest(k("missing"), b"x", etag=foreign))
    assert await store.get(GetRequest(k("missing"))) is None


async def test_set_with_malformed_etag_fails(store: StateStore, k: Callable[[str], str]) -> None:
    need(store, Feature.ETAG)
    key = k("malformed")
    await store.set(SetRequest(key, b"1"))
    with pytest.raises((ETagMismatch, ETagInvalid)):
        await store.set(SetRequest(key, b"2", etag="not-an-etag"))
    assert await value_of(store, key) == b"1"


async def test_first_write_inserts_only(store: StateStore, k: Callable[[str], str]) -> None:
    need(store, Feature.ETAG)
    key = k("first")
    await store.set(SetRequest(key, b"1", concurrency=Concurrency.FIRST_WRITE))
    with pytest.raises(ETagMismatch):
        await store.set(SetRequest(key, b"2", concurrency=Concurrency.FIRST_WRITE))
    assert await value_of(store, key) == b"1"


async def test_first_write_with_etag_checks_it(store: StateStore, k: Callable[[str], str]) -> None:
    need(store, Feature.ETAG)
    key = k("first-etag")
    await store.set(SetRequest(key, b"1"))
    current = await etag_of(store, key)
    await store.set(SetRequest(key, b"2", etag=current, concurrency=Concurrency.FIRST_WRITE))
    assert await value_of(store, key) == b"2"
    with pytest.raises(ETagMismatch):
        await store.set(SetRequest(key, b"3", etag=current, concurrency=Concurrency.FIRST_WRITE))
    assert await value_of(store, key) == b"2"


async def test_last_write_ignores_etag(store: StateStore, k: Callable[[str], str]) -> None:
    need(store, Feature.ETAG)
    key = k("last")
    await store.set(SetRequest(key, b"1"))
    old = await etag_of(store, key)
    await store.set(SetRequest(key, b"2"))
    await store.set(SetRequest(key, b"3", etag=old, concurrency=Concurrency.LAST_WRITE))
    assert await value_of(store, key) == b"3"
    # Even a malformed etag, and on a key that does not exist yet.
    await store.set(SetRequest(k("new"), b"n", etag="bogus", concurrency=Concurrency.LAST_WRITE))
    assert await value_of(store, k("new")) == b"n"


async def test_delete_with_wrong_etag_fails(store: StateStore, k: Callable[[str], str]) -> None:
    need(store, Feature.ETAG)
    key = k("del-wrong")
    await store.set(SetRequest(key, b"1"))
    old = await etag_of(store, key)
    await store.set(SetRequest(key, b"2"))
    with pytest.raises(ETagMismatch):
        await store.delete(DeleteRequest(key, etag=old))
    assert await value_of(store, key) == b"2"


async def test_delete_with_right_etag_succeeds(store: StateStore, k: Callable[[str], str]) -> None:
    need(store, Feature.ETAG)
    key = k("del-right")
    await store.set(SetRequest(key, b"1"))
    await store.delete(DeleteRequest(key, etag=await etag_of(store, key)))
    assert await store.get(GetRequest(key)) is None


async def test_delete_absent_key(store: StateStore, k: Callable[[str], str]) -> None:
    await store.delete(DeleteRequest(k("absent")))  # no etag: success
    if Feature.ETAG in store.features():
        await store.set(SetRequest(k("gone"), b"1"))
        etag = await etag_of(store, k("gone"))
        await store.delete(DeleteRequest(k("gone")))
        with pytest.raises(ETagMismatch):
            await store.delete(DeleteRequest(k("gone"), etag=etag))


async def test_delete_last_write_ignores_etag(store: StateStore, k: Callable[[str], str]) -> None:
    need(store, Feature.ETAG)
    key = k("del-last")
    await store.set(SetRequest(key, b"1"))
    old = await etag_of(store, key)
    await store.set(SetRequest(key, b"2"))
    await store.delete(DeleteRequest(key, etag=old, concurrency=Concurrency.LAST_WRITE))
    assert await store.get(GetRequest(key)) is None


async def test_recreated_key_does_not_accept_old_etag(
    store: StateStore, k: Callable[[str], str]
) -> None:
    need(store, Feature.ETAG)
    key = k("recreated")
    await store.set(SetRequest(key, b"1"))
    old = await etag_of(store, key)
    await store.delete(DeleteRequest(key))
    await store.set(SetRequest(key, b"2"))
    with pytest.raises(ETagMismatch):
        await store.set(SetRequest(key, b"3", etag=old))


# -- bulk get -----------------------------------------------------------------------------------


async def test_bulk_get_preserves_order_and_reports_missing(
    store: StateStore, k: Callable[[str], str]
) -> None:
    await store.set(SetRequest(k("a"), b'"A"'))
    await store.set(SetRequest(k("b"), b'"B"'))
    keys = [k("b"), k("missing"), k("a"), k("b")]
    items = await store.bulk_get([GetRequest(key) for key in keys])
    assert [i.key for i in items] == keys
    assert [i.data for i in items] == [b'"B"', None, b'"A"', b'"B"']
    assert all(i.error is None for i in items)
    if Feature.ETAG in store.features():
        assert items[0].etag == await etag_of(store, k("b"))
        assert items[1].etag is None


async def test_bulk_get_many_keys(store: StateStore, k: Callable[[str], str]) -> None:
    # More keys than one batched read is likely to take at once.
    keys = [k(f"many-{i}") for i in range(1200)]
    for i, key in enumerate(keys[::2]):
        await store.set(SetRequest(key, str(i).encode()))
    items = await store.bulk_get([GetRequest(key) for key in reversed(keys)])
    assert [i.key for i in items] == list(reversed(keys))
    expected = {key: str(i).encode() for i, key in enumerate(keys[::2])}
    assert [i.data for i in items] == [expected.get(key) for key in reversed(keys)]


async def test_bulk_get_empty(store: StateStore) -> None:
    assert await store.bulk_get([]) == []


# -- transactions -------------------------------------------------------------------------------


async def test_transaction_commits_all(store: StateStore, k: Callable[[str], str]) -> None:
    tx = transactional(store)
    assert tx.max_ops() >= 0
    await store.set(SetRequest(k("a"), b"a0"))
    await store.set(SetRequest(k("b"), b"b0"))
    ops: list[Operation] = [
        SetRequest(k("a"), b"a1"),
        DeleteRequest(k("b")),
        SetRequest(k("c"), b"c1", concurrency=Concurrency.FIRST_WRITE),
        SetRequest(k("d"), b"d1"),
        SetRequest(k("d"), b"d2"),  # later operations see earlier ones
    ]
    await tx.multi(ops, {})
    assert await value_of(store, k("a")) == b"a1"
    assert await store.get(GetRequest(k("b"))) is None
    assert await value_of(store, k("c")) == b"c1"
    assert await value_of(store, k("d")) == b"d2"


async def test_transaction_checks_etags(store: StateStore, k: Callable[[str], str]) -> None:
    tx = transactional(store)
    need(store, Feature.ETAG)
    await store.set(SetRequest(k("a"), b"a0"))
    await store.set(SetRequest(k("b"), b"b0"))
    ea, eb = await etag_of(store, k("a")), await etag_of(store, k("b"))
    await tx.multi([SetRequest(k("a"), b"a1", etag=ea), DeleteRequest(k("b"), etag=eb)], {})
    assert await value_of(store, k("a")) == b"a1"
    assert await store.get(GetRequest(k("b"))) is None


async def test_transaction_rolls_back_on_etag_failure(
    store: StateStore, k: Callable[[str], str]
) -> None:
    tx = transactional(store)
    need(store, Feature.ETAG)
    await store.set(SetRequest(k("a"), b"a0"))
    await store.set(SetRequest(k("b"), b"b0"))
    await store.set(SetRequest(k("c"), b"c0"))
    stale = await etag_of(store, k("c"))
    await store.set(SetRequest(k("c"), b"c1"))
    ea = await etag_of(store, k("a"))
    ops: list[Operation] = [
        SetRequest(k("a"), b"a1"),
        DeleteRequest(k("b")),
        SetRequest(k("new"), b"n"),
        SetRequest(k("c"), b"c2", etag=stale),
    ]
    with pytest.raises(ETagMismatch):
        await tx.multi(ops, {})
    assert await value_of(store, k("a")) == b"a0"
    assert await etag_of(store, k("a")) == ea
    assert await value_of(store, k("b")) == b"b0"
    assert await store.get(GetRequest(k("new"))) is None
    assert await value_of(store, k("c")) == b"c1"
    # A failing delete aborts the same way.
    with pytest.raises(ETagMismatch):
        await tx.multi([SetRequest(k("a"), b"a2"), DeleteRequest(k("b"), etag=stale)], {})
    assert await value_of(store, k("a")) == b"a0"
    assert await value_of(store, k("b")) == b"b0"


async def test_transaction_first_write_conflict_rolls_back(
    store: StateStore, k: Callable[[str], str]
) -> None:
    tx = transactional(store)
    need(store, Feature.ETAG)
    await store.set(SetRequest(k("taken"), b"t"))
    ops = [
        SetRequest(k("a"), b"a"),
        SetRequest(k("taken"), b"x", concurrency=Concurrency.FIRST_WRITE),
    ]
    with pytest.raises(ETagMismatch):
        await tx.multi(ops, {})
    assert await store.get(GetRequest(k("a"))) is None
    assert await value_of(store, k("taken")) == b"t"


async def test_empty_transaction(store: StateStore) -> None:
    await transactional(store).multi([], {})


# -- TTL ----------------------------------------------------------------------------------------


async def test_ttl_reports_expire_time(store: StateStore, k: Callable[[str], str]) -> None:
    need(store, Feature.TTL)
    before = time.time()
    await store.set(SetRequest(k("ttl"), b"1", metadata={TTL_KEY: "100"}))
    resp = await store.get(GetRequest(k("ttl")))
    assert resp is not None
    expires = expire_epoch(resp.metadata[TTL_EXPIRE_KEY])
    assert before + 98 <= expires <= time.time() + 101
    [item] = await store.bulk_get([GetRequest(k("ttl"))])
    assert item.metadata.get(TTL_EXPIRE_KEY) == resp.metadata[TTL_EXPIRE_KEY]
    # No TTL, no expiry metadata.
    await store.set(SetRequest(k("forever"), b"1"))
    resp = await store.get(GetRequest(k("forever")))
    assert resp is not None
    assert TTL_EXPIRE_KEY not in resp.metadata


async def test_update_without_ttl_clears_it(store: StateStore, k: Callable[[str], str]) -> None:
    need(store, Feature.TTL)
    await store.set(SetRequest(k("ttl"), b"1", metadata={TTL_KEY: "100"}))
    await store.set(SetRequest(k("ttl"), b"2"))
    resp = await store.get(GetRequest(k("ttl")))
    assert resp is not None
    assert TTL_EXPIRE_KEY not in resp.metadata


async def test_ttl_expiry(store: StateStore, k: Callable[[str], str]) -> None:
    need(store, Feature.TTL)
    await store.set(SetRequest(k("short"), b"s", metadata={TTL_KEY: "1"}))
    await store.set(SetRequest(k("never"), b"n", metadata={TTL_KEY: "-1"}))
    await store.set(SetRequest(k("plain"), b"p"))
    etag = await etag_of(store, k("short")) if Feature.ETAG in store.features() else None
    resp = await store.get(GetRequest(k("never")))
    assert resp is not None
    assert TTL_EXPIRE_KEY not in resp.metadata

    deadline = time.monotonic() + 10
    while await store.get(GetRequest(k("short"))) is not None:
        assert time.monotonic() < deadline, "key with ttlInSeconds=1 still there after 10s"
        await asyncio.sleep(0.05)

    items = await store.bulk_get([GetRequest(k("short")), GetRequest(k("never"))])
    assert [i.data for i in items] == [None, b"n"]
    assert await value_of(store, k("plain")) == b"p"
    if etag is not None:
        # Expired means absent for etag checks too.
        with pytest.raises(ETagMismatch):
            await store.set(SetRequest(k("short"), b"again", etag=etag))
        with pytest.raises(ETagMismatch):
            await store.delete(DeleteRequest(k("short"), etag=etag))
        await store.set(SetRequest(k("short"), b"again", concurrency=Concurrency.FIRST_WRITE))
        assert await value_of(store, k("short")) == b"again"


@pytest.mark.parametrize("ttl", ["0", "abc", "1.5", "-2", " "])
async def test_invalid_ttl_is_rejected(
    store: StateStore, k: Callable[[str], str], ttl: str
) -> None:
    need(store, Feature.TTL)
    with pytest.raises(ValueError):
        await store.set(SetRequest(k("bad"), b"1", metadata={TTL_KEY: ttl}))
    assert await store.get(GetRequest(k("bad"))) is None
    if Feature.TRANSACTIONAL in store.features():
        tx = transactional(store)
        with pytest.raises(ValueError):
            ops = [SetRequest(k("ok"), b"1"), SetRequest(k("bad"), b"1", metadata={TTL_KEY: ttl})]
            await tx.multi(ops, {})
        assert await store.get(GetRequest(k("ok"))) is None


# -- features -----------------------------------------------------------------------------------


async def test_features_match_implementation(store: StateStore) -> None:
    features = store.features()
    assert Feature.ACTOR not in features, "the runtime adds ACTOR, stores never declare it"
    assert (Feature.TRANSACTIONAL in features) == isinstance(store, TransactionalStore)
    has_query = callable(getattr(store, "query", None))
    assert (Feature.QUERY_API in features) == has_query
