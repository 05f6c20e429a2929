"""Tests of the gRPC proxy: two in-process sidecars and an app, all real grpc.aio servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest
from dapr.proto.runtime.v1 import appcallback_pb2, appcallback_pb2_grpc
from google.protobuf import any_pb2, empty_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from pillion.api.grpc.proxy import GrpcProxy
from pillion.coordination.names import Address, AppNotFound

MAX = 8 * 1024 * 1024
NS = "default"


def run(coro: Awaitable[None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(10):
            await coro

    asyncio.run(bounded())


# --- the app behind sidecar B -----------------------------------------------------------------


@dataclass
class AppState:
    seen_metadata: list[dict[str, str]] = field(default_factory=list)
    slow_started: asyncio.Event = field(default_factory=asyncio.Event)
    slow_cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    slow_remaining: float | None = None
    bidi_ended: asyncio.Event = field(default_factory=asyncio.Event)


def _md(context: grpc.aio.ServicerContext) -> dict[str, str]:
    out = {}
    for k, v in context.invocation_metadata() or ():
        out[k] = v.hex() if isinstance(v, bytes) else v
    return out


class EchoApp(grpc.GenericRpcHandler):
    """`test.Echo` over raw bytes, each method with its real cardinality."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        service, _, name = details.method.rpartition("/")
        if service != "/test.Echo":
            return None
        handlers: dict[str, Callable[[Any], grpc.RpcMethodHandler]] = {
            "Unary": grpc.unary_unary_rpc_method_handler,
            "Fail": grpc.unary_unary_rpc_method_handler,
            "Meta": grpc.unary_unary_rpc_method_handler,
            "Slow": grpc.unary_unary_rpc_method_handler,
            "ServerStream": grpc.unary_stream_rpc_method_handler,
            "ClientStream": grpc.stream_unary_rpc_method_handler,
            "Bidi": grpc.stream_stream_rpc_method_handler,
        }
        if name not in handlers:
            return None
        return handlers[name](getattr(self, name.lower().replace("stream", "_stream")))

    async def unary(self, req: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.state.seen_metadata.append(_md(context))
        return b"echo:" + req

    async def server_stream(self, req: bytes, context: grpc.aio.ServicerContext) -> Any:
        for i in range(int(req)):
            yield str(i).encode()

    async def client_stream(self, reqs: AsyncIterator[bytes], context: Any) -> bytes:
        return str(sum([int(r) async for r in reqs])).encode()

    async def bidi(self, reqs: AsyncIterator[bytes], context: Any) -> Any:
        try:
            async for r in reqs:
                yield b"re:" + r
        finally:
            # A cancelled call ends the request stream here (gRPC raises no CancelledError).
            self.state.bidi_ended.set()

    async def fail(self, req: bytes, context: grpc.aio.ServicerContext) -> bytes:
        detail = any_pb2.Any()
        detail.Pack(
            error_details_pb2.ErrorInfo(reason="OUT_OF_STOCK", domain="test", metadata={"k": "v"})
        )
        status = status_pb2.Status(
            code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
            message="no more widgets",
            details=[detail],
        )
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION,
            "no more widgets",
            (("grpc-status-details-bin", status.SerializeToString()), ("x-why", "stock")),
        )
        raise AssertionError("unreachable")

    async def meta(self, req: bytes, context: grpc.aio.ServicerContext) -> bytes:
        md = _md(context)
        self.state.seen_metadata.append(md)
        await context.send_initial_metadata((("x-initial", "i"), ("x-initial-bin", b"\x00\x01")))
        context.set_trailing_metadata((("x-trailing", "t"),))
        return json.dumps(md).encode()

    async def slow(self, req: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.state.slow_remaining = context.time_remaining()
        self.state.slow_started.set()
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            self.state.slow_cancelled.set()
            raise
        return b"late"


class AppCallback(appcallback_pb2_grpc.AppCallbackServicer):  # type: ignore[misc]
    """A servicer from generated code, to prove SDK-style stubs pass through untouched."""

    async def ListTopicSubscriptions(
        self, request: empty_pb2.Empty, context: Any
    ) -> appcallback_pb2.ListTopicSubscriptionsResponse:
        return appcallback_pb2.ListTopicSubscriptionsResponse(
            subscriptions=[appcallback_pb2.TopicSubscription(pubsub_name="ps", topic="orders")]
        )


# --- the mesh -----------------------------------------------------------------------------------


class FakeResolver:
    """app id -> sidecar gRPC address; `stale`, while set, is returned until an invalidation."""

    def __init__(self) -> None:
        self.apps: dict[tuple[str, str], Address] = {}
        self.stale: Address | None = None
        self.invalidated: list[tuple[str, str]] = []

    async def resolve_grpc(self, app_id: str, namespace: str = "") -> Address:
        if self.stale is not None:
            return self.stale
        try:
            return self.apps[(app_id, namespace)]
        except KeyError:
            raise AppNotFound(app_id, namespace) from None

    def invalidate(self, app_id: str, namespace: str = "") -> None:
        self.invalidated.append((app_id, namespace))
        self.stale = None


@dataclass
class Mesh:
    state: AppState
    resolver: FakeResolver
    a: grpc.aio.Channel  # a client of sidecar A (app "a", no app of its own)
    b: grpc.aio.Channel  # a client of sidecar B (app "b", the Echo app behind it)
    proxy_a: GrpcProxy
    dead_port: int


async def _server(
    *handlers: grpc.GenericRpcHandler, setup: Callable[[grpc.aio.Server], None] | None = None
) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX),
            ("grpc.max_receive_message_length", MAX),
        ]
    )
    server.add_generic_rpc_handlers(handlers)
    if setup is not None:
        setup(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def mesh() -> AsyncIterator[Mesh]:
    state = AppState()
    resolver = FakeResolver()
    app_server, app_port = await _server(
        EchoApp(state),
        setup=lambda s: appcallback_pb2_grpc.add_AppCallbackServicer_to_server(AppCallback(), s),
    )
    app_channel = grpc.aio.insecure_channel(f"127.0.0.1:{app_port}")
    proxy_b = GrpcProxy(
        app_id="b",
        namespace=NS,
        resolver=resolver,
        local_app=lambda: app_channel,
        max_message_size=MAX,
        app_token="app-secret",
    )
    proxy_a = GrpcProxy(
        app_id="a", namespace=NS, resolver=resolver, local_app=lambda: None, max_message_size=MAX
    )
    sidecar_b, port_b = await _server(proxy_b)
    sidecar_a, port_a = await _server(proxy_a)
    resolver.apps[("b", NS)] = Address("127.0.0.1", port_b)
    a = grpc.aio.insecure_channel(
        f"127.0.0.1:{port_a}", options=[("grpc.max_receive_message_length", MAX)]
    )
    b = grpc.aio.insecure_channel(f"127.0.0.1:{port_b}")
    try:
        yield Mesh(state, resolver, a, b, proxy_a, _free_port())
    finally:
        # Clients first, servers last, so no connection is cut under a live channel.
        for ch in (a, b):
            await ch.close()
        await proxy_a.close()
        await proxy_b.close()
        await app_channel.close()
        for s in (sidecar_a, sidecar_b, app_server):
            await s.stop(None)


TO_B = (("dapr-app-id", "b"),)


def unary(ch: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
    return ch.unary_unary(f"/test.Echo/{method}")


# --- tests --------------------------------------------------------------------------------------


def test_unary_goes_to_the_remote_app() -> None:
    async def main() -> None:
        async with mesh() as m:
            assert await unary(m.a, "Unary")(b"hi", metadata=TO_B) == b"echo:hi"
            big = b"x" * (3 * 1024 * 1024)  # above gRPC's 4 MiB default once echoed twice
            assert await unary(m.a, "Unary")(big, metadata=TO_B) == b"echo:" + big
            # The namespace may be written out, and dapr-callee-app-id selects the target too.
            assert await unary(m.a, "Unary")(b"1", metadata=(("dapr-app-id", "b.default"),))
            assert await unary(m.a, "Unary")(b"2", metadata=(("dapr-callee-app-id", "b"),))

    run(main())


def test_server_client_and_bidi_streams() -> None:
    async def main() -> None:
        async with mesh() as m:
            got = [
                r async for r in m.a.unary_stream("/test.Echo/ServerStream")(b"5", metadata=TO_B)
            ]
            assert got == [b"0", b"1", b"2", b"3", b"4"]

            total = await m.a.stream_unary("/test.Echo/ClientStream")(
                iter([b"1", b"2", b"39"]), metadata=TO_B
            )
            assert total == b"42"

            # Lock-step: each answer must arrive before the next request is sent, which only
            # works if the proxy pumps requests while it relays responses.
            call = m.a.stream_stream("/test.Echo/Bidi")(metadata=TO_B)
            for word in (b"one", b"two", b"three"):
                await call.write(word)
                assert await call.read() == b"re:" + word
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK

    run(main())


def test_metadata_passes_both_ways() -> None:
    async def main() -> None:
        async with mesh() as m:
            call = unary(m.a, "Meta")(
                b"",
                metadata=(
                    *TO_B,
                    ("x-custom", "c"),
                    ("x-blob-bin", b"\xff\x00"),
                    ("dapr-api-token", "caller-secret"),
                    ("dapr-caller-app-id", "spoofed"),
                ),
            )
            seen = json.loads(await call)
            assert seen["x-custom"] == "c"
            assert seen["x-blob-bin"] == "ff00"
            assert seen["dapr-app-id"] == "b"
            assert seen["dapr-caller-app-id"] == "a"
            assert seen["dapr-callee-app-id"] == "b"
            # The caller's token was for its sidecar; the app gets its own.
            assert seen["dapr-api-token"] == "app-secret"
            assert "pillion-grpc-proxied" not in seen
            initial = dict(await call.initial_metadata())
            assert initial["x-initial"] == "i"
            assert initial["x-initial-bin"] == b"\x00\x01"
            assert dict(await call.trailing_metadata())["x-trailing"] == "t"

    run(main())


def test_errors_keep_code_details_and_rich_status() -> None:
    async def main() -> None:
        async with mesh() as m:
            call = unary(m.a, "Fail")(b"", metadata=TO_B)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.details() == "no more widgets"
            trailing = err.value.trailing_metadata()
            assert dict(trailing)["x-why"] == "stock"
            status = rpc_status.from_call(err.value)
            assert status is not None and status.message == "no more widgets"
            info = error_details_pb2.ErrorInfo()
            assert status.details[0].Unpack(info)
            assert (info.reason, info.domain, dict(info.metadata)) == (
                "OUT_OF_STOCK",
                "test",
                {"k": "v"},
            )

            # An app method that does not exist: the app's own UNIMPLEMENTED comes back.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(m.a, "Nope")(b"", metadata=TO_B)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

    run(main())


def test_deadline_reaches_the_app() -> None:
    async def main() -> None:
        async with mesh() as m:
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(m.a, "Slow")(b"", metadata=TO_B, timeout=0.5)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - t0 < 2
            remaining = m.state.slow_remaining
            # gRPC rounds the grpc-timeout header up, so allow a little over the caller's 0.5 s.
            assert remaining is not None and 0 < remaining < 0.6
            async with asyncio.timeout(2):
                await m.state.slow_cancelled.wait()

    run(main())


def test_cancellation_by_the_caller_cancels_the_app_call() -> None:
    async def main() -> None:
        async with mesh() as m:
            call = unary(m.a, "Slow")(b"", metadata=TO_B)
            async with asyncio.timeout(2):
                await m.state.slow_started.wait()
            assert m.state.slow_remaining is None  # no deadline given, none invented
            call.cancel()
            async with asyncio.timeout(2):
                await m.state.slow_cancelled.wait()

            # A stream cancelled midway: the app's handler ends too, though the stream is open.
            bidi = m.a.stream_stream("/test.Echo/Bidi")(metadata=TO_B)
            await bidi.write(b"x")
            assert await bidi.read() == b"re:x"
            assert not m.state.bidi_ended.is_set()
            bidi.cancel()
            async with asyncio.timeout(2):
                await m.state.bidi_ended.wait()

    run(main())


def test_local_delivery_injects_the_app_token() -> None:
    async def main() -> None:
        async with mesh() as m:
            md = (*TO_B, ("dapr-api-token", "caller-secret"))
            seen = json.loads(await unary(m.b, "Meta")(b"", metadata=md))
            assert seen["dapr-api-token"] == "app-secret"
            assert "dapr-caller-app-id" not in seen
            assert m.resolver.invalidated == []

    run(main())


def test_sidecar_without_an_app_channel() -> None:
    async def main() -> None:
        async with mesh() as m:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(m.a, "Unary")(b"", metadata=(("dapr-app-id", "a"),))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "app channel is not initialized" in (err.value.details() or "")

    run(main())


def test_unknown_app_bad_id_and_no_app_id() -> None:
    async def main() -> None:
        async with mesh() as m:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(m.a, "Unary")(b"", metadata=(("dapr-app-id", "ghost"),))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert err.value.details() == "failed to proxy request: couldn't find service: ghost"

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(m.a, "Unary")(b"", metadata=(("dapr-app-id", "b.x.y"),))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(m.a, "Unary")(b"")
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

    run(main())


def test_a_proxied_hop_is_never_forwarded_again() -> None:
    async def main() -> None:
        async with mesh() as m:
            # As if a stale registry entry sent another sidecar's call for "b" to sidecar A.
            md = (*TO_B, ("pillion-grpc-proxied", "1"))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(m.a, "Unary")(b"", metadata=md)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

    run(main())


def test_connect_failure_invalidates_and_retries_once() -> None:
    async def main() -> None:
        async with mesh() as m:
            dead = Address("127.0.0.1", m.dead_port)
            m.resolver.stale = dead
            assert await unary(m.a, "Unary")(b"again", metadata=TO_B) == b"echo:again"
            assert m.resolver.invalidated == [("b", NS)]

            m.resolver.stale = dead
            got = [
                r async for r in m.a.unary_stream("/test.Echo/ServerStream")(b"2", metadata=TO_B)
            ]
            assert got == [b"0", b"1"]

            # A bidi call fails over while it has sent one message: that one is replayed.
            m.resolver.stale = dead
            call = m.a.stream_stream("/test.Echo/Bidi")(metadata=TO_B)
            for word in (b"one", b"two"):
                await call.write(word)
                assert await call.read() == b"re:" + word
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
            assert len(m.resolver.invalidated) == 3

            # Both attempts dead: UNAVAILABLE, naming the target.
            m.resolver.apps[("b", NS)] = dead
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unary(m.a, "Unary")(b"", metadata=TO_B)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert (err.value.details() or "").startswith("failed to proxy request: b at")

    run(main())


def test_generated_stub_through_the_proxy() -> None:
    async def main() -> None:
        async with mesh() as m:
            stub = appcallback_pb2_grpc.AppCallbackStub(m.a)
            resp = await stub.ListTopicSubscriptions(empty_pb2.Empty(), metadata=TO_B)
            assert [(s.pubsub_name, s.topic) for s in resp.subscriptions] == [("ps", "orders")]

    run(main())


def test_many_concurrent_calls_share_one_channel() -> None:
    async def main() -> None:
        async with mesh() as m:
            calls = [unary(m.a, "Unary")(str(i).encode(), metadata=TO_B) for i in range(50)]
            got = await asyncio.gather(*calls)
            assert got == [b"echo:%d" % i for i in range(50)]
            assert len(m.proxy_a._channels) == 1

    run(main())


def test_concurrent_calls_all_fail_over_from_a_dead_address() -> None:
    async def main() -> None:
        async with mesh() as m:
            # Calls share the dead address's channel until one invalidates it and drops the
            # channel; none may be cancelled by another's eviction instead of failing over.
            m.resolver.stale = Address("127.0.0.1", m.dead_port)
            calls = [unary(m.a, "Unary")(b"%d" % i, metadata=TO_B) for i in range(20)]
            got = await asyncio.gather(*calls)
            assert got == [b"echo:%d" % i for i in range(20)]
            assert m.resolver.invalidated
            assert list(m.proxy_a._channels) == [str(m.resolver.apps[("b", NS)])]

    run(main())
