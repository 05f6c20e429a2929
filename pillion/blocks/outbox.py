"""The transactional outbox: a transaction's events are published iff it commits.

Dapr's two-phase scheme. Phase 1 (`prepare`, before the commit): an internal message carrying a
fresh outbox id and the upserted items goes to `{appId}{outboxPublishTopic}outbox` on
`outboxPubsub`; the state transaction then writes one extra key, the outbox id (the marker), so
the marker exists iff the transaction committed. Phase 2 (`_consume`, a runtime-owned
subscription): when the marker exists each upserted value is published as a CloudEvent to
`outboxPublishTopic` on `outboxPublishPubsub`, the marker is deleted and the message
acknowledged; when it does not, the marker is awaited for a bounded time, then the message is
dropped (at once with `outboxDiscardWhenMissingState`, or when this process's own transaction
ended without writing it): a failed transaction publishes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from collections.abc import Sequence
from functools import partial
from typing import Any

from pillion.blocks.pubsub import PubSubBlock
from pillion.blocks.state import OutboxConfig, SaveItem, StateBlock, StoreEntry, outbox_error
from pillion.errors import PillionError

log = logging.getLogger("pillion.blocks.outbox")

JSON = "application/json"
# How long a message whose marker is missing is retried before it is dropped (the transaction
# failed or never finished), and the first pause between looks (doubled up to MAX_POLL).
DEFAULT_RETRY_WINDOW = 60.0
DEFAULT_POLL = 0.05
MAX_POLL = 2.0


def internal_topic(app_id: str, cfg: OutboxConfig) -> str:
    return f"{app_id}{cfg.publish_topic}outbox"


class Outbox:
    """Both phases for every store with outbox metadata; the runtime starts it once."""

    def __init__(
        self,
        state: StateBlock,
        pubsub: PubSubBlock,
        *,
        retry_window: float = DEFAULT_RETRY_WINDOW,
        poll_interval: float = DEFAULT_POLL,
    ) -> None:
        self.state = state
        self.pubsub = pubsub
        self.retry_window = retry_window
        self.poll_interval = poll_interval
        # Outbox ids of this process's transactions still running: their markers are awaited
        # without counting against the retry window (or the discard setting).
        self._inflight: dict[str, asyncio.Event] = {}
        # Outbox ids of this process's transactions that failed (-> when), kept one window.
        self._failed: dict[str, float] = {}

    async def start(self) -> None:
        """Subscribe to the internal topic of each outbox-enabled store and hook the state block."""
        for e in self.state.stores.values():
            if e.outbox is None:
                continue
            topic = internal_topic(self.state.app_id, e.outbox)
            await self.pubsub.subscribe_internal(e.outbox.pubsub, topic, partial(self._consume, e))
            log.info(
                "outbox of state store %s: events to %s/%s",
                e.name,
                e.outbox.publish_pubsub,
                e.outbox.publish_topic,
            )
        self.state.outbox = self

    # --- phase 1 --------------------------------------------------------------------------------

    async def prepare(self, e: StoreEntry, upserts: Sequence[SaveItem]) -> str:
        cfg = e.outbox
        if cfg is None:
            raise outbox_error(e.name, "the state store has no outbox")
        oid = f"outbox-{uuid.uuid4()}"
        body = {
            "id": oid,
            "store": e.name,
            "items": [
                {"key": it.key, "data": base64.b64encode(it.value).decode("ascii")}
                for it in upserts
            ],
        }
        self._inflight[oid] = asyncio.Event()
        try:
            await self.pubsub.publish(
                cfg.pubsub,
                internal_topic(self.state.app_id, cfg),
                json.dumps(body).encode(),
                content_type=JSON,
                metadata={},
            )
        except PillionError as exc:
            self.finished(oid, False)
            raise outbox_error(e.name, exc.message) from exc
        return oid

    def finished(self, marker: str, committed: bool) -> None:
        """The transaction of `marker` is over."""
        now = time.monotonic()
        if not committed:
            self._failed[marker] = now
        for oid in [k for k, t in self._failed.items() if now - t > self.retry_window]:
            del self._failed[oid]
        ev = self._inflight.pop(marker, None)
        if ev is not None:
            ev.set()

    # --- phase 2 --------------------------------------------------------------------------------

    async def _consume(self, e: StoreEntry, env: dict[str, Any]) -> None:
        cfg = e.outbox
        assert cfg is not None
        parsed = _parse(env.get("data"))
        if parsed is None:
            log.error("outbox message %s of state store %s is malformed: dropped", env, e.name)
            return
        oid, values = parsed
        if not await self._committed(e, cfg, oid):
            return
        for value in values:
            await self.pubsub.publish(
                cfg.publish_pubsub, cfg.publish_topic, value, content_type=JSON, metadata={}
            )
        await self.state.delete(e.name, oid)

    async def _committed(self, e: StoreEntry, cfg: OutboxConfig, oid: str) -> bool:
        deadline = time.monotonic() + self.retry_window
        delay = self.poll_interval
        while True:
            ev = self._inflight.get(oid)
            if ev is not None:
                await ev.wait()  # this process's transaction: its outcome is coming
            if await self.state.get(e.name, oid) is not None:
                return True
            # No marker after this process's own transaction failed: nothing to wait for.
            failed_here = oid in self._failed
            if failed_here or cfg.discard_when_missing_state or time.monotonic() >= deadline:
                log.warning(
                    "outbox message %s of state store %s dropped: its transaction did not "
                    "commit (no marker)",
                    oid,
                    e.name,
                )
                return False
            await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, MAX_POLL)


def _parse(data: object) -> tuple[str, list[bytes]] | None:
    if not isinstance(data, dict):
        return None
    oid = data.get("id")
    items = data.get("items")
    if not isinstance(oid, str) or not oid or not isinstance(items, list):
        return None
    values: list[bytes] = []
    for it in items:
        if not isinstance(it, dict) or not isinstance(it.get("data"), str):
            return None
        try:
            values.append(base64.b64decode(it["data"], validate=True))
        except (binascii.Error, ValueError):
            return None
    return oid, values
