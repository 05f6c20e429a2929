"""Pub/sub with a gRPC app: discovery and OnTopicEvent delivery against the official SDK's App."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import grpc.aio
import pytest

from pillion.blocks import cloudevents as ce
from pillion.blocks.pubsub import Delivery, PubSubBlock, PubSubEntry, SubscriptionSpec
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
