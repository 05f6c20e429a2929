"""Reads Dapr resource YAML from files and folders into typed resources, with file:field errors."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pillion.durations import parse_duration
from pillion.manifests.model import (
    Component,
    Configuration,
    ManifestError,
    MetadataItem,
    Resources,
    RouteRule,
    SecretKeyRef,
    Subscription,
    merge_configurations,
)
from pillion.manifests.placeholders import PlaceholderError, expand, expand_env

__all__ = ["ManifestError", "load_configuration", "load_resources", "parse_documents"]

log = logging.getLogger("pillion.manifests.loader")

DAPR_GROUP = "dapr.io/"

# Kinds pillion knows and the apiVersions daprd accepts for each; other dapr.io kinds (newer
# Dapr releases add some) are skipped with a warning, as daprd skips what it does not load.
KINDS: Mapping[str, frozenset[str]] = {
    "Component": frozenset({"dapr.io/v1alpha1"}),
    "Configuration": frozenset({"dapr.io/v1alpha1"}),
    "Subscription": frozenset({"dapr.io/v1alpha1", "dapr.io/v2alpha1"}),
    "Resiliency": frozenset({"dapr.io/v1alpha1"}),
    "HTTPEndpoint": frozenset({"dapr.io/v1alpha1"}),
}

_TYPE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+$")
_YAML_SUFFIXES = (".yaml", ".yml")


# --- YAML reading -------------------------------------------------------------------------------


class _WrittenInt(int):
    """An int that remembers its YAML text, so metadata values stringify as written."""

    written: str

    def __new__(cls, value: int, written: str) -> _WrittenInt:
        obj = super().__new__(cls, value)
        obj.written = written
        return obj

    def __reduce__(self) -> tuple[type[int], tuple[int]]:
        # Copies and pickles become plain ints rather than failing on the extra argument.
        return int, (int(self),)


class _WrittenFloat(float):
    """A float that remembers its YAML text (1.50 stays "1.50", not "1.5")."""

    written: str

    def __new__(cls, value: float, written: str) -> _WrittenFloat:
        obj = super().__new__(cls, value)
        obj.written = written
        return obj

    def __reduce__(self) -> tuple[type[float], tuple[float]]:
        return float, (float(self),)


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps number text and reads timestamps and `=` as plain strings.

    daprd goes YAML -> JSON, where a date is just a string; PyYAML would build a datetime that
    neither stringifies as written nor JSON-encodes.
    """


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    return _WrittenInt(loader.construct_yaml_int(node), str(node.value))


def _construct_float(loader: _Loader, node: yaml.ScalarNode) -> float:
    return _WrittenFloat(loader.construct_yaml_float(node), str(node.value))


def _construct_text(loader: _Loader, node: yaml.ScalarNode) -> str:
    return loader.construct_scalar(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)
_Loader.add_constructor("tag:yaml.org,2002:timestamp", _construct_text)
_Loader.add_constructor("tag:yaml.org,2002:value", _construct_text)


@dataclass(frozen=True)
class _Doc:
    """One YAML document and where it came from, for error messages."""

    file: str
    index: int  # 1-based, counting empty documents so it matches what a reader counts
    body: Any

    @property
    def source(self) -> str:
        return f"{self.file}#{self.index}"

    def error(self, field: str | None, message: str) -> ManifestError:
        return ManifestError(self.file, self.index, field, message)


def _read_text(file: str, *, what: str = "file") -> str:
    path = Path(file)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(file, None, None, f"{what} not found") from None
    except IsADirectoryError:
        raise ManifestError(file, None, None, f"is a folder, expected a {what}") from None
    except OSError as exc:
        raise ManifestError(file, None, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(file, None, None, f"not UTF-8 text (byte {exc.start})") from None


def parse_documents(file: str, text: str) -> list[tuple[int, Any]]:
    """(1-based index, data) of every document in `text`; YAML errors carry line and column."""
    docs: list[tuple[int, Any]] = []
    try:
        for data in yaml.load_all(text, Loader=_Loader):
            docs.append((len(docs) + 1, data))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            problem = f"{problem} ({exc.context})"
        raise ManifestError(file, len(docs) + 1, None, f"{where}{problem}") from None
    except yaml.YAMLError as exc:
        raise ManifestError(file, len(docs) + 1, None, f"invalid YAML: {exc}") from None
    except RecursionError:
        raise ManifestError(file, len(docs) + 1, None, "YAML nesting is too deep") from None
    return docs


def _documents(file: str, text: str) -> list[_Doc]:
    return [_Doc(file, i, body) for i, body in parse_documents(file, text) if body is not None]


# --- field helpers: each turns a wrong shape into a ManifestError naming the field ------------


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _mapping(doc: _Doc, value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise doc.error(path, f"must be a mapping, got {_kind_of(value)}")
    return value


def _opt_mapping(doc: _Doc, parent: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = parent.get(key)
    return {} if value is None else _mapping(doc, value, path)


def _req_str(doc: _Doc, parent: Mapping[str, Any], key: str, path: str) -> str:
    value = parent.get(key)
    if value is None or value == "":
        raise doc.error(path, "is required")
    if not isinstance(value, str):
        raise doc.error(path, f"must be a string, got {_kind_of(value)}")
    return value


def _opt_str(doc: _Doc, parent: Mapping[str, Any], key: str, path: str) -> str | None:
    value = parent.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise doc.error(path, f"must be a string, got {_kind_of(value)}")
    return value


def _opt_bool(doc: _Doc, parent: Mapping[str, Any], key: str, path: str) -> bool | None:
    value = parent.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise doc.error(path, f"must be true or false, got {_kind_of(value)}")
    return value


def _opt_int(doc: _Doc, parent: Mapping[str, Any], key: str, path: str) -> int | None:
    value = parent.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise doc.error(path, f"must be an integer, got {_kind_of(value)}")
    return int(value)


def _opt_list(doc: _Doc, parent: Mapping[str, Any], key: str, path: str) -> list[Any]:
    value = parent.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise doc.error(path, f"must be a list, got {_kind_of(value)}")
    return value


def _scopes(doc: _Doc) -> tuple[str, ...]:
    items = _opt_list(doc, doc.body, "scopes", "scopes")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise doc.error(f"scopes[{i}]", f"must be a string (an app id), got {_kind_of(item)}")
    return tuple(items)


_PLAIN_INT = re.compile(r"^[-+]?(0|[1-9][0-9]*)$")
_PLAIN_FLOAT = re.compile(r"^[-+]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$")


def _stringify(doc: _Doc, value: Any, path: str) -> str:
    """A metadata value as the string a component sees.

    Numbers keep their decimal text ("1.50" stays "1.50"); hex, octal and other YAML 1.1 forms
    become their decimal value, which is what daprd's YAML -> JSON step yields. Mappings and
    lists become compact JSON, as Dapr passes JSON values through.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, _WrittenInt) and _PLAIN_INT.match(value.written):
        return value.written.lstrip("+")
    if isinstance(value, _WrittenFloat) and _PLAIN_FLOAT.match(value.written):
        return value.written.lstrip("+")
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, list | dict):
        try:
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise doc.error(path, f"cannot be encoded as JSON: {exc}") from None
    raise doc.error(path, f"must be a scalar, a list or a mapping, got {_kind_of(value)}")


def _plain(value: Any, memo: dict[int, Any] | None = None) -> Any:
    """`value` with the loader's number subclasses turned back into int and float.

    The memo keeps YAML aliases shared (and cycles finite) instead of copying them out.
    """
    if memo is None:
        memo = {}
    if isinstance(value, _WrittenInt):
        return int(value)
    if isinstance(value, _WrittenFloat):
        return float(value)
    if isinstance(value, dict):
        if id(value) in memo:
            return memo[id(value)]
        out: dict[Any, Any] = {}
        memo[id(value)] = out
        for k, v in value.items():
            out[_plain(k, memo)] = _plain(v, memo)
        return out
    if isinstance(value, list):
        if id(value) in memo:
            return memo[id(value)]
        items: list[Any] = []
        memo[id(value)] = items
        items.extend(_plain(v, memo) for v in value)
        return items
    return value


# --- documents -> resources ---------------------------------------------------------------------


def _dapr_kind(doc: _Doc) -> str | None:
    """The document's kind if pillion loads it; None for non-Dapr and unknown Dapr kinds."""
    if not isinstance(doc.body, dict):
        raise doc.error(
            None, f"must be a mapping (apiVersion, kind, metadata, spec), got {_kind_of(doc.body)}"
        )
    api_version = doc.body.get("apiVersion")
    # Kubernetes manifests often share a folder with Dapr's; daprd ignores them silently.
    if not isinstance(api_version, str) or not api_version.startswith(DAPR_GROUP):
        return None
    kind = _req_str(doc, doc.body, "kind", "kind")
    versions = KINDS.get(kind)
    if versions is None:
        log.warning(
            "%s: skipping %s %s: pillion does not load this kind", doc.source, api_version, kind
        )
        return None
    if api_version not in versions:
        raise doc.error(
            "apiVersion", f"{kind} must be {' or '.join(sorted(versions))}, got {api_version!r}"
        )
    return kind


def _object_meta(doc: _Doc, *, name_required: bool = True) -> tuple[str, str]:
    """(metadata.name, metadata.namespace) with daprd's path-segment rule on the name."""
    value = doc.body.get("metadata")
    if value is None:
        if name_required:
            raise doc.error("metadata.name", "is required")
        return "", ""
    meta = _mapping(doc, value, "metadata")
    if name_required:
        name = _req_str(doc, meta, "name", "metadata.name")
    else:
        name = _opt_str(doc, meta, "name", "metadata.name") or ""
    # The name becomes a URL path segment (/v1.0/state/{name}); daprd rejects these too.
    if name in (".", "..") or "/" in name or "%" in name:
        raise doc.error("metadata.name", f"{name!r} is not a valid name (no '/', '%', '.' or '..')")
    namespace = _opt_str(doc, meta, "namespace", "metadata.namespace") or ""
    return name, namespace


def _metadata_item(doc: _Doc, value: Any, path: str) -> MetadataItem:
    item = _mapping(doc, value, path)
    name = _req_str(doc, item, "name", f"{path}.name")
    ref: SecretKeyRef | None = None
    if item.get("secretKeyRef") is not None:
        ref_map = _mapping(doc, item["secretKeyRef"], f"{path}.secretKeyRef")
        ref_name = _req_str(doc, ref_map, "name", f"{path}.secretKeyRef.name")
        # daprd reads the key named like the secret when `key` is left out.
        ref_key = _opt_str(doc, ref_map, "key", f"{path}.secretKeyRef.key") or ref_name
        ref = SecretKeyRef(ref_name, ref_key)
    env_ref = _opt_str(doc, item, "envRef", f"{path}.envRef")
    if env_ref == "":
        raise doc.error(f"{path}.envRef", "must name an environment variable")
    # A missing or null value is Dapr's empty string, not an error.
    text = _stringify(doc, item.get("value"), f"{path}.value")
    sources = [s for s, v in (("value", text), ("secretKeyRef", ref), ("envRef", env_ref)) if v]
    if len(sources) > 1:
        raise doc.error(path, f"set only one of value, secretKeyRef and envRef (got {sources})")
    if ref is not None:
        return MetadataItem(name, secret_key_ref=ref)
    if env_ref is not None:
        return MetadataItem(name, env_ref=env_ref)
    return MetadataItem(name, value=text)


def _component(doc: _Doc) -> Component:
    name, namespace = _object_meta(doc)
    if doc.body.get("spec") is None:
        raise doc.error("spec", "is required")
    spec = _mapping(doc, doc.body["spec"], "spec")
    ctype = _req_str(doc, spec, "type", "spec.type")
    if not _TYPE.match(ctype):
        raise doc.error("spec.type", f"must be <category>.<kind> like state.redis, got {ctype!r}")
    version = _opt_str(doc, spec, "version", "spec.version") or "v1"
    init_timeout: float | None = None
    raw_timeout = spec.get("initTimeout")
    if raw_timeout is not None:
        if not isinstance(raw_timeout, str):
            raise doc.error(
                "spec.initTimeout", f'must be a duration like "5s", got {_kind_of(raw_timeout)}'
            )
        try:
            init_timeout = parse_duration(raw_timeout)
        except ValueError:
            init_timeout = math.nan
        if not math.isfinite(init_timeout) or init_timeout < 0:
            raise doc.error(
                "spec.initTimeout", f'must be a duration like "5s", got {raw_timeout!r}'
            )
    ignore_errors = _opt_bool(doc, spec, "ignoreErrors", "spec.ignoreErrors") or False
    items = tuple(
        _metadata_item(doc, item, f"spec.metadata[{i}]")
        for i, item in enumerate(_opt_list(doc, spec, "metadata", "spec.metadata"))
    )
    auth = _opt_mapping(doc, doc.body, "auth", "auth")
    return Component(
        name=name,
        namespace=namespace,
        type=ctype,
        version=version,
        init_timeout=init_timeout,
        ignore_errors=ignore_errors,
        metadata=items,
        auth_secret_store=_opt_str(doc, auth, "secretStore", "auth.secretStore") or None,
        scopes=_scopes(doc),
        source=doc.source,
    )


def _configuration(doc: _Doc) -> Configuration:
    # daprd never reads a Configuration's name, so one without a name still loads.
    name, _ = _object_meta(doc, name_required=False)
    spec = _opt_mapping(doc, doc.body, "spec", "spec")
    # Check the shapes the typed accessors read; the rest is validated by its later readers.
    for i, item in enumerate(_opt_list(doc, spec, "features", "spec.features")):
        feature = _mapping(doc, item, f"spec.features[{i}]")
        _req_str(doc, feature, "name", f"spec.features[{i}].name")
        _opt_bool(doc, feature, "enabled", f"spec.features[{i}].enabled")
    for key in ("metrics", "metric"):
        block = _opt_mapping(doc, spec, key, f"spec.{key}")
        _opt_bool(doc, block, "enabled", f"spec.{key}.enabled")
    logging_block = _opt_mapping(doc, spec, "logging", "spec.logging")
    api_logging = _opt_mapping(doc, logging_block, "apiLogging", "spec.logging.apiLogging")
    _opt_bool(doc, api_logging, "enabled", "spec.logging.apiLogging.enabled")
    _opt_mapping(doc, spec, "tracing", "spec.tracing")
    _opt_mapping(doc, spec, "nameResolution", "spec.nameResolution")
    return Configuration(name=name, source=doc.source, spec=_plain(dict(spec)))


def _subscription(doc: _Doc) -> Subscription:
    api_version = str(doc.body["apiVersion"])
    name, namespace = _object_meta(doc)
    if doc.body.get("spec") is None:
        raise doc.error("spec", "is required")
    spec = _mapping(doc, doc.body["spec"], "spec")
    pubsubname = _req_str(doc, spec, "pubsubname", "spec.pubsubname")
    topic = _req_str(doc, spec, "topic", "spec.topic")
    route = _opt_str(doc, spec, "route", "spec.route") or None
    routes = _opt_mapping(doc, spec, "routes", "spec.routes")
    rules: list[RouteRule] = []
    for i, item in enumerate(_opt_list(doc, routes, "rules", "spec.routes.rules")):
        rule = _mapping(doc, item, f"spec.routes.rules[{i}]")
        match = _opt_str(doc, rule, "match", f"spec.routes.rules[{i}].match") or ""
        rules.append(RouteRule(match, _req_str(doc, rule, "path", f"spec.routes.rules[{i}].path")))
    default_route = _opt_str(doc, routes, "default", "spec.routes.default") or None
    if route is None and default_route is None and not rules:
        field = "spec.route" if api_version.endswith("v1alpha1") else "spec.routes"
        raise doc.error(field, "is required: set spec.route or spec.routes (rules or default)")
    metadata: dict[str, str] = {}
    for key, value in _opt_mapping(doc, spec, "metadata", "spec.metadata").items():
        if not isinstance(key, str):
            raise doc.error("spec.metadata", f"keys must be strings, got {_kind_of(key)}")
        metadata[key] = _stringify(doc, value, f"spec.metadata.{key}")
    bulk = _opt_mapping(doc, spec, "bulkSubscribe", "spec.bulkSubscribe")
    _opt_bool(doc, bulk, "enabled", "spec.bulkSubscribe.enabled")
    _opt_int(doc, bulk, "maxMessagesCount", "spec.bulkSubscribe.maxMessagesCount")
    _opt_int(doc, bulk, "maxAwaitDurationMs", "spec.bulkSubscribe.maxAwaitDurationMs")
    return Subscription(
        name=name,
        namespace=namespace,
        api_version=api_version,
        pubsubname=pubsubname,
        topic=topic,
        route=route,
        rules=tuple(rules),
        default_route=default_route,
        dead_letter_topic=_opt_str(doc, spec, "deadLetterTopic", "spec.deadLetterTopic") or None,
        metadata=metadata,
        bulk_subscribe=_plain(dict(bulk)),
        scopes=_scopes(doc),
        source=doc.source,
    )


T = TypeVar("T")


def _guarded(doc: _Doc, build: Callable[[_Doc], T]) -> T:
    # The builders check every shape they touch; this net turns a shape they missed into the
    # same file:document error instead of a traceback at start-up.
    try:
        return build(doc)
    except ManifestError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as exc:
        raise doc.error(None, f"could not be read ({type(exc).__name__}: {exc})") from exc


def _in_scope(scopes: tuple[str, ...], app_id: str) -> bool:
    return not scopes or app_id in scopes


def _in_namespace(resource_ns: str, namespace: str) -> bool:
    # daprd's namespace authorizer: only a resource pinned to another namespace is left out.
    return not namespace or not resource_ns or resource_ns == namespace


def _expand_placeholders(
    doc: _Doc, comp: Component, app_id: str, namespace: str, env: Mapping[str, str]
) -> Component:
    items: list[MetadataItem] = []
    for i, item in enumerate(comp.metadata):
        if item.value is not None:
            try:
                item = replace(
                    item, value=expand(item.value, app_id=app_id, namespace=namespace, env=env)
                )
            except PlaceholderError as exc:
                raise doc.error(f"spec.metadata[{i}].value", str(exc)) from None
        items.append(item)
    return replace(comp, metadata=tuple(items))


def _resource_files(paths: Sequence[str | Path]) -> list[str]:
    """Every YAML file named by `paths`: folders list their *.yaml/*.yml, not recursively."""
    files: list[str] = []
    seen: set[str] = set()
    for p in paths:
        found = _files_at(Path(p))
        for entry in found:
            # The same file reached twice (a folder and a file in it) would read as duplicates.
            key = os.path.realpath(entry)
            if key not in seen:
                seen.add(key)
                files.append(str(entry))
    return files


def _files_at(path: Path) -> list[Path]:
    try:
        if path.is_dir():
            entries = sorted(path.iterdir(), key=lambda e: e.name)
            return [e for e in entries if e.name.lower().endswith(_YAML_SUFFIXES) and e.is_file()]
        if path.exists():
            return [path]
    except OSError as exc:
        raise ManifestError(str(path), None, None, f"cannot read: {exc.strerror or exc}") from None
    raise ManifestError(str(path), None, None, "no such file or folder")


def load_resources(
    paths: Sequence[str | Path],
    *,
    app_id: str,
    namespace: str = "",
    env: Mapping[str, str] | None = None,
) -> Resources:
    """Every Dapr resource in `paths` (folders or files) that applies to `app_id`.

    Resources with `scopes` that do not list the app are left out, as are components and
    HTTPEndpoints pinned to another namespace (when `namespace` is set). Placeholders in
    component metadata values are expanded; `env` (default os.environ) supplies POD_NAME.
    Raises ManifestError on the first problem.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    components: list[Component] = []
    by_name: dict[str, Component] = {}
    configurations: list[Configuration] = []
    subscriptions: list[Subscription] = []
    other: list[tuple[str, str]] = []
    raw: list[Mapping[str, Any]] = []
    for file in _resource_files(paths):
        for doc in _documents(file, _read_text(file)):
            kind = _dapr_kind(doc)
            if kind == "Component":
                comp = _guarded(doc, _component)
                if not _in_namespace(comp.namespace, namespace) or not _in_scope(
                    comp.scopes, app_id
                ):
                    continue
                comp = _expand_placeholders(doc, comp, app_id, namespace, environ)
                first = by_name.get(comp.name)
                if first is not None:
                    raise doc.error(
                        "metadata.name",
                        f"component {comp.name!r} is already defined at {first.source}",
                    )
                by_name[comp.name] = comp
                components.append(comp)
            elif kind == "Configuration":
                configurations.append(_guarded(doc, _configuration))
            elif kind == "Subscription":
                sub = _guarded(doc, _subscription)
                if _in_scope(sub.scopes, app_id):
                    subscriptions.append(sub)
            elif kind is not None:
                _, res_ns = _guarded(doc, _object_meta)
                scopes = _scopes(doc)
                if kind == "HTTPEndpoint" and not _in_namespace(res_ns, namespace):
                    continue
                if _in_scope(scopes, app_id):
                    other.append((kind, doc.source))
                    raw.append(_guarded(doc, lambda d: _plain(d.body)))
    return Resources(
        components=tuple(components),
        configurations=tuple(configurations),
        subscriptions=tuple(subscriptions),
        other=tuple(other),
        raw=tuple(raw),
    )


def load_configuration(
    paths: Sequence[str | Path], *, env: Mapping[str, str] | None = None
) -> Configuration:
    """The merged Configuration from `--config` files (later files win).

    Each file must hold a `kind: Configuration` document. Like daprd, `$VAR` and `${VAR}` in the
    file are replaced from `env` (default os.environ) before parsing. No paths gives the
    all-defaults Configuration.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    configs: list[Configuration] = []
    for p in paths:
        file = str(p)
        text = expand_env(_read_text(file, what="Configuration file"), environ)
        found = [
            _guarded(doc, _configuration)
            for doc in _documents(file, text)
            if _dapr_kind(doc) == "Configuration"
        ]
        if not found:
            raise ManifestError(
                file,
                None,
                None,
                "no Configuration document (apiVersion: dapr.io/v1alpha1, kind: Configuration)",
            )
        configs.extend(found)
    return merge_configurations(configs)
