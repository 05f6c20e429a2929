"""Sidecar lifecycle: health ordering, metadata, shutdown, API token and bad manifests."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from pillion.testing.procs import Proc, free_port, http_status, start_sidecar, wait_until
from tests.e2e.conftest import Pair, bad_start, call, start_app


def test_outbound_ready_before_app(home: Path, resources: Path) -> None:
    app_port = free_port()  # nothing listens yet
    sc = start_sidecar("late", home=home, resources=[resources], app_port=app_port)
    app = None
    try:
        assert http_status(sc.http_port, "/v1.0/healthz/outbound") == 204
        r = call(sc.http_port, "GET", "/v1.0/healthz")
        assert r.status == 500 and r.json()["errorCode"] == "ERR_HEALTH_NOT_READY"
        app, _ = _start_app_on("late", app_port)
        wait_until(lambda: http_status(sc.http_port, "/v1.0/healthz") == 204, 10, "healthz")
        r = call(sc.http_port, "GET", "/v1.0/healthz?appid=other")
        assert r.status == 500 and r.json()["errorCode"] == "ERR_HEALTH_APPID_NOT_MATCH"
        assert call(sc.http_port, "GET", "/v1.0/healthz?appid=late").status == 204
    finally:
        assert sc.proc.stop() == 0
        if app:
            app.stop()
    assert "Exited" not in sc.proc.output  # the CLI prints those, not the sidecar
    assert "dapr initialized. Status: Running." in sc.proc.output


def _start_app_on(app_id: str, port: int) -> tuple[Proc, int]:
    from tests.e2e.conftest import APPS

    p = Proc.start(
        f"app {app_id}", [sys.executable, str(APPS / "echo.py"), str(port)], env={"APP_ID": app_id}
    )
    p.wait_for_line("listening")
    return p, port


def test_metadata(pair: Pair) -> None:
    p = pair.alpha.http_port
    md = call(p, "GET", "/v1.0/metadata").json()
    assert md["id"] == "alpha"
    comps = {c["name"]: c for c in md["components"]}
    assert comps["statestore"]["type"] == "state.sqlite"
    assert comps["statestore"]["version"] == "v1"
    assert set(comps["statestore"]["capabilities"]) == {
        "ETAG",
        "TRANSACTIONAL",
        "TTL",
        "QUERY_API",
        "ACTOR",
    }
    assert "ACTOR" not in comps["memstore"]["capabilities"]
    conn = md["appConnectionProperties"]
    assert conn["protocol"] == "http" and conn["channelAddress"] == "127.0.0.1"
    assert conn["port"] > 0
    assert call(p, "PUT", "/v1.0/metadata/color", body="blue").status == 204
    assert call(p, "GET", "/v1.0/metadata").json()["extended"]["color"] == "blue"


def test_sdk_metadata_and_wait(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    from dapr.clients.health import DaprHealth
    from dapr.clients.http.client import DaprHttpClient  # noqa: F401 - import check

    monkeypatch.setenv("DAPR_HTTP_PORT", str(pair.beta.http_port))
    DaprHealth.wait_for_sidecar()  # the SDK's own readiness wait (healthz/outbound)


def test_shutdown_api(home: Path, resources: Path) -> None:
    sc = start_sidecar("stopper", home=home, resources=[resources])
    assert call(sc.http_port, "POST", "/v1.0/shutdown").status == 204
    sc.proc.popen.wait(15)
    assert sc.proc.popen.returncode == 0


def test_sigterm_exits_zero_and_deregisters(pair: Pair, home: Path, resources: Path) -> None:
    app, port = start_app("delta")
    sc = start_sidecar("delta", home=home, resources=[resources], app_port=port, wait="ready")
    assert call(pair.alpha.http_port, "GET", "/v1.0/invoke/delta/method/x").status == 200
    sc.proc.signal(signal.SIGTERM)
    assert sc.proc.popen.wait(15) == 0
    app.stop()
    r = call(pair.alpha.http_port, "GET", "/v1.0/invoke/delta/method/x")
    assert r.status == 500 and r.json()["errorCode"] == "ERR_DIRECT_INVOKE"


def test_api_token(home: Path, resources: Path) -> None:
    sc = start_sidecar("guarded", home=home, resources=[resources], env={"DAPR_API_TOKEN": "s3"})
    try:
        assert http_status(sc.http_port, "/v1.0/healthz/outbound") == 204
        r = call(sc.http_port, "GET", "/v1.0/metadata")
        assert r.status == 401 and r.body == b"invalid api token"
        r = call(sc.http_port, "GET", "/v1.0/metadata", headers={"dapr-api-token": "s3"})
        assert r.status == 200
    finally:
        sc.proc.stop()


BAD_MANIFESTS = {
    "syntax": ("kind: Component\nmetadata: {name: x\n", "line"),
    "no-name": (
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {}\n"
        "spec:\n  type: state.sqlite\n",
        "metadata.name",
    ),
    "no-type": (
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: s}\n"
        "spec:\n  version: v1\n",
        "spec.type",
    ),
    "bad-meta": (
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: s}\nspec:\n"
        "  type: state.sqlite\n  metadata:\n  - value: 1\n",
        "spec.metadata[0]",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_manifest_stops_startup(tmp_path: Path, home: Path, case: str) -> None:
    text, field = BAD_MANIFESTS[case]
    (tmp_path / "ok.yaml").write_text("")
    (tmp_path / "broken.yaml").write_text("---\n# first doc is fine\n---\n" + text)
    code, out = bad_start(tmp_path, home)
    assert code != 0, out
    assert "broken.yaml" in out and field in out, out
    assert "Traceback" not in out


def test_bad_component_metadata_and_unknown_type(tmp_path: Path, home: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: s}\nspec:\n"
        "  type: state.nosuch\n  version: v1\n"
    )
    code, out = bad_start(tmp_path, home)
    assert code != 0 and "state.nosuch" in out and "Traceback" not in out
    (tmp_path / "c.yaml").write_text(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata: {name: s}\nspec:\n"
        "  type: state.sqlite\n  version: v1\n  ignoreErrors: true\n"
    )
    sc = start_sidecar("lenient", home=home, resources=[tmp_path])
    try:
        assert call(sc.http_port, "GET", "/v1.0/metadata").json().get("components") is None
        r2 = call(sc.http_port, "GET", "/v1.0/state/s/k")
        assert r2.status == 500 and r2.json()["errorCode"] == "ERR_STATE_STORE_NOT_CONFIGURED"
    finally:
        sc.proc.stop()
