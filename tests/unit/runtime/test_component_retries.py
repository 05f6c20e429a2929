"""Component start-up retries: init is retried with backoff until initTimeout, config errors not."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

import pytest

from pillion.components import registry
from pillion.components.metadata import ComponentConfigError, ComponentInfo
from pillion.components.state.inmemory import InMemoryStateStore
from pillion.manifests.model import Component, MetadataItem
from pillion.runtime.components import ComponentInitError, Loaded, load_components
from pillion.testing.procs import Proc, free_port, start_sidecar, temp_home

# Init attempts so far, by component name.
ATTEMPTS: dict[str, int] = {}


class FlakyStore(InMemoryStateStore):
    """Fails its first `failures` inits (-1: always) with a connection error or a config error."""

    async def init(self, info: ComponentInfo) -> None:
        ATTEMPTS[info.name] = ATTEMPTS.get(info.name, 0) + 1
        failures = int(info.properties.get("failures", "0"))
        if info.properties.get("error") == "config":
            raise ComponentConfigError("x", "bad value")
        if failures < 0 or ATTEMPTS[info.name] <= failures:
            raise ConnectionRefusedError(f"connect refused (attempt {ATTEMPTS[info.name]})")
        await super().init(info)


@pytest.fixture(autouse=True)
def flaky_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(
        registry._REGISTRY,
        ("state.flaky", "v1"),
        "tests.unit.runtime.test_component_retries:FlakyStore",
    )
    ATTEMPTS.clear()


def flaky(name: str, *, timeout: float | None = None, ignore: bool = False, **md: str) -> Component:
    return Component(
        name=name,
        type="state.flaky",
        metadata=tuple(MetadataItem(k, value=v) for k, v in md.items()),
        init_timeout=timeout,
        ignore_errors=ignore,
        source="flaky.yaml#1",
    )


def load(*components: Component) -> Loaded:
    async def run() -> Loaded:
        loaded = await load_components(components, app_id="app", namespace="default", env={})
        await loaded.close()
        return loaded

    return asyncio.run(run())


def retry_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "not ready" in r.getMessage()
    ]


def test_fails_then_starts_within_timeout(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "pillion.runtime.components")
    t0 = time.monotonic()
    loaded = load(flaky("s", failures="2"))
    elapsed = time.monotonic() - t0
    assert "s" in loaded.state and ATTEMPTS["s"] == 3
    assert 1.4 < elapsed < 3.0, elapsed  # 0.5 s then 1 s of backoff
    lines = retry_lines(caplog)
    assert lines == [
        "component s (state.flaky/v1) not ready: connect refused (attempt 1); retrying in 0.5s",
        "component s (state.flaky/v1) not ready: connect refused (attempt 2); retrying in 1s",
    ]


def test_always_failing_gives_up_after_init_timeout(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "pillion.runtime.components")
    t0 = time.monotonic()
    with pytest.raises(ComponentInitError) as ei:
        load(flaky("s", timeout=2.0, failures="-1"))
    elapsed = time.monotonic() - t0
    assert 1.9 < elapsed < 3.0, elapsed
    msg = str(ei.value)
    n = ATTEMPTS["s"]
    assert n >= 3
    assert "component s (state.flaky/v1) from flaky.yaml#1: not ready after 2s" in msg
    assert f"connect refused (attempt {n})" in msg, msg
    assert len(retry_lines(caplog)) >= n - 1


def test_always_failing_with_ignore_errors_is_skipped() -> None:
    loaded = load(flaky("s", timeout=1.0, ignore=True, failures="-1"), flaky("ok"))
    assert list(loaded.state) == ["ok"]


def test_config_error_fails_at_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "pillion.runtime.components")
    t0 = time.monotonic()
    with pytest.raises(ComponentInitError, match="metadata 'x': bad value"):
        load(flaky("s", error="config"))
    assert time.monotonic() - t0 < 0.5
    assert ATTEMPTS["s"] == 1 and retry_lines(caplog) == []


def redis_manifest(tmp: Path, *, ignore: bool) -> Path:
    port = free_port()  # nothing listens on it
    lines = [
        "apiVersion: dapr.io/v1alpha1",
        "kind: Component",
        "metadata: {name: statestore}",
        "spec:",
        "  type: state.redis",
        "  version: v1",
        "  initTimeout: 2s",
        "  metadata:",
        "  - name: redisHost",
        f'    value: "127.0.0.1:{port}"',
    ]
    if ignore:
        lines.append("  ignoreErrors: true")
    (tmp / "redis.yaml").write_text("\n".join(lines) + "\n")
    return tmp


def test_sidecar_with_unreachable_redis_exits_1(tmp_path: Path) -> None:
    pytest.importorskip("redis")
    resources = redis_manifest(tmp_path, ignore=False)
    argv = [sys.executable, "-m", "pillion", "sidecar", "--app-id", "noredis"]
    argv += ["--resources-path", str(resources), "--dapr-http-port", str(free_port())]
    argv += ["--dapr-grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    argv += ["--pillion-home", str(temp_home())]
    proc = Proc.start("sidecar noredis", argv)
    try:
        code = proc.popen.wait(30)
    finally:
        proc.kill()
    proc.stop()  # joins the output reader
    out = proc.output
    assert code == 1, out
    assert "component statestore (state.redis/v1) not ready" in out, out
    assert "retrying in 0.5s" in out, out
    assert "Traceback" not in out, out


def test_sidecar_with_unreachable_redis_and_ignore_errors_starts(tmp_path: Path) -> None:
    pytest.importorskip("redis")
    resources = redis_manifest(tmp_path, ignore=True)
    sc = start_sidecar("noredis", home=temp_home(), resources=[resources], timeout=20)
    try:
        assert "not ready" in sc.proc.output
    finally:
        assert sc.proc.stop() == 0
