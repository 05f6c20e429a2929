"""MySQL/MariaDB state store specifics: DSNs, schema, exact bytes, TTL, races, sharing."""

from __future__ import annotations

import asyncio
import base64
import calendar
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiomysql
import pymysql
import pytest

from pillion.components.metadata import ComponentConfigError, ComponentInfo, Properties, decode
from pillion.components.state.api import (
    TTL_EXPIRE_KEY,
    TTL_KEY,
    Concurrency,
    DeleteRequest,
    ETagMismatch,
    GetRequest,
    Operation,
    SetRequest,
    StateError,
)
from pillion.components.state.mysql import (
    DSN,
    MySQLMetadata,
    MySQLStateStore,
    decode_value,
    encode_value,
    parse_dsn,
)
from tests.conformance.conftest import require_server
from tests.polling import run

HOST, PORT = "127.0.0.1", 3306
DSN_TEXT = "root:@tcp(127.0.0.1:3306)/?allowNativePasswords=true"
SCHEMA = "test"


def info(**props: str) -> ComponentInfo:
    return ComponentInfo(
        name="statestore",
        type="state.mysql",
        version="v1",
        app_id="app",
        properties=Properties(props),
    )


def raw(sql: str, args: Any = None, schema: str = SCHEMA) -> list[tuple[Any, ...]]:
    """Run one statement on a separate plain connection (autocommit) and return its rows."""
    conn = pymysql.connect(
        host=HOST, port=PORT, user="root", password="", database=schema, autocommit=True
    )
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())
    finally:
        conn.close()


async def data(store: MySQLStateStore, key: str) -> bytes | None:
    resp = await store.get(GetRequest(key))
    return None if resp is None else resp.data


@dataclass
class Tables:
    state: str
    meta: str

    def props(self, **extra: str) -> dict[str, str]:
        return {
            "connectionString": DSN_TEXT,
            "schemaName": SCHEMA,
            "tableName": self.state,
            "metadataTableName": self.meta,
            **extra,
        }

    async def open(self, **extra: str) -> MySQLStateStore:
        store = MySQLStateStore()
        await store.init(info(**self.props(**extra)))
        return store

    def count(self) -> int:
        """Rows physically in the state table, expired ones included."""
        n: int = raw(f"SELECT COUNT(*) FROM `{self.state}`")[0][0]
        return n


@pytest.fixture
def tables() -> Iterator[Tables]:
    require_server("mariadb", HOST, PORT)
    t = Tables(f"state_{uuid.uuid4().hex[:12]}", f"meta_{uuid.uuid4().hex[:12]}")
    try:
        yield t
    finally:
        raw(f"DROP TABLE IF EXISTS `{t.state}`, `{t.meta}`")


# -- connection strings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (DSN_TEXT, DSN(user="root")),
        (
            "dapr:p@ss:w/rd@tcp(db.example.com:3307)/mydb?parseTime=true&tls=skip-verify"
            "&timeout=5s&allowNativePasswords=false&charset=utf8mb4&loc=Local",
            DSN(
                user="dapr",
                password="p@ss:w/rd",
                host="db.example.com",
                port=3307,
                dbname="mydb",
                tls="skip-verify",
                connect_timeout=5.0,
                parse_time=True,
                allow_native_passwords=False,
            ),
        ),
        ("u@tcp(host)/", DSN(user="u", host="host")),
        ("/", DSN()),
        ("tcp([::1]:3310)/?tls=TRUE", DSN(host="::1", port=3310, tls="true")),
        ("tcp(::1)/", DSN(host="::1")),
        (
            "u:x@unix(/run/mysqld/mysqld.sock)/",
            DSN(user="u", password="x", net="unix", unix_socket="/run/mysqld/mysqld.sock"),
        ),
        ("u@unix()/", DSN(user="u", net="unix", unix_socket="/tmp/mysql.sock")),
        ("u@(h:1)/d%2Fb?tls=custom", DSN(user="u", host="h", port=1, dbname="d/b", tls="custom")),
        (
            "u@tcp(h)/?sql_mode=%27ANSI%27&innodb_lock_wait_timeout=7&novalue",
            DSN(
                user="u",
                host="h",
                session_vars={"sql_mode": "'ANSI'", "innodb_lock_wait_timeout": "7"},
            ),
        ),
    ],
)
def test_parse_dsn(text: str, expected: DSN) -> None:
    assert parse_dsn(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "root@tcp(127.0.0.1:3306)",  # no '/'
        "root@tcp(127.0.0.1:3306/",  # unclosed address
        "root@tcp(127.0.0.1:port)/",
        "root@tcp(127.0.0.1:70000)/",
        "root@cloudsql(project:region:instance)/",
        "root@tcp(h)/?parseTime=yes",
        "root@tcp(h)/?timeout=soon",
        "root@tcp(h)/?bad-name=1",
    ],
)
def test_parse_dsn_rejects(text: str) -> None:
    with pytest.raises(ComponentConfigError) as err:
        parse_dsn(text)
    assert err.value.field == "connectionString"


def test_metadata_defaults_and_aliases() -> None:
    meta = decode(MySQLMetadata, {"connectionString": DSN_TEXT})
    meta.validate()
    assert (meta.schema_name, meta.table_name, meta.metadata_table_name) == (
        "dapr_state_store",
        "state",
        "dapr_metadata",
    )
    assert (meta.op_timeout, meta.cleanup_seconds, meta.max_conns) == (20.0, 3600.0, 10)
    assert decode(MySQLMetadata, {"cleanupIntervalInSeconds": "30"}).cleanup_seconds == 30
    assert decode(MySQLMetadata, {"CLEANUPINTERVAL": "10m"}).cleanup_seconds == 600
    assert decode(MySQLMetadata, {"cleanupInterval": "0"}).cleanup_seconds == 0
    assert decode(MySQLMetadata, {"cleanupInterval": "-1"}).cleanup_seconds == 0
    assert decode(MySQLMetadata, {"timeoutInSeconds": "0"}).op_timeout == 20
    assert decode(MySQLMetadata, {"timeoutInSeconds": "5"}).op_timeout == 5


@pytest.mark.parametrize(
    ("props", "field"),
    [
        ({}, "connectionString"),
        ({"tableName": "state; DROP TABLE x"}, "tableName"),
        ({"tableName": "a" * 65}, "tableName"),
        ({"schemaName": "my-schema"}, "schemaName"),
        ({"schemaName": "`x`"}, "schemaName"),
        ({"metadataTableName": "meta.data"}, "metadataTableName"),
        ({"tableName": "same", "metadataTableName": "SAME"}, "metadataTableName"),
        ({"connectionString": "root@tcp(h)/?tls=custom"}, "connectionString"),
        ({"connectionString": "root@tcp(h)/?tls=mine", "pemPath": "/x.pem"}, "connectionString"),
        ({"connectionString": "root@tcp(h)/?tls=custom", "pemPath": "/no/such.pem"}, "pemPath"),
        ({"maxConns": "0"}, "maxConns"),
        ({"timeoutInSeconds": "soon"}, "timeoutInSeconds"),
    ],
)
def test_bad_metadata_is_a_config_error(props: dict[str, str], field: str) -> None:
    props = {"connectionString": DSN_TEXT, **props} if field != "connectionString" else props

    async def main() -> None:
        store = MySQLStateStore()
        with pytest.raises(ComponentConfigError) as err:
            await store.init(info(**props))
        assert err.value.field == field

    run(main)


# -- values ---------------------------------------------------------------------------------------

VALUES = {
    "json-odd-whitespace": b' {"a" :1 ,\n\t"b":[ 1,2 ] }  \r\n',
    "json-dup-keys": b'{"a":1,"a":2}',
    "json-big-number": b"123456789012345678901234567890.000e-0",
    "json-deep": b"[" * 100 + b"]" * 100,  # MariaDB's JSON check allows depth 31 only
    "json-lone-surrogate": b'"\\ud800"',  # valid JSON text, rejected by MariaDB's JSON check
    "json-string": b'"hello"',
    "string": b"hello 'quoted' \"double\" back\\slash %s %% \x00 nul",
    "unicode": "étoile 😀 \u2028 \u00a0".encode(),
    "nan": b"NaN",
    "invalid-utf8": b"\xc3\x28\xff\xfe",
    "binary": bytes(range(256)) * 4,
    "empty": b"",
    "spaces": b"   ",
    "large": bytes(range(256)) * 4096,  # 1 MiB
}


@pytest.mark.parametrize("value", VALUES.values(), ids=VALUES.keys())
def test_encoding_round_trips(value: bytes) -> None:
    text = encode_value(value)
    assert decode_value(text, 1) == value
    assert decode_value(text.encode(), True) == value
    # Dapr's reading: the JSON string, base64-decoded.
    assert base64.b64decode(json.loads(text)) == value


def test_decode_dapr_forms() -> None:
    # Dapr's JSON values (isbinary=0) come back as their text.
    assert decode_value('{"a": 1}', 0) == b'{"a": 1}'
    assert decode_value(b"[1]", False) == b"[1]"
    # Go's json.Marshal may escape characters inside the string.
    assert decode_value('"aGVs\\u0062G8K"', 1) == b"hello\n"
    assert decode_value('"aGVs\\nbG8K"', 1) == b"hello\n"  # line breaks are skipped
    for bad in ("[1]", '"%%%%"', '"abc"', "not json"):
        with pytest.raises(ValueError):
            decode_value(bad, 1)


def test_exact_byte_round_trips(tables: Tables) -> None:
    async def main() -> None:
        store = await tables.open()
        try:
            keys = {name: f"app||{name}" for name in VALUES}
            for name, value in VALUES.items():
                await store.set(SetRequest(keys[name], value))
            for name, value in VALUES.items():
                resp = await store.get(GetRequest(keys[name]))
                assert resp is not None
                assert resp.data == value, name
                assert type(resp.data) is bytes
            items = await store.bulk_get([GetRequest(keys[n]) for n in VALUES])
            assert [i.data for i in items] == list(VALUES.values())
            # Transactions store the same way.
            ops: list[Operation] = [SetRequest(keys[n], v[::-1]) for n, v in VALUES.items()]
            await store.multi(ops, {})
            items = await store.bulk_get([GetRequest(keys[n]) for n in VALUES])
            assert [i.data for i in items] == [v[::-1] for v in VALUES.values()]
        finally:
            await store.close()
        # On disk: Dapr's binary form, which daprd decodes to the same bytes.
        rows = dict(
            (k, (v, b)) for k, v, b in raw(f"SELECT id, value, isbinary FROM `{tables.state}`")
        )
        for name, value in VALUES.items():
            text, isbinary = rows[keys[name]]
            assert isbinary == 1
            assert base64.b64decode(json.loads(text)) == value[::-1]

    run(main)


def test_reads_rows_daprd_wrote(tables: Tables) -> None:
    async def main() -> None:
        store = await tables.open()
        try:
            etag = str(uuid.uuid4())
            # daprd over HTTP stores JSON (isbinary=0); over gRPC base64 of the bytes.
            raw(
                f"INSERT INTO `{tables.state}` (id, value, isbinary, eTag) VALUES "
                "('app||json', '{\"a\": [1, 2]}', 0, %s), ('app||bin', %s, 1, %s), "
                "('app||bad', '\"abc\"', 1, %s)",
                (etag, json.dumps(base64.b64encode(b"\x00hi").decode()), etag, etag),
            )
            resp = await store.get(GetRequest("app||json"))
            assert resp is not None
            assert (resp.data, resp.etag) == (b'{"a": [1, 2]}', etag)
            assert await store.get(GetRequest("app||bin")) is not None
            items = await store.bulk_get(
                [GetRequest("app||bin"), GetRequest("app||bad"), GetRequest("app||json")]
            )
            assert items[0].data == b"\x00hi"
            assert items[1].data is None and items[1].error
            assert items[2].data == b'{"a": [1, 2]}'
            with pytest.raises(StateError):
                await store.get(GetRequest("app||bad"))
            # Their uuid etags work for CAS like ours.
            await store.set(SetRequest("app||json", b"2", etag=etag))
            with pytest.raises(ETagMismatch):
                await store.set(SetRequest("app||bin", b"2", etag=etag.upper()))
        finally:
            await store.close()

    run(main)


def test_keys_and_etags_are_exact(tables: Tables) -> None:
    async def main() -> None:
        store = await tables.open()
        try:
            for key in ("app||k", "app||K", "app||k ", "app||ß", "app||ss"):
                await store.set(SetRequest(key, key.encode()))
            for key in ("app||k", "app||K", "app||k ", "app||ß", "app||ss"):
                assert await data(store, key) == key.encode()
            resp = await store.get(GetRequest("app||k"))
            assert resp is not None and resp.etag is not None
            for wrong in (resp.etag.upper(), resp.etag + " ", " " + resp.etag, resp.etag[:-1]):
                with pytest.raises(ETagMismatch):
                    await store.set(SetRequest("app||k", b"x", etag=wrong))
                with pytest.raises(ETagMismatch):
                    await store.delete(DeleteRequest("app||k", etag=wrong))
            with pytest.raises(StateError):
                await store.set(SetRequest("app||" + "x" * 251, b"too long"))
            assert await store.get(GetRequest("app||" + "x" * 251)) is None
            await store.set(SetRequest("app||" + "x" * 250, b"fits"))
        finally:
            await store.close()

    run(main)


# -- schema ---------------------------------------------------------------------------------------


def test_creates_schema_and_dapr_tables() -> None:
    require_server("mariadb", HOST, PORT)
    schema = f"pillion_test_{uuid.uuid4().hex[:10]}"
    props = {"connectionString": DSN_TEXT, "schemaName": schema}

    async def main() -> None:
        store = MySQLStateStore()
        await store.init(info(**props))
        await store.set(SetRequest("app||k", b"v"))
        await store.close()
        # A second sidecar finds everything in place and sees the data.
        store = MySQLStateStore()
        await store.init(info(**props))
        try:
            assert await data(store, "app||k") == b"v"
        finally:
            await store.close()

    try:
        run(main)
        tables = {r[0] for r in raw("SHOW TABLES", schema=schema)}
        assert tables == {"state", "dapr_metadata"}
        cols = {
            r[0]: (r[1], r[2], r[3])
            for r in raw(
                "SELECT COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE, COLUMN_KEY "
                "FROM information_schema.columns WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'state'",
                (schema,),
            )
        }
        assert cols == {
            "id": ("varchar(255)", "NO", "PRI"),
            "value": ("longtext", "NO", ""),  # MariaDB's JSON
            "isbinary": ("tinyint(1)", "NO", ""),
            "insertDate": ("timestamp", "NO", ""),
            "updateDate": ("timestamp", "NO", ""),
            "eTag": ("varchar(36)", "NO", ""),
            "expiredate": ("timestamp", "YES", "MUL"),
        }
        ddl = raw("SHOW CREATE TABLE state", schema=schema)[0][1]
        assert "json_valid(`value`)" in ddl and "ENGINE=InnoDB" in ddl
        meta_cols = raw(
            "SELECT COLUMN_NAME FROM information_schema.columns "
            "WHERE TABLE_SCHEMA = %s AND TABLE_NAME = 'dapr_metadata'",
            (schema,),
        )
        assert sorted(r[0] for r in meta_cols) == ["id", "value"]
    finally:
        raw(f"DROP DATABASE IF EXISTS `{schema}`")


def test_upgrades_a_table_without_expiredate(tables: Tables) -> None:
    # The layout daprd created before 1.11.
    raw(
        f"CREATE TABLE `{tables.state}` (id VARCHAR(255) NOT NULL PRIMARY KEY, value JSON NOT "
        "NULL, isbinary BOOLEAN NOT NULL, insertDate TIMESTAMP DEFAULT CURRENT_TIMESTAMP, "
        "updateDate TIMESTAMP DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP, "
        "eTag VARCHAR(36) NOT NULL)"
    )
    raw(f"INSERT INTO `{tables.state}` VALUES ('app||old', '[1]', 0, NULL, NULL, 'e1')")

    async def main() -> None:
        store = await tables.open()
        try:
            resp = await store.get(GetRequest("app||old"))
            assert resp is not None and (resp.data, resp.etag) == (b"[1]", "e1")
            await store.set(SetRequest("app||new", b"n", metadata={TTL_KEY: "60"}))
            resp = await store.get(GetRequest("app||new"))
            assert resp is not None and TTL_EXPIRE_KEY in resp.metadata
        finally:
            await store.close()

    run(main)


def test_refuses_a_foreign_table(tables: Tables) -> None:
    raw(f"CREATE TABLE `{tables.state}` (id INT PRIMARY KEY, expiredate TIMESTAMP NULL)")

    async def main() -> None:
        with pytest.raises(StateError, match="not a Dapr state table"):
            await tables.open()

    run(main)


def test_connection_string_session_variables(tables: Tables) -> None:
    async def main() -> None:
        dsn = DSN_TEXT + "&innodb_lock_wait_timeout=7&sql_mode=%27STRICT_ALL_TABLES%27"
        store = await tables.open(connectionString=dsn)
        try:

            async def settings(cur: Any) -> Any:
                await cur.execute(
                    "SELECT @@innodb_lock_wait_timeout, @@sql_mode, @@time_zone, @@tx_isolation"
                )
                return await cur.fetchone()

            assert await store._run("settings", settings) == (
                7,
                "STRICT_ALL_TABLES",
                "+00:00",
                "READ-COMMITTED",
            )
        finally:
            await store.close()

    run(main)


# -- failures -------------------------------------------------------------------------------------


def test_unreachable_server_is_a_state_error() -> None:
    async def main() -> None:
        store = MySQLStateStore()
        with pytest.raises(StateError):
            await store.init(info(connectionString="root:@tcp(127.0.0.1:1)/", timeoutInSeconds="2"))
        with pytest.raises(StateError, match="not open"):
            await store.get(GetRequest("app||k"))

    run(main)


def test_bad_credentials_are_a_state_error(tables: Tables) -> None:
    async def main() -> None:
        with pytest.raises(StateError, match="Access denied"):
            await tables.open(connectionString="nobody-here:wrong@tcp(127.0.0.1:3306)/")

    run(main)


def test_driver_errors_become_state_errors(tables: Tables) -> None:
    async def main() -> None:
        store = await tables.open()
        try:
            await store.set(SetRequest("app||k", b"v"))
            raw(f"DROP TABLE `{tables.state}`")
            for call in (
                store.get(GetRequest("app||k")),
                store.set(SetRequest("app||k", b"v")),
                store.delete(DeleteRequest("app||k")),
                store.bulk_get([GetRequest("app||k")]),
                store.multi([SetRequest("app||k", b"v")], {}),
            ):
                with pytest.raises(StateError) as err:
                    await call
                assert not isinstance(err.value, ETagMismatch)
                assert isinstance(err.value.__cause__, pymysql.err.MySQLError)
        finally:
            await store.close()

    run(main)


def test_timeouts_roll_back_and_the_store_recovers(tables: Tables) -> None:
    async def main() -> None:
        store = await tables.open(timeoutInSeconds="1")
        locker = await aiomysql.connect(host=HOST, port=PORT, user="root", db=SCHEMA)
        try:
            await store.set(SetRequest("app||locked", b"0"))
            async with locker.cursor() as cur:
                await locker.begin()
                await cur.execute(
                    f"SELECT * FROM `{tables.state}` WHERE id = 'app||locked' FOR UPDATE"
                )
            started = time.monotonic()
            with pytest.raises(StateError, match="timed out"):
                await store.set(SetRequest("app||locked", b"1"))
            assert time.monotonic() - started < 3
            with pytest.raises(StateError, match="timed out"):
                await store.multi(
                    [SetRequest("app||first", b"1"), SetRequest("app||locked", b"1")], {}
                )
            await locker.rollback()
            await asyncio.sleep(0.5)  # time for a statement the server still ran to commit
            # Nothing of the timed-out transaction survived; the store works again.
            assert await store.get(GetRequest("app||first")) is None
            assert await data(store, "app||locked") == b"0"
            await store.set(SetRequest("app||locked", b"2"))
            assert await data(store, "app||locked") == b"2"
        finally:
            locker.close()
            await store.close()

    run(main)


# -- TTL ------------------------------------------------------------------------------------------


def test_ttl_is_never_shorter_than_asked(tables: Tables) -> None:
    async def main() -> None:
        store = await tables.open()
        try:
            # Whole-second expiry times round up: a 1 s item is readable right after writing,
            # however close to a second boundary it was written.
            for i in range(30):
                await store.set(SetRequest(f"app||t{i}", b"v", metadata={TTL_KEY: "1"}))
                assert await store.get(GetRequest(f"app||t{i}")) is not None
                await asyncio.sleep(0.037)
            before = time.time()
            await store.set(SetRequest("app||hour", b"v", metadata={TTL_KEY: "3600"}))
            resp = await store.get(GetRequest("app||hour"))
            assert resp is not None
            expires = calendar.timegm(
                time.strptime(resp.metadata[TTL_EXPIRE_KEY], "%Y-%m-%dT%H:%M:%SZ")
            )
            [(server_epoch,)] = raw(
                f"SELECT UNIX_TIMESTAMP(expiredate) FROM `{tables.state}` WHERE id='app||hour'"
            )
            assert expires == server_epoch
            assert before + 3599 <= expires <= time.time() + 3602
            with pytest.raises(ValueError, match="2038"):
                await store.set(SetRequest("app||far", b"v", metadata={TTL_KEY: str(2**31 - 1)}))
            assert await store.get(GetRequest("app||far")) is None
        finally:
            await store.close()

    run(main)


async def wait_expired(store: MySQLStateStore, key: str) -> None:
    deadline = time.monotonic() + 10
    while await store.get(GetRequest(key)) is not None:
        assert time.monotonic() < deadline, f"{key} did not expire"
        await asyncio.sleep(0.05)


def test_cleanup_purges_and_takes_turns(tables: Tables) -> None:
    async def main() -> None:
        a = await tables.open(cleanupInterval="0")
        b = await tables.open(cleanupInterval="0")
        try:
            for i in range(5):
                await a.set(SetRequest(f"app||short{i}", b"s", metadata={TTL_KEY: "1"}))
            await a.set(SetRequest("app||long", b"l", metadata={TTL_KEY: "600"}))
            await a.set(SetRequest("app||plain", b"p"))
            await wait_expired(a, "app||short4")
            # Expired rows are invisible at once but still on disk until a cleanup.
            assert tables.count() == 7
            assert await a.cleanup_expired() == 5
            assert tables.count() == 2
            [(stamp,)] = raw(f"SELECT value FROM `{tables.meta}` WHERE id = 'last-cleanup'")
            assert stamp

            # Within the interval it is nobody else's turn: b skips, rows stay.
            await b.set(SetRequest("app||again", b"s", metadata={TTL_KEY: "1"}))
            await wait_expired(b, "app||again")
            assert await b.cleanup_expired() == 0
            assert await a.cleanup_expired() == 0
            assert tables.count() == 3
            # Once the last cleanup is old enough, the next caller purges.
            raw(f"UPDATE `{tables.meta}` SET value = '2000-01-01 00:00:00'")
            assert await b.cleanup_expired() == 1
            assert tables.count() == 2
            assert await a.get(GetRequest("app||long")) is not None
            assert await a.get(GetRequest("app||plain")) is not None
        finally:
            await a.close()
            await b.close()

    run(main)


def test_background_cleanup(tables: Tables) -> None:
    async def main() -> None:
        off = await tables.open(cleanupInterval="0")
        assert off._cleanup_task is None
        await off.close()
        store = await tables.open(cleanupInterval="1s")
        try:
            assert store._cleanup_task is not None
            await store.set(SetRequest("app||short", b"s", metadata={TTL_KEY: "1"}))
            await store.set(SetRequest("app||plain", b"p"))
            deadline = time.monotonic() + 10
            while tables.count() > 1:
                assert time.monotonic() < deadline, "expired row never purged"
                await asyncio.sleep(0.1)
            assert await store.get(GetRequest("app||plain")) is not None
        finally:
            await store.close()
        assert store._cleanup_task is None

    run(main)


# -- concurrency ----------------------------------------------------------------------------------


def test_one_etag_one_winner(tables: Tables) -> None:
    async def main() -> None:
        store = await tables.open()
        try:
            key = "app||contended"
            for rnd in range(20):
                await store.set(SetRequest(key, b"start"))
                resp = await store.get(GetRequest(key))
                assert resp is not None and resp.etag
                results = await asyncio.gather(
                    *(
                        store.set(SetRequest(key, f"{rnd}-{w}".encode(), etag=resp.etag))
                        for w in range(50)
                    ),
                    return_exceptions=True,
                )
                winners = [w for w, r in enumerate(results) if r is None]
                losers = [r for r in results if isinstance(r, ETagMismatch)]
                assert len(winners) == 1, results
                assert len(losers) == 49, [r for r in results if r is not None][:3]
                assert await data(store, key) == f"{rnd}-{winners[0]}".encode()
        finally:
            await store.close()

    run(main)


def test_cas_counter(tables: Tables) -> None:
    async def main() -> None:
        store = await tables.open()
        key, successes, conflicts = "app||counter", 0, 0
        await store.set(SetRequest(key, b"0"))

        async def worker() -> None:
            nonlocal successes, conflicts
            for _ in range(10):
                while True:
                    resp = await store.get(GetRequest(key))
                    assert resp is not None
                    try:
                        await store.set(
                            SetRequest(key, str(int(resp.data) + 1).encode(), etag=resp.etag)
                        )
                    except ETagMismatch:
                        conflicts += 1
                        continue
                    successes += 1
                    break

        try:
            await asyncio.gather(*(worker() for _ in range(20)))
            resp = await store.get(GetRequest(key))
            assert resp is not None
            assert int(resp.data) == successes == 200
            assert conflicts > 0  # the workers did race
        finally:
            await store.close()

    run(main)


def test_concurrent_first_writes(tables: Tables) -> None:
    async def main() -> None:
        store = await tables.open()
        try:
            for rnd in range(10):
                results = await asyncio.gather(
                    *(
                        store.set(
                            SetRequest(
                                f"app||fw{rnd}",
                                str(w).encode(),
                                concurrency=Concurrency.FIRST_WRITE,
                            )
                        )
                        for w in range(20)
                    ),
                    return_exceptions=True,
                )
                assert sum(r is None for r in results) == 1, results
                assert all(isinstance(r, ETagMismatch) for r in results if r is not None)
        finally:
            await store.close()

    run(main)


# -- transactions ---------------------------------------------------------------------------------


def test_transaction_rollback(tables: Tables) -> None:
    async def main() -> None:
        store = await tables.open()
        try:
            await store.set(SetRequest("app||a", b"a0"))
            await store.set(SetRequest("app||b", b"b0"))
            resp = await store.get(GetRequest("app||a"))
            assert resp is not None
            etag_a = resp.etag
            ops: list[Operation] = [
                SetRequest("app||a", b"a1", etag=etag_a),
                DeleteRequest("app||b"),
                SetRequest("app||c", b"c1", metadata={TTL_KEY: "60"}),
                SetRequest("app||b", b"b1", concurrency=Concurrency.FIRST_WRITE),
                DeleteRequest("app||a", etag="stale"),
            ]
            with pytest.raises(ETagMismatch):
                await store.multi(ops, {})
            items = await store.bulk_get([GetRequest(f"app||{k}") for k in "abc"])
            assert [i.data for i in items] == [b"a0", b"b0", None]
            assert items[0].etag == etag_a
            # Without the bad operation, all of it applies; later operations see earlier ones.
            await store.multi(ops[:-1], {})
            items = await store.bulk_get([GetRequest(f"app||{k}") for k in "abc"])
            assert [i.data for i in items] == [b"a1", b"b1", b"c1"]
            assert TTL_EXPIRE_KEY in items[2].metadata
            # A bad TTL or key fails before anything is sent.
            with pytest.raises(ValueError):
                await store.multi(
                    [DeleteRequest("app||a"), SetRequest("app||x", b"", metadata={TTL_KEY: "0"})],
                    {},
                )
            with pytest.raises(StateError):
                await store.multi(
                    [DeleteRequest("app||a"), SetRequest("app||" + "y" * 300, b"")], {}
                )
            assert await data(store, "app||a") == b"a1"
        finally:
            await store.close()

    run(main)


def test_concurrent_transactions_are_atomic(tables: Tables) -> None:
    """Transfers between two keys under contention never lose or create money."""

    async def main() -> None:
        store = await tables.open()
        try:
            await store.set(SetRequest("app||x", b"100"))
            await store.set(SetRequest("app||y", b"100"))

            async def transfer(src: str, dst: str) -> None:
                for _ in range(20):
                    items = await store.bulk_get([GetRequest(src), GetRequest(dst)])
                    s, d = items
                    assert s.data is not None and d.data is not None
                    try:
                        await store.multi(
                            [
                                SetRequest(src, str(int(s.data) - 1).encode(), etag=s.etag),
                                SetRequest(dst, str(int(d.data) + 1).encode(), etag=d.etag),
                            ],
                            {},
                        )
                    except ETagMismatch:
                        continue
                    return

            await asyncio.gather(
                *(transfer("app||x", "app||y") for _ in range(10)),
                *(transfer("app||y", "app||x") for _ in range(10)),
            )
            items = await store.bulk_get([GetRequest("app||x"), GetRequest("app||y")])
            assert sum(int(i.data or b"0") for i in items) == 200
        finally:
            await store.close()

    run(main)


# -- sharing --------------------------------------------------------------------------------------


def test_two_instances_share_a_table(tables: Tables) -> None:
    async def main() -> None:
        a = await tables.open()
        b = await tables.open()
        try:
            await a.set(SetRequest("app||k", b"from-a", metadata={TTL_KEY: "120"}))
            ra, rb = await a.get(GetRequest("app||k")), await b.get(GetRequest("app||k"))
            assert ra == rb and ra is not None
            assert TTL_EXPIRE_KEY in ra.metadata
            await b.set(SetRequest("app||k", b"from-b", etag=ra.etag))
            with pytest.raises(ETagMismatch):
                await a.set(SetRequest("app||k", b"stale", etag=ra.etag))
            with pytest.raises(ETagMismatch):
                await a.set(SetRequest("app||k", b"again", concurrency=Concurrency.FIRST_WRITE))
            rb = await b.get(GetRequest("app||k"))
            assert rb is not None and rb.data == b"from-b"
            await a.delete(DeleteRequest("app||k", etag=rb.etag))
            assert await b.get(GetRequest("app||k")) is None
            await b.multi([SetRequest("app||t1", b"1"), SetRequest("app||t2", b"2")], {})
            items = await a.bulk_get([GetRequest("app||t2"), GetRequest("app||t1")])
            assert [i.data for i in items] == [b"2", b"1"]
        finally:
            await a.close()
            await b.close()

    run(main)


def test_bulk_get_is_one_query(tables: Tables, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        store = await tables.open()
        try:
            for i in range(0, 300, 3):
                await store.set(SetRequest(f"app||b{i}", str(i).encode()))
            executed: list[str] = []
            original = aiomysql.Cursor.execute

            async def counting(self: Any, query: str, args: Any = None) -> Any:
                executed.append(query)
                return await original(self, query, args)

            monkeypatch.setattr(aiomysql.Cursor, "execute", counting)
            keys = [f"app||b{i}" for i in reversed(range(300))] + ["app||b0"]
            items = await store.bulk_get([GetRequest(k) for k in keys])
            assert len(executed) == 1 and " IN (" in executed[0]
            assert [i.key for i in items] == keys
            assert [i.data for i in items] == [
                str(int(k[6:])).encode() if int(k[6:]) % 3 == 0 else None for k in keys
            ]
        finally:
            await store.close()

    run(main)
