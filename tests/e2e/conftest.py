"""Fixtures that start real sidecars and apps; their logs are printed when a test fails."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pillion.testing.procs import Proc, Sidecar, free_port, start_sidecar, wait_until

APPS = Path(__file__).parent / "apps"

RESOURCES = """
apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: statestore
spec:
  type: state.sqlite
  version: v1
  metadata:
  - name: connectionString
    value: "{db}"
  - name: actorStateStore
    value: "true"
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: memstore
spec:
  type: state.in-memory
  version: v1
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: shared
spec:
  type: state.sqlite
  version: v1
  metadata:
  - name: connectionString
    value: "{db}"
  - name: keyPrefix
    value: none
---
apiVersion: dapr.io/v1alpha1
kind: Component
metadata:
  name: byname
spec:
  type: state.sqlite
  version: v1
  metadata:
  - name: connectionString
    value: "{db}"
  - name: keyPrefix
    value: name
"""


@dataclass
class Reply:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    port: int,
    method: str,
    path: str,
    body: bytes | str | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    data = body.encode() if isinstance(body, str) else body
    conn.request(method, path, body=data, headers=headers or {})
    r = conn.getresponse()
    out = Reply(r.status, r.reason, {k.lower(): v for k, v in r.getheaders()}, r.read())
    conn.close()
    return out


def failed_start(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `pillion sidecar` with `args` (and a free HTTP port) where it is expected to stop
    during start-up; the finished process, output captured."""
    cmd = [sys.executable, "-m", "pillion", "sidecar", *args]
    cmd += ["--dapr-http-port", str(free_port()), "--pillion-home", str(home)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


def bad_start(resources: Path, home: Path) -> tuple[int, str]:
    """A sidecar expected to stop during start-up: its exit code and output."""
    r = failed_start(home, "--app-id", "bad", "--resources-path", str(resources))
    return r.returncode, r.stdout + r.stderr


def start_app(app_id: str) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc.start(
        f"app {app_id}",
        [sys.executable, str(APPS / "echo.py"), str(port)],
        env={"APP_ID": app_id, "PATH": "/usr/bin:/bin"},
    )
    proc.wait_for_line("listening", 10)
    return proc, port


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="session")
def resources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("resources")
    (d / "components.yaml").write_text(RESOURCES.format(db=d / "state.db"))
    return d


@dataclass
class Pair:
    alpha: Sidecar
    beta: Sidecar
    procs: list[Proc]


@pytest.fixture(scope="module")
def pair(home: Path, resources: Path, request: pytest.FixtureRequest) -> Iterator[Pair]:
    procs: list[Proc] = []
    sidecars: dict[str, Sidecar] = {}
    for app_id in ("alpha", "beta"):
        app, port = start_app(app_id)
        procs.append(app)
        sc = start_sidecar(app_id, home=home, resources=[resources], app_port=port, wait="ready")
        procs.append(sc.proc)
        sidecars[app_id] = sc
    yield Pair(sidecars["alpha"], sidecars["beta"], procs)
    for p in procs:
        p.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        p = item.funcargs.get("pair") if hasattr(item, "funcargs") else None
        if isinstance(p, Pair):
            for proc in p.procs:
                rep.sections.append((f"output of {proc.name}", proc.output[-6000:]))


__all__ = ["Pair", "Reply", "call", "start_app", "wait_until"]
