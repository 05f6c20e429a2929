"""The `bindings.mqtt3` binding: publish to a topic (output) and subscribe to it (input)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from pillion.components.bindings.api import (
    BindingError,
    BindingResponse,
    InputBinding,
    InputHandler,
    OutputBinding,
)
from pillion.components.metadata import ComponentConfigError, ComponentInfo, Seconds, decode
from pillion.components.pubsub.api import PubSubError
from pillion.components.pubsub.mqtt3 import (
    MQTTMetadata,
    _check_filter,
    _Link,
    _Target,
    _tls_context,
)

log = logging.getLogger(__name__)

# Request metadata of `create`; event metadata of input events.
TOPIC_KEY = "topic"
RETAINED_KEY = "retained"


@dataclass(frozen=True)
class MQTTBindingMetadata:
    """Dapr's `bindings.mqtt3` metadata."""

    url: str = field(default="", metadata={"name": "url"})
    topic: str = field(default="", metadata={"name": "topic"})
    consumer_id: str = field(default="", metadata={"name": "consumerID"})
    qos: int = field(default=1, metadata={"name": "qos"})
    retain: bool = field(default=False, metadata={"name": "retain"})
    clean_session: bool = field(default=False, metadata={"name": "cleanSession"})
    ca_cert: str = field(default="", metadata={"name": "caCert"})
    client_cert: str = field(default="", metadata={"name": "clientCert"})
    client_key: str = field(default="", metadata={"name": "clientKey"})
    # A failed handler is retried in-process (MQTT 3 has no negative ack); -1: until it works.
    back_off_initial_interval: Seconds = field(
        default=Seconds(0.5), metadata={"name": "backOffInitialInterval"}
    )
    back_off_max_interval: Seconds = field(
        default=Seconds(60), metadata={"name": "backOffMaxInterval"}
    )
    back_off_max_retries: int = field(default=-1, metadata={"name": "backOffMaxRetries"})

    def connection(self) -> MQTTMetadata:
        """The pub/sub component's metadata for the shared connection code (validated)."""
        meta = MQTTMetadata(
            url=self.url,
            qos=self.qos,
            ca_cert=self.ca_cert,
            client_cert=self.client_cert,
            client_key=self.client_key,
        )
        meta.validate()
        if not self.topic:
            raise ComponentConfigError("topic", "is required")
        try:
            _check_filter(self.topic)
        except PubSubError as exc:
            raise ComponentConfigError("topic", str(exc)) from None
        if self.back_off_max_retries < -1:
            raise ComponentConfigError("backOffMaxRetries", "must be -1 (no limit) or more")
        return meta


class MQTTBinding(InputBinding, OutputBinding):
    """MQTT 3.1.1 through paho, with the pub/sub component's connection handling.

    Output `create` publishes to `topic` (or the request's `topic`) with `qos`/`retain` on a
    connection with client id `<consumerID>-producer`, waiting for the broker's confirmation.
    Input subscribes with QoS 1 on a persistent session (client id `<consumerID>-consumer`,
    `cleanSession` false by default) and sends PUBACK only after the handler returned. A failed
    handler is retried in-process with exponential back-off; a message left unacknowledged
    (close, lost connection, retries exhausted) is sent again when the session reconnects.
    """

    def __init__(self) -> None:
        self.name = ""
        self.meta = MQTTBindingMetadata()
        self.consumer_id = ""
        self._target: _Target | None = None
        self._tls: ssl.SSLContext | None = None
        self._publisher: _Link | None = None
        self._consumer: _Link | None = None
        self._queue: asyncio.Queue[tuple[mqtt.MQTTMessage, int]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._subscribed = False
        self._closing = False
        self._lock = asyncio.Lock()

    async def init(self, info: ComponentInfo) -> None:
        self.name = info.name
        meta = decode(MQTTBindingMetadata, info.properties)
        conn = meta.connection()
        self.meta = meta
        self._target = conn.target()
        self._tls = _tls_context(conn) if self._target.tls else None
        base = info.app_id or "pillion"
        self.consumer_id = meta.consumer_id.strip() or f"{base}-{info.name}"

    def _link(self, client_id: str, *, clean: bool, consume: bool) -> _Link:
        assert self._target is not None
        return _Link(
            self._target,
            self._tls,
            client_id,
            clean_session=clean,
            on_message=self._received if consume else None,
            on_connect=self._connected if consume else None,
        )

    def operations(self) -> list[str]:
        return ["create"]

    async def invoke(
        self, operation: str, data: bytes, metadata: Mapping[str, str]
    ) -> BindingResponse:
        if operation != "create":
            raise BindingError(f"mqtt: unsupported operation {operation!r}")
        if self._target is None or self._closing:
            raise BindingError("mqtt: the binding is not initialised or closed")
        topic = metadata.get(TOPIC_KEY) or self.meta.topic
        if not topic or "+" in topic or "#" in topic or "\x00" in topic:
            raise BindingError(f"mqtt: invalid topic to publish to: {topic!r}")
        try:
            async with self._lock:
                if self._publisher is None:
                    # A random suffix: two sidecars sharing a consumerID would evict each other.
                    cid = f"{self.consumer_id}-producer-{uuid.uuid4().hex[:6]}"
                    link = self._link(cid, clean=True, consume=False)
                    await link.start()
                    self._publisher = link
            await self._publisher.publish(topic, data, self.meta.qos, self.meta.retain)
        except PubSubError as exc:
            raise BindingError(str(exc)) from exc
        return BindingResponse()

    async def read(self, handler: InputHandler) -> None:
        if self._target is None or self._closing:
            raise BindingError("mqtt: the binding is not initialised or closed")
        if self._consumer is not None:
            return
        self._worker = asyncio.create_task(self._work(handler), name=f"mqtt binding {self.name}")
        self._consumer = self._link(
            f"{self.consumer_id}-consumer", clean=self.meta.clean_session, consume=True
        )
        try:
            await self._consumer.start()
        except PubSubError as exc:
            self._consumer = None
            await self._stop_worker()
            raise BindingError(str(exc)) from exc

    async def _connected(self, session_present: bool) -> None:
        if self._subscribed and session_present:
            return  # the broker kept the subscription
        assert self._consumer is not None
        await self._consumer.subscribe(self.meta.topic, 1)
        self._subscribed = True

    def _received(self, msg: mqtt.MQTTMessage, generation: int) -> None:
        if not self._closing:
            self._queue.put_nowait((msg, generation))

    async def _work(self, handler: InputHandler) -> None:
        while True:
            msg, generation = await self._queue.get()
            link = self._consumer
            if link is None or (msg.qos == 1 and generation != link.generation):
                continue  # the broker resends it with a new packet id
            md = {TOPIC_KEY: msg.topic, RETAINED_KEY: "true" if msg.retain else "false"}
            retry = 0
            while True:
                try:
                    await handler(bytes(msg.payload), md)
                except Exception as exc:
                    retry += 1
                    limit = self.meta.back_off_max_retries
                    if limit >= 0 and retry > limit:
                        log.warning(
                            "mqtt: binding %s: handler failed for a message of %r: %s; left "
                            "unacknowledged until the session reconnects",
                            self.name,
                            msg.topic,
                            exc,
                        )
                        break
                    delay = min(
                        self.meta.back_off_initial_interval * 2 ** (retry - 1),
                        self.meta.back_off_max_interval,
                    )
                    log.warning(
                        "mqtt: binding %s: handler failed for a message of %r: %s; retry %d "
                        "in %.1fs",
                        self.name,
                        msg.topic,
                        exc,
                        retry,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                link.ack(msg.mid, msg.qos, generation)
                break

    async def _stop_worker(self) -> None:
        task, self._worker = self._worker, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def close(self) -> None:
        self._closing = True
        await self._stop_worker()
        for link in (self._consumer, self._publisher):
            if link is not None:
                await link.close()
        self._consumer = self._publisher = None
