"""Where subscriptions come from (manifests, `GET /dapr/subscribe`) and HTTP delivery to the app."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pillion.blocks import cloudevents as ce
from pillion.blocks.invoke import CallFailed, Unreachable
from pillion.blocks.pubsub import BulkItem, BulkSubscribe, Delivery, SubscriptionSpec
from pillion.blocks.routing import RouteError, Routes
from pillion.manifests.model import Subscription
from pillion.runtime.channels import HttpAppChannel

log = logging.getLogger("pillion.runtime.subscriptions")

_CE_JSON = (b"content-type", b"application/cloudevents+json")


def _bulk(raw: Any) -> BulkSubscribe:
    if not isinstance(raw, Mapping):
        return BulkSubscribe()
    return BulkSubscribe(
        enabled=str(raw.get("enabled", "false")).lower() == "true",
        max_messages=int(raw.get("maxMessagesCount") or 100),
        max_await_ms=int(raw.get("maxAwaitDurationMs") or 40),
    )


def from_manifests(
    subs: Iterable[Subscription], *, leading_slash: bool = True
) -> list[SubscriptionSpec]:
    """Declarative `Subscription` resources (already filtered by scopes for this app).

    gRPC apps get their paths verbatim (`leading_slash=False`): the SDK matches handlers by it.
    """
    out: list[SubscriptionSpec] = []
    for s in subs:
        try:
            routes = Routes(
                [(r.match, r.path) for r in s.rules], s.default_path, leading_slash=leading_slash
            )
        except RouteError as exc:
            log.error("subscription %s (%s) skipped: %s", s.name, s.source, exc)
            continue
        out.append(
            SubscriptionSpec(
                s.pubsubname,
                s.topic,
                routes,
                dict(s.metadata),
                s.dead_letter_topic or "",
                "DECLARATIVE",
                _bulk(s.bulk_subscribe),
            )
        )
    return out


def parse_programmatic(body: bytes) -> list[SubscriptionSpec]:
    """The app's answer to `GET /dapr/subscribe`, both the v1 (`route`) and v2 (`routes`) forms."""
    try:
        items = json.loads(body) if body.strip() else []
    except ValueError as exc:
        log.error("the app's /dapr/subscribe answer is not JSON: %s", exc)
        return []
    if not isinstance(items, list):
        log.error("the app's /dapr/subscribe answer is not a JSON array")
        return []
    out: list[SubscriptionSpec] = []
    for it in items:
        if not isinstance(it, Mapping) or not it.get("pubsubname") or not it.get("topic"):
            log.error("subscription without pubsubname/topic ignored: %r", it)
            continue
        routes_raw: Mapping[str, Any] = (
            it["routes"] if isinstance(it.get("routes"), Mapping) else {}
        )
        rules = [
            (str(r.get("match", "")), str(r.get("path", "")))
            for r in routes_raw.get("rules") or []
            if isinstance(r, Mapping) and r.get("path")
        ]
        default = routes_raw.get("default") or it.get("route") or None
        if not rules and not default:
            log.warning(
                "subscription to %s/%s has no route: ignored", it["pubsubname"], it["topic"]
            )
            continue
        try:
            routes = Routes(rules, default)
        except RouteError as exc:
            log.error("subscription to %s/%s ignored: %s", it["pubsubname"], it["topic"], exc)
            continue
        md: Mapping[str, Any] = it["metadata"] if isinstance(it.get("metadata"), Mapping) else {}
        out.append(
            SubscriptionSpec(
                str(it["pubsubname"]),
                str(it["topic"]),
                routes,
                {str(k): str(v) for k, v in md.items()},
                str(it.get("deadLetterTopic") or ""),
                "PROGRAMMATIC",
                _bulk(it.get("bulkSubscribe")),
            )
        )
    return out


async def discover_http(app: HttpAppChannel, app_id: str) -> list[SubscriptionSpec]:
    """Ask an HTTP app for its subscriptions; 404 or no answer means none."""
    try:
        resp = await app.invoke("GET", b"/dapr/subscribe", [(b"dapr-app-id", app_id.encode())], b"")
    except (Unreachable, CallFailed) as exc:
        log.warning("could not read the app's subscriptions: %s", exc)
        return []
    if resp.status == 404:
        return []
    if resp.status != 200:
        log.warning("the app answered GET /dapr/subscribe with %d", resp.status)
        return []
    return parse_programmatic(resp.body)


class HttpDeliverer:
    """POST each event to the app's route as `application/cloudevents+json` (§3.6)."""

    def __init__(self, app: HttpAppChannel) -> None:
        self.app = app

    async def deliver(self, d: Delivery) -> ce.Result:
        headers = [_CE_JSON]
        for k, v in d.metadata.items():
            key = k.lower().encode("latin-1", "replace")
            if key in (b"content-type", b"content-length", b"host", b"connection"):
                continue
            headers.append((key, str(v).encode("utf-8", "replace")))
        given = {k.lower() for k in d.metadata}
        for name in ("traceparent", "tracestate"):
            value = d.envelope.get(name)
            if value and name not in given:
                headers.append((name.encode(), str(value).encode()))
        try:
            resp = await self.app.invoke("POST", d.path.encode(), headers, ce.encode(d.envelope))
        except (Unreachable, CallFailed) as exc:
            log.warning("delivery to %s failed: %s", d.path, exc)
            return ce.Result.RETRY
        return ce.delivery_result(resp.status, resp.body)

    async def deliver_bulk(
        self, spec: SubscriptionSpec, path: str, items: Sequence[BulkItem]
    ) -> dict[str, ce.Result]:
        """One POST with every entry, in Dapr's bulk format (§3.7)."""
        body = {
            "id": str(uuid.uuid4()),
            "type": "com.dapr.event.sent.bulk",
            "topic": spec.topic,
            "pubsubname": spec.pubsub,
            "metadata": {},
            "entries": [
                {
                    "entryId": it.entry_id,
                    "event": it.envelope,
                    "metadata": dict(it.metadata),
                    "contentType": "application/cloudevents+json",
                }
                for it in items
            ],
        }
        headers = [(b"content-type", b"application/json")]
        try:
            resp = await self.app.invoke(
                "POST", path.encode(), headers, json.dumps(body, separators=(",", ":")).encode()
            )
        except (Unreachable, CallFailed) as exc:
            log.warning("bulk delivery to %s failed: %s", path, exc)
            return {}
        return ce.bulk_results(resp.status, resp.body, [it.entry_id for it in items])
