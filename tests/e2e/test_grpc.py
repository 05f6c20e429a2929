"""Dapr's gRPC API end to end: the official SDK over gRPC, gRPC apps, and gRPC proxying."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from dapr.clients import DaprClient
from dapr.clients.exceptions import DaprGrpcError
from dapr.clients.grpc._request import TransactionalStateOperation, TransactionOperationType
from dapr.clients.grpc._state import StateItem

from pillion.testing.procs import Proc, Sidecar, free_port, start_sidecar
from tests.e2e.conftest import APPS, Pair, call


@dataclass
class GrpcApps:
    gapp: Sidecar
    streamer: Sidecar
    procs: list[Proc]


def _grpc_app(name: str, script: str, home: Path, resources: Path) -> tuple[Proc, Sidecar]:
    port = free_port()
    app = Proc.start(f"app {name}", [sys.executable, str(APPS / script), str(port)])
    app.wait_for_line("listening", 15)
    sc = start_sidecar(
        name,
        home=home,
        resources=[resources],
        app_port=port,
        extra=["--app-protocol", "grpc"],
        wait="ready",
    )
    return app, sc


@pytest.fixture(scope="module")
def gapps(home: Path, resources: Path) -> Iterator[GrpcApps]:
    a1, s1 = _grpc_app("gapp", "grpc_app.py", home, resources)
    a2, s2 = _grpc_app("streamer", "grpc_streamer.py", home, resources)
    yield GrpcApps(s1, s2, [a1, s1.proc, a2, s2.proc])
    for p in (s1.proc, s2.proc, a1, a2):
        p.stop()


@pytest.fixture
def client(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> Iterator[DaprClient]:
    monkeypatch.setenv("DAPR_HTTP_PORT", str(pair.alpha.http_port))
    monkeypatch.setenv("DAPR_GRPC_PORT", str(pair.alpha.grpc_port))
    with DaprClient() as d:
        yield d


def test_sdk_state_over_grpc(client: DaprClient) -> None:
    client.save_state("statestore", "g1", "v1")
    item = client.get_state("statestore", "g1")
    assert item.data == b"v1" and item.etag
    client.save_state("statestore", "g1", "v2", etag=item.etag)
    with pytest.raises(DaprGrpcError) as ei:
        client.save_state("statestore", "g1", "v3", etag=item.etag)
    assert ei.value.code() == grpc.StatusCode.ABORTED
    assert ei.value.error_code() == "ERR_STATE_SAVE"
    assert client.get_state("statestore", "g1").data == b"v2"
    client.save_bulk_state("statestore", [StateItem("b1", "x"), StateItem("b2", "y")])
    client.execute_state_transaction(
        "statestore",
        [
            TransactionalStateOperation(key="t1", data="a"),
            TransactionalStateOperation(key="g1", operation_type=TransactionOperationType.delete),
        ],
    )
    bulk = client.get_bulk_state("statestore", ["t1", "g1"]).items
    assert [(b.key, b.data) for b in bulk] == [("t1", b"a"), ("g1", b"")]
    client.delete_state("statestore", "t1")
    assert client.get_state("statestore", "t1").data == b""


def test_sdk_grpc_errors(client: DaprClient) -> None:
    with pytest.raises(DaprGrpcError) as ei:
        client.get_state("nostore", "k")
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ei.value.error_code() == "DAPR_STATE_NOT_FOUND"
    with pytest.raises(DaprGrpcError) as ei:
        client.save_state("statestore", "a||b", "x")
    assert ei.value.error_code() == "DAPR_STATE_ILLEGAL_KEY"
    with pytest.raises(grpc.RpcError) as rpc_err:
        client.get_job("nojob")
    assert rpc_err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(DaprGrpcError) as ei:
        client.publish_event("pubsub", "topic", b"{}")  # no pubsub component in these resources
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ei.value.error_code() == "DAPR_PUBSUB_NOT_CONFIGURED"


def test_sdk_metadata_over_grpc(client: DaprClient) -> None:
    md = client.get_metadata()
    assert md.application_id == "alpha"
    names = {c.name: c for c in md.registered_components}
    assert names["statestore"].type == "state.sqlite"
    client.set_metadata("k", "v")
    assert client.get_metadata().extended_metadata["k"] == "v"


def test_invoke_http_app_over_grpc(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAPR_HTTP_PORT", str(pair.alpha.http_port))
    monkeypatch.setenv("DAPR_GRPC_PORT", str(pair.alpha.grpc_port))
    monkeypatch.setenv("DAPR_API_METHOD_INVOCATION_PROTOCOL", "grpc")
    with DaprClient() as d:
        r = d.invoke_method(
            "beta", "orders", data=b"hi", http_verb="PUT", http_querystring=(("q", "1"),)
        )
        echo = json.loads(r.data)
        assert (echo["method"], echo["path"], echo["query"], echo["body"]) == (
            "PUT",
            "/orders",
            "q=1",
            "hi",
        )
        assert echo["headers"]["dapr-caller-app-id"] == "alpha"
        with pytest.raises(grpc.RpcError) as ei:
            d.invoke_method("beta", "orders", data=b"hi")  # no verb: HTTP apps need one
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as ei:
            d.invoke_method("beta", "status/404", data=b"", http_verb="GET")
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND


def test_invoke_grpc_app(pair: Pair, gapps: GrpcApps, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAPR_HTTP_PORT", str(pair.alpha.http_port))
    monkeypatch.setenv("DAPR_GRPC_PORT", str(pair.alpha.grpc_port))
    # over HTTP (the SDK's default)
    with DaprClient() as d:
        r = d.invoke_method(
            "gapp", "echo", data=b"from-http", http_verb="POST", content_type="text/plain"
        )
        echo = json.loads(r.data)
        assert echo["data"] == "from-http"
        assert echo["content_type"] == "text/plain"
        assert echo["metadata"]["dapr-caller-app-id"] == "alpha"
    # over gRPC InvokeService
    monkeypatch.setenv("DAPR_API_METHOD_INVOCATION_PROTOCOL", "grpc")
    with DaprClient() as d:
        r = d.invoke_method("gapp", "echo", data=b"from-grpc", content_type="text/plain")
        assert json.loads(r.data)["data"] == "from-grpc"
        with pytest.raises(grpc.RpcError) as ei:
            d.invoke_method("gapp", "fail", data=b"")
        assert ei.value.code() == grpc.StatusCode.UNKNOWN
        with pytest.raises(grpc.RpcError) as ei:
            d.invoke_method("gapp", "nosuchmethod", data=b"")
        assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # The callee sidecar counted its calls to the gRPC app (dapr_grpc_io_client_*).
    page = call(gapps.gapp.metrics_port, "GET", "/metrics").body.decode()
    on_invoke = 'grpc_client_method="/dapr.proto.runtime.v1.AppCallback/OnInvoke"'
    lines = [x for x in page.splitlines() if x.startswith("dapr_grpc_io_client_completed_rpcs{")]
    assert any(on_invoke in x and 'grpc_client_status="OK"' in x for x in lines), lines
    assert any(on_invoke in x and 'grpc_client_status="Unimplemented"' in x for x in lines), lines


def test_grpc_app_errors_over_http(pair: Pair, gapps: GrpcApps) -> None:
    from tests.e2e.conftest import call

    r = call(pair.alpha.http_port, "POST", "/v1.0/invoke/gapp/method/fail", body="")
    assert r.status == 500
    assert "the app failed on purpose" in r.json()["message"]
    r = call(pair.alpha.http_port, "POST", "/v1.0/invoke/gapp/method/nope", body="")
    assert r.status == 501


def test_grpc_proxy_streaming(pair: Pair, gapps: GrpcApps) -> None:
    md = (("dapr-app-id", "streamer"),)
    with grpc.insecure_channel(f"127.0.0.1:{pair.alpha.grpc_port}") as ch:
        unary = ch.unary_unary("/test.Streamer/Unary")
        resp, call = unary.with_call(b"ping", metadata=md, timeout=10)
        assert resp == b"echo:ping from:alpha"
        assert ("x-app", "streamer") in tuple(call.initial_metadata())
        count = ch.unary_stream("/test.Streamer/Count")
        assert list(count(b"5", metadata=md, timeout=10)) == [b"0", b"1", b"2", b"3", b"4"]
        chat = ch.stream_stream("/test.Streamer/Chat")
        out = list(chat(iter([b"a", b"b", b"c"]), metadata=md, timeout=10))
        assert out == [b"A", b"B", b"C"]
        fail = ch.unary_unary("/test.Streamer/Fail")
        with pytest.raises(grpc.RpcError) as ei:
            fail(b"", metadata=md, timeout=10)
        assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert ei.value.details() == "not today"
        with pytest.raises(grpc.RpcError) as ei:
            unary(b"x", metadata=(("dapr-app-id", "ghost"),), timeout=10)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as ei:
            unary(b"x", timeout=10)  # no dapr-app-id: not a proxied call
        assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_grpc_api_token(home: Path, resources: Path) -> None:
    sc = start_sidecar("tokened", home=home, resources=[resources], env={"DAPR_API_TOKEN": "t0k"})
    try:
        from dapr.proto.runtime.v1 import dapr_pb2_grpc, metadata_pb2

        with grpc.insecure_channel(f"127.0.0.1:{sc.grpc_port}") as ch:
            stub = dapr_pb2_grpc.DaprStub(ch)
            with pytest.raises(grpc.RpcError) as ei:
                stub.GetMetadata(metadata_pb2.GetMetadataRequest(), timeout=5)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            md = stub.GetMetadata(
                metadata_pb2.GetMetadataRequest(), timeout=5, metadata=(("dapr-api-token", "t0k"),)
            )
            assert md.id == "tokened"
    finally:
        sc.proc.stop()
