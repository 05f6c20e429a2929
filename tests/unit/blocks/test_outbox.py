"""The transactional outbox: events go out iff the transaction commits (in-memory stores)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from pillion.blocks import cloudevents as ce
from pillion.blocks.outbox import Outbox, internal_topic
from pillion.blocks.pubsub import PubSubBlock, PubSubEntry
from pillion.blocks.state import OutboxConfig, SaveItem, StateBlock, StoreEntry, TxOperation
from pillion.components.metadata import ComponentInfo, Properties
from pillion.components.pubsub.api import Message, SubscribeRequest
from pillion.components.pubsub.inmemory import InMemoryPubSub
from pillion.components.state.inmemory import InMemoryStateStore
from pillion.errors import PillionError
from pillion.manifests.model import Component, MetadataItem
from pillion.runtime.components import ComponentInitError, load_components
from tests.polling import until
from tests.unit.blocks.fakes import component_info

WINDOW = 0.3  # the retry window of these tests


@dataclass
class Env:
    state: StateBlock
    pubsub: PubSubBlock
    store: InMemoryStateStore
    broker: InMemoryPubSub
    events: list[dict[str, Any]] = field(default_factory=list)

    def tx(self, *ops: TxOperation) -> Any:
        return self.state.transaction("statestore", list(ops))


def upsert(key: str, value: Any, etag: str | None = None) -> TxOperation:
    return TxOperation("upsert", SaveItem(key, json.dumps(value).encode(), etag))


@asynccontextmanager
async def outbox_env(*, discard: bool = False, window: float = WINDOW) -> AsyncIterator[Env]:
    store = InMemoryStateStore()
    await store.init(component_info())
    broker = InMemoryPubSub()
    await broker.init(
        ComponentInfo("pubsub", "pubsub.in-memory", "v1", "app", Properties(), "default")
    )
    cfg = OutboxConfig("pubsub", "orders", "pubsub", discard)
    state = StateBlock("app", "", {"statestore": StoreEntry("statestore", store, outbox=cfg)})
    pubsub = PubSubBlock(
        "app",
        {"pubsub": PubSubEntry("pubsub", broker, ce.TopicScopes.from_properties(Properties()))},
    )
    env = Env(state, pubsub, store, broker)

    async def record(msg: Message) -> None:
        env.events.append(ce.decode(msg.data))

    sub = await broker.subscribe(SubscribeRequest("orders"), record)
    await Outbox(state, pubsub, retry_window=window, poll_interval=0.02).start()
    try:
        yield env
    finally:
        await sub.close()
        await pubsub.stop()
        await broker.close()
        await store.close()


def markers(store: InMemoryStateStore) -> list[str]:
    return [k for k in store._data if "outbox-" in k]


def test_committed_transaction_publishes_each_upsert_value() -> None:
    async def go() -> None:
        async with outbox_env() as env:
            await env.tx(
                upsert("a", {"n": 1}),
                upsert("b", "two"),
                TxOperation("delete", SaveItem("c", b"")),
            )
            await until(lambda: len(env.events) == 2)
            await asyncio.sleep(0.2)  # and no more
            assert len(env.events) == 2
            datas = sorted(json.dumps(e["data"]) for e in env.events)
            assert datas == sorted([json.dumps({"n": 1}), json.dumps("two")])
            ev = env.events[0]
            assert ev["datacontenttype"] == "application/json"
            assert ev["topic"] == "orders" and ev["pubsubname"] == "pubsub"
            assert ev["source"] == "app" and ev["type"] == "com.dapr.event.sent"
            await until(lambda: not markers(env.store))  # the marker is deleted
            got = await env.state.get("statestore", "a")
            assert got is not None and json.loads(got.data) == {"n": 1}
            # The internal subscription is the runtime's, not the app's.
            assert env.pubsub.subscriptions() == []

    asyncio.run(go())


def test_failed_transaction_publishes_nothing() -> None:
    async def go() -> None:
        async with outbox_env() as env:
            await env.tx(upsert("a", 1))
            await until(lambda: len(env.events) == 1)
            with pytest.raises(PillionError) as info:
                await env.tx(upsert("a", 2, etag="999"), upsert("b", 3))
            assert info.value.code == "ERR_STATE_TRANSACTION"
            deadline = time.monotonic() + WINDOW * 3
            while time.monotonic() < deadline:  # past the retry window
                await asyncio.sleep(0.05)
            assert [e["data"] for e in env.events] == [1]
            assert markers(env.store) == []
            # The outbox still works afterwards.
            await env.tx(upsert("b", 4))
            await until(lambda: len(env.events) == 2)
            assert env.events[1]["data"] == 4

    asyncio.run(go())


def _internal_message(env: Env, oid: str) -> Any:
    cfg = env.state.stores["statestore"].outbox
    assert cfg is not None
    # An internal message whose transaction never committed here (no marker, not in flight).
    body = {"id": oid, "items": [{"key": "k", "data": "MQ=="}]}
    return env.pubsub.publish(
        "pubsub",
        internal_topic("app", cfg),
        json.dumps(body).encode(),
        content_type="application/json",
        metadata={},
    )


def test_discard_when_missing_state_drops_at_once(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        # A retry window far longer than the test: only the discard setting ends the wait.
        async with outbox_env(discard=True, window=60) as env:
            await _internal_message(env, "outbox-x")
            await until(lambda: "dropped" in caplog.text, 2.0)
            await env.tx(upsert("a", 1))  # a committed transaction is still published
            await until(lambda: len(env.events) == 1)
            assert [e["data"] for e in env.events] == [1]

    with caplog.at_level(logging.WARNING, logger="pillion.blocks.outbox"):
        asyncio.run(go())


def test_failed_local_transaction_is_dropped_without_waiting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def go() -> None:
        async with outbox_env(window=60) as env:
            with pytest.raises(PillionError):
                await env.tx(upsert("a", 2, etag="999"))
            await until(lambda: "dropped" in caplog.text, 2.0)
            assert env.events == []

    with caplog.at_level(logging.WARNING, logger="pillion.blocks.outbox"):
        asyncio.run(go())


def test_missing_marker_from_elsewhere_is_retried_then_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def go() -> None:
        async with outbox_env() as env:
            t0 = time.monotonic()
            await _internal_message(env, "outbox-y")
            await until(lambda: "dropped" in caplog.text, 5.0)
            assert time.monotonic() - t0 >= WINDOW * 0.9
            assert env.events == []

    with caplog.at_level(logging.WARNING, logger="pillion.blocks.outbox"):
        asyncio.run(go())


def test_phase_one_failure_is_err_publish_outbox_and_no_write() -> None:
    async def go() -> None:
        async with outbox_env() as env:
            await env.broker.close()  # the internal topic cannot be published to
            with pytest.raises(PillionError) as info:
                await env.tx(upsert("a", 1))
            err = info.value
            assert (err.code, err.http_status, err.reason) == (
                "ERR_PUBLISH_OUTBOX",
                500,
                "DAPR_PUBSUB_OUTBOX",
            )
            assert await env.state.get("statestore", "a") is None

    asyncio.run(go())


def test_store_without_outbox_is_untouched() -> None:
    async def go() -> None:
        async with outbox_env() as env:
            e = env.state.stores["statestore"]
            env.state.stores["plain"] = replace(e, name="plain", outbox=None)
            await env.state.transaction("plain", [upsert("a", 1)])
            await asyncio.sleep(0.1)
            assert env.events == []

    asyncio.run(go())


# --- component metadata -------------------------------------------------------------------------


def _component(name: str, type_: str, **md: str) -> Component:
    items = tuple(MetadataItem(k, value=v) for k, v in md.items())
    return Component(name=name, type=type_, metadata=items, source=f"{name}.yaml#1")


def _load(*components: Component) -> Any:
    return asyncio.run(load_components(components, app_id="app", namespace="default", env={}))


def test_outbox_metadata_is_parsed(tmp_path: Path) -> None:
    loaded = _load(
        _component(
            "statestore",
            "state.in-memory",
            outboxPublishPubsub="pubsub",
            outboxPublishTopic="orders",
            outboxDiscardWhenMissingState="true",
        ),
        _component("pubsub", "pubsub.in-memory"),
    )
    try:
        assert loaded.state["statestore"].outbox == OutboxConfig("pubsub", "orders", "pubsub", True)
    finally:
        asyncio.run(loaded.close())


def test_outbox_unknown_pubsub_fails_start() -> None:
    comp = _component(
        "statestore",
        "state.in-memory",
        outboxPublishPubsub="pubsub",
        outboxPublishTopic="orders",
        outboxPubsub="nope",
    )
    with pytest.raises(ComponentInitError, match=r"outboxPubsub.*'nope'"):
        _load(comp, _component("pubsub", "pubsub.in-memory"))


def test_outbox_topic_is_required() -> None:
    comp = _component("statestore", "state.in-memory", outboxPublishPubsub="pubsub")
    with pytest.raises(ComponentInitError, match="outboxPublishTopic"):
        _load(comp, _component("pubsub", "pubsub.in-memory"))
