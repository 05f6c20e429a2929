"""The `pubsub.mqtt3` broker: MQTT 3.1.1 with persistent sessions and acks after handling."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import socket
import ssl
import tempfile
import threading
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties as MQTTProperties
from paho.mqtt.reasoncodes import ReasonCode

from pillion.components.metadata import (
    ComponentConfigError,
    ComponentInfo,
    Seconds,
    decode,
    parse_bool,
)
from pillion.components.pubsub.api import (
    Feature,
    Handler,
    Message,
    PubSub,
    PubSubError,
    SubscribeRequest,
)

log = logging.getLogger(__name__)

_PLAIN_SCHEMES = frozenset({"tcp", "mqtt"})
# Dapr (paho for Go) accepts these spellings of MQTT over TLS.
_TLS_SCHEMES = frozenset({"ssl", "mqtts", "tcps", "tls"})
# How long publish, subscribe and connect wait for the broker, as Dapr's `defaultWait`.
_WAIT = 20.0
_KEEPALIVE = 30
# TCP connect timeout; close() may wait this long for a connect in progress.
_CONNECT_TIMEOUT = 10.0
# Reconnect back-off, in seconds; the first reconnect after a drop is immediate.
_RECONNECT_MIN, _RECONNECT_MAX = 0.5, 20.0
# A connection that ends sooner than this after it was made counts as flapping: most often a
# second client with the same client id (two instances with one consumerID) taking it over.
_FLAP_S = 5.0
# Outgoing QoS>0 messages paho may hold while the broker is away; publish fails beyond this
# rather than buffering without bound.
_MAX_QUEUED = 10_000
# Subscription metadata asking to drop the broker-side subscription on close (Dapr's name).
UNSUBSCRIBE_ON_CLOSE_KEY = "unsubscribeOnClose"
# Message metadata set on deliveries, as Dapr's mqtt3 sets it.
RETAINED_KEY = "retained"
_SHARED = re.compile(r"^\$share/[^/#+]+/(.+)$")


@dataclass(frozen=True)
class MQTTMetadata:
    """Dapr's `pubsub.mqtt3` metadata, plus handler retry and concurrency settings."""

    url: str = field(default="", metadata={"name": "url"})
    consumer_id: str = field(default="", metadata={"name": "consumerID"})
    qos: int = field(default=1, metadata={"name": "qos"})
    retain: bool = field(default=False, metadata={"name": "retain"})
    clean_session: bool = field(default=False, metadata={"name": "cleanSession"})
    ca_cert: str = field(default="", metadata={"name": "caCert"})
    client_cert: str = field(default="", metadata={"name": "clientCert"})
    client_key: str = field(default="", metadata={"name": "clientKey"})
    # Handlers running at once per subscription; 1 keeps a topic's publish order.
    concurrency: int = field(default=10, metadata={"name": "concurrency"})
    # MQTT 3 has no negative ack, so a failed handler is retried in-process with these
    # (Dapr's `backOff*` names); -1 retries until it succeeds or the subscription closes.
    back_off_policy: str = field(default="exponential", metadata={"name": "backOffPolicy"})
    back_off_duration: Seconds = field(default=Seconds(5), metadata={"name": "backOffDuration"})
    back_off_initial_interval: Seconds = field(
        default=Seconds(0.5), metadata={"name": "backOffInitialInterval"}
    )
    back_off_max_interval: Seconds = field(
        default=Seconds(60), metadata={"name": "backOffMaxInterval"}
    )
    back_off_max_retries: int = field(default=-1, metadata={"name": "backOffMaxRetries"})

    def validate(self) -> None:
        self.target()
        if self.qos not in (0, 1, 2):
            raise ComponentConfigError("qos", f"must be 0, 1 or 2, not {self.qos}")
        if bool(self.client_cert) != bool(self.client_key):
            missing = "clientKey" if self.client_cert else "clientCert"
            raise ComponentConfigError(missing, "is required with clientCert and clientKey")
        if self.concurrency < 1:
            raise ComponentConfigError("concurrency", "must be at least 1")
        if self.back_off_policy.strip().lower() not in ("constant", "exponential"):
            raise ComponentConfigError(
                "backOffPolicy", f"must be constant or exponential, not {self.back_off_policy!r}"
            )
        for name, value in (
            ("backOffDuration", self.back_off_duration),
            ("backOffInitialInterval", self.back_off_initial_interval),
            ("backOffMaxInterval", self.back_off_max_interval),
        ):
            if value < 0:
                raise ComponentConfigError(name, "must not be negative")
        if self.back_off_max_retries < -1:
            raise ComponentConfigError("backOffMaxRetries", "must be -1 (no limit) or more")

    def target(self) -> _Target:
        """Where and how to connect, from `url`: scheme://[user[:password]@]host[:port]."""
        raw = self.url.strip()
        if not raw:
            raise ComponentConfigError("url", "is required (tcp://host:port or ssl://host:port)")
        try:
            parts = urlsplit(raw)
            port = parts.port
        except ValueError as exc:
            raise ComponentConfigError("url", f"{raw!r} is not a valid URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in _PLAIN_SCHEMES | _TLS_SCHEMES:
            raise ComponentConfigError(
                "url", f"scheme {parts.scheme or '(none)'!r} is not supported; use tcp:// or ssl://"
            )
        if not parts.hostname:
            raise ComponentConfigError("url", f"{raw!r} names no host")
        tls = scheme in _TLS_SCHEMES
        return _Target(
            host=parts.hostname,
            port=port or (8883 if tls else 1883),
            tls=tls,
            username=unquote(parts.username) if parts.username is not None else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )

    def backoff(self, retry: int) -> float:
        """Seconds to wait before handler retry number `retry` (1, 2, ...)."""
        if self.back_off_policy.strip().lower() == "constant":
            return float(self.back_off_duration)
        return float(
            min(self.back_off_initial_interval * 2 ** (retry - 1), self.back_off_max_interval)
        )


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None


def _tls_context(meta: MQTTMetadata) -> ssl.SSLContext:
    """A client context verifying the broker with `caCert` (else the system CAs)."""
    try:
        ctx = ssl.create_default_context(cadata=meta.ca_cert or None)
    except (ssl.SSLError, ValueError) as exc:
        raise ComponentConfigError("caCert", f"is not a PEM certificate: {exc}") from None
    if meta.client_cert:
        # The ssl module loads a certificate chain only from files.
        with tempfile.TemporaryDirectory(prefix="pillion-mqtt-") as tmp:
            cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
            for path, text in ((cert, meta.client_cert), (key, meta.client_key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
            try:
                ctx.load_cert_chain(cert, key)
            except (ssl.SSLError, OSError) as exc:
                raise ComponentConfigError(
                    "clientCert", f"clientCert and clientKey are not a PEM key pair: {exc}"
                ) from None
    return ctx


def _check_filter(topic: str) -> None:
    """Raise PubSubError unless `topic` is a valid MQTT topic filter."""
    match = _SHARED.match(topic)
    levels = (match.group(1) if match else topic).split("/")
    if not topic or "\x00" in topic:
        raise PubSubError(f"mqtt: invalid topic {topic!r}")
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or (
            "+" in level and level != "+"
        ):
            raise PubSubError(
                f"mqtt: invalid topic filter {topic!r}: + and # must fill a whole level, "
                "and # must be the last"
            )


def _session_client_id(consumer_id: str, topic: str) -> str:
    """The stable client id of one topic's persistent session for a consumer group."""
    digest = hashlib.sha256(topic.encode()).hexdigest()[:12]
    return f"{consumer_id}-{digest}"


class MQTTPubSub(PubSub):
    """Topics are MQTT topics; each subscription is a persistent session of its own.

    A subscription connects with client id `<consumerID>-<hash of the topic>` and
    `cleanSession` false (Dapr's default), so the broker keeps the subscription and queues QoS 1/2
    messages while the subscriber is away, and hands them over when the same consumerID comes
    back. Acks are manual: PUBACK is sent only after the handler returned, so a message whose
    handler did not finish (crash, close, lost connection) is sent again by the broker when the
    session reconnects. MQTT 3 has no negative ack, so a failed handler is retried in-process
    with back-off (`backOff*`). Publishing uses a connection of its own with a random client id
    and waits for the PUBACK (QoS 1) or PUBCOMP (QoS 2).

    MQTT 3 has no consumer groups: two instances with one consumerID share a client id, and the
    broker lets only one of them connect at a time. Give each instance its own consumerID, and
    a `$share/<group>/<topic>` topic if the broker supports shared subscriptions.
    """

    # Seconds a closing subscription waits for its running handlers before cancelling them.
    close_grace = 5.0

    def __init__(self) -> None:
        self.meta: MQTTMetadata | None = None
        self.consumer_id = ""
        self._target: _Target | None = None
        self._tls: ssl.SSLContext | None = None
        self._publisher: _Link | None = None
        self._subscriptions: set[MQTTSubscription] = set()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def init(self, info: ComponentInfo) -> None:
        meta = decode(MQTTMetadata, info.properties)
        meta.validate()
        consumer_id = meta.consumer_id.strip() or info.app_id
        if not consumer_id:
            raise ComponentConfigError("consumerID", "is required (it names the client ids)")
        target = meta.target()
        self._tls = _tls_context(meta) if target.tls else None
        self.meta, self.consumer_id, self._target = meta, consumer_id, target
        # The publisher needs no session: a random id keeps instances from displacing each other.
        publisher = self._link(f"{consumer_id}-pub-{uuid.uuid4().hex[:8]}", clean_session=True)
        await publisher.start()
        self._publisher = publisher

    def features(self) -> frozenset[Feature]:
        # One handler at a time sees a topic in the order the broker delivers it (publish order).
        if self.meta is not None and self.meta.concurrency == 1:
            return frozenset({Feature.ORDERED})
        return frozenset()

    async def close(self) -> None:
        self._closed = True
        for sub in list(self._subscriptions):
            await sub.close()
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            await publisher.close()

    # -- publishing --------------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes, metadata: Mapping[str, str]) -> None:
        meta, publisher = self._require()
        if not topic or "+" in topic or "#" in topic or "\x00" in topic:
            raise PubSubError(f"mqtt: cannot publish to {topic!r}: not a valid topic name")
        retain = meta.retain
        for key, value in metadata.items():
            if key.lower() == "retain" and value.strip():
                try:
                    retain = parse_bool("retain", value)
                except ComponentConfigError as exc:
                    raise PubSubError(f"mqtt: publish metadata {exc}") from None
        await publisher.publish(topic, data, meta.qos, retain)

    # -- subscribing -------------------------------------------------------------------------

    async def subscribe(self, req: SubscribeRequest, handler: Handler) -> MQTTSubscription:
        meta, _ = self._require()
        _check_filter(req.topic)
        limit = meta.concurrency
        unsubscribe = meta.clean_session
        for key, value in req.metadata.items():
            k = key.lower()
            if k == "concurrency":
                try:
                    limit = int(value.strip())
                except ValueError:
                    raise PubSubError(
                        f"mqtt: subscription metadata concurrency: not an integer: {value!r}"
                    ) from None
                if limit < 1:
                    raise PubSubError("mqtt: subscription metadata concurrency: must be >= 1")
            elif k == UNSUBSCRIBE_ON_CLOSE_KEY.lower():
                try:
                    unsubscribe = unsubscribe or parse_bool(UNSUBSCRIBE_ON_CLOSE_KEY, value)
                except ComponentConfigError as exc:
                    raise PubSubError(f"mqtt: subscription metadata {exc}") from None
        if any(s.topic == req.topic for s in self._subscriptions):
            # Both would be one client id: the broker would keep disconnecting one for the other.
            raise PubSubError(f"mqtt: {req.topic!r} is already subscribed by this component")
        sub = MQTTSubscription(self, meta, req.topic, handler, limit, unsubscribe)
        self._subscriptions.add(sub)
        try:
            await sub.start()
        except BaseException:
            self._subscriptions.discard(sub)
            raise
        return sub

    def _forget(self, sub: MQTTSubscription) -> None:
        self._subscriptions.discard(sub)

    # -- helpers -----------------------------------------------------------------------------

    def _require(self) -> tuple[MQTTMetadata, _Link]:
        if self._closed or self.meta is None or self._publisher is None:
            raise PubSubError("mqtt: the component is closed")
        return self.meta, self._publisher

    def _link(
        self,
        client_id: str,
        *,
        clean_session: bool,
        on_message: Callable[[mqtt.MQTTMessage, int], None] | None = None,
        on_connect: Callable[[bool], Awaitable[None]] | None = None,
    ) -> _Link:
        assert self._target is not None
        return _Link(
            self._target,
            self._tls,
            client_id,
            clean_session=clean_session,
            on_message=on_message,
            on_connect=on_connect,
        )


@dataclass(slots=True)
class _Delivery:
    msg: mqtt.MQTTMessage
    generation: int  # the connection it arrived on: a QoS 1 ack is valid only there
    retries: int = 0  # in-process retries after handler failures so far

    @property
    def attempt(self) -> int:
        # A DUP flag says the broker sent it before (to a connection that did not ack it).
        return 1 + self.retries + (1 if self.msg.dup else 0)


class MQTTSubscription:
    """One topic filter on its own persistent session, with a pool of handler workers."""

    def __init__(
        self,
        owner: MQTTPubSub,
        meta: MQTTMetadata,
        topic: str,
        handler: Handler,
        limit: int,
        unsubscribe_on_close: bool,
    ) -> None:
        self.topic = topic
        self.client_id = _session_client_id(owner.consumer_id, topic)
        self._owner = owner
        self._meta = meta
        self._handler = handler
        self._limit = limit
        self._unsubscribe_on_close = unsubscribe_on_close
        self._queue: asyncio.Queue[_Delivery | None] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[None]] = set()
        self._retries: set[asyncio.TimerHandle] = set()
        self._subscribed = False
        self._closing = False
        self._closed = asyncio.Event()
        self._link = owner._link(
            self.client_id,
            clean_session=meta.clean_session,
            on_message=self._received,
            on_connect=self._connected,
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Workers first: a persistent session hands over queued messages right after CONNACK.
        self._workers = [
            loop.create_task(self._work(), name=f"pubsub.mqtt3 worker {self.topic}")
            for _ in range(self._limit)
        ]
        try:
            await self._link.start()
        except BaseException:
            self._closing = True
            await self._stop_workers()
            raise
        log.debug("mqtt: subscribed to %r as client %s", self.topic, self.client_id)

    async def _connected(self, session_present: bool) -> None:
        # A session the broker kept still holds the subscription: subscribing again would only
        # make the broker resend retained messages. A new session (or a first connect, whose
        # session may predate a QoS change) needs the SUBSCRIBE.
        if self._subscribed and session_present:
            return
        await self._link.subscribe(self.topic, self._meta.qos)
        self._subscribed = True

    def _received(self, msg: mqtt.MQTTMessage, generation: int) -> None:
        if self._closing:
            return  # left unacknowledged: the broker sends it again on the next connect
        self._queue.put_nowait(_Delivery(msg, generation))

    async def _work(self) -> None:
        while True:
            d = await self._queue.get()
            if d is None:
                return
            if self._closing or self._stale(d):
                continue
            task = asyncio.current_task()
            assert task is not None
            self._busy.add(task)
            try:
                await self._deliver(d)
            finally:
                self._busy.discard(task)

    def _stale(self, d: _Delivery) -> bool:
        # A QoS 1 message from an earlier connection is sent again by the broker with a new
        # packet id; handling this copy too would only duplicate it.
        return d.msg.qos == 1 and d.generation != self._link.generation

    async def _deliver(self, d: _Delivery) -> None:
        msg = d.msg
        message = Message(
            topic=msg.topic,
            data=bytes(msg.payload),
            metadata={RETAINED_KEY: "true" if msg.retain else "false"},
            id=str(msg.mid),
            attempt=d.attempt,
        )
        try:
            await self._handler(message)
        except Exception as exc:
            self._retry_later(d, exc)
            return
        self._link.ack(msg.mid, msg.qos, d.generation)

    def _retry_later(self, d: _Delivery, exc: Exception) -> None:
        meta = self._meta
        retry = d.retries + 1
        if self._closing or (meta.back_off_max_retries >= 0 and retry > meta.back_off_max_retries):
            log.warning(
                "mqtt: handler failed for message %s of %r (attempt %d): %r; left "
                "unacknowledged, the broker sends it again when the session reconnects",
                d.msg.mid,
                d.msg.topic,
                d.attempt,
                exc,
            )
            return
        delay = meta.backoff(retry)
        log.warning(
            "mqtt: handler failed for message %s of %r (attempt %d): %r; retrying in %.1fs",
            d.msg.mid,
            d.msg.topic,
            d.attempt,
            exc,
            delay,
        )
        again = _Delivery(d.msg, d.generation, retry)

        def requeue() -> None:
            self._retries.discard(handle)
            if not self._closing:
                self._queue.put_nowait(again)

        handle = asyncio.get_running_loop().call_later(delay, requeue)
        self._retries.add(handle)

    async def close(self) -> None:
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            for handle in self._retries:
                handle.cancel()
            self._retries.clear()
            await self._stop_workers()
            if self._unsubscribe_on_close and self._link.connected:
                # cleanSession or unsubscribeOnClose: the broker stops keeping messages for it.
                try:
                    await self._link.unsubscribe(self.topic)
                except PubSubError as exc:
                    log.warning("mqtt: unsubscribing from %r failed: %s", self.topic, exc)
            await self._link.close()
        finally:
            self._owner._forget(self)
            self._closed.set()

    async def _stop_workers(self) -> None:
        busy = set(self._busy)
        for _ in self._workers:
            self._queue.put_nowait(None)
        if busy:
            _done, pending = await asyncio.wait(busy, timeout=self._owner.close_grace)
            if pending:
                log.warning(
                    "mqtt: %d handlers of %r did not finish within %gs; their messages are "
                    "sent again when the session reconnects",
                    len(pending),
                    self.topic,
                    self._owner.close_grace,
                )
                for task in pending:
                    task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)


class _Link:
    """One paho client driven by the asyncio loop, reconnecting until closed.

    paho does the MQTT protocol; this class gives it the loop's readers and writers (as aiomqtt
    does), turns its callbacks into futures, and reconnects with back-off. The blocking part of
    connecting (DNS, TCP, TLS) runs in a thread.
    """

    def __init__(
        self,
        target: _Target,
        tls: ssl.SSLContext | None,
        client_id: str,
        *,
        clean_session: bool,
        on_message: Callable[[mqtt.MQTTMessage, int], None] | None,
        on_connect: Callable[[bool], Awaitable[None]] | None,
    ) -> None:
        self.client_id = client_id
        self._target = target
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._on_message = on_message
        self._on_connect = on_connect
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
            manual_ack=True,
        )
        client.max_queued_messages_set(_MAX_QUEUED)
        client.connect_timeout = _CONNECT_TIMEOUT
        if target.username is not None:
            client.username_pw_set(target.username, target.password)
        if tls is not None:
            client.tls_set_context(tls)
        client.on_connect = self._handle_connack
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_puback
        client.on_subscribe = self._handle_suback
        client.on_unsubscribe = self._handle_suback
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write
        self._client = client
        # Bumped on every accepted connection; acks carry the one their message came on.
        self.generation = 0
        self.connected = False
        self._up = asyncio.Event()  # connected and on_connect done: publishing may go ahead
        self._lost = asyncio.Event()
        self._wake = asyncio.Event()
        self._connack: asyncio.Future[bool] | None = None
        self._acks: dict[int, asyncio.Future[None]] = {}  # PUBACK/PUBCOMP by packet id
        self._subacks: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._misc: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, raising PubSubError if the first attempt fails; then stay connected."""
        first: asyncio.Future[None] = self._loop.create_future()
        self._task = self._loop.create_task(self._run(first), name=f"mqtt link {self.client_id}")
        try:
            await first
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        # Whatever waits for the broker gives up now, so the connection loop can end.
        self._fail_waiters(PubSubError("mqtt: the connection is closed"), publishes=True)
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self, first: asyncio.Future[None]) -> None:
        delay = _RECONNECT_MIN
        try:
            while not self._closing:
                try:
                    session_present = await self._connect()
                    if self._on_connect is not None and not self._closing:
                        await self._on_connect(session_present)
                except Exception as exc:  # PubSubError, OSError, ssl.SSLError, paho's errors
                    await self._abort()
                    if not first.done():
                        first.set_exception(
                            PubSubError(
                                f"mqtt: cannot connect to {self._target.host}:"
                                f"{self._target.port} as {self.client_id}: {exc}"
                            )
                        )
                        return
                    if self._closing:
                        break
                    log.warning(
                        "mqtt: reconnecting %s failed (%s); retrying in %.1fs",
                        self.client_id,
                        exc,
                        delay,
                    )
                    await self._sleep(delay)
                    delay = min(delay * 2, _RECONNECT_MAX)
                    continue
                if self._closing:
                    break
                self._up.set()
                if not first.done():
                    first.set_result(None)
                else:
                    log.info("mqtt: %s connected again", self.client_id)
                since = self._loop.time()
                await _first_of(self._lost, self._wake)
                self._up.clear()
                if self._closing:
                    break
                lasted = self._loop.time() - since
                if lasted < _FLAP_S:
                    log.warning(
                        "mqtt: connection of %s ended %.1fs after it was made; if another "
                        "client uses this client id (two instances with one consumerID), give "
                        "each instance its own consumerID; retrying in %.1fs",
                        self.client_id,
                        lasted,
                        delay,
                    )
                    await self._sleep(delay)
                    delay = min(delay * 2, _RECONNECT_MAX)
                else:
                    log.warning("mqtt: connection of %s lost; reconnecting", self.client_id)
                    delay = _RECONNECT_MIN
        finally:
            self._up.clear()
            await self._teardown()
            if not first.done():
                first.set_exception(PubSubError("mqtt: the connection is closed"))

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _connect(self) -> bool:
        """Open a connection; True if the broker kept a session for this client id."""
        self._lost.clear()
        connack = self._connack = self._loop.create_future()
        t = self._target
        # connect() resolves, opens the socket and does the TLS handshake: all blocking.
        rc = await self._loop.run_in_executor(
            None, self._client.connect, t.host, t.port, _KEEPALIVE
        )
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise PubSubError(mqtt.error_string(rc))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_WAIT):
                await _first_of(connack, self._wake)
        if connack.done():
            return bool(connack.result())
        connack.cancel()  # nobody waits for it any more
        raise PubSubError("closing" if self._closing else f"no CONNACK within {_WAIT:g}s")

    async def _teardown(self) -> None:
        """Leave the broker: DISCONNECT when connected (the session stays), else drop."""
        if self._client.socket() is None:
            return
        if not (self.connected and self._client.disconnect() == mqtt.MQTT_ERR_SUCCESS):
            self._shutdown_socket()
        await self._wait_lost()

    async def _abort(self) -> None:
        """Drop a connection that failed half-way (no CONNACK, refused subscription, ...)."""
        if self._client.socket() is not None:
            self._shutdown_socket()
            await self._wait_lost()

    def _shutdown_socket(self) -> None:
        # The loop's reader then sees EOF, and paho closes the socket and reports the loss.
        shutdown = getattr(self._client.socket(), "shutdown", None)
        if callable(shutdown):
            with contextlib.suppress(OSError):
                shutdown(socket.SHUT_RDWR)

    async def _wait_lost(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await self._lost.wait()
        if not self._lost.is_set():
            self._kill_socket()

    # -- operations --------------------------------------------------------------------------

    async def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        try:
            async with asyncio.timeout(_WAIT):
                await self._wait_up()
                info = self._client.publish(topic, payload, qos, retain)
                # Not connected: paho keeps QoS>0 messages and sends them after reconnecting.
                if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                    raise PubSubError(
                        f"mqtt: publishing to {topic!r}: {mqtt.error_string(info.rc)}"
                    )
                if qos == 0 or info.is_published():
                    return
                fut: asyncio.Future[None] = self._loop.create_future()
                self._acks[info.mid] = fut
                try:
                    await fut
                finally:
                    self._acks.pop(info.mid, None)
        except TimeoutError:
            raise PubSubError(
                f"mqtt: publishing to {topic!r}: no confirmation from the broker within {_WAIT:g}s"
            ) from None
        except ValueError as exc:  # paho rejects the topic or payload
            raise PubSubError(f"mqtt: publishing to {topic!r}: {exc}") from None

    async def _wait_up(self) -> None:
        while not self._up.is_set():
            if self._closing:
                raise PubSubError("mqtt: the connection is closed")
            await _first_of(self._up, self._wake)

    async def subscribe(self, topic: str, qos: int) -> None:
        rc, mid = self._client.subscribe(topic, qos)
        codes = await self._await_suback(rc, mid, f"subscribing to {topic!r}")
        if any(code.is_failure for code in codes):
            raise PubSubError(f"mqtt: the broker refused the subscription to {topic!r}")

    async def unsubscribe(self, topic: str) -> None:
        rc, mid = self._client.unsubscribe(topic)
        await self._await_suback(rc, mid, f"unsubscribing from {topic!r}")

    async def _await_suback(
        self, rc: MQTTErrorCode, mid: int | None, what: str
    ) -> list[ReasonCode]:
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise PubSubError(f"mqtt: {what}: {mqtt.error_string(rc)}")
        fut: asyncio.Future[list[ReasonCode]] = self._loop.create_future()
        self._subacks[mid] = fut
        try:
            async with asyncio.timeout(_WAIT):
                return await fut
        except TimeoutError:
            raise PubSubError(f"mqtt: {what}: no answer within {_WAIT:g}s") from None
        finally:
            self._subacks.pop(mid, None)

    def ack(self, mid: int, qos: int, generation: int) -> None:
        """Acknowledge a handled message, if the connection it came on still stands."""
        if qos == 0 or not self.connected:
            return
        # A QoS 1 packet id means something only on its connection; QoS 2 ids live in the
        # session, and the broker waits for our PUBCOMP across reconnects.
        if qos == 1 and generation != self.generation:
            return
        self._client.ack(mid, qos)

    def _fail_waiters(self, exc: PubSubError, *, publishes: bool) -> None:
        futures: list[asyncio.Future[Any]] = list(self._subacks.values())
        if publishes:
            futures += self._acks.values()
        for fut in futures:
            if not fut.done():
                fut.set_exception(exc)

    # -- paho callbacks (on the loop thread, except the socket ones during connect) --------

    def _handle_connack(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: MQTTProperties | None,
    ) -> None:
        fut = self._connack
        if fut is None or fut.done():
            return
        if reason_code.is_failure:
            fut.set_exception(PubSubError(f"the broker refused the connection: {reason_code}"))
            return
        self.generation += 1
        self.connected = True
        fut.set_result(bool(flags.session_present))

    def _handle_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: MQTTProperties | None,
    ) -> None:
        self._connection_lost(str(reason_code))

    def _connection_lost(self, reason: str) -> None:
        self.connected = False
        self._lost.set()
        misc, self._misc = self._misc, None
        if misc is not None:
            misc.cancel()
        fut = self._connack
        if fut is not None and not fut.done():
            fut.set_exception(PubSubError(f"connection closed: {reason}"))
        # Unconfirmed publishes stay: paho sends them again after reconnecting and their
        # futures resolve then (or time out). Subscribe requests are not resent by paho.
        self._fail_waiters(PubSubError(f"mqtt: connection lost: {reason}"), publishes=False)

    def _handle_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self._on_message is not None:
            self._on_message(msg, self.generation)

    def _handle_puback(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: MQTTProperties | None,
    ) -> None:
        fut = self._acks.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _handle_suback(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: MQTTProperties | None,
    ) -> None:
        fut = self._subacks.get(mid)
        if fut is not None and not fut.done():
            fut.set_result(reason_codes)

    def _on_loop(self, fn: Callable[..., object], *args: Any) -> None:
        if threading.get_ident() == self._thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def _socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._watch, sock.fileno())

    def _watch(self, fd: int) -> None:
        self._loop.add_reader(fd, self._readable)
        if self._misc is None or self._misc.done():
            self._misc = self._loop.create_task(self._keepalive(), name="mqtt keepalive")

    def _socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()
        if fd >= 0:
            self._on_loop(self._loop.remove_reader, fd)

    def _register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._loop.add_writer, sock.fileno(), self._writable)

    def _unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()
        if fd >= 0:
            self._on_loop(self._loop.remove_writer, fd)

    def _readable(self) -> None:
        client = self._client
        try:
            while client.loop_read() == mqtt.MQTT_ERR_SUCCESS:
                # An SSL socket may hold decrypted bytes the selector does not know about.
                sock = client.socket()
                pending = getattr(sock, "pending", None)
                if not (callable(pending) and pending() > 0):
                    break
        except Exception as exc:  # paho raises on some broken sockets instead of returning
            log.warning("mqtt: reading from the broker failed for %s: %r", self.client_id, exc)
            self._kill_socket()

    def _writable(self) -> None:
        try:
            self._client.loop_write()
        except Exception as exc:
            log.warning("mqtt: writing to the broker failed for %s: %r", self.client_id, exc)
            self._kill_socket()

    def _kill_socket(self) -> None:
        """Close the socket behind paho's back, after it failed in a way paho did not handle.

        paho forgets the dead socket on the next connect(); until then it reports no connection.
        """
        sock = self._client.socket()
        if sock is not None:
            fd = sock.fileno()
            if fd >= 0:
                self._loop.remove_reader(fd)
                self._loop.remove_writer(fd)
            with contextlib.suppress(OSError):
                sock.close()
        self._connection_lost("socket closed")

    async def _keepalive(self) -> None:
        # PINGREQ when idle, and a dead connection noticed within the keepalive.
        while self._client.loop_misc() == mqtt.MQTT_ERR_SUCCESS:
            await asyncio.sleep(1)


async def _first_of(*waitables: asyncio.Event | asyncio.Future[Any]) -> None:
    """Wait until one of the events is set or one of the futures is done."""
    tasks = [
        asyncio.ensure_future(w.wait()) if isinstance(w, asyncio.Event) else w for w in waitables
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w, t in zip(waitables, tasks, strict=True):
            if isinstance(w, asyncio.Event):
                t.cancel()
