"""The `pubsub.rabbitmq` broker: an exchange per topic, a queue per consumer group, as in Dapr."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelPreconditionFailed, DeliveryError
from aiormq.exceptions import ChannelAccessRefused
from pamqp.common import FieldTable
from yarl import URL

from pillion.components.metadata import (
    ComponentConfigError,
    ComponentInfo,
    Properties,
    Seconds,
    decode,
)
from pillion.components.pubsub.api import (
    CONTENT_TYPE_KEY,
    TTL_KEY,
    BulkEntry,
    Feature,
    Handler,
    Message,
    PubSub,
    PubSubError,
    SubscribeRequest,
    Subscription,
)

log = logging.getLogger(__name__)

_FEATURES = frozenset({Feature.MESSAGE_TTL, Feature.BULK_PUBLISH})

# Everything aio-pika/aiormq raise for broker, channel and socket failures (it includes OSError,
# so timeouts too); none of these leave the component raw.
_ERRORS: tuple[type[BaseException], ...] = CONNECTION_EXCEPTIONS

_EXCHANGE_KINDS = ("fanout", "topic", "direct", "headers", "x-consistent-hash")
_CONCURRENCY_MODES = ("parallel", "single")
_QUEUE_TYPES = ("classic", "quorum")
_TRUTHY = {"1", "t", "true", "y", "yes", "on"}

# Dapr's names for the dead-letter exchange and queue of a consumer queue.
_DLX_FORMAT = "dlx-{}"
_DLQ_FORMAT = "dlq-{}"

# Publish and subscribe request metadata Dapr's component reads.
_ROUTING_KEY = "routingKey"
_QUEUE_NAME = "queueName"
_PRIORITY = "priority"
_MAX_PRIORITY = "maxPriority"
_QUEUE_TYPE = "queueType"
_SINGLE_ACTIVE_CONSUMER = "singleActiveConsumer"
_MAX_LEN = "maxLen"
_MAX_LEN_BYTES = "maxLenBytes"

# Dapr tries a publish three times, reconnecting in between when the connection is gone.
_PUBLISH_ATTEMPTS = 3
# Seconds one connection attempt may take (Dapr's dialer uses 30; a sidecar wants to know sooner).
_CONNECT_TIMEOUT = 10.0
# Delivered-message properties carry this prefix when publishMessagePropertiesToMetadata is on.
_PROPERTIES_PREFIX = "metadata."


@dataclass(frozen=True)
class RabbitMQMetadata:
    """Dapr's `pubsub.rabbitmq` metadata."""

    connection_string: str = field(default="", metadata={"name": "connectionString"})
    # Dapr's deprecated name for connectionString; used only when connectionString is empty.
    host: str = field(default="", metadata={"name": "host"})
    protocol: str = field(default="", metadata={"name": "protocol"})
    hostname: str = field(default="localhost", metadata={"name": "hostname"})
    username: str = field(default="", metadata={"name": "username"})
    password: str = field(default="", metadata={"name": "password"})
    consumer_id: str = field(default="", metadata={"name": "consumerID"})
    # Dapr's code defaults durable to true although its docs say false. The code is what
    # declares queues, and a declaration that differs from an existing queue's is refused by the
    # broker, so pillion sidecars sharing queues with Dapr sidecars must match the code.
    durable: bool = field(default=True, metadata={"name": "durable"})
    enable_dead_letter: bool = field(default=False, metadata={"name": "enableDeadLetter"})
    deleted_when_unused: bool = field(default=True, metadata={"name": "deletedWhenUnused"})
    auto_ack: bool = field(default=False, metadata={"name": "autoAck"})
    requeue_in_failure: bool = field(default=False, metadata={"name": "requeueInFailure"})
    delivery_mode: int = field(default=0, metadata={"name": "deliveryMode"})
    prefetch_count: int = field(default=0, metadata={"name": "prefetchCount"})
    reconnect_wait: Seconds = field(
        default=Seconds(3), metadata={"name": "reconnectWaitSeconds", "aliases": ("reconnectWait",)}
    )
    max_len: int = field(default=0, metadata={"name": "maxLen"})
    max_len_bytes: int = field(default=0, metadata={"name": "maxLenBytes"})
    exchange_kind: str = field(default="fanout", metadata={"name": "exchangeKind"})
    client_name: str = field(default="", metadata={"name": "clientName"})
    heart_beat: Seconds = field(default=Seconds(10), metadata={"name": "heartBeat"})
    publisher_confirm: bool = field(default=False, metadata={"name": "publisherConfirm"})
    sasl_external: bool = field(default=False, metadata={"name": "saslExternal"})
    concurrency_mode: str = field(default="parallel", metadata={"name": "concurrencyMode"})
    # A default per-message TTL for publishes that do not set their own.
    ttl_in_seconds: int | None = field(default=None, metadata={"name": "ttlInSeconds"})
    publish_message_properties_to_metadata: bool = field(
        default=False, metadata={"name": "publishMessagePropertiesToMetadata"}
    )
    ca_cert: str = field(default="", metadata={"name": "caCert"})
    client_cert: str = field(default="", metadata={"name": "clientCert"})
    client_key: str = field(default="", metadata={"name": "clientKey"})

    def validate(self) -> None:
        if self.protocol and self.protocol not in ("amqp", "amqps"):
            raise ComponentConfigError("protocol", f"must be amqp or amqps, got {self.protocol!r}")
        if not 0 <= self.delivery_mode <= 2:
            raise ComponentConfigError(
                "deliveryMode", f"must be 0, 1 or 2 (2 = persistent), got {self.delivery_mode}"
            )
        if not 0 <= self.prefetch_count <= 65535:
            raise ComponentConfigError(
                "prefetchCount", f"must be between 0 and 65535, got {self.prefetch_count}"
            )
        if self.reconnect_wait < 0:
            raise ComponentConfigError("reconnectWaitSeconds", "must not be negative")
        if self.heart_beat < 0:
            raise ComponentConfigError("heartBeat", "must not be negative")
        for name, value in (("maxLen", self.max_len), ("maxLenBytes", self.max_len_bytes)):
            if value < 0:
                raise ComponentConfigError(name, f"must not be negative, got {value}")
        if self.exchange_kind not in _EXCHANGE_KINDS:
            raise ComponentConfigError(
                "exchangeKind",
                f"must be one of {', '.join(_EXCHANGE_KINDS)}, got {self.exchange_kind!r}",
            )
        if self.concurrency_mode not in _CONCURRENCY_MODES:
            raise ComponentConfigError(
                "concurrencyMode", f"must be parallel or single, got {self.concurrency_mode!r}"
            )
        if self.ttl_in_seconds is not None and self.ttl_in_seconds <= 0:
            raise ComponentConfigError(
                "ttlInSeconds", f"must be a positive number of seconds, got {self.ttl_in_seconds}"
            )
        if bool(self.client_cert) != bool(self.client_key):
            missing = "clientKey" if self.client_cert else "clientCert"
            raise ComponentConfigError(missing, "clientCert and clientKey go together")

    def url(self) -> URL:
        """The broker URL, with heartBeat applied; raises ComponentConfigError naming the field."""
        if self.connection_string or self.host:
            name = "connectionString" if self.connection_string else "host"
            raw = self.connection_string or self.host
            try:
                url = URL(raw.strip())
            except ValueError as exc:
                raise ComponentConfigError(name, f"is not a URL: {exc}") from None
            if url.scheme not in ("amqp", "amqps") or not url.host:
                raise ComponentConfigError(
                    name, f"must be an amqp:// or amqps:// URL with a host, got {_redact(url)!r}"
                )
            if self.protocol and self.protocol != url.scheme:
                raise ComponentConfigError(
                    "protocol",
                    f"{self.protocol!r} does not match the {name} scheme {url.scheme!r}",
                )
        else:
            scheme = self.protocol or "amqp"
            try:
                url = URL(f"{scheme}://{self.hostname.strip()}")
            except ValueError as exc:
                raise ComponentConfigError("hostname", f"is not a host[:port]: {exc}") from None
            if not url.host or url.path not in ("", "/") or url.user:
                raise ComponentConfigError(
                    "hostname", f"must be a host or host:port, got {self.hostname!r}"
                )
            # As Dapr: a password without a username is not sent.
            if self.username:
                url = url.with_user(self.username)
                if self.password:
                    url = url.with_password(self.password)
        # Dapr sets the heartbeat from metadata, whatever the URL says; AMQP counts whole seconds.
        beat = 0 if self.heart_beat <= 0 else max(1, round(self.heart_beat))
        return url.update_query(heartbeat=str(beat))


@dataclass(frozen=True)
class _QueueSpec:
    """A subscription's queue: its name, declaration arguments and bindings."""

    name: str
    arguments: FieldTable
    routing_keys: tuple[str, ...]
    dead_letter: bool
    dead_letter_arguments: FieldTable


class RabbitMQPubSub(PubSub):
    """RabbitMQ as Dapr's component uses it.

    Each topic is an exchange of kind `exchangeKind`. A subscription declares the queue
    `<consumerID>-<topic>` and binds it to the topic's exchange, so every consumer group gets every
    message while the sidecars of one app id (one consumerID) compete for the queue's messages.
    A message is acknowledged after its handler returns. A handler that raises gets the message
    nacked with `requeue=requeueInFailure`; not requeued, it goes to `dlx-<queue>` when
    `enableDeadLetter` is set and is dropped otherwise, as in Dapr. pillion's runtime applies its
    retries and dead-letter topic before the handler raises here, so the component only sees
    failures the runtime gave up on.

    One connection per component; a lost one is reopened every `reconnectWaitSeconds` and every
    subscription then declares its queue again and resumes on its own channel.
    """

    def __init__(self) -> None:
        self.meta: RabbitMQMetadata | None = None
        self.name = "pubsub"
        self.consumer_id = ""
        # Connections re-established after a loss; tests and operators read it.
        self.reconnects = 0
        self._url: URL | None = None
        self._ssl: ssl.SSLContext | None = None
        self._conn: AbstractConnection | None = None
        self._connected = asyncio.Event()
        self._closed = False
        self._reconnect_task: asyncio.Task[None] | None = None
        self._publisher: AbstractChannel | None = None
        self._publisher_lock = asyncio.Lock()
        # Exchanges declared on the current publisher channel (Dapr caches them the same way).
        self._exchanges: dict[str, AbstractExchange] = {}
        self._subscriptions: set[_RabbitSubscription] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def init(self, info: ComponentInfo) -> None:
        meta = decode(RabbitMQMetadata, info.properties)
        meta.validate()
        url = meta.url()
        self.name = info.name
        # consumerID names the consumer group; the runtime defaults it to the app id.
        self.consumer_id = meta.consumer_id or info.app_id
        if not meta.connection_string and meta.host:
            log.warning(
                "pubsub.rabbitmq %s: metadata 'host' is deprecated; use 'connectionString'",
                self.name,
            )
        if meta.sasl_external:
            log.warning(
                "pubsub.rabbitmq %s: saslExternal is not supported and is ignored", self.name
            )
        self._ssl = _ssl_context(meta) if url.scheme == "amqps" else None
        self.meta = meta
        self._url = url
        self._warn_about_losses(meta)
        try:
            conn = await self._open()
        except _ERRORS as exc:
            raise PubSubError(
                f"rabbitmq: cannot connect to {_redact(url)}: {_describe(exc)}"
            ) from exc
        self._install(conn)

    def _warn_about_losses(self, meta: RabbitMQMetadata) -> None:
        if meta.auto_ack:
            log.warning(
                "pubsub.rabbitmq %s: autoAck=true acknowledges messages on delivery; a message "
                "whose handler fails, or that is in flight when the sidecar stops, is lost",
                self.name,
            )
        elif not meta.requeue_in_failure and not meta.enable_dead_letter:
            log.warning(
                "pubsub.rabbitmq %s: requeueInFailure=false and enableDeadLetter=false (Dapr's "
                "defaults): a message whose handler still fails after the runtime's retries, "
                "and that has no deadLetterTopic, is dropped by the broker%s; set "
                "requeueInFailure or enableDeadLetter to keep it",
                self.name,
                "" if meta.durable else " (and durable=false queues lose messages on a restart)",
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # The runtime closes subscriptions first; these are the ones it did not.
        for sub in list(self._subscriptions):
            await sub.close()
        task, self._reconnect_task = self._reconnect_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._connected.clear()
        publisher, self._publisher = self._publisher, None
        conn, self._conn = self._conn, None
        if publisher is not None and not publisher.is_closed:
            with contextlib.suppress(*_ERRORS):
                await publisher.close()
        if conn is not None:
            with contextlib.suppress(*_ERRORS):
                await conn.close()
        # Wakes publishers waiting for a reconnect; they find the component closed.
        self._connected.set()

    def features(self) -> frozenset[Feature]:
        return _FEATURES

    # -- connection --------------------------------------------------------------------------

    async def _open(self) -> AbstractConnection:
        meta = self._meta()
        props: FieldTable | None = (
            {"connection_name": meta.client_name} if meta.client_name else None
        )
        return await aio_pika.connect(
            self._url,
            timeout=_CONNECT_TIMEOUT,
            ssl_context=self._ssl,
            client_properties=props,
        )

    def _install(self, conn: AbstractConnection) -> None:
        self._conn = conn
        self._publisher = None
        self._exchanges = {}
        conn.close_callbacks.add(self._connection_closed)
        self._connected.set()

    def _connection_closed(self, sender: Any, exc: BaseException | None = None) -> None:
        conn = self._conn
        if self._closed or conn is None or sender is not conn:
            return
        self._connected.clear()
        log.warning(
            "pubsub.rabbitmq %s: connection lost (%s); reconnecting in %gs",
            self.name,
            _describe(exc) if exc is not None else "closed",
            self._meta().reconnect_wait,
        )
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.get_running_loop().create_task(
                self._reconnect(conn), name=f"pubsub.rabbitmq reconnect {self.name}"
            )

    async def _reconnect(self, old: AbstractConnection) -> None:
        meta = self._meta()
        with contextlib.suppress(*_ERRORS):
            await old.close()
        while not self._closed:
            await asyncio.sleep(meta.reconnect_wait)
            try:
                conn = await self._open()
            except _ERRORS as exc:
                log.warning(
                    "pubsub.rabbitmq %s: reconnecting failed (%s); retrying in %gs",
                    self.name,
                    _describe(exc),
                    meta.reconnect_wait,
                )
                continue
            if self._closed:
                with contextlib.suppress(*_ERRORS):
                    await conn.close()
                return
            self.reconnects += 1
            self._install(conn)
            log.info("pubsub.rabbitmq %s: reconnected", self.name)
            return

    async def _wait_connected(self, timeout: float | None) -> AbstractConnection:
        """The open connection, waiting up to `timeout` seconds (None: forever) for a reconnect."""
        if not self._connected.is_set():
            try:
                await asyncio.wait_for(self._connected.wait(), timeout)
            except TimeoutError:
                raise PubSubError(
                    f"rabbitmq: not connected to {_redact(self._url)} "
                    f"(reconnecting every {self._meta().reconnect_wait:g}s)"
                ) from None
        conn = self._conn
        if self._closed or conn is None:
            raise PubSubError("rabbitmq: the component is closed")
        return conn

    def _reconnect_budget(self) -> float:
        """How long a caller waits for a lost connection to come back."""
        return self._meta().reconnect_wait + _CONNECT_TIMEOUT

    # -- publish -----------------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes, metadata: Mapping[str, str]) -> None:
        self._check_open()
        props = Properties(metadata)
        await self._publish(topic, self._message(topic, data, props), props.get(_ROUTING_KEY, ""))

    async def bulk_publish(
        self, topic: str, entries: Sequence[BulkEntry], metadata: Mapping[str, str]
    ) -> list[tuple[str, str]]:
        """Publish the entries concurrently on one channel, so their confirms overlap."""
        self._check_open()

        async def one(entry: BulkEntry) -> tuple[str, str] | None:
            props = Properties({**metadata, **entry.metadata})  # entry metadata wins
            try:
                message = self._message(topic, entry.data, props)
                await self._publish(topic, message, props.get(_ROUTING_KEY, ""))
            except PubSubError as exc:
                return (entry.entry_id, str(exc))
            return None

        results = await asyncio.gather(*(one(e) for e in entries))
        return [r for r in results if r is not None]

    def _message(self, topic: str, data: bytes, props: Properties) -> aio_pika.Message:
        meta = self._meta()
        ttl = _positive_int(props, TTL_KEY, topic, self.name)
        if ttl is None:
            ttl = meta.ttl_in_seconds
        priority = _positive_int(props, _PRIORITY, topic, self.name, allow_zero=True)
        return aio_pika.Message(
            data,
            # Dapr's component sends text/plain unless the publisher names a content type.
            content_type=_first(props, CONTENT_TYPE_KEY) or "text/plain",
            delivery_mode=(
                aio_pika.DeliveryMode.PERSISTENT
                if meta.delivery_mode == 2
                else aio_pika.DeliveryMode.NOT_PERSISTENT
            ),
            expiration=ttl,  # seconds; sent as the per-message TTL in milliseconds
            priority=min(priority, 255) if priority is not None else None,
            message_id=_first(props, "messageId"),
            correlation_id=_first(props, "correlationId"),
            type=_first(props, "type"),
        )

    async def _publish(self, topic: str, message: aio_pika.Message, routing_key: str) -> None:
        failure: BaseException | None = None
        for attempt in range(1, _PUBLISH_ATTEMPTS + 1):
            channel: AbstractChannel | None = None
            try:
                channel = await self._publisher_channel()
                exchange = await self._exchange(channel, topic)
                # mandatory=False as in Dapr: a topic nobody subscribes to drops the message.
                await exchange.publish(message, routing_key, mandatory=False)
                return
            except DeliveryError as exc:
                raise PubSubError(
                    f"rabbitmq: the broker did not accept the message for topic {topic!r} "
                    f"(publisher confirm: {_describe(exc)})"
                ) from exc
            except (ChannelPreconditionFailed, ChannelAccessRefused) as exc:
                await self._drop_publisher(channel)
                raise PubSubError(
                    f"rabbitmq: cannot publish to topic {topic!r}: {_describe(exc)}"
                ) from exc
            except _ERRORS as exc:
                # A lost connection or channel (or an exchange deleted since it was declared):
                # a fresh channel declares the exchange again.
                await self._drop_publisher(channel)
                failure = exc
                log.debug(
                    "pubsub.rabbitmq %s: publish to %r, attempt %d failed: %s",
                    self.name,
                    topic,
                    attempt,
                    _describe(exc),
                )
                # Lets a dropped connection's close callback run before the next attempt looks.
                await asyncio.sleep(0.05 * attempt)
        raise PubSubError(
            f"rabbitmq: publishing to topic {topic!r} failed after {_PUBLISH_ATTEMPTS} "
            f"attempts: {_describe(failure) if failure else 'unknown error'}"
        ) from failure

    async def _publisher_channel(self) -> AbstractChannel:
        channel = self._publisher
        if channel is not None and not channel.is_closed:
            return channel
        async with self._publisher_lock:
            channel = self._publisher
            if channel is not None and not channel.is_closed:
                return channel
            self._check_open()
            conn = await self._wait_connected(self._reconnect_budget())
            channel = await conn.channel(publisher_confirms=self._meta().publisher_confirm)
            self._publisher = channel
            self._exchanges = {}
            return channel

    async def _exchange(self, channel: AbstractChannel, topic: str) -> AbstractExchange:
        exchange = self._exchanges.get(topic)
        if exchange is None:
            meta = self._meta()
            exchange = await channel.declare_exchange(
                topic,
                meta.exchange_kind,
                durable=meta.durable,
                auto_delete=meta.deleted_when_unused,
            )
            if channel is self._publisher:
                self._exchanges[topic] = exchange
        return exchange

    async def _drop_publisher(self, channel: AbstractChannel | None) -> None:
        if channel is None:
            return
        if channel is self._publisher:
            self._publisher = None
            self._exchanges = {}
        if not channel.is_closed:
            with contextlib.suppress(*_ERRORS):
                await channel.close()

    # -- subscribe ---------------------------------------------------------------------------

    async def subscribe(self, req: SubscribeRequest, handler: Handler) -> Subscription:
        self._check_open()
        spec = self._queue_spec(req.topic, Properties(req.metadata))
        sub = _RabbitSubscription(self, req.topic, spec, handler)
        await sub.start()
        self._subscriptions.add(sub)
        return sub

    def _queue_spec(self, topic: str, props: Properties) -> _QueueSpec:
        """The queue a subscription consumes, from component and subscription metadata."""
        meta = self._meta()
        name = props.get(_QUEUE_NAME, "")
        if not name:
            if not self.consumer_id:
                raise PubSubError(
                    "rabbitmq: consumerID is required for subscriptions without a queueName"
                )
            name = f"{self.consumer_id}-{topic}"
        lengths: FieldTable = {}
        if meta.max_len > 0:
            lengths["x-max-length"] = meta.max_len
        if meta.max_len_bytes > 0:
            lengths["x-max-length-bytes"] = meta.max_len_bytes
        args: FieldTable = {}
        if meta.enable_dead_letter:
            args["x-dead-letter-exchange"] = _DLX_FORMAT.format(name)
        args.update(lengths)
        if props.get(_MAX_PRIORITY, ""):
            args["x-max-priority"] = min(_uint(props, _MAX_PRIORITY, topic), 255)
        queue_type = props.get(_QUEUE_TYPE, "") or "classic"
        if queue_type not in _QUEUE_TYPES:
            raise PubSubError(
                f"rabbitmq: subscription to {topic!r}: invalid queueType {queue_type!r}; "
                "valid types are classic and quorum"
            )
        args["x-queue-type"] = queue_type
        if props.get(_SINGLE_ACTIVE_CONSUMER, "").strip().lower() in _TRUTHY:
            args["x-single-active-consumer"] = True
        # Subscription-level limits override the component's.
        if props.get(_MAX_LEN_BYTES, ""):
            args["x-max-length-bytes"] = _uint(props, _MAX_LEN_BYTES, topic)
        if props.get(_MAX_LEN, ""):
            args["x-max-length"] = _uint(props, _MAX_LEN, topic)
        keys = tuple(props.get(_ROUTING_KEY, "").split(","))
        # The dead-letter queue keeps what it holds on disk (lazy), as Dapr declares it.
        return _QueueSpec(
            name, args, keys, meta.enable_dead_letter, {**lengths, "x-queue-mode": "lazy"}
        )

    # -- helpers -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PubSubError("rabbitmq: the component is closed")
        if self.meta is None:
            raise PubSubError("rabbitmq: the component is not initialised")

    def _meta(self) -> RabbitMQMetadata:
        if self.meta is None:
            raise PubSubError("rabbitmq: the component is not initialised")
        return self.meta


class _RabbitSubscription:
    """One consumer on its own channel; re-established whenever the channel or connection goes."""

    def __init__(
        self, owner: RabbitMQPubSub, topic: str, spec: _QueueSpec, handler: Handler
    ) -> None:
        self._owner = owner
        self._meta = owner._meta()
        self.topic = topic
        self.queue = spec.name
        self._spec = spec
        self._handler = handler
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._conn: AbstractConnection | None = None
        self._lost = asyncio.Event()
        self._closing = False
        self._done = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # concurrencyMode=single: one handler at a time. asyncio.Lock wakes waiters in FIFO
        # order, so deliveries are handled in the order they arrived.
        self._single = asyncio.Lock() if self._meta.concurrency_mode == "single" else None

    async def start(self) -> None:
        conn = await self._owner._wait_connected(self._owner._reconnect_budget())
        try:
            await self._consume(conn)
        except _ERRORS as exc:
            raise PubSubError(
                f"rabbitmq: cannot subscribe to topic {self.topic!r} (queue {self.queue!r}): "
                f"{_describe(exc)}"
            ) from exc
        self._runner = asyncio.get_running_loop().create_task(
            self._keep_consuming(), name=f"pubsub.rabbitmq consumer {self.queue}"
        )

    async def close(self) -> None:
        if self._closing:
            await self._done.wait()
            return
        self._closing = True
        try:
            runner, self._runner = self._runner, None
            if runner is not None:
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await runner
            channel, queue, tag = self._channel, self._queue, self._consumer_tag
            if channel is not None and queue is not None and tag and not channel.is_closed:
                # Stop deliveries first, then let the handlers in flight finish and ack.
                with contextlib.suppress(*_ERRORS):
                    await queue.cancel(tag)
            while self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            # Deliveries not yet handled go back to the queue with the channel.
            await self._drop_channel()
        finally:
            self._owner._subscriptions.discard(self)
            self._done.set()

    async def _consume(self, conn: AbstractConnection) -> None:
        """Declare the topic's exchange, the queue (and dead-letter pair) and start consuming."""
        meta, spec = self._meta, self._spec
        channel = await conn.channel(publisher_confirms=False)
        self._channel, self._conn = channel, conn
        try:
            if meta.prefetch_count:
                await channel.set_qos(prefetch_count=meta.prefetch_count)
            exchange = await channel.declare_exchange(
                self.topic,
                meta.exchange_kind,
                durable=meta.durable,
                auto_delete=meta.deleted_when_unused,
            )
            if spec.dead_letter:
                # As Dapr: the dead-letter exchange and queue are always durable.
                dlx = await channel.declare_exchange(
                    _DLX_FORMAT.format(spec.name),
                    "fanout",
                    durable=True,
                    auto_delete=meta.deleted_when_unused,
                )
                dlq = await channel.declare_queue(
                    _DLQ_FORMAT.format(spec.name),
                    durable=True,
                    auto_delete=meta.deleted_when_unused,
                    arguments=spec.dead_letter_arguments,
                )
                await dlq.bind(dlx, "")
            queue = await channel.declare_queue(
                spec.name,
                durable=meta.durable,
                auto_delete=meta.deleted_when_unused,
                arguments=spec.arguments,
            )
            for key in spec.routing_keys:
                await queue.bind(exchange, key)
            channel.close_callbacks.add(self._channel_closed)
            underlay = await channel.get_underlay_channel()
            # The broker cancels a consumer whose queue was deleted; the channel stays open.
            underlay.on_consumer_cancel_callbacks.add(self._cancelled_by_broker(channel))
            tag = await queue.consume(self._on_delivery(channel), no_ack=meta.auto_ack)
        except BaseException:
            self._channel = None
            with contextlib.suppress(*_ERRORS):
                await channel.close()
            raise
        self._queue, self._consumer_tag = queue, tag

    def _channel_closed(self, sender: Any, exc: BaseException | None = None) -> None:
        if sender is self._channel and not self._closing:
            self._lost.set()

    def _cancelled_by_broker(self, channel: AbstractChannel) -> Callable[[Any], None]:
        def cancelled(_frame: Any) -> None:
            if channel is self._channel and not self._closing:
                self._lost.set()

        return cancelled

    async def _keep_consuming(self) -> None:
        meta = self._meta
        while True:
            await self._lost.wait()
            self._lost.clear()
            lost_on = self._conn
            await self._drop_channel()
            owner = self._owner
            log.warning(
                "pubsub.rabbitmq %s: consumer of queue %r lost; subscribing again",
                owner.name,
                self.queue,
            )
            if lost_on is owner._conn and owner._connected.is_set():
                # Only the channel went (queue deleted, channel error): wait before declaring
                # again. A lost connection is reopened by the component after the same wait.
                await asyncio.sleep(meta.reconnect_wait)
            while True:
                try:
                    conn = await owner._wait_connected(None)
                except PubSubError:
                    return  # the component closed
                try:
                    await self._consume(conn)
                except _ERRORS as exc:
                    log.warning(
                        "pubsub.rabbitmq %s: subscribing to queue %r failed (%s); retrying in %gs",
                        owner.name,
                        self.queue,
                        _describe(exc),
                        meta.reconnect_wait,
                    )
                    await asyncio.sleep(meta.reconnect_wait)
                    continue
                log.info("pubsub.rabbitmq %s: consuming queue %r again", owner.name, self.queue)
                break

    async def _drop_channel(self) -> None:
        channel, self._channel = self._channel, None
        self._queue, self._consumer_tag = None, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(*_ERRORS):
                await channel.close()

    def _on_delivery(
        self, channel: AbstractChannel
    ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def on_delivery(msg: AbstractIncomingMessage) -> None:
            # aiormq runs this in a task of the channel, which it cancels when the channel
            # closes; handlers get tasks of their own so a lost connection never cancels one.
            if self._closing and not self._meta.auto_ack:
                return  # not acked: the broker hands it to the next consumer
            task = asyncio.get_running_loop().create_task(self._process(channel, msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return on_delivery

    async def _process(self, channel: AbstractChannel, msg: AbstractIncomingMessage) -> None:
        if self._single is None:
            await self._deliver(channel, msg)
            return
        async with self._single:
            await self._deliver(channel, msg)

    async def _deliver(self, channel: AbstractChannel, msg: AbstractIncomingMessage) -> None:
        meta = self._meta
        if not meta.auto_ack and (self._closing or channel.is_closed):
            # Its channel is gone (or going): the broker redelivers it, so handling it now would
            # only make a duplicate. Auto-acked messages have no second chance, so they run.
            return
        message = self._message(msg)
        try:
            await self._handler(message)
        except Exception as exc:
            if meta.auto_ack:
                log.warning(
                    "pubsub.rabbitmq %s: handler failed for message %s on topic %r; it was "
                    "auto-acknowledged and is lost: %s",
                    self._owner.name,
                    message.id,
                    self.topic,
                    exc,
                )
                return
            if meta.requeue_in_failure:
                fate = "requeued"
            elif meta.enable_dead_letter:
                fate = f"dead-lettered to {_DLX_FORMAT.format(self.queue)}"
            else:
                fate = "dropped (requeueInFailure=false, no dead-letter exchange)"
            log.warning(
                "pubsub.rabbitmq %s: handler failed for message %s on topic %r; %s: %s",
                self._owner.name,
                message.id,
                self.topic,
                fate,
                exc,
            )
            await self._settle(msg.nack(requeue=meta.requeue_in_failure), message)
            return
        if not meta.auto_ack:
            await self._settle(msg.ack(), message)

    async def _settle(self, outcome: Awaitable[None], message: Message) -> None:
        try:
            await outcome
        except _ERRORS as exc:
            # The delivery's channel is gone; the broker redelivers the message (at least once).
            log.debug(
                "pubsub.rabbitmq %s: could not settle message %s (%s); it will be redelivered",
                self._owner.name,
                message.id,
                _describe(exc),
            )

    def _message(self, msg: AbstractIncomingMessage) -> Message:
        headers = msg.headers or {}
        count = headers.get("x-delivery-count")
        # Quorum queues count deliveries; classic queues only say whether it was delivered before.
        if isinstance(count, int) and not isinstance(count, bool):
            attempt = count + 1
        else:
            attempt = 2 if msg.redelivered else 1
        body = msg.body if type(msg.body) is bytes else bytes(msg.body)
        return Message(
            topic=self.topic,
            data=body,
            metadata=_delivery_metadata(msg)
            if self._meta.publish_message_properties_to_metadata
            else {},
            id=msg.message_id or f"{self.queue}#{msg.delivery_tag}",
            attempt=attempt,
        )


# -- module helpers ------------------------------------------------------------------------------


def _delivery_metadata(msg: AbstractIncomingMessage) -> dict[str, str]:
    """AMQP properties and headers as Dapr's publishMessagePropertiesToMetadata reports them."""
    out: dict[str, str] = {}
    for key, value in (
        ("messageid", msg.message_id),
        ("correlationid", msg.correlation_id),
        ("type", msg.type),
        ("contenttype", msg.content_type),
    ):
        if value:
            out[_PROPERTIES_PREFIX + key] = str(value)
    for key, raw in (msg.headers or {}).items():
        if raw is None:
            continue
        value = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        out[_PROPERTIES_PREFIX + key] = value
    return out


def _first(props: Properties, key: str) -> str | None:
    value = props.get(key, "")
    return value or None


def _positive_int(
    props: Properties, key: str, topic: str, component: str, allow_zero: bool = False
) -> int | None:
    """An integer publish option; like Dapr, an invalid one is logged and ignored."""
    raw = props.get(key, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value > 0 or (allow_zero and value == 0):
        return value
    log.warning(
        "pubsub.rabbitmq %s: publishing to %r: ignoring %s=%r (expected a %s integer)",
        component,
        topic,
        key,
        raw,
        "non-negative" if allow_zero else "positive",
    )
    return None


def _uint(props: Properties, key: str, topic: str) -> int:
    raw = props.get(key, "").strip()
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise PubSubError(
            f"rabbitmq: subscription to {topic!r}: {key} must be a non-negative integer, "
            f"got {raw!r}"
        )
    return value


def _ssl_context(meta: RabbitMQMetadata) -> ssl.SSLContext | None:
    """A TLS context for caCert/clientCert/clientKey; None leaves aiormq's default."""
    if not (meta.ca_cert or meta.client_cert):
        return None
    try:
        ctx = ssl.create_default_context(cadata=meta.ca_cert or None)
    except (ssl.SSLError, ValueError) as exc:
        raise ComponentConfigError("caCert", f"is not a PEM certificate: {exc}") from None
    if meta.client_cert:
        # The ssl module loads a client certificate only from files.
        with tempfile.TemporaryDirectory(prefix="pillion-rabbitmq-") as tmp:
            cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
            for path, text in ((cert, meta.client_cert), (key, meta.client_key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
            try:
                ctx.load_cert_chain(cert, key)
            except (ssl.SSLError, ValueError) as exc:
                raise ComponentConfigError(
                    "clientCert", f"clientCert/clientKey are not a PEM certificate and key: {exc}"
                ) from None
    return ctx


def _redact(url: URL | None) -> str:
    if url is None:
        return "(no URL)"
    if url.password:
        url = url.with_password("***")
    return str(url.with_query(None))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
