"""The Redis client Dapr's redis components configure: retries, TLS, a blocking pool, RESP2."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff

from pillion.components.metadata import ComponentConfigError, Properties, Seconds
from pillion.components.pubsub.redis import RedisPubSubMetadata

# Dapr reads a bare integer in these durations as milliseconds.
_MILLIS_KEYS = frozenset(
    k.lower()
    for k in (
        "dialTimeout",
        "readTimeout",
        "writeTimeout",
        "poolTimeout",
        "redisMinRetryInterval",
        "redisMaxRetryInterval",
        "maxRetryBackoff",
    )
)
_UINT = re.compile(r"\d+")


def millis_integers(props: Mapping[str, str]) -> Properties:
    """Rewrite Dapr's bare-integer millisecond durations to "<n>ms" for the decoder."""
    out: dict[str, str] = {}
    for key, value in props.items():
        v = value.strip()
        out[key] = f"{v}ms" if key.lower() in _MILLIS_KEYS and _UINT.fullmatch(v) else value
    return Properties(out)


@dataclass(frozen=True)
class RedisConnMetadata:
    """Dapr's Redis connection metadata shared by the redis components (single node only).

    Connection-tuning names not listed (maxConnAge, minIdleConns, idle*) are accepted and
    ignored. Subclasses add their own fields and say why `failover` is refused.
    """

    failover_reason: ClassVar[str] = "Redis Sentinel is not supported"

    redis_host: str = field(default="", metadata={"name": "redisHost"})
    redis_port: int = field(default=0, metadata={"name": "redisPort"})
    redis_password: str = field(default="", metadata={"name": "redisPassword"})
    redis_username: str = field(default="", metadata={"name": "redisUsername"})
    redis_db: int = field(default=0, metadata={"name": "redisDB"})
    redis_type: str = field(default="node", metadata={"name": "redisType"})
    failover: bool = field(default=False, metadata={"name": "failover"})
    enable_tls: bool = field(default=False, metadata={"name": "enableTLS"})
    insecure_skip_tls_verify: bool = field(
        default=False, metadata={"name": "insecureSkipTLSVerify"}
    )
    client_cert: str = field(default="", metadata={"name": "clientCert"})
    client_key: str = field(default="", metadata={"name": "clientKey"})
    # go-redis semantics: -1 disables retries, 0 means the default of 3.
    max_retries: int = field(
        default=3, metadata={"name": "redisMaxRetries", "aliases": ("maxRetries",)}
    )
    min_retry_interval: Seconds = field(
        default=Seconds(0.008), metadata={"name": "redisMinRetryInterval"}
    )
    max_retry_interval: Seconds = field(
        default=Seconds(0.512),
        metadata={"name": "redisMaxRetryInterval", "aliases": ("maxRetryBackoff",)},
    )
    dial_timeout: Seconds = field(default=Seconds(5), metadata={"name": "dialTimeout"})
    read_timeout: Seconds = field(default=Seconds(3), metadata={"name": "readTimeout"})
    # Accepted but unused: redis-py has one socket timeout for reads and writes (readTimeout).
    write_timeout: Seconds | None = field(default=None, metadata={"name": "writeTimeout"})
    pool_size: int = field(default=0, metadata={"name": "poolSize"})
    pool_timeout: Seconds | None = field(default=None, metadata={"name": "poolTimeout"})

    def validate(self) -> None:
        self.address()
        if self.redis_type.strip().lower() not in ("", "node"):
            raise ComponentConfigError(
                "redisType", f"{self.redis_type!r} is not supported; only node is"
            )
        if self.failover:
            raise ComponentConfigError("failover", self.failover_reason)
        if self.client_cert or self.client_key:
            name = "clientCert" if self.client_cert else "clientKey"
            raise ComponentConfigError(name, "TLS client certificates are not supported")
        if self.redis_db < 0:
            raise ComponentConfigError("redisDB", "must not be negative")
        if self.max_retries < -1:
            raise ComponentConfigError("redisMaxRetries", "must be -1 (no retries) or more")
        if self.pool_size < 0:
            raise ComponentConfigError("poolSize", "must not be negative")

    def address(self) -> tuple[str, int]:
        """(host, port) from `redisHost` and `redisPort`, by the rules of `pubsub.redis`."""
        return RedisPubSubMetadata(redis_host=self.redis_host, redis_port=self.redis_port).address()

    def retries(self) -> int:
        return 3 if self.max_retries == 0 else max(self.max_retries, 0)


def socket_timeout(value: float | None) -> float | None:
    """A socket timeout; Dapr writes a negative one for "none"."""
    return None if value is None or value < 0 else value


def redis_client(meta: Any, client_name: str) -> aioredis.Redis:
    """A client over a blocking pool, from metadata with Dapr's redis connection fields.

    `meta` provides `address()`, `retries()`, the retry intervals, `redis_db`,
    `redis_username`, `redis_password`, `dial_timeout`, `enable_tls`,
    `insecure_skip_tls_verify`, `read_timeout`, `pool_timeout` and `pool_size`.
    """
    host, port = meta.address()
    retries = meta.retries()
    if retries:
        retry = Retry(
            ExponentialBackoff(
                cap=max(meta.max_retry_interval, 0), base=max(meta.min_retry_interval, 0)
            ),
            retries,
        )
    else:
        retry = Retry(NoBackoff(), 0)
    kwargs: dict[str, Any] = {
        "host": host,
        "port": port,
        "db": meta.redis_db,
        "username": meta.redis_username or None,
        "password": meta.redis_password or None,
        "socket_connect_timeout": socket_timeout(meta.dial_timeout),
        "socket_keepalive": True,
        "retry": retry,
        # Set on every connection (CLIENT SETNAME), so operators and tests can find them.
        "client_name": client_name,
        # RESP2 replies have the same shape in every redis-py version this supports.
        "protocol": 2,
    }
    if meta.enable_tls:
        kwargs["connection_class"] = aioredis.SSLConnection
        if meta.insecure_skip_tls_verify:
            kwargs["ssl_cert_reqs"] = "none"
            kwargs["ssl_check_hostname"] = False
    read_timeout = socket_timeout(meta.read_timeout)
    # Dapr's defaults: 10 connections per CPU; wait up to readTimeout + 1s for one.
    pool_timeout = socket_timeout(meta.pool_timeout)
    if meta.pool_timeout is None:
        pool_timeout = None if read_timeout is None else read_timeout + 1
    pool = aioredis.BlockingConnectionPool(
        max_connections=meta.pool_size or 10 * (os.cpu_count() or 1),
        timeout=pool_timeout,
        socket_timeout=read_timeout,
        **kwargs,
    )
    return aioredis.Redis.from_pool(pool)
