"""The `pubsub.jetstream` broker: NATS JetStream streams, durable pull consumers, explicit acks."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import ssl
import tempfile
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.manager import JetStreamManager

from pillion.components.metadata import (
    ComponentConfigError,
    ComponentInfo,
    Seconds,
    decode,
)
from pillion.components.pubsub.api import (
    Feature,
    Handler,
    Message,
    PubSub,
    PubSubError,
    SubscribeRequest,
)
from pillion.durations import parse_duration

log = logging.getLogger(__name__)

_DELIVER_POLICIES = {
    "all": js_api.DeliverPolicy.ALL,
    "last": js_api.DeliverPolicy.LAST,
    "new": js_api.DeliverPolicy.NEW,
    "sequence": js_api.DeliverPolicy.BY_START_SEQUENCE,
    "time": js_api.DeliverPolicy.BY_START_TIME,
}
_ACK_POLICIES = {
    "explicit": js_api.AckPolicy.EXPLICIT,
    "all": js_api.AckPolicy.ALL,
    "none": js_api.AckPolicy.NONE,
}
# Handlers at once with `concurrency: parallel`, unless `maxAckPending` says otherwise: the
# server's default maxAckPending, which bounds Dapr's goroutine-per-message the same way.
_PARALLEL = 1000
# The server's ackWait when the consumer sets none.
_SERVER_ACK_WAIT = 30.0
# Messages asked for in one pull request at most.
_MAX_BATCH = 256
# Back-off before asking again after the server ended a subscription's requests, in seconds.
_BACKOFF_MIN, _BACKOFF_MAX = 0.2, 5.0
# A subscription that heard nothing from the server for this long checks that its consumer
# still exists (seconds).
IDLE_CHECK = 5.0
# The API timeout of requests to JetStream (publish acks, stream and consumer management).
_API_TIMEOUT = 10.0
# Characters NATS does not allow in stream and consumer names.
_BAD_NAME = re.compile(r"[^A-Za-z0-9_-]")
# Publish-metadata names that make invalid NATS headers.
_BAD_HEADER = re.compile(r"[\x00-\x20:\x7f]")
# Message metadata naming the subject a message arrived on, as Dapr's jetstream sets it.
TOPIC_KEY = "Topic"


@dataclass(frozen=True)
class JetStreamMetadata:
    """Dapr's `pubsub.jetstream` metadata."""

    nats_url: str = field(default="", metadata={"name": "natsURL"})
    jwt: str = field(default="", metadata={"name": "jwt"})
    seed_key: str = field(default="", metadata={"name": "seedKey"})
    token: str = field(default="", metadata={"name": "token"})
    tls_client_cert: str = field(default="", metadata={"name": "tls_client_cert"})
    tls_client_key: str = field(default="", metadata={"name": "tls_client_key"})
    name: str = field(default="pillion - pubsub.jetstream", metadata={"name": "name"})
    stream_name: str = field(default="", metadata={"name": "streamName"})
    consumer_id: str = field(default="", metadata={"name": "consumerID"})
    durable_name: str = field(default="", metadata={"name": "durableName"})
    queue_group_name: str = field(default="", metadata={"name": "queueGroupName"})
    start_sequence: int = field(default=0, metadata={"name": "startSequence"})
    start_time: int | None = field(default=None, metadata={"name": "startTime"})
    # Older Dapr releases' spellings of deliverPolicy all / new.
    deliver_all: bool = field(default=False, metadata={"name": "deliverAll"})
    deliver_new: bool = field(default=False, metadata={"name": "deliverNew"})
    deliver_policy: str = field(default="", metadata={"name": "deliverPolicy"})
    flow_control: bool = field(default=False, metadata={"name": "flowControl"})
    ack_wait: Seconds | None = field(default=None, metadata={"name": "ackWait"})
    max_deliver: int = field(default=0, metadata={"name": "maxDeliver"})
    back_off: str = field(default="", metadata={"name": "backOff"})
    max_ack_pending: int = field(default=0, metadata={"name": "maxAckPending"})
    replicas: int = field(default=0, metadata={"name": "replicas"})
    memory_storage: bool = field(default=False, metadata={"name": "memoryStorage"})
    rate_limit: int = field(default=0, metadata={"name": "rateLimit"})
    heartbeat: Seconds | None = field(default=None, metadata={"name": "heartbeat"})
    ack_policy: str = field(default="explicit", metadata={"name": "ackPolicy"})
    domain: str = field(default="", metadata={"name": "domain"})
    api_prefix: str = field(default="", metadata={"name": "apiPrefix"})
    # Dapr's single or parallel; pillion also takes a number of handlers at once.
    concurrency: str = field(default="single", metadata={"name": "concurrency"})

    def validate(self) -> None:
        if not self.nats_url.strip():
            raise ComponentConfigError("natsURL", "is required (nats://host:port)")
        if bool(self.jwt) != bool(self.seed_key):
            missing = "seedKey" if self.jwt else "jwt"
            raise ComponentConfigError(missing, "jwt and seedKey go together")
        if bool(self.tls_client_cert) != bool(self.tls_client_key):
            missing = "tls_client_key" if self.tls_client_cert else "tls_client_cert"
            raise ComponentConfigError(missing, "tls_client_cert and tls_client_key go together")
        if self.stream_name and _BAD_NAME.search(self.stream_name):
            raise ComponentConfigError(
                "streamName", f"{self.stream_name!r} is not a valid stream name"
            )
        policy = self.policy()
        if policy == js_api.DeliverPolicy.BY_START_SEQUENCE and self.start_sequence <= 0:
            raise ComponentConfigError("startSequence", "deliverPolicy sequence needs it (>= 1)")
        if policy == js_api.DeliverPolicy.BY_START_TIME and self.start_time is None:
            raise ComponentConfigError("startTime", "deliverPolicy time needs it (Unix seconds)")
        if self.start_sequence and policy != js_api.DeliverPolicy.BY_START_SEQUENCE:
            raise ComponentConfigError("startSequence", "applies only to deliverPolicy sequence")
        if self.start_time is not None and policy != js_api.DeliverPolicy.BY_START_TIME:
            raise ComponentConfigError("startTime", "applies only to deliverPolicy time")
        if self.ack_policy.strip().lower() not in _ACK_POLICIES:
            raise ComponentConfigError(
                "ackPolicy", f"must be explicit, all or none, not {self.ack_policy!r}"
            )
        if self.ack_wait is not None and self.ack_wait <= 0:
            raise ComponentConfigError("ackWait", "must be positive")
        for name, value in (
            ("maxAckPending", self.max_ack_pending),
            ("replicas", self.replicas),
            ("startSequence", self.start_sequence),
        ):
            if value < 0:
                raise ComponentConfigError(name, "must not be negative")
        backoff = self.backoff()
        if backoff and self.max_deliver <= len(backoff):
            raise ComponentConfigError(
                "maxDeliver",
                f"JetStream needs it greater than the {len(backoff)} backOff durations",
            )
        self.limit()

    def policy(self) -> js_api.DeliverPolicy:
        raw = self.deliver_policy.strip().lower()
        if not raw:
            # Dapr's default is all; a start position alone implies its policy.
            if self.start_sequence > 0:
                return js_api.DeliverPolicy.BY_START_SEQUENCE
            if self.start_time is not None:
                return js_api.DeliverPolicy.BY_START_TIME
            if self.deliver_new and not self.deliver_all:
                return js_api.DeliverPolicy.NEW
            return js_api.DeliverPolicy.ALL
        if raw not in _DELIVER_POLICIES:
            raise ComponentConfigError(
                "deliverPolicy",
                f"{self.deliver_policy!r} is not one of: all, last, new, sequence, time",
            )
        return _DELIVER_POLICIES[raw]

    def backoff(self) -> list[float]:
        """`backOff` as seconds: "[1s, 5s, 30s]" or "1s,5s,30s"."""
        raw = self.back_off.strip()
        if raw.startswith("[") and raw.endswith("]"):
            raw = raw[1:-1]
        out: list[float] = []
        for part in raw.split(","):
            text = part.strip().strip("\"'")
            if not text:
                continue
            try:
                value = parse_duration(text)
            except ValueError:
                raise ComponentConfigError(
                    "backOff", f"{part.strip()!r} is not a duration like 5s"
                ) from None
            if value <= 0:
                raise ComponentConfigError("backOff", "durations must be positive")
            out.append(value)
        return out

    def limit(self, raw: str | None = None, field: str = "concurrency") -> int:
        """Handlers at once from a `concurrency` value: single, parallel or a number."""
        text = (self.concurrency if raw is None else raw).strip().lower()
        if text in ("", "single"):
            return 1
        if text == "parallel":
            return self.max_ack_pending or _PARALLEL
        try:
            n = int(text)
        except ValueError:
            raise ComponentConfigError(
                field, f"must be single, parallel or a number, not {text!r}"
            ) from None
        if n < 1:
            raise ComponentConfigError(field, "must be at least 1")
        return n

    def acks(self) -> bool:
        return _ACK_POLICIES[self.ack_policy.strip().lower()] != js_api.AckPolicy.NONE

    def ack_deadline(self) -> float:
        """How long the server waits for an ack before it redelivers."""
        backoff = self.backoff()
        if backoff:
            return backoff[0]  # the server uses backOff, not ackWait, when both are set
        return float(self.ack_wait) if self.ack_wait else _SERVER_ACK_WAIT

    def nak_delay(self, delivered: int) -> float:
        """Redelivery delay after a failed handler: backOff by attempt, else ackWait (as
        Dapr does), else at once."""
        backoff = self.backoff()
        if backoff:
            return backoff[min(delivered, len(backoff)) - 1]
        return float(self.ack_wait or 0)


def safe_name(text: str) -> str:
    """A valid stream or consumer name for `text`; altered names get a hash so they stay
    distinct ("a.b" and "a_b" do not collide)."""
    clean = _BAD_NAME.sub("_", text)
    if clean == text and len(clean) <= 200:
        return clean
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return f"{clean[:180]}_{digest}"


def subject_covers(pattern: str, subject: str) -> bool:
    """Whether the stream subject `pattern` (with * and >) takes in all of `subject`."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s):
            return False
        if token == "*":
            if s[i] == ">":
                return False
            continue
        if token != s[i]:
            return False
    return len(p) == len(s)


def _msg_id(topic: str, data: bytes) -> str | None:
    """A deduplication id from a CloudEvent's id, scoped to the topic.

    Dapr sends the CloudEvent id as Nats-Msg-Id so JetStream drops a retried publish; with the
    topic in it, forwarding the same event to a dead-letter topic of a shared stream is kept.
    """
    if not data.startswith(b"{"):
        return None
    try:
        event = json.loads(data)
    except ValueError:
        return None
    if isinstance(event, dict) and isinstance(event.get("id"), str) and event["id"]:
        return f"{topic}:{event['id']}"
    return None


def _headers(topic: str, data: bytes, metadata: Mapping[str, str]) -> dict[str, str] | None:
    headers: dict[str, str] = {}
    for key, value in metadata.items():
        if not key or _BAD_HEADER.search(key):
            log.debug("jetstream: metadata %r is not a valid header name; not sent", key)
            continue
        headers[key] = value.replace("\r", " ").replace("\n", " ")
    if "Nats-Msg-Id" not in headers:
        msg_id = _msg_id(topic, data)
        if msg_id is not None:
            headers["Nats-Msg-Id"] = msg_id
    return headers or None


def _client_cert_file(value: str, tmp: str, name: str) -> str:
    """A path for a certificate or key given as a path (Dapr) or as PEM text."""
    if "-----BEGIN" not in value:
        return value
    path = os.path.join(tmp, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return path


def _tls_context(meta: JetStreamMetadata) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    with tempfile.TemporaryDirectory(prefix="pillion-nats-") as tmp:
        cert = _client_cert_file(meta.tls_client_cert, tmp, "cert.pem")
        key = _client_cert_file(meta.tls_client_key, tmp, "key.pem")
        try:
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise ComponentConfigError(
                "tls_client_cert", f"cannot load the client certificate and key: {exc}"
            ) from None
    return ctx


def _nkeys_signer(seed: str) -> Any:
    try:
        import nkeys  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise ComponentConfigError(
            "seedKey", "jwt/seedKey authentication needs the nkeys package (pip install nkeys)"
        ) from None

    def sign(nonce: str) -> bytes:
        kp = nkeys.from_seed(seed.encode())
        try:
            sig: bytes = kp.sign(nonce.encode())
        finally:
            kp.wipe()
        return sig

    return sign


class JetStreamPubSub(PubSub):
    """Topics are subjects; the component's consumerID is a durable pull consumer.

    Each subscribed topic gets a durable consumer `<durableName>-<topic>` (durableName defaults
    to consumerID) filtered on the topic, so sidecars of one app id pull from the same consumer
    and compete for its messages, and different app ids each get every message. A message is
    acknowledged after its handler returned; a failed handler naks it (after backOff or ackWait
    when set), and while a handler runs the message is kept from redelivery with in-progress
    acks. Publishing waits for the stream's PubAck.

    Dapr requires the stream to exist. Pillion uses `streamName` when set, creating it or adding
    the topic to its subjects when needed; otherwise the stream that holds the topic's subject,
    or a new stream named after the topic. Streams pillion creates use the server's defaults
    (limits retention, no size or age limit).
    """

    # Seconds a closing subscription waits for its running handlers before cancelling them.
    close_grace = 5.0

    def __init__(self) -> None:
        self.meta: JetStreamMetadata | None = None
        self.durable = ""
        self.api_prefix = js_api.DEFAULT_PREFIX
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._jsm: JetStreamManager | None = None
        self._streams: dict[str, str] = {}  # topic -> stream that holds it
        self._stream_lock = asyncio.Lock()
        self._subscriptions: set[JetStreamSubscription] = set()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def init(self, info: ComponentInfo) -> None:
        meta = decode(JetStreamMetadata, info.properties)
        meta.validate()
        durable = meta.durable_name.strip() or meta.consumer_id.strip() or info.app_id
        if not durable:
            raise ComponentConfigError("consumerID", "is required (it names the consumers)")
        ignored = [
            name
            for name, on in (
                ("queueGroupName", bool(meta.queue_group_name)),
                ("flowControl", meta.flow_control),
                ("heartbeat", meta.heartbeat is not None),
                ("rateLimit", meta.rate_limit > 0),
            )
            if on
        ]
        if ignored:
            log.info(
                "pubsub.jetstream %s: %s apply to push consumers and are ignored: pillion uses "
                "pull consumers, whose sidecars compete through the durable consumer",
                info.name,
                ", ".join(ignored),
            )
        options: dict[str, Any] = {
            "servers": [u.strip() for u in meta.nats_url.split(",") if u.strip()],
            "name": meta.name,
            "allow_reconnect": True,
            "connect_timeout": 5,
            # Fail init after a few tries; reconnect for ever once connected (below).
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 1,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        if meta.jwt:
            jwt = meta.jwt.encode()
            options["user_jwt_cb"] = lambda: jwt
            options["signature_cb"] = _nkeys_signer(meta.seed_key)
        elif meta.token:
            options["token"] = meta.token
        if meta.tls_client_cert:
            options["tls"] = _tls_context(meta)
        try:
            nc = await nats.connect(**options)
        except Exception as exc:
            raise PubSubError(f"jetstream: cannot connect to {meta.nats_url}: {_why(exc)}") from exc
        nc.options["max_reconnect_attempts"] = -1
        if meta.domain:
            prefix = f"$JS.{meta.domain}.API"
        else:
            prefix = meta.api_prefix.strip() or js_api.DEFAULT_PREFIX
        self._nc = nc
        self.api_prefix = prefix
        self._js = nc.jetstream(prefix=prefix, timeout=_API_TIMEOUT)
        self._jsm = nc.jsm(prefix=prefix, timeout=_API_TIMEOUT)
        self.meta, self.durable = meta, durable
        try:
            await self._jsm.account_info()
        except Exception as exc:
            await self.close()
            raise PubSubError(
                f"jetstream: JetStream is not available at {meta.nats_url}: {_why(exc)}"
            ) from exc

    def features(self) -> frozenset[Feature]:
        # One handler at a time pulls a topic's messages in stream order.
        if self.meta is not None and self.meta.limit() == 1:
            return frozenset({Feature.ORDERED})
        return frozenset()

    async def close(self) -> None:
        self._closed = True
        for sub in list(self._subscriptions):
            await sub.close()
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            try:
                # Drain flushes the last acks before the connection closes.
                await nc.drain()
            except Exception as exc:
                log.debug("jetstream: draining the connection failed: %r", exc)
                with contextlib.suppress(Exception):
                    await nc.close()

    async def _on_error(self, exc: Exception) -> None:
        log.warning("jetstream: connection error: %r", exc)

    async def _on_disconnected(self) -> None:
        if not self._closed:
            log.warning("jetstream: disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        log.info("jetstream: reconnected to NATS")
        for sub in list(self._subscriptions):
            sub.reconnected()

    def connection(self) -> NATS | None:
        return None if self._closed else self._nc

    # -- publishing --------------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes, metadata: Mapping[str, str]) -> None:
        js, _ = self._require()
        _check_subject(topic, wildcards=False)
        headers = _headers(topic, data, metadata)
        try:
            try:
                await js.publish(topic, data, headers=headers)
            except nats.js.errors.NoStreamResponseError:
                # No stream takes the subject yet (or it was deleted): make one, then retry.
                self._streams.pop(topic, None)
                await self._stream_for(topic)
                await js.publish(topic, data, headers=headers)
        except (TimeoutError, nats.errors.Error) as exc:
            raise PubSubError(f"jetstream: publishing to {topic!r}: {_why(exc)}") from exc

    # -- subscribing -------------------------------------------------------------------------

    async def subscribe(self, req: SubscribeRequest, handler: Handler) -> JetStreamSubscription:
        _, meta = self._require()
        topic = req.topic
        _check_subject(topic, wildcards=True)
        limit = meta.limit()
        for key, value in req.metadata.items():
            if key.lower() == "concurrency":
                try:
                    limit = meta.limit(value, "subscription metadata concurrency")
                except ComponentConfigError as exc:
                    raise PubSubError(f"jetstream: {exc}") from None
        nc = self._nc
        assert nc is not None
        try:
            stream = await self._stream_for(topic)
            consumer = await self._consumer_for(stream, topic)
            sub = JetStreamSubscription(self, meta, topic, stream, consumer, handler, limit)
            await sub.start(nc)
        except (TimeoutError, nats.errors.Error) as exc:
            raise PubSubError(
                f"jetstream: cannot subscribe to {topic!r} for {self.durable!r}: {_why(exc)}"
            ) from exc
        self._subscriptions.add(sub)
        return sub

    def _forget(self, sub: JetStreamSubscription) -> None:
        self._subscriptions.discard(sub)

    # -- streams and consumers ---------------------------------------------------------------

    def consumer_name(self, topic: str) -> str:
        # The topic is in the name so one durableName serves many topics of one stream.
        return safe_name(f"{self.durable}-{topic}")

    async def _stream_for(self, topic: str) -> str:
        """The stream holding `topic`, made (or extended) when none does."""
        known = self._streams.get(topic)
        if known is not None:
            return known
        async with self._stream_lock:
            if topic not in self._streams:
                self._streams[topic] = await self._ensure_stream(topic)
        return self._streams[topic]

    async def _ensure_stream(self, topic: str) -> str:
        jsm, meta = self._require_jsm()
        if meta.stream_name:
            name = meta.stream_name
            try:
                info = await jsm.stream_info(name)
            except nats.js.errors.NotFoundError:
                await self._add_stream(name, topic)
                return name
            subjects = list(info.config.subjects or [])
            if not any(subject_covers(s, topic) for s in subjects):
                log.info("jetstream: adding subject %r to stream %r", topic, name)
                info.config.subjects = [*subjects, topic]
                await jsm.update_stream(info.config)
            return name
        try:
            return await jsm.find_stream_name_by_subject(topic)
        except nats.js.errors.NotFoundError:
            pass
        name = safe_name(topic)
        try:
            await self._add_stream(name, topic)
        except nats.js.errors.BadRequestError:
            # Another sidecar made a stream for it meanwhile (or its subjects overlap one).
            return await jsm.find_stream_name_by_subject(topic)
        return name

    async def _add_stream(self, name: str, topic: str) -> None:
        jsm, meta = self._require_jsm()
        log.info("jetstream: creating stream %r for subject %r", name, topic)
        await jsm.add_stream(
            js_api.StreamConfig(
                name=name,
                subjects=[topic],
                storage=js_api.StorageType.MEMORY
                if meta.memory_storage
                else js_api.StorageType.FILE,
                num_replicas=meta.replicas or None,
            )
        )

    async def _consumer_for(self, stream: str, topic: str) -> str:
        """The group's durable consumer of `topic` on `stream`, created on first use."""
        jsm, meta = self._require_jsm()
        name = self.consumer_name(topic)
        try:
            info = await jsm.consumer_info(stream, name)
        except nats.js.errors.NotFoundError:
            info = None
        if info is not None:
            # An existing consumer keeps its settings; delete it to apply changed metadata.
            if info.config.filter_subject not in (None, "", topic):
                raise PubSubError(
                    f"jetstream: consumer {name!r} of stream {stream!r} filters "
                    f"{info.config.filter_subject!r}, not {topic!r}"
                )
            if info.config.deliver_subject:
                raise PubSubError(
                    f"jetstream: consumer {name!r} of stream {stream!r} is a push consumer; "
                    "pillion needs a pull consumer (delete it or set another durableName)"
                )
            return name
        policy = meta.policy()
        config = js_api.ConsumerConfig(
            name=name,
            durable_name=name,
            filter_subject=topic,
            deliver_policy=policy,
            ack_policy=_ACK_POLICIES[meta.ack_policy.strip().lower()],
            ack_wait=float(meta.ack_wait) if meta.ack_wait else None,
            max_deliver=meta.max_deliver or None,
            backoff=meta.backoff() or None,
            max_ack_pending=meta.max_ack_pending or None,
            num_replicas=meta.replicas or None,
            mem_storage=True if meta.memory_storage else None,
        )
        if policy == js_api.DeliverPolicy.BY_START_SEQUENCE:
            config.opt_start_seq = meta.start_sequence
        elif policy == js_api.DeliverPolicy.BY_START_TIME and meta.start_time is not None:
            config.opt_start_time = datetime.datetime.fromtimestamp(
                meta.start_time, tz=datetime.UTC
            )
        log.info("jetstream: creating consumer %r on stream %r for %r", name, stream, topic)
        try:
            await jsm.add_consumer(stream, config)
        except nats.js.errors.APIError:
            # Another sidecar of the group may have made it meanwhile; then use that one.
            try:
                await jsm.consumer_info(stream, name)
            except nats.js.errors.NotFoundError:
                pass
            else:
                return name
            raise
        return name

    # -- helpers -----------------------------------------------------------------------------

    def _require(self) -> tuple[JetStreamContext, JetStreamMetadata]:
        if self._closed or self._js is None or self.meta is None:
            raise PubSubError("jetstream: the component is closed")
        return self._js, self.meta

    def _require_jsm(self) -> tuple[JetStreamManager, JetStreamMetadata]:
        if self._closed or self._jsm is None or self.meta is None:
            raise PubSubError("jetstream: the component is closed")
        return self._jsm, self.meta


def _why(exc: BaseException) -> str:
    """An error's message, or its type when it has none (many nats errors have none)."""
    text = str(exc)
    return text if text else type(exc).__name__


def _check_subject(topic: str, *, wildcards: bool) -> None:
    if not topic or any(c.isspace() for c in topic) or "\x00" in topic:
        raise PubSubError(f"jetstream: {topic!r} is not a valid subject")
    tokens = topic.split(".")
    if any(not t for t in tokens):
        raise PubSubError(f"jetstream: {topic!r} is not a valid subject (empty token)")
    if wildcards:
        if any(t == ">" for t in tokens[:-1]):
            raise PubSubError(f"jetstream: {topic!r}: > must be the last token")
    elif any(t in ("*", ">") for t in tokens):
        raise PubSubError(f"jetstream: cannot publish to the wildcard subject {topic!r}")


class JetStreamSubscription:
    """Pulls one durable consumer's messages, with up to `limit` handlers at once.

    Pull requests carry no expiry: each asks for as many messages as there is room for and
    stays on the server until they have come (credits). Expiring requests, as a fetch loop
    sends, meet a NATS server bug (2.9.x: a redelivery that finds only expired requests
    rewinds the consumer, which then hands an acknowledged message out again); a request
    that never expires cannot be found expired. Credits are counted down as messages arrive
    and dropped when the server ends a request (408/409) or the connection is re-established.
    """

    def __init__(
        self,
        owner: JetStreamPubSub,
        meta: JetStreamMetadata,
        topic: str,
        stream: str,
        consumer: str,
        handler: Handler,
        limit: int,
    ) -> None:
        self.topic = topic
        self._owner = owner
        self._target(stream, consumer)
        self._meta = meta
        self._handler = handler
        self._limit = limit
        self._acks = meta.acks()
        self._inbox: Subscription | None = None
        self._credits = 0  # messages asked for and not come yet
        # Messages held here (come, not yet acked or naked), for the in-progress acks; by
        # id(), as Msg is not hashable.
        self._held: dict[int, Msg] = {}
        # Messages waiting for the one handler of an ordered (limit 1) subscription.
        self._queue: asyncio.Queue[Msg | None] = asyncio.Queue()  # None: closing
        self._handlers: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # requests and retries in flight
        self._backoff = _BACKOFF_MIN
        self._failing = False
        self._worker: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._heard = time.monotonic()  # when the server last sent a message or status
        self._closing = False
        self._closed = asyncio.Event()

    async def start(self, nc: NATS) -> None:
        self._inbox = await nc.subscribe(nc.new_inbox(), cb=self._on_message)
        loop = asyncio.get_running_loop()
        if self._limit == 1:
            self._worker = loop.create_task(self._work(), name=f"pubsub.jetstream {self.topic}")
        if self._acks:
            self._ticker = loop.create_task(
                self._keep_alive(), name=f"pubsub.jetstream progress {self.topic}"
            )
        self._heard = time.monotonic()
        self._watcher = loop.create_task(self._watch(), name=f"pubsub.jetstream watch {self.topic}")
        await self._ask()

    # -- asking for messages -----------------------------------------------------------------

    async def _ask(self) -> None:
        """Ask for the messages there is room for; small top-ups wait until half is free."""
        if self._closing or self._inbox is None:
            return
        missing = self._limit - len(self._held) - self._credits
        if missing <= 0 or (self._credits and missing < max(1, self._limit // 2)):
            return
        nc = self._owner.connection()
        if nc is None:
            return
        while missing > 0 and not self._closing:
            batch = min(missing, _MAX_BATCH)
            self._credits += batch
            missing -= batch
            try:
                await nc.publish(
                    self._next_subject,
                    json.dumps({"batch": batch}).encode(),
                    reply=self._inbox.subject,
                )
            except (nats.errors.Error, OSError) as exc:
                self._credits -= batch
                self._retry_later(f"asking for messages failed ({_why(exc)})")
                return

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        if self._closing:
            work.close()
            return
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask_after(self, delay: float, *, recreate: bool) -> None:
        if delay:
            await asyncio.sleep(delay)
        if recreate and not await self._recreate():
            # Asking a consumer that is not there would wait for ever: try again later.
            self._retry_later("the stream or consumer cannot be made", recreate=True)
            return
        await self._ask()

    def _retry_later(self, why: str, *, recreate: bool = False) -> None:
        """The server ended our requests: ask again after a back-off."""
        self._credits = 0
        if self._closing:
            return
        if not self._failing:
            log.warning(
                "jetstream: pulling %r from %r: %s; retrying", self.topic, self.consumer, why
            )
        self._failing = True
        delay, self._backoff = self._backoff, min(self._backoff * 2, _BACKOFF_MAX)
        self._spawn(self._ask_after(delay, recreate=recreate))

    def reconnected(self) -> None:
        """A new connection: requests on the old one may be gone, and so may the consumer (a
        restarted server, or deleted while the 409 could not reach us). A request for a consumer
        that does not exist gets no answer at all, so check it, then ask again."""
        self._credits = 0
        self._spawn(self._ask_after(0, recreate=True))

    async def _recreate(self) -> bool:
        """Make the stream and consumer again when the server lost them (deleted, say); the
        stream may now be another one (the topic's own, made anew). False: not possible now."""
        owner = self._owner
        owner._streams.pop(self.topic, None)
        try:
            stream = await owner._stream_for(self.topic)
            consumer = await owner._consumer_for(stream, self.topic)
        except (TimeoutError, nats.errors.Error, PubSubError) as exc:
            log.debug("jetstream: recreating the consumer of %r failed: %r", self.topic, exc)
            return False
        self._target(stream, consumer)
        return True

    def _target(self, stream: str, consumer: str) -> None:
        self.stream = stream
        self.consumer = consumer
        self._next_subject = f"{self._owner.api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"

    # -- receiving ---------------------------------------------------------------------------

    async def _watch(self) -> None:
        """A request that reaches the server after its consumer was deleted (the stream deleted
        while it was on its way, say) gets no answer and no 409: while nothing is heard, look
        every IDLE_CHECK seconds whether the consumer is still there, and make it again if
        not."""
        while True:
            await asyncio.sleep(max(self._heard + IDLE_CHECK - time.monotonic(), 0.0))
            if time.monotonic() - self._heard < IDLE_CHECK:
                continue
            self._heard = time.monotonic()
            if not self._credits:
                continue  # nothing asked for (full, or a retry is on its way)
            try:
                jsm, _ = self._owner._require_jsm()
                await jsm.consumer_info(self.stream, self.consumer)
            except nats.js.errors.NotFoundError:
                self._retry_later("the consumer is gone", recreate=True)
            except (TimeoutError, nats.errors.Error, PubSubError) as exc:
                log.debug("jetstream: checking the consumer of %r failed: %r", self.topic, exc)

    async def _on_message(self, msg: Msg) -> None:
        self._heard = time.monotonic()
        status = (msg.headers or {}).get(js_api.Header.STATUS)
        if status:
            self._on_status(status, msg)
            return
        self._credits = max(self._credits - 1, 0)
        if self._failing:
            log.info("jetstream: pulling %r again", self.topic)
            self._failing, self._backoff = False, _BACKOFF_MIN
        if self._closing:
            await self._give_back(msg)
            return
        self._held[id(msg)] = msg
        if self._limit == 1:
            self._queue.put_nowait(msg)
        else:
            task = asyncio.get_running_loop().create_task(self._handle(msg))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    def _on_status(self, status: str, msg: Msg) -> None:
        headers = msg.headers or {}
        if status == js_api.StatusCode.CONTROL_MESSAGE:
            return  # heartbeat or flow control
        if status in (js_api.StatusCode.NO_MESSAGES, js_api.StatusCode.REQUEST_TIMEOUT):
            # A request ended; the server says how many of its messages did not come.
            left = headers.get("Nats-Pending-Messages")
            if left is not None and left.isdigit():
                self._credits = max(self._credits - int(left), 0)
            else:
                self._credits = 0
            self._spawn(self._ask())
            return
        description = headers.get(js_api.Header.DESCRIPTION, "")
        recreate = "deleted" in description.lower()
        self._retry_later(f"{status} {description}".strip(), recreate=recreate)

    async def _work(self) -> None:
        """The one handler of an ordered subscription, in arrival order."""
        while True:
            msg = await self._queue.get()
            if msg is None:
                return
            if self._closing:
                await self._give_back(msg)
                continue
            await self._handle(msg)

    async def _give_back(self, msg: Msg) -> None:
        """Closing: a message not started goes back to the consumer at once, for another
        member (a nak without delay)."""
        self._held.pop(id(msg), None)
        if self._acks:
            await self._settle(msg.nak(), "nak")

    async def _handle(self, msg: Msg) -> None:
        try:
            meta = msg.metadata
            message = Message(
                topic=msg.subject,
                data=msg.data,
                metadata=_message_metadata(msg),
                id=f"{meta.stream}:{meta.sequence.stream}",
                attempt=meta.num_delivered,
            )
            try:
                await self._handler(message)
            except Exception as exc:
                log.warning(
                    "jetstream: handler failed for message %s of %r (attempt %d): %r",
                    message.id,
                    self.topic,
                    message.attempt,
                    exc,
                )
                if self._acks:
                    await self._settle(msg.nak(self._meta.nak_delay(meta.num_delivered)), "nak")
                return
            if self._acks:
                await self._settle(msg.ack(), "ack")
        finally:
            self._held.pop(id(msg), None)
            await self._ask()

    async def _settle(self, op: Any, what: str) -> None:
        try:
            await op
        except (nats.errors.Error, OSError) as exc:
            # Not acked: the server delivers it again after ackWait (at least once).
            log.warning("jetstream: %s for a message of %r failed: %r", what, self.topic, exc)

    async def _keep_alive(self) -> None:
        # A handler that outlasts ackWait would see its message go to another consumer; an
        # in-progress ack resets the server's timer for messages still held here (running or
        # waiting for the ordered handler).
        interval = max(self._meta.ack_deadline() / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            for msg in list(self._held.values()):
                with contextlib.suppress(nats.errors.Error, OSError):
                    await msg.in_progress()

    # -- closing -----------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            running = set(self._handlers)
            if self._worker is not None:
                running.add(self._worker)
                # Messages not started yet go back; the one being handled may finish.
                self._queue.put_nowait(None)
            if running:
                _done, pending = await asyncio.wait(running, timeout=self._owner.close_grace)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
                    log.warning(
                        "jetstream: %d handlers of %r did not finish within %gs; their "
                        "messages are delivered again after ackWait",
                        len(pending),  # handler tasks, or the one ordered worker
                        self.topic,
                        self._owner.close_grace,
                    )
            for ticker in (self._ticker, self._watcher):
                if ticker is not None:
                    ticker.cancel()
                    await asyncio.gather(ticker, return_exceptions=True)
            if self._inbox is not None:
                # Drain: the server stops sending to the inbox, and what it sent before that
                # still reaches _on_message, which gives it back (nak) at once.
                try:
                    await self._inbox.drain()  # type: ignore[no-untyped-call]
                except Exception:
                    with contextlib.suppress(Exception):
                        await self._inbox.unsubscribe()
        finally:
            self._owner._forget(self)
            self._closed.set()


def _message_metadata(msg: Msg) -> dict[str, str]:
    out = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
    out[TOPIC_KEY] = msg.subject
    return out
