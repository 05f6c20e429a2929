"""Metadata, shutdown, the UNIMPLEMENTED answers, and the server's token check and limits."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from dapr.proto.runtime.v1 import dapr_pb2, dapr_pb2_grpc, metadata_pb2, pubsub_pb2
from google.protobuf import empty_pb2

from pillion.api.grpc.dapr_api import DaprApi, block_of
from pillion.api.grpc.server import start_grpc_server
from tests.unit.grpc.conftest import GrpcSidecar

Stub = dapr_pb2_grpc.DaprStub
IMPLEMENTED = {
    "GetState",
    "GetBulkState",
    "SaveState",
    "DeleteState",
    "DeleteBulkState",
    "ExecuteStateTransaction",
    "QueryStateAlpha1",
    "GetMetadata",
    "SetMetadata",
    "Shutdown",
    "InvokeService",
    "PublishEvent",
    "BulkPublishEvent",
    "BulkPublishEventAlpha1",
    "SubscribeTopicEventsAlpha1",
    "TryLockAlpha1",
    "UnlockAlpha1",
    "GetSecret",
    "GetBulkSecret",
    "InvokeBinding",
    "GetConfiguration",
    "GetConfigurationAlpha1",
    "SubscribeConfiguration",
    "SubscribeConfigurationAlpha1",
    "UnsubscribeConfiguration",
    "UnsubscribeConfigurationAlpha1",
}
DAPR_SERVICE = dapr_pb2.DESCRIPTOR.services_by_name["Dapr"]


def test_get_metadata(sidecar: GrpcSidecar) -> None:
    resp = sidecar.run(lambda stub: stub.GetMetadata(metadata_pb2.GetMetadataRequest()))
    assert resp.id == "app"
    assert resp.runtime_version
    assert list(resp.enabled_features) == ["HotReload"]
    (comp,) = resp.registered_components
    assert (comp.name, comp.type, comp.version, list(comp.capabilities)) == (
        "statestore",
        "state.in-memory",
        "v1",
        ["ETAG", "TRANSACTIONAL"],
    )
    assert resp.extended_metadata["daprRuntimeVersion"] == resp.runtime_version
    props = resp.app_connection_properties
    assert (props.port, props.protocol, props.channel_address) == (8080, "http", "127.0.0.1")
    assert (
        props.health.health_check_path,
        props.health.health_probe_interval,
        props.health.health_probe_timeout,
        props.health.health_threshold,
    ) == ("/healthz", "5s", "500ms", 3)
    assert resp.actor_runtime.runtime_status == metadata_pb2.ActorRuntime.DISABLED


def test_get_metadata_accepts_an_empty_message(sidecar: GrpcSidecar) -> None:
    # The SDK sends google.protobuf.Empty; on the wire that is an empty GetMetadataRequest.
    async def main(stub: Stub) -> metadata_pb2.GetMetadataResponse:
        async with grpc.aio.insecure_channel(sidecar.address) as ch:
            call = ch.unary_unary(
                "/dapr.proto.runtime.v1.Dapr/GetMetadata",
                request_serializer=empty_pb2.Empty.SerializeToString,
                response_deserializer=metadata_pb2.GetMetadataResponse.FromString,
            )
            return await call(empty_pb2.Empty())

    assert sidecar.run(main).id == "app"


def test_set_metadata_shows_in_extended(sidecar: GrpcSidecar) -> None:
    async def main(stub: Stub) -> metadata_pb2.GetMetadataResponse:
        await stub.SetMetadata(metadata_pb2.SetMetadataRequest(key="team", value="blue"))
        return await stub.GetMetadata(metadata_pb2.GetMetadataRequest())

    assert sidecar.run(main).extended_metadata["team"] == "blue"


def test_shutdown_calls_the_callback(sidecar: GrpcSidecar) -> None:
    before = sidecar.shutdowns
    sidecar.run(lambda stub: stub.Shutdown(dapr_pb2.ShutdownRequest()))
    assert sidecar.shutdowns == before + 1


def test_every_other_rpc_names_its_block() -> None:
    names = [m.name for m in DAPR_SERVICE.methods]
    assert set(names) >= IMPLEMENTED
    unmapped = [n for n in names if n not in IMPLEMENTED and block_of(n) is None]
    assert unmapped == []
    assert {n: block_of(n) for n in ("ScheduleJobAlpha1", "SearchAlpha1")} == {
        "ScheduleJobAlpha1": "jobs",
        "SearchAlpha1": "search",
    }
    # The servicer answers every RPC itself (nothing falls back to the stubs' sync default).
    for n in names:
        assert asyncio.iscoroutinefunction(getattr(DaprApi, n)), n


def test_every_unimplemented_rpc_answers_promptly(sidecar: GrpcSidecar) -> None:
    async def main(stub: Stub) -> dict[str, tuple[grpc.StatusCode, str]]:
        out: dict[str, tuple[grpc.StatusCode, str]] = {}
        async with grpc.aio.insecure_channel(sidecar.address) as ch:
            for m in DAPR_SERVICE.methods:
                if m.name in IMPLEMENTED:
                    continue
                path = f"/dapr.proto.runtime.v1.Dapr/{m.name}"
                if m.client_streaming and m.server_streaming:
                    call = ch.stream_stream(path)(timeout=5)
                elif m.client_streaming:
                    call = ch.stream_unary(path)(timeout=5)
                elif m.server_streaming:
                    call = ch.unary_stream(path)(b"", timeout=5)
                else:
                    call = ch.unary_unary(path)(b"", timeout=5)
                out[m.name] = (await call.code(), await call.details())
        return out

    results = sidecar.run(main)
    assert len(results) == len(DAPR_SERVICE.methods) - len(IMPLEMENTED)
    for name, (code, details) in results.items():
        assert code == grpc.StatusCode.UNIMPLEMENTED, name
        assert details == f"the {block_of(name)} API is not implemented in this version of pillion"
    assert results["GetJobAlpha1"][1].startswith("the jobs API")
    assert results["ScheduleJobAlpha1"][1].startswith("the jobs API")


def test_publish_over_the_stub_is_unimplemented(sidecar: GrpcSidecar) -> None:
    async def main(stub: Stub) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.PublishEvent(pubsub_pb2.PublishEventRequest(pubsub_name="p", topic="t"))
        return info.value

    err = sidecar.run(main)
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert err.details() == "the pub/sub API is not implemented in this version of pillion"


# --- server --------------------------------------------------------------------------------------


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"echo:" + request


ECHO = grpc.method_handlers_generic_handler(
    "test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(_echo)}
)


def _codes(sidecar: GrpcSidecar, md: tuple[tuple[str, str], ...]) -> dict[str, object]:
    async def main(stub: Stub) -> dict[str, object]:
        out: dict[str, object] = {}
        async with grpc.aio.insecure_channel(sidecar.address) as ch:
            calls = {
                "unary": ch.unary_unary("/dapr.proto.runtime.v1.Dapr/GetMetadata")(
                    b"", metadata=md, timeout=5
                ),
                "stream": ch.stream_stream(
                    "/dapr.proto.runtime.v1.Dapr/SubscribeTopicEventsAlpha1"
                )(metadata=md, timeout=5),
                "proxied": ch.unary_unary("/test.Echo/Say")(b"hi", metadata=md, timeout=5),
            }
            for name, call in calls.items():
                out[name] = await call.code()
                out[name + ".details"] = await call.details()
            if out["proxied"] == grpc.StatusCode.OK:
                out["echo"] = await calls["proxied"]
        return out

    return sidecar.run(main)


def test_api_token_is_required_on_every_call() -> None:
    with GrpcSidecar(api_token="s3cret", generic_handlers=[ECHO]) as sc:
        missing = _codes(sc, ())
        assert (
            missing["unary"]
            == missing["stream"]
            == missing["proxied"]
            == (grpc.StatusCode.UNAUTHENTICATED)
        )
        assert missing["unary.details"] == "missing api token in request metadata"
        wrong = _codes(sc, (("dapr-api-token", "nope"),))
        assert (
            wrong["unary"]
            == wrong["stream"]
            == wrong["proxied"]
            == (grpc.StatusCode.UNAUTHENTICATED)
        )
        assert wrong["proxied.details"] == "authentication error: api token mismatch"
        right = _codes(sc, (("dapr-api-token", "s3cret"),))
        assert right["unary"] == grpc.StatusCode.OK
        assert right["stream"] == grpc.StatusCode.UNIMPLEMENTED
        assert right["proxied"] == grpc.StatusCode.OK
        assert right["echo"] == b"echo:hi"


def test_generic_handlers_serve_other_services_without_a_token() -> None:
    with GrpcSidecar(generic_handlers=[ECHO]) as sc:
        out = _codes(sc, ())
        assert out["echo"] == b"echo:hi"
        assert out["unary"] == grpc.StatusCode.OK


def test_port_in_use_is_an_error() -> None:
    async def main() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            api = DaprApi.__new__(DaprApi)
            with pytest.raises(OSError, match="cannot listen"):
                await start_grpc_server(
                    api, host="127.0.0.1", port=port, max_message_size=1024, api_token=None
                )

    asyncio.run(main())


def test_message_size_limit() -> None:
    async def main(stub: Stub) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SetMetadata(metadata_pb2.SetMetadataRequest(key="k", value="x" * (5 << 20)))
        return info.value.code()

    with GrpcSidecar() as sc:
        assert sc.run(main) == grpc.StatusCode.RESOURCE_EXHAUSTED
