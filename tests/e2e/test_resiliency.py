"""Resiliency policies end to end, counted at the callee: retries make exactly min(N, maxRetries)+1
calls, a timeout answers in time, an open breaker forwards nothing and then lets exactly
`maxRequests` probes through; the same for a component (an http output binding) and for
pub/sub delivery to the app (an inbound policy)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from pillion.testing.procs import Proc, Sidecar, wait_until
from tests.e2e.conftest import call
from tests.e2e.observe import component, sqlite_pubsub, start_observed

pytestmark = pytest.mark.e2e

POLICIES = """
apiVersion: dapr.io/v1alpha1
kind: Resiliency
metadata:
  name: policies
spec:
  policies:
    timeouts:
      fast: 500ms
    retries:
      five: {{policy: constant, duration: 10ms, maxRetries: 5}}
    circuitBreakers:
      cb: {{maxRequests: 2, interval: 0s, timeout: 2s, trip: consecutiveFailures >= 3}}
  targets:
    apps:
      retried: {{retry: five}}
      slow: {{timeout: fast}}
      broken: {{circuitBreaker: cb}}
    components:
      flakyhttp: {{outbound: {{retry: five}}}}
      slowhttp: {{outbound: {{timeout: fast}}}}
      brokenhttp: {{outbound: {{circuitBreaker: cb}}}}
      pubsub: {{inbound: {{retry: five}}}}
"""


@dataclass
class World:
    caller: Sidecar
    ports: dict[str, int]
    procs: list[Proc]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("resiliency")
    home = tmp / "home"
    home.mkdir()
    plain = tmp / "plain"
    plain.mkdir()
    (plain / "pubsub.yaml").write_text(sqlite_pubsub(tmp / "ps.db"))
    procs: list[Proc] = []
    ports: dict[str, int] = {}
    try:
        for app_id in ("retried", "slow", "broken"):
            app, sc, port = start_observed(app_id, home=home, resources=[plain])
            procs += [app, sc.proc]
            ports[app_id] = port
        res = tmp / "caller"
        res.mkdir()
        (res / "pubsub.yaml").write_text(sqlite_pubsub(tmp / "ps.db"))
        (res / "resiliency.yaml").write_text(POLICIES.format())
        target = ports["retried"]
        (res / "bindings.yaml").write_text(
            "---\n".join(
                component(n, "bindings.http", url=f"http://127.0.0.1:{target}")
                for n in ("flakyhttp", "slowhttp", "brokenhttp")
            )
        )
        # The caller's app fails the first 3 deliveries of each event on topic "flaky".
        app, caller, port = start_observed(
            "caller", home=home, resources=[res], env={"FLAKY_EVENTS": "3"}
        )
        procs += [app, caller.proc]
        ports["caller"] = port
        yield World(caller, ports, procs)
    finally:
        for p in procs:
            p.stop()


def count(w: World, app: str, key: str) -> int:
    return int(call(w.ports[app], "GET", f"/count/{key}").json()["count"])


@pytest.mark.parametrize("failures", [0, 3, 10])
def test_app_retries_are_exact(world: World, failures: int) -> None:
    key = f"retry{failures}"
    r = call(
        world.caller.http_port, "GET", f"/v1.0/invoke/retried/method/flaky/{key}?fail={failures}"
    )
    calls = min(failures, 5) + 1
    assert count(world, "retried", key) == calls
    # Out of retries: the app's own last answer comes back as it was.
    assert r.status == (200 if failures <= 5 else 500)
    assert r.json()["call"] == calls


def test_no_policy_no_retry(world: World) -> None:
    r = call(world.caller.http_port, "GET", "/v1.0/invoke/slow/method/flaky/noretry?fail=3")
    assert r.status == 500
    assert count(world, "slow", "noretry") == 1


def test_app_timeout(world: World) -> None:
    t0 = time.monotonic()
    r = call(world.caller.http_port, "GET", "/v1.0/invoke/slow/method/flaky/t?sleep=2")
    elapsed = time.monotonic() - t0
    assert elapsed < 0.6, elapsed
    assert r.status == 500
    assert r.json()["errorCode"] == "ERR_DIRECT_INVOKE"
    assert "deadline" in r.json()["message"]


def _breaker(world: World, hit: Callable[[float], int], counted: Callable[[], int]) -> None:
    """Trip on 3 consecutive failures; open: nothing forwarded; after 2 s: 2 probes only."""
    for i in range(3):
        assert hit(0) >= 400
        assert counted() == i + 1
    opened = time.monotonic()
    for _ in range(4):
        assert hit(0) == 500
    assert counted() == 3  # open: nothing reached the target
    # Half-open after the breaker's 2 s timeout: five at once, each probe takes 0.3 s.
    wait_until(lambda: time.monotonic() - opened > 2.2, 5, "the breaker's timeout")
    with ThreadPoolExecutor(5) as pool:
        statuses = list(pool.map(hit, [0.3] * 5))
    assert counted() == 5, statuses  # exactly maxRequests probes went through
    assert hit(0) == 500  # they failed: open again
    assert counted() == 5


def test_app_circuit_breaker(world: World) -> None:
    def hit(sleep: float) -> int:
        path = f"/v1.0/invoke/broken/method/flaky/cb?fail=1000&sleep={sleep}"
        return call(world.caller.http_port, "GET", path).status

    _breaker(world, hit, lambda: count(world, "broken", "cb"))
    r = call(world.caller.http_port, "GET", "/v1.0/invoke/broken/method/flaky/cb?fail=1000")
    assert r.json()["errorCode"] == "ERR_DIRECT_INVOKE"
    assert "circuit breaker is open" in r.json()["message"]


def _bind(world: World, name: str, path: str) -> int:
    body = json.dumps({"operation": "post", "data": {}, "metadata": {"path": path}})
    return call(world.caller.http_port, "POST", f"/v1.0/bindings/{name}", body).status


@pytest.mark.parametrize("failures", [0, 3, 10])
def test_component_retries_are_exact(world: World, failures: int) -> None:
    key = f"bind{failures}"
    status = _bind(world, "flakyhttp", f"/flaky/{key}?fail={failures}")
    assert count(world, "retried", key) == min(failures, 5) + 1
    assert status == (200 if failures <= 5 else 500)


def test_component_timeout(world: World) -> None:
    t0 = time.monotonic()
    status = _bind(world, "slowhttp", "/flaky/bt?sleep=2")
    assert time.monotonic() - t0 < 0.6
    assert status == 500


def test_component_circuit_breaker(world: World) -> None:
    _breaker(
        world,
        lambda sleep: _bind(world, "brokenhttp", f"/flaky/bcb?fail=1000&sleep={sleep}"),
        lambda: count(world, "retried", "bcb"),
    )


def test_pubsub_inbound_retries(world: World) -> None:
    r = call(
        world.caller.http_port,
        "POST",
        "/v1.0/publish/pubsub/flaky",
        json.dumps({"x": 1}),
        {"content-type": "application/json"},
    )
    assert r.status == 204
    # Delivered 3 times with failures, then accepted: 4 deliveries, all from the sidecar's retries.
    wait_until(lambda: count(world, "caller", "flaky") >= 4, 10, "4 deliveries")
    events = call(world.ports["caller"], "GET", "/seen/flaky").json()
    assert len({e["event"]["id"] for e in events}) == 1
    assert count(world, "caller", "flaky") == 4
