"""Pub/sub with a gRPC app: discovery, OnTopicEvent and OnBulkTopicEvent delivery, SDK and not."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any, TypeAlias, TypeVar

import grpc
import grpc.aio
import pytest
from dapr.proto.runtime.v1 import appcallback_pb2, appcallback_pb2_grpc

from pillion.blocks import cloudevents as ce
from pillion.blocks.pubsub import (
    BulkItem,
    BulkSubscribe,
    Delivery,
    PubSubBlock,
    PubSubEntry,
    SubscriptionSpec,
)
from pillion.blocks.routing import Routes
from pillion.components.metadata import ComponentInfo, Properties
from pillion.components.pubsub.inmemory import InMemoryPubSub
from pillion.runtime.grpc_app import GrpcAppChannel
from pillion.runtime.grpc_pubsub import GrpcDeliverer, discover_grpc

HOST = "127.0.0.1"
T = TypeVar("T")
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

SDK_APP = textwrap.dedent(
    """
    import json, sys
    from dapr.ext.grpc import (
        App, InvokeMethodRequest, Rule, SubscriptionMessage, TopicEventResponse,
    )

    app = App()
    seen = []

    def record(handler, event):
        seen.append({
            "handler": handler,
            "id": event.id(),
            "type": event.type(),
            "source": event.source(),
            "topic": event.topic(),
            "pubsub": event.pubsub_name(),
            "content_type": event.data_content_type(),
            "data": event.raw_data().decode(),
            "extensions": event.extensions(),
            "metadata": {k: v for k, v in event.metadata().items() if isinstance(v, str)},
        })

    @app.subscribe("pubsub", "orders", metadata={"rawPayload": "false"},
                   dead_letter_topic="orders-dlq")
    def orders(event: SubscriptionMessage) -> None:
        record("orders", event)

    @app.subscribe("pubsub", "routed", rule=Rule('event.type == "important"', 1))
    def important(event: SubscriptionMessage) -> None:
        record("important", event)

    @app.subscribe("pubsub", "routed", rule=Rule('event.type == "urgent"', 0))
    def urgent(event: SubscriptionMessage) -> None:
        record("urgent", event)

    @app.subscribe("pubsub", "retry")
    def retry(event: SubscriptionMessage) -> TopicEventResponse:
        return TopicEventResponse("retry")

    @app.subscribe("pubsub", "drop")
    def drop(event: SubscriptionMessage) -> TopicEventResponse:
        return TopicEventResponse("drop")

    @app.subscribe("pubsub", "success")
    def success(event: SubscriptionMessage) -> TopicEventResponse:
        return TopicEventResponse("success")

    @app.subscribe("pubsub", "fail")
    def fail(event: SubscriptionMessage) -> None:
        raise ValueError("the handler failed")

    @app.method("seen")
    def seen_method(request: InvokeMethodRequest) -> bytes:
        return json.dumps(seen).encode()

    print("starting", flush=True)
    app.run(int(sys.argv[1]), "127.0.0.1")
    """
)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 10))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def sdk_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    script = tmp_path_factory.mktemp("pubsubapp") / "app.py"
    script.write_text(SDK_APP)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-W", "ignore", str(script), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex((HOST, port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                out, err = proc.communicate(timeout=5)
                pytest.fail(f"SDK app did not start:\n{out.decode()}\n{err.decode()}")
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def envelope(topic: str, data: str, **kw: Any) -> dict[str, Any]:
    return ce.new_envelope(
        data=data.encode(),
        content_type=kw.pop("content_type", "text/plain"),
        topic=topic,
        pubsub="pubsub",
        source="publisher",
        traceparent=TRACEPARENT,
        **kw,
    )


def spec(topic: str, routes: Routes | None = None) -> SubscriptionSpec:
    return SubscriptionSpec("pubsub", topic, routes or Routes([], "", leading_slash=False))


async def seen(ch: GrpcAppChannel) -> list[dict[str, Any]]:
    resp = await ch.invoke("POST", b"/seen", [], b"")
    assert resp.status == 200, resp.body
    out: list[dict[str, Any]] = json.loads(resp.body)
    return out


# --- discovery -----------------------------------------------------------------------------------


def test_discover_grpc_reads_the_sdk_subscriptions(sdk_app: int) -> None:
    async def main() -> list[SubscriptionSpec]:
        ch = GrpcAppChannel(HOST, sdk_app)
        try:
            return await discover_grpc(ch)
        finally:
            await ch.close()

    specs = {s.topic: s for s in run(main())}
    assert sorted(specs) == ["drop", "fail", "orders", "retry", "routed", "success"]
    orders = specs["orders"]
    assert (orders.pubsub, orders.kind, orders.dead_letter_topic) == (
        "pubsub",
        "PROGRAMMATIC",
        "orders-dlq",
    )
    assert dict(orders.metadata) == {"rawPayload": "false"}
    # No routes given: the default path is "" (the SDK's handler key for a plain subscribe).
    assert (orders.routes.rules, orders.routes.default) == ((), "")
    # Rules in priority order, paths verbatim (the handler names); no default route.
    routed = specs["routed"]
    assert routed.routes.rules == (
        ('event.type == "urgent"', "urgent"),
        ('event.type == "important"', "important"),
    )
    assert routed.routes.default is None
    assert routed.routes.select({"type": "important"}) == "important"
    assert routed.routes.select({"type": "other"}) is None


def test_discover_grpc_without_subscriptions_is_empty() -> None:
    async def main() -> tuple[list[SubscriptionSpec], list[SubscriptionSpec]]:
        server = grpc.aio.server()  # implements no service: UNIMPLEMENTED
        port = server.add_insecure_port(f"{HOST}:0")
        await server.start()
        bare = GrpcAppChannel(HOST, port)
        gone = GrpcAppChannel(HOST, free_port())
        try:
            return await discover_grpc(bare), await discover_grpc(gone)
        finally:
            await bare.close()
            await gone.close()
            await server.stop(None)

    assert run(main()) == ([], [])


# --- delivery ------------------------------------------------------------------------------------


def test_deliver_sends_the_cloud_event_fields(sdk_app: int) -> None:
    async def main() -> tuple[ce.Result, ce.Result, list[dict[str, Any]], dict[str, Any]]:
        ch = GrpcAppChannel(HOST, sdk_app, app_token="app-secret")
        d = GrpcDeliverer(ch)
        try:
            env = envelope("orders", '{"n": 1}', content_type="application/json")
            env["custom"] = "ext"
            res = await d.deliver(
                Delivery(
                    spec("orders"),
                    "",
                    env,
                    {"pubsubName": "pubsub", "x-custom": "yes", "content-type": "ignored"},
                )
            )
            routes = Routes([('event.type == "important"', "important")], leading_slash=False)
            important = envelope("routed", "hi", overrides={"type": "important"})
            path = routes.select(important)
            assert path == "important"
            routed = await d.deliver(Delivery(spec("routed", routes), path, important, {}))
            return res, routed, await seen(ch), env
        finally:
            await ch.close()

    res, routed, events, env = run(main())
    assert (res, routed) == (ce.Result.SUCCESS, ce.Result.SUCCESS)
    first, second = events[-2:]
    assert first["handler"] == "orders"
    assert (first["id"], first["type"], first["source"]) == (
        env["id"],
        "com.dapr.event.sent",
        "publisher",
    )
    assert (first["topic"], first["pubsub"], first["content_type"]) == (
        "orders",
        "pubsub",
        "application/json",
    )
    assert json.loads(first["data"]) == {"n": 1}
    ext = first["extensions"]
    assert (ext["topic"], ext["pubsubname"], ext["custom"]) == ("orders", "pubsub", "ext")
    assert ext["traceparent"] == TRACEPARENT and "time" in ext
    assert not {"id", "source", "type", "specversion", "datacontenttype", "data"} & set(ext)
    md = first["metadata"]
    assert (md["pubsubname"], md["x-custom"], md["dapr-api-token"]) == (
        "pubsub",
        "yes",
        "app-secret",
    )
    assert md["traceparent"] == TRACEPARENT
    assert md.get("content-type") != "ignored"
    assert (second["handler"], second["type"], second["data"]) == ("important", "important", "hi")


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("success", ce.Result.SUCCESS),
        ("retry", ce.Result.RETRY),
        ("drop", ce.Result.DROP),
        ("fail", ce.Result.RETRY),  # the handler raised: UNKNOWN
        ("unhandled", ce.Result.DROP),  # the SDK answers UNIMPLEMENTED: not retriable
    ],
)
def test_deliver_maps_the_app_answer(sdk_app: int, topic: str, expected: ce.Result) -> None:
    async def main() -> ce.Result:
        ch = GrpcAppChannel(HOST, sdk_app)
        try:
            return await GrpcDeliverer(ch).deliver(
                Delivery(spec(topic), "", envelope(topic, "x"), {})
            )
        finally:
            await ch.close()

    assert run(main()) == expected


def test_deliver_retries_when_the_app_is_unhealthy_or_gone(sdk_app: int) -> None:
    async def main() -> tuple[ce.Result, ce.Result]:
        ch = GrpcAppChannel(HOST, sdk_app)
        ch.healthy = False
        gone = GrpcAppChannel(HOST, free_port())
        d = Delivery(spec("success"), "", envelope("success", "x"), {})
        try:
            return await GrpcDeliverer(ch).deliver(d), await GrpcDeliverer(gone).deliver(d)
        finally:
            await ch.close()
            await gone.close()

    assert run(main()) == (ce.Result.RETRY, ce.Result.RETRY)


def test_block_to_app_end_to_end(sdk_app: int) -> None:
    """Publish on an in-memory broker; the discovered subscription delivers to the SDK app."""

    async def main() -> list[dict[str, Any]]:
        broker = InMemoryPubSub()
        await broker.init(ComponentInfo("pubsub", "pubsub.in-memory", "v1", "app", Properties()))
        block = PubSubBlock("app", {"pubsub": PubSubEntry("pubsub", broker, ce.TopicScopes({}))})
        ch = GrpcAppChannel(HOST, sdk_app)
        try:
            deliverer = GrpcDeliverer(ch)
            for s in await discover_grpc(ch):
                assert await block.subscribe(s, deliverer)
            await block.publish(
                "pubsub", "orders", b"end to end", content_type=None, metadata={"k": "v"}
            )
            deadline = time.monotonic() + 5
            while True:
                events = [e for e in await seen(ch) if e["data"] == "end to end"]
                if events or time.monotonic() > deadline:
                    return events
                await asyncio.sleep(0.02)
        finally:
            await block.stop()
            await broker.close()
            await ch.close()

    (event,) = run(main())
    assert (event["handler"], event["content_type"], event["source"]) == (
        "orders",
        "text/plain",
        "app",
    )
    assert (event["metadata"]["k"], event["metadata"]["pubsubname"]) == ("v", "pubsub")


# --- bulk delivery (OnBulkTopicEvent) ------------------------------------------------------------

BulkReq = appcallback_pb2.TopicEventBulkRequest
BulkResp = appcallback_pb2.TopicEventBulkResponse
Status = appcallback_pb2.TopicEventResponse.TopicEventResponseStatus
StatusValue: TypeAlias = appcallback_pb2.TopicEventResponse.TopicEventResponseStatus.ValueType


class BulkApp(
    appcallback_pb2_grpc.AppCallbackServicer, appcallback_pb2_grpc.AppCallbackAlphaServicer
):
    """An in-process gRPC app: which calls it implements is chosen per test; records every call.

    `answer` maps an entry's CloudEvent data to its status; entries whose data is not in it are
    left out of the answer. Calls that are not implemented answer UNIMPLEMENTED (and count).
    """

    def __init__(
        self,
        *,
        bulk: bool = True,
        alpha: bool = True,
        answer: dict[bytes, StatusValue] | None = None,
        fail: grpc.StatusCode | None = None,
    ) -> None:
        self.bulk, self.alpha, self.fail = bulk, alpha, fail
        self.answer = answer or {}
        self.calls: list[tuple[str, Any, dict[str, str]]] = []

    def _record(self, name: str, request: Any, context: grpc.aio.ServicerContext) -> None:
        md = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.calls.append((name, request, md))

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]

    async def _bulk(
        self, name: str, enabled: bool, request: BulkReq, context: grpc.aio.ServicerContext
    ) -> BulkResp:
        self._record(name, request, context)
        if not enabled:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented")
        if self.fail is not None:
            await context.abort(self.fail, "the app failed")
        statuses = []
        for e in request.entries:
            data = e.cloud_event.data if e.HasField("cloud_event") else e.bytes
            if data in self.answer:
                statuses.append(
                    appcallback_pb2.TopicEventBulkResponseEntry(
                        entry_id=e.entry_id, status=self.answer[data]
                    )
                )
        statuses.append(appcallback_pb2.TopicEventBulkResponseEntry(entry_id="stranger"))
        return BulkResp(statuses=statuses)

    async def OnBulkTopicEvent(
        self, request: BulkReq, context: grpc.aio.ServicerContext
    ) -> BulkResp:
        return await self._bulk("bulk", self.bulk, request, context)

    async def OnBulkTopicEventAlpha1(
        self, request: BulkReq, context: grpc.aio.ServicerContext
    ) -> BulkResp:
        return await self._bulk("alpha", self.alpha, request, context)

    async def OnTopicEvent(
        self, request: appcallback_pb2.TopicEventRequest, context: grpc.aio.ServicerContext
    ) -> appcallback_pb2.TopicEventResponse:
        self._record("single", request, context)
        return appcallback_pb2.TopicEventResponse(
            status=self.answer.get(request.data, Status.SUCCESS)
        )


async def serve(app: BulkApp) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    appcallback_pb2_grpc.add_AppCallbackServicer_to_server(app, server)
    appcallback_pb2_grpc.add_AppCallbackAlphaServicer_to_server(app, server)
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    return server, port


def items(topic: str, *datas: str, **md: str) -> list[BulkItem]:
    out = []
    for i, data in enumerate(datas):
        env = envelope(topic, data)
        out.append(BulkItem(f"{i}-{env['id']}", env, {"pubsubName": "pubsub", "n": str(i), **md}))
    return out


def bulk_run(
    app: BulkApp,
    batches: list[tuple[SubscriptionSpec, list[BulkItem]]],
    **channel: Any,
) -> tuple[list[dict[str, ce.Result]], GrpcDeliverer]:
    """Deliver each batch in turn to `app` served in process; the results and the deliverer."""

    async def main() -> tuple[list[dict[str, ce.Result]], GrpcDeliverer]:
        server, port = await serve(app)
        ch = GrpcAppChannel(HOST, port, **channel)
        d = GrpcDeliverer(ch)
        try:
            return [await d.deliver_bulk(s, "path", its) for s, its in batches], d
        finally:
            await ch.close()
            await server.stop(None)

    return run(main())


def test_deliver_bulk_sends_one_bulk_request() -> None:
    app = BulkApp(answer={b"ok": Status.SUCCESS, b"again": Status.RETRY, b"gone": Status.DROP})
    batch = items("orders", "ok", "again", "gone", "unanswered", shared="yes")
    batch[0].envelope["custom"] = "ext"
    [results], _ = bulk_run(app, [(spec("orders"), batch)], app_token="app-secret")
    ids = [it.entry_id for it in batch]
    assert results == {
        ids[0]: ce.Result.SUCCESS,
        ids[1]: ce.Result.RETRY,
        ids[2]: ce.Result.DROP,
        ids[3]: ce.Result.RETRY,  # left out of the answer
    }
    ((name, req, md),) = app.calls
    assert name == "bulk"
    assert str(uuid.UUID(req.id)) == req.id
    assert (req.type, req.topic, req.pubsub_name, req.path) == (
        "com.dapr.event.sent.bulk",
        "orders",
        "pubsub",
        "path",
    )
    # What every entry shares is the request's metadata, and goes as gRPC metadata.
    assert dict(req.metadata) == {"pubsubName": "pubsub", "shared": "yes"}
    assert (md["pubsubname"], md["shared"], md["dapr-api-token"]) == ("pubsub", "yes", "app-secret")
    assert md["traceparent"] == TRACEPARENT and "n" not in md
    assert [e.entry_id for e in req.entries] == ids
    first = req.entries[0]
    assert first.content_type == "application/cloudevents+json"
    assert dict(first.metadata) == {"pubsubName": "pubsub", "n": "0", "shared": "yes"}
    ev = first.cloud_event
    env = batch[0].envelope
    assert (ev.id, ev.source, ev.type, ev.spec_version, ev.data_content_type, ev.data) == (
        env["id"],
        "publisher",
        "com.dapr.event.sent",
        "1.0",
        "text/plain",
        b"ok",
    )
    ext = dict(ev.extensions)
    assert (ext["topic"], ext["pubsubname"], ext["custom"]) == ("orders", "pubsub", "ext")
    assert ext["traceparent"] == TRACEPARENT and "time" in ext
    assert not {"id", "source", "type", "specversion", "datacontenttype", "data"} & set(ext)


def test_deliver_bulk_raw_payload_and_undecodable_entries() -> None:
    app = BulkApp(answer={b"\x00raw": Status.SUCCESS, b"fine": Status.SUCCESS})
    raw_spec = SubscriptionSpec(
        "pubsub", "raw", Routes([], "", leading_slash=False), {"rawPayload": "true"}
    )
    raw = ce.raw_envelope(b"\x00raw", topic="raw", pubsub="pubsub", metadata={})
    bad, good = items("orders", "bad", "fine")
    bad.envelope.pop("data")
    bad.envelope["data_base64"] = "not base64!"
    [raw_results, mixed], _ = bulk_run(
        app,
        [
            (raw_spec, [BulkItem("r", raw, {"pubsubName": "pubsub"})]),
            (spec("orders"), [bad, good]),
        ],
    )
    assert raw_results == {"r": ce.Result.SUCCESS}
    entry = app.calls[0][1].entries[0]
    assert entry.WhichOneof("event") == "bytes"
    assert (entry.bytes, entry.content_type) == (b"\x00raw", "application/octet-stream")
    # The entry that cannot be sent is retried; the rest of the batch goes.
    assert mixed == {bad.entry_id: ce.Result.RETRY, good.entry_id: ce.Result.SUCCESS}
    assert [e.entry_id for e in app.calls[1][1].entries] == [good.entry_id]


def test_deliver_bulk_falls_back_to_the_alpha_call() -> None:
    app = BulkApp(bulk=False, answer={b"a": Status.SUCCESS, b"b": Status.DROP})
    s = spec("orders")
    (first, second), d = bulk_run(app, [(s, items("orders", "a")), (s, items("orders", "b"))])
    assert list(first.values()) == [ce.Result.SUCCESS]
    assert list(second.values()) == [ce.Result.DROP]
    # The stable call is probed once; later batches go straight to the alpha one.
    assert app.names() == ["bulk", "alpha", "alpha"]
    assert d.bulk_methods == ("/dapr.proto.runtime.v1.AppCallbackAlpha/OnBulkTopicEventAlpha1",)


def test_deliver_bulk_falls_back_to_single_events() -> None:
    app = BulkApp(bulk=False, alpha=False, answer={b"x": Status.RETRY})
    s = spec("orders")
    first_batch, second_batch = items("orders", "x", "y"), items("orders", "z")
    # One concurrency slot: the fallback must not hold it while the single calls need it.
    (first, second), d = bulk_run(
        app, [(s, first_batch), (s, second_batch)], max_concurrency=1, app_token="tok"
    )
    assert first == {
        first_batch[0].entry_id: ce.Result.RETRY,
        first_batch[1].entry_id: ce.Result.SUCCESS,
    }
    assert second == {second_batch[0].entry_id: ce.Result.SUCCESS}
    # Probed once; remembered for this app, so the second batch goes one by one at once.
    assert app.names() == ["bulk", "alpha", "single", "single", "single"]
    assert d.bulk_methods == ()
    single = app.calls[2]
    assert single[1].path == "path" and single[2]["dapr-api-token"] == "tok"


def test_deliver_bulk_errors_retry_every_entry() -> None:
    app = BulkApp(fail=grpc.StatusCode.INTERNAL)
    batch = items("orders", "a", "b")
    [results], d = bulk_run(app, [(spec("orders"), batch)])
    assert results == dict.fromkeys([it.entry_id for it in batch], ce.Result.RETRY)
    assert app.names() == ["bulk"]  # no fallback for errors other than UNIMPLEMENTED
    assert len(d.bulk_methods) == 2

    async def elsewhere() -> tuple[dict[str, ce.Result], dict[str, ce.Result]]:
        unhealthy = GrpcAppChannel(HOST, free_port())
        unhealthy.healthy = False
        gone = GrpcAppChannel(HOST, free_port())
        try:
            return (
                await GrpcDeliverer(unhealthy).deliver_bulk(spec("orders"), "", batch),
                await GrpcDeliverer(gone).deliver_bulk(spec("orders"), "", batch),
            )
        finally:
            await unhealthy.close()
            await gone.close()

    every_retry = dict.fromkeys([it.entry_id for it in batch], ce.Result.RETRY)
    assert run(elsewhere()) == (every_retry, every_retry)


def test_deliver_bulk_to_the_sdk_app(sdk_app: int) -> None:
    """The official SDK's App implements OnBulkTopicEvent: its handlers see each entry."""

    async def main() -> tuple[list[dict[str, ce.Result]], list[dict[str, Any]], tuple[str, ...]]:
        ch = GrpcAppChannel(HOST, sdk_app)
        d = GrpcDeliverer(ch)
        try:
            out = [
                await d.deliver_bulk(spec(topic), "", items(topic, f"bulk-{topic}-1", "x"))
                for topic in ("orders", "success", "retry", "drop", "fail")
            ]
            return out, await seen(ch), d.bulk_methods
        finally:
            await ch.close()

    results, events, methods = run(main())
    assert [set(r.values()) for r in results] == [
        {ce.Result.SUCCESS},
        {ce.Result.SUCCESS},
        {ce.Result.RETRY},
        {ce.Result.DROP},
        {ce.Result.RETRY},  # the handler raised
    ]
    assert methods[0] == "/dapr.proto.runtime.v1.AppCallback/OnBulkTopicEvent"
    got = next(e for e in events if e["data"] == "bulk-orders-1")
    assert (got["handler"], got["topic"], got["pubsub"], got["type"]) == (
        "orders",
        "orders",
        "pubsub",
        "com.dapr.event.sent",
    )
    assert got["extensions"]["traceparent"] == TRACEPARENT
    assert (got["metadata"]["pubsubName"], got["metadata"]["n"]) == ("pubsub", "0")


def test_block_bulk_subscription_batches_to_the_app() -> None:
    """A bulkSubscribe subscription on the in-memory broker reaches OnBulkTopicEvent in batches."""
    app = BulkApp(answer={f"m{i}".encode(): Status.SUCCESS for i in range(6)})

    async def main() -> None:
        server, port = await serve(app)
        broker = InMemoryPubSub()
        await broker.init(ComponentInfo("pubsub", "pubsub.in-memory", "v1", "app", Properties()))
        block = PubSubBlock("app", {"pubsub": PubSubEntry("pubsub", broker, ce.TopicScopes({}))})
        ch = GrpcAppChannel(HOST, port)
        s = SubscriptionSpec(
            "pubsub",
            "batched",
            Routes([], "", leading_slash=False),
            bulk=BulkSubscribe(enabled=True, max_messages=10, max_await_ms=200),
        )
        try:
            assert await block.subscribe(s, GrpcDeliverer(ch))
            for i in range(6):
                await block.publish(
                    "pubsub", "batched", f"m{i}".encode(), content_type=None, metadata={}
                )
            deadline = time.monotonic() + 5
            while sum(len(r.entries) for _, r, _ in app.calls) < 6:
                assert time.monotonic() < deadline, app.calls
                await asyncio.sleep(0.02)
        finally:
            await block.stop()
            await broker.close()
            await ch.close()
            await server.stop(None)

    run(main())
    assert set(app.names()) == {"bulk"}
    assert max(len(r.entries) for _, r, _ in app.calls) > 1  # several events per call
    datas = sorted(e.cloud_event.data for _, r, _ in app.calls for e in r.entries)
    assert datas == [f"m{i}".encode() for i in range(6)]
