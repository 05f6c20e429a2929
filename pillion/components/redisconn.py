"""The Redis client Dapr's redis components configure: retries, TLS, a blocking pool, RESP2."""

from __future__ import annotations

import os
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff


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
