"""bindings.redis specifics: Dapr's operations, TTLs, missing keys and metadata checks."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import pytest
import redis

from pillion.components.bindings.api import BindingError
from pillion.components.bindings.redis import RedisBinding, parse_ttl
from pillion.components.metadata import ComponentConfigError, ComponentInfo, Properties
from tests.conformance.conftest import require_server

HOST, PORT, DB = "127.0.0.1", 6379, 13


def info(**props: str) -> ComponentInfo:
    return ComponentInfo("b", "bindings.redis", "v1", "app", Properties(props))


def run(body: Callable[[RedisBinding, str], Awaitable[None]]) -> None:
    """Run `body` with an initialised binding and a unique key, deleting the key afterwards."""
    require_server("redis", HOST, PORT)
    key = f"pillion-test-binding-{uuid.uuid4().hex}"

    async def main() -> None:
        b = RedisBinding()
        await b.init(info(redisHost=f"{HOST}:{PORT}", redisDB=str(DB)))
        try:
            await body(b, key)
        finally:
            await b.close()

    try:
        asyncio.run(main())
    finally:
        r = redis.Redis(host=HOST, port=PORT, db=DB)
        try:
            r.delete(key)
        finally:
            r.close()


def test_create_get_delete() -> None:
    async def body(b: RedisBinding, key: str) -> None:
        r = await b.invoke("create", b'{"n":1}', {"key": key})
        assert r.data == b"" and r.metadata == {}
        assert (await b.invoke("get", b"", {"key": key})).data == b'{"n":1}'
        await b.invoke("delete", b"", {"key": key})
        assert (await b.invoke("get", b"", {"key": key})).data == b""
        await b.invoke("delete", b"", {"key": key})  # deleting a missing key is fine

    run(body)


def test_create_with_ttl_and_get_delete() -> None:
    async def body(b: RedisBinding, key: str) -> None:
        await b.invoke("create", b"v", {"key": key, "ttlInSeconds": "100"})
        assert b._client is not None
        assert 0 < await b._client.ttl(key) <= 100
        await b.invoke("create", b"w", {"key": key})
        assert await b._client.ttl(key) == -1  # a SET without EX clears the expiry
        assert (await b.invoke("get", b"", {"key": key, "delete": "true"})).data == b"w"
        assert (await b.invoke("get", b"", {"key": key})).data == b""

    run(body)


def test_increment() -> None:
    async def body(b: RedisBinding, key: str) -> None:
        await b.invoke("increment", b"", {"key": key})
        await b.invoke("increment", b"", {"key": key, "ttlInSeconds": "50"})
        assert (await b.invoke("get", b"", {"key": key})).data == b"2"
        assert b._client is not None
        assert 0 < await b._client.ttl(key) <= 50
        await b.invoke("create", b"text", {"key": key})
        with pytest.raises(BindingError, match="not an integer"):
            await b.invoke("increment", b"", {"key": key})

    run(body)


def test_request_errors() -> None:
    async def body(b: RedisBinding, key: str) -> None:
        with pytest.raises(BindingError, match="missing key"):
            await b.invoke("create", b"x", {})
        with pytest.raises(BindingError, match="invalid operation"):
            await b.invoke("list", b"", {"key": key})
        for ttl in ("0", "-3", "1.5", "x"):
            with pytest.raises(BindingError, match="ttlInSeconds"):
                await b.invoke("create", b"x", {"key": key, "ttlInSeconds": ttl})
        assert (await b.invoke("get", b"", {"key": key})).data == b""

    run(body)


def test_parse_ttl() -> None:
    assert parse_ttl({}) is None
    assert parse_ttl({"ttlInSeconds": ""}) is None
    assert parse_ttl({"ttlInSeconds": "7"}) == 7


@pytest.mark.parametrize(
    "props",
    [
        {},
        {"redisHost": "h:1", "redisType": "cluster"},
        {"redisHost": "h:1", "failover": "true"},
        {"redisHost": "h:1", "redisDB": "-1"},
        {"redisHost": "h:1", "clientCert": "x"},
    ],
)
def test_bad_metadata(props: dict[str, str]) -> None:
    with pytest.raises(ComponentConfigError):
        asyncio.run(RedisBinding().init(info(**props)))


def test_unreachable_server() -> None:
    b = RedisBinding()
    with pytest.raises(BindingError, match="cannot connect"):
        asyncio.run(b.init(info(redisHost="127.0.0.1:1", redisMaxRetries="-1")))
