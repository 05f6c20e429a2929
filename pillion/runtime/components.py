"""Builds and initialises components from manifests; the one place that knows every kind."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from pillion.blocks.bindings import BindingEntry
from pillion.blocks.cloudevents import TopicScopes
from pillion.blocks.lock import IllegalKey, LockEntry, check_key_prefix
from pillion.blocks.metadata import ComponentView
from pillion.blocks.pubsub import PubSubEntry
from pillion.blocks.state import OutboxConfig, StoreEntry
from pillion.components import registry
from pillion.components.bindings.api import InputBinding, OutputBinding
from pillion.components.configuration.api import ConfigurationStore
from pillion.components.lock.api import LockStore
from pillion.components.metadata import ComponentConfigError, ComponentInfo, Properties, parse_bool
from pillion.components.pubsub.api import PubSub
from pillion.components.secretstores.api import SecretStore, SecretStoreError
from pillion.components.state.api import Feature, StateStore
from pillion.manifests.model import Component, MetadataItem

log = logging.getLogger("pillion.runtime.components")

DEFAULT_INIT_TIMEOUT = 5.0
# Backoff between init attempts of a component that is not ready (seconds).
INIT_RETRY_START = 0.5
INIT_RETRY_MAX = 5.0
_Binding = InputBinding | OutputBinding
# Categories whose building block exists; others are skipped with a warning until their
# issue lands, so a Dapr components folder with e.g. a pubsub.yaml still starts.
BUILT_CATEGORIES = frozenset(
    {"state", "pubsub", "secretstores", "lock", "configuration", "bindings"}
)


class ComponentInitError(Exception):
    """A component failed to load and does not have ignoreErrors set: start-up stops."""


@dataclass
class Loaded:
    state: dict[str, StoreEntry] = field(default_factory=dict)
    pubsub: dict[str, PubSubEntry] = field(default_factory=dict)
    secretstores: dict[str, SecretStore] = field(default_factory=dict)
    configuration: dict[str, ConfigurationStore] = field(default_factory=dict)
    lock: dict[str, LockEntry] = field(default_factory=dict)
    bindings: dict[str, BindingEntry] = field(default_factory=dict)
    views: list[ComponentView] = field(default_factory=list)
    closers: list[StateStore | PubSub | SecretStore | LockStore | ConfigurationStore | _Binding] = (
        field(default_factory=list)
    )

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
            elif cat == "configuration":
                conf = await _create(
                    comp, Properties(comp.properties(env)), app_id=app_id, namespace=namespace
                )
                assert isinstance(conf, ConfigurationStore)
                out.configuration[comp.name] = conf
                out.closers.append(conf)
                caps = tuple(sorted(str(f) for f in conf.features()))
            elif cat == "bindings":
                be = await _init_binding(comp, app_id=app_id, namespace=namespace, env=env)
                out.bindings[comp.name] = be
                out.closers.append(be.component)
                caps = tuple(be.capabilities())
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
    try:
        _check_outboxes(out)
    except ComponentInitError:
        await out.close()
        raise
    return out


def _check_outboxes(out: Loaded) -> None:
    """Each outbox names loaded pubsubs (known only once every component is loaded)."""
    for entry in out.state.values():
        cfg = entry.outbox
        if cfg is None:
            continue
        for key, name in (
            ("outboxPublishPubsub", cfg.publish_pubsub),
            ("outboxPubsub", cfg.pubsub),
        ):
            if name not in out.pubsub:
                known = ", ".join(sorted(out.pubsub)) or "none is loaded"
                raise ComponentInitError(
                    f"state store {entry.name}: metadata {key!r}: pubsub {name!r} is not a "
                    f"loaded pubsub component ({known})"
                )


async def _create(
    comp: Component, props: Properties, *, app_id: str, namespace: str
) -> StateStore | PubSub | SecretStore | LockStore | ConfigurationStore | _Binding:
    """Import, construct and init one component within its initTimeout.

    As Dapr's `DaprBuiltInInitializationRetries`: an init that fails for any reason but its
    configuration (a server not up yet, say) is retried with exponential backoff
    (INIT_RETRY_START, x2, capped at INIT_RETRY_MAX) until the initTimeout runs out; a
    ComponentConfigError fails at once.
    """
    where = f"component {comp.name} ({comp.type}/{comp.version}) from {comp.source}"
    try:
        cls = registry.load(comp.type, comp.version)
    except registry.UnknownComponentError as exc:
        raise ComponentInitError(f"{where}: {exc}") from exc
    info = ComponentInfo(comp.name, comp.type, comp.version, app_id, props, namespace)
    timeout = comp.init_timeout or DEFAULT_INIT_TIMEOUT
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = INIT_RETRY_START
    attempts = 0
    last: Exception | None = None
    while True:
        attempts += 1
        instance: StateStore | PubSub | SecretStore | LockStore | ConfigurationStore | _Binding
        instance = cls()
        remaining = deadline - loop.time()
        try:
            async with asyncio.timeout(max(remaining, 0.0)) as cm:
                await instance.init(info)
            return instance
        except ComponentConfigError as exc:
            await _discard(instance)
            raise ComponentInitError(f"{where}: {exc}") from exc
        except Exception as exc:
            await _discard(instance)
            if cm.expired():
                if last is None:
                    raise ComponentInitError(f"{where}: init timed out after {timeout:g}s") from exc
                raise ComponentInitError(
                    f"{where}: not ready after {timeout:g}s ({attempts} attempts): "
                    f"{_describe(last)}"
                ) from last
            last = exc
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise ComponentInitError(
                f"{where}: not ready after {timeout:g}s ({attempts} attempts): {_describe(last)}"
            ) from last
        wait = min(delay, remaining)
        log.warning(
            "component %s (%s/%s) not ready: %s; retrying in %gs",
            comp.name,
            comp.type,
            comp.version,
            _describe(last),
            round(wait, 2),
        )
        await asyncio.sleep(wait)
        delay = min(delay * 2, INIT_RETRY_MAX)


def _describe(exc: BaseException) -> str:
    """One line for an init error; the type when the message is empty."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


async def _discard(
    instance: StateStore | PubSub | SecretStore | LockStore | ConfigurationStore | _Binding,
) -> None:
    """Release whatever a failed init opened, best effort and briefly."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(instance.close(), 1.0)


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
    outbox = _outbox_config(comp, props)
    store = await _create(comp, props, app_id=app_id, namespace=namespace)
    assert isinstance(store, StateStore)
    if outbox is not None and Feature.TRANSACTIONAL not in store.features():
        await store.close()
        where = f"component {comp.name} ({comp.type}/{comp.version}) from {comp.source}"
        raise ComponentInitError(f"{where}: the outbox needs a transactional state store")
    return StoreEntry(comp.name, store, props.get("keyPrefix", "appid") or "appid", actor, outbox)


def _outbox_config(comp: Component, props: Properties) -> OutboxConfig | None:
    """The `outbox*` metadata of a state store; None when `outboxPublishPubsub` is unset."""
    where = f"component {comp.name} ({comp.type}/{comp.version}) from {comp.source}"
    publish_pubsub = props.get("outboxPublishPubsub", "")
    if not publish_pubsub:
        return None
    topic = props.get("outboxPublishTopic", "")
    if not topic:
        raise ComponentInitError(
            f"{where}: metadata 'outboxPublishTopic' is required with 'outboxPublishPubsub'"
        )
    try:
        discard = parse_bool(
            "outboxDiscardWhenMissingState", props.get("outboxDiscardWhenMissingState", "false")
        )
    except ComponentConfigError as exc:
        raise ComponentInitError(f"{where}: {exc}") from exc
    return OutboxConfig(
        publish_pubsub, topic, props.get("outboxPubsub", "") or publish_pubsub, discard
    )


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


async def _init_binding(
    comp: Component, *, app_id: str, namespace: str, env: Mapping[str, str]
) -> BindingEntry:
    props = Properties(comp.properties(env))
    where = f"component {comp.name} ({comp.type}/{comp.version}) from {comp.source}"
    binding = await _create(comp, props, app_id=app_id, namespace=namespace)
    assert isinstance(binding, InputBinding | OutputBinding)
    is_in, is_out = isinstance(binding, InputBinding), isinstance(binding, OutputBinding)
    direction = props.get("direction", "")
    if direction.strip():
        wanted = {d.strip().lower() for d in direction.split(",") if d.strip()}
        bad = wanted - {"input", "output"}
        missing = [d for d in sorted(wanted - bad) if not (is_in if d == "input" else is_out)]
        if bad or missing:
            with contextlib.suppress(Exception):
                await binding.close()
            what = ", ".join(sorted(bad)) or f"{', '.join(missing)} (not supported by the type)"
            raise ComponentInitError(
                f"{where}: metadata 'direction': invalid direction {what}; use input, output "
                'or "input, output"'
            )
        is_in, is_out = "input" in wanted, "output" in wanted
    return BindingEntry(comp.name, binding, is_in, is_out, props.get("route", ""))


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
