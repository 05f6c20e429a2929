"""Pub/sub with a gRPC app: subscriptions from ListTopicSubscriptions, delivery by OnTopicEvent."""

from __future__ import annotations

import logging
from collections.abc import Sequence
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
    """Delivers each event to the app's AppCallback/OnTopicEvent (dapr-api.md §3.6)."""

    def __init__(self, app: GrpcAppChannel) -> None:
        self.app = app
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None

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

    async def deliver_bulk(
        self, spec: SubscriptionSpec, path: str, items: Sequence[BulkItem]
    ) -> dict[str, ce.Result]:
        return await deliver_each(self, spec, path, items)

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
        headers = [
            (str(k).encode("latin-1", "replace"), str(v).encode("utf-8", "replace"))
            for k, v in d.metadata.items()
        ]
        given = {k.lower() for k in d.metadata}
        for name in ("traceparent", "tracestate"):
            value = d.envelope.get(name)
            if value and isinstance(value, str) and name not in given:
                headers.append((name.encode(), value.encode("utf-8", "replace")))
        md = to_metadata(headers)
        if self.app.app_token is not None:
            md.append(("dapr-api-token", self.app.app_token))
        return md
