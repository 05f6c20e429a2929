"""MQTT 3 pub/sub specifics: persistent sessions, acks after handling, wildcards, reconnects."""

from __future__ import annotations

import asyncio
import socket
import uuid

import pytest

from pillion.components.metadata import ComponentConfigError, ComponentInfo, Properties, decode
from pillion.components.pubsub.api import Feature, Message, PubSubError, SubscribeRequest
from pillion.components.pubsub.mqtt3 import (
    MQTTMetadata,
    MQTTPubSub,
    MQTTSubscription,
    _session_client_id,
)
from tests.conformance.conftest import require_server
from tests.polling import run, until
from tests.unit.components.pubsub_helpers import Inbox, group

HOST, PORT = "127.0.0.1", 1883
URL = f"tcp://{HOST}:{PORT}"


@pytest.fixture
def server() -> None:
    require_server("mosquitto", HOST, PORT)


def info(**props: str) -> ComponentInfo:
    return ComponentInfo("pubsub", "pubsub.mqtt3", "v1", "app", Properties(props))


def topic_name(prefix: str = "t") -> str:
    return f"pillion-test/{prefix}-{uuid.uuid4().hex[:10]}"


async def component(consumer_id: str | None = None, **props: str) -> MQTTPubSub:
    ps = MQTTPubSub()
    await ps.init(info(url=URL, consumerID=consumer_id or group(), **props))
    return ps


# -- metadata -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("props", "field"),
    [
        ({}, "url"),
        ({"url": "http://h:1883"}, "url"),
        ({"url": "tcp://"}, "url"),
        ({"url": "tcp://h:99999"}, "url"),
        ({"url": URL, "qos": "3"}, "qos"),
        ({"url": URL, "qos": "one"}, "qos"),
        ({"url": URL, "retain": "maybe"}, "retain"),
        ({"url": URL, "clientCert": "x"}, "clientKey"),
        ({"url": URL, "clientKey": "x"}, "clientCert"),
        ({"url": URL, "concurrency": "0"}, "concurrency"),
        ({"url": URL, "backOffPolicy": "random"}, "backOffPolicy"),
        ({"url": URL, "backOffMaxRetries": "-2"}, "backOffMaxRetries"),
        ({"url": URL, "backOffInitialInterval": "soon"}, "backOffInitialInterval"),
        ({"url": "ssl://127.0.0.1:8883", "caCert": "not a certificate"}, "caCert"),
    ],
)
def test_bad_metadata_is_rejected(props: dict[str, str], field: str) -> None:
    async def main() -> None:
        with pytest.raises(ComponentConfigError) as err:
            await MQTTPubSub().init(info(consumerID="c", **props))
        assert err.value.field == field

    run(main)


def test_metadata_defaults_follow_dapr() -> None:
    meta = decode(MQTTMetadata, Properties({"url": URL}))
    meta.validate()
    assert (meta.qos, meta.retain, meta.clean_session) == (1, False, False)
    assert meta.back_off_max_retries == -1


def test_url_forms() -> None:
    def target(url: str) -> tuple[str, int, bool, str | None, str | None]:
        t = MQTTMetadata(url=url).target()
        return t.host, t.port, t.tls, t.username, t.password

    assert target("tcp://broker") == ("broker", 1883, False, None, None)
    assert target("mqtt://broker:1884") == ("broker", 1884, False, None, None)
    assert target("ssl://u%40x:p%3Aw@broker") == ("broker", 8883, True, "u@x", "p:w")
    for scheme in ("mqtts", "tcps", "tls"):
        assert target(f"{scheme}://broker")[2] is True


def test_back_off() -> None:
    exp = MQTTMetadata(back_off_initial_interval=0.5, back_off_max_interval=3)  # type: ignore[arg-type]
    assert [exp.backoff(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 3.0]
    const = MQTTMetadata(back_off_policy="constant", back_off_duration=2)  # type: ignore[arg-type]
    assert const.backoff(5) == 2.0


def test_unreachable_broker_fails_init() -> None:
    async def main() -> None:
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(PubSubError, match="cannot connect"):
            await MQTTPubSub().init(info(url=f"tcp://127.0.0.1:{port}", consumerID="c"))

    run(main)


def test_invalid_topics_are_rejected(server: None) -> None:
    async def main() -> None:
        ps = await component()
        try:
            for bad in ("", "a/#/b", "a/b#", "a+/b"):
                with pytest.raises(PubSubError):
                    await ps.subscribe(SubscribeRequest(bad), Inbox())
            for bad in ("", "a/+", "a/#"):
                with pytest.raises(PubSubError):
                    await ps.publish(bad, b"x", {})
            topic = topic_name()
            await ps.subscribe(SubscribeRequest(topic), Inbox())
            with pytest.raises(PubSubError, match="already subscribed"):
                await ps.subscribe(SubscribeRequest(topic), Inbox())
            with pytest.raises(PubSubError, match="retain"):
                await ps.publish(topic_name(), b"x", {"retain": "perhaps"})
        finally:
            await ps.close()

    run(main)


def test_session_client_id_is_stable_per_group_and_topic() -> None:
    assert _session_client_id("g", "a/b") == _session_client_id("g", "a/b")
    assert _session_client_id("g", "a/b") != _session_client_id("g", "a/c")
    assert _session_client_id("g", "a/b") != _session_client_id("h", "a/b")
    assert _session_client_id("g", "a/b").startswith("g-")


def test_features() -> None:
    async def main() -> None:
        ps = MQTTPubSub()
        ps.meta = MQTTMetadata(url=URL, concurrency=1)
        assert ps.features() == frozenset({Feature.ORDERED})
        ps.meta = MQTTMetadata(url=URL)
        assert ps.features() == frozenset()

    run(main)


# -- sessions and acks ----------------------------------------------------------------------


def test_persistent_session_keeps_messages_while_offline(server: None) -> None:
    async def main() -> None:
        cg, topic = group(), topic_name()
        ps = await component(cg)
        first = Inbox()
        sub = await ps.subscribe(SubscribeRequest(topic), first)
        await ps.publish(topic, b"online", {})
        await until(lambda: first.data == [b"online"])
        # A sidecar restart: subscription and component go away, someone else publishes.
        await sub.close()
        await ps.close()
        publisher = await component()
        sent = [f"offline-{i}".encode() for i in range(10)]
        for data in sent:
            await publisher.publish(topic, data, {})
        again = await component(cg)
        inbox = Inbox()
        await again.subscribe(SubscribeRequest(topic), inbox)
        await until(lambda: len(inbox.data) >= len(sent))
        await asyncio.sleep(0.3)
        assert sorted(inbox.data) == sorted(sent)
        assert first.data == [b"online"]
        await again.close()
        await publisher.close()

    run(main)


def test_clean_session_keeps_nothing_while_offline(server: None) -> None:
    async def main() -> None:
        cg, topic = group(), topic_name()
        ps = await component(cg, cleanSession="true")
        sub = await ps.subscribe(SubscribeRequest(topic), Inbox())
        await sub.close()
        await ps.publish(topic, b"nobody-listens", {})
        inbox = Inbox()
        await ps.subscribe(SubscribeRequest(topic), inbox)
        await ps.publish(topic, b"listening", {})
        await until(lambda: inbox.data == [b"listening"])
        await asyncio.sleep(0.2)
        assert inbox.data == [b"listening"]
        await ps.close()

    run(main)


def test_unsubscribe_on_close_drops_the_broker_subscription(server: None) -> None:
    async def main() -> None:
        cg, topic = group(), topic_name()
        ps = await component(cg)
        sub = await ps.subscribe(SubscribeRequest(topic, {"unsubscribeOnClose": "true"}), Inbox())
        await sub.close()
        await ps.publish(topic, b"dropped", {})
        inbox = Inbox()
        await ps.subscribe(SubscribeRequest(topic), inbox)
        await ps.publish(topic, b"kept", {})
        await until(lambda: inbox.data == [b"kept"])
        await asyncio.sleep(0.2)
        assert inbox.data == [b"kept"]
        await ps.close()

    run(main)


def test_failed_handler_is_retried_in_process_before_the_ack(server: None) -> None:
    async def main() -> None:
        ps = await component(backOffInitialInterval="50ms")
        topic = topic_name()
        inbox = Inbox(fail=lambda m: m.attempt < 3)
        await ps.subscribe(SubscribeRequest(topic), inbox)
        await ps.publish(topic, b"flaky", {})
        await until(lambda: inbox.data == [b"flaky"])
        assert [m.attempt for m in inbox.attempts] == [1, 2, 3]
        await asyncio.sleep(0.3)
        assert len(inbox.attempts) == 3  # acked: not sent again
        await ps.close()

    run(main)


def test_unacked_message_is_redelivered_by_the_broker(server: None) -> None:
    async def main() -> None:
        # No in-process retries: a failed message stays unacknowledged in the session, like
        # one whose sidecar crashed mid-handler, and the broker sends it again on reconnect.
        cg, topic = group(), topic_name()
        ps = await component(cg, backOffMaxRetries="0")
        failing = Inbox(fail=lambda m: True)
        sub = await ps.subscribe(SubscribeRequest(topic), failing)
        await ps.publish(topic, b"unlucky", {})
        await ps.publish(topic, b"fine", {})
        await until(lambda: len(failing.attempts) == 2)
        await asyncio.sleep(0.2)
        assert len(failing.attempts) == 2  # no retry in-process
        await sub.close()
        await ps.close()
        again = await component(cg)
        inbox = Inbox()
        await again.subscribe(SubscribeRequest(topic), inbox)
        await until(lambda: sorted(inbox.data) == [b"fine", b"unlucky"])
        # The broker marks what it sends again as a duplicate.
        assert all(m.attempt == 2 for m in inbox.messages), [m.attempt for m in inbox.messages]
        await again.close()

    run(main)


def test_handler_is_not_run_again_after_close(server: None) -> None:
    async def main() -> None:
        ps = await component(backOffInitialInterval="100ms")
        topic = topic_name()
        inbox = Inbox(fail=lambda m: True)
        sub = await ps.subscribe(SubscribeRequest(topic), inbox)
        await ps.publish(topic, b"x", {})
        await until(lambda: len(inbox.attempts) == 1)
        await sub.close()  # the pending retry is cancelled
        await asyncio.sleep(0.4)
        assert len(inbox.attempts) == 1
        await ps.close()

    run(main)


# -- topics ------------------------------------------------------------------------------------


def test_wildcard_subscriptions(server: None) -> None:
    async def main() -> None:
        ps = await component()
        base = topic_name("wild")
        plus, hash_ = Inbox(), Inbox()
        await ps.subscribe(SubscribeRequest(f"{base}/+/temp"), plus)
        await ps.subscribe(SubscribeRequest(f"{base}/#"), hash_)
        await ps.publish(f"{base}/kitchen/temp", b"21", {})
        await ps.publish(f"{base}/hall/temp", b"19", {})
        await ps.publish(f"{base}/hall/humidity", b"40", {})
        await until(lambda: len(plus.messages) == 2 and len(hash_.messages) == 3)
        assert {m.topic for m in plus.messages} == {f"{base}/kitchen/temp", f"{base}/hall/temp"}
        assert sorted(hash_.data) == [b"19", b"21", b"40"]
        await asyncio.sleep(0.2)
        assert len(plus.messages) == 2
        await ps.close()

    run(main)


def test_retain_per_message(server: None) -> None:
    async def main() -> None:
        ps = await component()
        topic = topic_name("retained")
        try:
            await ps.publish(topic, b"last-known", {"retain": "true"})
            inbox = Inbox()
            await ps.subscribe(SubscribeRequest(topic), inbox)
            await until(lambda: inbox.data == [b"last-known"])
            assert inbox.messages[0].metadata == {"retained": "true"}
        finally:
            await ps.publish(topic, b"", {"retain": "true"})  # clears the retained message
            await ps.close()

    run(main)


# -- connections ------------------------------------------------------------------------------


def _drop(sub: MQTTSubscription) -> None:
    """Cut a subscription's connection under paho, as a network failure would."""
    sock = sub._link._client.socket()
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]


def test_subscription_reconnects_after_the_connection_drops(server: None) -> None:
    async def main() -> None:
        ps = await component()
        topic = topic_name()
        inbox = Inbox()
        sub = await ps.subscribe(SubscribeRequest(topic), inbox)
        assert isinstance(sub, MQTTSubscription)
        await ps.publish(topic, b"before", {})
        await until(lambda: inbox.data == [b"before"])
        generation = sub._link.generation
        _drop(sub)
        await until(lambda: sub._link.generation > generation and sub._link.connected)
        await ps.publish(topic, b"after", {})
        await until(lambda: b"after" in inbox.data)
        # "before" may come twice: its PUBACK can be lost with the connection (at least once).
        assert set(inbox.data) == {b"before", b"after"}
        await ps.close()

    run(main)


def test_publisher_reconnects_after_the_connection_drops(server: None) -> None:
    async def main() -> None:
        ps = await component()
        topic = topic_name()
        inbox = Inbox()
        await ps.subscribe(SubscribeRequest(topic), inbox)
        publisher = ps._publisher
        assert publisher is not None
        sock = publisher._client.socket()
        assert sock is not None
        sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]
        # The publish waits for the reconnect (or paho resends after it), then for the PUBACK.
        await ps.publish(topic, b"through-a-reconnect", {})
        await until(lambda: inbox.data == [b"through-a-reconnect"])
        await ps.close()

    run(main)


def test_close_leaves_no_tasks_and_later_calls_fail(server: None) -> None:
    async def main() -> None:
        before = asyncio.all_tasks()
        ps = await component()
        await ps.subscribe(SubscribeRequest(topic_name()), Inbox())
        await ps.close()
        await ps.close()
        with pytest.raises(PubSubError):
            await ps.publish(topic_name(), b"x", {})
        with pytest.raises(PubSubError):
            await ps.subscribe(SubscribeRequest(topic_name()), Inbox())
        await asyncio.sleep(0.05)
        assert asyncio.all_tasks() - before == set()

    run(main)


def test_concurrency_bounds_handlers(server: None) -> None:
    async def main() -> None:
        ps = await component(concurrency="2")
        topic = topic_name()
        running, peak, done = 0, 0, 0

        async def slow(msg: Message) -> None:
            nonlocal running, peak, done
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.05)
            running -= 1
            done += 1

        await ps.subscribe(SubscribeRequest(topic), slow)
        for i in range(8):
            await ps.publish(topic, str(i).encode(), {})
        await until(lambda: done == 8)
        assert peak == 2
        await ps.close()

    run(main)
