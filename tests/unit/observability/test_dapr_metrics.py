"""Tests of DaprMetrics: daprd's metric names, labels, values, path rules and configuration."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from pillion.observability.dapr_metrics import (
    APP_HEALTH_CHECK_METHOD,
    DEFAULT_LATENCY_BUCKETS,
    SIZE_BUCKETS,
    DaprMetrics,
    grpc_status_name,
    legacy_path_label,
)


def samples(m: DaprMetrics) -> dict[str, str]:
    """Every sample line of the page as {"name{labels}": "value"}."""
    out = {}
    for line in m.render().decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = value
    return out


def key(name: str, **labels: str) -> str:
    """A sample key as the page writes it: label pairs sorted by name."""
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def types(m: DaprMetrics) -> dict[str, str]:
    out = {}
    for line in m.render().decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            out[name] = kind
    return out


def server_path(m: DaprMetrics, path: str, method: str = "GET") -> str:
    """The path label daprd would record for one served request."""
    m.http_server(method, path, 200, 1.0, 0, 0)
    found = [
        k for k in samples(m) if k.startswith("dapr_http_server_request_count{") and "200" in k
    ]
    assert len(found) == 1, found
    return found[0].split('path="', 1)[1].split('"', 1)[0]


# ---- names, labels, values --------------------------------------------------------------------


def test_http_server_records_dapr_names_labels_and_buckets() -> None:
    m = DaprMetrics("myapp")
    m.http_server("POST", "/v1.0/state/mystore", 204, 2.0, 100, 0)
    m.http_server("POST", "/v1.0/state/mystore", 204, 0.4, 3000, 0)
    s = samples(m)
    labels = 'app_id="myapp",method="POST",path="/v1.0/state/mystore",status="204"'
    assert s[f"dapr_http_server_request_count{{{labels}}}"] == "2"
    assert s[f"dapr_http_server_response_count{{{labels}}}"] == "2"
    # OpenCensus buckets: 2.0 lands in le="3" (first bound greater than the value).
    assert s[f'dapr_http_server_latency_bucket{{{labels},le="1"}}'] == "1"
    assert s[f'dapr_http_server_latency_bucket{{{labels},le="2"}}'] == "1"
    assert s[f'dapr_http_server_latency_bucket{{{labels},le="3"}}'] == "2"
    assert s[f'dapr_http_server_latency_bucket{{{labels},le="100000"}}'] == "2"
    assert s[f'dapr_http_server_latency_bucket{{{labels},le="+Inf"}}'] == "2"
    assert s[f"dapr_http_server_latency_sum{{{labels}}}"] == "2.4"
    assert s[f"dapr_http_server_latency_count{{{labels}}}"] == "2"
    assert s['dapr_http_server_request_bytes_bucket{app_id="myapp",le="1024"}'] == "1"
    assert s['dapr_http_server_request_bytes_bucket{app_id="myapp",le="4096"}'] == "2"
    assert s['dapr_http_server_request_bytes_bucket{app_id="myapp",le="1.048576e+06"}'] == "2"
    assert s['dapr_http_server_request_bytes_sum{app_id="myapp"}'] == "3100"
    assert s['dapr_http_server_response_bytes_count{app_id="myapp"}'] == "2"
    assert types(m) == {
        "dapr_http_server_latency": "histogram",
        "dapr_http_server_request_bytes": "histogram",
        "dapr_http_server_request_count": "counter",
        "dapr_http_server_response_bytes": "histogram",
        "dapr_http_server_response_count": "counter",
    }
    page = m.render().decode()
    assert "# HELP dapr_http_server_request_count Count of HTTP requests processed" in page
    assert page.count("dapr_http_server_latency_bucket{") == len(DEFAULT_LATENCY_BUCKETS) + 1


def test_default_buckets_are_daprds() -> None:
    assert DEFAULT_LATENCY_BUCKETS == (
        1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 30, 40, 50, 65, 80, 100, 130, 160, 200, 250,
        300, 400, 500, 650, 800, 1000, 2000, 5000, 10000, 20000, 50000, 100000,
    )  # fmt: skip
    assert SIZE_BUCKETS[0] == 1024 and SIZE_BUCKETS[-1] == 4 << 30 and len(SIZE_BUCKETS) == 13


def test_http_client_labels_and_sent_bytes_without_status() -> None:
    m = DaprMetrics("a")
    m.http_client("GET", "/hi", 200, 5.0, 10, 20)
    s = samples(m)
    labels = 'app_id="a",method="GET",path="/hi",status="200"'
    assert s[f"dapr_http_client_completed_count{{{labels}}}"] == "1"
    assert s[f"dapr_http_client_roundtrip_latency_count{{{labels}}}"] == "1"
    assert (
        s['dapr_http_client_sent_bytes_count{app_id="a",method="GET",path="/hi",status=""}'] == "1"
    )
    assert s['dapr_http_client_received_bytes_sum{app_id="a"}'] == "20"


def test_health_probes() -> None:
    m = DaprMetrics("a")
    m.health_probe("http", "200", 1.5)
    m.health_probe("grpc", "UNAVAILABLE", 2.5)
    m.grpc_client(APP_HEALTH_CHECK_METHOD, "OK", 0.5, 1, 1)  # routed to the probe metrics
    s = samples(m)
    assert s['dapr_http_healthprobes_completed_count{app_id="a",status="200"}'] == "1"
    assert s['dapr_http_healthprobes_roundtrip_latency_count{app_id="a",status="200"}'] == "1"
    assert (
        s['dapr_grpc_io_healthprobes_completed_count{app_id="a",grpc_client_status="Unavailable"}']
        == "1"
    )
    assert s['dapr_grpc_io_healthprobes_completed_count{app_id="a",grpc_client_status="OK"}'] == "1"
    assert not any(k.startswith("dapr_grpc_io_client_") for k in s)
    with pytest.raises(ValueError, match="protocol"):
        m.health_probe("tcp", "ok", 1)


def test_grpc_server_and_client() -> None:
    m = DaprMetrics("a")
    method = "/dapr.proto.runtime.v1.Dapr/GetState"
    m.grpc_server(method, "NOT_FOUND", 3.0, 10, 2000)
    m.grpc_client("/my.App/Do", "0", 1.0, 5, 6)
    s = samples(m)
    srv = f'app_id="a",grpc_server_method="{method}",grpc_server_status="NotFound"'
    assert s[f"dapr_grpc_io_server_completed_rpcs{{{srv}}}"] == "1"
    assert s[f"dapr_grpc_io_server_server_latency_count{{{srv}}}"] == "1"
    per_rpc = f'app_id="a",grpc_server_method="{method}"'
    assert s[f"dapr_grpc_io_server_received_bytes_per_rpc_sum{{{per_rpc}}}"] == "10"
    assert s[f"dapr_grpc_io_server_sent_bytes_per_rpc_sum{{{per_rpc}}}"] == "2000"
    cli = 'app_id="a",grpc_client_method="/my.App/Do",grpc_client_status="OK"'
    assert s[f"dapr_grpc_io_client_completed_rpcs{{{cli}}}"] == "1"
    assert s[f"dapr_grpc_io_client_roundtrip_latency_sum{{{cli}}}"] == "1"
    assert (
        s['dapr_grpc_io_client_sent_bytes_per_rpc_sum{app_id="a",grpc_client_method="/my.App/Do"}']
        == "5"
    )
    assert (
        s[
            'dapr_grpc_io_client_received_bytes_per_rpc_sum{app_id="a",grpc_client_method="/my.App/Do"}'
        ]
        == "6"
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("OK", "OK"),
        ("CANCELLED", "Canceled"),
        ("INVALID_ARGUMENT", "InvalidArgument"),
        ("DEADLINE_EXCEEDED", "DeadlineExceeded"),
        ("NotFound", "NotFound"),
        ("14", "Unavailable"),
        ("UNAUTHENTICATED", "Unauthenticated"),
        ("weird", "weird"),
    ],
)
def test_grpc_status_names_follow_go(given: str, expected: str) -> None:
    assert grpc_status_name(given) == expected


def test_service_invocation_labels_follow_daprd() -> None:
    m = DaprMetrics("caller")
    m.invoke_req_sent("callee", "unary")
    m.invoke_req_sent("callee", "http")  # a protocol name means a unary call
    m.invoke_res_recv("callee", "200", "unary", 7.0)
    m.invoke_res_recv("callee", "2", "streaming", 1.0)
    m.invoke_req_recv("other")
    m.invoke_res_sent("other", "500")
    s = samples(m)
    si = "dapr_runtime_service_invocation_"
    assert s[si + 'req_sent_total{app_id="caller",dst_app_id="callee",type="unary"}'] == "2"
    assert (
        s[si + 'res_recv_total{app_id="caller",src_app_id="callee",status="200",type="unary"}']
        == "1"
    )
    assert (
        s[si + 'res_recv_total{app_id="caller",src_app_id="callee",status="2",type="streaming"}']
        == "1"
    )
    assert (
        s[si + 'res_recv_latency_ms_sum{app_id="caller",src_app_id="callee",status="200"}'] == "7"
    )
    assert not any('status="2"' in k and "latency" in k for k in s)  # no latency when streamed
    assert s[si + 'req_recv_total{app_id="caller",src_app_id="other"}'] == "1"
    assert s[si + 'res_sent_total{app_id="caller",dst_app_id="other",status="500"}'] == "1"


def test_component_metrics_carry_namespace_and_success_strings() -> None:
    m = DaprMetrics("a", "prod")
    m.component_state("store", "get", True, 1.5)
    m.component_state("store", "set", False, 0.0)  # daprd records no latency for 0
    m.pubsub_egress("pubsub", "orders", True, 2.0)
    m.pubsub_ingress("pubsub", "orders", "retry", "", 3.0)
    m.pubsub_ingress("pubsub", "orders", "success", "drop", 3.0)
    m.input_binding("cron", False, 4.0)
    m.output_binding("http", "create", True, 5.0)
    m.secret("vault", "get", True, 6.0)
    m.configuration("cfg", "subscribe", True, 7.0)
    s = samples(m)
    ns = {"app_id": "a", "namespace": "prod"}
    get = {"component": "store", "operation": "get", "success": "true"}
    put = {"component": "store", "operation": "set", "success": "false"}
    assert s[key("dapr_component_state_count", **ns, **get)] == "1"
    assert s[key("dapr_component_state_count", **ns, **put)] == "1"
    assert s[key("dapr_component_state_latencies_count", **ns, **get)] == "1"
    assert s[key("dapr_component_state_latencies_count", **ns, **put)] == "0"
    egress = {"component": "pubsub", "success": "true", "topic": "orders"}
    assert s[key("dapr_component_pubsub_egress_count", **ns, **egress)] == "1"
    # An empty status takes the process status, as daprd does.
    retry = {"component": "pubsub", "process_status": "retry", "status": "retry", "topic": "orders"}
    assert s[key("dapr_component_pubsub_ingress_count", **ns, **retry)] == "1"
    drop = {"component": "pubsub", "process_status": "success", "status": "drop", "topic": "orders"}
    assert s[key("dapr_component_pubsub_ingress_latencies_sum", **ns, **drop)] == "3"
    cron = {"component": "cron", "success": "false"}
    assert s[key("dapr_component_input_binding_count", **ns, **cron)] == "1"
    create = {"component": "http", "operation": "create", "success": "true"}
    assert s[key("dapr_component_output_binding_count", **ns, **create)] == "1"
    vault = {"component": "vault", "operation": "get", "success": "true"}
    assert s[key("dapr_component_secret_latencies_sum", **ns, **vault)] == "6"
    cfg = {"component": "cfg", "operation": "subscribe", "success": "true"}
    assert s[key("dapr_component_configuration_count", **ns, **cfg)] == "1"


def test_runtime_component_metrics() -> None:
    m = DaprMetrics("a")
    m.component_loaded(3)
    m.component_init("state.redis")
    m.component_init_fail("pubsub.kafka", "init", "orders")
    s = samples(m)
    assert s['dapr_runtime_component_loaded{app_id="a"}'] == "3"
    assert s['dapr_runtime_component_init_total{app_id="a",component="state.redis"}'] == "1"
    assert (
        s[
            'dapr_runtime_component_init_fail_total{app_id="a",component="pubsub.kafka",componentName="orders",reason="init"}'
        ]
        == "1"
    )


def test_resiliency_metrics_and_circuit_breaker_gauges() -> None:
    m = DaprMetrics("cbstate-client")
    m.resiliency_loaded("cbstatepolicy", "default")
    m.resiliency_executed("cbstatepolicy", "retry", "outbound", "app_srv", "")
    m.resiliency_activation("cbstatepolicy", "circuitbreaker", "outbound", "app_srv", "open")
    m.resiliency_cb_state("cbstatepolicy", "outbound", "app_srv", "open")
    s = samples(m)
    assert (
        s[
            'dapr_resiliency_loaded{app_id="cbstate-client",name="cbstatepolicy",namespace="default"}'
        ]
        == "1"
    )
    common = 'app_id="cbstate-client",flow_direction="outbound",name="cbstatepolicy",namespace=""'
    assert s[f'dapr_resiliency_count{{{common},policy="retry",status="",target="app_srv"}}'] == "1"
    assert (
        s[
            f'dapr_resiliency_activations_total{{{common},policy="circuitbreaker",status="open",target="app_srv"}}'
        ]
        == "1"
    )

    def cb(status: str) -> str:
        return s[
            f'dapr_resiliency_cb_state{{{common},policy="circuitbreaker",status="{status}",target="app_srv"}}'
        ]

    assert [cb(x) for x in ("closed", "half-open", "open", "unknown")] == ["0", "0", "1", "0"]
    assert types(m)["dapr_resiliency_cb_state"] == "gauge"
    # A circuit breaker execution with a state moves the gauges, as daprd's does.
    m.resiliency_executed("cbstatepolicy", "circuitbreaker", "outbound", "app_srv", "closed")
    s = samples(m)
    assert [cb(x) for x in ("closed", "half-open", "open", "unknown")] == ["1", "0", "0", "0"]


def test_error_codes_only_when_enabled() -> None:
    off = DaprMetrics("a")
    off.error_code("state", "ERR_STATE_STORE_NOT_CONFIGURED")
    assert off.render() == b""
    on = DaprMetrics("a", record_error_codes=True)
    on.error_code("state", "ERR_STATE_STORE_NOT_CONFIGURED")
    on.error_code("", "ERR_X")  # malformed: dropped
    s = samples(on)
    code = "ERR_STATE_STORE_NOT_CONFIGURED"
    assert s == {key("dapr_error_code_total", app_id="a", category="state", error_code=code): "1"}


def test_disabled_metrics_record_nothing() -> None:
    m = DaprMetrics("a", enabled=False)
    m.http_server("GET", "/v1.0/healthz", 204, 1, 0, 0)
    m.component_state("s", "get", True, 1)
    m.error_code("c", "d")
    assert m.render() == b""


def test_custom_buckets() -> None:
    m = DaprMetrics("a", buckets=[10, 100])
    m.component_state("s", "get", True, 10)
    page = m.render().decode()
    assert page.count("dapr_component_state_latencies_bucket{") == 3
    assert 'le="10"} 0\n' in page and 'le="100"} 1\n' in page


# ---- the path label --------------------------------------------------------------------------


WF = "/v1.0-alpha1/workflows/dapr"


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/v1.0/state/statestore/key", "/v1.0/state/statestore"),
        ("/v1.0/state/statestore", "/v1.0/state/statestore"),
        ("/v1.0/secrets/vault/name", "/v1.0/secrets/vault"),
        ("/v1.0/publish/pubsub/topic", "/v1.0/publish/pubsub/topic"),
        ("/v1.0/healthz", "/v1.0/healthz"),
        ("/v1.0/actors/DemoActor/1/state/key", "/v1.0/actors/DemoActor/{id}/state"),
        ("/v1.0/actors/DemoActor/1/method/foo", "/v1.0/actors/DemoActor/{id}/method"),
        ("/v1.0/actors/DemoActor/1/timer/name?query=string", "/v1.0/actors/DemoActor/{id}/timer"),
        ("v1/actors/DemoActor/1/timer/name", "/v1/actors/DemoActor/{id}/timer"),
        ("/actors/DemoActor/1/method/method1", "/actors/DemoActor/{id}/method/method1"),
        ("actors/DemoActor/1/method/m", "actors/DemoActor/{id}/method/m"),
        (f"{WF}/mywf/start?instanceID=1", f"{WF}/mywf/start"),
        (f"{WF}/1234", f"{WF}/{{instanceId}}"),
        (f"{WF}/1234/terminate", f"{WF}/{{instanceId}}/terminate"),
        (f"{WF}/1234/raiseEvent/ev", f"{WF}/{{instanceId}}/raiseEvent/{{eventName}}"),
        (f"{WF}/1234/start/a/b", f"{WF}/{{instanceId}}/start"),
        (WF, WF),
        ("", ""),
    ],
)  # fmt: skip
def test_legacy_path_label_matches_daprd(path: str, label: str) -> None:
    assert legacy_path_label(path) == label


def test_increased_cardinality_uses_daprds_truncation() -> None:
    m = DaprMetrics("a")
    assert server_path(m, "/v1.0/invoke/myapp/method/hi") == "/v1.0/invoke/myapp/method/hi"
    m = DaprMetrics("a")
    assert server_path(m, "/v1.0/state/mystore/myvalue") == "/v1.0/state/mystore"
    m = DaprMetrics("a")
    assert server_path(m, "//v1.0/actors/T/1/method/foo") == "/v1.0/actors/T/{id}/method"
    m = DaprMetrics("a")
    assert server_path(m, "/v1.0/state/my%20store/k") == "/v1.0/state/my store"


def test_low_cardinality_without_matching_drops_the_path() -> None:
    m = DaprMetrics("a", increased_cardinality=False)
    m.http_server("GET", "/v1.0/invoke/myapp/method/hi", 200, 1, 0, 0)
    m.http_server("GET", "/v1.0/state/mystore/k", 200, 1, 0, 0)
    m.http_client("GET", "/orders/1", 200, 1, 0, 0)
    m.http_client("GET", "/dapr/config", 200, 1, 0, 0)
    s = samples(m)
    assert s['dapr_http_server_request_count{app_id="a",method="GET",path="",status="200"}'] == "2"
    assert (
        s['dapr_http_client_completed_count{app_id="a",method="GET",path="",status="200"}'] == "1"
    )
    assert (
        s[
            'dapr_http_client_completed_count{app_id="a",method="GET",path="/dapr/config",status="200"}'
        ]
        == "1"
    )


def test_path_matching_low_cardinality() -> None:
    m = DaprMetrics(
        "myapp",
        increased_cardinality=False,
        path_matching=[
            "/v1.0/invoke/myapp/method/basket",
            "/v1.0/invoke/myapp/method/orders/1234",
            "/v1.0/invoke/myapp/method/orders/{orderID}",
            "/v1.0/invoke/myapp/method/orders",
            "/v1.0/state/mystore/{key}",
        ],
    )
    for path in (
        "/v1.0/invoke/myapp/method/orders/1111",
        "/v1.0/invoke/myapp/method/orders/1234",
        "/v1.0/invoke/myapp/method/orders",
        "/v1.0/invoke/myapp/method/basket",
        "/v1.0/invoke/myapp/method/items/1234",
        "//v1.0/invoke/myapp/method/orders/9999",
        "/v1.0/state/mystore/foo",
    ):
        m.http_server("GET", path, 200, 1, 0, 0)
    s = samples(m)

    def count(label: str) -> str:
        return s[
            f'dapr_http_server_request_count{{app_id="myapp",method="GET",path="{label}",status="200"}}'
        ]

    assert count("/v1.0/invoke/myapp/method/orders/{orderID}") == "2"
    assert count("/v1.0/invoke/myapp/method/orders/1234") == "1"  # a literal beats a wildcard
    assert count("/v1.0/invoke/myapp/method/orders") == "1"
    assert count("/v1.0/invoke/myapp/method/basket") == "1"
    assert count("/v1.0/state/mystore/{key}") == "1"
    assert count("") == "1"  # unmatched: the catch-all bucket


def test_path_matching_root_subtree_and_app_routes() -> None:
    m = DaprMetrics(
        "a",
        increased_cardinality=False,
        path_matching=["/v1/orders/{orderID}", "/v1/", "/", "orders/{id}", "/files/{rest...}"],
    )
    assert server_path(m, "/v1/orders/12345") == "/v1/orders/{orderID}"
    m = DaprMetrics("a", increased_cardinality=False, path_matching=["/v1/", "/"])
    assert server_path(m, "/v1/basket") == "/v1/"
    m = DaprMetrics("a", increased_cardinality=False, path_matching=["/v1/", "/"])
    assert server_path(m, "/basket/12345") == "/"
    m = DaprMetrics("a", increased_cardinality=False, path_matching=["orders/{id}"])
    # App routes also match under service invocation, whatever the app id.
    assert server_path(m, "/v1.0/invoke/order-app/method/orders/7") == (
        "/v1.0/invoke/{app_id}/method/orders/{id}"
    )
    m = DaprMetrics("a", increased_cardinality=False, path_matching=["//orders", "/orders"])
    assert server_path(m, "//orders") == "/orders"
    m = DaprMetrics("a", increased_cardinality=False, path_matching=["/files/{rest...}"])
    assert server_path(m, "/files/a/b/c") == "/files/{rest...}"
    m = DaprMetrics("a", increased_cardinality=False, path_matching=["/dir/{$}"])
    assert server_path(m, "/dir/") == "/dir/{$}"
    m = DaprMetrics("a", increased_cardinality=False, path_matching=["/dir/{$}"])
    assert server_path(m, "/dir/x") == ""


def test_path_matching_high_cardinality_keeps_unmatched_paths() -> None:
    patterns = ["/v1.0/actors/{actorType}/{actorId}/method/{method}"]
    m = DaprMetrics("a", path_matching=patterns)
    assert server_path(m, "/v1.0/actors/T/1/method/foo", "POST") == (
        "/v1.0/actors/{actorType}/{actorId}/method/{method}"
    )
    m = DaprMetrics("a", path_matching=patterns)
    assert server_path(m, "/v1.0/state/s/key") == "/v1.0/state/s/key"


def test_exclude_verbs_blanks_the_method() -> None:
    m = DaprMetrics("a", exclude_verbs=True)
    m.http_server("GET", "/orders", 200, 1, 0, 0)
    m.http_server("POST", "/orders", 200, 1, 0, 0)
    m.http_client("PUT", "/x", 200, 1, 0, 0)
    s = samples(m)
    assert (
        s['dapr_http_server_request_count{app_id="a",method="",path="/orders",status="200"}'] == "2"
    )
    assert s['dapr_http_client_completed_count{app_id="a",method="",path="/x",status="200"}'] == "1"


def test_series_cap_applies_to_recorders_and_bounds_memory() -> None:
    m = DaprMetrics("a", max_series=3)
    for i in range(50):
        m.http_server("GET", f"/v1.0/invoke/app/method/o{i}", 200, 1, 0, 0)
    page = m.render().decode()
    assert page.count("\ndapr_http_server_request_count{") == 3
    dropped = m.registry.dropped()
    assert dropped["dapr_http_server_request_count"] == 47
    assert "pillion_metrics_dropped_total" in m.render().decode()
    # The series that exist keep counting through the cached path.
    m.http_server("GET", "/v1.0/invoke/app/method/o0", 200, 1, 0, 0)
    labels = {"method": "GET", "path": "/v1.0/invoke/app/method/o0", "status": "200"}
    assert samples(m)[key("dapr_http_server_request_count", app_id="a", **labels)] == "2"


# ---- from_config ------------------------------------------------------------------------------


def test_from_config_reads_every_field() -> None:
    spec: dict[str, Any] = {
        "enabled": True,
        "recordErrorCodes": True,
        "latencyDistributionBuckets": [10, 25, 40],
        "http": {
            "increasedCardinality": False,
            "pathMatching": ["/orders/{orderID}"],
            "excludeVerbs": True,
        },
    }
    m = DaprMetrics.from_config("app", "ns", spec)
    m.http_server("GET", "/orders/5", 200, 30, 0, 0)
    m.error_code("state", "ERR_X")
    s = samples(m)
    assert (
        s[
            'dapr_http_server_request_count{app_id="app",method="",path="/orders/{orderID}",status="200"}'
        ]
        == "1"
    )
    assert (
        s[
            'dapr_http_server_latency_bucket{app_id="app",method="",path="/orders/{orderID}",status="200",le="40"}'
        ]
        == "1"
    )
    assert (
        s[
            'dapr_http_server_latency_bucket{app_id="app",method="",path="/orders/{orderID}",status="200",le="25"}'
        ]
        == "0"
    )
    assert 'dapr_error_code_total{app_id="app",category="state",error_code="ERR_X"}' in s
    assert m.namespace == "ns" and m.enabled


def test_from_config_defaults() -> None:
    specs: list[dict[str, Any] | None] = [
        None,
        {},
        {"http": None, "latencyDistributionBuckets": []},
    ]
    for spec in specs:
        m = DaprMetrics.from_config("app", "", spec)
        assert m.enabled and not m.record_error_codes
        assert server_path(m, "/v1.0/state/s/k") == "/v1.0/state/s"
        page = m.render().decode()
        assert page.count("dapr_http_server_latency_bucket{") == len(DEFAULT_LATENCY_BUCKETS) + 1


def test_from_config_disabled() -> None:
    m = DaprMetrics.from_config("app", "", {"enabled": False})
    assert not m.enabled
    m.http_server("GET", "/", 200, 1, 0, 0)
    assert m.render() == b""


def test_from_config_warns_about_rules(caplog: pytest.LogCaptureFixture) -> None:
    spec = {"rules": [{"name": "dapr_runtime_service_invocation_req_sent_total", "labels": []}]}
    with caplog.at_level(logging.WARNING, logger="pillion.observability.dapr_metrics"):
        DaprMetrics.from_config("app", "", spec)
    assert "spec.metrics.rules" in caplog.text


LDB = "latencyDistributionBuckets"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("yes", "spec.metrics: expected a mapping"),
        ({"enabled": "true"}, "spec.metrics.enabled: expected true or false"),
        ({"recordErrorCodes": 1}, "spec.metrics.recordErrorCodes"),
        ({"http": []}, "spec.metrics.http: expected a mapping"),
        ({"http": {"increasedCardinality": "no"}}, "spec.metrics.http.increasedCardinality"),
        ({"http": {"excludeVerbs": 0}}, "spec.metrics.http.excludeVerbs"),
        ({"http": {"pathMatching": "/orders"}}, "spec.metrics.http.pathMatching: expected a list"),
        ({"http": {"pathMatching": ["/ok", ""]}}, r"spec.metrics.http.pathMatching\[1\]"),
        ({"http": {"pathMatching": [7]}}, r"spec.metrics.http.pathMatching\[0\]"),
        ({"http": {"pathMatching": ["GET /orders"]}}, "method or host prefixes"),
        ({"http": {"pathMatching": ["/o/x{id}"]}}, "whole segment"),
        ({LDB: "1,2"}, f"spec.metrics.{LDB}: expected a list"),
        ({LDB: [1, 2.5]}, rf"{LDB}\[1\]: expected an integer"),
        ({LDB: [True]}, rf"{LDB}\[0\]: expected an integer"),
        ({LDB: [0, 5]}, rf"{LDB}\[0\]: bucket bounds must be positive"),
        ({LDB: [5, 5]}, rf"{LDB}\[1\]: bounds must be strictly increasing"),
    ],
)  # fmt: skip
def test_from_config_errors_name_the_field(spec: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DaprMetrics.from_config("app", "", spec)


def test_argument_caches_stay_bounded() -> None:
    from pillion.observability import dapr_metrics

    m = DaprMetrics("a", increased_cardinality=False)
    for i in range(dapr_metrics._CACHE_LIMIT + 500):
        m.http_server("GET", f"/v1.0/invoke/b/method/orders/{i}", 200, 1, 0, 0)
    assert len(m._c_http_server) <= dapr_metrics._CACHE_LIMIT
    s = samples(m)
    labels = {"method": "GET", "path": "", "status": "200"}
    assert s[key("dapr_http_server_request_count", app_id="a", **labels)] == str(
        dapr_metrics._CACHE_LIMIT + 500
    )
