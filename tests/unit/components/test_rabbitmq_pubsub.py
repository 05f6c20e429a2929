"""RabbitMQ pub/sub: Dapr's queue layout, ack, nack and dead letters, confirms, TTL, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from aio_pika.exceptions import ChannelNotFoundEntity

from pillion.components.metadata import ComponentConfigError, ComponentInfo, Properties, Seconds
from pillion.components.pubsub.api import (
    TTL_KEY,
    BulkEntry,
    BulkPublisher,
    Feature,
    Message,
    PubSubError,
    SubscribeRequest,
    Subscription,
)
from pillion.components.pubsub.rabbitmq import RabbitMQMetadata, RabbitMQPubSub
from tests.conformance.conftest import require_server
from tests.polling import eventually

HOST, PORT = "127.0.0.1", 5672
URL = f"amqp://guest:guest@{HOST}:{PORT}"
# Short waits so reconnect tests take a fraction of a second per step.
FAST = {"reconnectWaitSeconds": "100ms"}


def info(**props: str) -> ComponentInfo:
    return ComponentInfo(
        name="pubsub",
        type="pubsub.rabbitmq",
        version="v1",
        app_id="app",
        properties=Properties(props),
    )


@pytest.fixture
def server() -> None:
    require_server("rabbitmq", HOST, PORT)


class Inbox:
    """Records deliveries; payloads in `fail` make every attempt raise, in `fail_once` the first."""

    def __init__(
        self, fail: set[bytes] | None = None, fail_once: set[bytes] | None = None, hold: float = 0
    ) -> None:
        self.messages: list[Message] = []
        self.attempts: dict[bytes, int] = {}
        self.fail = fail or set()
        self.fail_once = fail_once or set()
        self.hold = hold
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, msg: Message) -> None:
        n = self.attempts[msg.data] = self.attempts.get(msg.data, 0) + 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold:
                await asyncio.sleep(self.hold)
            if msg.data in self.fail or (n == 1 and msg.data in self.fail_once):
                raise RuntimeError("test: deliberate handler failure")
            self.messages.append(msg)
        finally:
            self.in_flight -= 1

    @property
    def data(self) -> list[bytes]:
        return [m.data for m in self.messages]


class Broker:
    """A test's view of RabbitMQ: unique names, components it built, and cleanup of both."""

    def __init__(self, admin: AbstractConnection) -> None:
        self.admin = admin
        self.run = uuid.uuid4().hex[:10]
        self.topics: set[str] = set()
        self.groups: set[str] = set()
        self.extra_queues: set[str] = set()
        self.extra_exchanges: set[str] = set()
        self.components: list[RabbitMQPubSub] = []

    def topic(self, tag: str = "t") -> str:
        name = f"pillion-test-{self.run}-{tag}"
        self.topics.add(name)
        return name

    def group(self, tag: str = "g") -> str:
        name = f"cg-{self.run}-{tag}"
        self.groups.add(name)
        return name

    async def new(self, consumer_id: str | None = None, url: str = URL, **props: str) -> Any:
        ps = RabbitMQPubSub()
        await ps.init(info(connectionString=url, consumerID=consumer_id or self.group(), **props))
        self.components.append(ps)
        return ps

    async def queue_exists(self, name: str) -> bool:
        channel = await self.admin.channel()
        try:
            await channel.declare_queue(name, passive=True)
            return True
        except ChannelNotFoundEntity:
            return False
        finally:
            if not channel.is_closed:
                await channel.close()

    async def exchange_exists(self, name: str) -> bool:
        channel = await self.admin.channel()
        try:
            await channel.declare_exchange(name, passive=True)
            return True
        except ChannelNotFoundEntity:
            return False
        finally:
            if not channel.is_closed:
                await channel.close()

    async def get(self, queue: str) -> AbstractIncomingMessage | None:
        """One message from `queue` (acknowledged), or None."""
        channel = await self.admin.channel()
        try:
            q = await channel.declare_queue(queue, passive=True)
            msg = await q.get(fail=False, no_ack=True)
            return msg
        finally:
            await channel.close()

    async def cleanup(self) -> None:
        for ps in reversed(self.components):
            await ps.close()
        queues = set(self.extra_queues)
        exchanges = set(self.topics) | self.extra_exchanges
        for g in self.groups:
            for t in self.topics:
                queues |= {f"{g}-{t}", f"dlq-{g}-{t}"}
                exchanges.add(f"dlx-{g}-{t}")
        channel = await self.admin.channel()
        for q in sorted(queues):
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                if channel.is_closed:
                    channel = await self.admin.channel()
                await channel.queue_delete(q)
        for e in sorted(exchanges):
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                if channel.is_closed:
                    channel = await self.admin.channel()
                await channel.exchange_delete(e)
        if not channel.is_closed:
            await channel.close()


@asynccontextmanager
async def broker() -> AsyncIterator[Broker]:
    admin = await aio_pika.connect(URL)
    b = Broker(admin)
    try:
        yield b
    finally:
        try:
            await b.cleanup()
        finally:
            await admin.close()


class Proxy:
    """A TCP relay to RabbitMQ whose `cut()` closes every connection, as a dying server would."""

    def __init__(self) -> None:
        self._pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.accepting = True
        self.port = 0

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return f"amqp://guest:guest@{HOST}:{self.port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection(HOST, PORT)
        self._pairs.append((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.transport.abort()

    def cut(self) -> None:
        for client, upstream in self._pairs:
            client.transport.abort()
            upstream.transport.abort()
        self._pairs.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


# -- metadata -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("props", "field"),
    [
        ({"deliveryMode": "5"}, "deliveryMode"),
        ({"deliveryMode": "persistent"}, "deliveryMode"),
        ({"prefetchCount": "-1"}, "prefetchCount"),
        ({"prefetchCount": "70000"}, "prefetchCount"),
        ({"exchangeKind": "bogus"}, "exchangeKind"),
        ({"concurrencyMode": "fifo"}, "concurrencyMode"),
        ({"connectionString": "http://127.0.0.1:5672"}, "connectionString"),
        ({"connectionString": "amqp://"}, "connectionString"),
        ({"host": "redis://127.0.0.1"}, "host"),
        ({"connectionString": URL, "protocol": "amqps"}, "protocol"),
        ({"protocol": "http"}, "protocol"),
        ({"hostname": "a/b"}, "hostname"),
        ({"ttlInSeconds": "0"}, "ttlInSeconds"),
        ({"ttlInSeconds": "soon"}, "ttlInSeconds"),
        ({"reconnectWaitSeconds": "later"}, "reconnectWaitSeconds"),
        ({"reconnectWait": "-1s"}, "reconnectWaitSeconds"),
        ({"heartBeat": "often"}, "heartBeat"),
        ({"durable": "maybe"}, "durable"),
        ({"requeueInFailure": "perhaps"}, "requeueInFailure"),
        ({"maxLen": "-5"}, "maxLen"),
        ({"clientCert": "-----BEGIN CERTIFICATE-----"}, "clientKey"),
        ({"connectionString": "amqps://127.0.0.1:5671", "caCert": "not a certificate"}, "caCert"),
    ],
)
def test_bad_metadata_names_the_field(props: dict[str, str], field: str) -> None:
    async def main() -> None:
        with pytest.raises(ComponentConfigError) as caught:
            await RabbitMQPubSub().init(info(**props))
        assert caught.value.field == field, caught.value

    asyncio.run(main())


def test_defaults_follow_dapr() -> None:
    meta = RabbitMQMetadata()
    assert meta.durable is True  # Dapr's code (its docs say false)
    assert meta.deleted_when_unused is True
    assert meta.auto_ack is False
    assert meta.requeue_in_failure is False
    assert meta.enable_dead_letter is False
    assert meta.delivery_mode == 0
    assert meta.prefetch_count == 0
    assert float(meta.reconnect_wait) == 3.0
    assert float(meta.heart_beat) == 10.0
    assert meta.exchange_kind == "fanout"
    assert meta.concurrency_mode == "parallel"
    assert meta.publisher_confirm is False
    assert str(meta.url()) == "amqp://localhost/?heartbeat=10"


def test_url_from_parts_and_connection_string() -> None:
    parts = RabbitMQMetadata(
        protocol="amqps",
        hostname="rabbit:5671",
        username="u",
        password="p@ss",
        heart_beat=Seconds(0),
    )
    url = parts.url()
    assert (url.scheme, url.host, url.port, url.user, url.password) == (
        "amqps",
        "rabbit",
        5671,
        "u",
        "p@ss",
    )
    assert url.query["heartbeat"] == "0"
    # As Dapr: a password without a username is not sent; the old `host` name still works.
    assert RabbitMQMetadata(password="p").url().password is None
    assert RabbitMQMetadata(host="amqp://h:1/vh").url().path == "/vh"
    assert RabbitMQMetadata(connection_string="amqp://a", host="amqp://b").url().host == "a"


def test_unreachable_broker_is_a_pubsub_error() -> None:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there

    async def main() -> None:
        ps = RabbitMQPubSub()
        with pytest.raises(PubSubError, match="cannot connect") as caught:
            await ps.init(info(connectionString=f"amqp://guest:secret@{HOST}:{port}"))
        assert "secret" not in str(caught.value)

    asyncio.run(main())


def test_features() -> None:
    ps = RabbitMQPubSub()
    assert ps.features() == {Feature.MESSAGE_TTL, Feature.BULK_PUBLISH}
    assert isinstance(ps, BulkPublisher)
    assert Feature.ORDERED not in ps.features()


# -- layout: exchanges, queues, consumer groups --------------------------------------------------


def test_queue_per_consumer_group_and_competing_consumers(server: None) -> None:
    async def main() -> None:
        async with broker() as b:
            topic = b.topic()
            group, other = b.group("a"), b.group("b")
            a1, a2 = await b.new(group), await b.new(group)
            c = await b.new(other)
            in1, in2, in3 = Inbox(hold=0.002), Inbox(hold=0.002), Inbox()
            await a1.subscribe(SubscribeRequest(topic), in1)
            await a2.subscribe(SubscribeRequest(topic), in2)
            await c.subscribe(SubscribeRequest(topic), in3)
            # Dapr's layout: an exchange named after the topic, a queue <consumerID>-<topic>.
            assert await b.exchange_exists(topic)
            assert await b.queue_exists(f"{group}-{topic}")
            assert await b.queue_exists(f"{other}-{topic}")
            sent = [f"m{i}".encode() for i in range(40)]
            for data in sent:
                await a1.publish(topic, data, {})
            await eventually(
                lambda: len(in1.data) + len(in2.data) >= len(sent) and len(in3.data) >= len(sent),
                10,
                lambda: f"group a {len(in1.data)}+{len(in2.data)}, group b {len(in3.data)}",
            )
            await asyncio.sleep(0.3)
            # Each message once per group; both sidecars of group a got some.
            assert sorted(in1.data + in2.data) == sorted(sent)
            assert sorted(in3.data) == sorted(sent)
            assert in1.data and in2.data

    asyncio.run(main())


def test_queue_name_and_routing_keys_from_subscription_metadata(server: None) -> None:
    async def main() -> None:
        async with broker() as b:
            topic = b.topic()
            queue = f"pillion-test-{b.run}-custom"
            b.extra_queues.add(queue)
            ps = await b.new(exchangeKind="topic")
            inbox = Inbox()
            await ps.subscribe(
                SubscribeRequest(topic, {"queueName": queue, "routingKey": "orders.*,audit"}), inbox
            )
            assert await b.queue_exists(queue)
            for key in ("orders.new", "audit", "payments.new", ""):
                await ps.publish(topic, key.encode() or b"none", {"routingKey": key})
            await eventually(lambda: len(inbox.data) >= 2, 5, lambda: f"got {inbox.data}")
            await asyncio.sleep(0.3)
            assert sorted(inbox.data) == [b"audit", b"orders.new"]

    asyncio.run(main())


def test_subscription_metadata_errors_are_pubsub_errors(server: None) -> None:
    async def main() -> None:
        async with broker() as b:
            ps = await b.new()
            topic = b.topic()
            with pytest.raises(PubSubError, match="queueType"):
                await ps.subscribe(SubscribeRequest(topic, {"queueType": "stream"}), Inbox())
            with pytest.raises(PubSubError, match="maxLen"):
                await ps.subscribe(SubscribeRequest(topic, {"maxLen": "lots"}), Inbox())

    asyncio.run(main())


def test_durable_queue_keeps_messages_without_a_consumer(server: None) -> None:
    async def main() -> None:
        async with broker() as b:
            topic, group = b.topic(), b.group()
            props = {"durable": "true", "deletedWhenUnused": "false", "deliveryMode": "2"}
            ps = await b.new(group, **props)
            first = Inbox()
            sub = await ps.subscribe(SubscribeRequest(topic), first)
            await sub.close()
            await ps.close()
            publisher = await b.new(b.group("publisher"), **props)
            sent = [f"kept-{i}".encode() for i in range(5)]
            for data in sent:
                await publisher.publish(topic, data, {})
            again = await b.new(group, **props)
            inbox = Inbox()
            await again.subscribe(SubscribeRequest(topic), inbox)
            await eventually(lambda: sorted(inbox.data) == sorted(sent), 5, lambda: f"{inbox.data}")
            assert first.data == []

    asyncio.run(main())


def test_deleted_when_unused_queue_goes_with_its_last_consumer(server: None) -> None:
    # Dapr's default: the queue is auto-deleted, so messages published while nobody consumes are
    # not kept for the group.
    async def main() -> None:
        async with broker() as b:
            topic, group = b.topic(), b.group()
            ps = await b.new(group)
            sub = await ps.subscribe(SubscribeRequest(topic), Inbox())
            assert await b.queue_exists(f"{group}-{topic}")
            await sub.close()
            deadline = time.monotonic() + 2
            while await b.queue_exists(f"{group}-{topic}"):
                assert time.monotonic() < deadline, "the auto-delete queue outlived its consumer"
                await asyncio.sleep(0.05)

    asyncio.run(main())


# -- ack, nack, dead letters ---------------------------------------------------------------------


def test_requeue_in_failure_redelivers(server: None) -> None:
    async def main() -> None:
        async with broker() as b:
            topic = b.topic()
            ps = await b.new(requeueInFailure="true")
            inbox = Inbox(fail_once={b"again"})
            await ps.subscribe(SubscribeRequest(topic), inbox)
            await ps.publish(topic, b"again", {})
            await eventually(lambda: inbox.data == [b"again"], 5, lambda: f"{inbox.attempts}")
            assert inbox.attempts[b"again"] == 2
            assert inbox.messages[0].attempt == 2  # the broker marks it redelivered
            await asyncio.sleep(0.3)
            assert inbox.attempts[b"again"] == 2  # acked: not delivered a third time

    asyncio.run(main())


def test_failed_message_is_dropped_with_daprs_defaults(
    server: None, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with broker() as b:
            topic, group = b.topic(), b.group()
            with caplog.at_level(logging.WARNING, "pillion.components.pubsub.rabbitmq"):
                ps = await b.new(group, deletedWhenUnused="false")
            assert "is dropped by the broker" in caplog.text
            inbox = Inbox(fail_once={b"lost"})
            await ps.subscribe(SubscribeRequest(topic), inbox)
            await ps.publish(topic, b"lost", {})
            await eventually(lambda: inbox.attempts.get(b"lost") == 1, 5, lambda: "no delivery")
            await asyncio.sleep(0.5)
            assert inbox.attempts[b"lost"] == 1
            assert await b.get(f"{group}-{topic}") is None

    asyncio.run(main())


def test_dead_letter_exchange_gets_failed_messages(server: None) -> None:
    async def main() -> None:
        async with broker() as b:
            topic, group = b.topic(), b.group()
            ps = await b.new(group, enableDeadLetter="true")
            inbox = Inbox(fail={b"poison"})
            await ps.subscribe(SubscribeRequest(topic), inbox)
            queue = f"{group}-{topic}"
            assert await b.exchange_exists(f"dlx-{queue}")
            assert await b.queue_exists(f"dlq-{queue}")
            await ps.publish(topic, b"poison", {})
            await ps.publish(topic, b"fine", {})
            await eventually(lambda: inbox.data == [b"fine"], 5, lambda: f"{inbox.data}")
            dead: list[bytes] = []

            async def poll() -> None:
                msg = await b.get(f"dlq-{queue}")
                if msg is not None:
                    dead.append(msg.body)

            deadline = time.monotonic() + 5
            while not dead and time.monotonic() < deadline:
                await poll()
                await asyncio.sleep(0.05)
            assert dead == [b"poison"]
            assert inbox.attempts[b"poison"] == 1

    asyncio.run(main())


def test_handlers_run_in_parallel_bounded_by_prefetch(server: None) -> None:
    async def main() -> None:
        async with broker() as b:
            topic = b.topic()
            ps = await b.new(prefetchCount="3")
            inbox = Inbox(hold=0.05)
            await ps.subscribe(SubscribeRequest(topic), inbox)
            for i in range(12):
                await ps.publish(topic, f"p{i}".encode(), {})
            await eventually(lambda: len(inbox.data) == 12, 5, lambda: f"{len(inbox.data)}")
            assert 2 <= inbox.max_in_flight <= 3

    asyncio.run(main())


def test_single_concurrency_mode_handles_one_at_a_time_in_order(server: None) -> None:
    async def main() -> None:
        async with broker() as b:
            topic = b.topic()
            ps = await b.new(concurrencyMode="single")
            inbox = Inbox(hold=0.005)
            await ps.subscribe(SubscribeRequest(topic), inbox)
            sent = [f"s{i:02d}".encode() for i in range(30)]
            for data in sent:
                await ps.publish(topic, data, {})
            await eventually(lambda: len(inbox.data) == 30, 5, lambda: f"{len(inbox.data)}")
            assert inbox.max_in_flight == 1
            assert inbox.data == sent

    asyncio.run(main())


def test_close_waits_for_in_flight_handlers_and_leaves_the_rest_queued(server: None) -> None:
    async def main() -> None:
        async with broker() as b:
            topic, group = b.topic(), b.group()
            props = {"deletedWhenUnused": "false", "concurrencyMode": "single"}
            ps = await b.new(group, **props)
            inbox = Inbox(hold=0.2)
            sub = await ps.subscribe(SubscribeRequest(topic), inbox)
            for i in range(3):
                await ps.publish(topic, f"c{i}".encode(), {})
            await eventually(lambda: inbox.in_flight == 1, 5, lambda: "no handler started")
            await sub.close()
            assert inbox.data == [b"c0"]  # finished (and acked) before close returned
            later = Inbox()
            await ps.subscribe(SubscribeRequest(topic), later)
            await eventually(
                lambda: sorted(later.data) == [b"c1", b"c2"], 5, lambda: f"{later.data}"
            )

    asyncio.run(main())


# -- publishing -----------------------------------------------------------------------------------


def test_publisher_confirm_nack_is_an_error(server: None) -> None:
    async def main() -> None:
        async with broker() as b:
            topic = b.topic()
            confirmed = await b.new(publisherConfirm="true", deletedWhenUnused="false")
            unconfirmed = await b.new(deletedWhenUnused="false")
            await confirmed.publish(topic, b"declares the exchange", {})
            # A queue that refuses to grow beyond one message makes the broker nack publishes.
            full = f"pillion-test-{b.run}-full"
            b.extra_queues.add(full)
            channel = await b.admin.channel()
            q = await channel.declare_queue(
                full, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
            )
            await q.bind(topic, "")
            await channel.close()
            await confirmed.publish(topic, b"fits", {})
            with pytest.raises(PubSubError, match="did not accept"):
                await confirmed.publish(topic, b"refused", {})
            # Without confirms (Dapr's default) the publisher does not learn of it.
            await unconfirmed.publish(topic, b"silently refused", {})

    asyncio.run(main())


def test_exchange_of_another_kind_is_a_clear_error(server: None) -> None:
    async def main() -> None:
        async with broker() as b:
            topic = b.topic()
            channel = await b.admin.channel()
            await channel.declare_exchange(topic, "direct")
            await channel.close()
            ps = await b.new()
            with pytest.raises(PubSubError, match=r"PRECONDITION_FAILED|inequivalent"):
                await ps.publish(topic, b"x", {})
            with pytest.raises(PubSubError, match="cannot subscribe"):
                await ps.subscribe(SubscribeRequest(topic), Inbox())
            # The component recovers: other topics still work.
            other, inbox = b.topic("other"), Inbox()
            await ps.subscribe(SubscribeRequest(other), inbox)
            await ps.publish(other, b"ok", {})
            await eventually(lambda: inbox.data == [b"ok"], 5, lambda: f"{inbox.data}")

    asyncio.run(main())


def test_message_ttl_per_message_and_component_default(server: None) -> None:
    async def main() -> None:
        async with broker() as b:
            topic, group = b.topic(), b.group()
            ps = await b.new(group, deletedWhenUnused="false", ttlInSeconds="600")
            await (await ps.subscribe(SubscribeRequest(topic), Inbox())).close()
            await ps.publish(topic, b"short", {TTL_KEY: "1"})
            await ps.publish(topic, b"default", {})
            await ps.publish(topic, b"bad ttl ignored", {TTL_KEY: "soon"})
            queue = f"{group}-{topic}"
            await asyncio.sleep(1.3)
            got: dict[bytes, Any] = {}
            while (msg := await b.get(queue)) is not None:
                got[msg.body] = msg.expiration
            # The expired message never comes out of the queue; the others carry their TTL.
            assert set(got) == {b"default", b"bad ttl ignored"}
            assert got[b"default"] == 600

    asyncio.run(main())


def test_publish_properties_and_delivery_metadata(server: None) -> None:
    async def main() -> None:
        async with broker() as b:
            topic = b.topic()
            plain = await b.new(b.group("plain"))
            props = await b.new(b.group("props"), publishMessagePropertiesToMetadata="true")
            p_inbox, q_inbox = Inbox(), Inbox()
            await plain.subscribe(SubscribeRequest(topic), p_inbox)
            await props.subscribe(SubscribeRequest(topic), q_inbox)
            meta = {
                "contentType": "application/json",
                "messageId": "m-1",
                "correlationID": "c-1",
                "priority": "3",
            }
            await plain.publish(topic, b"{}", meta)
            await eventually(lambda: bool(p_inbox.data and q_inbox.data), 5, lambda: "nothing")
            assert p_inbox.messages[0].metadata == {}  # Dapr's default
            assert p_inbox.messages[0].id == "m-1"
            assert dict(q_inbox.messages[0].metadata) == {
                "metadata.messageid": "m-1",
                "metadata.correlationid": "c-1",
                "metadata.contenttype": "application/json",
            }

    asyncio.run(main())


def test_bulk_publish_reports_per_entry_failures(server: None) -> None:
    async def main() -> None:
        async with broker() as b:
            topic = b.topic()
            ps = await b.new(publisherConfirm="true")
            inbox = Inbox()
            await ps.subscribe(SubscribeRequest(topic), inbox)
            entries = [BulkEntry(f"e{i}", f"bulk-{i}".encode()) for i in range(50)]
            assert await ps.bulk_publish(topic, entries, {}) == []
            await eventually(lambda: len(inbox.data) == 50, 5, lambda: f"{len(inbox.data)}")
            await ps.close()
            with pytest.raises(PubSubError, match="closed"):
                await ps.bulk_publish(topic, entries[:2], {})

    asyncio.run(main())


# -- connection loss -----------------------------------------------------------------------------


def test_reconnects_and_resumes_consuming_after_the_connection_drops(server: None) -> None:
    async def main() -> None:
        proxy = Proxy()
        url = await proxy.start()
        try:
            async with broker() as b:
                topic, group = b.topic(), b.group()
                ps = await b.new(group, url=url, durable="true", deletedWhenUnused="false", **FAST)
                inbox = Inbox()
                await ps.subscribe(SubscribeRequest(topic), inbox)
                await ps.publish(topic, b"before", {})
                await eventually(lambda: inbox.data == [b"before"], 5, lambda: f"{inbox.data}")

                # The server side goes away; while it is unreachable, messages are published to
                # the group's queue by someone else and must arrive once the component is back.
                proxy.accepting = False
                proxy.cut()
                other = await b.new(b.group("publisher"), deletedWhenUnused="false")
                await other.publish(topic, b"while-down", {})
                await asyncio.sleep(0.35)  # a few reconnect attempts fail meanwhile
                assert ps.reconnects == 0
                proxy.accepting = True
                await eventually(lambda: ps.reconnects == 1, 5, lambda: "no reconnect")
                await ps.publish(topic, b"after", {})
                await eventually(
                    lambda: sorted(inbox.data) == [b"after", b"before", b"while-down"],
                    5,
                    lambda: f"{inbox.data}",
                )
        finally:
            await proxy.close()

    asyncio.run(main())


def test_publish_during_a_drop_is_retried_on_the_new_connection(server: None) -> None:
    async def main() -> None:
        proxy = Proxy()
        url = await proxy.start()
        try:
            async with broker() as b:
                topic = b.topic()
                ps = await b.new(url=url, publisherConfirm="true", **FAST)
                inbox = Inbox()
                listener = await b.new(b.group("listener"))
                await listener.subscribe(SubscribeRequest(topic), inbox)
                await ps.publish(topic, b"one", {})
                proxy.cut()
                await ps.publish(topic, b"two", {})  # waits for the reconnect, then publishes
                assert ps.reconnects == 1
                await eventually(
                    lambda: sorted(inbox.data) == [b"one", b"two"], 5, lambda: f"{inbox.data}"
                )
        finally:
            await proxy.close()

    asyncio.run(main())


def test_resubscribes_when_the_broker_deletes_the_queue(server: None) -> None:
    async def main() -> None:
        async with broker() as b:
            topic, group = b.topic(), b.group()
            ps = await b.new(group, deletedWhenUnused="false", **FAST)
            inbox = Inbox()
            await ps.subscribe(SubscribeRequest(topic), inbox)
            channel = await b.admin.channel()
            await channel.queue_delete(f"{group}-{topic}")
            await channel.close()
            deadline = time.monotonic() + 5
            while not await b.queue_exists(f"{group}-{topic}"):
                assert time.monotonic() < deadline, "queue was not declared again"
                await asyncio.sleep(0.05)
            await ps.publish(topic, b"after-delete", {})
            await eventually(lambda: inbox.data == [b"after-delete"], 5, lambda: f"{inbox.data}")

    asyncio.run(main())


def test_close_is_idempotent_and_final(server: None) -> None:
    async def main() -> None:
        async with broker() as b:
            topic = b.topic()
            before = asyncio.all_tasks()
            ps = await b.new()
            sub: Subscription = await ps.subscribe(SubscribeRequest(topic), Inbox())
            await sub.close()
            await sub.close()
            await ps.close()
            await ps.close()
            with pytest.raises(PubSubError, match="closed"):
                await ps.publish(topic, b"x", {})
            with pytest.raises(PubSubError, match="closed"):
                await ps.subscribe(SubscribeRequest(topic), Inbox())
            current = asyncio.current_task()
            await eventually(
                lambda: not {t for t in asyncio.all_tasks() - before if t is not current},
                2,
                lambda: f"tasks left: {asyncio.all_tasks() - before}",
            )

    asyncio.run(main())


def test_close_wakes_a_publish_waiting_for_the_connection(server: None) -> None:
    async def main() -> None:
        proxy = Proxy()
        url = await proxy.start()
        try:
            async with broker() as b:
                ps = await b.new(url=url, reconnectWaitSeconds="30s")
                proxy.accepting = False
                proxy.cut()
                await eventually(lambda: not ps._connected.is_set(), 5, lambda: "still connected")
                waiting = asyncio.create_task(ps.publish(b.topic(), b"x", {}))
                await asyncio.sleep(0.1)
                assert not waiting.done()
                await ps.close()
                with pytest.raises(PubSubError, match="closed"):
                    await asyncio.wait_for(waiting, 2)
        finally:
            await proxy.close()

    asyncio.run(main())
