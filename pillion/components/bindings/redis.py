"""The `bindings.redis` output binding: Dapr's create/get/delete/increment on plain Redis keys."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pillion.components.bindings.api import BindingError, BindingResponse, OutputBinding
from pillion.components.lock.redis import RedisLockMetadata, _millis_integers
from pillion.components.metadata import ComponentConfigError, ComponentInfo, decode
from pillion.components.redisconn import redis_client

# Dapr's ttlInSeconds request metadata (metadata.TryGetTTL): a positive integer of seconds.
TTL_KEY = "ttlInSeconds"
_INT = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class RedisBindingMetadata(RedisLockMetadata):
    """Dapr's `bindings.redis` metadata: its common Redis settings, standalone servers only
    (`redisHost`, `redisPort`, `redisPassword`, `redisUsername`, `redisDB`, `enableTLS`,
    `insecureSkipTLSVerify`, retries, timeouts and `poolSize`)."""

    def validate(self) -> None:
        self.address()
        if self.redis_type.strip().lower() not in ("", "node"):
            raise ComponentConfigError(
                "redisType", f"{self.redis_type!r} is not supported; only node is"
            )
        if self.failover:
            raise ComponentConfigError("failover", "Redis Sentinel is not supported")
        if self.client_cert or self.client_key:
            name = "clientCert" if self.client_cert else "clientKey"
            raise ComponentConfigError(name, "TLS client certificates are not supported")
        if self.redis_db < 0:
            raise ComponentConfigError("redisDB", "must not be negative")
        if self.max_retries < -1:
            raise ComponentConfigError("redisMaxRetries", "must be -1 (no retries) or more")
        if self.pool_size < 0:
            raise ComponentConfigError("poolSize", "must not be negative")


def parse_ttl(metadata: Mapping[str, str]) -> int | None:
    """Seconds from the `ttlInSeconds` request metadata, None when absent; Dapr's rules."""
    raw = next((v for k, v in metadata.items() if k.lower() == TTL_KEY.lower()), "")
    if raw == "":
        return None
    if _INT.fullmatch(raw) is None:
        raise BindingError(f"{TTL_KEY} value must be a valid integer: actual is '{raw}'")
    ttl = int(raw)
    if ttl <= 0:
        raise BindingError(f"{TTL_KEY} value must be higher than zero: actual is {ttl}")
    return ttl


class RedisBinding(OutputBinding):
    """Each operation works on the key named by the `key` request metadata, as Dapr's does:
    `create` is SET (with EX when `ttlInSeconds` is set), `get` is GET (GETDEL with metadata
    `delete: true`; a missing key answers empty data), `delete` is DEL and `increment` is INCR
    (then EXPIRE with `ttlInSeconds`)."""

    def __init__(self) -> None:
        self.meta: RedisBindingMetadata | None = None
        self.client_name = f"pillion-binding-{uuid.uuid4().hex[:12]}"
        self._client: aioredis.Redis | None = None
        self._where = ""

    async def init(self, info: ComponentInfo) -> None:
        meta = decode(RedisBindingMetadata, _millis_integers(info.properties))
        meta.validate()
        host, port = meta.address()
        self.meta, self._where = meta, f"{host}:{port}"
        client = redis_client(meta, self.client_name)
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
            raise BindingError(
                f"bindings.redis: cannot connect to redis at {self._where}: {exc}"
            ) from exc
        self._client = client

    def operations(self) -> list[str]:
        return ["create", "delete", "get", "increment"]

    async def invoke(
        self, operation: str, data: bytes, metadata: Mapping[str, str]
    ) -> BindingResponse:
        client = self._client
        if client is None:
            raise BindingError("bindings.redis is not initialised or is closed")
        key = metadata.get("key", "")
        if not key:
            raise BindingError("redis binding: missing key in request metadata")
        if operation not in self.operations():
            raise BindingError(f"invalid operation type: {operation}")
        try:
            if operation == "get":
                if metadata.get("delete", "").strip().lower() == "true":
                    value = await client.getdel(key)
                else:
                    value = await client.get(key)
                if value is None:
                    return BindingResponse()
                return BindingResponse(value.encode() if isinstance(value, str) else bytes(value))
            if operation == "delete":
                await client.delete(key)
                return BindingResponse()
            ttl = parse_ttl(metadata)
            if operation == "create":
                await client.set(key, data, ex=ttl)
            else:  # increment
                await client.incr(key)
                if ttl is not None:
                    await client.expire(key, ttl)
        except (RedisError, OSError) as exc:
            raise BindingError(
                f"bindings.redis at {self._where}: {operation} {key!r}: {exc}"
            ) from exc
        return BindingResponse()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()
