"""bindings.mqtt3 against a real broker: round trip, retries, redelivery on a persistent session."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping

import pytest

from pillion.components.bindings.api import BindingError
from pillion.components.bindings.mqtt3 import MQTTBinding
from pillion.components.metadata import ComponentConfigError, ComponentInfo, Properties
from tests.conformance.conftest import require_server

HOST, PORT = "127.0.0.1", 1883
URL = f"tcp://{HOST}:{PORT}"


@pytest.fixture
def server() -> None:
    require_server("mosquitto", HOST, PORT)


def info(**props: str) -> ComponentInfo:
    return ComponentInfo("mb", "bindings.mqtt3", "v1", "app", Properties(props))


def names() -> tuple[str, str]:
    u = uuid.uuid4().hex[:10]
    return f"pillion-test/binding-{u}", f"cid-{u}"


async def _wait(cond: object, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond() and loop.time() < end:  # type: ignore[operator]
        await asyncio.sleep(0.05)


async def _forget(topic: str, cid: str) -> None:
    """Drop the persistent session the test left on the broker."""
    b = MQTTBinding()
    await b.init(info(url=URL, topic=topic, consumerID=cid, cleanSession="true"))

    async def ignore(data: bytes, md: Mapping[str, str]) -> bytes:
        return b""

    await b.read(ignore)
    await b.close()


def test_round_trip_retry_and_topic_override(server: None) -> None:
    async def main() -> None:
        topic, cid = names()
        b = MQTTBinding()
        got: list[tuple[bytes, dict[str, str]]] = []
        calls = 0

        async def handler(data: bytes, md: Mapping[str, str]) -> bytes:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("app refused")
            got.append((data, dict(md)))
            return b""

        try:
            await b.init(info(url=URL, topic=topic, consumerID=cid, backOffInitialInterval="100ms"))
            await b.read(handler)
            await b.invoke("create", b'{"a":1}', {})
            await _wait(lambda: bool(got))
            assert calls == 2
            assert got == [(b'{"a":1}', {"topic": topic, "retained": "false"})]
            other = MQTTBinding()
            await other.init(info(url=URL, topic=topic + "/x", consumerID=cid + "-o"))
            await other.invoke("create", b"over", {"topic": topic})
            await other.close()
            await _wait(lambda: len(got) >= 2)
            assert got[1][0] == b"over"
            with pytest.raises(BindingError):
                await b.invoke("get", b"", {})
            with pytest.raises(BindingError):
                await b.invoke("create", b"", {"topic": "a/#"})
        finally:
            await b.close()
            await _forget(topic, cid)

    asyncio.run(main())


def test_unacked_message_redelivered_after_reconnect(server: None) -> None:
    async def main() -> None:
        topic, cid = names()
        b = MQTTBinding()
        started = asyncio.Event()

        async def failing(data: bytes, md: Mapping[str, str]) -> bytes:
            started.set()
            raise RuntimeError("down")

        try:
            await b.init(info(url=URL, topic=topic, consumerID=cid, backOffMaxRetries="0"))
            await b.read(failing)
            await b.invoke("create", b"again", {})
            await asyncio.wait_for(started.wait(), 10)
            await b.close()
            # Same consumerID: the broker kept the session and sends the unacked message again.
            b = MQTTBinding()
            await b.init(info(url=URL, topic=topic, consumerID=cid))
            got: list[bytes] = []

            async def ok(data: bytes, md: Mapping[str, str]) -> bytes:
                got.append(data)
                return b""

            await b.read(ok)
            await _wait(lambda: bool(got))
            assert got == [b"again"]
        finally:
            await b.close()
            await _forget(topic, cid)

    asyncio.run(main())


def test_bad_metadata() -> None:
    async def main() -> None:
        for props in ({"url": URL}, {"topic": "t"}, {"url": URL, "topic": "t", "qos": "3"}):
            with pytest.raises(ComponentConfigError):
                await MQTTBinding().init(info(**props))

    asyncio.run(main())
