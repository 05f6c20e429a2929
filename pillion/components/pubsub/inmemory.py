"""The `pubsub.in-memory` broker: per-component queues with consumer groups, retries and bounds."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from pillion.components.metadata import ComponentConfigError, ComponentInfo, decode
from pillion.components.pubsub.api import (
    Feature,
    Handler,
    Message,
    PubSub,
    PubSubError,
    SubscribeRequest,
    Subscription,
)

log = logging.getLogger(__name__)

# First redelivery delay after a handler failure; doubles per attempt up to the cap.
RETRY_BASE_S = 0.1
RETRY_MAX_S = 5.0
# How long closing a subscription waits for handlers that are running.
DRAIN_S = 5.0


@dataclass(frozen=True)
class InMemoryMetadata:
    """Metadata of `pubsub.in-memory`; `consumerID` the runtime defaults to the app id."""

    consumer_id: str = field(default="", metadata={"name": "consumerID"})
    concurrency: int = field(default=10, metadata={"name": "concurrency"})

    def validate(self) -> None:
        if self.concurrency < 1:
            raise ComponentConfigError("concurrency", "must be at least 1")


def _concurrency(metadata: Mapping[str, str], default: int) -> int:
    """A subscription's `concurrency` metadata, else the component's."""
    for k, v in metadata.items():
        if k.lower() == "concurrency":
            try:
                n = int(v.strip())
            except ValueError:
                raise PubSubError(
                    f"subscription metadata concurrency: not an integer: {v!r}"
                ) from None
            if n < 1:
                raise PubSubError("subscription metadata concurrency: must be at least 1")
            return n
    return default


def _group_of(metadata: Mapping[str, str], default: str) -> str:
    for k, v in metadata.items():
        if k.lower() == "consumerid" and v:
            return v
    return default


class _Pending:
    __slots__ = ("attempt", "data", "id", "metadata")

    def __init__(self, id: str, data: bytes, metadata: Mapping[str, str]) -> None:
        self.id = id
        self.data = data
        self.metadata = metadata
        self.attempt = 0


class _Group:
    """One consumer group of one topic: a FIFO its subscriptions compete for."""

    def __init__(self, topic: str, name: str) -> None:
        self.topic = topic
        self.name = name
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.members: list[_InMemorySubscription] = []
        self.retries: set[asyncio.TimerHandle] = set()

    def retry_later(self, p: _Pending) -> None:
        delay = min(RETRY_BASE_S * 2 ** (p.attempt - 1), RETRY_MAX_S)
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self.retries.discard(handle)
            self.queue.put_nowait(p)

        handle = loop.call_later(delay, fire)
        self.retries.add(handle)

    def drop(self) -> None:
        for h in self.retries:
            h.cancel()
        self.retries.clear()


class _InMemorySubscription:
    def __init__(self, owner: InMemoryPubSub, group: _Group, handler: Handler, limit: int) -> None:
        self._owner = owner
        self._group = group
        self._handler = handler
        self._slots = asyncio.Semaphore(limit)
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False
        self._pump = asyncio.get_running_loop().create_task(
            self._pump_forever(), name=f"pubsub.in-memory {group.topic}/{group.name}"
        )

    async def _pump_forever(self) -> None:
        group = self._group
        while True:
            await self._slots.acquire()
            try:
                p = await group.queue.get()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.get_running_loop().create_task(self._deliver(p))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _deliver(self, p: _Pending) -> None:
        p.attempt += 1
        msg = Message(self._group.topic, p.data, p.metadata, p.id, p.attempt)
        try:
            await self._handler(msg)
        except Exception as exc:
            log.debug(
                "pubsub.in-memory: handler failed for %s (attempt %d): %r", p.id, p.attempt, exc
            )
            self._group.retry_later(p)
        except asyncio.CancelledError:
            # Closing gave up waiting on this handler: the message is not acked, so it goes back.
            self._group.queue.put_nowait(p)
            raise
        finally:
            self._slots.release()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump
        if self._running:
            _, late = await asyncio.wait(set(self._running), timeout=DRAIN_S)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late)
        self._owner._leave(self._group, self)


class InMemoryPubSub(PubSub):
    """A broker inside one component instance, like Dapr's: nothing crosses processes.

    Each topic fans out to its consumer groups (the component's `consumerID`, or a subscription's
    `consumerID` metadata); the subscriptions of one group compete for its messages. A group lives
    while it has subscriptions, so messages published with none are dropped. A failed handler's
    message comes back after 100 ms, doubling per attempt up to 5 s. Each subscription runs at most
    `concurrency` handlers; with 1 it delivers in publish order, hence ORDERED then.
    """

    def __init__(self) -> None:
        self.meta = InMemoryMetadata()
        self._group = ""
        self._topics: dict[str, dict[str, _Group]] = {}
        self._subs: set[_InMemorySubscription] = set()
        self._ids = itertools.count(1)
        self._closed = True

    async def init(self, info: ComponentInfo) -> None:
        meta = decode(InMemoryMetadata, info.properties)
        meta.validate()
        self.meta = meta
        self._group = meta.consumer_id or info.app_id
        self._closed = False

    def features(self) -> frozenset[Feature]:
        return frozenset({Feature.ORDERED}) if self.meta.concurrency == 1 else frozenset()

    async def publish(self, topic: str, data: bytes, metadata: Mapping[str, str]) -> None:
        if self._closed:
            raise PubSubError("pubsub.in-memory is closed")
        msg_id = str(next(self._ids))
        meta = dict(metadata)
        for group in self._topics.get(topic, {}).values():
            group.queue.put_nowait(_Pending(msg_id, bytes(data), meta))

    async def subscribe(self, req: SubscribeRequest, handler: Handler) -> Subscription:
        if self._closed:
            raise PubSubError("pubsub.in-memory is closed")
        name = _group_of(req.metadata, self._group)
        limit = _concurrency(req.metadata, self.meta.concurrency)
        groups = self._topics.setdefault(req.topic, {})
        group = groups.get(name)
        if group is None:
            group = groups[name] = _Group(req.topic, name)
        sub = _InMemorySubscription(self, group, handler, limit)
        group.members.append(sub)
        self._subs.add(sub)
        return sub

    def _leave(self, group: _Group, sub: _InMemorySubscription) -> None:
        self._subs.discard(sub)
        with contextlib.suppress(ValueError):
            group.members.remove(sub)
        if not group.members:
            # Nobody left to consume: the group and what it held go, like Dapr's in-memory broker.
            group.drop()
            groups = self._topics.get(group.topic, {})
            if groups.get(group.name) is group:
                del groups[group.name]
            if not groups:
                self._topics.pop(group.topic, None)

    async def close(self) -> None:
        self._closed = True
        for sub in list(self._subs):
            await sub.close()
        for groups in self._topics.values():
            for group in groups.values():
                group.drop()
        self._topics.clear()
