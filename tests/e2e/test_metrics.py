"""Prometheus metrics end to end: after a scripted workload `/metrics` on --metrics-port shows
Dapr's metric names with exact counts; --enable-metrics=false serves nothing."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pillion.testing.procs import Proc, Sidecar, free_port, start_sidecar, wait_until
from tests.e2e.conftest import call, failed_start
from tests.e2e.observe import component, sqlite_pubsub, start_observed

pytestmark = pytest.mark.e2e

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        assert m, f"not Prometheus text: {line!r}"
        labels = dict(_LABEL.findall(m.group(3) or ""))
        out.append((m.group(1), labels, float(m.group(4))))
    return out


def scrape(sc: Sidecar) -> list[tuple[str, dict[str, str], float]]:
    r = call(sc.metrics_port, "GET", "/metrics")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/plain")
    return parse(r.body.decode())


def value(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """The sum over the series of `name` whose labels include `labels`."""
    return sum(
        v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items())
    )


@dataclass
class Pair:
    a: Sidecar
    b: Sidecar
    app_ports: dict[str, int]
    procs: list[Proc]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("metrics")
    home = tmp / "home"
    home.mkdir()
    res = tmp / "res"
    res.mkdir()
    (res / "c.yaml").write_text(
        component("statestore", "state.sqlite", connectionString=tmp / "state.db")
        + "---\n"
        + sqlite_pubsub(tmp / "ps.db")
    )
    procs: list[Proc] = []
    scs: dict[str, Sidecar] = {}
    ports: dict[str, int] = {}
    try:
        for app_id in ("ma", "mb"):
            app, sc, port = start_observed(app_id, home=home, resources=[res])
            procs += [app, sc.proc]
            scs[app_id] = sc
            ports[app_id] = port
        yield Pair(scs["ma"], scs["mb"], ports, procs)
    finally:
        for p in procs:
            p.stop()


def test_workload_counts(pair: Pair) -> None:
    a = pair.a.http_port
    for i in range(5):
        body = json.dumps([{"key": f"k{i}", "value": i}])
        assert call(a, "POST", "/v1.0/state/statestore", body).status == 204
    for i in range(3):
        assert call(a, "GET", f"/v1.0/state/statestore/k{i}").status == 200
    assert call(a, "GET", "/v1.0/state/nostore/k0").status == 400
    for _ in range(4):
        assert call(a, "GET", "/v1.0/invoke/mb/method/count/m").status == 200
    assert call(a, "GET", "/v1.0/invoke/mb/method/nowhere").status == 404
    for i in range(2):
        r = call(
            a,
            "POST",
            "/v1.0/publish/pubsub/traced",
            json.dumps({"i": i}),
            {"content-type": "application/json"},
        )
        assert r.status == 204
    for app in ("ma", "mb"):
        wait_until(
            lambda app=app: len(call(pair.app_ports[app], "GET", "/seen/traced").json()) == 2,
            10,
            f"both events at {app}",
        )
    sa = scrape(pair.a)
    state = "/v1.0/state/statestore"
    assert value(sa, "dapr_http_server_request_count", method="POST", path=state) == 5
    assert value(sa, "dapr_http_server_request_count", method="POST", status="204") >= 5
    assert value(sa, "dapr_http_server_latency_count", method="POST", path=state) == 5
    assert value(sa, "dapr_component_state_count", component="statestore", operation="set") == 5
    assert (
        value(
            sa,
            "dapr_component_state_count",
            component="statestore",
            operation="get",
            success="true",
        )
        == 3
    )
    assert value(sa, "dapr_component_state_latencies_count", operation="set") == 5
    assert value(sa, "dapr_runtime_service_invocation_req_sent_total", dst_app_id="mb") == 5
    assert (
        value(sa, "dapr_runtime_service_invocation_res_recv_total", src_app_id="mb", status="200")
        == 4
    )
    assert (
        value(sa, "dapr_runtime_service_invocation_res_recv_total", src_app_id="mb", status="404")
        == 1
    )
    assert value(sa, "dapr_component_pubsub_egress_count", component="pubsub", topic="traced") == 2
    assert all(lab.get("app_id") == "ma" for n, lab, _ in sa if n.startswith("dapr_http_server"))
    sb = scrape(pair.b)
    assert value(sb, "dapr_runtime_service_invocation_req_recv_total", src_app_id="ma") == 5
    assert value(sb, "dapr_http_client_completed_count", path="/count/m") == 4
    # The sidecar counts a delivery once the app's answer is back: poll for the second one.
    ingress = {"component": "pubsub", "topic": "traced", "process_status": "success"}
    wait_until(
        lambda: value(scrape(pair.b), "dapr_component_pubsub_ingress_count", **ingress) >= 2,
        10,
        "two successful deliveries counted",
    )
    sb = scrape(pair.b)
    assert value(sb, "dapr_component_pubsub_ingress_count", **ingress) == 2
    assert value(sb, "dapr_runtime_component_loaded") == 2


def test_dapr_metric_names(pair: Pair) -> None:
    names = {n for n, _, _ in scrape(pair.a)}
    for want in (
        "dapr_http_server_request_count",
        "dapr_http_server_latency_bucket",
        "dapr_http_server_latency_sum",
        "dapr_runtime_component_loaded",
    ):
        assert want in names, sorted(names)


def test_metrics_off(tmp_path: Path) -> None:
    port = free_port()
    sc = start_sidecar("nometrics", home=tmp_path, extra=["--enable-metrics=false"])
    try:
        with socket.socket() as s:
            s.settimeout(1)
            assert s.connect_ex(("127.0.0.1", sc.metrics_port)) != 0
        assert port
    finally:
        sc.proc.stop()


def test_grpc_server_and_component_init(pair: Pair) -> None:
    import grpc
    from dapr.proto.runtime.v1 import dapr_pb2_grpc, metadata_pb2

    method = "/dapr.proto.runtime.v1.Dapr/GetMetadata"
    before = value(scrape(pair.a), "dapr_grpc_io_server_completed_rpcs", grpc_server_method=method)
    with grpc.insecure_channel(f"127.0.0.1:{pair.a.grpc_port}") as ch:
        stub = dapr_pb2_grpc.DaprStub(ch)
        for _ in range(3):
            stub.GetMetadata(metadata_pb2.GetMetadataRequest(), timeout=5)
    sa = scrape(pair.a)
    got = value(
        sa, "dapr_grpc_io_server_completed_rpcs", grpc_server_method=method, grpc_server_status="OK"
    )
    assert got - before == 3
    assert value(sa, "dapr_runtime_component_init_total", component="state.sqlite") == 1
    assert value(sa, "dapr_runtime_component_init_total", component="pubsub.sqlite") == 1


def test_bad_metrics_config_stops_start_up(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "apiVersion: dapr.io/v1alpha1\nkind: Configuration\nmetadata: {name: c}\nspec:\n"
        "  metrics:\n    latencyDistributionBuckets: [5, 1]\n"
    )
    metrics_port = str(free_port())
    r = failed_start(
        tmp_path, "--app-id", "badmetrics", "--config", str(config), "--metrics-port", metrics_port
    )
    assert r.returncode == 1
    assert "config.yaml" in r.stdout and "latencyDistributionBuckets" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
