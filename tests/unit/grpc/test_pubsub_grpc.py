"""Pub/sub over the gRPC API with the official SDK: publish, bulk publish, streaming."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
import warnings
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar

import grpc
import pytest
from dapr.clients import BulkPublishEntry, DaprClient
from dapr.clients.exceptions import DaprGrpcError
from dapr.clients.grpc.subscription import Subscription
from dapr.common.pubsub.subscription import SubscriptionMessage
from dapr.proto.runtime.v1 import appcallback_pb2, dapr_pb2_grpc, pubsub_pb2

from pillion.api.grpc.dapr_api import DaprApi
from pillion.api.grpc.server import start_grpc_server
from pillion.blocks import cloudevents as ce
from pillion.blocks.invoke import InvokeBlock
from pillion.blocks.metadata import MetadataBlock
from pillion.blocks.pubsub import PubSubBlock, PubSubEntry
from pillion.blocks.state import StateBlock
from pillion.components.metadata import ComponentInfo, Properties
from pillion.components.pubsub.api import PubSubError
from pillion.components.pubsub.inmemory import InMemoryPubSub
from tests.unit.grpc.conftest import APP_ID, GrpcSidecar, Resolver

T = TypeVar("T")
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class RecordingPubSub(InMemoryPubSub):
    """The in-memory broker, remembering what it was given; refuses bodies containing "boom"."""

    def __init__(self) -> None:
        super().__init__()
        self.published: list[tuple[str, bytes, dict[str, str]]] = []

    async def publish(self, topic: str, data: bytes, metadata: Mapping[str, str]) -> None:
        if b"boom" in data:
            raise PubSubError("the broker refused boom")
        self.published.append((topic, data, dict(metadata)))
        await super().publish(topic, data, metadata)

    def last(self, topic: str) -> tuple[dict[str, Any], dict[str, str]]:
        for t, data, md in reversed(self.published):
            if t == topic:
                return json.loads(data), md
        raise AssertionError(f"nothing published on {topic}")


class PubSubSidecar(GrpcSidecar):
    """The gRPC API over a real PubSubBlock: `pubsub` (recording) and `scoped` (in-memory)."""

    async def _start(self) -> None:
        self.broker = RecordingPubSub()
        scoped = InMemoryPubSub()
        self.brokers: list[InMemoryPubSub] = [self.broker, scoped]
        scoped_props = Properties({"subscriptionScopes": f"{APP_ID}=allowed"})
        await self.broker.init(
            ComponentInfo("pubsub", "pubsub.in-memory", "v1", APP_ID, Properties())
        )
        await scoped.init(ComponentInfo("scoped", "pubsub.in-memory", "v1", APP_ID, scoped_props))
        self.pubsub = PubSubBlock(
            APP_ID,
            {
                "pubsub": PubSubEntry("pubsub", self.broker, ce.TopicScopes({})),
                "scoped": PubSubEntry("scoped", scoped, ce.TopicScopes(scoped_props)),
            },
        )
        api = DaprApi(
            state=StateBlock(APP_ID, "", {}),
            invoke=InvokeBlock(APP_ID, "", Resolver(), self.link, None),
            metadata=MetadataBlock(APP_ID, lambda: []),
            request_shutdown=self._on_shutdown,
            app_id=APP_ID,
            pubsub=self.pubsub,
        )
        self.server, self.port = await start_grpc_server(
            api, host="127.0.0.1", port=0, max_message_size=4 << 20, api_token=None
        )

    async def _stop(self) -> None:
        await self.server.stop(None)
        await self.pubsub.stop()
        for b in self.brokers:
            await b.close()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the server's loop (where the block and brokers live)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def streaming(self) -> list[str]:
        async def topics() -> list[str]:
            return [s.topic for s in self.pubsub.subscriptions() if s.kind == "STREAMING"]

        return self.call(topics())


@pytest.fixture(scope="module")
def sidecar() -> Iterator[PubSubSidecar]:
    with PubSubSidecar() as s:
        yield s


@pytest.fixture
def client(
    sidecar: PubSubSidecar, healthz_port: int, monkeypatch: pytest.MonkeyPatch
) -> Iterator[DaprClient]:
    monkeypatch.setenv("DAPR_HTTP_PORT", str(healthz_port))
    monkeypatch.setenv("DAPR_HEALTH_TIMEOUT", "5")
    monkeypatch.delenv("DAPR_API_TOKEN", raising=False)
    monkeypatch.delenv("DAPR_GRPC_ENDPOINT", raising=False)
    with DaprClient(address=sidecar.address) as c:
        yield c


@pytest.fixture
def pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(4) as p:
        yield p


def wait_for(cond: Callable[[], bool], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def receive(
    pool: concurrent.futures.ThreadPoolExecutor, sub: Subscription, timeout: float = 5
) -> SubscriptionMessage:
    """The next streamed message; the SDK's own read has no timeout."""
    msg: SubscriptionMessage = pool.submit(sub.next_message).result(timeout)
    return msg


def grpc_cause(exc: BaseException) -> DaprGrpcError:
    """The SDK wraps a failed stream start in a plain Exception; its cause is the RPC error."""
    cause = exc.__cause__
    assert isinstance(cause, grpc.RpcError), repr(exc)
    return DaprGrpcError(cause)


# --- publish -------------------------------------------------------------------------------------


def test_publish_without_content_type_sends_the_data_as_a_string(
    sidecar: PubSubSidecar, client: DaprClient
) -> None:
    client.publish_event("pubsub", "orders", b'{"n": 1}')
    env, md = sidecar.broker.last("orders")
    assert env["datacontenttype"] == "text/plain"
    assert env["data"] == '{"n": 1}'
    assert (env["topic"], env["pubsubname"], env["source"]) == ("orders", "pubsub", APP_ID)
    assert (env["type"], env["specversion"]) == ("com.dapr.event.sent", "1.0")
    assert env["id"] and env["time"]
    assert md == {}


def test_publish_json_and_overrides(sidecar: PubSubSidecar, client: DaprClient) -> None:
    client.publish_event(
        "pubsub",
        "orders",
        json.dumps({"n": 2}),
        data_content_type="application/json",
        publish_metadata={
            "cloudevent.id": "my-id",
            "cloudevent.type": "my.type",
            "cloudevent.source": "my-source",
            "partitionKey": "p1",
        },
    )
    env, md = sidecar.broker.last("orders")
    assert env["datacontenttype"] == "application/json"
    assert env["data"] == {"n": 2}
    assert (env["id"], env["type"], env["source"]) == ("my-id", "my.type", "my-source")
    # Envelope overrides stay out of the broker metadata; the rest goes through.
    assert md == {"partitionKey": "p1"}


def test_publish_trace_context_and_raw_payload(sidecar: PubSubSidecar, client: DaprClient) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client.publish_event(
            "pubsub",
            "traced",
            "hi",
            metadata=(("traceparent", TRACEPARENT), ("tracestate", "k=v")),
        )
    env, _ = sidecar.broker.last("traced")
    assert (env["traceparent"], env["traceid"], env["tracestate"]) == (
        TRACEPARENT,
        TRACEPARENT,
        "k=v",
    )
    client.publish_event("pubsub", "raw", b"\x00raw", publish_metadata={"rawPayload": "true"})
    assert sidecar.broker.published[-1][:2] == ("raw", b"\x00raw")


def test_publish_errors(client: DaprClient) -> None:
    with pytest.raises(DaprGrpcError) as info:
        client.publish_event("nope", "orders", b"x")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.error_code() == "DAPR_PUBSUB_NOT_FOUND"
    assert "pubsub nope is not found" in (info.value.details() or "")
    with pytest.raises(DaprGrpcError) as info:
        client.publish_event("pubsub", "", b"x")
    assert info.value.error_code() == "DAPR_PUBSUB_TOPIC_NAME_EMPTY"
    with pytest.raises(DaprGrpcError) as info:
        client.publish_event("pubsub", "orders", b"boom")
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.error_code() == "DAPR_PUBSUB_PUBLISH_MESSAGE"


# --- bulk publish --------------------------------------------------------------------------------


def test_bulk_publish_reports_the_failed_entry(sidecar: PubSubSidecar, client: DaprClient) -> None:
    resp = client.publish_events(
        "pubsub",
        "bulk",
        [
            BulkPublishEntry(event="one", entry_id="e1"),
            BulkPublishEntry(event="two boom", entry_id="e2"),
            BulkPublishEntry(
                event='{"n": 3}',
                entry_id="e3",
                content_type="application/json",
                metadata={"k": "entry"},
            ),
        ],
        publish_metadata={"k": "request", "r": "1"},
        data_content_type="text/plain",
    )
    assert [(f.entry_id, "boom" in f.error) for f in resp.failed_entries] == [("e2", True)]
    sent = [(json.loads(d), md) for t, d, md in sidecar.broker.published[-2:] if t == "bulk"]
    assert [(e["data"], e["datacontenttype"]) for e, _ in sent] == [
        ("one", "text/plain"),
        ({"n": 3}, "application/json"),
    ]
    assert [md for _, md in sent] == [{"k": "request", "r": "1"}, {"k": "entry", "r": "1"}]


def test_bulk_publish_alpha1_and_errors(sidecar: PubSubSidecar) -> None:
    async def main(stub: dapr_pb2_grpc.DaprStub) -> pubsub_pb2.BulkPublishResponse:
        req = pubsub_pb2.BulkPublishRequest(
            pubsub_name="pubsub",
            topic="bulk-alpha",
            entries=[pubsub_pb2.BulkPublishRequestEntry(entry_id="a", event=b"x")],
        )
        resp: pubsub_pb2.BulkPublishResponse = await stub.BulkPublishEventAlpha1(req)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            dup = pubsub_pb2.BulkPublishRequest(
                pubsub_name="pubsub",
                topic="bulk-alpha",
                entries=[
                    pubsub_pb2.BulkPublishRequestEntry(entry_id="a", event=b"x"),
                    pubsub_pb2.BulkPublishRequestEntry(entry_id="a", event=b"y"),
                ],
            )
            await stub.BulkPublishEvent(dup)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return resp

    assert list(sidecar.run(main).failedEntries) == []
    env, _ = sidecar.broker.last("bulk-alpha")
    assert (env["data"], env["datacontenttype"]) == ("x", "text/plain")


# --- streaming subscriptions ---------------------------------------------------------------------


def test_streaming_subscription_success_retry_drop(
    sidecar: PubSubSidecar, client: DaprClient, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    dlq = client.subscribe("pubsub", "stream-dlq")
    sub = client.subscribe("pubsub", "stream", dead_letter_topic="stream-dlq")
    try:
        assert sorted(sidecar.streaming()) == ["stream", "stream-dlq"]
        # Published right after subscribe() returned: the subscription already exists.
        client.publish_event(
            "pubsub", "stream", json.dumps({"n": 1}), data_content_type="application/json"
        )
        msg = receive(pool, sub)
        assert (msg.topic(), msg.pubsub_name(), msg.type(), msg.source()) == (
            "stream",
            "pubsub",
            "com.dapr.event.sent",
            APP_ID,
        )
        assert msg.data() == {"n": 1}
        assert msg.data_content_type() == "application/json"
        ext = msg.extensions()
        assert (ext["topic"], ext["pubsubname"]) == ("stream", "pubsub")
        assert "time" in ext and "data" not in ext
        sub.respond_success(msg)

        # RETRY without a resiliency policy: one attempt, then the dead-letter topic (daprd).
        client.publish_event("pubsub", "stream", "again")
        first = receive(pool, sub)
        sub.respond_retry(first)
        retried = receive(pool, dlq)
        assert (retried.id(), retried.data()) == (first.id(), "again")
        dlq.respond_success(retried)

        # DROP: acknowledged and forwarded to the dead-letter topic.
        client.publish_event("pubsub", "stream", "drop me")
        dropped = receive(pool, sub)
        sub.respond_drop(dropped)
        dead = receive(pool, dlq)
        assert (dead.id(), dead.data(), dead.topic()) == (dropped.id(), "drop me", "stream-dlq")
        dlq.respond_success(dead)

        # Two events in flight at once, answered out of order.
        client.publish_event("pubsub", "stream", "a")
        client.publish_event("pubsub", "stream", "b")
        m1, m2 = receive(pool, sub), receive(pool, sub)
        assert {m1.data(), m2.data()} == {"a", "b"}
        sub.respond_success(m2)
        sub.respond_success(m1)
    finally:
        sub.close()
        dlq.close()
    wait_for(lambda: sidecar.streaming() == [])


def test_streaming_client_gone_means_retry(
    sidecar: PubSubSidecar, client: DaprClient, pool: concurrent.futures.ThreadPoolExecutor
) -> None:
    a = client.subscribe("pubsub", "handoff")
    b: Subscription | None = None
    try:
        client.publish_event("pubsub", "handoff", "hot potato")
        unanswered = receive(pool, a)
        # A second stream joins the same consumer group, then the first leaves unanswered.
        b = client.subscribe("pubsub", "handoff")
        a.close()
        again = receive(pool, b)
        assert (again.id(), again.data()) == (unanswered.id(), "hot potato")
        b.respond_success(again)
    finally:
        a.close()
        if b is not None:
            b.close()
    wait_for(lambda: sidecar.streaming() == [])


def test_streaming_errors(client: DaprClient) -> None:
    with pytest.raises(Exception) as info:
        client.subscribe("nope", "t")
    err = grpc_cause(info.value)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.error_code() == "DAPR_PUBSUB_NOT_FOUND"
    with pytest.raises(Exception) as info:
        client.subscribe("pubsub", "")
    assert grpc_cause(info.value).error_code() == "DAPR_PUBSUB_TOPIC_NAME_EMPTY"
    with pytest.raises(Exception) as info:
        client.subscribe("scoped", "secret")
    err = grpc_cause(info.value)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.error_code() == "DAPR_PUBSUB_FORBIDDEN"
    client.subscribe("scoped", "allowed").close()


def test_streaming_needs_an_initial_request(sidecar: PubSubSidecar) -> None:
    Req = pubsub_pb2.SubscribeTopicEventsRequestAlpha1

    async def main(stub: dapr_pb2_grpc.DaprStub) -> list[tuple[grpc.StatusCode, str]]:
        out = []
        processed = Req(
            event_processed=pubsub_pb2.SubscribeTopicEventsRequestProcessedAlpha1(
                id="x", status=appcallback_pb2.TopicEventResponse()
            )
        )
        for requests in ([processed], []):
            call = stub.SubscribeTopicEventsAlpha1(iter(requests), timeout=5)
            out.append((await call.code(), await call.details()))
        return out

    assert (
        sidecar.run(main) == [(grpc.StatusCode.INVALID_ARGUMENT, "initial request is required")] * 2
    )


def test_streaming_duplicate_initial_request_ends_the_stream(sidecar: PubSubSidecar) -> None:
    Req = pubsub_pb2.SubscribeTopicEventsRequestAlpha1
    init = Req(
        initial_request=pubsub_pb2.SubscribeTopicEventsRequestInitialAlpha1(
            pubsub_name="pubsub", topic="dup"
        )
    )

    async def main(stub: dapr_pb2_grpc.DaprStub) -> tuple[str | None, grpc.StatusCode, str]:
        call = stub.SubscribeTopicEventsAlpha1(timeout=5)
        await call.write(init)
        first = await call.read()
        kind = first.WhichOneof("subscribe_topic_events_response_type")
        await call.write(init)
        return kind, await call.code(), await call.details()

    assert sidecar.run(main) == (
        "initial_response",
        grpc.StatusCode.INVALID_ARGUMENT,
        "duplicate initial request received",
    )
    wait_for(lambda: "dup" not in sidecar.streaming())
