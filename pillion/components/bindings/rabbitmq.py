"""The `bindings.rabbitmq` binding: publish to one queue (output) and consume it (input)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from pamqp.common import FieldTable
from yarl import URL

from pillion.components.bindings.api import (
    BindingError,
    BindingResponse,
    InputBinding,
    InputHandler,
    OutputBinding,
)
from pillion.components.metadata import ComponentConfigError, ComponentInfo, decode

log = logging.getLogger(__name__)

_ERRORS: tuple[type[BaseException], ...] = CONNECTION_EXCEPTIONS
_CONNECT_TIMEOUT = 10.0
# Request metadata read by `create`.
TTL_KEY = "ttlInSeconds"
PRIORITY_KEY = "priority"
CONTENT_TYPE_KEY = "contentType"


@dataclass(frozen=True)
class RabbitMQBindingMetadata:
    """Dapr's `bindings.rabbitmq` metadata."""

    host: str = field(default="", metadata={"name": "host"})
    queue_name: str = field(default="", metadata={"name": "queueName"})
    durable: bool = field(default=False, metadata={"name": "durable"})
    delete_when_unused: bool = field(default=False, metadata={"name": "deleteWhenUnused"})
    ttl_in_seconds: int | None = field(default=None, metadata={"name": "ttlInSeconds"})
    prefetch_count: int = field(default=0, metadata={"name": "prefetchCount"})
    exclusive: bool = field(default=False, metadata={"name": "exclusive"})
    max_priority: int | None = field(default=None, metadata={"name": "maxPriority"})
    content_type: str = field(default="text/plain", metadata={"name": "contentType"})

    def validate(self) -> URL:
        """Check the metadata; the broker URL."""
        if not self.queue_name:
            raise ComponentConfigError("queueName", "is required")
        raw = self.host.strip() or "amqp://localhost:5672"
        try:
            url = URL(raw)
        except ValueError as exc:
            raise ComponentConfigError("host", f"is not a URL: {exc}") from None
        if url.scheme not in ("amqp", "amqps") or not url.host:
            raise ComponentConfigError("host", "must be an amqp:// or amqps:// URL with a host")
        if self.ttl_in_seconds is not None and self.ttl_in_seconds <= 0:
            raise ComponentConfigError("ttlInSeconds", "must be a positive number of seconds")
        if not 0 <= self.prefetch_count <= 65535:
            raise ComponentConfigError("prefetchCount", "must be between 0 and 65535")
        if self.max_priority is not None and not 0 <= self.max_priority <= 255:
            raise ComponentConfigError("maxPriority", "must be between 0 and 255")
        return url

    def arguments(self) -> FieldTable:
        args: FieldTable = {}
        if self.ttl_in_seconds is not None:
            args["x-message-ttl"] = self.ttl_in_seconds * 1000
        if self.max_priority is not None:
            args["x-max-priority"] = self.max_priority
        return args


def _redact(url: URL) -> str:
    return str(url.with_password("***")) if url.password else str(url)


class RabbitMQBinding(InputBinding, OutputBinding):
    """One queue, declared at init as Dapr does (default exchange, routing key = queue name).

    `create` publishes with publisher confirms; `ttlInSeconds` and `priority` request metadata
    set the message's expiration and priority. The input side consumes the queue with manual
    acks: a message is acked after the handler returned and nacked with requeue when it raised,
    so the broker delivers it again. The connection is aio-pika's robust one, which reconnects
    and restores the consumer.
    """

    def __init__(self) -> None:
        self.name = ""
        self.meta = RabbitMQBindingMetadata()
        self._url: URL | None = None
        self._conn: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._consume_channel: AbstractChannel | None = None
        self._tag: str | None = None
        self._queue: AbstractQueue | None = None
        self._lock = asyncio.Lock()

    async def init(self, info: ComponentInfo) -> None:
        self.name = info.name
        meta = decode(RabbitMQBindingMetadata, info.properties)
        url = meta.validate()
        self.meta, self._url = meta, url
        try:
            self._conn = await aio_pika.connect_robust(url, timeout=_CONNECT_TIMEOUT)
            self._channel = await self._conn.channel(publisher_confirms=True)
            await self._declare(self._channel)
        except _ERRORS as exc:
            await self.close()
            raise BindingError(f"rabbitmq: cannot set up queue at {_redact(url)}: {exc}") from exc

    async def _declare(self, channel: AbstractChannel) -> AbstractQueue:
        m = self.meta
        return await channel.declare_queue(
            m.queue_name,
            durable=m.durable,
            exclusive=m.exclusive,
            auto_delete=m.delete_when_unused,
            arguments=m.arguments(),
        )

    def operations(self) -> list[str]:
        return ["create"]

    async def invoke(
        self, operation: str, data: bytes, metadata: Mapping[str, str]
    ) -> BindingResponse:
        if operation != "create":
            raise BindingError(f"rabbitmq: unsupported operation {operation!r}")
        if self._channel is None:
            raise BindingError("rabbitmq: the binding is not initialised or closed")
        expiration: float | None = None
        if raw := metadata.get(TTL_KEY, "").strip():
            try:
                ttl = int(raw)
            except ValueError:
                raise BindingError(f"rabbitmq: {TTL_KEY} must be an integer, got {raw!r}") from None
            if ttl <= 0:
                raise BindingError(f"rabbitmq: {TTL_KEY} must be positive, got {ttl}")
            expiration = float(ttl)
        priority: int | None = None
        if raw := metadata.get(PRIORITY_KEY, "").strip():
            try:
                priority = int(raw)
            except ValueError:
                priority = -1
            if not 0 <= priority <= 255:
                raise BindingError(f"rabbitmq: {PRIORITY_KEY} must be 0..255, got {raw!r}")
        msg = aio_pika.Message(
            data,
            content_type=metadata.get(CONTENT_TYPE_KEY) or self.meta.content_type,
            delivery_mode=(
                aio_pika.DeliveryMode.PERSISTENT
                if self.meta.durable
                else aio_pika.DeliveryMode.NOT_PERSISTENT
            ),
            expiration=expiration,
            priority=priority,
        )
        try:
            await self._channel.default_exchange.publish(msg, routing_key=self.meta.queue_name)
        except _ERRORS as exc:
            raise BindingError(
                f"rabbitmq: publishing to queue {self.meta.queue_name}: {exc}"
            ) from exc
        return BindingResponse()

    async def read(self, handler: InputHandler) -> None:
        async with self._lock:
            if self._conn is None:
                raise BindingError("rabbitmq: the binding is not initialised or closed")
            if self._tag is not None:
                return
            try:
                channel = await self._conn.channel()
                if self.meta.prefetch_count:
                    await channel.set_qos(prefetch_count=self.meta.prefetch_count)
                queue = await self._declare(channel)

                async def on_message(message: AbstractIncomingMessage) -> None:
                    await self._deliver(handler, message)

                self._tag = await queue.consume(on_message, no_ack=False)
            except _ERRORS as exc:
                raise BindingError(
                    f"rabbitmq: consuming queue {self.meta.queue_name}: {exc}"
                ) from exc
            self._consume_channel, self._queue = channel, queue

    async def _deliver(self, handler: InputHandler, message: AbstractIncomingMessage) -> None:
        md: dict[str, str] = {}
        if message.content_type:
            md[CONTENT_TYPE_KEY] = message.content_type
        try:
            await handler(message.body, md)
        except Exception as exc:
            log.warning(
                "rabbitmq: binding %s: handler failed (%s); message requeued", self.name, exc
            )
            with contextlib.suppress(*_ERRORS):
                await message.nack(requeue=True)
            return
        with contextlib.suppress(*_ERRORS):
            await message.ack()

    async def close(self) -> None:
        queue, tag, self._queue, self._tag = self._queue, self._tag, None, None
        if queue is not None and tag is not None:
            with contextlib.suppress(*_ERRORS):
                await queue.cancel(tag)
        conn, self._conn = self._conn, None
        self._channel = self._consume_channel = None
        if conn is not None:
            with contextlib.suppress(*_ERRORS):
                await conn.close()
