"""Binding conformance: every registered `bindings.*` type against the binding contracts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path

import pytest
from aiohttp import web

from pillion.components import registry
from pillion.components.bindings.api import BindingError, InputBinding, OutputBinding
from pillion.components.metadata import ComponentInfo, Properties

TYPES = [t for t, _ in registry.kinds() if registry.category(t) == "bindings"]


def _info(kind: str, props: Mapping[str, str]) -> ComponentInfo:
    return ComponentInfo("b", kind, "v1", "app", Properties(dict(props)))


async def _echo_server() -> tuple[web.AppRunner, str]:
    async def handle(req: web.Request) -> web.Response:
        if req.path == "/fail":
            return web.Response(status=503, text="down")
        body = await req.read()
        return web.json_response(
            {
                "method": req.method,
                "path": req.path,
                "body": body.decode(),
                "x": req.headers.get("x-h"),
            },
            headers={"X-Reply": "yes"},
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def test_every_type_is_covered() -> None:
    assert set(TYPES) == {
        "bindings.cron",
        "bindings.http",
        "bindings.localstorage",
        "bindings.mqtt3",
        "bindings.postgresql",
        "bindings.rabbitmq",
        "bindings.redis",
    }
    for t in TYPES:
        cls = registry.load(t)
        assert issubclass(cls, InputBinding | OutputBinding)


async def test_localstorage(tmp_path: Path, aio: asyncio.Runner) -> None:
    b = registry.load("bindings.localstorage")()
    await b.init(_info("bindings.localstorage", {"rootPath": str(tmp_path / "root")}))
    assert set(b.operations()) == {"create", "get", "list", "delete"}
    r = await b.invoke("create", b'{"a":1}', {"fileName": "one.json"})
    assert json.loads(r.data) == {"fileName": "one.json"}
    generated = json.loads((await b.invoke("create", b"x", {})).data)["fileName"]
    assert (await b.invoke("get", b"", {"fileName": "one.json"})).data == b'{"a":1}'
    listed = json.loads((await b.invoke("list", b"", {})).data)
    assert sorted(Path(p).name for p in listed) == sorted(["one.json", generated])
    await b.invoke("delete", b"", {"fileName": "one.json"})
    with pytest.raises(BindingError):
        await b.invoke("get", b"", {"fileName": "one.json"})
    for bad in ("../escape", "/etc/passwd", "a/../../x"):
        with pytest.raises(BindingError):
            await b.invoke("create", b"x", {"fileName": bad})
    assert not (tmp_path / "escape").exists()
    await b.close()


async def test_http(aio: asyncio.Runner) -> None:
    runner, url = await _echo_server()
    b = registry.load("bindings.http")()
    try:
        await b.init(_info("bindings.http", {"url": url}))
        ops = b.operations()
        for op in ("get", "head", "post", "put", "patch", "delete", "options", "trace", "create"):
            assert op in ops
        r = await b.invoke("create", b"hello", {"path": "/things", "X-H": "v"})
        assert json.loads(r.data) == {
            "method": "POST",
            "path": "/things",
            "body": "hello",
            "x": "v",
        }
        assert r.metadata["statusCode"] == "200"
        assert r.metadata["status"] == "200 OK"
        assert r.metadata["X-Reply"] == "yes"
        r = await b.invoke("get", b"", {})
        assert json.loads(r.data)["method"] == "GET"
        with pytest.raises(BindingError, match="received status code 503"):
            await b.invoke("get", b"", {"path": "/fail"})
    finally:
        await b.close()
        await runner.cleanup()


async def test_cron_fires_and_stops_on_close(aio: asyncio.Runner) -> None:
    b = registry.load("bindings.cron")()
    await b.init(_info("bindings.cron", {"schedule": "@every 1s"}))
    got: list[tuple[bytes, dict[str, str]]] = []

    async def handler(data: bytes, md: Mapping[str, str]) -> bytes:
        got.append((data, dict(md)))
        return b""

    await b.read(handler)
    deadline = asyncio.get_running_loop().time() + 5
    while len(got) < 2 and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    await b.close()
    assert len(got) >= 2
    assert got[0][0] == b"" and "readTimeUTC" in got[0][1]
    n = len(got)
    await asyncio.sleep(1.3)
    assert len(got) == n


async def test_cron_rejects_bad_schedule(aio: asyncio.Runner) -> None:
    from pillion.components.metadata import ComponentConfigError

    for props in ({}, {"schedule": "61 * * * * *"}):
        b = registry.load("bindings.cron")()
        with pytest.raises(ComponentConfigError):
            await b.init(_info("bindings.cron", props))


async def _round_trip(kind: str, props: Mapping[str, str]) -> None:
    """Output `create` -> input handler, with one handler failure that must be redelivered."""
    out, inp = registry.load(kind)(), registry.load(kind)()
    got: list[bytes] = []
    failed: list[bytes] = []

    async def handler(data: bytes, md: Mapping[str, str]) -> bytes:
        if not failed:
            failed.append(data)
            raise RuntimeError("app refused")
        got.append(data)
        return b""

    try:
        await out.init(_info(kind, props))
        await inp.init(_info(kind, props))
        assert "create" in out.operations()
        await inp.read(handler)
        await out.invoke("create", b'{"n":1}', {})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not got and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert failed == [b'{"n":1}'] and got == [b'{"n":1}']
    finally:
        await inp.close()
        await out.close()


async def test_rabbitmq_round_trip(aio: asyncio.Runner) -> None:
    import uuid

    import aio_pika

    from tests.conformance.conftest import require_server

    require_server("rabbitmq", "127.0.0.1", 5672)
    assert "bindings.rabbitmq" in TYPES
    url, queue = "amqp://guest:guest@127.0.0.1:5672/", f"pillion-conf-{uuid.uuid4().hex[:10]}"
    try:
        await _round_trip("bindings.rabbitmq", {"host": url, "queueName": queue})
    finally:
        async with await aio_pika.connect(url) as conn:
            await (await conn.channel()).queue_delete(queue)


async def test_mqtt3_round_trip(aio: asyncio.Runner) -> None:
    import uuid

    from tests.conformance.conftest import require_server

    require_server("mosquitto", "127.0.0.1", 1883)
    assert "bindings.mqtt3" in TYPES
    u = uuid.uuid4().hex[:10]
    props = {
        "url": "tcp://127.0.0.1:1883",
        "topic": f"pillion-conf/{u}",
        "consumerID": f"conf-{u}",
        "backOffInitialInterval": "100ms",
        # A clean session: the broker keeps nothing for this consumer after the test.
        "cleanSession": "true",
    }
    await _round_trip("bindings.mqtt3", props)


async def test_redis(aio: asyncio.Runner) -> None:
    import uuid

    from tests.conformance.conftest import require_server

    require_server("redis", "127.0.0.1", 6379)
    b = registry.load("bindings.redis")()
    await b.init(_info("bindings.redis", {"redisHost": "127.0.0.1:6379", "redisDB": "15"}))
    key = f"conf-binding-{uuid.uuid4().hex}"
    try:
        assert set(b.operations()) == {"create", "get", "delete", "increment"}
        await b.invoke("create", b'{"a":1}', {"key": key})
        assert (await b.invoke("get", b"", {"key": key})).data == b'{"a":1}'
        await b.invoke("delete", b"", {"key": key})
        assert (await b.invoke("get", b"", {"key": key})).data == b""
        await b.invoke("increment", b"", {"key": key})
        await b.invoke("increment", b"", {"key": key})
        assert (await b.invoke("get", b"", {"key": key})).data == b"2"
        with pytest.raises(BindingError):
            await b.invoke("get", b"", {})
    finally:
        await b.invoke("delete", b"", {"key": key})
        await b.close()


async def test_postgresql(aio: asyncio.Runner) -> None:
    import uuid

    from tests.conformance.conftest import require_server

    require_server("postgresql", "127.0.0.1", 5432)
    b = registry.load("bindings.postgresql")()
    conn = "host=127.0.0.1 port=5432 user=postgres dbname=test"
    await b.init(_info("bindings.postgresql", {"connectionString": conn}))
    table = f"conf_binding_{uuid.uuid4().hex[:12]}"
    try:
        assert set(b.operations()) == {"exec", "query", "close"}
        await b.invoke("exec", b"", {"sql": f"CREATE TABLE {table} (id int, name text)"})
        r = await b.invoke(
            "exec",
            b"",
            {"sql": f"INSERT INTO {table} VALUES ($1, $2), ($3, $4)", "params": '[1,"a",2,"b"]'},
        )
        assert r.metadata["rows-affected"] == "2"
        assert r.metadata["operation"] == "exec"
        for k in ("start-time", "end-time", "duration"):
            assert r.metadata[k]
        r = await b.invoke(
            "query",
            b"",
            {"sql": f"SELECT id, name FROM {table} WHERE id > $1 ORDER BY id", "params": "[0]"},
        )
        assert json.loads(r.data) == [[1, "a"], [2, "b"]]
        with pytest.raises(BindingError):
            await b.invoke("query", b"", {})
    finally:
        await b.invoke("exec", b"", {"sql": f"DROP TABLE IF EXISTS {table}"})
        await b.invoke("close", b"", {})
        await b.close()
