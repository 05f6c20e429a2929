"""Conformance-suite plumbing: run `async def` tests on the loop of the `aio` fixture."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
from collections.abc import Iterator

import pytest


@pytest.fixture
def aio() -> Iterator[asyncio.Runner]:
    """One event loop per test; component fixtures initialise on it and tests run on it."""
    with asyncio.Runner() as runner:
        yield runner


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    # pytest-asyncio is not a dependency; this is the small part of it the suites need.
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    runner = pyfuncitem.funcargs.get("aio")
    if not isinstance(runner, asyncio.Runner):
        raise pytest.UsageError(f"{pyfuncitem.nodeid}: async tests need the `aio` fixture")
    params = inspect.signature(pyfuncitem.obj).parameters
    runner.run(pyfuncitem.obj(**{name: pyfuncitem.funcargs[name] for name in params}))
    return True


def require_server(name: str, host: str, port: int, timeout: float = 1.0) -> None:
    """Skip when the backend's server does not answer; under CI=true that is a failure instead.

    CI provides every server, so a missing one there is a broken pipeline, not a reason to skip.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        reason = f"{name} server not reachable at {host}:{port}: {exc}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


async def delete_jetstream_streams(topics: list[str]) -> None:
    """Delete the JetStream streams that hold `topics`: the server keeps streams for ever and
    lists them 256 to a page, so tests that make streams remove them."""
    import nats
    import nats.js.errors

    nc = await nats.connect("nats://127.0.0.1:4222")
    try:
        jsm = nc.jsm()
        for topic in topics:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await jsm.delete_stream(await jsm.find_stream_name_by_subject(topic))
    finally:
        await nc.close()
