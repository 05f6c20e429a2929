"""Waiting in tests: poll a condition with a deadline instead of sleeping and hoping."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest


async def eventually(
    cond: Callable[[], bool], timeout: float = 10.0, what: Callable[[], str] | None = None
) -> None:
    """Return once `cond()` holds; fail the test after `timeout` seconds, saying `what()`."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            pytest.fail(f"after {timeout:g}s: {what() if what else 'condition not met'}")
        await asyncio.sleep(0.005)


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """eventually() without a message of its own."""
    await eventually(cond, timeout)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run one async test body on a fresh event loop."""
    asyncio.run(main())
