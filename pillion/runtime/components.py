"""Builds and initialises components from manifests; the one place that knows every kind."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from pillion.blocks.cloudevents import TopicScopes
from pillion.blocks.lock import IllegalKey, LockEntry, check_key_prefix
from pillion.blocks.metadata import ComponentView
from pillion.blocks.pubsub import PubSubEntry
from pillion.blocks.state import StoreEntry
from pillion.components import registry
from pillion.components.lock.api import LockStore
from pillion.components.metadata import ComponentConfigError, ComponentInfo, Properties, parse_bool
from pillion.components.pubsub.api import PubSub
from pillion.components.secretstores.api import SecretStore, SecretStoreError
from pillion.components.state.api import StateStore
from pillion.manifests.model import Component, MetadataItem

log = logging.getLogger("pillion.runtime.components")

DEFAULT_INIT_TIMEOUT = 5.0
# Categories whose building block exists; others are skipped with a warning until their
# issue lands, so a Dapr components folder with e.g. a pubsub.yaml still starts.
BUILT_CATEGORIES = frozenset({"state", "pubsub", "secretstores", "lock"})


class ComponentInitError(Exception):
    """A component failed to load and does not have ignoreErrors set: start-up stops."""


@dataclass
class Loaded:
    state: dict[str, StoreEntry] = field(default_factory=dict)
    pubsub: dict[str, PubSubEntry] = field(default_factory=dict)
    secretstores: dict[str, SecretStore] = field(default_factory=dict)
    lock: dict[str, LockEntry] = field(default_factory=dict)
    views: list[ComponentView] = field(default_factory=list)
    closers: list[StateStore | PubSub | SecretStore | LockStore] = field(default_factory=list)

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
    # Secret stores first: the other components' secretKeyRef metadata is read from them.
    ordered = sorted(components, key=lambda c: registry.category(c.type) != "secretstores")
    for comp in ordered:
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
            comp = await _resolve_secret_refs(comp, out.secretstores)
            if cat == "secretstores":
                secrets = await _create(
                    comp, Properties(comp.properties(env)), app_id=app_id, namespace=namespace
                )
                assert isinstance(secrets, SecretStore)
                out.secretstores[comp.name] = secrets
                out.closers.append(secrets)
                caps = tuple(sorted(str(f) for f in secrets.features()))
            elif cat == "state":
                entry = await _init_state(comp, app_id=app_id, namespace=namespace, env=env)
                out.state[comp.name] = entry
                out.closers.append(entry.store)
                caps = tuple(entry.capabilities())
            elif cat == "lock":
                lk = await _init_lock(comp, app_id=app_id, namespace=namespace, env=env)
                out.lock[comp.name] = lk
                out.closers.append(lk.store)
                caps = tuple(sorted(str(f) for f in lk.store.features()))
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
) -> StateStore | PubSub | SecretStore | LockStore:
    """Import, construct and init one component within its initTimeout."""
    where = f"component {comp.name} ({comp.type}/{comp.version}) from {comp.source}"
    try:
        cls = registry.load(comp.type, comp.version)
    except registry.UnknownComponentError as exc:
        raise ComponentInitError(f"{where}: {exc}") from exc
    instance: StateStore | PubSub | SecretStore | LockStore = cls()
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


async def _init_lock(
    comp: Component, *, app_id: str, namespace: str, env: Mapping[str, str]
) -> LockEntry:
    props = Properties(comp.properties(env))
    try:
        # The runtime's own metadata, as Dapr's lock keyPrefix: checked before the store opens.
        prefix = check_key_prefix(props.get("keyPrefix", ""))
    except IllegalKey as exc:
        where = f"component {comp.name} ({comp.type}/{comp.version}) from {comp.source}"
        raise ComponentInitError(f"{where}: metadata 'keyPrefix': {exc}") from exc
    store = await _create(comp, props, app_id=app_id, namespace=namespace)
    assert isinstance(store, LockStore)
    return LockEntry(comp.name, store, prefix)


async def _resolve_secret_refs(comp: Component, stores: Mapping[str, SecretStore]) -> Component:
    """`comp` with each `secretKeyRef` item replaced by its value from `auth.secretStore`.

    As in Dapr, `secretKeyRef.name` is the secret and `key` the entry of its map (the loader
    makes a missing key the secret's name); a secret of one value also answers a key left out.
    Each secret is read once per component, within its initTimeout.
    """
    refs = comp.secret_refs()
    if not refs:
        return comp
    where = f"component {comp.name} ({comp.type}/{comp.version}) from {comp.source}"
    store_name = comp.auth_secret_store
    if not store_name:
        raise ComponentInitError(
            f"{where}: metadata {refs[0][0]!r} uses secretKeyRef but auth.secretStore is not "
            "set: name the secretstores component to read it from (only Kubernetes mode has a "
            "default store)"
        )
    store = stores.get(store_name)
    if store is None:
        known = ", ".join(sorted(stores)) or "none is loaded"
        raise ComponentInitError(
            f"{where}: auth.secretStore {store_name!r} is not a loaded secret store ({known})"
        )
    timeout = comp.init_timeout or DEFAULT_INIT_TIMEOUT
    cache: dict[str, dict[str, str]] = {}
    items: list[MetadataItem] = []
    for item in comp.metadata:
        ref = item.secret_key_ref
        if ref is None:
            items.append(item)
            continue
        what = f"{where}: metadata {item.name!r}: secretKeyRef {ref.name!r}"
        if ref.key != ref.name:
            what += f" key {ref.key!r}"
        secret = cache.get(ref.name)
        if secret is None:
            try:
                secret = await asyncio.wait_for(store.get(ref.name, {}), timeout)
            except TimeoutError as exc:
                raise ComponentInitError(
                    f"{what}: secret store {store_name!r} did not answer in {timeout:g}s"
                ) from exc
            except (SecretStoreError, ValueError, OSError) as exc:
                raise ComponentInitError(f"{what}: secret store {store_name!r}: {exc}") from exc
            cache[ref.name] = secret
        if ref.key in secret:
            value = secret[ref.key]
        elif ref.key == ref.name and len(secret) == 1:
            (value,) = secret.values()
        else:
            raise ComponentInitError(
                f"{what}: secret {ref.name!r} of secret store {store_name!r} has no key "
                f"{ref.key!r} (its keys: {', '.join(sorted(secret)) or 'none'})"
            )
        items.append(MetadataItem(item.name, value=value))
    return replace(comp, metadata=tuple(items))
