"""bindings.postgresql specifics: parameters, row encoding, response metadata and close."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable

import pytest

from pillion.components.bindings.api import BindingError
from pillion.components.bindings.postgresql import PostgreSQLBinding, go_duration
from pillion.components.metadata import ComponentConfigError, ComponentInfo, Properties
from tests.conformance.conftest import require_server

PG = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def info(**props: str) -> ComponentInfo:
    return ComponentInfo("b", "bindings.postgresql", "v1", "app", Properties(props))


def run(body: Callable[[PostgreSQLBinding, str], Awaitable[None]]) -> None:
    """Run `body` with a binding and a unique table name, dropping the table afterwards."""
    require_server("postgresql", "127.0.0.1", 5432)
    table = f"pillion_binding_{uuid.uuid4().hex[:12]}"

    async def main() -> None:
        b = PostgreSQLBinding()
        await b.init(info(connectionString=PG))
        try:
            await b.invoke(
                "exec",
                b"",
                {
                    "sql": f"CREATE TABLE {table} (id int PRIMARY KEY, name text, doc jsonb, "
                    "at timestamptz, amount numeric, raw bytea, ok boolean)"
                },
            )
            await body(b, table)
        finally:
            if b._pool is None:
                await b.init(info(connectionString=PG))
            await b.invoke("exec", b"", {"sql": f"DROP TABLE IF EXISTS {table}"})
            await b.close()

    asyncio.run(main())


def test_exec_and_query() -> None:
    async def body(b: PostgreSQLBinding, table: str) -> None:
        r = await b.invoke(
            "exec",
            b"",
            {
                "sql": f"INSERT INTO {table} (id, name, doc, at, amount, raw, ok) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7)",
                "params": json.dumps(
                    [
                        1,
                        "O'Brien; DROP TABLE x",
                        {"a": [1, 2]},
                        "2024-05-06T07:08:09.5Z",
                        12.25,
                        "\\x0102",
                        True,
                    ]
                ),
            },
        )
        assert r.data == b""
        assert r.metadata["rows-affected"] == "1"
        assert r.metadata["operation"] == "exec"
        assert r.metadata["start-time"].endswith("Z") and r.metadata["end-time"].endswith("Z")
        assert r.metadata["duration"][-1] == "s"
        r = await b.invoke(
            "query",
            b"",
            {
                "sql": f"SELECT * FROM {table} WHERE name = $1",
                "params": '["O\'Brien; DROP TABLE x"]',
            },
        )
        assert json.loads(r.data) == [
            [
                1,
                "O'Brien; DROP TABLE x",
                {"a": [1, 2]},
                "2024-05-06T07:08:09.5Z",
                12.25,
                "AQI=",
                True,
            ]
        ]
        assert r.metadata["operation"] == "query" and "rows-affected" not in r.metadata
        r = await b.invoke(
            "query", b"", {"sql": f"SELECT id FROM {table} WHERE id > $1", "params": "[5]"}
        )
        assert r.data == b"[]"
        r = await b.invoke("exec", b"", {"sql": f"UPDATE {table} SET name = NULL"})
        assert r.metadata["rows-affected"] == "1"
        r = await b.invoke("query", b"", {"sql": f"SELECT name, 100 % 7 FROM {table}"})
        assert json.loads(r.data) == [[None, 2]]

    run(body)


def test_errors_and_close() -> None:
    async def body(b: PostgreSQLBinding, table: str) -> None:
        with pytest.raises(BindingError, match="required metadata not set: sql"):
            await b.invoke("exec", b"", {})
        with pytest.raises(BindingError, match="failed to unmarshal JSON"):
            await b.invoke("exec", b"", {"sql": "SELECT 1", "params": "[1,"})
        with pytest.raises(BindingError, match="failed to unmarshal JSON"):
            await b.invoke("exec", b"", {"sql": "SELECT 1", "params": '{"a":1}'})
        with pytest.raises(BindingError, match="invalid operation"):
            await b.invoke("get", b"", {"sql": "SELECT 1"})
        with pytest.raises(BindingError, match="error executing query"):
            await b.invoke("query", b"", {"sql": "SELECT * FROM no_such_table_pillion"})
        with pytest.raises(BindingError):
            await b.invoke(
                "exec", b"", {"sql": f"INSERT INTO {table} (id) VALUES ($1)", "params": '["x"]'}
            )
        r = await b.invoke("close", b"", {})
        assert r.data == b"" and r.metadata == {}
        with pytest.raises(BindingError, match="closed"):
            await b.invoke("query", b"", {"sql": "SELECT 1"})

    run(body)


def test_go_duration() -> None:
    assert go_duration(0) == "0s"
    assert go_duration(500e-9) == "500ns"
    assert go_duration(0.0000015) == "1.5µs"
    assert go_duration(0.0123) == "12.3ms"
    assert go_duration(1.5) == "1.5s"
    assert go_duration(62) == "1m2s"
    assert go_duration(3600) == "1h0m0s"


@pytest.mark.parametrize(
    "props",
    [
        {},
        {"connectionString": PG, "queryExecMode": "nope"},
        {"connectionString": PG, "useAzureAD": "true"},
    ],
)
def test_bad_metadata(props: dict[str, str]) -> None:
    with pytest.raises(ComponentConfigError):
        asyncio.run(PostgreSQLBinding().init(info(**props)))
