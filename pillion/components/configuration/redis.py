"""The `configuration.redis` store: Dapr's `value||version` strings and keyspace notifications."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from pillion.components.configuration.api import (
    ConfigurationError,
    ConfigurationItem,
    ConfigurationStore,
    ConfigurationSubscription,
    Feature,
    UpdateHandler,
)
from pillion.components.metadata import ComponentConfigError, ComponentInfo, decode

log = logging.getLogger(__name__)

SEPARATOR = "||"


@dataclass(frozen=True)
class RedisConfigurationMetadata:
    """Dapr's `configuration.redis` metadata (standalone servers)."""

    redis_host: str = field(default="", metadata={"name": "redisHost"})
    redis_username: str = field(default="", metadata={"name": "redisUsername"})
    redis_password: str = field(default="", metadata={"name": "redisPassword"})
    redis_db: int = field(default=0, metadata={"name": "redisDB"})
    enable_tls: bool = field(default=False, metadata={"name": "enableTLS"})


def parse_value(raw: str) -> tuple[str, str]:
    """Dapr's getValueAndVersion: `value||version`, the version being optional."""
    parts = raw.split(SEPARATOR)
    return parts[0], parts[1] if len(parts) > 1 else ""


def _text(b: bytes | str) -> str:
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else b


class RedisConfigurationStore(ConfigurationStore):
    """Plain string keys; other key types are skipped when reading every key.

    Change notifications need the server's `notify-keyspace-events` to include `K` and the
    event classes (`KEA`): the store sets it on the first subscribe and logs a warning when the
    server refuses CONFIG SET (then configure it on the server yourself).
    """

    def __init__(self) -> None:
        self._client: aioredis.Redis | None = None
        self._db = 0
        self._subs: set[_RedisSubscription] = set()
        self._events_checked = False

    async def init(self, info: ComponentInfo) -> None:
        md = decode(RedisConfigurationMetadata, info.properties)
        if not md.redis_host:
            raise ComponentConfigError("redisHost", "is required")
        host, _, port = md.redis_host.rpartition(":")
        if not host:
            host, port = md.redis_host, "6379"
        try:
            port_n = int(port)
        except ValueError as exc:
            raise ComponentConfigError("redisHost", f"bad port in {md.redis_host!r}") from exc
        self._db = md.redis_db
        self._client = aioredis.Redis(
            host=host,
            port=port_n,
            db=md.redis_db,
            username=md.redis_username or None,
            password=md.redis_password or None,
            ssl=md.enable_tls,
        )
        try:
            await self._client.ping()
        except RedisError as exc:
            await self._client.aclose()
            raise ConfigurationError(f"redis store: error connecting to redis: {exc}") from exc

    def features(self) -> frozenset[Feature]:
        return frozenset()

    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            raise ConfigurationError("the store is not initialised")
        return self._client

    async def get(
        self, keys: Sequence[str], metadata: Mapping[str, str]
    ) -> dict[str, ConfigurationItem]:
        r = self._redis()
        try:
            if not keys:
                names = [_text(k) async for k in r.scan_iter(count=1000)]
            else:
                names = list(dict.fromkeys(keys))
            out: dict[str, ConfigurationItem] = {}
            for i in range(0, len(names), 500):
                chunk = names[i : i + 500]
                # MGET answers nil for missing keys and for keys that are not strings.
                values = await r.mget(chunk)
                for name, raw in zip(chunk, values, strict=True):
                    if raw is not None:
                        value, version = parse_value(_text(raw))
                        out[name] = ConfigurationItem(value, version, {})
            return out
        except RedisError as exc:
            raise ConfigurationError(str(exc)) from exc

    async def _enable_events(self) -> None:
        if self._events_checked:
            return
        self._events_checked = True
        r = self._redis()
        try:
            await r.config_set("notify-keyspace-events", "KEA")
        except ResponseError as exc:
            log.warning(
                "configuration.redis: could not enable keyspace notifications (%s); set "
                "notify-keyspace-events to KEA on the server for subscriptions to work",
                exc,
            )

    async def subscribe(
        self, keys: Sequence[str], metadata: Mapping[str, str], handler: UpdateHandler
    ) -> ConfigurationSubscription:
        r = self._redis()
        try:
            await self._enable_events()
            ps = r.pubsub()
            prefix = f"__keyspace@{self._db}__:"
            if keys:
                await ps.subscribe(*(prefix + k for k in dict.fromkeys(keys)))
            else:
                await ps.psubscribe(prefix + "*")
        except RedisError as exc:
            raise ConfigurationError(str(exc)) from exc
        sub = _RedisSubscription(self, ps, len(prefix), handler)
        self._subs.add(sub)
        return sub

    async def close(self) -> None:
        for sub in list(self._subs):
            await sub.close()
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class _RedisSubscription(ConfigurationSubscription):
    def __init__(
        self, store: RedisConfigurationStore, ps: Any, prefix_len: int, handler: UpdateHandler
    ) -> None:
        self._store = store
        self._ps = ps
        self._prefix_len = prefix_len
        self._handler = handler
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                msg = await self._ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except RedisError as exc:
                log.warning("configuration.redis: subscription failed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            if msg is None or msg.get("type") not in ("message", "pmessage"):
                continue
            key = _text(msg["channel"])[self._prefix_len :]
            try:
                raw = await self._store._redis().get(key)
            except (RedisError, ConfigurationError) as exc:
                log.warning("configuration.redis: reading %s after a change failed: %s", key, exc)
                continue
            if raw is None:
                item = ConfigurationItem()  # deleted or expired: Dapr sends an empty item
            else:
                value, version = parse_value(_text(raw))
                item = ConfigurationItem(value, version, {})
            try:
                await self._handler({key: item})
            except Exception:
                log.exception("configuration.redis: update handler failed")

    async def close(self) -> None:
        if self not in self._store._subs:
            return
        self._store._subs.discard(self)
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        with contextlib.suppress(Exception):
            await self._ps.aclose()
