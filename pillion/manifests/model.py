"""Typed Dapr resources (Component, Configuration, Subscription) as the loader builds them."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# dapr-api.md §15.2: tracing.samplingRate absent, unparsable or outside 0..1 means 1 in 10,000.
DEFAULT_SAMPLING_RATE = 0.0001

# Features daprd switches on unless a Configuration says otherwise (SetDefaultFeatures).
DEFAULT_FEATURES: Mapping[str, bool] = {"HotReload": True, "WorkflowsRemoteActivityReminder": True}


class ManifestError(Exception):
    """A resource file is missing or malformed.

    `str()` reads `file: document N: field: message`, leaving out the parts that do not apply;
    `document` is 1-based, list indexes inside `field` are 0-based.
    """

    def __init__(self, file: str, document: int | None, field: str | None, message: str) -> None:
        # All four go to Exception so the error pickles and copies with its parts intact.
        super().__init__(file, document, field, message)
        self.file = file
        self.document = document
        self.field = field
        self.message = message

    def __str__(self) -> str:
        parts = [self.file]
        if self.document is not None:
            parts.append(f"document {self.document}")
        if self.field:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)


def split_source(source: str) -> tuple[str, int | None]:
    """("file.yaml", 2) for "file.yaml#2"; the document part is None when absent."""
    file, sep, doc = source.rpartition("#")
    if sep and doc.isdigit():
        return file, int(doc)
    return source, None


@dataclass(frozen=True)
class SecretKeyRef:
    """`secretKeyRef: {name, key}`: secret `name` in the component's auth secret store."""

    name: str
    key: str


@dataclass(frozen=True)
class MetadataItem:
    """One `spec.metadata` entry; exactly one of the three sources is set."""

    name: str
    value: str | None = None
    secret_key_ref: SecretKeyRef | None = None
    env_ref: str | None = None


@dataclass(frozen=True, kw_only=True)
class Component:
    """A `kind: Component` resource (dapr-api.md §15.1)."""

    name: str
    type: str
    namespace: str = ""
    version: str = "v1"
    init_timeout: float | None = None
    ignore_errors: bool = False
    metadata: tuple[MetadataItem, ...] = ()
    auth_secret_store: str | None = None
    scopes: tuple[str, ...] = ()
    source: str = ""

    @property
    def category(self) -> str:
        """ "state" for "state.redis"."""
        return self.type.split(".", 1)[0]

    def properties(self, env: Mapping[str, str]) -> dict[str, str]:
        """Metadata name -> value with `envRef` read from `env`; `secretKeyRef` items are left out.

        A missing environment variable is a ManifestError naming the file, component and field.
        """
        out: dict[str, str] = {}
        for i, item in enumerate(self.metadata):
            if item.secret_key_ref is not None:
                continue
            if item.env_ref is not None:
                value = env.get(item.env_ref)
                if value is None:
                    file, doc = split_source(self.source)
                    raise ManifestError(
                        file,
                        doc,
                        f"spec.metadata[{i}].envRef",
                        f"component {self.name!r}: environment variable {item.env_ref!r} "
                        "is not set",
                    )
                out[item.name] = value
                continue
            out[item.name] = item.value if item.value is not None else ""
        return out

    def secret_refs(self) -> tuple[tuple[str, SecretKeyRef], ...]:
        """(metadata name, reference) for every `secretKeyRef` item, in manifest order."""
        return tuple(
            (item.name, item.secret_key_ref)
            for item in self.metadata
            if item.secret_key_ref is not None
        )


def _get_map(spec: Mapping[str, Any], *keys: str) -> Mapping[str, Any] | None:
    node: Any = spec
    for key in keys:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node if isinstance(node, Mapping) else None


@dataclass(frozen=True, kw_only=True)
class Configuration:
    """A `kind: Configuration` resource (dapr-api.md §15.2).

    Only what pillion reads today has an accessor; `spec` keeps everything for later readers.
    """

    name: str = ""
    source: str = ""
    # hash=False: a frozen dataclass hashes all fields and a dict cannot be hashed.
    spec: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def tracing_sampling_rate(self) -> float:
        """`tracing.samplingRate` as a float; absent, unparsable or out of 0..1 -> 0.0001."""
        tracing = _get_map(self.spec, "tracing")
        raw = tracing.get("samplingRate") if tracing is not None else None
        if raw is None or isinstance(raw, bool) or not isinstance(raw, str | int | float):
            return DEFAULT_SAMPLING_RATE
        try:
            rate = float(str(raw).strip())
        except ValueError:
            return DEFAULT_SAMPLING_RATE
        if math.isnan(rate) or not 0.0 <= rate <= 1.0:
            return DEFAULT_SAMPLING_RATE
        return rate

    @property
    def features(self) -> dict[str, bool]:
        """Feature name -> enabled, daprd's default-on features included unless overridden."""
        out = dict(DEFAULT_FEATURES)
        raw = self.spec.get("features")
        if isinstance(raw, list):
            for item in raw:
                if isinstance(item, Mapping) and isinstance(item.get("name"), str):
                    out[item["name"]] = item.get("enabled") is True
        return out

    def feature_enabled(self, name: str) -> bool:
        return self.features.get(name, False)

    @property
    def metrics_enabled(self) -> bool:
        """`metrics.enabled` (or the older `metric.enabled`); metrics are on unless disabled."""
        for key in ("metrics", "metric"):
            block = _get_map(self.spec, key)
            if block is not None and isinstance(block.get("enabled"), bool):
                return bool(block["enabled"])
        return True

    @property
    def api_logging(self) -> bool:
        """`logging.apiLogging.enabled`, off by default."""
        block = _get_map(self.spec, "logging", "apiLogging")
        return block is not None and block.get("enabled") is True

    @property
    def api_logging_omit_health_checks(self) -> bool:
        """`logging.apiLogging.omitHealthChecks`: no API log line for health probes."""
        block = _get_map(self.spec, "logging", "apiLogging")
        return block is not None and block.get("omitHealthChecks") is True

    @property
    def name_resolution(self) -> Mapping[str, Any] | None:
        """The `nameResolution` block, or None for the mode's default resolver."""
        return _get_map(self.spec, "nameResolution")


def merge_configurations(configs: Iterable[Configuration]) -> Configuration:
    """One Configuration from several `--config` files, later files winning.

    Top-level `spec` keys of a later file replace earlier ones, except `features`, which are
    merged by name so a second file can switch one feature without repeating the rest. No
    configurations gives the empty (all-defaults) Configuration.
    """
    configs = list(configs)
    if not configs:
        return Configuration()
    if len(configs) == 1:
        return configs[0]
    spec: dict[str, Any] = {}
    features: dict[str, Any] = {}
    for config in configs:
        for key, value in config.spec.items():
            if key == "features" and isinstance(value, list):
                for item in value:
                    if isinstance(item, Mapping) and isinstance(item.get("name"), str):
                        features[item["name"]] = dict(item)
                continue
            spec[key] = value
    if features:
        spec["features"] = list(features.values())
    return Configuration(
        name=configs[-1].name,
        source=", ".join(c.source for c in configs),
        spec=spec,
    )


@dataclass(frozen=True)
class RouteRule:
    """One `routes.rules[]` entry: deliver to `path` when the CEL `match` holds ("" = always)."""

    match: str
    path: str


@dataclass(frozen=True, kw_only=True)
class Subscription:
    """A declarative `kind: Subscription` (v1alpha1 `route` or v2alpha1 `routes`, §15.4)."""

    name: str
    pubsubname: str
    topic: str
    api_version: str = "dapr.io/v2alpha1"
    namespace: str = ""
    route: str | None = None
    rules: tuple[RouteRule, ...] = ()
    default_route: str | None = None
    dead_letter_topic: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)
    bulk_subscribe: Mapping[str, Any] = field(default_factory=dict, hash=False)
    scopes: tuple[str, ...] = ()
    source: str = ""

    @property
    def default_path(self) -> str | None:
        """The catch-all path tried after the rules: `routes.default`, else `route` (§3.5)."""
        return self.default_route or self.route or None


@dataclass(frozen=True, kw_only=True)
class Resources:
    """Everything loaded from the resources paths, already filtered for this app."""

    components: tuple[Component, ...] = ()
    configurations: tuple[Configuration, ...] = ()
    subscriptions: tuple[Subscription, ...] = ()
    # (kind, source) of Dapr kinds pillion does not type yet (Resiliency, HTTPEndpoint, ...)
    # and, at the same index in `raw`, the whole document for whoever types them next.
    other: tuple[tuple[str, str], ...] = ()
    raw: tuple[Mapping[str, Any], ...] = field(default=(), hash=False)

    def component(self, name: str) -> Component | None:
        for c in self.components:
            if c.name == name:
                return c
        return None

    def of_kind(self, kind: str) -> tuple[tuple[str, Mapping[str, Any]], ...]:
        """(source, document) of every untyped resource of `kind`."""
        return tuple(
            (source, doc)
            for (k, source), doc in zip(self.other, self.raw, strict=True)
            if k == kind
        )
