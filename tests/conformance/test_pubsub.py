"""Pub/sub conformance: every registered `pubsub.*` type against the same contract."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pillion.components import registry
from pillion.components.metadata import ComponentInfo, Properties
from pillion.components.pubsub.api import (
    TTL_KEY,
    BulkEntry,
    BulkPublisher,
    Feature,
    Handler,
    Message,
    PubSub,
    PubSubError,
    SubscribeRequest,
    Subscription,
)
from tests.conformance.conftest import delete_jetstream_streams, require_server
from tests.polling import eventually

# The contract these tests hold every broker to (beyond api.py's docstrings):
# - A message published after `subscribe()` returned reaches that subscription's group.
# - The consumer group is the component's `consumerID` metadata; components built with different
#   consumerIDs each get every message, those with the same one compete (each message once).
# - Returning from the handler acks; raising makes the broker deliver the message again.
# - `close()` of a subscription stops deliveries to its handler; `close()` of the component may be
#   called twice, leaves no task running, and makes later publishes raise PubSubError.
# - `concurrency` (component and subscription metadata) bounds the handlers running at once.
# - Features: a declared one must pass its test, an undeclared one is skipped. ORDERED is checked
#   on a component built with `concurrency: "1"` (and subscribed with it), so a broker may declare
#   it only then; BULK_PUBLISH is declared exactly when the class implements BulkPublisher;
#   MESSAGE_TTL means a message past `ttlInSeconds` is never delivered.
#
# Adding a broker: give its type a row in BACKENDS (Dapr's metadata names, a server on 127.0.0.1)
# and set the flags below to what it truly does. Every test uses fresh topics and a fresh
# consumer group, so a broker that persists (queues, streams, sessions) needs no cleanup between
# tests; `cleanup` removes what a test's topics left on a server that would otherwise keep it for
# ever (JetStream streams: the server lists them 256 to a page, and runs add up).


@dataclass(frozen=True)
class Backend:
    """How to reach one broker type in tests, and what it can do beyond the core contract."""

    # Component metadata; the argument is a per-test temporary directory (for embedded brokers).
    # consumerID is added by the suite.
    properties: Callable[[Path], dict[str, str]]
    # (name, host, port) that must answer before the suite runs; None for embedded brokers.
    server: tuple[str, str, int] | None = None
    # Metadata passed to publish() comes back in Message.metadata (brokers with headers).
    headers: bool = True
    # Two component instances (two sidecars) reach the same broker. False (in-memory): tests that
    # need two instances use two subscriptions of one instance instead (groups named by the
    # subscription's consumerID metadata), or are skipped.
    shared: bool = True
    # A consumer group keeps messages published while it has no active subscription, also when
    # its component was closed and built again (a sidecar restart).
    durable_groups: bool = True
    # Competing consumers may see one message twice in normal operation (no failures).
    duplicates: bool = False
    # Instances with one consumerID compete for a topic's messages. False (MQTT 3): the protocol
    # has no consumer groups; one consumerID is one client id, which one connection holds.
    competing: bool = True
    # A message whose handler failed is delivered again within this many seconds.
    redelivery_s: float = 10.0
    # How long a test watches that nothing more arrives (no third delivery, no duplicate).
    quiet_s: float = 1.0
    # A published message reaches a subscribed handler within this many seconds.
    deliver_s: float = 10.0
    # Removes what the given topics left on the server, after the test's components closed.
    cleanup: Callable[[list[str]], Awaitable[None]] | None = None


# One row per registered pubsub type. The server-backed rows are owned by their component's
# author, who adjusts metadata and flags to what the component needs and does.
BACKENDS: dict[str, Backend] = {
    "pubsub.in-memory": Backend(
        lambda _: {},
        shared=False,  # per component instance, like Dapr's
        durable_groups=False,  # a group exists while it has subscriptions
        redelivery_s=5.0,
        quiet_s=0.5,
    ),
    "pubsub.sqlite": Backend(
        lambda tmp: {
            "connectionString": str(tmp / "pubsub.db"),
            "processingTimeout": "1s",
            "redeliverInterval": "200ms",
        },
        redelivery_s=5.0,
        quiet_s=1.5,  # longer than processingTimeout, so a lost ack shows as a redelivery
    ),
    "pubsub.redis": Backend(
        lambda _: {
            "redisHost": "127.0.0.1:6379",
            "processingTimeout": "2s",
            "redeliverInterval": "1s",
        },
        ("redis", "127.0.0.1", 6379),
        quiet_s=3.0,  # longer than processingTimeout + redeliverInterval
    ),
    "pubsub.rabbitmq": Backend(
        lambda _: {
            "connectionString": "amqp://guest:guest@127.0.0.1:5672",
            "durable": "true",
            "deletedWhenUnused": "false",
            "publisherConfirm": "true",
            # Dapr's default (false) drops a message whose handler failed; the redelivery test
            # needs it back on the queue.
            "requeueInFailure": "true",
            # RabbitMQ has no `concurrency` setting; Dapr bounds unacked deliveries (and so
            # handlers in flight) with prefetchCount.
            "prefetchCount": "3",
        },
        ("rabbitmq", "127.0.0.1", 5672),
        # Dapr's component puts no publish metadata on the AMQP message (it maps only contentType,
        # messageId, correlationId and type to properties), so none comes back to subscribers.
        headers=False,
    ),
    "pubsub.mqtt3": Backend(
        lambda _: {"url": "tcp://127.0.0.1:1883", "qos": "1", "cleanSession": "false"},
        ("mosquitto", "127.0.0.1", 1883),
        headers=False,  # MQTT 3.1.1 has no user properties
        # Two instances with one consumerID share a session's client id, and the broker keeps
        # only one of them connected (each takes the session from the other).
        competing=False,
    ),
    "pubsub.jetstream": Backend(
        lambda _: {
            "natsURL": "nats://127.0.0.1:4222",
            "ackWait": "2s",
            # No streamName: the component finds the stream holding each topic, or creates one
            # named after it (Dapr expects the stream to exist; pillion makes it).
        },
        ("nats", "127.0.0.1", 4222),
        quiet_s=3.0,  # longer than ackWait
        cleanup=delete_jetstream_streams,
    ),
}

PUBSUB_TYPES = sorted({t for t, _ in registry.kinds() if registry.category(t) == "pubsub"})
CI = os.environ.get("CI", "").lower() == "true"


def load_or_skip(component_type: str) -> type[Any]:
    """The class; a component whose module is not written yet skips (fails under CI=true)."""
    try:
        return registry.load(component_type, "v1")
    except registry.UnknownComponentError as exc:
        missing = exc.__cause__
        # A missing driver (redis, aio_pika, ...) is a real error; a missing pillion module is not.
        if isinstance(missing, ModuleNotFoundError) and (missing.name or "").startswith(
            "pillion.components.pubsub."
        ):
            if CI:
                pytest.fail(f"{component_type}: not implemented yet ({missing.name} is missing)")
            pytest.skip(f"{component_type}: not implemented yet")
        raise


class Brokers:
    """Builds component instances for one test and closes what the test left open."""

    def __init__(self, component_type: str, cls: type[Any], backend: Backend, base: dict[str, str]):
        self.type = component_type
        self.backend = backend
        self._cls = cls
        self._base = base
        self.run = uuid.uuid4().hex[:10]
        # The test's consumer group unless a test asks for another.
        self.group = self.new_group()
        self._components: list[PubSub] = []
        self._subscriptions: list[Subscription] = []
        self._topics: set[str] = set()  # for the backend's cleanup

    def new_group(self) -> str:
        return f"cg-{uuid.uuid4().hex[:12]}"

    def topic(self, name: str = "t") -> str:
        topic = f"pillion-{self.run}-{name}"
        self._topics.add(topic)
        return topic

    async def new(self, consumer_id: str | None = None, **extra: str) -> PubSub:
        props = {**self._base, "consumerID": consumer_id or self.group, **extra}
        ps: PubSub = self._cls()
        info = ComponentInfo(
            name="pubsub", type=self.type, version="v1", app_id="app", properties=Properties(props)
        )
        await ps.init(info)
        self._components.append(ps)
        return ps

    async def subscribe(
        self, ps: PubSub, topic: str, handler: Handler, **metadata: str
    ) -> Subscription:
        sub = await ps.subscribe(SubscribeRequest(topic, metadata), handler)
        self._subscriptions.append(sub)
        self._topics.add(topic)
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.remove(sub)
        await sub.close()

    async def close(self, ps: PubSub) -> None:
        self._components.remove(ps)
        await ps.close()

    async def aclose(self) -> None:
        # The runtime's order: subscriptions first, then components.
        errors: list[BaseException] = []
        for sub in reversed(self._subscriptions):
            try:
                await sub.close()
            except Exception as exc:
                errors.append(exc)
        for ps in reversed(self._components):
            try:
                await ps.close()
            except Exception as exc:
                errors.append(exc)
        self._subscriptions.clear()
        self._components.clear()
        if self.backend.cleanup is not None and self._topics:
            await self.backend.cleanup(sorted(self._topics))
        if errors:
            raise errors[0]


@pytest.fixture(params=PUBSUB_TYPES)
def brokers(
    request: pytest.FixtureRequest, aio: asyncio.Runner, tmp_path: Path
) -> Iterator[Brokers]:
    component_type: str = request.param
    backend = BACKENDS.get(component_type)
    if backend is None:
        pytest.fail(f"{component_type} is registered but has no row in BACKENDS")
    cls = load_or_skip(component_type)
    if backend.server is not None:
        require_server(*backend.server)
    b = Brokers(component_type, cls, backend, backend.properties(tmp_path))
    try:
        yield b
    finally:
        aio.run(b.aclose())


def need(ps: PubSub, feature: Feature) -> None:
    if feature not in ps.features():
        pytest.skip(f"broker does not declare {feature}")


class Inbox:
    """A handler that records deliveries; `fail_first` makes the first attempt of those raise."""

    def __init__(self, fail_first: set[bytes] | None = None, hold: float = 0.0) -> None:
        self.messages: list[Message] = []
        self.attempts: dict[bytes, int] = {}
        self.fail_first = fail_first or set()
        self.hold = hold
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, msg: Message) -> None:
        n = self.attempts[msg.data] = self.attempts.get(msg.data, 0) + 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold:
                await asyncio.sleep(self.hold)  # simulated work, so handlers overlap
            if n == 1 and msg.data in self.fail_first:
                raise RuntimeError("conformance test: deliberate handler failure")
            self.messages.append(msg)
        finally:
            self.in_flight -= 1

    @property
    def data(self) -> list[bytes]:
        """Acknowledged deliveries' bytes, in handler-return order."""
        return [m.data for m in self.messages]


async def arrive(brokers: Brokers, inbox: Inbox, n: int, who: str = "") -> None:
    """Wait until `inbox` acked at least `n` messages."""
    await eventually(
        lambda: len(inbox.messages) >= n,
        brokers.backend.deliver_s,
        lambda: f"{who + ': ' if who else ''}{len(inbox.messages)} of {n} messages arrived",
    )


async def stays(cond: Callable[[], bool], seconds: float, what: Callable[[], str]) -> None:
    """Assert `cond` holds for `seconds` (watching that nothing unexpected arrives)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert cond(), what()
        await asyncio.sleep(0.02)
    assert cond(), what()


def payloads(n: int, tag: str) -> list[bytes]:
    """`n` distinct payloads: JSON, UTF-8, binary with NULs and high bytes, one large."""
    kinds = [
        lambda i: f'{{"tag": "{tag}", "n": {i}}}'.encode(),
        lambda i: f"{tag} n\u00e9 {i} \u2603".encode(),
        lambda i: bytes([0, 255, 0, i % 256]) + tag.encode() + bytes(range(256)),
    ]
    out = [kinds[i % len(kinds)](i) for i in range(n)]
    if n > 3:
        out[3] = tag.encode() + b"\x00" + bytes(range(256)) * 400  # ~100 KB
    return out


# -- 1. publish and receive ---------------------------------------------------------------------


async def test_publish_then_receive(brokers: Brokers) -> None:
    ps = await brokers.new()
    topic, inbox = brokers.topic(), Inbox()
    await brokers.subscribe(ps, topic, inbox)
    sent = payloads(20, brokers.run)
    for i, data in enumerate(sent):
        await ps.publish(topic, data, {"pillion-test": f"v{i}"})
    await arrive(brokers, inbox, len(sent))
    assert sorted(inbox.data) == sorted(sent)
    assert all(type(m.data) is bytes for m in inbox.messages)
    assert {m.topic for m in inbox.messages} == {topic}
    if brokers.backend.headers:
        index = {data: i for i, data in enumerate(sent)}
        for m in inbox.messages:
            assert m.metadata.get("pillion-test") == f"v{index[m.data]}", dict(m.metadata)
    await stays(
        lambda: len(inbox.messages) == len(sent),
        brokers.backend.quiet_s / 2,
        lambda: f"{len(inbox.messages) - len(sent)} duplicate deliveries",
    )


# -- 2. ordering --------------------------------------------------------------------------------


async def test_ordered_delivery(brokers: Brokers) -> None:
    ps = await brokers.new(concurrency="1")
    need(ps, Feature.ORDERED)
    topic, inbox = brokers.topic(), Inbox()
    await brokers.subscribe(ps, topic, inbox, concurrency="1")
    sent = [f"ordered-{i:03d}".encode() for i in range(50)]
    for data in sent:
        await ps.publish(topic, data, {})
    await arrive(brokers, inbox, len(sent))
    assert inbox.data == sent
    assert inbox.max_in_flight == 1


# -- 3. redelivery ------------------------------------------------------------------------------


async def test_redelivery_after_handler_error(brokers: Brokers) -> None:
    ps = await brokers.new()
    topic = brokers.topic()
    sent = [f"retry-{i}".encode() for i in range(3)]
    inbox = Inbox(fail_first=set(sent))
    await brokers.subscribe(ps, topic, inbox)
    for data in sent:
        await ps.publish(topic, data, {})
    await eventually(
        lambda: sorted(inbox.data) == sorted(sent),
        brokers.backend.redelivery_s,
        lambda: f"attempts so far {inbox.attempts}; acked {inbox.data}",
    )
    assert all(inbox.attempts[d] == 2 for d in sent), inbox.attempts
    redelivered = [m for m in inbox.messages if m.data in sent]
    assert all(m.attempt in (1, 2) for m in redelivered), [m.attempt for m in redelivered]
    # Acked now: never again.
    await stays(
        lambda: all(inbox.attempts[d] == 2 for d in sent),
        brokers.backend.quiet_s,
        lambda: f"delivered again after being acked: {inbox.attempts}",
    )


# -- 4. consumer groups -------------------------------------------------------------------------


async def test_every_consumer_group_gets_every_message(brokers: Brokers) -> None:
    topic, inbox_a, inbox_b = brokers.topic(), Inbox(), Inbox()
    if brokers.backend.shared:
        a = await brokers.new(brokers.new_group())
        b = await brokers.new(brokers.new_group())
        await brokers.subscribe(a, topic, inbox_a)
        await brokers.subscribe(b, topic, inbox_b)
    else:
        # Instances do not share a broker: two groups in one instance, named per subscription.
        a = b = await brokers.new()
        await brokers.subscribe(a, topic, inbox_a, consumerID=brokers.new_group())
        await brokers.subscribe(b, topic, inbox_b, consumerID=brokers.new_group())
    sent = [f"fanout-{i}".encode() for i in range(20)]
    for i, data in enumerate(sent):
        await (a if i % 2 else b).publish(topic, data, {})
    await arrive(brokers, inbox_a, len(sent), "group a")
    await arrive(brokers, inbox_b, len(sent), "group b")
    await stays(
        lambda: len(inbox_a.messages) == len(inbox_b.messages) == len(sent),
        brokers.backend.quiet_s / 2,
        lambda: f"duplicates: a {len(inbox_a.messages)}, b {len(inbox_b.messages)}",
    )
    assert sorted(inbox_a.data) == sorted(sent)
    assert sorted(inbox_b.data) == sorted(sent)


# -- 5. competing consumers ---------------------------------------------------------------------


async def test_competing_consumers_share_messages(brokers: Brokers) -> None:
    if not brokers.backend.competing:
        pytest.skip("instances with one consumerID do not compete: the broker has no groups")
    topic, inbox_a, inbox_b = brokers.topic(), Inbox(hold=0.005), Inbox(hold=0.005)
    a = await brokers.new()
    # Two sidecars of one app id; without a shared broker, two consumers in one instance.
    b = await brokers.new() if brokers.backend.shared else a
    await brokers.subscribe(a, topic, inbox_a)
    await brokers.subscribe(b, topic, inbox_b)
    sent = [f"compete-{i}".encode() for i in range(40)]
    for data in sent:
        await a.publish(topic, data, {})

    def got() -> list[bytes]:
        return inbox_a.data + inbox_b.data

    await eventually(
        lambda: set(got()) >= set(sent),
        brokers.backend.deliver_s,
        lambda: f"{len(set(got()))} of {len(sent)} distinct messages arrived",
    )
    if not brokers.backend.duplicates:
        await stays(
            lambda: len(got()) == len(sent),
            brokers.backend.quiet_s,
            lambda: f"{len(got()) - len(sent)} duplicate deliveries in one group",
        )
    assert set(got()) == set(sent)


# -- 6. bulk publish ----------------------------------------------------------------------------


async def test_bulk_publish(brokers: Brokers) -> None:
    ps = await brokers.new()
    if not isinstance(ps, BulkPublisher):
        pytest.skip("broker does not implement BulkPublisher")
    topic, inbox = brokers.topic(), Inbox()
    await brokers.subscribe(ps, topic, inbox)
    sent = payloads(10, f"bulk-{brokers.run}")
    entries = [BulkEntry(f"e{i}", data, {"pillion-test": f"v{i}"}) for i, data in enumerate(sent)]
    failed = await ps.bulk_publish(topic, entries, {})
    assert failed == []
    await arrive(brokers, inbox, len(sent))
    assert sorted(inbox.data) == sorted(sent)
    if brokers.backend.headers:
        index = {data: i for i, data in enumerate(sent)}
        for m in inbox.messages:
            assert m.metadata.get("pillion-test") == f"v{index[m.data]}", dict(m.metadata)


# -- 7. TTL -------------------------------------------------------------------------------------


async def test_message_ttl(brokers: Brokers) -> None:
    ps = await brokers.new()
    need(ps, Feature.MESSAGE_TTL)
    if not brokers.backend.durable_groups:
        pytest.skip("messages for a group without a subscriber are not kept, expired or not")
    topic = brokers.topic()
    # Create the group, then leave it without an active consumer while the message expires.
    await brokers.unsubscribe(await brokers.subscribe(ps, topic, Inbox()))
    published = time.monotonic()
    await ps.publish(topic, b"short-lived", {TTL_KEY: "1"})
    await ps.publish(topic, b"long-lived", {TTL_KEY: "600"})
    await ps.publish(topic, b"forever", {})
    # Waiting out the TTL is the point here, not a guess at how long something takes.
    await asyncio.sleep(max(0.0, published + 1.5 - time.monotonic()))
    inbox = Inbox()
    await brokers.subscribe(ps, topic, inbox)
    await eventually(
        lambda: {b"long-lived", b"forever"} <= set(inbox.data),
        brokers.backend.deliver_s,
        lambda: f"messages without an expired TTL missing; got {inbox.data}",
    )
    await stays(
        lambda: b"short-lived" not in inbox.data,
        brokers.backend.quiet_s / 2,
        lambda: "an expired message was delivered",
    )


# -- 8. durability while unsubscribed -----------------------------------------------------------


async def test_group_keeps_messages_while_unsubscribed(brokers: Brokers) -> None:
    ps = await brokers.new()
    topic, first = brokers.topic(), Inbox()
    sub = await brokers.subscribe(ps, topic, first)
    await ps.publish(topic, b"while-subscribed", {})
    await eventually(
        lambda: first.data == [b"while-subscribed"],
        brokers.backend.deliver_s,
        lambda: f"first subscription got {first.data}",
    )
    await brokers.unsubscribe(sub)
    if brokers.backend.durable_groups:
        # A sidecar restart: the group's component goes away, another instance publishes.
        await brokers.close(ps)
        publisher = await brokers.new(brokers.new_group())
    else:
        publisher = ps
    sent = [f"kept-{i}".encode() for i in range(5)]
    for data in sent:
        await publisher.publish(topic, data, {})
    if not brokers.backend.durable_groups:
        await stays(
            lambda: first.data == [b"while-subscribed"],
            brokers.backend.quiet_s / 2,
            lambda: f"a closed subscription's handler was called: {first.data}",
        )
        pytest.skip("groups are not durable: messages without a subscriber are not kept")
    again = await brokers.new()  # same consumerID as `ps`
    inbox = Inbox()
    await brokers.subscribe(again, topic, inbox)
    await eventually(
        lambda: set(inbox.data) >= set(sent),
        brokers.backend.deliver_s,
        lambda: f"after re-subscribing got {inbox.data}, want {sent}",
    )
    await stays(
        lambda: sorted(inbox.data) == sorted(sent) and first.data == [b"while-subscribed"],
        brokers.backend.quiet_s / 2,
        lambda: f"unexpected deliveries: new {inbox.data}, closed {first.data}",
    )


# -- 9. close -----------------------------------------------------------------------------------


async def test_close_is_clean(brokers: Brokers) -> None:
    before = asyncio.all_tasks()
    ps = await brokers.new()
    topic, inbox = brokers.topic(), Inbox()
    sub = await brokers.subscribe(ps, topic, inbox)
    await ps.publish(topic, b"before-close", {})
    await eventually(
        lambda: inbox.data == [b"before-close"],
        brokers.backend.deliver_s,
        lambda: f"got {inbox.data}",
    )
    await brokers.unsubscribe(sub)
    await brokers.close(ps)
    await ps.close()  # a second close is harmless
    with pytest.raises(PubSubError):
        await ps.publish(topic, b"after-close", {})
    with pytest.raises(PubSubError):
        await ps.subscribe(SubscribeRequest(topic), Inbox())

    def leftovers() -> set[asyncio.Task[Any]]:
        return {t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()}

    # Tasks cancelled by close() may need a loop iteration or two to finish.
    await eventually(
        lambda: not leftovers(), 2.0, lambda: f"tasks still running after close: {leftovers()}"
    )


# -- 10. bounded concurrency --------------------------------------------------------------------


async def test_concurrency_is_bounded(brokers: Brokers) -> None:
    ps = await brokers.new(concurrency="3")
    topic, inbox = brokers.topic(), Inbox(hold=0.05)
    await brokers.subscribe(ps, topic, inbox, concurrency="3")
    sent = [f"bounded-{i}".encode() for i in range(12)]
    for data in sent:
        await ps.publish(topic, data, {})
    await arrive(brokers, inbox, len(sent))
    assert 1 <= inbox.max_in_flight <= 3, inbox.max_in_flight


# -- features -----------------------------------------------------------------------------------


async def test_features_match_implementation(brokers: Brokers) -> None:
    ps = await brokers.new()
    features = ps.features()
    assert isinstance(features, frozenset)
    assert all(isinstance(f, Feature) for f in features)
    assert (Feature.BULK_PUBLISH in features) == isinstance(ps, BulkPublisher)


async def test_publish_to_unsubscribed_topic_succeeds(brokers: Brokers) -> None:
    # Dapr publishes to topics nobody subscribes to (yet) without an error.
    ps = await brokers.new()
    await ps.publish(brokers.topic("nobody"), b"x", {})
