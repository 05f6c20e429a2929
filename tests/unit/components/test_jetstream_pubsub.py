"""NATS JetStream pub/sub specifics: streams, durable consumers, naks, competing consumers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator

import nats
import nats.js.errors
import pytest
from nats.js.manager import JetStreamManager

from pillion.components.metadata import ComponentConfigError, ComponentInfo, Properties, decode
from pillion.components.pubsub import jetstream
from pillion.components.pubsub.api import Feature, Message, PubSubError, SubscribeRequest
from pillion.components.pubsub.jetstream import (
    JetStreamMetadata,
    JetStreamPubSub,
    JetStreamSubscription,
    safe_name,
    subject_covers,
)
from tests.conformance.conftest import delete_jetstream_streams, require_server
from tests.polling import run, until
from tests.unit.components.pubsub_helpers import Inbox, group

HOST, PORT = "127.0.0.1", 4222
URL = f"nats://{HOST}:{PORT}"


@pytest.fixture
def server() -> None:
    require_server("nats", HOST, PORT)


def info(**props: str) -> ComponentInfo:
    return ComponentInfo("pubsub", "pubsub.jetstream", "v1", "app", Properties(props))


def topic_name(prefix: str = "t") -> str:
    return f"pillion-test.{prefix}-{uuid.uuid4().hex[:10]}"


@contextlib.asynccontextmanager
async def broker(*topics: str, streams: tuple[str, ...] = ()) -> AsyncIterator[JetStreamManager]:
    """A plain JetStream manager; deletes the streams of `topics` (and `streams`) at the end."""
    nc = await nats.connect(URL)
    jsm = nc.jsm()
    try:
        yield jsm
    finally:
        await delete_jetstream_streams(list(topics))
        for name in streams:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await jsm.delete_stream(name)
        await nc.close()


async def component(consumer_id: str | None = None, **props: str) -> JetStreamPubSub:
    ps = JetStreamPubSub()
    await ps.init(info(natsURL=URL, consumerID=consumer_id or group(), **props))
    return ps


# -- metadata -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("props", "field"),
    [
        ({}, "natsURL"),
        ({"natsURL": URL, "jwt": "eyJ"}, "seedKey"),
        ({"natsURL": URL, "seedKey": "SU"}, "jwt"),
        ({"natsURL": URL, "tls_client_cert": "c.pem"}, "tls_client_key"),
        ({"natsURL": URL, "deliverPolicy": "oldest"}, "deliverPolicy"),
        ({"natsURL": URL, "deliverPolicy": "sequence"}, "startSequence"),
        ({"natsURL": URL, "deliverPolicy": "time"}, "startTime"),
        ({"natsURL": URL, "deliverPolicy": "new", "startSequence": "5"}, "startSequence"),
        ({"natsURL": URL, "ackPolicy": "sometimes"}, "ackPolicy"),
        ({"natsURL": URL, "ackWait": "0s"}, "ackWait"),
        ({"natsURL": URL, "ackWait": "soon"}, "ackWait"),
        ({"natsURL": URL, "backOff": "[1s, later]"}, "backOff"),
        ({"natsURL": URL, "backOff": "1s,2s"}, "maxDeliver"),
        ({"natsURL": URL, "backOff": "1s,2s", "maxDeliver": "2"}, "maxDeliver"),
        ({"natsURL": URL, "concurrency": "lots"}, "concurrency"),
        ({"natsURL": URL, "concurrency": "0"}, "concurrency"),
        ({"natsURL": URL, "maxAckPending": "-1"}, "maxAckPending"),
        ({"natsURL": URL, "streamName": "has.dots"}, "streamName"),
    ],
)
def test_bad_metadata_is_rejected(props: dict[str, str], field: str) -> None:
    async def main() -> None:
        with pytest.raises(ComponentConfigError) as err:
            await JetStreamPubSub().init(info(consumerID="c", **props))
        assert err.value.field == field

    run(main)


def test_metadata_defaults_and_forms() -> None:
    meta = decode(JetStreamMetadata, Properties({"natsURL": URL}))
    meta.validate()
    assert meta.policy().value == "all" and meta.limit() == 1 and meta.acks()
    assert meta.ack_deadline() == 30.0 and meta.nak_delay(1) == 0.0

    def md(**props: str) -> JetStreamMetadata:
        m = decode(JetStreamMetadata, Properties({"natsURL": URL, **props}))
        m.validate()
        return m

    assert md(startSequence="7").policy().value == "by_start_sequence"
    assert md(startTime="1700000000").policy().value == "by_start_time"
    assert md(deliverNew="true").policy().value == "new"
    assert md(backOff="[1s, 5s, 1m]", maxDeliver="4").backoff() == [1.0, 5.0, 60.0]
    assert md(backOff="500ms,2s", maxDeliver="3").nak_delay(1) == 0.5
    assert md(backOff="500ms,2s", maxDeliver="3").nak_delay(7) == 2.0
    assert md(ackWait="3s").nak_delay(2) == 3.0  # as Dapr: NakWithDelay(ackWait)
    assert md(concurrency="parallel").limit() == 1000
    assert md(concurrency="parallel", maxAckPending="20").limit() == 20
    assert md(concurrency="4").limit() == 4
    assert not md(ackPolicy="none").acks()


def test_names_and_subjects() -> None:
    assert safe_name("orders") == "orders"
    assert safe_name("a.b") != safe_name("a_b")
    assert "." not in safe_name("a.b/c d>*")
    assert len(safe_name("x" * 500)) < 200
    assert subject_covers("orders.*", "orders.eu")
    assert subject_covers("orders.>", "orders.eu.north")
    assert subject_covers("orders.>", "orders.*")
    assert not subject_covers("orders.*", "orders.>")
    assert not subject_covers("orders.*", "orders.eu.north")
    assert not subject_covers("orders.eu", "orders.*")
    assert subject_covers("orders", "orders") and not subject_covers("orders", "orders.eu")


def test_unreachable_server_fails_init() -> None:
    async def main() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with pytest.raises(PubSubError, match="cannot connect"):
            await JetStreamPubSub().init(info(natsURL=f"nats://127.0.0.1:{port}", consumerID="c"))

    run(main)


def test_invalid_subjects_are_rejected(server: None) -> None:
    async def main() -> None:
        ps = await component()
        try:
            for bad in ("", "a..b", "a b", "a.>.b"):
                with pytest.raises(PubSubError):
                    await ps.subscribe(SubscribeRequest(bad), Inbox())
            for bad in ("", "a.*", "a.>"):
                with pytest.raises(PubSubError):
                    await ps.publish(bad, b"x", {})
            with pytest.raises(PubSubError, match="concurrency"):
                await ps.subscribe(SubscribeRequest("a", {"concurrency": "many"}), Inbox())
        finally:
            await ps.close()

    run(main)


# -- streams and consumers ------------------------------------------------------------------


def test_stream_and_durable_consumer_are_created(server: None) -> None:
    async def main() -> None:
        topic, cg = topic_name(), group()
        async with broker(topic) as jsm:
            ps = await component(cg, ackWait="7s", maxDeliver="9")
            inbox = Inbox()
            sub = await ps.subscribe(SubscribeRequest(topic), inbox)
            assert isinstance(sub, JetStreamSubscription)
            stream = await jsm.find_stream_name_by_subject(topic)
            assert stream == safe_name(topic) == sub.stream
            info = await jsm.consumer_info(stream, sub.consumer)
            assert sub.consumer == safe_name(f"{cg}-{topic}")
            assert info.config.durable_name == sub.consumer
            assert info.config.filter_subject == topic
            assert info.config.ack_policy == "explicit"
            assert info.config.ack_wait == 7.0 and info.config.max_deliver == 9
            assert info.config.deliver_subject is None  # a pull consumer
            await ps.publish(topic, b"hello", {"trace": "abc"})
            await until(lambda: inbox.data == [b"hello"])
            m = inbox.messages[0]
            assert m.metadata == {"trace": "abc", "Topic": topic}
            assert m.id == f"{stream}:1" and m.attempt == 1
            await ps.close()
            # The durable consumer outlives the subscriber.
            await jsm.consumer_info(stream, sub.consumer)

    run(main)


def test_publish_creates_the_stream(server: None) -> None:
    async def main() -> None:
        topic = topic_name()
        async with broker(topic) as jsm:
            ps = await component()
            await ps.publish(topic, b"first", {})
            info = await jsm.stream_info(safe_name(topic))
            assert info.config.subjects == [topic] and info.state.messages == 1
            await ps.close()

    run(main)


def test_stream_name_holds_every_topic(server: None) -> None:
    async def main() -> None:
        stream = f"pillion-test-{uuid.uuid4().hex[:10]}"
        t1, t2 = topic_name(), topic_name()
        async with broker(streams=(stream,)) as jsm:
            ps = await component(streamName=stream)
            a, b = Inbox(), Inbox()
            await ps.subscribe(SubscribeRequest(t1), a)
            await ps.publish(t2, b"to-t2", {})  # not in the stream yet: the publish adds it
            await ps.subscribe(SubscribeRequest(t2), b)
            await ps.publish(t1, b"to-t1", {})
            await until(lambda: a.data == [b"to-t1"] and b.data == [b"to-t2"])
            info = await jsm.stream_info(stream)
            assert sorted(info.config.subjects or []) == sorted([t1, t2])
            await ps.close()

    run(main)


def test_existing_stream_with_a_wildcard_is_used(server: None) -> None:
    async def main() -> None:
        base = f"pillion-test.wild-{uuid.uuid4().hex[:10]}"
        stream = safe_name(base)
        async with broker(streams=(stream,)) as jsm:
            await jsm.add_stream(name=stream, subjects=[f"{base}.>"])
            ps = await component()
            every, one = Inbox(), Inbox()
            await ps.subscribe(SubscribeRequest(f"{base}.*"), every)
            await ps.subscribe(SubscribeRequest(f"{base}.eu"), one)
            await ps.publish(f"{base}.eu", b"eu", {})
            await ps.publish(f"{base}.us", b"us", {})
            await until(lambda: sorted(every.data) == [b"eu", b"us"] and one.data == [b"eu"])
            assert {m.topic for m in every.messages} == {f"{base}.eu", f"{base}.us"}
            # No stream of its own was made: the existing one still holds every subject (the
            # server refuses overlapping subjects, so a second stream could not hold them too).
            for subject in (f"{base}.eu", f"{base}.us", f"{base}.*"):
                assert await jsm.find_stream_name_by_subject(subject) == stream
            info = await jsm.stream_info(stream)
            assert info.config.subjects == [f"{base}.>"]
            await ps.close()

    run(main)


# -- delivery ---------------------------------------------------------------------------------


def test_deliver_policy_new_versus_all(server: None) -> None:
    async def main() -> None:
        topic = topic_name()
        async with broker(topic):
            ps = await component()
            await ps.publish(topic, b"before", {})
            every, fresh = Inbox(), Inbox()
            all_ps = await component(deliverPolicy="all")
            new_ps = await component(deliverPolicy="new")
            await all_ps.subscribe(SubscribeRequest(topic), every)
            await new_ps.subscribe(SubscribeRequest(topic), fresh)
            await ps.publish(topic, b"after", {})
            await until(lambda: every.data == [b"before", b"after"] and fresh.data == [b"after"])
            await asyncio.sleep(0.2)
            assert fresh.data == [b"after"]
            for c in (ps, all_ps, new_ps):
                await c.close()

    run(main)


def test_failed_handler_is_naked_and_redelivered(server: None) -> None:
    async def main() -> None:
        topic = topic_name()
        async with broker(topic):
            ps = await component(backOff="200ms", maxDeliver="5")
            inbox = Inbox(fail=lambda m: m.attempt < 3)
            await ps.subscribe(SubscribeRequest(topic), inbox)
            started = time.monotonic()
            await ps.publish(topic, b"flaky", {})
            await until(lambda: inbox.data == [b"flaky"])
            assert [m.attempt for m in inbox.attempts] == [1, 2, 3]
            assert time.monotonic() - started >= 0.4  # two naks with a 200ms delay each
            await asyncio.sleep(0.5)
            assert len(inbox.attempts) == 3
            await ps.close()

    run(main)


@contextlib.asynccontextmanager
async def one_subscriber() -> AsyncIterator[
    tuple[JetStreamManager, JetStreamPubSub, JetStreamSubscription, Inbox]
]:
    """A component subscribed to a new topic with an Inbox; closed at the end."""
    topic = topic_name()
    async with broker(topic) as jsm:
        ps = await component()
        inbox = Inbox()
        sub = await ps.subscribe(SubscribeRequest(topic), inbox)
        try:
            yield jsm, ps, sub, inbox
        finally:
            await ps.close()


async def waiting(jsm: JetStreamManager, sub: JetStreamSubscription, n: int) -> None:
    """Wait until the consumer holds `n` pull requests (and acks have settled)."""
    deadline = time.monotonic() + 10
    while True:
        info = await jsm.consumer_info(sub.stream, sub.consumer)
        if info.num_waiting == n and info.num_ack_pending == 0:
            return
        assert time.monotonic() < deadline, f"{info.num_waiting} requests waiting, not {n}"
        await asyncio.sleep(0.02)


def test_idle_subscription_holds_one_request_that_does_not_expire(server: None) -> None:
    # Expiring pull requests meet a NATS 2.9 bug (a redelivery that finds only expired
    # requests rewinds the consumer and an acked message comes again); pillion's do not expire.
    async def main() -> None:
        async with one_subscriber() as (jsm, ps, sub, inbox):
            await asyncio.sleep(1.5)  # longer than any fetch loop's wait
            info = await jsm.consumer_info(sub.stream, sub.consumer)
            assert info.num_waiting == 1
            await ps.publish(sub.topic, b"late", {})
            await until(lambda: inbox.data == [b"late"])
            await waiting(jsm, sub, 1)  # asked again once the message was handled
            await ps.close()
            await waiting(jsm, sub, 0)  # the inbox is gone, and with it the request

    run(main)


def test_deleted_consumer_is_made_again(server: None) -> None:
    async def main() -> None:
        async with one_subscriber() as (jsm, ps, sub, inbox):
            await jsm.delete_consumer(sub.stream, sub.consumer)
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await jsm.consumer_info(sub.stream, sub.consumer)
                    break
                assert time.monotonic() < deadline, "the consumer was not made again"
                await asyncio.sleep(0.05)
            await ps.publish(sub.topic, b"after", {})
            await until(lambda: inbox.data == [b"after"])
            await ps.close()

    run(main)


def test_consumer_deleted_unheard_is_made_again_by_the_idle_check(
    server: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A pull request that reaches the server after its consumer was deleted gets no answer,
    # and no 409 tells the subscription: here the 409s are dropped, so only the idle check
    # can find the consumer gone.
    monkeypatch.setattr(jetstream, "IDLE_CHECK", 0.3)

    def deaf(self: JetStreamSubscription, status: str, msg: object) -> None:
        return None  # whether the server sends the 409 is itself a race (see IDLE_CHECK)

    async def main() -> None:
        async with one_subscriber() as (jsm, ps, sub, inbox):
            monkeypatch.setattr(JetStreamSubscription, "_on_status", deaf)
            await jsm.delete_consumer(sub.stream, sub.consumer)
            await ps.publish(sub.topic, b"after", {})
            await until(lambda: inbox.data == [b"after"])
            await ps.close()

    run(main)


def test_deleted_stream_is_made_again_under_the_topics_name(
    server: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The subscription found the topic in another stream; that stream is deleted, so the
    # consumer is made again on a new stream named after the topic, and pulled from there.
    # The request may reach the server after the deletion and get no 409: the idle check
    # finds the consumer gone then.
    monkeypatch.setattr(jetstream, "IDLE_CHECK", 0.5)

    async def main() -> None:
        topic = topic_name()
        other = safe_name(f"{topic}-other")
        async with broker(topic, streams=(other,)) as jsm:
            await jsm.add_stream(name=other, subjects=[topic])
            ps = await component()
            inbox = Inbox()
            sub = await ps.subscribe(SubscribeRequest(topic), inbox)
            assert isinstance(sub, JetStreamSubscription) and sub.stream == other
            await jsm.delete_stream(other)
            await until(lambda: sub.stream == safe_name(topic))
            await ps.publish(topic, b"after", {})
            await until(lambda: inbox.data == [b"after"])
            await ps.close()

    run(main)


def test_long_handler_keeps_its_message_with_progress_acks(server: None) -> None:
    async def main() -> None:
        topic, cg = topic_name(), group()
        async with broker(topic):
            a = await component(cg, ackWait="1s")
            b = await component(cg, ackWait="1s")
            slow, other = Inbox(hold=2.5), Inbox()
            await a.subscribe(SubscribeRequest(topic), slow)
            await a.publish(topic, b"slow-work", {})
            await until(lambda: len(slow.attempts) == 1)
            await b.subscribe(SubscribeRequest(topic), other)
            await until(lambda: slow.data == [b"slow-work"], timeout=5)
            await asyncio.sleep(1.5)  # past ackWait: nothing is redelivered
            assert other.attempts == [] and len(slow.attempts) == 1
            await a.close()
            await b.close()

    run(main)


def test_competing_consumers_share_one_durable(server: None) -> None:
    async def main() -> None:
        topic, cg = topic_name(), group()
        async with broker(topic):
            a, b = await component(cg), await component(cg)
            inbox_a, inbox_b = Inbox(hold=0.01), Inbox(hold=0.01)
            sub_a = await a.subscribe(SubscribeRequest(topic), inbox_a)
            sub_b = await b.subscribe(SubscribeRequest(topic), inbox_b)
            assert isinstance(sub_a, JetStreamSubscription)
            assert isinstance(sub_b, JetStreamSubscription)
            assert sub_a.consumer == sub_b.consumer
            sent = [f"m{i}".encode() for i in range(40)]
            for data in sent:
                await a.publish(topic, data, {})
            await until(lambda: len(inbox_a.data) + len(inbox_b.data) == len(sent))
            await asyncio.sleep(0.3)
            assert sorted(inbox_a.data + inbox_b.data) == sorted(sent)  # each exactly once
            assert inbox_a.data and inbox_b.data, (len(inbox_a.data), len(inbox_b.data))
            await a.close()
            await b.close()

    run(main)


def test_durable_consumer_resumes_after_a_restart_without_loss(server: None) -> None:
    async def main() -> None:
        topic, cg = topic_name(), group()
        async with broker(topic):
            publisher = await component()
            first = Inbox()
            ps = await component(cg)
            await ps.subscribe(SubscribeRequest(topic), first)
            sent = [f"m{i:03d}".encode() for i in range(60)]
            # Publish while the subscriber goes away and comes back.
            for data in sent[:20]:
                await publisher.publish(topic, data, {})
            await until(lambda: len(first.data) >= 5)
            await ps.close()
            for data in sent[20:40]:
                await publisher.publish(topic, data, {})
            second = Inbox()
            ps = await component(cg)
            await ps.subscribe(SubscribeRequest(topic), second)
            for data in sent[40:]:
                await publisher.publish(topic, data, {})
            await until(lambda: set(first.data) | set(second.data) == set(sent))
            await asyncio.sleep(0.3)
            assert not set(first.data) & set(second.data)  # nothing acked was redelivered
            assert sorted(first.data + second.data) == sent
            assert second.data == sorted(second.data)  # concurrency single keeps stream order
            await ps.close()
            await publisher.close()

    run(main)


def test_parallel_concurrency_is_bounded(server: None) -> None:
    async def main() -> None:
        topic = topic_name()
        async with broker(topic):
            ps = await component(concurrency="parallel", maxAckPending="3")
            assert ps.features() == frozenset()
            running, peak, done = 0, 0, 0

            async def slow(msg: Message) -> None:
                nonlocal running, peak, done
                running += 1
                peak = max(peak, running)
                await asyncio.sleep(0.05)
                running -= 1
                done += 1

            await ps.subscribe(SubscribeRequest(topic), slow)
            for i in range(12):
                await ps.publish(topic, str(i).encode(), {})
            await until(lambda: done == 12)
            assert peak == 3
            await ps.close()

    run(main)


def test_single_concurrency_declares_ordered(server: None) -> None:
    async def main() -> None:
        ps = await component()
        assert ps.features() == frozenset({Feature.ORDERED})
        await ps.close()

    run(main)


def test_reconnects_after_the_connection_drops(server: None) -> None:
    async def main() -> None:
        topic = topic_name()
        async with broker(topic):
            ps = await component()
            inbox = Inbox()
            await ps.subscribe(SubscribeRequest(topic), inbox)
            await ps.publish(topic, b"before", {})
            await until(lambda: inbox.data == [b"before"])
            # Cut the client's socket, as a network failure would; nats-py reconnects.
            nc = ps._nc
            assert nc is not None
            reconnects = nc.stats["reconnects"]
            sock = nc._transport._io_writer.get_extra_info("socket")  # type: ignore[union-attr]
            sock.shutdown(socket.SHUT_RDWR)
            await until(lambda: nc.stats["reconnects"] > reconnects and nc.is_connected)
            await ps.publish(topic, b"after", {})
            await until(lambda: b"after" in inbox.data)
            assert set(inbox.data) == {b"before", b"after"}
            await ps.close()

    run(main)


# -- headers and deduplication -----------------------------------------------------------------


def test_consumer_deleted_while_disconnected_is_made_again(server: None) -> None:
    # The server's 409 cannot reach a disconnected client, and a pull request for a consumer
    # that does not exist gets no answer: after reconnecting, the subscription checks.
    async def main() -> None:
        async with one_subscriber() as (jsm, ps, sub, inbox):
            nc = ps._nc
            assert nc is not None
            reconnects = nc.stats["reconnects"]
            sock = nc._transport._io_writer.get_extra_info("socket")  # type: ignore[union-attr]
            sock.shutdown(socket.SHUT_RDWR)
            await jsm.delete_consumer(sub.stream, sub.consumer)  # nats-py waits 1s to reconnect
            await until(lambda: nc.stats["reconnects"] > reconnects and nc.is_connected)
            await ps.publish(sub.topic, b"after", {})
            await until(lambda: inbox.data == [b"after"])

    run(main)


def test_cloudevent_id_deduplicates_per_topic(server: None) -> None:
    async def main() -> None:
        topic, dead = topic_name(), topic_name("dlq")
        stream = f"pillion-test-{uuid.uuid4().hex[:10]}"
        async with broker(streams=(stream,)):
            ps = await component(streamName=stream)
            inbox, dlq = Inbox(), Inbox()
            await ps.subscribe(SubscribeRequest(topic), inbox)
            await ps.subscribe(SubscribeRequest(dead), dlq)
            event = json.dumps({"id": "evt-1", "specversion": "1.0", "data": "x"}).encode()
            await ps.publish(topic, event, {})
            await ps.publish(topic, event, {})  # a retried publish: dropped by JetStream
            await ps.publish(dead, event, {})  # the same event on another topic is kept
            await until(lambda: len(inbox.data) == 1 and len(dlq.data) == 1)
            await asyncio.sleep(0.3)
            assert len(inbox.data) == 1
            await ps.close()

    run(main)


def test_close_leaves_no_tasks_and_later_calls_fail(server: None) -> None:
    async def main() -> None:
        topic = topic_name()
        async with broker(topic):
            before = asyncio.all_tasks()
            ps = await component()
            await ps.subscribe(SubscribeRequest(topic), Inbox())
            await ps.close()
            await ps.close()
            with pytest.raises(PubSubError):
                await ps.publish(topic, b"x", {})
            with pytest.raises(PubSubError):
                await ps.subscribe(SubscribeRequest(topic), Inbox())
            await asyncio.sleep(0.05)
            assert asyncio.all_tasks() - before == set()

    run(main)
