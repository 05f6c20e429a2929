"""Redis Streams pub/sub specifics: stream layout, XAUTOCLAIM redelivery, trimming, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from pillion.components.metadata import ComponentConfigError, ComponentInfo, Properties, decode
from pillion.components.pubsub.api import (
    BulkEntry,
    Feature,
    Message,
    PubSubError,
    SubscribeRequest,
)
from pillion.components.pubsub.redis import (
    RedisPubSub,
    RedisPubSubMetadata,
    RedisSubscription,
    _cancel_and_wait,
    _millis_integers,
)
from tests.conformance.conftest import require_server
from tests.polling import eventually, run
from tests.unit.components.pubsub_helpers import Inbox

HOST, PORT = "127.0.0.1", 6379


@pytest.fixture
def server() -> None:
    require_server("redis", HOST, PORT)


def info(app_id: str = "app", **props: str) -> ComponentInfo:
    return ComponentInfo(
        name="pubsub",
        type="pubsub.redis",
        version="v1",
        app_id=app_id,
        properties=Properties(props),
    )


def topic_name() -> str:
    return f"pillion-test-{uuid.uuid4().hex[:12]}"


@contextlib.asynccontextmanager
async def raw_redis(*keys: str) -> AsyncIterator[aioredis.Redis]:
    """A plain client for inspecting the server; deletes `keys` at the end."""
    client = aioredis.Redis(host=HOST, port=PORT)
    try:
        yield client
    finally:
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def open_pubsub(group: str | None = None, **props: str) -> RedisPubSub:
    ps = RedisPubSub()
    props = {
        "redisHost": f"{HOST}:{PORT}",
        "consumerID": group or f"cg-{uuid.uuid4().hex}",
        **props,
    }
    await ps.init(info(**props))
    return ps


async def pending_count(client: aioredis.Redis, topic: str, group: str) -> int:
    summary: Any = await client.xpending(topic, group)
    return int(summary["pending"])


# -- metadata ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("props", "field"),
    [
        ({}, "redisHost"),
        ({"redisHost": "  "}, "redisHost"),
        ({"redisHost": "localhost:port"}, "redisHost"),
        ({"redisHost": "localhost:70000"}, "redisHost"),
        ({"redisHost": "a:6379,b:6379"}, "redisHost"),
        ({"redisHost": "localhost:6379", "redisPort": "6380"}, "redisPort"),
        ({"redisHost": "localhost", "redisDB": "one"}, "redisDB"),
        ({"redisHost": "localhost", "enableTLS": "maybe"}, "enableTLS"),
        ({"redisHost": "localhost", "processingTimeout": "soon"}, "processingTimeout"),
        ({"redisHost": "localhost", "redeliverInterval": "-1s"}, "redeliverInterval"),
        ({"redisHost": "localhost", "queueDepth": "0"}, "queueDepth"),
        ({"redisHost": "localhost", "concurrency": "ten"}, "concurrency"),
        ({"redisHost": "localhost", "concurrency": "0"}, "concurrency"),
        ({"redisHost": "localhost", "maxLenApprox": "-5"}, "maxLenApprox"),
        ({"redisHost": "localhost", "redisType": "cluster"}, "redisType"),
        ({"redisHost": "localhost", "failover": "true"}, "failover"),
        ({"redisHost": "localhost", "clientCert": "PEM"}, "clientCert"),
    ],
)
def test_bad_metadata_names_the_field(props: dict[str, str], field: str) -> None:
    with pytest.raises(ComponentConfigError) as err:
        run(lambda: RedisPubSub().init(info(**props)))
    assert err.value.field == field, err.value


def test_metadata_defaults_and_dapr_durations() -> None:
    meta = decode(RedisPubSubMetadata, _millis_integers({"redisHost": "localhost"}))
    meta.validate()
    assert meta.address() == ("localhost", 6379)
    assert (meta.processing_timeout, meta.redeliver_interval) == (60.0, 15.0)
    assert (meta.queue_depth, meta.concurrency, meta.max_len_approx) == (100, 10, 0)
    assert meta.redelivery()
    # Dapr reads a bare integer as milliseconds; pillion follows it for these durations.
    meta = decode(
        RedisPubSubMetadata,
        _millis_integers(
            {
                "REDISHOST": "[::1]:7000",
                "processingTimeout": "1500",
                "redeliverInterval": "0",
                "readTimeout": "2s",
                "dialTimeout": "250",
                "maxLenApprox": "10",
            }
        ),
    )
    meta.validate()
    assert meta.address() == ("::1", 7000)
    assert meta.processing_timeout == pytest.approx(1.5)
    assert meta.redeliver_interval == 0.0 and not meta.redelivery()
    assert meta.read_timeout == 2.0 and meta.dial_timeout == pytest.approx(0.25)
    assert meta.max_len_approx == 10
    meta = decode(RedisPubSubMetadata, {"redisHost": "redis", "redisPort": "6380"})
    assert meta.address() == ("redis", 6380)


def test_unreachable_server_is_a_pubsub_error() -> None:
    async def main() -> None:
        with pytest.raises(PubSubError, match=r"127\.0\.0\.1:1"):
            await RedisPubSub().init(
                info(redisHost="127.0.0.1:1", redisMaxRetries="0", dialTimeout="1s")
            )

    run(main)


# -- stream layout ----------------------------------------------------------------------------


def test_stream_layout_matches_dapr(server: None) -> None:
    async def main() -> None:
        topic = topic_name()
        async with raw_redis(topic) as r:
            ps = await open_pubsub()
            try:
                assert ps.features() == frozenset({Feature.BULK_PUBLISH})
                await ps.publish(topic, b"\x00one", {"contentType": "x/y", "k": "v"})
                await ps.publish(topic, b"two", {})
                entries: Any = await r.xrange(topic)
                assert [e[1] for e in entries] == [
                    {b"data": b"\x00one", b"metadata": b'{"contentType":"x/y","k":"v"}'},
                    {b"data": b"two"},
                ]
                # What a Dapr sidecar writes (data only, or data plus JSON metadata) reads back.
                inbox = Inbox()
                sub = await ps.subscribe(SubscribeRequest(topic), inbox)
                await r.xadd(topic, {"data": b"dapr", "metadata": json.dumps({"a": "b"})})
                await eventually(lambda: len(inbox.messages) == 3, 5, lambda: f"got {inbox.data}")
                assert inbox.data == [b"\x00one", b"two", b"dapr"]  # the group starts at 0
                assert [dict(m.metadata) for m in inbox.messages] == [
                    {"contentType": "x/y", "k": "v"},
                    {},
                    {"a": "b"},
                ]
                assert all(m.attempt == 1 and m.topic == topic for m in inbox.messages)
                latest: Any = await r.xrange(topic)
                assert inbox.messages[2].id == _decode(latest[-1][0])
                group = ps.consumer_group
                await asyncio.sleep(0.1)  # acks go out after the handler returns
                assert await pending_count(r, topic, group) == 0
                consumers: Any = await r.xinfo_consumers(topic, group)
                assert [c["name"].decode() for c in consumers] == [sub.consumer]
                assert sub.consumer.startswith(f"{group}-")
                await sub.close()
                # A consumer with nothing pending is removed, so restarts do not pile them up.
                assert await r.xinfo_consumers(topic, group) == []
            finally:
                await ps.close()

    run(main)


def _decode(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def test_cancel_and_wait_outlasts_a_swallowed_cancellation() -> None:
    # On Python 3.11 redis-py's asyncio.wait_for can swallow a cancellation; close() still ends.
    async def main() -> None:
        swallowed = 0

        async def stubborn() -> None:
            nonlocal swallowed
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                swallowed += 1
            await asyncio.sleep(10)

        task = asyncio.get_running_loop().create_task(stubborn())
        await asyncio.sleep(0)
        await asyncio.wait_for(_cancel_and_wait([task]), 1)
        assert task.cancelled() and swallowed == 1

    run(main)


def test_close_right_after_subscribe_does_not_hang(server: None) -> None:
    async def main() -> None:
        topic = topic_name()
        async with raw_redis(topic):
            ps = await open_pubsub(processingTimeout="1s", redeliverInterval="10ms")
            try:
                for i in range(40):
                    sub = await ps.subscribe(SubscribeRequest(topic), Inbox())
                    await asyncio.sleep(i * 0.0002)
                    await asyncio.wait_for(sub.close(), 1)
            finally:
                await ps.close()

    run(main)


def test_consumer_group_defaults_to_app_id(server: None) -> None:
    async def main() -> None:
        topic, app_id = topic_name(), f"app-{uuid.uuid4().hex[:8]}"
        async with raw_redis(topic) as r:
            ps = RedisPubSub()
            await ps.init(info(app_id, redisHost=f"{HOST}:{PORT}"))
            try:
                sub = await ps.subscribe(SubscribeRequest(topic), Inbox())
                groups: Any = await r.xinfo_groups(topic)
                assert [g["name"].decode() for g in groups] == [app_id]
                await sub.close()
            finally:
                await ps.close()

    run(main)


def test_publish_errors_are_pubsub_errors(server: None) -> None:
    async def main() -> None:
        key = topic_name()
        async with raw_redis(key) as r:
            await r.set(key, "not a stream")
            ps = await open_pubsub()
            try:
                with pytest.raises(PubSubError, match="WRONGTYPE"):
                    await ps.publish(key, b"x", {})
                failed = await ps.bulk_publish(
                    key, [BulkEntry("a", b"1"), BulkEntry("b", b"2")], {}
                )
                assert [entry_id for entry_id, _ in failed] == ["a", "b"]
                assert all("WRONGTYPE" in error for _, error in failed)
                with pytest.raises(PubSubError):
                    await ps.subscribe(SubscribeRequest(key), Inbox())
            finally:
                await ps.close()
            with pytest.raises(PubSubError, match="closed"):
                await ps.publish(key, b"x", {})
            with pytest.raises(PubSubError, match="closed"):
                await ps.subscribe(SubscribeRequest(key), Inbox())

    run(main)


# -- redelivery -------------------------------------------------------------------------------


def test_failed_message_is_claimed_again_after_processing_timeout(server: None) -> None:
    async def main() -> None:
        topic = topic_name()
        async with raw_redis(topic) as r:
            ps = await open_pubsub(processingTimeout="1s", redeliverInterval="500ms")
            try:
                inbox = Inbox(fail=lambda m: m.attempt == 1)
                await ps.subscribe(SubscribeRequest(topic), inbox)
                await ps.publish(topic, b"flaky", {})
                await eventually(
                    lambda: inbox.data == [b"flaky"], 5, lambda: f"calls {len(inbox.attempts)}"
                )
                (t1, t2), (first, second) = inbox.times, inbox.attempts
                assert (first.attempt, second.attempt) == (1, 2)
                assert first.id == second.id
                # min-idle is processingTimeout; the claim runs every redeliverInterval.
                assert 0.9 <= t2 - t1 <= 1.0 + 0.5 + 1.0, t2 - t1
                await asyncio.sleep(0.1)
                assert await pending_count(r, topic, ps.consumer_group) == 0
                await asyncio.sleep(2)  # acked: never delivered again
                assert len(inbox.attempts) == 2
            finally:
                await ps.close()

    run(main)


def test_redelivery_disabled_leaves_failures_pending(server: None) -> None:
    async def main() -> None:
        topic = topic_name()
        async with raw_redis(topic) as r:
            ps = await open_pubsub(processingTimeout="200ms", redeliverInterval="0")
            try:
                inbox = Inbox(fail=lambda _: True)
                await ps.subscribe(SubscribeRequest(topic), inbox)
                await ps.publish(topic, b"stuck", {})
                await eventually(lambda: len(inbox.attempts) == 1, 5, lambda: "no delivery")
                await asyncio.sleep(1)
                assert len(inbox.attempts) == 1
                assert await pending_count(r, topic, ps.consumer_group) == 1
            finally:
                await ps.close()

    run(main)


def test_pending_messages_of_a_dead_consumer_go_to_another(server: None) -> None:
    async def main() -> None:
        topic, group = topic_name(), f"cg-{uuid.uuid4().hex}"
        async with raw_redis(topic) as r:
            # A consumer of another process read three messages and died without acking.
            await r.xgroup_create(topic, group, id="$", mkstream=True)
            for i in range(3):
                await r.xadd(topic, {"data": f"orphan-{i}".encode()})
            read: Any = await r.xreadgroup(group, "crashed-sidecar", {topic: ">"}, count=10)
            assert len(read[0][1]) == 3
            await asyncio.sleep(1.0)  # they have been pending for longer than processingTimeout
            ps = await open_pubsub(group, processingTimeout="1s", redeliverInterval="500ms")
            try:
                inbox = Inbox()
                sub = await ps.subscribe(SubscribeRequest(topic), inbox)
                # The first claim runs when the subscription starts.
                await eventually(lambda: len(inbox.messages) == 3, 3, lambda: f"got {inbox.data}")
                assert sorted(inbox.data) == [b"orphan-0", b"orphan-1", b"orphan-2"]
                assert all(m.attempt == 2 for m in inbox.messages), [
                    m.attempt for m in inbox.messages
                ]
                await asyncio.sleep(0.1)
                assert await pending_count(r, topic, group) == 0
                await sub.close()
            finally:
                await ps.close()

    run(main)


def test_closing_with_stuck_handlers_leaves_them_pending_for_the_group(server: None) -> None:
    async def main() -> None:
        topic, group = topic_name(), f"cg-{uuid.uuid4().hex}"
        props = {"processingTimeout": "1s", "redeliverInterval": "300ms"}
        async with raw_redis(topic) as r:
            a = await open_pubsub(group, **props)
            a.close_grace = 0.2
            started: list[Message] = []
            release = asyncio.Event()

            async def stuck(msg: Message) -> None:
                started.append(msg)
                await release.wait()

            sub_a = await a.subscribe(SubscribeRequest(topic), stuck)
            for i in range(3):
                await a.publish(topic, f"stuck-{i}".encode(), {})
            await eventually(lambda: len(started) == 3, 5, lambda: f"started {len(started)}")
            await a.close()  # cancels the handlers after close_grace; nothing acked
            assert isinstance(sub_a, RedisSubscription)
            rows: Any = await r.xpending_range(topic, group, "-", "+", 10)
            assert {row["consumer"].decode() for row in rows} == {sub_a.consumer}
            assert len(rows) == 3

            b = await open_pubsub(group, **props)
            try:
                inbox = Inbox()
                await b.subscribe(SubscribeRequest(topic), inbox)
                await eventually(lambda: len(inbox.messages) == 3, 4, lambda: f"got {inbox.data}")
                assert sorted(inbox.data) == [b"stuck-0", b"stuck-1", b"stuck-2"]
                assert {m.attempt for m in inbox.messages} == {2}
            finally:
                await b.close()

    run(main)


def test_handler_running_past_processing_timeout_is_stopped_and_retried(server: None) -> None:
    async def main() -> None:
        topic = topic_name()
        async with raw_redis(topic):
            ps = await open_pubsub(processingTimeout="500ms", redeliverInterval="200ms")
            try:
                calls: list[Message] = []

                async def slow_first(msg: Message) -> None:
                    calls.append(msg)
                    if msg.attempt == 1:
                        await asyncio.sleep(30)

                await ps.subscribe(SubscribeRequest(topic), slow_first)
                await ps.publish(topic, b"slow", {})
                await eventually(lambda: len(calls) >= 2, 5, lambda: f"calls {calls}")
                await asyncio.sleep(1.0)
                assert [m.attempt for m in calls] == [1, 2]
            finally:
                await ps.close()

    run(main)


# -- trimming ---------------------------------------------------------------------------------


def test_max_len_approx_trims_the_stream(server: None) -> None:
    async def main() -> None:
        trimmed, full = topic_name(), topic_name()
        async with raw_redis(trimmed, full) as r:
            ps = await open_pubsub(maxLenApprox="10")
            plain = await open_pubsub()
            try:
                for i in range(500):
                    await ps.publish(trimmed, str(i).encode(), {})
                    await plain.publish(full, str(i).encode(), {})
                failed = await ps.bulk_publish(
                    trimmed, [BulkEntry(str(i), b"bulk") for i in range(500)], {}
                )
                assert failed == []
                # "~" trims whole radix-tree nodes (100 entries each by default), never below 10.
                assert 10 <= await r.xlen(trimmed) <= 200
                assert await r.xlen(full) == 500
            finally:
                await ps.close()
                await plain.close()

    run(main)


# -- connections ------------------------------------------------------------------------------


async def client_id(r: aioredis.Redis, name: str) -> int | None:
    clients: Any = await r.client_list()
    ids = [int(c["id"]) for c in clients if c.get("name") == name]
    return ids[0] if ids else None


def test_reader_reconnects_after_client_kill(server: None) -> None:
    async def main() -> None:
        topic = topic_name()
        async with raw_redis(topic) as r:
            ps = await open_pubsub()
            try:
                inbox = Inbox()
                sub = await ps.subscribe(SubscribeRequest(topic), inbox)
                assert isinstance(sub, RedisSubscription)
                await ps.publish(topic, b"before", {})
                await eventually(lambda: inbox.data == [b"before"], 5, lambda: f"{inbox.data}")
                first = await client_id(r, sub.client_name)
                assert first is not None
                await r.client_kill_filter(_id=str(first))
                await ps.publish(topic, b"after-kill-id", {})
                await eventually(
                    lambda: inbox.data == [b"before", b"after-kill-id"], 5, lambda: f"{inbox.data}"
                )
                second = await client_id(r, sub.client_name)
                assert second is not None and second != first
                # Every connection but this test's: the pool's (publish retries) and the reader's.
                await r.client_kill_filter(_type="normal", skipme=True)
                await ps.publish(topic, b"after-kill-all", {})
                await eventually(lambda: len(inbox.data) == 3, 5, lambda: f"{inbox.data}")
                assert inbox.data[-1] == b"after-kill-all"
            finally:
                await ps.close()

    run(main)


class Proxy:
    """A TCP proxy to Redis that can go down and come back, like a network partition."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.close()
        for t in self._pipes:
            t.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(HOST, PORT)
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while chunk := await src.read(65536):
                dst.write(chunk)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()


def test_outage_fails_publish_and_the_subscription_recovers(server: None) -> None:
    async def main() -> None:
        topic = topic_name()
        proxy = Proxy()
        await proxy.start()
        async with raw_redis(topic):
            ps = RedisPubSub()
            await ps.init(
                info(
                    redisHost=f"{HOST}:{proxy.port}",
                    consumerID=f"cg-{uuid.uuid4().hex}",
                    redisMaxRetries="1",
                    dialTimeout="500ms",
                )
            )
            try:
                inbox = Inbox()
                await ps.subscribe(SubscribeRequest(topic), inbox)
                await ps.publish(topic, b"one", {})
                await eventually(lambda: inbox.data == [b"one"], 5, lambda: f"{inbox.data}")
                await proxy.stop()
                with pytest.raises(PubSubError, match="error publishing"):
                    await ps.publish(topic, b"lost", {})
                await asyncio.sleep(1.0)  # the reader fails a few times meanwhile
                await proxy.start()
                await ps.publish(topic, b"two", {})
                await eventually(lambda: inbox.data == [b"one", b"two"], 8, lambda: f"{inbox.data}")
            finally:
                await ps.close()
                with contextlib.suppress(Exception):
                    await proxy.stop()

    run(main)


def test_deleted_stream_is_recreated(server: None) -> None:
    async def main() -> None:
        topic = topic_name()
        async with raw_redis(topic) as r:
            ps = await open_pubsub()
            try:
                inbox = Inbox()
                await ps.subscribe(SubscribeRequest(topic), inbox)
                await r.delete(topic)  # takes the consumer group with it
                await asyncio.sleep(2.5)  # the blocked read ends, then reads into NOGROUP
                await ps.publish(topic, b"after-delete", {})
                await eventually(
                    lambda: inbox.data == [b"after-delete"], 8, lambda: f"{inbox.data}"
                )
            finally:
                await ps.close()

    run(main)
