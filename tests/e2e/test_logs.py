"""daprd's log formats: --log-as-json lines with its keys, text lines, and one API log line per
HTTP and gRPC call with --enable-api-logging."""

from __future__ import annotations

import json
import re
from pathlib import Path

import grpc
import pytest
from dapr.proto.runtime.v1 import dapr_pb2_grpc, metadata_pb2

from pillion.testing.procs import start_sidecar, wait_until
from tests.e2e.conftest import call

pytestmark = pytest.mark.e2e

KEYS = {"time", "level", "msg", "scope", "app_id", "instance", "type", "ver"}


def _grpc_metadata(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        dapr_pb2_grpc.DaprStub(ch).GetMetadata(metadata_pb2.GetMetadataRequest(), timeout=5)


def test_json_lines_and_api_logging(tmp_path: Path) -> None:
    sc = start_sidecar("jsonlogs", home=tmp_path, extra=["--log-as-json", "--enable-api-logging"])
    try:
        assert call(sc.http_port, "GET", "/v1.0/state/nostore/k").status == 500
        _grpc_metadata(sc.grpc_port)
        wait_until(lambda: "gRPC API Called" in sc.proc.output, 5, "the gRPC API log line")
    finally:
        sc.proc.stop()
    lines = [json.loads(line) for line in sc.proc.output.splitlines() if line.strip()]
    assert lines and all(set(d) >= KEYS for d in lines), lines
    assert all(d["app_id"] == "jsonlogs" and d["type"] == "log" for d in lines)
    assert {d["level"] for d in lines} <= {"debug", "info", "warning", "error", "fatal"}
    http = [d for d in lines if d["msg"] == "HTTP API Called" and "state" in d["method"]]
    assert len(http) == 1, http
    assert http[0]["method"] == "GET /v1.0/state/nostore/k"
    assert http[0]["code"] == 500 and http[0]["scope"] == "dapr.runtime.http-info"
    assert isinstance(http[0]["duration"], float)
    grpc_lines = [d for d in lines if d["msg"] == "gRPC API Called"]
    assert len(grpc_lines) == 1, grpc_lines
    assert grpc_lines[0]["method"] == "/dapr.proto.runtime.v1.Dapr/GetMetadata"
    assert grpc_lines[0]["code"] == "OK"
    # Health probes by start_sidecar were logged too, as daprd does without omitHealthChecks.
    assert any(d.get("method", "").startswith("GET /v1.0/healthz") for d in lines)


def test_text_lines_and_omitted_health_checks(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata: {name: c}\nspec:\n"
        "  logging:\n    apiLogging: {enabled: true, omitHealthChecks: true}\n"
    )
    sc = start_sidecar("textlogs", home=tmp_path, extra=["--config", str(config)])
    try:
        assert call(sc.http_port, "GET", "/v1.0/metadata").status == 200
        wait_until(lambda: "HTTP API Called" in sc.proc.output, 5, "the API log line")
    finally:
        sc.proc.stop()
    line = re.compile(
        r'^time="[0-9T:.-]+Z" level=(debug|info|warning|error|fatal) msg=".*" '
        r"app_id=textlogs instance=\S+ scope=\S+ type=log ver=\S+"
    )
    out = [x for x in sc.proc.output.splitlines() if x.strip()]
    assert all(line.match(x) for x in out), [x for x in out if not line.match(x)]
    api = [x for x in out if "HTTP API Called" in x]
    assert len(api) == 1 and 'method="GET /v1.0/metadata"' in api[0] and "code=200" in api[0]
