"""What the broker-backed pub/sub component tests share: consumer group names and a handler
that records what it was given."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

from pillion.components.pubsub.api import Message


def group() -> str:
    """A consumer group no other test uses."""
    return f"cg-{uuid.uuid4().hex[:10]}"


class Inbox:
    """A subscription handler: records every attempt (and when it came), fails those `fail`
    picks, holds each for `hold` seconds, and keeps the messages it took."""

    def __init__(self, fail: Callable[[Message], bool] | None = None, hold: float = 0.0) -> None:
        self.messages: list[Message] = []
        self.attempts: list[Message] = []
        self.times: list[float] = []  # time.monotonic() of each attempt
        self._fail = fail
        self._hold = hold

    async def __call__(self, msg: Message) -> None:
        self.attempts.append(msg)
        self.times.append(time.monotonic())
        if self._hold:
            await asyncio.sleep(self._hold)
        if self._fail is not None and self._fail(msg):
            raise RuntimeError("test: handler failure")
        self.messages.append(msg)

    @property
    def data(self) -> list[bytes]:
        return [m.data for m in self.messages]
