"""bindings.rabbitmq against a real broker: round trip, redelivery after a handler failure."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping

import aio_pika
import pytest

from pillion.components.bindings.api import BindingError
from pillion.components.bindings.rabbitmq import RabbitMQBinding
from pillion.components.metadata import ComponentConfigError, ComponentInfo, Properties
from tests.conformance.conftest import require_server

HOST, PORT = "127.0.0.1", 5672
URL = f"amqp://guest:guest@{HOST}:{PORT}/"


@pytest.fixture
def server() -> None:
    require_server("rabbitmq", HOST, PORT)


def info(**props: str) -> ComponentInfo:
    return ComponentInfo("rb", "bindings.rabbitmq", "v1", "app", Properties(props))


def queue() -> str:
    return f"pillion-binding-{uuid.uuid4().hex[:10]}"


async def _delete(name: str) -> None:
    conn = await aio_pika.connect(URL)
    async with conn:
        ch = await conn.channel()
        await ch.queue_delete(name)


async def _wait(cond: object, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond() and loop.time() < end:  # type: ignore[operator]
        await asyncio.sleep(0.05)


def test_round_trip_and_redelivery(server: None) -> None:
    async def main() -> None:
        q = queue()
        out, inp = RabbitMQBinding(), RabbitMQBinding()
        got: list[tuple[bytes, dict[str, str]]] = []
        calls = 0

        async def handler(data: bytes, md: Mapping[str, str]) -> bytes:
            nonlocal calls
            calls += 1
            if data == b"fail-once" and calls == 1:
                raise RuntimeError("app refused")
            got.append((data, dict(md)))
            return b""

        try:
            await out.init(info(host=URL, queueName=q, maxPriority="5"))
            await inp.init(info(host=URL, queueName=q, maxPriority="5", prefetchCount="1"))
            assert out.operations() == ["create"]
            await out.invoke("create", b"fail-once", {"priority": "3"})
            await inp.read(handler)
            await _wait(lambda: len(got) >= 1)
            assert calls == 2 and got[0][0] == b"fail-once"
            await out.invoke("create", b'{"a":1}', {"ttlInSeconds": "60"})
            await _wait(lambda: len(got) >= 2)
            assert got[1][0] == b'{"a":1}'
            assert got[1][1].get("contentType") == "text/plain"
            with pytest.raises(BindingError):
                await out.invoke("delete", b"", {})
            with pytest.raises(BindingError):
                await out.invoke("create", b"x", {"priority": "999"})
        finally:
            await inp.close()
            await out.close()
            await _delete(q)

    asyncio.run(main())


def test_unacked_message_survives_close(server: None) -> None:
    async def main() -> None:
        q = queue()
        b = RabbitMQBinding()
        started = asyncio.Event()

        async def slow(data: bytes, md: Mapping[str, str]) -> bytes:
            started.set()
            await asyncio.sleep(30)
            return b""

        try:
            await b.init(info(host=URL, queueName=q, durable="true"))
            await b.invoke("create", b"keep", {})
            await b.read(slow)
            await asyncio.wait_for(started.wait(), 10)
            await b.close()
            b2 = RabbitMQBinding()
            await b2.init(info(host=URL, queueName=q, durable="true"))
            got: list[bytes] = []

            async def ok(data: bytes, md: Mapping[str, str]) -> bytes:
                got.append(data)
                return b""

            await b2.read(ok)
            await _wait(lambda: bool(got))
            await b2.close()
            assert got == [b"keep"]
        finally:
            await b.close()
            await _delete(q)

    asyncio.run(main())


def test_bad_metadata() -> None:
    async def main() -> None:
        for props in ({"host": URL}, {"host": "http://x", "queueName": "q"}):
            with pytest.raises(ComponentConfigError):
                await RabbitMQBinding().init(info(**props))

    asyncio.run(main())
