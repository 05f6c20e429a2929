"""Exporters against real collectors on 127.0.0.1, and their Configuration parsing."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
import pytest
import uvloop
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from pillion.observability.exporters import (
    DEFAULT_TIMEOUT,
    OtlpGrpcExporter,
    OtlpHttpExporter,
    StdoutExporter,
    ZipkinExporter,
    exporters_from_config,
    parse_headers,
)
from pillion.observability.tracing import CLIENT, INTERNAL, SERVER, Span, SpanContext, Tracer
from pillion.transport.http import Request, Response
from pillion.transport.server import HttpServer
from tests.polling import until

T = TypeVar("T")
HOST = "127.0.0.1"
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
TRACE_ID = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run a coroutine to completion on a fresh loop of the parametrised kind, bounded."""
    factory = LOOPS[request.param]

    def _run(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(asyncio.wait_for(coro, 30))

    return _run


Run = Callable[[Coroutine[Any, Any, Any]], Any]


def free_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def make_spans() -> list[Span]:
    """A server span with attributes and a failed client child."""
    server = Span(
        None,
        "/v1.0/state/statestore",
        SpanContext(TRACE_ID, bytes.fromhex("00f067aa0ba902b7"), True).traceparent,
        "rojo=1",
        b"",
        SERVER,
        1_700_000_000_000_000_000,
    )
    server.set("dapr.api", "GET /v1.0/state/statestore")
    server.set("dapr.status_code", 200)
    server.set("ok", True)
    server.set("ratio", 0.5)
    server.end_ns = 1_700_000_000_002_500_000
    client = Span(
        None,
        "CallLocal/other/method",
        SpanContext(TRACE_ID, bytes.fromhex("1122334455667788"), True).traceparent,
        "",
        server.traceparent[36:52],
        CLIENT,
        1_700_000_000_000_100_000,
    )
    client.end("connection refused")
    return [server, client]


class Collector:
    """An HTTP server recording every request (OTLP /v1/traces and Zipkin /api/v2/spans)."""

    def __init__(self, status: int = 200) -> None:
        self.requests: list[Request] = []
        self.status = status
        self._server = HttpServer(self._handle)
        self.port = 0

    async def _handle(self, request: Request) -> Response:
        self.requests.append(request)
        return Response(self.status, [], b"")

    async def start(self) -> int:
        self.port = await self._server.start(HOST, 0)
        return self.port

    async def close(self) -> None:
        await self._server.close(grace=0.5)


@asynccontextmanager
async def collector(status: int = 200) -> AsyncIterator[Collector]:
    server = Collector(status)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    """Records OTLP/gRPC exports and their metadata."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.metadata: list[dict[str, str]] = []

    async def Export(
        self, request: ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        self.metadata.append({k: v for k, v in context.invocation_metadata()})
        return trace_service_pb2.ExportTraceServiceResponse()


@asynccontextmanager
async def grpc_collector() -> AsyncIterator[tuple[TraceService, int]]:
    server = grpc.aio.server()
    service = TraceService()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(f"{HOST}:0")
    await server.start()
    try:
        yield service, port
    finally:
        await server.stop(None)


def check_otlp(request: ExportTraceServiceRequest, service: str, spans: list[Span]) -> None:
    resource_spans = request.resource_spans[0]
    assert resource_spans.resource.attributes[0].key == "service.name"
    assert resource_spans.resource.attributes[0].value.string_value == service
    got = resource_spans.scope_spans[0].spans
    assert [s.name for s in got] == [s.name for s in spans]
    for decoded, span in zip(got, spans, strict=True):
        assert decoded.trace_id == span.context.trace_id
        assert decoded.span_id == span.context.span_id
        assert decoded.parent_span_id == span.parent_id
        assert decoded.kind == span.kind
        assert decoded.status.code == span.status_code
        assert decoded.status.message == span.status_message


# ---- OTLP/HTTP ---------------------------------------------------------------------------------


def test_otlp_http_posts_protobuf(run: Run) -> None:
    async def scenario() -> None:
        async with collector() as server:
            exporter = OtlpHttpExporter(
                HOST, server.port, headers=[("X-Api-Key", "secret"), ("tenant", "a b")]
            )
            spans = make_spans()
            await exporter.export(spans, "orders")
            await exporter.close()
        [request] = server.requests
        assert request.method == "POST"
        assert request.path == "/v1/traces"
        assert request.header(b"content-type") == b"application/x-protobuf"
        assert request.header(b"x-api-key") == b"secret"
        assert request.header(b"tenant") == b"a b"
        check_otlp(ExportTraceServiceRequest.FromString(request.body), "orders", spans)

    run(scenario())


def test_otlp_http_from_config_with_path(run: Run) -> None:
    async def scenario() -> None:
        async with collector() as server:
            [exporter] = exporters_from_config(
                {
                    "otel": {
                        "endpointAddress": f"http://{HOST}:{server.port}/otlp",
                        "protocol": "http",
                        "headers": "authorization=Bearer%20abc,x-scope=1",
                    }
                }
            )
            await exporter.export(make_spans(), "svc")
            await exporter.close()
        [request] = server.requests
        assert request.path == "/otlp/v1/traces"
        assert request.header(b"authorization") == b"Bearer abc"
        assert request.header(b"x-scope") == b"1"

    run(scenario())


@pytest.mark.parametrize("status", [400, 500, 503])
def test_otlp_http_error_status_is_dropped_with_one_warning(
    run: Run, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with collector(status) as server:
            exporter = OtlpHttpExporter(HOST, server.port)
            await exporter.export(make_spans(), "svc")
            await exporter.export(make_spans(), "svc")
            await exporter.close()
            assert len(server.requests) == 2  # no retries

    with caplog.at_level(logging.WARNING, "pillion.observability.exporters"):
        run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"HTTP {status}" in warnings[0] and "2 spans dropped" in warnings[0]


def test_dead_http_endpoint_does_not_raise(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        port = free_port()
        otlp = OtlpHttpExporter(HOST, port, timeout=2.0)
        zipkin = ZipkinExporter(f"http://{HOST}:{port}/api/v2/spans", timeout=2.0)
        for _ in range(3):
            await otlp.export(make_spans(), "svc")
            await zipkin.export(make_spans(), "svc")
        await otlp.close()
        await zipkin.close()

    with caplog.at_level(logging.WARNING, "pillion.observability.exporters"):
        run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one per exporter per minute
    assert all("ConnectError" in w for w in warnings)


# ---- Zipkin ------------------------------------------------------------------------------------


def test_zipkin_posts_v2_json(run: Run) -> None:
    async def scenario() -> None:
        async with collector() as server:
            [exporter] = exporters_from_config(
                {"zipkin": {"endpointAddress": f"http://{HOST}:{server.port}/api/v2/spans"}}
            )
            assert isinstance(exporter, ZipkinExporter)
            await exporter.export(make_spans(), "orders")
            await exporter.close()
        [request] = server.requests
        assert request.method == "POST"
        assert request.path == "/api/v2/spans"
        assert request.header(b"content-type") == b"application/json"
        server_span, client_span = json.loads(request.body)
        assert server_span == {
            "traceId": TRACE_ID.hex(),
            "id": "00f067aa0ba902b7",
            "name": "/v1.0/state/statestore",
            "kind": "SERVER",
            "timestamp": 1_700_000_000_000_000,
            "duration": 2500,
            "localEndpoint": {"serviceName": "orders"},
            "tags": {
                "dapr.api": "GET /v1.0/state/statestore",
                "dapr.status_code": "200",
                "ok": "true",
                "ratio": "0.5",
            },
        }
        assert client_span["parentId"] == "00f067aa0ba902b7"
        assert client_span["id"] == "1122334455667788"
        assert client_span["kind"] == "CLIENT"
        assert client_span["tags"] == {"otel.status_code": "ERROR", "error": "connection refused"}
        assert client_span["duration"] >= 1

    run(scenario())


def test_zipkin_internal_kind_is_omitted(run: Run) -> None:
    async def scenario() -> None:
        async with collector() as server:
            exporter = ZipkinExporter(f"http://{HOST}:{server.port}/")
            span = make_spans()[0]
            span.kind = INTERNAL
            await exporter.export([span], "svc")
            await exporter.close()
        [item] = json.loads(server.requests[0].body)
        assert "kind" not in item and "parentId" not in item

    run(scenario())


# ---- OTLP/gRPC ---------------------------------------------------------------------------------


def test_otlp_grpc_exports() -> None:
    async def scenario() -> None:
        async with grpc_collector() as (service, port):
            [exporter] = exporters_from_config(
                {
                    "otel": {
                        "endpointAddress": f"{HOST}:{port}",
                        "protocol": "grpc",
                        "isSecure": False,
                        "headers": [{"name": "X-Api-Key", "value": "secret"}],
                        "timeout": 5000,
                    }
                }
            )
            assert isinstance(exporter, OtlpGrpcExporter)
            spans = make_spans()
            await exporter.export(spans, "orders")
            await exporter.export(spans[:1], "orders")
            await exporter.close()
        assert len(service.requests) == 2
        check_otlp(service.requests[0], "orders", spans)
        check_otlp(service.requests[1], "orders", spans[:1])
        assert service.metadata[0]["x-api-key"] == "secret"

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_otlp_grpc_on_uvloop() -> None:
    async def scenario() -> None:
        async with grpc_collector() as (service, port):
            exporter = OtlpGrpcExporter(f"{HOST}:{port}")
            await exporter.export(make_spans(), "svc")
            await exporter.close()
        assert len(service.requests) == 1

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(scenario(), 30))


def test_dead_grpc_endpoint_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        exporter = OtlpGrpcExporter(f"{HOST}:{free_port()}", timeout=2.0)
        await exporter.export(make_spans(), "svc")
        await exporter.export(make_spans(), "svc")
        await exporter.close()

    with caplog.at_level(logging.WARNING, "pillion.observability.exporters"):
        asyncio.run(asyncio.wait_for(scenario(), 30))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "OTLP/gRPC" in warnings[0] and "2 spans dropped" in warnings[0]


# ---- the tracer end to end ---------------------------------------------------------------------


def test_tracer_exports_to_collectors(run: Run) -> None:
    async def scenario() -> None:
        async with collector() as otlp, collector() as zipkin:
            tracer = Tracer(
                "orders",
                1.0,
                [
                    OtlpHttpExporter(HOST, otlp.port),
                    ZipkinExporter(f"http://{HOST}:{zipkin.port}/api/v2/spans"),
                ],
                flush_interval=0.05,
                batch_size=3,
            )
            task = asyncio.create_task(tracer.run())
            names = []
            for i in range(7):
                span, ctx = tracer.start(f"op{i}", None, SERVER)
                assert span is not None and ctx is not None
                span.set("i", i)
                span.end()
                names.append(f"op{i}")
            await until(lambda: len(otlp.requests) >= 3 and len(zipkin.requests) >= 3)
            await tracer.close()
            await task
        got = []
        for request in otlp.requests:
            decoded = ExportTraceServiceRequest.FromString(request.body)
            got += [s.name for s in decoded.resource_spans[0].scope_spans[0].spans]
        assert got == names
        zipkin_names = [s["name"] for r in zipkin.requests for s in json.loads(r.body)]
        assert zipkin_names == names

    run(scenario())


def test_tracer_close_flushes_to_collector(run: Run) -> None:
    async def scenario() -> None:
        async with collector() as server:
            tracer = Tracer("svc", 1.0, [OtlpHttpExporter(HOST, server.port)], flush_interval=3600)
            span, _ = tracer.start("last", None, SERVER)
            assert span is not None
            span.end()
            await tracer.close()
            assert len(server.requests) == 1

    run(scenario())


def test_tracer_with_dead_endpoint_keeps_running(run: Run) -> None:
    async def scenario() -> None:
        tracer = Tracer(
            "svc", 1.0, [OtlpHttpExporter(HOST, free_port(), timeout=1.0)], flush_interval=0.01
        )
        task = asyncio.create_task(tracer.run())
        for _ in range(3):
            span, _ = tracer.start("op", None, SERVER)
            assert span is not None
            span.end()
            await until(lambda: tracer.queued == 0)
        assert not task.done()
        await tracer.close()
        await task

    run(scenario())


# ---- stdout ------------------------------------------------------------------------------------


def test_stdout_logs_one_json_line_per_span(caplog: pytest.LogCaptureFixture) -> None:
    spans = make_spans()
    with caplog.at_level(logging.INFO, "pillion.observability.stdout"):
        asyncio.run(StdoutExporter().export(spans, "orders"))
    records = [r for r in caplog.records if r.name == "pillion.observability.stdout"]
    assert len(records) == 2
    first, second = (json.loads(r.getMessage()) for r in records)
    assert first["service"] == "orders"
    assert first["name"] == "/v1.0/state/statestore"
    assert first["kind"] == "SERVER"
    assert first["traceId"] == TRACE_ID.hex()
    assert first["spanId"] == "00f067aa0ba902b7"
    assert first["parentId"] == ""
    assert first["traceState"] == "rojo=1"
    assert first["attributes"] == {
        "dapr.api": "GET /v1.0/state/statestore",
        "dapr.status_code": 200,
        "ok": True,
        "ratio": 0.5,
    }
    assert first["durationMs"] == 2.5
    assert second["status"] == "ERROR" and second["statusMessage"] == "connection refused"
    assert second["parentId"] == "00f067aa0ba902b7"


# ---- configuration -----------------------------------------------------------------------------


def test_nothing_configured() -> None:
    assert exporters_from_config(None) == []
    assert exporters_from_config({}) == []
    assert exporters_from_config({"samplingRate": "1", "stdout": False}) == []
    assert exporters_from_config({"zipkin": {"endpointAddress": ""}, "otel": {}}) == []


def test_all_three() -> None:
    exporters = exporters_from_config(
        {
            "samplingRate": "1",
            "stdout": True,
            "zipkin": {"endpointAddress": "http://localhost:9411/api/v2/spans"},
            "otel": {"endpointAddress": "localhost:4317", "protocol": "grpc", "isSecure": False},
        }
    )
    assert [type(e) for e in exporters] == [StdoutExporter, ZipkinExporter, OtlpGrpcExporter]


@pytest.mark.parametrize(
    ("otel", "host", "port", "path", "secure"),
    [
        # daprd's form: host:port, TLS unless isSecure is false.
        ({"endpointAddress": "collector:4318"}, "collector", 4318, "/v1/traces", True),
        (
            {"endpointAddress": "collector:4318", "isSecure": False},
            "collector",
            4318,
            "/v1/traces",
            False,
        ),
        (
            {"endpointAddress": "collector:4318", "isSecure": "false"},
            "collector",
            4318,
            "/v1/traces",
            False,
        ),
        ({"endpointAddress": "collector"}, "collector", 443, "/v1/traces", True),
        ({"endpointAddress": "collector", "isSecure": False}, "collector", 80, "/v1/traces", False),
        # A scheme decides TLS itself; a path is kept and /v1/traces appended once.
        ({"endpointAddress": "http://collector:4318"}, "collector", 4318, "/v1/traces", False),
        ({"endpointAddress": "https://collector/otlp/"}, "collector", 443, "/otlp/v1/traces", True),
        ({"endpointAddress": "http://c:1/otlp/v1/traces"}, "c", 1, "/otlp/v1/traces", False),
        ({"endpointAddress": "[::1]:4318", "isSecure": False}, "::1", 4318, "/v1/traces", False),
    ],
)
def test_otel_http_endpoint_forms(
    otel: dict[str, Any], host: str, port: int, path: str, secure: bool
) -> None:
    [exporter] = exporters_from_config({"otel": {"protocol": "http", **otel}})
    assert isinstance(exporter, OtlpHttpExporter)
    target = exporter.target
    assert (target.host, target.port, target.target, target.secure) == (
        host,
        port,
        path.encode(),
        secure,
    )


@pytest.mark.parametrize(
    ("address", "is_secure", "target", "secure"),
    [
        ("localhost:4317", None, "localhost:4317", True),
        ("localhost:4317", False, "localhost:4317", False),
        ("http://localhost:4317", None, "localhost:4317", False),
        ("https://localhost:4317", False, "localhost:4317", True),
        ("[::1]:4317", False, "[::1]:4317", False),
        ("collector", False, "collector", False),
    ],
)
def test_otel_grpc_endpoint_forms(
    address: str, is_secure: bool | None, target: str, secure: bool
) -> None:
    otel: dict[str, Any] = {"endpointAddress": address, "protocol": "GRPC"}
    if is_secure is not None:
        otel["isSecure"] = is_secure
    [exporter] = exporters_from_config({"otel": otel})
    assert isinstance(exporter, OtlpGrpcExporter)
    assert (exporter.target, exporter.secure) == (target, secure)


def test_otel_without_protocol_is_skipped_like_daprd(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "pillion.observability.exporters"):
        assert exporters_from_config({"otel": {"endpointAddress": "localhost:4317"}}) == []
    assert "protocol is not set" in caplog.text


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, DEFAULT_TIMEOUT),
        (0, DEFAULT_TIMEOUT),
        (5000, 5.0),
        ("2500", 2.5),
        ("3s", 3.0),
        ("1m", 60.0),
    ],
)
def test_otel_timeout(value: object, seconds: float) -> None:
    otel = {"endpointAddress": "c:4317", "protocol": "grpc", "timeout": value}
    [exporter] = exporters_from_config({"otel": otel})
    assert isinstance(exporter, OtlpGrpcExporter)
    assert exporter._timeout == seconds


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, []),
        ("", []),
        ("api-key=abc", [("api-key", "abc")]),
        (" a = 1 , b=x%20y%2Cz ", [("a", "1"), ("b", "x y,z")]),
        ("k=v=w", [("k", "v=w")]),
        ([{"name": "a", "value": "1"}, {"name": "b", "value": 2}], [("a", "1"), ("b", "2")]),
        ({"a": "1"}, [("a", "1")]),
    ],
)
def test_headers(value: object, expected: list[tuple[str, str]]) -> None:
    assert parse_headers(value) == expected


@pytest.mark.parametrize(
    ("tracing", "message"),
    [
        ([], "spec.tracing: must be a mapping"),
        ({"stdout": "yes"}, "spec.tracing.stdout: must be true or false"),
        ({"zipkin": "http://x"}, "spec.tracing.zipkin: must be a mapping"),
        ({"zipkin": {"endpointAddress": "localhost:9411"}}, "spec.tracing.zipkin.endpointAddress"),
        ({"zipkin": {"endpointAddress": "ftp://h/x"}}, "spec.tracing.zipkin.endpointAddress"),
        (
            {"zipkin": {"endpointAddress": "http://h:99999/x"}},
            "spec.tracing.zipkin.endpointAddress",
        ),
        ({"zipkin": {"endpointAddress": 9411}}, "spec.tracing.zipkin.endpointAddress"),
        ({"otel": []}, "spec.tracing.otel: must be a mapping"),
        (
            {"otel": {"endpointAddress": "c:4317", "protocol": "udp"}},
            "spec.tracing.otel.protocol: must be grpc or http",
        ),
        (
            {"otel": {"endpointAddress": "c:4317", "protocol": "grpc", "isSecure": "maybe"}},
            "spec.tracing.otel.isSecure: must be true or false",
        ),
        (
            {"otel": {"endpointAddress": "c:4317", "protocol": "grpc", "headers": "novalue"}},
            "spec.tracing.otel.headers",
        ),
        (
            {"otel": {"endpointAddress": "c:4317", "protocol": "grpc", "headers": "bad name=1"}},
            "spec.tracing.otel.headers: invalid header name",
        ),
        (
            {
                "otel": {
                    "endpointAddress": "c:4317",
                    "protocol": "grpc",
                    "headers": [{"value": "1"}],
                }
            },
            "spec.tracing.otel.headers[0]",
        ),
        (
            {"otel": {"endpointAddress": "c:4317", "protocol": "grpc", "headers": 5}},
            "spec.tracing.otel.headers",
        ),
        (
            {"otel": {"endpointAddress": "c:4317", "protocol": "grpc", "timeout": "soon"}},
            "spec.tracing.otel.timeout",
        ),
        (
            {"otel": {"endpointAddress": "c:4317", "protocol": "grpc", "timeout": -5}},
            "spec.tracing.otel.timeout: must be positive",
        ),
        (
            {"otel": {"endpointAddress": "c:4317/x", "protocol": "grpc"}},
            "spec.tracing.otel.endpointAddress: a gRPC endpoint is host:port",
        ),
        (
            {"otel": {"endpointAddress": "tcp://c:4317", "protocol": "grpc"}},
            "spec.tracing.otel.endpointAddress: scheme must be http or https",
        ),
        (
            {"otel": {"endpointAddress": "c:port", "protocol": "http"}},
            "spec.tracing.otel.endpointAddress: invalid port",
        ),
        (
            {"otel": {"endpointAddress": ":4318", "protocol": "http"}},
            "spec.tracing.otel.endpointAddress",
        ),
    ],
)
def test_invalid_configuration(tracing: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        exporters_from_config(tracing)
    assert str(info.value).startswith(message)
