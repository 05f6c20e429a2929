"""The configuration building block: store lookup, subscriptions by id and error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from pillion.blocks.guard import component_call, recorder
from pillion.components.configuration.api import (
    ConfigurationError,
    ConfigurationItem,
    ConfigurationStore,
    ConfigurationSubscription,
)
from pillion.errors import Code, GrpcCode, PillionError
from pillion.resiliency import CircuitOpen

if TYPE_CHECKING:
    from pillion.observability.dapr_metrics import DaprMetrics
    from pillion.resiliency import Resiliency

T = TypeVar("T")

log = logging.getLogger("pillion.blocks.configuration")

Batch = dict[str, ConfigurationItem]
# Delivers one update to an HTTP app: (store, subscription id, items).
AppSink = Callable[[str, str, Batch], Awaitable[None]]


@dataclass
class _Subscription:
    id: str
    store: str
    queue: asyncio.Queue[Batch | None] = field(default_factory=asyncio.Queue)
    handle: ConfigurationSubscription | None = None
    task: asyncio.Task[None] | None = None

    async def updates(self) -> AsyncIterator[Batch]:
        while True:
            batch = await self.queue.get()
            if batch is None:
                return
            yield batch


class ConfigurationBlock:
    """Every configuration API rule lives here, once, for HTTP and gRPC alike."""

    def __init__(
        self,
        app_id: str,
        stores: Mapping[str, ConfigurationStore],
        app_sink: AppSink | None = None,
    ) -> None:
        self.app_id = app_id
        self.stores = dict(stores)
        self.app_sink = app_sink
        # Set by the runtime: component metrics and outbound resiliency policies.
        self.metrics: DaprMetrics | None = None
        self.resiliency: Resiliency | None = None
        self._subs: dict[str, _Subscription] = {}

    def store(self, name: str) -> ConfigurationStore:
        if not self.stores:
            raise PillionError(
                Code.CONFIGURATION_STORE_NOT_CONFIGURED,
                "configuration stores not configured",
                500,
                GrpcCode.FAILED_PRECONDITION,
            )
        s = self.stores.get(name)
        if s is None:
            raise PillionError(
                Code.CONFIGURATION_STORE_NOT_FOUND,
                f"configuration store {name} not found",
                400,
                GrpcCode.INVALID_ARGUMENT,
            )
        return s

    async def _call(self, store: str, operation: str, fn: Callable[[], Awaitable[T]]) -> T:
        record = recorder(self.metrics, "configuration", store, operation)
        return await component_call(
            self.resiliency,
            store,
            "configuration",
            fn,
            record=record,
            retryable=lambda exc: not isinstance(exc, ValueError),
        )

    async def get(
        self, store: str, keys: Sequence[str], metadata: Mapping[str, str] | None = None
    ) -> Batch:
        s = self.store(store)
        try:
            got = await self._call(store, "get", lambda: s.get(list(keys), metadata or {}))
            return dict(got)
        except (ConfigurationError, ValueError, OSError, TimeoutError, CircuitOpen) as exc:
            raise PillionError(
                Code.CONFIGURATION_GET,
                f"failed to get {list(keys)} from Configuration store {store}: {exc}",
                500,
                GrpcCode.INTERNAL,
            ) from exc

    async def subscribe(
        self, store: str, keys: Sequence[str], metadata: Mapping[str, str] | None = None
    ) -> tuple[str, AsyncIterator[Batch]]:
        """A new subscription's id and its update batches; they end at unsubscribe(id)."""
        s = self.store(store)
        sub = _Subscription(str(uuid.uuid4()), store)

        async def handler(batch: Batch) -> None:
            sub.queue.put_nowait(dict(batch))

        try:
            sub.handle = await self._call(
                store, "subscribe", lambda: s.subscribe(list(keys), metadata or {}, handler)
            )
        except (ConfigurationError, ValueError, OSError, TimeoutError, CircuitOpen) as exc:
            raise PillionError(
                Code.CONFIGURATION_SUBSCRIBE,
                f"failed to subscribe {list(keys)} from Configuration store {store}: {exc}",
                500,
                GrpcCode.INTERNAL,
            ) from exc
        self._subs[sub.id] = sub
        return sub.id, sub.updates()

    async def subscribe_app(
        self, store: str, keys: Sequence[str], metadata: Mapping[str, str] | None = None
    ) -> str:
        """A subscription whose updates are POSTed to the HTTP app (dapr-api.md §7)."""
        self.store(store)
        sink = self.app_sink
        if sink is None:
            raise PillionError(
                Code.APP_CHANNEL_NIL, "app channel not initialized", 500, GrpcCode.INTERNAL
            )
        sub_id, updates = await self.subscribe(store, keys, metadata)

        async def pump() -> None:
            async for batch in updates:
                try:
                    await sink(store, sub_id, batch)
                except Exception as exc:
                    log.warning("configuration update %s to the app failed: %s", sub_id, exc)

        self._subs[sub_id].task = asyncio.create_task(pump())
        return sub_id

    def has(self, sub_id: str) -> bool:
        return sub_id in self._subs

    async def unsubscribe(self, sub_id: str, store: str | None = None) -> bool:
        """False when no subscription has that id (of that store, when given)."""
        if store is not None:
            self.store(store)
        sub = self._subs.get(sub_id)
        if sub is None or (store is not None and sub.store != store):
            return False
        del self._subs[sub_id]
        try:
            if sub.handle is not None:
                await sub.handle.close()
        except (ConfigurationError, OSError) as exc:
            raise PillionError(
                Code.CONFIGURATION_UNSUBSCRIBE,
                f"failed to unsubscribe to configuration request {sub_id}: {exc}",
                500,
                GrpcCode.INTERNAL,
            ) from exc
        finally:
            sub.queue.put_nowait(None)
            if sub.task is not None:
                sub.task.cancel()
                with contextlib.suppress(BaseException):
                    await sub.task
        return True

    async def close(self) -> None:
        """End every subscription (shutdown)."""
        for sub_id in list(self._subs):
            with contextlib.suppress(Exception):
                await self.unsubscribe(sub_id)
