"""Component registry: (Dapr type, version) -> lazily imported implementation class."""

from __future__ import annotations

import importlib
from typing import Any

# Values are "module:Class"; modules import only when a manifest names the type, so a
# sidecar pays start-up time only for the drivers it uses.
_REGISTRY: dict[tuple[str, str], str] = {
    ("state.in-memory", "v1"): "pillion.components.state.inmemory:InMemoryStateStore",
    ("state.sqlite", "v1"): "pillion.components.state.sqlite:SQLiteStateStore",
    ("state.redis", "v1"): "pillion.components.state.redis:RedisStateStore",
    ("state.postgresql", "v1"): "pillion.components.state.postgresql:PostgreSQLStateStore",
    ("state.mysql", "v1"): "pillion.components.state.mysql:MySQLStateStore",
    ("pubsub.in-memory", "v1"): "pillion.components.pubsub.inmemory:InMemoryPubSub",
    ("pubsub.sqlite", "v1"): "pillion.components.pubsub.sqlite:SQLitePubSub",
    ("pubsub.redis", "v1"): "pillion.components.pubsub.redis:RedisPubSub",
    ("pubsub.rabbitmq", "v1"): "pillion.components.pubsub.rabbitmq:RabbitMQPubSub",
    ("pubsub.mqtt3", "v1"): "pillion.components.pubsub.mqtt3:MQTTPubSub",
    ("pubsub.jetstream", "v1"): "pillion.components.pubsub.jetstream:JetStreamPubSub",
    ("lock.sqlite", "v1"): "pillion.components.lock.sqlite:SQLiteLockStore",
    ("lock.redis", "v1"): "pillion.components.lock.redis:RedisLockStore",
    ("secretstores.local.file", "v1"): (
        "pillion.components.secretstores.local_file:LocalFileSecretStore"
    ),
    ("secretstores.local.env", "v1"): (
        "pillion.components.secretstores.local_env:LocalEnvSecretStore"
    ),
    ("configuration.redis", "v1"): (
        "pillion.components.configuration.redis:RedisConfigurationStore"
    ),
    ("configuration.postgresql", "v1"): (
        "pillion.components.configuration.postgresql:PostgresConfigurationStore"
    ),
    ("bindings.cron", "v1"): "pillion.components.bindings.cron:CronBinding",
    ("bindings.http", "v1"): "pillion.components.bindings.http:HttpBinding",
    ("bindings.localstorage", "v1"): (
        "pillion.components.bindings.localstorage:LocalStorageBinding"
    ),
    ("bindings.redis", "v1"): "pillion.components.bindings.redis:RedisBinding",
    ("bindings.postgresql", "v1"): "pillion.components.bindings.postgresql:PostgreSQLBinding",
    ("bindings.rabbitmq", "v1"): "pillion.components.bindings.rabbitmq:RabbitMQBinding",
    ("bindings.mqtt3", "v1"): "pillion.components.bindings.mqtt3:MQTTBinding",
}

# Extra to install when a driver import fails, by type prefix.
_EXTRAS: dict[str, str] = {
    "state.redis": "redis",
    "state.postgresql": "postgresql",
    "state.mysql": "mysql",
    "pubsub.redis": "redis",
    "pubsub.rabbitmq": "rabbitmq",
    "pubsub.mqtt3": "mqtt",
    "pubsub.jetstream": "nats",
    "lock.redis": "redis",
    "configuration.redis": "redis",
    "configuration.postgresql": "postgresql",
    "bindings.redis": "redis",
    "bindings.postgresql": "postgresql",
    "bindings.rabbitmq": "rabbitmq",
    "bindings.mqtt3": "mqtt",
}


class UnknownComponentError(LookupError):
    pass


def kinds() -> list[tuple[str, str]]:
    """Every registered (type, version), sorted."""
    return sorted(_REGISTRY)


def category(component_type: str) -> str:
    """'state' for 'state.redis'."""
    return component_type.split(".", 1)[0]


def load(component_type: str, version: str = "v1") -> type[Any]:
    """The implementation class; raises UnknownComponentError with the known types."""
    target = _REGISTRY.get((component_type, version or "v1"))
    if target is None:
        same = sorted(t for t, _ in _REGISTRY if category(t) == category(component_type))
        hint = f"; known {category(component_type)} types: {', '.join(same)}" if same else ""
        raise UnknownComponentError(
            f"unknown component type {component_type}/{version or 'v1'}{hint}"
        )
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        extra = _EXTRAS.get(component_type)
        how = f" (install pillion[{extra}])" if extra else ""
        raise UnknownComponentError(
            f"component type {component_type} needs a driver that is not installed{how}: {exc}"
        ) from exc
    cls: type[Any] = getattr(module, class_name)
    return cls
