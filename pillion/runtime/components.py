"""Builds and initialises components from manifests; the one place that knows every kind."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pillion.blocks.cloudevents import TopicScopes
from pillion.blocks.metadata import ComponentView
from pillion.blocks.pubsub import PubSubEntry
from pillion.blocks.state import StoreEntry
from pillion.components import registry
from pillion.components.metadata import ComponentConfigError, ComponentInfo, Properties, parse_bool
from pillion.components.pubsub.api import PubSub
from pillion.components.state.api import StateStore
from pillion.manifests.model import Component

log = logging.getLogger("pillion.runtime.components")

DEFAULT_INIT_TIMEOUT = 5.0
# Categories whose building block exists; others are skipped with a warning until their
# issue lands, so a Dapr components folder with e.g. a pubsub.yaml still starts.
BUILT_CATEGORIES = frozenset({"state", "pubsub"})


class ComponentInitError(Exception):
    """A component failed to load and does not have ignoreErrors set: start-up stops."""


@dataclass
class Loaded:
    state: dict[str, StoreEntry] = field(default_factory=dict)
    pubsub: dict[str, PubSubEntry] = field(default_factory=dict)
    views: list[ComponentView] = field(default_factory=list)
    closers: list[StateStore | PubSub] = field(default_factory=list)

    async def close(self) -> None:
        for c in reversed(self.closers):
            try:
                await c.close()
            except Exception:
                log.exception("error closing a component")


async def load_components(
    components: Sequence[Component],
    *,
    app_id: str,
    namespace: str,
    env: Mapping[str, str] | None = None,
) -> Loaded:
    env = os.environ if env is None else env
    out = Loaded()
    for comp in components:
        cat = registry.category(comp.type)
        if cat not in BUILT_CATEGORIES:
            log.warning(
                "Component %s (%s/%s) skipped: the %s building block is not available in this "
                "version of pillion",
                comp.name,
                comp.type,
                comp.version,
                cat,
            )
            continue
        try:
            if cat == "state":
                entry = await _init_state(comp, app_id=app_id, namespace=namespace, env=env)
                out.state[comp.name] = entry
                out.closers.append(entry.store)
                caps = tuple(entry.capabilities())
            else:
                ps = await _init_pubsub(comp, app_id=app_id, namespace=namespace, env=env)
                out.pubsub[comp.name] = ps
                out.closers.append(ps.component)
                caps = tuple(sorted(str(f) for f in ps.component.features()))
        except ComponentInitError as exc:
            if comp.ignore_errors:
                log.warning("Component %s failed to load and is ignored: %s", comp.name, exc)
                continue
            await out.close()
            raise
        out.views.append(ComponentView(comp.name, comp.type, comp.version, caps))
        log.info("Component loaded: %s (%s/%s)", comp.name, comp.type, comp.version)
        if cat == "state" and out.state[comp.name].actor_store:
            log.info("Using '%s' as actor state store", comp.name)
    return out


async def _create(
    comp: Component, props: Properties, *, app_id: str, namespace: str
) -> StateStore | PubSub:
    """Import, construct and init one component within its initTimeout."""
    where = f"component {comp.name} ({comp.type}/{comp.version}) from {comp.source}"
    try:
        cls = registry.load(comp.type, comp.version)
    except registry.UnknownComponentError as exc:
        raise ComponentInitError(f"{where}: {exc}") from exc
    instance: StateStore | PubSub = cls()
    info = ComponentInfo(comp.name, comp.type, comp.version, app_id, props, namespace)
    timeout = comp.init_timeout or DEFAULT_INIT_TIMEOUT
    try:
        await asyncio.wait_for(instance.init(info), timeout)
    except TimeoutError as exc:
        raise ComponentInitError(f"{where}: init timed out after {timeout:g}s") from exc
    except ComponentConfigError as exc:
        raise ComponentInitError(f"{where}: {exc}") from exc
    except Exception as exc:
        raise ComponentInitError(f"{where}: init failed: {exc}") from exc
    return instance


async def _init_pubsub(
    comp: Component, *, app_id: str, namespace: str, env: Mapping[str, str]
) -> PubSubEntry:
    values = dict(comp.properties(env))
    props = Properties(values)
    if not props.get("consumerID"):
        # Dapr's default consumer group: the app id, so sidecars of one app compete.
        values["consumerID"] = app_id or comp.name
        props = Properties(values)
    ps = await _create(comp, props, app_id=app_id, namespace=namespace)
    assert isinstance(ps, PubSub)
    return PubSubEntry(comp.name, ps, TopicScopes.from_properties(props))


async def _init_state(
    comp: Component, *, app_id: str, namespace: str, env: Mapping[str, str]
) -> StoreEntry:
    props = Properties(comp.properties(env))
    try:
        actor = parse_bool("actorStateStore", props.get("actorStateStore", "false"))
    except ComponentConfigError as exc:
        where = f"component {comp.name} ({comp.type}/{comp.version}) from {comp.source}"
        raise ComponentInitError(f"{where}: {exc}") from exc
    store = await _create(comp, props, app_id=app_id, namespace=namespace)
    assert isinstance(store, StateStore)
    return StoreEntry(comp.name, store, props.get("keyPrefix", "appid") or "appid", actor)
