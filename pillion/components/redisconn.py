"""The Redis client Dapr's redis components configure: retries, TLS, a blocking pool, RESP2."""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff

from pillion.components.metadata import ComponentConfigError, Properties, Seconds

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


def millis_integers(props: Mapping[str, str], extra: Collection[str] = ()) -> Properties:
    """Rewrite Dapr's bare-integer millisecond durations to "<n>ms" for the decoder (the
    connection durations, and a component's own `extra` ones)."""
    keys = _MILLIS_KEYS | {k.lower() for k in extra} if extra else _MILLIS_KEYS
    out: dict[str, str] = {}
    for key, value in props.items():
        v = value.strip()
        out[key] = f"{v}ms" if key.lower() in keys and _UINT.fullmatch(v) else value
    return Properties(out)


def redis_address(redis_host: str, redis_port: int) -> tuple[str, int]:
    """(host, port) from `redisHost`, with `redisPort` or 6379 when it names no port."""
    raw = redis_host.strip()
    if not raw:
        raise ComponentConfigError("redisHost", "is required (host:port)")
    if "," in raw:
        raise ComponentConfigError("redisHost", "several hosts (Redis Cluster) are not supported")
    host, port_text = raw, ""
    if raw.startswith("["):  # [IPv6]:port
        end = raw.find("]")
        if end < 0:
            raise ComponentConfigError("redisHost", f"{raw!r} is not host:port")
        host, rest = raw[1:end], raw[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ComponentConfigError("redisHost", f"{raw!r} is not host:port")
        port_text = rest[1:]
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
    if not host:
        raise ComponentConfigError("redisHost", f"{raw!r} names no host")
    if not port_text:
        return host, redis_port or 6379
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ComponentConfigError("redisHost", f"{raw!r} has an invalid port")
    if redis_port and redis_port != int(port_text):
        raise ComponentConfigError(
            "redisPort", f"{redis_port} conflicts with the port in redisHost {raw!r}"
        )
    return host, int(port_text)


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
        return redis_address(self.redis_host, self.redis_port)

    def retries(self) -> int:
        return 3 if self.max_retries == 0 else max(self.max_retries, 0)


def socket_timeout(value: float | None) -> float | None:
    """A socket timeout; Dapr writes a negative one for "none"."""
    return None if value is None or value < 0 else value


def connection_kwargs(meta: Any, client_name: str | None = None) -> dict[str, Any]:
    """redis-py connection settings from metadata with Dapr's redis connection fields.

    `meta` provides `address()`, `retries()`, `min_retry_interval`, `max_retry_interval`,
    `redis_db`, `redis_username`, `redis_password`, `dial_timeout`, `enable_tls` and
    `insecure_skip_tls_verify`. `client_name` is set on every connection (CLIENT SETNAME).
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
        # RESP2 replies have the same shape in every redis-py version this supports.
        "protocol": 2,
    }
    if client_name is not None:
        kwargs["client_name"] = client_name
    if meta.enable_tls:
        kwargs["connection_class"] = aioredis.SSLConnection
        if meta.insecure_skip_tls_verify:
            kwargs["ssl_cert_reqs"] = "none"
            kwargs["ssl_check_hostname"] = False
    return kwargs


def pooled_client(meta: Any, kwargs: Mapping[str, Any]) -> aioredis.Redis:
    """A client over a blocking pool of `kwargs` connections, sized and timed by `meta`'s
    `read_timeout`, `pool_timeout` and `pool_size` as Dapr's components size theirs."""
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


def redis_client(meta: Any, client_name: str) -> aioredis.Redis:
    """A client over a blocking pool, from metadata with Dapr's redis connection fields
    (see connection_kwargs and pooled_client)."""
    return pooled_client(meta, connection_kwargs(meta, client_name))
