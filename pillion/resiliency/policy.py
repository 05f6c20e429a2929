"""`kind: Resiliency` documents parsed, merged and resolved into one Policy per target."""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypedDict

from pillion.durations import parse_duration
from pillion.manifests.model import ManifestError, split_source
from pillion.resiliency.breaker import DEFAULT_TRIP, BreakerSpec, TripError, compile_trip
from pillion.resiliency.runner import CodeRanges, Observer, Policy, Retry

__all__ = [
    "BUILTIN_POLICIES",
    "COMPONENT_TYPES",
    "Observer",
    "Policy",
    "Resiliency",
    "Retry",
    "parse_go_duration",
]

log = logging.getLogger("pillion.resiliency.policy")

# daprd's BuiltInPolicy retries (pkg/resiliency/resiliency.go addBuiltInPolicies). The reminder
# policy sets no MaxRetries there, and Go's zero value means "no retries": kept as is.
BUILTIN_POLICIES: Mapping[str, Retry] = {
    retry.name: retry
    for retry in (
        Retry("constant", duration=1.0, max_retries=3, name="DaprBuiltInServiceRetries"),
        Retry("constant", duration=1.0, max_retries=3, name="DaprBuiltInActorRetries"),
        Retry(
            "exponential",
            duration=0.0,
            max_interval=60.0,
            max_retries=0,
            max_elapsed=15 * 60.0,
            name="DaprBuiltInActorReminderRetries",
        ),
        Retry("constant", duration=1.0, max_retries=5, name="DaprBuiltInActorNotFoundRetries"),
        Retry(
            "exponential",
            duration=2.0,
            max_interval=1.0,
            max_retries=3,
            max_elapsed=10.0,
            name="DaprBuiltInInitializationRetries",
        ),
    )
}
# A manifest may not replace this one (daprd's isProtectedPolicy).
_PROTECTED = frozenset({"DaprBuiltInActorNotFoundRetries"})
# Overrides of a built-in with fewer retries than this are raised to it, as daprd does.
_BUILTIN_MIN_RETRIES = 3

# Component category (the part before the dot of its type) -> daprd's ComponentType, which names
# the type-specific default policies and prefixes the metrics `target` label.
COMPONENT_TYPES: Mapping[str, str] = {
    "state": "Statestore",
    "pubsub": "Pubsub",
    "bindings": "Binding",
    "secretstores": "Secretstore",
    "configuration": "Configuration",
    "lock": "Lock",
    "crypto": "Crypto",
}

_RETRY_DEFAULTS = Retry()  # dapr/kit retry.DefaultConfig: constant 5s, forever
_EXPONENTIAL_MAX_ELAPSED = 15 * 60.0  # cenkalti/backoff DefaultMaxElapsedTime
_ENDPOINT_CACHE = 100  # daprd's defaultEndpointCacheSize
_ACTOR_CACHE = 5000  # daprd's defaultActorCacheSize
# Targets resolved through Default* policies are cached per name; this bounds that cache when
# callers name many distinct apps (the least recently used entry, and its breaker, is dropped).
_DEFAULTED_CACHE = 10_000
_INT = re.compile(r"[+-]?\d+")
_BARE_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")

_RETRY_KEYS = frozenset({"policy", "duration", "maxInterval", "maxRetries", "matching"})
_BREAKER_KEYS = frozenset({"maxRequests", "interval", "timeout", "trip"})
_NAMES_KEYS = frozenset({"timeout", "retry", "circuitBreaker"})
_APP_KEYS = _NAMES_KEYS | {"circuitBreakerCacheSize"}
_ACTOR_KEYS = _APP_KEYS | {"circuitBreakerScope"}


def parse_go_duration(value: object) -> float:
    """Seconds in a daprd resiliency duration: a Go duration, or an integer of milliseconds.

    daprd reads a bare integer ("500") as milliseconds and refuses other bare numbers ("1.5":
    missing unit). Raises ValueError.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected a duration such as 5s or 500ms, got {value!r}")
    text = str(value).strip()
    if _INT.fullmatch(text):
        return int(text) / 1000.0
    if _BARE_NUMBER.fullmatch(text):
        raise ValueError(f"missing unit in duration {text!r}")
    return parse_duration(text)


@dataclass(frozen=True)
class _Names:
    """The policy names one target (or one component direction) refers to."""

    timeout: str = ""
    retry: str = ""
    breaker: str = ""
    cache_size: int = 0
    scope: str = ""  # actors: type | id | both

    @property
    def empty(self) -> bool:
        return not (self.timeout or self.retry or self.breaker)


@dataclass(frozen=True)
class _Target:
    """A target entry and where it was written, for errors found after every document is read."""

    names: _Names
    file: str
    document: int | None
    path: str  # e.g. "spec.targets.apps.appB"


@dataclass(frozen=True)
class _ComponentTarget:
    inbound: _Target
    outbound: _Target


class _Doc:
    """One Resiliency document being read: makes ManifestErrors that name its file and field."""

    def __init__(self, source: str) -> None:
        self.file, self.document = split_source(source)

    def error(self, field: str, message: str) -> ManifestError:
        return ManifestError(self.file, self.document, field, message)

    def mapping(self, value: object, field: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(field, f"expected a mapping, got {type(value).__name__}")
        for key in value:
            if not isinstance(key, str):
                raise self.error(field, f"keys must be strings, got {key!r}")
        return value

    def string(self, value: object, field: str) -> str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {value!r}")
        return value

    def integer(self, value: object, field: str) -> int:
        if isinstance(value, bool):
            raise self.error(field, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return int(value)
        if isinstance(value, str) and _INT.fullmatch(value.strip()):
            return int(value.strip())
        raise self.error(field, f"expected an integer, got {value!r}")

    def duration(self, value: object, field: str) -> float:
        try:
            seconds = parse_go_duration(value)
        except ValueError as exc:
            raise self.error(field, str(exc)) from None
        if seconds < 0:
            raise self.error(field, f"duration must not be negative, got {value!r}")
        return seconds

    def entries(
        self, parent: Mapping[str, Any], key: str, prefix: str
    ) -> Iterator[tuple[str, Any, str]]:
        """(name, value, field path) of each entry of the mapping at `prefix.key`, if any."""
        field = f"{prefix}.{key}"
        for name, value in self.mapping(parent.get(key), field).items():
            yield name, value, f"{field}.{name}"

    def unknown_keys(self, value: Mapping[str, Any], allowed: frozenset[str], field: str) -> None:
        # daprd ignores unknown fields; a typo there silently changes behaviour, so say so.
        for key in value:
            if key not in allowed:
                log.warning("%s: %s: unknown field %r is ignored", self.file, field, key)


def _code_ranges(doc: _Doc, value: object, field: str, lo: int, hi: int) -> CodeRanges | None:
    """daprd's parsePatterns: "429,500-599"; empty or absent -> None (retry every code)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise doc.error(field, f'expected a list of codes such as "500,502-504", got {value!r}')
    text = str(value)
    if text == "":
        return None
    out: list[tuple[int, int]] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        bounds = part.split("-")
        if len(bounds) > 2:
            raise doc.error(field, f"invalid pattern {part!r}: more than one '-'")
        try:
            start = int(bounds[0])
            end = int(bounds[1]) if len(bounds) == 2 else start
        except ValueError:
            raise doc.error(field, f"invalid pattern {part!r}: not a number") from None
        for code in (start, end):
            if not lo <= code <= hi:
                raise doc.error(field, f"invalid pattern {part!r}: code {code} is not in {lo}-{hi}")
        if end < start:
            raise doc.error(field, f"invalid pattern {part!r}: start is greater than end")
        out.append((start, end))
    return tuple(out)


def _parse_retry(doc: _Doc, name: str, raw: object, field: str) -> Retry:
    spec = doc.mapping(raw, field)
    doc.unknown_keys(spec, _RETRY_KEYS, field)
    base = _RETRY_DEFAULTS
    policy = doc.string(spec.get("policy"), f"{field}.policy").strip().lower() or base.policy
    if policy not in ("constant", "exponential"):
        raise doc.error(
            f"{field}.policy", f"unknown policy {spec.get('policy')!r} (constant or exponential)"
        )
    duration = base.duration
    if spec.get("duration") not in (None, ""):
        duration = doc.duration(spec["duration"], f"{field}.duration")
    max_interval = base.max_interval
    if spec.get("maxInterval") not in (None, ""):
        max_interval = doc.duration(spec["maxInterval"], f"{field}.maxInterval")
        if max_interval <= 0:
            raise doc.error(f"{field}.maxInterval", "must be greater than zero")
    max_retries = base.max_retries
    if spec.get("maxRetries") is not None:
        max_retries = doc.integer(spec["maxRetries"], f"{field}.maxRetries")
        if max_retries < -1:
            raise doc.error(
                f"{field}.maxRetries", f"must be -1 (retry forever) or more, got {max_retries}"
            )
    matching = doc.mapping(spec.get("matching"), f"{field}.matching")
    doc.unknown_keys(matching, frozenset({"httpStatusCodes", "gRPCStatusCodes"}), field)
    http_codes = _code_ranges(
        doc, matching.get("httpStatusCodes"), f"{field}.matching.httpStatusCodes", 100, 599
    )
    grpc_codes = _code_ranges(
        doc, matching.get("gRPCStatusCodes"), f"{field}.matching.gRPCStatusCodes", 0, 16
    )
    return Retry(
        policy,
        duration=duration,
        max_interval=max_interval,
        max_retries=max_retries,
        name=name,
        max_elapsed=_EXPONENTIAL_MAX_ELAPSED if policy == "exponential" else None,
        http_codes=http_codes,
        grpc_codes=grpc_codes,
    )


def _parse_breaker(doc: _Doc, name: str, raw: object, field: str) -> BreakerSpec:
    spec = doc.mapping(raw, field)
    doc.unknown_keys(spec, _BREAKER_KEYS, field)
    max_requests = 1
    if spec.get("maxRequests") is not None:
        max_requests = doc.integer(spec["maxRequests"], f"{field}.maxRequests")
        if max_requests < 0:
            raise doc.error(f"{field}.maxRequests", f"must not be negative, got {max_requests}")
        max_requests = max_requests or 1  # gobreaker: 0 means 1
    interval = 0.0
    if spec.get("interval") not in (None, ""):
        interval = doc.duration(spec["interval"], f"{field}.interval")
    timeout = 60.0
    if spec.get("timeout") not in (None, ""):
        timeout = doc.duration(spec["timeout"], f"{field}.timeout") or 60.0
    expression = doc.string(spec.get("trip"), f"{field}.trip").strip() or DEFAULT_TRIP
    try:
        trip = compile_trip(expression)
    except TripError as exc:
        raise doc.error(f"{field}.trip", str(exc)) from None
    return BreakerSpec(
        name,
        max_requests=max_requests,
        interval=interval,
        timeout=timeout,
        trip_expression=expression,
        trip=trip,
    )


def _parse_names(
    doc: _Doc, raw: object, field: str, allowed: frozenset[str], *, actor: bool = False
) -> _Target:
    spec = doc.mapping(raw, field)
    doc.unknown_keys(spec, allowed, field)
    cache_size = 0
    if spec.get("circuitBreakerCacheSize") is not None:
        cache_size = doc.integer(
            spec["circuitBreakerCacheSize"], f"{field}.circuitBreakerCacheSize"
        )
        if cache_size < 0:
            raise doc.error(f"{field}.circuitBreakerCacheSize", "must not be negative")
    names = _Names(
        timeout=doc.string(spec.get("timeout"), f"{field}.timeout").strip(),
        retry=doc.string(spec.get("retry"), f"{field}.retry").strip(),
        breaker=doc.string(spec.get("circuitBreaker"), f"{field}.circuitBreaker").strip(),
        cache_size=cache_size,
    )
    if actor:
        scope = doc.string(spec.get("circuitBreakerScope"), f"{field}.circuitBreakerScope")
        scope = scope.strip()
        if names.breaker and not scope:
            raise doc.error(
                f"{field}.circuitBreakerScope",
                "actor circuit breakers must include scope (type, id or both)",
            )
        if scope and scope not in ("type", "id", "both"):
            raise doc.error(
                f"{field}.circuitBreakerScope",
                f"unknown circuit breaker scope {scope!r} (type, id or both)",
            )
        names = replace(names, scope=scope)
    return _Target(names, doc.file, doc.document, field)


class _Tables(TypedDict):
    """What the documents read so far define, by name; a later name replaces an earlier one."""

    timeouts: dict[str, float]
    retries: dict[str, Retry]
    breakers: dict[str, BreakerSpec]
    apps: dict[str, _Target]
    actors: dict[str, _Target]
    components: dict[str, _ComponentTarget]


def _read_policies(doc: _Doc, policies: Mapping[str, Any], tables: _Tables) -> None:
    prefix = "spec.policies"
    for name, value, field in doc.entries(policies, "timeouts", prefix):
        tables["timeouts"][name] = doc.duration(value, field)
    for name, value, field in doc.entries(policies, "retries", prefix):
        retry = _parse_retry(doc, name, value, field)
        if name in _PROTECTED:
            log.warning(
                "%s: %s: the built-in policy cannot be overridden; ignored", doc.file, field
            )
            continue
        if name in BUILTIN_POLICIES and retry.max_retries < _BUILTIN_MIN_RETRIES:
            log.warning(
                "%s: %s: fewer than %d retries for a built-in policy; using %d",
                doc.file,
                field,
                _BUILTIN_MIN_RETRIES,
                _BUILTIN_MIN_RETRIES,
            )
            retry = replace(retry, max_retries=_BUILTIN_MIN_RETRIES)
        tables["retries"][name] = retry
    for name, value, field in doc.entries(policies, "circuitBreakers", prefix):
        tables["breakers"][name] = _parse_breaker(doc, name, value, field)


def _read_targets(doc: _Doc, targets: Mapping[str, Any], tables: _Tables) -> None:
    prefix = "spec.targets"
    for name, value, field in doc.entries(targets, "apps", prefix):
        tables["apps"][name] = _parse_names(doc, value, field, _APP_KEYS)
    for name, value, field in doc.entries(targets, "actors", prefix):
        tables["actors"][name] = _parse_names(doc, value, field, _ACTOR_KEYS, actor=True)
    for name, value, field in doc.entries(targets, "components", prefix):
        entry = doc.mapping(value, field)
        doc.unknown_keys(entry, frozenset({"inbound", "outbound"}), field)
        tables["components"][name] = _ComponentTarget(
            inbound=_parse_names(doc, entry.get("inbound"), f"{field}.inbound", _NAMES_KEYS),
            outbound=_parse_names(doc, entry.get("outbound"), f"{field}.outbound", _NAMES_KEYS),
        )


def _check_targets(tables: _Tables) -> None:
    """Every policy a target names must be defined by some document (or be built in)."""
    retries = {**BUILTIN_POLICIES, **tables["retries"]}
    targets = [*tables["apps"].values(), *tables["actors"].values()]
    for c in tables["components"].values():
        targets += (c.inbound, c.outbound)
    for t in targets:
        _check_refs(t, tables["timeouts"], retries, tables["breakers"])


class Resiliency:
    """Every Resiliency document that applies to this app, merged, with lookups per target.

    Lookups are dict hits after the first call for a name and return the same Policy each time
    (its breaker state must persist); a target nothing applies to is None, so call sites can
    skip the runner entirely.
    """

    def __init__(
        self,
        *,
        names: tuple[str, ...] = (),
        timeouts: Mapping[str, float] | None = None,
        retries: Mapping[str, Retry] | None = None,
        breakers: Mapping[str, BreakerSpec] | None = None,
        apps: Mapping[str, _Target] | None = None,
        actors: Mapping[str, _Target] | None = None,
        components: Mapping[str, _ComponentTarget] | None = None,
        observer: Observer | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self.names = names
        # daprd labels every policy with the name of the last document it decoded.
        self._label = names[-1] if names else ""
        self._timeouts = dict(timeouts or {})
        self._retries: dict[str, Retry] = dict(BUILTIN_POLICIES)
        self._retries.update(retries or {})
        self._breakers = dict(breakers or {})
        self._observer = observer
        # What every policy made here shares; only _resolve's are given the observer.
        new_policy = partial(Policy, resiliency=self._label, clock=clock)
        self._new_policy = new_policy if sleep is None else partial(new_policy, sleep=sleep)
        # daprd records no metrics for built-in policies: they get no observer.
        self._builtin = {
            name: self._new_policy(name, name, "", retry=self._retries[name])
            for name in BUILTIN_POLICIES
        }

        self._apps: dict[str, Policy | None] = {
            app: self._resolve(app, f"app_{app}", "outbound", t.names, _ENDPOINT_CACHE)
            for app, t in (apps or {}).items()
        }
        self._actors: dict[str, Policy | None] = {
            actor: self._resolve(actor, f"actor_{actor}", "outbound", t.names, _ACTOR_CACHE)
            for actor, t in (actors or {}).items()
        }
        # daprd: a component listed under targets uses only what it lists, in both directions.
        self._component_targets = dict(components or {})
        self._components: dict[tuple[str, str, str], Policy | None] = {}

        self._app_default = self._defaults(("App",))
        self._actor_default = self._defaults(("Actor",))
        self._component_defaults: dict[tuple[str, str], _Names] = {}
        self._defaulted: OrderedDict[tuple[str, str], Policy] = OrderedDict()

    # --- construction -----------------------------------------------------------------------------

    @classmethod
    def empty(cls) -> Resiliency:
        """No documents: only the built-in retries."""
        return cls()

    @classmethod
    def from_documents(
        cls,
        docs: Iterable[tuple[str, Mapping[str, Any]]],
        *,
        app_id: str,
        observer: Observer | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> Resiliency:
        """Parse and merge `(source, document)` pairs; later names replace earlier ones.

        A document whose `scopes` leaves this app out is skipped unread. Bad input, including a
        target naming a policy no document defines, raises ManifestError with the field path.
        """
        names: list[str] = []
        tables = _Tables(timeouts={}, retries={}, breakers={}, apps={}, actors={}, components={})
        for source, raw in docs:
            doc = _Doc(source)
            body = doc.mapping(raw, "")
            scopes = body.get("scopes")
            if scopes is not None and not isinstance(scopes, list | tuple):
                raise doc.error("scopes", f"expected a list of app ids, got {scopes!r}")
            if scopes and app_id not in [str(s) for s in scopes]:
                continue
            meta = doc.mapping(body.get("metadata"), "metadata")
            names.append(doc.string(meta.get("name"), "metadata.name"))
            spec = doc.mapping(body.get("spec"), "spec")
            _read_policies(doc, doc.mapping(spec.get("policies"), "spec.policies"), tables)
            _read_targets(doc, doc.mapping(spec.get("targets"), "spec.targets"), tables)
        _check_targets(tables)
        return cls(names=tuple(names), observer=observer, clock=clock, sleep=sleep, **tables)

    def _resolve(
        self, name: str, target: str, direction: str, names: _Names, cache: int
    ) -> Policy | None:
        if names.empty:
            return None
        timeout = self._timeouts.get(names.timeout) if names.timeout else None
        retry = self._retries.get(names.retry) if names.retry else None
        breaker = self._breakers.get(names.breaker) if names.breaker else None
        if (timeout is None or timeout <= 0) and retry is None and breaker is None:
            return None
        keyed = names.scope in ("id", "both")
        return self._new_policy(
            name,
            target,
            direction,
            timeout=timeout,
            retry=retry,
            breaker=breaker,
            per_key_breakers=(names.cache_size or cache) if keyed else 0,
            observer=self._observer,
        )

    def _defaults(self, levels: tuple[str, ...]) -> _Names | None:
        """daprd's getDefaultPolicy: per kind, the most specific Default<level>*Policy defined."""

        def pick(kind: str, table: Mapping[str, object]) -> str:
            for level in (*levels, ""):
                name = f"Default{level}{kind}Policy"
                if name in table:
                    return name
            return ""

        names = _Names(
            timeout=pick("Timeout", self._timeouts),
            retry=pick("Retry", self._retries),
            breaker=pick("CircuitBreaker", self._breakers),
        )
        return None if names.empty else names

    def _defaulted_policy(
        self, key: tuple[str, str], target: str, direction: str, names: _Names, scope: str = ""
    ) -> Policy | None:
        cache = self._defaulted
        policy = cache.get(key)
        if policy is not None:
            cache.move_to_end(key)
            return policy
        policy = self._resolve(key[1], target, direction, replace(names, scope=scope), 0)
        if policy is None:
            return None
        cache[key] = policy
        if len(cache) > _DEFAULTED_CACHE:
            cache.popitem(last=False)
        return policy

    # --- lookups ----------------------------------------------------------------------------------

    def app(self, app_id: str) -> Policy | None:
        """Policy for invoking `app_id`: its target, else the Default*App* policies, else None."""
        return self._named(self._apps, self._app_default, "app", app_id)

    def actor(self, actor_type: str) -> Policy | None:
        """Policy for calling actors of `actor_type`; `for_key(actor_id)` for id-scoped breakers."""
        return self._named(self._actors, self._actor_default, "actor", actor_type)

    def _named(
        self, listed: Mapping[str, Policy | None], default: _Names | None, kind: str, name: str
    ) -> Policy | None:
        """An app's or actor type's policy: its target if listed, else its Default* policies."""
        if name in listed:
            return listed[name]
        if default is None:
            return None
        return self._defaulted_policy((kind, name), f"{kind}_{name}", "outbound", default)

    def component_outbound(self, name: str, kind: str) -> Policy | None:
        """Policy for calls into component `name` of category `kind` ("state", "pubsub", ...)."""
        return self._component(name, kind, "outbound")

    def component_inbound(self, name: str, kind: str) -> Policy | None:
        """Policy for delivering what component `name` produced (events, messages) to the app."""
        return self._component(name, kind, "inbound")

    def _component(self, name: str, kind: str, direction: str) -> Policy | None:
        key = (name, kind, direction)
        components = self._components
        if key in components:
            return components[key]
        kind = kind.split(".", 1)[0]  # "state.redis" works as well as "state"
        ctype = COMPONENT_TYPES.get(kind, kind[:1].upper() + kind[1:])
        label = f"{ctype}_{name}"
        explicit = self._component_targets.get(name)
        if explicit is not None:
            t = explicit.inbound if direction == "inbound" else explicit.outbound
            policy = self._resolve(name, label, direction, t.names, 0)
        else:
            dkey = (ctype, direction)
            if dkey not in self._component_defaults:
                cap = direction.capitalize()
                found = self._defaults((f"{ctype}Component{cap}", f"Component{cap}", "Component"))
                self._component_defaults[dkey] = found or _Names()
            names = self._component_defaults[dkey]
            policy = None if names.empty else self._resolve(name, label, direction, names, 0)
        # Components are few and named by the runtime, so this dict stays small.
        components[key] = policy
        return policy

    def builtin(self, name: str) -> Policy:
        """One of daprd's built-in retry policies, or the manifest's retries entry of that name."""
        try:
            return self._builtin[name]
        except KeyError:
            raise KeyError(f"unknown built-in resiliency policy {name!r}") from None


def _check_refs(
    target: _Target,
    timeouts: Mapping[str, float],
    retries: Mapping[str, Retry],
    breakers: Mapping[str, BreakerSpec],
) -> None:
    n = target.names
    for key, value, table, what in (
        ("timeout", n.timeout, timeouts, "timeout"),
        ("retry", n.retry, retries, "retry"),
        ("circuitBreaker", n.breaker, breakers, "circuit breaker"),
    ):
        if value and value not in table:
            raise ManifestError(
                target.file,
                target.document,
                f"{target.path}.{key}",
                f"unknown {what} policy {value!r}",
            )
