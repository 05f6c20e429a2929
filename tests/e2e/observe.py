"""Shared pieces of the observability and resiliency e2e suites: a span collector the test runs
(OTLP/HTTP and Zipkin on one port), the observed app, and sidecar start-up with a config."""

from __future__ import annotations

import json
import random
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from pillion.testing.procs import Proc, Sidecar, free_port, start_sidecar

APPS = Path(__file__).parent / "apps"


def component(name: str, type_: str, **metadata: object) -> str:
    """One Component document (YAML) with string metadata values."""
    items = "".join(
        f"  - name: {k}\n    value: {json.dumps(str(v))}\n" for k, v in metadata.items()
    )
    return (
        "apiVersion: dapr.io/v1alpha1\nkind: Component\n"
        f"metadata:\n  name: {name}\nspec:\n  type: {type_}\n  version: v1\n"
        + (f"  metadata:\n{items}" if items else "")
    )


def sqlite_pubsub(db: Path) -> str:
    return component("pubsub", "pubsub.sqlite", connectionString=db)


@dataclass
class Span:
    source: str  # "otlp" | "zipkin"
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    attributes: dict[str, Any]


class Collector:
    """Receives spans the way an OpenTelemetry collector and Zipkin do, on one free port."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.requests = 0
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if self.path == "/v1/traces":
                    got = collector._otlp(body)
                elif self.path == "/api/v2/spans":
                    got = collector._zipkin(body)
                else:
                    self.send_response(404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                with collector._lock:
                    collector.spans += got
                    collector.requests += 1
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @staticmethod
    def _otlp(body: bytes) -> list[Span]:
        req = ExportTraceServiceRequest.FromString(body)
        out: list[Span] = []
        kinds = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
        for rs in req.resource_spans:
            attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    out.append(
                        Span(
                            "otlp",
                            attrs.get("service.name", ""),
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            s.name,
                            kinds.get(s.kind, str(s.kind)),
                            {
                                a.key: getattr(
                                    a.value, a.value.WhichOneof("value") or "string_value"
                                )
                                for a in s.attributes
                            },
                        )
                    )
        return out

    @staticmethod
    def _zipkin(body: bytes) -> list[Span]:
        return [
            Span(
                "zipkin",
                s.get("localEndpoint", {}).get("serviceName", ""),
                s["traceId"],
                s["id"],
                s.get("parentId", ""),
                s["name"],
                s.get("kind", ""),
                s.get("tags", {}),
            )
            for s in json.loads(body)
        ]

    def trace(self, trace_id: str, source: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id and s.source == source]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def tracing_config(path: Path, rate: str, collector_port: int) -> Path:
    path.write_text(
        "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata: {name: tracing}\nspec:\n"
        "  tracing:\n"
        f'    samplingRate: "{rate}"\n'
        f"    otel: {{endpointAddress: '127.0.0.1:{collector_port}', protocol: http, "
        "isSecure: false}\n"
        f"    zipkin: {{endpointAddress: 'http://127.0.0.1:{collector_port}/api/v2/spans'}}\n"
    )
    return path


def start_observed(
    app_id: str,
    *,
    home: Path,
    resources: list[Path],
    config: Path | None = None,
    env: dict[str, str] | None = None,
    extra: list[str] | None = None,
) -> tuple[Proc, Sidecar, int]:
    """The observed app and its sidecar (which the app reaches on a port chosen up front)."""
    app_port, http_port = free_port(), free_port()
    app = Proc.start(
        f"app {app_id}",
        [sys.executable, str(APPS / "observed.py"), str(app_port)],
        env={
            "APP_ID": app_id,
            "DAPR_HTTP_PORT": str(http_port),
            "PATH": "/usr/bin:/bin",
            **(env or {}),
        },
    )
    app.wait_for_line("listening", 10)
    args = list(extra or [])
    if config is not None:
        args += ["--config", str(config)]
    try:
        sc = start_sidecar(
            app_id,
            home=home,
            resources=resources,
            app_port=app_port,
            extra=args,
            wait="ready",
            http_port=http_port,
        )
    except BaseException:
        app.stop()
        raise
    return app, sc, app_port


def new_traceparent() -> tuple[str, str, str]:
    """(traceparent, trace id, span id) of a sampled context the test starts."""
    trace_id = f"{random.getrandbits(128):032x}"
    span_id = f"{random.getrandbits(64):016x}"
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id
