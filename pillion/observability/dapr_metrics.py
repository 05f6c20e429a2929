"""Dapr's metric set as daprd exports it (names, labels, buckets) and the hot-path recorders.

Names, label names and label values follow daprd's OpenCensus views (pkg/diagnostics) as the
contrib Prometheus exporter writes them: namespace "dapr", view name with "/" and "." turned
into "_", Count views as counters without a "_total" suffix of their own, distributions as
histograms whose buckets follow OpenCensus (a value equal to a bound counts in the next bucket),
label pairs sorted by name, an absent tag written as an empty label.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from pillion.observability.metrics import Counter, Histogram, Registry, _Family

__all__ = [
    "APP_HEALTH_CHECK_METHOD",
    "CIRCUIT_BREAKER_STATES",
    "DEFAULT_LATENCY_BUCKETS",
    "SIZE_BUCKETS",
    "DaprMetrics",
    "grpc_status_name",
    "legacy_path_label",
]

_log = logging.getLogger("pillion.observability.dapr_metrics")

# daprd's defaultLatencyDistribution (milliseconds) and defaultSizeDistribution (bytes).
DEFAULT_LATENCY_BUCKETS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25, 30, 40, 50, 65, 80, 100, 130, 160, 200, 250,
    300, 400, 500, 650, 800, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000,
)  # fmt: skip
SIZE_BUCKETS: tuple[int, ...] = (
    1 << 10, 2 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20,
    64 << 20, 256 << 20, 1 << 30, 4 << 30,
)  # fmt: skip
_SIZE = [float(b) for b in SIZE_BUCKETS]

# The gRPC health probe goes through the client interceptor; daprd records it as a probe.
APP_HEALTH_CHECK_METHOD = "/dapr.proto.runtime.v1.AppCallbackHealthCheck/HealthCheck"
# pkg/resiliency/breaker states, in the order daprd records the cb_state gauges.
CIRCUIT_BREAKER_STATES = ("closed", "half-open", "open", "unknown")

# daprd writes status.Code(err).String(): Go's names, which differ from Python's enum names.
_GO_GRPC_CODES = (
    "OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
    "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted",
    "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated",
)  # fmt: skip
_GRPC_NAMES: dict[str, str] = {name: name for name in _GO_GRPC_CODES}
_GRPC_NAMES.update({str(i): name for i, name in enumerate(_GO_GRPC_CODES)})
_GRPC_NAMES.update({re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper(): name for name in _GO_GRPC_CODES})
_GRPC_NAMES["CANCELLED"] = "Canceled"  # grpc.StatusCode spells it with two l's

# daprd's invocation `type` is the call shape, not the protocol; a protocol name means unary.
_INVOKE_TYPES = {"http": "unary", "grpc": "unary"}

# Recorder caches map raw call arguments to series state; a flood of distinct paths must not
# grow them without bound, so each is simply emptied when it reaches this size.
_CACHE_LIMIT = 4096

_SLASHES = re.compile(r"/{2,}")
# Dapr's own API versions: patterns under these are Dapr routes, not app methods.
_DAPR_VERSIONS = frozenset({"v1.0", "v1.0-alpha1", "v1.0-beta1"})
_WILDCARD = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}\Z")
_REST_WILDCARD = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\.\.\.\}\Z")

_Bundle = tuple[list[float], ...]
_Calls = tuple[Counter, Histogram, Histogram, Histogram]


def grpc_status_name(status: str) -> str:
    """Dapr's label for a gRPC status: Go's code name ("NotFound") from any common spelling."""
    return _GRPC_NAMES.get(status, status)


def legacy_path_label(path: str) -> str:
    """daprd's convertPathToMetricLabel: drop state/secret keys, mask actor and workflow ids.

    It is what daprd records in the `path` label with increasedCardinality (its default),
    e.g. /v1.0/state/store/key -> /v1.0/state/store, /v1.0/actors/T/1/method/m ->
    /v1.0/actors/T/{id}/method.
    """
    if not path:
        return path
    slash = "/" if path[0] == "/" else ""
    parts = path[len(slash) :].split("/", 5)
    if len(parts) < 3:
        return path
    if parts[0] == "actors":  # app callback: actors/<type>/<id>/method/<name>
        parts[2] = "{id}"
        return slash + "/".join(parts)
    api = parts[1]
    if api in ("state", "secrets"):
        return "/" + "/".join(parts[:3])
    if api == "actors":
        if len(parts) < 5:
            return path
        parts[3] = "{id}"
        return "/" + "/".join(parts[:5])
    if api == "workflows":
        if len(parts) < 4:
            return path
        if len(parts) == 4:
            parts[3] = "{instanceId}"
            return "/" + "/".join(parts)
        if len(parts) == 5 and parts[4].startswith("start"):
            return "/" + "/".join(parts[:4]) + "/start"  # keeps the workflow name
        parts[3] = "{instanceId}"
        if len(parts) == 6 and parts[4] == "raiseEvent" and parts[5]:
            parts[5] = "{eventName}"
            return "/" + "/".join(parts)
        return "/" + "/".join(parts[:5])
    return path


# ---- http.pathMatching: the subset of Go 1.22 ServeMux patterns daprd relies on -------------

_EXACT, _SLASH, _SUBTREE = 0, 1, 2


@dataclass(frozen=True, slots=True)
class _Pattern:
    label: str
    segments: tuple[str | None, ...]  # None is a {wildcard}
    tail: int
    rank: tuple[int, ...]


def _compile_pattern(raw: object, field: str) -> _Pattern:
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"{field}: expected a non-empty path pattern, got {raw!r}")
    text = raw.strip()
    if any(c.isspace() for c in text):
        raise ValueError(f"{field}: {raw!r}: method or host prefixes are not supported")
    # daprd normalises patterns the way it normalises request paths: one leading slash.
    label = _SLASHES.sub("/", text if text.startswith("/") else "/" + text)
    parts = label[1:].split("/") if label != "/" else []
    tail = _EXACT
    if parts and parts[-1] == "":
        parts.pop()
        tail = _SUBTREE
    elif parts and parts[-1] == "{$}":
        parts.pop()
        tail = _SLASH
    elif parts and _REST_WILDCARD.match(parts[-1]):
        parts.pop()
        tail = _SUBTREE
    if label == "/":
        tail = _SUBTREE
    segments: list[str | None] = []
    for part in parts:
        if _WILDCARD.match(part):
            segments.append(None)
        elif "{" in part or "}" in part:
            raise ValueError(f"{field}: {raw!r}: a wildcard must be a whole segment like {{id}}")
        else:
            segments.append(part)
    # More specific wins, as in ServeMux: a literal beats a wildcard at the first difference,
    # and a longer pattern beats a subtree pattern that ends where it continues.
    rank = (*(1 if s is None else 2 for s in segments), 0 if tail == _SUBTREE else 3)
    return _Pattern(label, tuple(segments), tail, rank)


def _compile_patterns(patterns: Sequence[object], field: str) -> list[_Pattern]:
    if isinstance(patterns, str | bytes) or not isinstance(patterns, Sequence):
        raise ValueError(f"{field}: expected a list of path patterns, got {patterns!r}")
    compiled: dict[str, _Pattern] = {}
    for i, raw in enumerate(patterns):
        pattern = _compile_pattern(raw, f"{field}[{i}]")
        compiled.setdefault(pattern.label, pattern)
    # daprd also registers every app route under service invocation, so
    # /orders/{id} matches /v1.0/invoke/<any app>/method/orders/7.
    for pattern in list(compiled.values()):
        first = pattern.label[1:].split("/", 1)[0]
        if pattern.label != "/" and first not in _DAPR_VERSIONS:
            invoke = "/v1.0/invoke/{app_id}/method" + pattern.label
            if invoke not in compiled:
                compiled[invoke] = _compile_pattern(invoke, field)
    return list(compiled.values())


class _PathMatcher:
    __slots__ = ("_patterns",)

    def __init__(self, patterns: list[_Pattern]) -> None:
        self._patterns = patterns

    def match(self, path: str) -> str | None:
        """The most specific pattern matching `path` (a cleaned path), or None."""
        segs = path[1:].split("/")
        best: _Pattern | None = None
        for p in self._patterns:
            n = len(p.segments)
            if p.tail == _EXACT:
                if len(segs) != n:
                    continue
            elif p.tail == _SLASH:
                if len(segs) != n + 1 or segs[n]:
                    continue
            elif len(segs) <= n:
                continue
            for want, got in zip(p.segments, segs, strict=False):
                if want is None:
                    if not got:
                        break
                elif want != got:
                    break
            else:
                if best is None or p.rank > best.rank:
                    best = p
        return None if best is None else best.label


class _PathLabels:
    """The `path` label daprd records, from http.increasedCardinality and http.pathMatching."""

    __slots__ = ("_increased", "_matcher")

    def __init__(self, increased_cardinality: bool, patterns: list[_Pattern]) -> None:
        self._increased = increased_cardinality
        self._matcher = _PathMatcher(patterns) if patterns else None

    @staticmethod
    def _clean(path: str) -> str:
        for sep in ("?", "#"):
            cut = path.find(sep)
            if cut >= 0:
                path = path[:cut]
        if "%" in path:
            path = unquote(path)  # daprd labels r.URL.Path, which is decoded
        if path and not path.startswith("/"):
            path = "/" + path
        if "//" in path:
            path = _SLASHES.sub("/", path)
        return path

    def label(self, path: str, client: bool) -> str:
        path = self._clean(path)
        if not path:
            return ""
        if self._matcher is not None:
            hit = self._matcher.match(path)
            if hit is not None:
                return hit
            if self._increased:
                return path  # pathMatching with high cardinality keeps unmatched paths as is
        elif self._increased:
            return legacy_path_label(path)
        # Low cardinality: unmatched paths collapse into "". Dapr's own callbacks to the app
        # (/dapr/config, /dapr/subscribe) are a fixed set, and daprd keeps them.
        if client and path.startswith("/dapr/"):
            return path
        return ""


# ---- series state: per-argument bundles of state lists and the hot-path updates ------------


def _bundle(
    cache: dict[Any, _Bundle], key: object, parts: Sequence[tuple[_Family, tuple[str, ...]]]
) -> _Bundle:
    """The state lists for `parts`, cached under `key` unless a series was refused."""
    cells = []
    complete = True
    for family, labels in parts:
        cell = family.state(labels)
        if cell is None:  # over the series cap: record into a throwaway, every time
            complete = False
            cell = family.blank_state()
        cells.append(cell)
    bundle = tuple(cells)
    if complete:
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[key] = bundle
    return bundle


def _record_latency(b: _Bundle, bounds: list[float], latency_ms: float) -> None:
    """Count one call in b[0] and observe its latency in the histogram b[1]."""
    b[0][0] += 1
    h = b[1]
    h[bisect_right(bounds, latency_ms) + 1] += 1
    h[0] += latency_ms


def _record_call(
    b: _Bundle, bounds: list[float], latency_ms: float, first_bytes: int, second_bytes: int
) -> None:
    """Count one call in b[0], its latency in b[1] and its two sizes in b[2] and b[3]."""
    b[0][0] += 1
    h = b[1]
    h[bisect_right(bounds, latency_ms) + 1] += 1
    h[0] += latency_ms
    h = b[2]
    h[bisect_right(_SIZE, first_bytes) + 1] += 1
    h[0] += first_bytes
    h = b[3]
    h[bisect_right(_SIZE, second_bytes) + 1] += 1
    h[0] += second_bytes


class _Component:
    """A component kind's operation count and latency, with its recorder's series cache."""

    __slots__ = ("_bounds", "_cache", "_count", "_latency")

    def __init__(self, count: Counter, latency: Histogram) -> None:
        self._count = count
        self._latency = latency
        self._bounds = list(latency.bounds)
        self._cache: dict[Any, _Bundle] = {}

    def record(self, key: tuple[str | bool, ...], latency_ms: float) -> None:
        """One operation; key is the label values in order, success as a bool."""
        b = self._cache.get(key)
        if b is None:
            labels = tuple("true" if v is True else "false" if v is False else v for v in key)
            b = _bundle(self._cache, key, ((self._count, labels), (self._latency, labels)))
        b[0][0] += 1
        if latency_ms > 0:  # daprd skips the latency of a zero-length operation
            h = b[1]
            h[bisect_right(self._bounds, latency_ms) + 1] += 1
            h[0] += latency_ms


def _no_op(*args: object, **kwargs: object) -> None:
    """What every recorder becomes when metrics are disabled."""


_RECORDERS = (
    "http_server",
    "http_client",
    "health_probe",
    "grpc_server",
    "grpc_client",
    "invoke_req_sent",
    "invoke_res_recv",
    "invoke_req_recv",
    "invoke_res_sent",
    "component_state",
    "pubsub_egress",
    "pubsub_ingress",
    "input_binding",
    "output_binding",
    "secret",
    "configuration",
    "component_loaded",
    "component_init",
    "component_init_fail",
    "resiliency_loaded",
    "resiliency_executed",
    "resiliency_activation",
    "resiliency_cb_state",
    "error_code",
)


class DaprMetrics:
    """daprd's Prometheus metrics for one sidecar; app_id and namespace are added here.

    Every recorder looks its arguments up in a small cache of precomputed series state, so
    the common case is one dict lookup plus a few indexed adds; label strings are only built
    for a new argument combination, and text only in render(). Latencies are milliseconds.
    """

    def __init__(
        self,
        app_id: str,
        namespace: str = "",
        *,
        buckets: Sequence[float] | None = None,
        increased_cardinality: bool = True,
        path_matching: Sequence[str] = (),
        exclude_verbs: bool = False,
        record_error_codes: bool = False,
        enabled: bool = True,
        max_series: int = 10_000,
    ) -> None:
        self.app_id = app_id
        self.namespace = namespace
        self.enabled = enabled
        self.record_error_codes = record_error_codes
        self._exclude_verbs = exclude_verbs
        self._paths = _PathLabels(
            increased_cardinality, _compile_patterns(path_matching, "path_matching")
        )
        self.registry = r = Registry(const_labels={"app_id": app_id}, max_series=max_series)
        lat_buckets = DEFAULT_LATENCY_BUCKETS if buckets is None else buckets
        ns = {"namespace": namespace}

        def latency(
            name: str, help: str, labels: Sequence[str], const: Mapping[str, str] | None = None
        ) -> Histogram:
            return r.histogram(
                name, help, labels, lat_buckets, const_labels=const, upper_inclusive=False
            )

        def size(name: str, help: str, labels: Sequence[str]) -> Histogram:
            return r.histogram(name, help, labels, SIZE_BUCKETS, upper_inclusive=False)

        def probe(prefix: str, status: str, latency_help: str) -> tuple[Counter, Histogram]:
            """<prefix>completed_count and <prefix>roundtrip_latency, labelled by status."""
            return (
                r.counter(
                    prefix + "completed_count", "Count of completed health probes", (status,)
                ),
                latency(prefix + "roundtrip_latency", latency_help, (status,)),
            )

        http = ("method", "path", "status")
        self._http_server_request_count = r.counter(
            "dapr_http_server_request_count",
            "Count of HTTP requests processed by the server.",
            http,
        )
        self._http_server_response_count = r.counter(
            "dapr_http_server_response_count", "The number of HTTP responses", http
        )
        self._http_server_latency = latency(
            "dapr_http_server_latency", "HTTP request end-to-end latency in server.", http
        )
        self._http_server_request_bytes = size(
            "dapr_http_server_request_bytes",
            "HTTP request body size if set as ContentLength (uncompressed) in server.",
            (),
        )
        self._http_server_response_bytes = size(
            "dapr_http_server_response_bytes",
            "HTTP response body size (uncompressed) in server.",
            (),
        )
        self._http_client_sent_bytes = size(
            "dapr_http_client_sent_bytes",
            "Total bytes sent in request body (not including headers)",
            http,
        )
        self._http_client_received_bytes = size(
            "dapr_http_client_received_bytes",
            "Total bytes received in response bodies (not including headers but including "
            "error responses with bodies)",
            (),
        )
        self._http_client_latency = latency(
            "dapr_http_client_roundtrip_latency",
            "Time between first byte of request headers sent to last byte of response "
            "received, or terminal error",
            http,
        )
        self._http_client_completed = r.counter(
            "dapr_http_client_completed_count", "Count of completed requests", http
        )
        self._http_probe = probe(
            "dapr_http_healthprobes_",
            "status",
            "Time between first byte of health probes headers sent to last byte of response "
            "received, or terminal error",
        )

        server = ("grpc_server_method", "grpc_server_status")
        client = ("grpc_client_method", "grpc_client_status")
        # (completed, latency, size, size): _grpc_bundle's order, sizes as the recorder takes them.
        self._grpc_server: _Calls = (
            r.counter(
                "dapr_grpc_io_server_completed_rpcs",
                "Distribution of bytes sent per RPC, by method.",  # sic, daprd's text
                server,
            ),
            latency(
                "dapr_grpc_io_server_server_latency",
                "Time between first byte of request received to last byte of response sent, or "
                "terminal error.",
                server,
            ),
            size(
                "dapr_grpc_io_server_received_bytes_per_rpc",
                "Total bytes received across all messages per RPC.",
                server[:1],
            ),
            size(
                "dapr_grpc_io_server_sent_bytes_per_rpc",
                "Total bytes sent in across all response messages per RPC.",
                server[:1],
            ),
        )
        self._grpc_client: _Calls = (
            r.counter(
                "dapr_grpc_io_client_completed_rpcs", "Count of RPCs by method and status.", client
            ),
            latency(
                "dapr_grpc_io_client_roundtrip_latency",
                "Time between first byte of request sent to last byte of response received, or "
                "terminal error.",
                client,
            ),
            size(
                "dapr_grpc_io_client_sent_bytes_per_rpc",
                "Total bytes sent across all request messages per RPC.",
                client[:1],
            ),
            size(
                "dapr_grpc_io_client_received_bytes_per_rpc",
                "Total bytes received across all response messages per RPC.",
                client[:1],
            ),
        )
        self._grpc_probe = probe(
            "dapr_grpc_io_healthprobes_",
            "grpc_client_status",
            "Time between first byte of health probes sent to last byte of response received, "
            "or terminal error",
        )

        si = "dapr_runtime_service_invocation_"

        def invocation(name: str, what: str, labels: Sequence[str]) -> Counter:
            return r.counter(
                f"{si}{name}_total", f"The number of {what} via service invocation.", labels
            )

        self._si_req_sent = invocation("req_sent", "requests sent", ("dst_app_id", "type"))
        self._si_req_recv = invocation("req_recv", "requests received", ("src_app_id",))
        self._si_res_sent = invocation("res_sent", "responses sent", ("dst_app_id", "status"))
        self._si_res_recv = invocation(
            "res_recv", "responses received", ("src_app_id", "status", "type")
        )
        self._si_res_recv_latency = latency(
            si + "res_recv_latency_ms",
            "The latency of service invocation response.",
            ("src_app_id", "status"),
        )

        def component(kind: str, what: str, latency_help: str, labels: Sequence[str]) -> _Component:
            return _Component(
                r.counter(f"dapr_component_{kind}_count", what, labels, const_labels=ns),
                latency(f"dapr_component_{kind}_latencies", latency_help, labels, ns),
            )

        op = ("component", "operation", "success")
        self._state = component(
            "state",
            "The number of operations performed on the state component.",
            "The latency of the response from the state component.",
            op,
        )
        self._egress = component(
            "pubsub_egress",
            "The number of outgoing messages published to the pub/sub component.",
            "The latency of the response from the pub/sub component.",
            ("component", "success", "topic"),
        )
        self._ingress = component(
            "pubsub_ingress",
            "The number of incoming messages arriving from the pub/sub component.",
            "The consuming app event processing latency.",
            ("component", "process_status", "status", "topic"),
        )
        self._input = component(
            "input_binding",
            "The number of incoming events arriving from the input binding component.",
            "The triggered app event processing latency.",
            ("component", "success"),
        )
        self._output = component(
            "output_binding",
            "The number of operations invoked on the output binding component.",
            "The latency of the response from the output binding component.",
            op,
        )
        self._secret = component(
            "secret",
            "The number of operations performed on the secret component.",
            "The latency of the response from the secret component.",
            op,
        )
        self._config = component(
            "configuration",
            "The number of operations performed on the configuration component.",
            "The latency of the response from the configuration component.",
            op,
        )

        self._component_loaded = r.counter(
            "dapr_runtime_component_loaded", "The number of successfully loaded components.", ()
        )
        self._component_init = r.counter(
            "dapr_runtime_component_init_total",
            "The number of initialized components.",
            ("component",),
        )
        self._component_init_fail = r.counter(
            "dapr_runtime_component_init_fail_total",
            "The number of component initialization failures.",
            ("component", "reason", "componentName"),
        )

        policy = ("name", "policy", "namespace", "flow_direction", "target", "status")
        self._resiliency_loaded = r.counter(
            "dapr_resiliency_loaded", "Number of resiliency policies loaded.", ("name", "namespace")
        )
        self._resiliency_count = r.counter(
            "dapr_resiliency_count",
            "Number of times a resiliency policyKey has been applied to a building block.",
            policy,
        )
        self._resiliency_activations = r.counter(
            "dapr_resiliency_activations_total",
            "Number of times a resiliency policyKey has been activated in a building block "
            "after a failure or after a state change.",
            policy,
        )
        self._resiliency_cb = r.gauge(
            "dapr_resiliency_cb_state",
            "A resiliency policy's current CircuitBreakerState state. 0 is closed, 1 is "
            "half-open, 2 is open, and -1 is unknown.",
            policy,
        )
        # daprd registers this view only with recordErrorCodes.
        self._error_codes: Counter | None = None
        if record_error_codes:
            self._error_codes = r.counter(
                "dapr_error_code_total",
                "Total number of times an error with a specific error code was encountered.",
                ("category", "error_code"),
            )

        self._lat = list(self._http_server_latency.bounds)
        self._c_http_server: dict[Any, _Bundle] = {}
        self._c_http_client: dict[Any, _Bundle] = {}
        self._c_probe: dict[Any, _Bundle] = {}
        self._c_grpc_server: dict[Any, _Bundle] = {}
        self._c_grpc_client: dict[Any, _Bundle] = {}
        self._c_invoke: dict[Any, _Bundle] = {}
        self._c_misc: dict[Any, _Bundle] = {}
        if not enabled:
            for name in _RECORDERS:
                setattr(self, name, _no_op)

    @classmethod
    def from_config(
        cls, app_id: str, namespace: str, metrics_spec: Mapping[str, Any] | None
    ) -> DaprMetrics:
        """Build from a Configuration's spec.metrics (or spec.metric) as parsed YAML.

        Raises ValueError naming the offending field, e.g.
        "spec.metrics.latencyDistributionBuckets: ...".
        """
        if metrics_spec is None:
            return cls(app_id, namespace)
        metrics_spec = _mapping(metrics_spec, "spec.metrics")
        enabled = _flag(metrics_spec, "enabled", True, "spec.metrics")
        record = _flag(metrics_spec, "recordErrorCodes", False, "spec.metrics")
        http = _mapping(metrics_spec.get("http"), "spec.metrics.http")
        increased = _flag(http, "increasedCardinality", True, "spec.metrics.http")
        exclude = _flag(http, "excludeVerbs", False, "spec.metrics.http")
        patterns = http.get("pathMatching")
        if patterns is None:
            patterns = []
        _compile_patterns(patterns, "spec.metrics.http.pathMatching")  # validate with names
        buckets = _buckets(metrics_spec.get("latencyDistributionBuckets"))
        if metrics_spec.get("rules"):
            _log.warning(
                "spec.metrics.rules (regex label rewriting) is not supported and is ignored; "
                "use spec.metrics.http.increasedCardinality: false or pathMatching instead"
            )
        return cls(
            app_id,
            namespace,
            buckets=buckets,
            increased_cardinality=increased,
            path_matching=patterns,
            exclude_verbs=exclude,
            record_error_codes=record,
            enabled=enabled,
        )

    def render(self) -> bytes:
        """The Prometheus text page (format 0.0.4) of everything recorded so far."""
        return self.registry.render()

    # ---- series lookup (the slow path, once per new argument combination) -------------------

    def _method(self, method: str) -> str:
        return "" if self._exclude_verbs else method

    def _http_server_bundle(self, key: tuple[str, str, int | str]) -> _Bundle:
        method, path, status = key
        labels = (self._method(method), self._paths.label(path, client=False), str(status))
        parts = (
            (self._http_server_request_count, labels),
            (self._http_server_latency, labels),
            (self._http_server_request_bytes, ()),
            (self._http_server_response_bytes, ()),
            (self._http_server_response_count, labels),  # last: _record_call does not count it
        )
        return _bundle(self._c_http_server, key, parts)

    def _http_client_bundle(self, key: tuple[str, str, int | str]) -> _Bundle:
        method, path, status = key
        method = self._method(method)
        path = self._paths.label(path, client=True)
        labels = (method, path, str(status))
        parts = (
            (self._http_client_completed, labels),
            (self._http_client_latency, labels),
            # daprd records sent bytes when the request starts, before any status exists.
            (self._http_client_sent_bytes, (method, path, "")),
            (self._http_client_received_bytes, ()),
        )
        return _bundle(self._c_http_client, key, parts)

    @staticmethod
    def _grpc_bundle(cache: dict[Any, _Bundle], key: tuple[str, str], families: _Calls) -> _Bundle:
        method, status = key
        labels = (method, grpc_status_name(status))
        count, lat, first, second = families
        parts = ((count, labels), (lat, labels), (first, labels[:1]), (second, labels[:1]))
        return _bundle(cache, key, parts)

    def _count_policy(self, family: Counter, key: tuple[int, str, str, str, str, str]) -> None:
        """Add one to `family`; key is (tag, name, policy, flow_direction, target, status)."""
        b = self._c_misc.get(key)
        if b is None:
            _, name, policy, direction, target, status = key
            labels = (name, policy, self.namespace, direction, target, status)
            b = _bundle(self._c_misc, key, ((family, labels),))
        b[0][0] += 1

    # ---- recorders (the hot path) ----------------------------------------------------------

    def http_server(
        self,
        method: str,
        path: str,
        status: int,
        latency_ms: float,
        req_bytes: int,
        resp_bytes: int,
    ) -> None:
        """One request served by the Dapr HTTP API (health endpoints included, as daprd does)."""
        key = (method, path, status)
        b = self._c_http_server.get(key)
        if b is None:
            b = self._http_server_bundle(key)
        _record_call(b, self._lat, latency_ms, req_bytes, resp_bytes)
        b[4][0] += 1  # dapr_http_server_response_count

    def http_client(
        self,
        method: str,
        path: str,
        status: int,
        latency_ms: float,
        sent_bytes: int,
        recv_bytes: int,
    ) -> None:
        """One sidecar-to-app HTTP call (dapr_http_client_*)."""
        key = (method, path, status)
        b = self._c_http_client.get(key)
        if b is None:
            b = self._http_client_bundle(key)
        _record_call(b, self._lat, latency_ms, sent_bytes, recv_bytes)

    def health_probe(self, protocol: str, status: str, latency_ms: float) -> None:
        """One app health probe; protocol "http" (status like "200") or "grpc" (a code name)."""
        key = (protocol, status)
        b = self._c_probe.get(key)
        if b is None:
            if protocol == "grpc":
                (count, lat), labels = self._grpc_probe, (grpc_status_name(status),)
            elif protocol == "http":
                (count, lat), labels = self._http_probe, (str(status),)
            else:
                raise ValueError(
                    f"health probe protocol must be 'http' or 'grpc', not {protocol!r}"
                )
            b = _bundle(self._c_probe, key, ((count, labels), (lat, labels)))
        _record_latency(b, self._lat, latency_ms)

    def grpc_server(
        self, method: str, status: str, latency_ms: float, recv_bytes: int, sent_bytes: int
    ) -> None:
        """One RPC served by the Dapr gRPC API; method is the full name, /pkg.Service/Method."""
        key = (method, status)
        b = self._c_grpc_server.get(key)
        if b is None:
            b = self._grpc_bundle(self._c_grpc_server, key, self._grpc_server)
        _record_call(b, self._lat, latency_ms, recv_bytes, sent_bytes)

    def grpc_client(
        self, method: str, status: str, latency_ms: float, sent_bytes: int, recv_bytes: int
    ) -> None:
        """One sidecar-to-app (or sidecar) RPC; the app health check counts as a probe."""
        if method == APP_HEALTH_CHECK_METHOD:
            self.health_probe("grpc", status, latency_ms)
            return
        key = (method, status)
        b = self._c_grpc_client.get(key)
        if b is None:
            b = self._grpc_bundle(self._c_grpc_client, key, self._grpc_client)
        _record_call(b, self._lat, latency_ms, sent_bytes, recv_bytes)

    def invoke_req_sent(self, dst_app_id: str, type: str = "unary") -> None:
        """Caller side: a request sent to another app; type is "unary" or "streaming"."""
        key = (1, dst_app_id, type)
        b = self._c_invoke.get(key)
        if b is None:
            labels = (dst_app_id, _INVOKE_TYPES.get(type, type))
            b = _bundle(self._c_invoke, key, ((self._si_req_sent, labels),))
        b[0][0] += 1

    def invoke_res_recv(
        self, dst_app_id: str, status: str, type: str = "unary", latency_ms: float = 0.0
    ) -> None:
        """Caller side: the callee's response; daprd labels the callee src_app_id here."""
        key = (2, dst_app_id, status, type)
        b = self._c_invoke.get(key)
        if b is None:
            status = str(status)
            type = _INVOKE_TYPES.get(type, type)
            parts: list[tuple[_Family, tuple[str, ...]]] = [
                (self._si_res_recv, (dst_app_id, status, type))
            ]
            if type == "unary":  # daprd has no latency for streamed responses
                parts.append((self._si_res_recv_latency, (dst_app_id, status)))
            b = _bundle(self._c_invoke, key, parts)
        if len(b) > 1:
            _record_latency(b, self._lat, latency_ms)
        else:
            b[0][0] += 1

    def invoke_req_recv(self, src_app_id: str) -> None:
        """Callee side: a request received from another app."""
        key = (3, src_app_id)
        b = self._c_invoke.get(key)
        if b is None:
            b = _bundle(self._c_invoke, key, ((self._si_req_recv, (src_app_id,)),))
        b[0][0] += 1

    def invoke_res_sent(self, src_app_id: str, status: str) -> None:
        """Callee side: the response sent back; daprd labels the caller dst_app_id here."""
        key = (4, src_app_id, status)
        b = self._c_invoke.get(key)
        if b is None:
            b = _bundle(self._c_invoke, key, ((self._si_res_sent, (src_app_id, str(status))),))
        b[0][0] += 1

    def component_state(
        self, component: str, operation: str, success: bool, latency_ms: float
    ) -> None:
        """One state store operation (get, set, delete, bulk_get, transaction, query, ...)."""
        self._state.record((component, operation, success), latency_ms)

    def pubsub_egress(self, component: str, topic: str, success: bool, latency_ms: float) -> None:
        """One publish to a pub/sub component."""
        self._egress.record((component, success, topic), latency_ms)

    def pubsub_ingress(
        self, component: str, topic: str, process_status: str, status: str, latency_ms: float
    ) -> None:
        """One delivery to the app; process_status success|retry|drop, status defaults to it."""
        self._ingress.record(
            (component, process_status, status or process_status, topic), latency_ms
        )

    def input_binding(self, component: str, success: bool, latency_ms: float) -> None:
        """One input binding event delivered to the app."""
        self._input.record((component, success), latency_ms)

    def output_binding(
        self, component: str, operation: str, success: bool, latency_ms: float
    ) -> None:
        """One output binding invocation."""
        self._output.record((component, operation, success), latency_ms)

    def secret(self, component: str, operation: str, success: bool, latency_ms: float) -> None:
        """One secret store operation (get, bulk_get)."""
        self._secret.record((component, operation, success), latency_ms)

    def configuration(
        self, component: str, operation: str, success: bool, latency_ms: float
    ) -> None:
        """One configuration store operation (get, subscribe, unsubscribe)."""
        self._config.record((component, operation, success), latency_ms)

    def component_loaded(self, count: int = 1) -> None:
        """`count` components loaded successfully (daprd adds one per component)."""
        self._component_loaded.inc((), count)

    def component_init(self, component: str) -> None:
        """A component initialised; component is its type, e.g. "state.redis"."""
        self._component_init.inc((component,))

    def component_init_fail(self, component: str, reason: str, name: str) -> None:
        """A component failed to initialise; name is the component's metadata.name."""
        self._component_init_fail.inc((component, reason, name))

    def resiliency_loaded(self, name: str, namespace: str) -> None:
        """A Resiliency resource loaded."""
        self._resiliency_loaded.inc((name, namespace))

    def resiliency_executed(
        self, name: str, policy: str, flow_direction: str, target: str, status: str = ""
    ) -> None:
        """A policy applied (dapr_resiliency_count); a circuit breaker's state sets cb_state.

        target is daprd's form: app_<id>, actor_<type>, <kind>_<component>.
        """
        key = (5, name, policy, flow_direction, target, status)
        self._count_policy(self._resiliency_count, key)
        if policy == "circuitbreaker" and status in CIRCUIT_BREAKER_STATES:
            self.resiliency_cb_state(name, flow_direction, target, status)

    def resiliency_activation(
        self, name: str, policy: str, flow_direction: str, target: str, status: str = ""
    ) -> None:
        """A policy activated after a failure or a state change."""
        key = (6, name, policy, flow_direction, target, status)
        self._count_policy(self._resiliency_activations, key)

    def resiliency_cb_state(self, name: str, flow_direction: str, target: str, status: str) -> None:
        """A circuit breaker's state: the gauge for `status` is 1, the other three 0."""
        key = (7, name, flow_direction, target)
        b = self._c_misc.get(key)
        if b is None:
            gauge = self._resiliency_cb
            b = _bundle(
                self._c_misc,
                key,
                [
                    (gauge, (name, "circuitbreaker", self.namespace, flow_direction, target, s))
                    for s in CIRCUIT_BREAKER_STATES
                ],
            )
        for cell, state in zip(b, CIRCUIT_BREAKER_STATES, strict=True):
            cell[0] = 1 if state == status else 0

    def error_code(self, category: str, code: str) -> None:
        """An API error with a Dapr error code; recorded only with recordErrorCodes."""
        counter = self._error_codes
        if counter is None or not category or not code:
            return  # daprd drops malformed codes too
        counter.inc((category, code))


def _flag(spec: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = spec.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{where}.{key}: expected true or false, got {value!r}")
    return value


def _mapping(value: object, field: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{field}: expected a mapping, got {value!r}")
    return value


def _buckets(value: object) -> list[int] | None:
    field = "spec.metrics.latencyDistributionBuckets"
    if value is None or value == []:
        return None  # daprd falls back to its default distribution
    if not isinstance(value, list):
        raise ValueError(f"{field}: expected a list of integers (milliseconds), got {value!r}")
    for i, b in enumerate(value):
        # daprd decodes these into []int: 2.5, "5" or true are errors there too.
        if type(b) is not int:
            raise ValueError(f"{field}[{i}]: expected an integer, got {b!r}")
        if b <= 0:
            raise ValueError(f"{field}[{i}]: bucket bounds must be positive, got {b}")
        if i and b <= value[i - 1]:
            raise ValueError(
                f"{field}[{i}]: bounds must be strictly increasing ({value[i - 1]}, {b})"
            )
    return list(value)
