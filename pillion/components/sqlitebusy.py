"""SQLite lock handling shared by the embedded components: retry busy without blocking the loop."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# SQLITE_BUSY and SQLITE_LOCKED (primary codes): another connection holds the lock.
_BUSY_CODES = (5, 6)


def is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _BUSY_CODES


async def retry_busy(
    fn: Callable[[], T], budget: float, what: str, error: Callable[[str], Exception]
) -> T:
    """Call `fn` until it stops hitting another connection's lock or `budget` seconds pass.

    The connections keep busy_timeout at 0 so a lock never freezes the event loop; waiting
    happens here, in asyncio sleeps. Failures become `error(message)` (the kind's error type).
    """
    deadline = time.monotonic() + budget
    delay = 0.001
    while True:
        try:
            return fn()
        except sqlite3.Error as exc:
            if not is_busy(exc):
                raise error(f"sqlite {what}: {exc}") from exc
            if time.monotonic() >= deadline:
                raise error(f"sqlite {what} (waited {budget:g}s): {exc}") from exc
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
