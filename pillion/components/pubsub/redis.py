"""The `pubsub.redis` broker: Redis Streams with consumer groups, laid out as Dapr lays them out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from pillion.components.metadata import (
    ComponentConfigError,
    ComponentInfo,
    Properties,
    Seconds,
    decode,
)
from pillion.components.pubsub.api import (
    BulkEntry,
    Feature,
    Handler,
    Message,
    PubSub,
    PubSubError,
    SubscribeRequest,
)
from pillion.components.redisconn import (
    connection_kwargs,
    millis_integers,
    pooled_client,
    redis_address,
    socket_timeout,
)

log = logging.getLogger(__name__)

_FEATURES = frozenset({Feature.BULK_PUBLISH})

# Stream entry fields, as Dapr writes them: the message bytes, and the publish metadata as a
# JSON object. Keeping Dapr's layout lets Dapr sidecars and pillion share a stream.
DATA_FIELD = b"data"
METADATA_FIELD = b"metadata"

# Where a new consumer group starts. Dapr creates groups at "0": a subscriber that comes up
# after the publisher still gets what was published to the stream before it subscribed.
GROUP_START = "0"

# How long one XREADGROUP blocks. Closing cancels the read, so this only bounds how long a
# half-open connection can go unnoticed.
_BLOCK_MS = 2000
# Reconnect back-off of a subscription's reader, in seconds.
_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 5.0

# Durations of this component's own that Dapr, like the connection ones, reads as milliseconds
# when written as a bare integer (a legacy of its Go decoder).
_MILLIS_KEYS = ("processingTimeout", "redeliverInterval")


@dataclass(frozen=True)
class RedisPubSubMetadata:
    """Dapr's `pubsub.redis` metadata (single node only: no Cluster, Sentinel or client certs)."""

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
    consumer_id: str = field(default="", metadata={"name": "consumerID"})
    # Defaults are what Dapr's code applies (its docs swap the two).
    processing_timeout: Seconds = field(default=Seconds(60), metadata={"name": "processingTimeout"})
    redeliver_interval: Seconds = field(default=Seconds(15), metadata={"name": "redeliverInterval"})
    queue_depth: int = field(default=100, metadata={"name": "queueDepth"})
    concurrency: int = field(default=10, metadata={"name": "concurrency"})
    max_len_approx: int = field(default=0, metadata={"name": "maxLenApprox"})
    # Accepted and ignored with a warning (Dapr trims with XADD MINID ~ now-ttl).
    stream_ttl: Seconds | None = field(default=None, metadata={"name": "streamTTL"})
    redis_max_retries: int = field(default=3, metadata={"name": "redisMaxRetries"})
    redis_min_retry_interval: Seconds = field(
        default=Seconds(0.008), metadata={"name": "redisMinRetryInterval"}
    )
    redis_max_retry_interval: Seconds = field(
        default=Seconds(0.512), metadata={"name": "redisMaxRetryInterval"}
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
            raise ComponentConfigError("failover", "Redis Sentinel is not supported")
        if self.client_cert or self.client_key:
            name = "clientCert" if self.client_cert else "clientKey"
            raise ComponentConfigError(name, "TLS client certificates are not supported")
        if self.redis_db < 0:
            raise ComponentConfigError("redisDB", "must not be negative")
        for name, value in (
            ("processingTimeout", self.processing_timeout),
            ("redeliverInterval", self.redeliver_interval),
        ):
            if value < 0:
                raise ComponentConfigError(name, "must not be negative (0 disables redelivery)")
        if self.queue_depth < 1:
            raise ComponentConfigError("queueDepth", "must be at least 1")
        if self.concurrency < 1:
            raise ComponentConfigError("concurrency", "must be at least 1")
        if self.max_len_approx < 0:
            raise ComponentConfigError("maxLenApprox", "must not be negative (0 is unlimited)")
        if self.pool_size < 0:
            raise ComponentConfigError("poolSize", "must not be negative")

    def address(self) -> tuple[str, int]:
        """(host, port) from `redisHost`, with `redisPort` or 6379 when it names no port."""
        return redis_address(self.redis_host, self.redis_port)

    # The names redisconn's connection settings read (this component spells them redis_*).
    def retries(self) -> int:
        """redis-py retries: `redisMaxRetries` when positive, else none."""
        return max(self.redis_max_retries, 0)

    @property
    def min_retry_interval(self) -> float:
        return self.redis_min_retry_interval

    @property
    def max_retry_interval(self) -> float:
        return self.redis_max_retry_interval

    def redelivery(self) -> bool:
        """Whether failed and abandoned messages are claimed again (both settings non-zero)."""
        return self.processing_timeout > 0 and self.redeliver_interval > 0


def _millis_integers(props: Mapping[str, str]) -> Properties:
    """Rewrite Dapr's bare-integer millisecond durations to "<n>ms" for the decoder."""
    return millis_integers(props, _MILLIS_KEYS)


class RedisPubSub(PubSub):
    """Topics are streams; the component's `consumerID` is the consumer group.

    Publishing is `XADD <topic> * data <bytes> [metadata <json>]` (with `MAXLEN ~ n` when
    `maxLenApprox` is set). Each subscription is one consumer of the group, named
    `<consumerID>-<uuid>`, with its own connection for the blocking `XREADGROUP`. A message is
    acknowledged (XACK) after its handler returns and left pending if it raises. Every
    `redeliverInterval` the subscription claims, with XAUTOCLAIM, entries of any consumer of the
    group that stayed pending longer than `processingTimeout`, and hands them to the handler
    again: that is how failed messages, and those of a consumer that died, are delivered again.
    """

    # Seconds a closing subscription waits for its running handlers before cancelling them.
    close_grace = 5.0

    def __init__(self) -> None:
        self.meta: RedisPubSubMetadata | None = None
        self.consumer_group = ""
        self._client: aioredis.Redis | None = None
        self._conn_kwargs: dict[str, Any] = {}
        self._subscriptions: set[RedisSubscription] = set()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def init(self, info: ComponentInfo) -> None:
        meta = decode(RedisPubSubMetadata, _millis_integers(info.properties))
        meta.validate()
        group = meta.consumer_id.strip() or info.app_id
        if not group:
            raise ComponentConfigError("consumerID", "is required (the consumer group)")
        if meta.stream_ttl is not None:
            log.warning("pubsub.redis %s: streamTTL is not supported and is ignored", info.name)
        self.meta, self.consumer_group = meta, group
        host, port = meta.address()
        self._conn_kwargs = connection_kwargs(meta)
        client = pooled_client(meta, self._conn_kwargs)
        try:
            await client.ping()
        except RedisError as exc:
            await client.aclose()
            raise PubSubError(
                f"redis streams: cannot connect to redis at {host}:{port}: {exc}"
            ) from exc
        self._client = client

    def features(self) -> frozenset[Feature]:
        return _FEATURES

    async def close(self) -> None:
        self._closed = True
        for sub in list(self._subscriptions):
            await sub.close()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    # -- publishing --------------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes, metadata: Mapping[str, str]) -> None:
        client, meta = self._require()
        try:
            await client.xadd(topic, _fields(data, metadata), **_trim(meta))
        except RedisError as exc:
            raise PubSubError(f"redis streams: error publishing to {topic!r}: {exc}") from exc

    async def bulk_publish(
        self, topic: str, entries: Sequence[BulkEntry], metadata: Mapping[str, str]
    ) -> list[tuple[str, str]]:
        if not entries:
            return []
        client, meta = self._require()
        # One round trip for all entries; not a transaction, so each XADD succeeds or fails
        # on its own and the failures are reported per entry.
        pipe = client.pipeline(transaction=False)
        trim = _trim(meta)
        for entry in entries:
            pipe.xadd(topic, _fields(entry.data, {**metadata, **entry.metadata}), **trim)
        try:
            results = await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            reason = f"redis streams: error publishing to {topic!r}: {exc}"
            return [(e.entry_id, reason) for e in entries]
        return [
            (e.entry_id, f"redis streams: error publishing to {topic!r}: {r}")
            for e, r in zip(entries, results, strict=True)
            if isinstance(r, Exception)
        ]

    # -- subscribing -------------------------------------------------------------------------

    async def subscribe(self, req: SubscribeRequest, handler: Handler) -> RedisSubscription:
        client, meta = self._require()
        sub = RedisSubscription(self, client, meta, req.topic, handler)
        await sub.start()
        self._subscriptions.add(sub)
        return sub

    def _forget(self, sub: RedisSubscription) -> None:
        self._subscriptions.discard(sub)

    # -- helpers -----------------------------------------------------------------------------

    def _require(self) -> tuple[aioredis.Redis, RedisPubSubMetadata]:
        if self._closed or self._client is None or self.meta is None:
            raise PubSubError("redis streams: the component is closed")
        return self._client, self.meta


def _fields(data: bytes, metadata: Mapping[str, str]) -> dict[Any, Any]:
    fields: dict[Any, Any] = {DATA_FIELD: data}
    if metadata:
        fields[METADATA_FIELD] = json.dumps(dict(metadata), separators=(",", ":"))
    return fields


def _trim(meta: RedisPubSubMetadata) -> dict[str, Any]:
    if meta.max_len_approx > 0:
        return {"maxlen": meta.max_len_approx, "approximate": True}
    return {}


def _stream_id(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class RedisSubscription:
    """One consumer of the group reading one stream, with a bounded pool of handlers."""

    def __init__(
        self,
        owner: RedisPubSub,
        client: aioredis.Redis,
        meta: RedisPubSubMetadata,
        topic: str,
        handler: Handler,
    ) -> None:
        self.topic = topic
        self.group = owner.consumer_group
        token = uuid.uuid4().hex
        self.consumer = f"{self.group}-{token}"
        # Shown by CLIENT LIST; names may not contain spaces, so the uuid alone identifies it.
        self.client_name = f"pillion-pubsub-{token}"
        self._owner = owner
        self._client = client
        self._meta = meta
        self._handler = handler
        # The blocking read gets a connection of its own so it never holds one of the pool's.
        # Retries are off: the read loop reconnects with its own back-off and logging. There is
        # no socket timeout: the loop bounds each read itself (see _read_loop).
        self._reader = aioredis.Redis.from_pool(
            aioredis.ConnectionPool(
                max_connections=1,
                **{
                    **owner._conn_kwargs,
                    "retry": Retry(NoBackoff(), 0),
                    "client_name": self.client_name,
                    "socket_timeout": None,
                },
            )
        )
        read_timeout = socket_timeout(meta.read_timeout)
        self._read_limit = None if read_timeout is None else _BLOCK_MS / 1000 + read_timeout
        self._slots = asyncio.Semaphore(meta.concurrency)
        # Ids read or claimed and not yet finished here, so a claim of one still waiting for a
        # slot, or still running, does not hand it to the handler twice.
        self._held: set[str] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._closing = False
        self._closed = asyncio.Event()

    async def start(self) -> None:
        try:
            await self._create_group()
        except RedisError as exc:
            await self._close_reader()
            raise PubSubError(
                f"redis streams: cannot subscribe to {self.topic!r} "
                f"(consumer group {self.group!r}): {exc}"
            ) from exc
        loop = asyncio.get_running_loop()
        self._loops.append(
            loop.create_task(self._read_loop(), name=f"pubsub.redis read {self.topic}")
        )
        if self._meta.redelivery():
            self._loops.append(
                loop.create_task(self._reclaim_loop(), name=f"pubsub.redis reclaim {self.topic}")
            )

    async def _create_group(self) -> None:
        try:
            await self._client.xgroup_create(self.topic, self.group, id=GROUP_START, mkstream=True)
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    # -- reading -----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        backoff, failing = _BACKOFF_MIN, False
        meta = self._meta
        while not self._closing:
            try:
                # The block plus readTimeout: longer means the connection is dead (half-open).
                # asyncio.timeout, not the socket timeout: redis-py applies that with
                # asyncio.wait_for, which on Python 3.11 can swallow a cancellation (close).
                async with asyncio.timeout(self._read_limit):
                    # RESP2 reply: [[stream, [(id, {field: value}), ...]]], or None.
                    reply: Any = await self._reader.xreadgroup(
                        self.group,
                        self.consumer,
                        {self.topic: ">"},
                        count=meta.queue_depth,
                        block=_BLOCK_MS,
                    )
            except (RedisError, OSError, TimeoutError) as exc:
                if isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP"):
                    # The stream or group was deleted (or the server lost its data): start
                    # again as a fresh group, as Dapr does.
                    log.warning(
                        "pubsub.redis: consumer group %r of stream %r is gone; recreating it",
                        self.group,
                        self.topic,
                    )
                    with contextlib.suppress(RedisError, OSError):
                        await self._create_group()
                elif not failing:
                    log.warning(
                        "pubsub.redis: reading stream %r failed (%s: %s); reconnecting",
                        self.topic,
                        type(exc).__name__,
                        exc,
                    )
                failing = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            except Exception:
                log.exception("pubsub.redis: unexpected error reading stream %r", self.topic)
                await asyncio.sleep(_BACKOFF_MAX)
                continue
            if failing:
                log.info("pubsub.redis: reading stream %r again", self.topic)
                backoff, failing = _BACKOFF_MIN, False
            try:
                for _stream, entries in reply or ():
                    for raw_id, fields in entries:
                        await self._dispatch(_stream_id(raw_id), fields, 1)
            except Exception:
                # An entry this loop cannot take apart stays pending; the loop goes on.
                log.exception("pubsub.redis: unexpected reply reading stream %r", self.topic)

    async def _dispatch(
        self, msg_id: str, fields: Mapping[bytes, bytes] | None, attempt: int
    ) -> None:
        """Start the handler for one entry once a slot is free (the reader waits meanwhile)."""
        if msg_id in self._held:
            return
        self._held.add(msg_id)
        try:
            await self._slots.acquire()
        except BaseException:
            self._held.discard(msg_id)
            raise
        task = asyncio.get_running_loop().create_task(self._handle(msg_id, fields, attempt))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _handle(
        self, msg_id: str, fields: Mapping[bytes, bytes] | None, attempt: int
    ) -> None:
        try:
            if fields is None:  # deleted from the stream while pending: nothing to deliver
                await self._ack(msg_id)
                return
            message = self._message(msg_id, fields, attempt)
            try:
                if self._meta.redelivery():
                    # Past processingTimeout the entry can be claimed by another consumer, so
                    # the handler stops then, as Dapr's does, and the message is left pending.
                    async with asyncio.timeout(self._meta.processing_timeout):
                        await self._handler(message)
                else:
                    await self._handler(message)
            except Exception as exc:
                log.warning(
                    "pubsub.redis: handler failed for message %s of %r (attempt %d): %r; "
                    "left pending for redelivery",
                    msg_id,
                    self.topic,
                    attempt,
                    exc,
                )
                return
            await self._ack(msg_id)
        finally:
            self._held.discard(msg_id)
            self._slots.release()

    async def _ack(self, msg_id: str) -> None:
        try:
            await self._client.xack(self.topic, self.group, msg_id)
        except RedisError as exc:
            log.warning(
                "pubsub.redis: acknowledging message %s of %r failed (%s); it will be redelivered",
                msg_id,
                self.topic,
                exc,
            )

    def _message(self, msg_id: str, fields: Mapping[bytes, bytes], attempt: int) -> Message:
        data = fields.get(DATA_FIELD, b"")
        metadata: dict[str, str] = {}
        raw_meta = fields.get(METADATA_FIELD)
        if raw_meta:
            try:
                decoded = json.loads(raw_meta)
            except ValueError:
                decoded = None
            if isinstance(decoded, dict):
                metadata = {str(k): str(v) for k, v in decoded.items()}
            else:
                log.warning(
                    "pubsub.redis: message %s of %r has unreadable metadata", msg_id, self.topic
                )
        return Message(self.topic, bytes(data), metadata, msg_id, attempt)

    # -- redelivery --------------------------------------------------------------------------

    async def _reclaim_loop(self) -> None:
        # A first round at once picks up what a consumer that died left behind.
        while not self._closing:
            try:
                await self.reclaim()
            except (RedisError, OSError) as exc:
                log.warning(
                    "pubsub.redis: claiming pending messages of %r failed: %s", self.topic, exc
                )
            except Exception:
                log.exception("pubsub.redis: unexpected error claiming messages of %r", self.topic)
            await asyncio.sleep(self._meta.redeliver_interval)

    async def reclaim(self) -> int:
        """Claim the group's entries pending longer than processingTimeout and handle them.

        Returns how many were claimed. XAUTOCLAIM also drops from the pending list the entries
        that were deleted from the stream (trimmed by maxLenApprox, say).
        """
        min_idle = max(1, int(self._meta.processing_timeout * 1000))
        start, claimed = "0-0", 0
        while not self._closing:
            reply = await self._client.xautoclaim(
                self.topic,
                self.group,
                self.consumer,
                min_idle,
                start_id=start,
                count=self._meta.queue_depth,
            )
            start = _stream_id(reply[0])
            entries = [(_stream_id(i), f) for i, f in reply[1] if i is not None]
            claimed += len(entries)
            attempts = await self._delivery_counts([i for i, _ in entries]) if entries else {}
            for msg_id, fields in entries:
                await self._dispatch(msg_id, fields, attempts.get(msg_id, 2))
            if start == "0-0":
                break
        return claimed

    async def _delivery_counts(self, ids: list[str]) -> dict[str, int]:
        """Times each claimed entry was delivered, from XPENDING (XAUTOCLAIM does not say)."""
        keys = sorted(ids, key=_id_key)
        try:
            rows: Any = await self._client.xpending_range(
                self.topic,
                self.group,
                min=keys[0],
                max=keys[-1],
                count=len(ids) + len(self._held),
                consumername=self.consumer,
            )
        except RedisError as exc:
            log.debug("pubsub.redis: reading delivery counts failed: %s", exc)
            return {}
        return {_stream_id(r["message_id"]): int(r["times_delivered"]) for r in rows}

    # -- closing -----------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            await _cancel_and_wait(self._loops)
            if self._handlers:
                _done, pending = await asyncio.wait(
                    set(self._handlers), timeout=self._owner.close_grace
                )
                if pending:
                    log.warning(
                        "pubsub.redis: %d handlers of %r did not finish within %gs; "
                        "their messages stay pending for redelivery",
                        len(pending),
                        self.topic,
                        self._owner.close_grace,
                    )
                    await _cancel_and_wait(pending)
            await self._close_reader()
            await self._drop_consumer()
        finally:
            self._owner._forget(self)
            self._closed.set()

    async def _close_reader(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self._reader.aclose()

    async def _drop_consumer(self) -> None:
        """Remove this consumer from the group if it holds no pending entries.

        Every subscription is a new consumer, so without this a group would collect one per
        restart. A consumer with pending entries stays: deleting it would lose them, and other
        consumers claim them after processingTimeout.
        """
        try:
            pending = await self._client.xpending_range(
                self.topic, self.group, min="-", max="+", count=1, consumername=self.consumer
            )
            if not pending:
                await self._client.xgroup_delconsumer(self.topic, self.group, self.consumer)
        except RedisError as exc:
            log.debug("pubsub.redis: removing consumer %s failed: %s", self.consumer, exc)


async def _cancel_and_wait(tasks: Collection[asyncio.Task[Any]], budget: float = 5.0) -> None:
    """Cancel `tasks` and wait until they end, cancelling again while they run.

    Once is not always enough on Python 3.11: redis-py sends commands under asyncio.wait_for,
    which swallows a cancellation that arrives just as the send completes.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    pending = {t for t in tasks if not t.done()}
    while pending:
        if loop.time() >= deadline:
            log.error("pubsub.redis: %d tasks ignored cancellation for %gs", len(pending), budget)
            return
        for task in pending:
            task.cancel()
        _done, pending = await asyncio.wait(pending, timeout=0.05)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("pubsub.redis: task %s failed", task.get_name(), exc_info=task.exception())
