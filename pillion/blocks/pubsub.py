"""The pub/sub block: publish with CloudEvents, subscriptions, routing, delivery, dead letters."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pillion.blocks import cloudevents as ce
from pillion.blocks.guard import component_call, recorder
from pillion.blocks.routing import RouteEvalError, Routes
from pillion.components.metadata import ComponentConfigError, parse_bool
from pillion.components.pubsub.api import (
    BulkEntry,
    BulkPublisher,
    Feature,
    Message,
    PubSub,
    PubSubError,
    SubscribeRequest,
    Subscription,
    TopicNotFound,
)
from pillion.errors import GrpcCode, PillionError
from pillion.observability.tracing import CONSUMER, start_with_carrier
from pillion.resiliency import CircuitOpen

if TYPE_CHECKING:
    from pillion.observability.dapr_metrics import DaprMetrics
    from pillion.observability.tracing import Tracer
    from pillion.resiliency import Resiliency

log = logging.getLogger("pillion.blocks.pubsub")

CLOUDEVENTS_JSON = "application/cloudevents+json"


@dataclass(frozen=True)
class PubSubEntry:
    """A loaded pub/sub component as the block sees it."""

    name: str
    component: PubSub
    scopes: ce.TopicScopes


@dataclass(frozen=True)
class BulkSubscribe:
    enabled: bool = False
    max_messages: int = 100
    max_await_ms: int = 40


@dataclass(frozen=True)
class SubscriptionSpec:
    """One subscription of the app: where it came from, and how events reach the app."""

    pubsub: str
    topic: str
    routes: Routes
    metadata: Mapping[str, str] = field(default_factory=dict)
    dead_letter_topic: str = ""
    kind: str = "PROGRAMMATIC"  # DECLARATIVE | PROGRAMMATIC | STREAMING
    bulk: BulkSubscribe = field(default_factory=BulkSubscribe)

    @property
    def raw_payload(self) -> bool:
        try:
            return parse_bool("rawPayload", self.metadata.get("rawPayload", "false"))
        except ComponentConfigError:
            return False

    def view(self) -> dict[str, Any]:
        """The metadata API's entry for this subscription."""
        out: dict[str, Any] = {"pubsubname": self.pubsub, "topic": self.topic, "type": self.kind}
        if self.metadata:
            out["metadata"] = dict(self.metadata)
        rules = [{"match": m, "path": p} for m, p in self.routes.rules]
        if self.routes.default:
            rules.append({"path": self.routes.default})
        if rules:
            out["rules"] = rules
        if self.dead_letter_topic:
            out["deadLetterTopic"] = self.dead_letter_topic
        return out


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event on its way to the app."""

    spec: SubscriptionSpec
    path: str
    envelope: dict[str, Any]
    metadata: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class BulkItem:
    """One entry of a bulk delivery (bulkSubscribe): the event and its broker metadata."""

    entry_id: str
    envelope: dict[str, Any]
    metadata: Mapping[str, str]


class AppDeliverer(Protocol):
    """Sidecar -> app delivery (HTTP POST or gRPC OnTopicEvent / OnBulkTopicEvent)."""

    async def deliver(self, d: Delivery) -> ce.Result: ...

    async def deliver_bulk(
        self, spec: SubscriptionSpec, path: str, items: Sequence[BulkItem]
    ) -> dict[str, ce.Result]:
        """A result per entry id; entries missing from the answer count as RETRY."""
        ...


async def deliver_each(
    deliverer: AppDeliverer, spec: SubscriptionSpec, path: str, items: Sequence[BulkItem]
) -> dict[str, ce.Result]:
    """A bulk delivery done as single deliveries, for channels without a bulk call."""
    results = await asyncio.gather(
        *(deliverer.deliver(Delivery(spec, path, it.envelope, it.metadata)) for it in items),
        return_exceptions=True,
    )
    return {
        it.entry_id: r if isinstance(r, ce.Result) else ce.Result.RETRY
        for it, r in zip(items, results, strict=True)
    }


@dataclass(frozen=True, slots=True)
class BulkPublishEntry:
    entry_id: str
    event: Any  # JSON value as sent (HTTP) or bytes (gRPC)
    content_type: str
    metadata: Mapping[str, str] = field(default_factory=dict)


def _err(
    code: str, reason: str, message: str, http: int, grpc: GrpcCode, pubsub: str = "", **md: str
) -> PillionError:
    return PillionError(
        code,
        message,
        http,
        grpc,
        reason=reason,
        metadata=dict(md),
        resource_type="pubsub" if pubsub else None,
        resource_name=pubsub or None,
    )


class PubSubBlock:
    """Publishing and subscriptions for every transport; the adapters only decode and encode."""

    def __init__(self, app_id: str, pubsubs: Mapping[str, PubSubEntry]) -> None:
        self.app_id = app_id
        self.pubsubs = dict(pubsubs)
        self._subs: list[tuple[SubscriptionSpec, Subscription]] = []
        self._specs: list[SubscriptionSpec] = []
        self._internal: list[Subscription] = []
        # Set by the runtime. Without an inbound resiliency policy a delivery is tried once, then
        # dead-lettered or handed back to the broker (which redelivers it), as in Dapr.
        self.tracer: Tracer | None = None
        self.metrics: DaprMetrics | None = None
        self.resiliency: Resiliency | None = None

    # --- lookup -------------------------------------------------------------------------------

    def entry(self, name: str, topic: str) -> PubSubEntry:
        if not self.pubsubs:
            raise _err(
                "ERR_PUBSUB_NOT_CONFIGURED",
                "DAPR_PUBSUB_NOT_CONFIGURED",
                "no pubsub is configured",
                400,
                GrpcCode.FAILED_PRECONDITION,
                appID=self.app_id,
            )
        if not name:
            raise _err(
                "ERR_PUBSUB_EMPTY",
                "DAPR_PUBSUB_NAME_EMPTY",
                "pubsub name is empty",
                404,
                GrpcCode.INVALID_ARGUMENT,
                appID=self.app_id,
            )
        e = self.pubsubs.get(name)
        if e is None:
            raise _err(
                "ERR_PUBSUB_NOT_FOUND",
                "DAPR_PUBSUB_NOT_FOUND",
                f"pubsub {name} is not found",
                404,
                GrpcCode.INVALID_ARGUMENT,
                name,
                appID=self.app_id,
            )
        if not topic:
            raise _err(
                "ERR_TOPIC_NAME_EMPTY",
                "DAPR_PUBSUB_TOPIC_NAME_EMPTY",
                f"topic is empty in pubsub {name}",
                404,
                GrpcCode.INVALID_ARGUMENT,
                name,
                appID=self.app_id,
            )
        return e

    # --- publish ------------------------------------------------------------------------------

    async def publish(
        self,
        pubsub: str,
        topic: str,
        data: bytes,
        *,
        content_type: str | None,
        metadata: Mapping[str, str],
        traceparent: str = "",
        tracestate: str = "",
    ) -> None:
        e = self.entry(pubsub, topic)
        self._check_publish(e, topic)
        payload = self._payload(
            e, pubsub, topic, data, content_type, metadata, traceparent, tracestate
        )
        await self._send(e, pubsub, topic, payload, _broker_metadata(metadata))

    def _check_publish(self, e: PubSubEntry, topic: str) -> None:
        if not e.scopes.can_publish(self.app_id, topic):
            raise _err(
                "ERR_PUBSUB_FORBIDDEN",
                "DAPR_PUBSUB_FORBIDDEN",
                f"topic {topic} is not allowed for app id {self.app_id}",
                403,
                GrpcCode.PERMISSION_DENIED,
                e.name,
                appID=self.app_id,
                topic=topic,
            )

    def _payload(
        self,
        e: PubSubEntry,
        pubsub: str,
        topic: str,
        data: bytes,
        content_type: str | None,
        metadata: Mapping[str, str],
        traceparent: str,
        tracestate: str,
    ) -> bytes:
        raw = metadata.get("rawPayload")
        if raw is not None:
            try:
                is_raw = parse_bool("rawPayload", raw)
            except ComponentConfigError as exc:
                raise _err(
                    "ERR_PUBSUB_REQUEST_METADATA",
                    "DAPR_PUBSUB_METADATA_DESERIALIZATION",
                    f"failed deserializing metadata: {exc}",
                    400,
                    GrpcCode.INVALID_ARGUMENT,
                    pubsub,
                ) from exc
            if is_raw:
                return data
        ttl = None
        if metadata.get("ttlInSeconds") and Feature.MESSAGE_TTL not in e.component.features():
            try:
                ttl = int(metadata["ttlInSeconds"])
            except ValueError as exc:
                raise _err(
                    "ERR_PUBSUB_REQUEST_METADATA",
                    "DAPR_PUBSUB_METADATA_DESERIALIZATION",
                    f"failed deserializing metadata: ttlInSeconds: {exc}",
                    400,
                    GrpcCode.INVALID_ARGUMENT,
                    pubsub,
                ) from exc
        try:
            if (content_type or "").split(";")[0].strip().lower() == CLOUDEVENTS_JSON:
                env = ce.complete_envelope(
                    data, topic=topic, pubsub=pubsub, traceparent=traceparent, tracestate=tracestate
                )
            else:
                overrides = {
                    k[11:]: v for k, v in metadata.items() if k.lower().startswith("cloudevent.")
                }
                env = ce.new_envelope(
                    data=data,
                    content_type=content_type,
                    topic=topic,
                    pubsub=pubsub,
                    source=self.app_id,
                    traceparent=traceparent,
                    tracestate=tracestate,
                    ttl_seconds=ttl,
                    overrides=overrides,
                )
            return ce.encode(env)
        except ce.CloudEventError as exc:
            raise _err(
                "ERR_PUBSUB_CLOUD_EVENTS_SER",
                "DAPR_PUBSUB_CLOUD_EVENT_CREATION",
                f"cannot create cloudevent: {exc}",
                500,
                GrpcCode.INVALID_ARGUMENT,
                pubsub,
            ) from exc

    async def _send(
        self, e: PubSubEntry, pubsub: str, topic: str, payload: bytes, metadata: Mapping[str, str]
    ) -> None:
        record = recorder(self.metrics, "pubsub_egress", pubsub, topic)
        try:
            await component_call(
                self.resiliency,
                pubsub,
                "pubsub",
                lambda: e.component.publish(topic, payload, metadata),
                record=record,
                retryable=lambda exc: not isinstance(exc, TopicNotFound),
            )
        except TopicNotFound as exc:
            raise _err(
                "ERR_PUBSUB_NOT_FOUND",
                "DAPR_PUBSUB_TEST_NOT_FOUND",
                f"topic {topic} not found in pubsub {pubsub}: {exc}",
                400,
                GrpcCode.NOT_FOUND,
                pubsub,
            ) from exc
        except (PubSubError, TimeoutError, CircuitOpen) as exc:
            detail = "timeout" if isinstance(exc, TimeoutError) else str(exc)
            raise _err(
                "ERR_PUBSUB_PUBLISH_MESSAGE",
                "DAPR_PUBSUB_PUBLISH_MESSAGE",
                f"error when publishing to topic {topic} in pubsub {pubsub}: {detail}",
                500,
                GrpcCode.INTERNAL,
                pubsub,
                topic=topic,
            ) from exc

    async def bulk_publish(
        self,
        pubsub: str,
        topic: str,
        entries: Sequence[BulkPublishEntry],
        metadata: Mapping[str, str],
        *,
        traceparent: str = "",
        tracestate: str = "",
    ) -> list[tuple[str, str]]:
        """Publish every entry; (entry_id, error) for each that failed."""
        e = self.entry(pubsub, topic)
        self._check_publish(e, topic)
        ids = [x.entry_id for x in entries]
        if any(not i for i in ids) or len(set(ids)) != len(ids):
            raise _err(
                "ERR_PUBSUB_EVENTS_SER",
                "DAPR_PUBSUB_MARSHAL_EVENTS",
                "error: entryId is duplicated or not present for entry",
                400,
                GrpcCode.INVALID_ARGUMENT,
                pubsub,
            )
        built: list[BulkEntry] = []
        for x in entries:
            md = {**metadata, **x.metadata}
            try:
                data = (
                    x.event
                    if isinstance(x.event, bytes)
                    else ce.bulk_entry_bytes(x.event, x.content_type)
                )
            except ce.CloudEventError as exc:
                raise _err(
                    "ERR_PUBSUB_EVENTS_SER",
                    "DAPR_PUBSUB_MARSHAL_EVENTS",
                    f"error: {exc} for entry {x.entry_id}",
                    400,
                    GrpcCode.INVALID_ARGUMENT,
                    pubsub,
                ) from exc
            payload = self._payload(
                e, pubsub, topic, data, x.content_type or None, md, traceparent, tracestate
            )
            built.append(BulkEntry(x.entry_id, payload, _broker_metadata(md)))
        comp = e.component
        if Feature.BULK_PUBLISH in comp.features() and isinstance(comp, BulkPublisher):
            try:
                return await comp.bulk_publish(topic, built, _broker_metadata(metadata))
            except PubSubError as exc:
                return [(b.entry_id, str(exc)) for b in built]
        results = await asyncio.gather(
            *(comp.publish(topic, b.data, b.metadata) for b in built), return_exceptions=True
        )
        failed: list[tuple[str, str]] = []
        for b, r in zip(built, results, strict=True):
            if isinstance(r, BaseException):
                if not isinstance(r, Exception):
                    raise r
                failed.append((b.entry_id, str(r)))
        return failed

    # --- subscriptions ------------------------------------------------------------------------

    def subscriptions(self) -> list[SubscriptionSpec]:
        return list(self._specs)

    async def subscribe(self, spec: SubscriptionSpec, deliverer: AppDeliverer) -> bool:
        """Start delivering `spec`'s topic to the app; False when it is refused (logged)."""
        e = self.pubsubs.get(spec.pubsub)
        if e is None:
            log.warning(
                "subscription to %s/%s refused: pubsub %s is not found",
                spec.pubsub,
                spec.topic,
                spec.pubsub,
            )
            return False
        if not e.scopes.can_subscribe(self.app_id, spec.topic):
            log.warning(
                "subscription to topic %s refused: not allowed for app id %s (subscriptionScopes)",
                spec.topic,
                self.app_id,
            )
            return False
        handler = _Handler(self, e, spec, deliverer)
        req = SubscribeRequest(spec.topic, dict(spec.metadata))
        sub = await e.component.subscribe(req, handler)
        self._subs.append((spec, sub))
        self._specs.append(spec)
        log.info(
            "subscribed to topic %s on pubsub %s (%s)", spec.topic, spec.pubsub, spec.kind.lower()
        )
        return True

    async def subscribe_internal(
        self, pubsub: str, topic: str, handler: Callable[[dict[str, Any]], Awaitable[None]]
    ) -> None:
        """A runtime-owned subscription (e.g. the outbox's): not the app's, not in the metadata
        API, kept while the app is unhealthy. `handler` gets the decoded CloudEvent; raising
        leaves the message unacknowledged (the broker redelivers it)."""
        e = self.entry(pubsub, topic)

        async def on_message(msg: Message) -> None:
            try:
                env = ce.decode(msg.data)
            except ce.CloudEventError as exc:
                log.error("message %s on topic %s is not a CloudEvent: %s", msg.id, topic, exc)
                return
            await handler(env)

        self._internal.append(await e.component.subscribe(SubscribeRequest(topic), on_message))

    async def unsubscribe(self, spec: SubscriptionSpec) -> None:
        for i, (s, sub) in enumerate(self._subs):
            if s is spec:
                del self._subs[i]
                self._specs.remove(spec)
                await sub.close()
                return

    async def stop(self, *, app_only: bool = False) -> None:
        """Stop subscriptions (`app_only`: not the streaming ones, which belong to clients);
        unacknowledged messages stay with the broker."""
        stopping = [(s, sub) for s, sub in self._subs if not app_only or s.kind != "STREAMING"]
        self._subs = [x for x in self._subs if x not in stopping]
        self._specs = [s for s, _ in self._subs]
        closing = [sub for _, sub in stopping]
        if not app_only:
            closing += self._internal
            self._internal = []
        await asyncio.gather(*(sub.close() for sub in closing), return_exceptions=True)

    async def dead_letter(self, e: PubSubEntry, spec: SubscriptionSpec, msg: Message) -> None:
        """Forward a message to the subscription's dead-letter topic (same pubsub, same bytes)."""
        await e.component.publish(spec.dead_letter_topic, msg.data, dict(msg.metadata))
        log.warning(
            "message %s on topic %s sent to dead-letter topic %s",
            msg.id,
            msg.topic,
            spec.dead_letter_topic,
        )


class _Handler:
    """Turns one broker message into app deliveries: decode, expire, route, retry, dead-letter."""

    def __init__(
        self, block: PubSubBlock, e: PubSubEntry, spec: SubscriptionSpec, deliverer: AppDeliverer
    ) -> None:
        self.block = block
        self.e = e
        self.spec = spec
        self.deliverer = deliverer
        self._batches: dict[str, _Batch] = {}

    async def __call__(self, msg: Message) -> None:
        spec = self.spec
        if spec.raw_payload:
            env = ce.raw_envelope(
                msg.data, topic=msg.topic, pubsub=spec.pubsub, metadata=msg.metadata
            )
        else:
            try:
                env = ce.decode(msg.data)
            except ce.CloudEventError as exc:
                log.error("message %s on topic %s is not a CloudEvent: %s", msg.id, msg.topic, exc)
                await self._give_up(msg)
                return
        if ce.is_expired(env):
            log.warning("message %s on topic %s expired before delivery", msg.id, msg.topic)
            await self._give_up(msg)
            return
        try:
            path = spec.routes.select(env)
        except RouteEvalError as exc:
            # Dapr: a rule that fails to evaluate stops routing; dead-letter, else retry.
            log.error("routing message %s on topic %s failed: %s", msg.id, msg.topic, exc)
            if spec.dead_letter_topic:
                await self.block.dead_letter(self.e, spec, msg)
                return
            raise PubSubError(f"routing failed: {exc}") from exc
        if path is None:
            # No rule matched and no default: dropped as success, as Dapr does.
            await self._give_up(msg)
            return
        headers = {**msg.metadata, "pubsubName": spec.pubsub}
        block = self.block
        tracer = block.tracer
        span = None
        if tracer is not None and tracer.enabled:
            span, context = start_with_carrier(tracer, f"pubsub/{msg.topic}", env, CONSUMER)
            if span is not None:
                span.set("messaging.system", "pubsub")
                span.set("messaging.destination.name", msg.topic)
                span.set("db.name", spec.pubsub)
            headers.update(context)
        delivery = Delivery(spec, path, env, headers)

        async def attempt() -> ce.Result:
            try:
                if spec.bulk.enabled:
                    return await self._batch(path).add(env, headers)
                return await self.deliverer.deliver(delivery)
            except PillionError as exc:  # app unreachable, unhealthy, ...
                log.warning("delivery of %s to %s failed: %s", msg.id, path, exc.message)
                return ce.Result.RETRY

        policy = (
            block.resiliency.component_inbound(spec.pubsub, "pubsub")
            if block.resiliency is not None
            else None
        )
        t0 = time.perf_counter()
        if policy is None:
            result = await attempt()
        else:
            try:
                result = await policy.run(attempt, failed=lambda r: r == ce.Result.RETRY)
            except (TimeoutError, CircuitOpen) as exc:
                log.warning("delivery of %s to %s failed: %s", msg.id, path, exc or "timeout")
                result = ce.Result.RETRY
        if block.metrics is not None:
            block.metrics.pubsub_ingress(
                spec.pubsub,
                msg.topic,
                str(result).lower(),
                "success" if result == ce.Result.SUCCESS else "failed",
                (time.perf_counter() - t0) * 1000,
            )
        if span is not None:
            span.set("dapr.status", str(result))
            span.end(None if result == ce.Result.SUCCESS else f"delivery result {result}")
        if result == ce.Result.SUCCESS:
            return
        if result == ce.Result.DROP:
            log.warning("app dropped message %s on topic %s", msg.id, msg.topic)
            await self._give_up(msg)
            return
        if spec.dead_letter_topic:
            await block.dead_letter(self.e, spec, msg)
            return
        # Unacknowledged: the broker redelivers it later per its settings (pubsub.rabbitmq
        # needs requeueInFailure or a dead-letter exchange for that, as in Dapr).
        raise PubSubError(f"app did not accept message {msg.id} on topic {msg.topic}")

    async def _give_up(self, msg: Message) -> None:
        if self.spec.dead_letter_topic:
            await self.block.dead_letter(self.e, self.spec, msg)

    def _batch(self, path: str) -> _Batch:
        b = self._batches.get(path)
        if b is None or b.sealed:
            b = self._batches[path] = _Batch(self, path)
        return b


class _Batch:
    """Events on their way to one route as one bulk delivery (bulkSubscribe).

    Messages join until `maxMessagesCount` or `maxAwaitDurationMs`, then one delivery carries
    them all; each message's handler gets its own entry's result. How many can join is also
    bounded by the broker's concurrency (the handlers waiting here are in flight).
    """

    def __init__(self, handler: _Handler, path: str) -> None:
        self.handler = handler
        self.path = path
        self.items: list[BulkItem] = []
        self.futures: dict[str, asyncio.Future[ce.Result]] = {}
        self.sealed = False
        spec = handler.spec
        self._timer = asyncio.get_running_loop().call_later(
            spec.bulk.max_await_ms / 1000, self._flush_soon
        )

    async def add(self, env: dict[str, Any], metadata: Mapping[str, str]) -> ce.Result:
        entry_id = f"{len(self.items)}-{env.get('id', '')}"
        fut: asyncio.Future[ce.Result] = asyncio.get_running_loop().create_future()
        self.items.append(BulkItem(entry_id, env, metadata))
        self.futures[entry_id] = fut
        if len(self.items) >= self.handler.spec.bulk.max_messages:
            self._flush_soon()
        return await fut

    def _flush_soon(self) -> None:
        if self.sealed:
            return
        self.sealed = True
        self._timer.cancel()
        asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        h = self.handler
        try:
            results = await h.deliverer.deliver_bulk(h.spec, self.path, self.items)
        except Exception as exc:  # any failure: every entry is retried
            log.warning("bulk delivery to %s failed: %s", self.path, exc)
            results = {}
        for entry_id, fut in self.futures.items():
            if not fut.done():
                fut.set_result(results.get(entry_id, ce.Result.RETRY))


def _broker_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Request metadata handed to the broker: everything but the envelope overrides."""
    return {k: v for k, v in metadata.items() if not k.lower().startswith("cloudevent.")}
