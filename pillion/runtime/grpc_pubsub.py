"""Pub/sub with a gRPC app: subscriptions from ListTopicSubscriptions, delivery by OnTopicEvent."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import grpc.aio
from dapr.proto.runtime.v1 import appcallback_pb2
from google.protobuf import empty_pb2

from pillion.api.grpc.dapr_api import topic_event_request
from pillion.blocks import cloudevents as ce
from pillion.blocks.invoke import Unreachable
from pillion.blocks.pubsub import (
    BulkItem,
    BulkSubscribe,
    Delivery,
    SubscriptionSpec,
    deliver_each,
)
from pillion.blocks.routing import RouteError, Routes
from pillion.runtime.grpc_app import GrpcAppChannel, Metadata, to_metadata

log = logging.getLogger("pillion.runtime.grpc_pubsub")

LIST_TOPIC_SUBSCRIPTIONS = "/dapr.proto.runtime.v1.AppCallback/ListTopicSubscriptions"
ON_TOPIC_EVENT = "/dapr.proto.runtime.v1.AppCallback/OnTopicEvent"
# Bulk delivery: the stable call first, then the alpha one older SDKs implement (§3.7).
ON_BULK_TOPIC_EVENT = "/dapr.proto.runtime.v1.AppCallback/OnBulkTopicEvent"
ON_BULK_TOPIC_EVENT_ALPHA1 = "/dapr.proto.runtime.v1.AppCallbackAlpha/OnBulkTopicEventAlpha1"
BULK_EVENT_TYPE = "com.dapr.event.sent.bulk"
# How long the app may take to list its subscriptions at start-up.
DISCOVERY_TIMEOUT_S = 10.0


def _spec(sub: appcallback_pb2.TopicSubscription) -> SubscriptionSpec | None:
    """One entry of ListTopicSubscriptions as a spec; None (logged) when it is unusable."""
    if not sub.pubsub_name or not sub.topic:
        log.error(
            "subscription without pubsub name or topic ignored: %s/%s", sub.pubsub_name, sub.topic
        )
        return None
    rules = [(r.match, r.path) for r in sub.routes.rules]
    # Dapr adds a default route "" only when the app gave no route at all (dapr-api.md §3.5);
    # rules without a default drop the events no rule matches.
    default: str | None = sub.routes.default or (None if rules else "")
    try:
        # Paths go to the app verbatim: the SDKs key their handlers by them.
        routes = Routes(rules, default, leading_slash=False)
    except RouteError as exc:
        log.error("subscription to %s/%s ignored: %s", sub.pubsub_name, sub.topic, exc)
        return None
    bulk = BulkSubscribe()
    if sub.HasField("bulk_subscribe"):
        b = sub.bulk_subscribe
        bulk = BulkSubscribe(
            enabled=b.enabled,
            max_messages=b.max_messages_count or 100,
            max_await_ms=b.max_await_duration_ms or 40,
        )
    return SubscriptionSpec(
        sub.pubsub_name,
        sub.topic,
        routes,
        dict(sub.metadata),
        sub.dead_letter_topic,
        "PROGRAMMATIC",
        bulk,
    )


async def discover_grpc(app: GrpcAppChannel) -> list[SubscriptionSpec]:
    """Ask a gRPC app for its subscriptions; UNIMPLEMENTED or any failure means none."""
    try:
        channel = await app.get_channel()
        call = channel.unary_unary(
            LIST_TOPIC_SUBSCRIPTIONS,
            request_serializer=empty_pb2.Empty.SerializeToString,
            response_deserializer=appcallback_pb2.ListTopicSubscriptionsResponse.FromString,
        )
        md: Metadata = []
        if app.app_token is not None:
            md.append(("dapr-api-token", app.app_token))
        resp: appcallback_pb2.ListTopicSubscriptionsResponse = await call(
            empty_pb2.Empty(), metadata=tuple(md), timeout=DISCOVERY_TIMEOUT_S
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            log.info("the gRPC app does not implement ListTopicSubscriptions")
        else:
            log.error("error getting topic list from app: %s: %s", exc.code().name, exc.details())
        return []
    except (grpc.RpcError, Unreachable) as exc:
        log.error("error getting topic list from app: %s", exc)
        return []
    return [s for s in (_spec(sub) for sub in resp.subscriptions) if s is not None]


class GrpcDeliverer:
    """Delivers events to the app's AppCallback/OnTopicEvent (dapr-api.md §3.6) and batches to
    OnBulkTopicEvent (§3.7), falling back to the alpha bulk call, then to single events."""

    def __init__(self, app: GrpcAppChannel) -> None:
        self.app = app
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None
        # Bulk calls not yet known to be UNIMPLEMENTED by this app, in the order they are tried;
        # empty: batches go out as single OnTopicEvent calls without probing again.
        self.bulk_methods: tuple[str, ...] = (ON_BULK_TOPIC_EVENT, ON_BULK_TOPIC_EVENT_ALPHA1)
        self._bulk_channel: grpc.aio.Channel | None = None
        self._bulk_calls: dict[str, Any] = {}

    async def _on_topic_event(self) -> Any:
        channel = await self.app.get_channel()
        if channel is not self._channel:  # first use, or the channel was reopened
            self._channel = channel
            self._call = channel.unary_unary(
                ON_TOPIC_EVENT,
                request_serializer=appcallback_pb2.TopicEventRequest.SerializeToString,
                # An empty answer (the SDK returns Empty when a handler returns nothing)
                # decodes as status 0, SUCCESS.
                response_deserializer=appcallback_pb2.TopicEventResponse.FromString,
            )
        return self._call

    async def _on_bulk_topic_event(self, method: str) -> Any:
        channel = await self.app.get_channel()
        if channel is not self._bulk_channel:
            self._bulk_channel = channel
            self._bulk_calls = {}
        call = self._bulk_calls.get(method)
        if call is None:
            call = self._bulk_calls[method] = channel.unary_unary(
                method,
                request_serializer=appcallback_pb2.TopicEventBulkRequest.SerializeToString,
                # An empty answer has no statuses: every entry is retried.
                response_deserializer=appcallback_pb2.TopicEventBulkResponse.FromString,
            )
        return call

    async def deliver_bulk(
        self, spec: SubscriptionSpec, path: str, items: Sequence[BulkItem]
    ) -> dict[str, ce.Result]:
        """One OnBulkTopicEvent call for the batch; a result per entry id (missing: RETRY)."""
        if not items:
            return {}
        if not self.bulk_methods:
            return await deliver_each(self, spec, path, items)
        where = f"{spec.pubsub}/{spec.topic}"
        results = {it.entry_id: ce.Result.RETRY for it in items}
        if not self.app.healthy:
            log.debug("bulk delivery on %s postponed: the app is not healthy", where)
            return results
        entries: list[appcallback_pb2.TopicEventBulkRequestEntry] = []
        for it in items:
            try:
                entries.append(self._bulk_entry(spec, it))
            except ce.CloudEventError as exc:  # this entry is retried, the others go
                log.error("event %s on %s cannot be sent to the app: %s", it.entry_id, where, exc)
        if not entries:
            return results
        common = self._common_metadata([it.metadata for it in items])
        request = appcallback_pb2.TopicEventBulkRequest(
            id=str(uuid.uuid4()),
            entries=entries,
            metadata=common,
            topic=spec.topic,
            pubsub_name=spec.pubsub,
            type=BULK_EVENT_TYPE,
            path=path,
        )
        traced = next((it.envelope for it in items if it.envelope.get("traceparent")), {})
        metadata = tuple(self._call_metadata(common, traced))
        resp: appcallback_pb2.TopicEventBulkResponse | None = None
        unimplemented: list[str] = []
        for method in self.bulk_methods:
            try:
                async with self.app.slot():
                    call = await self._on_bulk_topic_event(method)
                    resp = await call(request, metadata=metadata)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.debug("the gRPC app answered UNIMPLEMENTED to %s", method)
                    unimplemented.append(method)
                    continue
                log.debug(
                    "error returned from app while processing bulk pub/sub event %s on %s: %s: %s",
                    request.id,
                    where,
                    exc.code().name,
                    exc.details(),
                )
                return results
            except (grpc.RpcError, Unreachable) as exc:
                log.warning("bulk delivery %s on %s failed: %s", request.id, where, exc)
                return results
        # What answered UNIMPLEMENTED is not tried again for this app.
        self.bulk_methods = tuple(m for m in self.bulk_methods if m not in unimplemented)
        if resp is None:
            # Neither bulk call is there: single OnTopicEvent calls from now on.
            log.info(
                "the gRPC app implements no OnBulkTopicEvent: bulk subscriptions are delivered "
                "one event at a time"
            )
            return await deliver_each(self, spec, path, items)
        sent = {e.entry_id for e in entries}
        for status in resp.statuses:
            if status.entry_id in sent:  # answers for ids that were not sent are ignored
                results[status.entry_id] = ce.grpc_result(status.status)
            else:
                log.warning(
                    "invalid entry id %r received from app for bulk event %s",
                    status.entry_id,
                    request.id,
                )
        return results

    @staticmethod
    def _bulk_entry(
        spec: SubscriptionSpec, it: BulkItem
    ) -> appcallback_pb2.TopicEventBulkRequestEntry:
        """One entry: the CloudEvent's fields, or the raw bytes for rawPayload (as Dapr)."""
        ev = ce.topic_event_fields(it.envelope, topic=spec.topic, pubsub=spec.pubsub)
        metadata = {str(k): str(v) for k, v in it.metadata.items()}
        if spec.raw_payload:
            return appcallback_pb2.TopicEventBulkRequestEntry(
                entry_id=it.entry_id,
                bytes=ev.data,
                content_type=ev.data_content_type,
                metadata=metadata,
            )
        event = appcallback_pb2.TopicEventCERequest(
            id=ev.id,
            source=ev.source,
            type=ev.type,
            spec_version=ev.spec_version,
            data_content_type=ev.data_content_type,
            data=ev.data,
        )
        try:
            event.extensions.update(ev.extensions)
        except (TypeError, ValueError) as exc:
            raise ce.CloudEventError(f"cloud event extensions: {exc}") from exc
        return appcallback_pb2.TopicEventBulkRequestEntry(
            entry_id=it.entry_id,
            cloud_event=event,
            content_type=ce.CLOUDEVENT_CONTENT_TYPE,
            metadata=metadata,
        )

    async def deliver(self, d: Delivery) -> ce.Result:
        where = f"{d.spec.pubsub}/{d.spec.topic}"
        if not self.app.healthy:
            log.debug("delivery on %s postponed: the app is not healthy", where)
            return ce.Result.RETRY
        try:
            request = topic_event_request(
                d.envelope, d.path, topic=d.spec.topic, pubsub=d.spec.pubsub
            )
        except ce.CloudEventError as exc:
            log.error("event on %s cannot be sent to the app: %s", where, exc)
            return ce.Result.RETRY
        try:
            async with self.app.slot():
                call = await self._on_topic_event()
                resp: appcallback_pb2.TopicEventResponse = await call(
                    request, metadata=tuple(self._metadata(d))
                )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                # Dapr treats it as non-retriable: the event is acknowledged.
                log.warning(
                    "non-retriable error returned from app while processing pub/sub event %s: %s",
                    request.id,
                    exc.details(),
                )
                return ce.Result.DROP
            log.debug(
                "error returned from app while processing pub/sub event %s: %s: %s",
                request.id,
                exc.code().name,
                exc.details(),
            )
            return ce.Result.RETRY
        except (grpc.RpcError, Unreachable) as exc:
            log.warning("delivery of event %s on %s failed: %s", request.id, where, exc)
            return ce.Result.RETRY
        return ce.grpc_result(resp.status)

    def _metadata(self, d: Delivery) -> Metadata:
        """Message metadata as gRPC metadata (the app channel's rules), trace context, token."""
        return self._call_metadata(d.metadata, d.envelope)

    def _call_metadata(self, metadata: Mapping[str, str], envelope: Mapping[str, Any]) -> Metadata:
        headers = [
            (str(k).encode("latin-1", "replace"), str(v).encode("utf-8", "replace"))
            for k, v in metadata.items()
        ]
        given = {k.lower() for k in metadata}
        for name in ("traceparent", "tracestate"):
            value = envelope.get(name)
            if value and isinstance(value, str) and name not in given:
                headers.append((name.encode(), value.encode("utf-8", "replace")))
        md = to_metadata(headers)
        if self.app.app_token is not None:
            md.append(("dapr-api-token", self.app.app_token))
        return md

    @staticmethod
    def _common_metadata(each: Sequence[Mapping[str, str]]) -> dict[str, str]:
        """The metadata every entry of a batch shares (`pubsubName`, broker-wide keys): the bulk
        request's own metadata, also sent as gRPC metadata."""
        common = {str(k): str(v) for k, v in each[0].items()} if each else {}
        for md in each[1:]:
            common = {k: v for k, v in common.items() if md.get(k) == v}
        return common
