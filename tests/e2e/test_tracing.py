"""W3C tracing end to end: a three-hop invocation chain and a publish -> delivery path give one
trace with the right parent/child links, exported over OTLP/HTTP and Zipkin to collectors the
test runs; sampling rate 0 exports nothing and still passes the caller's context on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pillion.testing.procs import Proc, Sidecar, wait_until
from tests.e2e.conftest import call
from tests.e2e.observe import (
    Collector,
    Span,
    new_traceparent,
    sqlite_pubsub,
    start_observed,
    tracing_config,
)

pytestmark = pytest.mark.e2e


@dataclass
class Mesh:
    collector: Collector
    sidecars: dict[str, Sidecar]
    app_ports: dict[str, int]
    procs: list[Proc]


def _mesh(tmp: Path, rate: str) -> Iterator[Mesh]:
    collector = Collector()
    home = tmp / "home"
    home.mkdir()
    res = tmp / "resources"
    res.mkdir()
    (res / "pubsub.yaml").write_text(sqlite_pubsub(tmp / "pubsub.db"))
    # An input binding for app c only: each event starts a trace its delivery span continues.
    (res / "cron.yaml").write_text(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: cron}\n"
        "spec:\n  type: bindings.cron\n  version: v1\n  metadata:\n"
        "  - {name: schedule, value: '@every 1s'}\n  - {name: route, value: /events/cron}\n"
        "scopes: [c]\n"
    )
    config = tracing_config(tmp / "config.yaml", rate, collector.port)
    procs: list[Proc] = []
    sidecars: dict[str, Sidecar] = {}
    ports: dict[str, int] = {}
    try:
        for app_id in ("a", "b", "c"):
            app, sc, port = start_observed(app_id, home=home, resources=[res], config=config)
            procs += [app, sc.proc]
            sidecars[app_id] = sc
            ports[app_id] = port
        yield Mesh(collector, sidecars, ports, procs)
    finally:
        for p in procs:
            p.stop()
        collector.close()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    yield from _mesh(tmp_path_factory.mktemp("tracing"), "1")


def _wait_spans(c: Collector, trace_id: str, source: str, n: int) -> list[Span]:
    wait_until(
        lambda: len(c.trace(trace_id, source)) >= n,
        10,
        f"{n} {source} spans of trace {trace_id}",
    )
    return c.trace(trace_id, source)


def _span_id(traceparent: str) -> str:
    return traceparent.split("-")[2]


@pytest.mark.parametrize("source", ["otlp", "zipkin"])
def test_three_hop_chain_is_one_trace(mesh: Mesh, source: str) -> None:
    tp, trace_id, root = new_traceparent()
    # The test is the client: sidecar a -> app b -> (sidecar b) -> sidecar c -> app c.
    r = call(
        mesh.sidecars["a"].http_port,
        "GET",
        "/v1.0/invoke/b/method/hop?next=c",
        headers={"traceparent": tp},
    )
    assert r.status == 200, r.body
    hops = r.json()
    assert [h["app"] for h in hops] == ["b", "c"]
    # The API answer carries the context of the sidecar's own span, in the caller's trace.
    assert r.headers["traceparent"].split("-")[1] == trace_id
    # daprd's model: an API span on each caller's sidecar, one CallLocal span on each callee's.
    spans = _wait_spans(mesh.collector, trace_id, source, 4)
    assert len(spans) == 4, spans
    by_id = {s.span_id: s for s in spans}
    # Sidecar a's API span is the child of the test's context.
    a_api = [s for s in spans if s.parent_id == root]
    assert len(a_api) == 1 and a_api[0].service == "a"
    assert a_api[0].name == "CallLocal/b/hop" and a_api[0].kind == "SERVER"
    assert r.headers["traceparent"].split("-")[2] == a_api[0].span_id
    # Each app got the context of its sidecar's CallLocal span (the sidecar-to-sidecar hop and
    # the call to the app), whose parent is the calling sidecar's API span.
    b_local = by_id[_span_id(hops[0]["traceparent"])]
    assert (b_local.service, b_local.kind, b_local.name) == ("b", "SERVER", "CallLocal/b/hop")
    assert b_local.parent_id == a_api[0].span_id
    assert b_local.attributes.get("rpc.service") == "ServiceInvocation"
    # App b passed its context on: sidecar b's API span for the call to c is its child.
    c_local = by_id[_span_id(hops[1]["traceparent"])]
    assert (c_local.service, c_local.name) == ("c", "CallLocal/c/hop")
    b_api = by_id[c_local.parent_id]
    assert b_api.service == "b" and b_api.name == "CallLocal/c/hop" and b_api.kind == "SERVER"
    assert b_api.parent_id == b_local.span_id
    assert b_api.attributes.get("dapr.protocol") == "http"
    assert str(b_api.attributes.get("dapr.status_code")) == "200"


def test_publish_and_delivery_are_one_trace(mesh: Mesh) -> None:
    tp, trace_id, root = new_traceparent()
    r = call(
        mesh.sidecars["a"].http_port,
        "POST",
        "/v1.0/publish/pubsub/traced",
        body=json.dumps({"n": trace_id}),
        headers={"content-type": "application/json", "traceparent": tp},
    )
    assert r.status == 204, r.body

    def event_in(app: str) -> dict[str, object] | None:
        seen = call(mesh.app_ports[app], "GET", "/seen/traced").json()
        return next((e for e in seen if e["event"].get("data") == {"n": trace_id}), None)

    wait_until(lambda: event_in("b") is not None, 10, "the event at app b")
    got = event_in("b")
    assert got is not None
    event, headers = got["event"], got["headers"]
    assert isinstance(event, dict) and isinstance(headers, dict)
    # The envelope carries the publish span's context; the app gets the delivery span's.
    assert event["traceparent"].split("-")[1] == trace_id
    assert event["traceid"] == event["traceparent"]
    publish_span = _span_id(event["traceparent"])
    delivery_span = _span_id(headers["traceparent"])
    assert headers["traceparent"].split("-")[1] == trace_id
    spans = _wait_spans(mesh.collector, trace_id, "otlp", 4)  # publish + a delivery per app
    by_id = {s.span_id: s for s in spans}
    wait_until(lambda: delivery_span in {s.span_id for s in mesh.collector.trace(trace_id, "otlp")})
    by_id = {s.span_id: s for s in mesh.collector.trace(trace_id, "otlp")}
    pub = by_id[publish_span]
    assert pub.service == "a" and pub.parent_id == root
    assert pub.name == "/v1.0/publish/pubsub/traced"
    delivery = by_id[delivery_span]
    assert delivery.name == "pubsub/traced" and delivery.service == "b"
    assert delivery.parent_id == publish_span
    assert delivery.attributes.get("messaging.destination.name") == "traced"


def test_health_calls_are_not_traced(mesh: Mesh) -> None:
    tp, trace_id, _ = new_traceparent()
    assert (
        call(
            mesh.sidecars["a"].http_port, "GET", "/v1.0/healthz", headers={"traceparent": tp}
        ).status
        == 204
    )
    # A later traced call flushes in the same batch window; the health call left no span.
    # (A call to the sidecar's own app: the API span only, whose context the app gets.)
    r = call(
        mesh.sidecars["a"].http_port,
        "GET",
        "/v1.0/invoke/a/method/count/x",
        headers={"traceparent": tp},
    )
    assert r.status == 200
    spans = _wait_spans(mesh.collector, trace_id, "otlp", 1)  # the API span
    assert not [s for s in spans if "healthz" in s.name]


def test_sampling_zero_exports_nothing(tmp_path: Path) -> None:
    gen = _mesh(tmp_path, "0")
    m = next(gen)
    tp, _, _ = new_traceparent()
    r = call(
        m.sidecars["a"].http_port,
        "GET",
        "/v1.0/invoke/b/method/hop?next=c",
        headers={"traceparent": tp},
    )
    assert r.status == 200
    # Not sampled here, but the caller's context still reaches the apps unchanged.
    assert [h["traceparent"] for h in r.json()] == [tp, tp]
    r = call(
        m.sidecars["a"].http_port,
        "POST",
        "/v1.0/publish/pubsub/traced",
        body="{}",
        headers={"content-type": "application/json", "traceparent": tp},
    )
    assert r.status == 204
    wait_until(lambda: bool(call(m.app_ports["b"], "GET", "/seen/traced").json()), 10, "delivery")
    # A graceful stop flushes whatever a tracer queued: after it, nothing may have arrived.
    for p in m.procs:
        p.stop()
    assert m.collector.requests == 0 and not m.collector.spans
    gen.close()


def test_input_binding_event_is_traced(mesh: Mesh) -> None:
    wait_until(
        lambda: bool(call(mesh.app_ports["c"], "GET", "/seen/cron").json()), 10, "a cron event"
    )
    headers = call(mesh.app_ports["c"], "GET", "/seen/cron").json()[0]["headers"]
    _, trace_id, span_id, _ = headers["traceparent"].split("-")
    (span,) = _wait_spans(mesh.collector, trace_id, "otlp", 1)
    assert (span.name, span.kind, span.service) == ("bindings/cron", "CONSUMER", "c")
    assert span.span_id == span_id and span.parent_id == ""
