"""Span exporters (OTLP over HTTP or gRPC, Zipkin v2 JSON, stdout) and their Dapr configuration.

Every exporter drops a batch it cannot deliver and says so at most once a minute: tracing must
never slow down or break the requests it observes.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import SplitResult, unquote, urlsplit

from pillion.durations import parse_duration
from pillion.observability.otlp import encode_export_request
from pillion.observability.tracing import KIND_NAMES, Span
from pillion.transport.client import HttpClient

__all__ = [
    "DEFAULT_TIMEOUT",
    "Exporter",
    "OtlpGrpcExporter",
    "OtlpHttpExporter",
    "StdoutExporter",
    "ZipkinExporter",
    "exporters_from_config",
    "parse_headers",
    "zipkin_json",
]

_log = logging.getLogger("pillion.observability.exporters")
STDOUT_LOGGER = "pillion.observability.stdout"

# Dapr's otel.timeout default (milliseconds in its Configuration), the OpenTelemetry default.
DEFAULT_TIMEOUT = 10.0
TRACE_SERVICE_EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_WARN_EVERY = 60.0
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class Exporter(Protocol):
    """Delivers batches of ended spans somewhere; never raises for delivery failures."""

    async def export(self, spans: Sequence[Span], service_name: str) -> None: ...

    async def close(self) -> None: ...


class _Warner:
    """One warning per minute per exporter, with a count of what was dropped meanwhile."""

    __slots__ = ("_at", "_dropped", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._at = -1e9
        self._dropped = 0

    def failed(self, spans: int, reason: str) -> None:
        self._dropped += spans
        now = time.monotonic()
        if now - self._at < _WARN_EVERY:
            return
        self._at = now
        _log.warning(
            "tracing: %s export failed (%s); %d spans dropped", self._name, reason, self._dropped
        )
        self._dropped = 0


# ---- OTLP over HTTP ---------------------------------------------------------------------------


class _HttpTarget:
    """Where an HTTP exporter posts: host, port, request target and TLS."""

    __slots__ = ("host", "port", "secure", "target")

    def __init__(self, host: str, port: int, target: bytes, secure: bool) -> None:
        self.host = host
        self.port = port
        self.target = target
        self.secure = secure

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.secure else "http"
        return f"{scheme}://{host}:{self.port}{self.target.decode()}"


class _HttpPoster:
    """POSTs bodies to one target over pillion's pooled client, made on first use."""

    __slots__ = ("_client", "_target", "_timeout")

    def __init__(self, target: _HttpTarget, timeout: float) -> None:
        self._target = target
        self._timeout = timeout
        self._client: HttpClient | None = None

    async def post(self, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> str | None:
        """Return None on a 2xx answer, else why it failed."""
        client = self._client
        target = self._target
        if client is None:
            context = ssl.create_default_context() if target.secure else None
            client = self._client = HttpClient(
                ssl=context, max_idle_per_host=2, connect_timeout=min(self._timeout, 5.0)
            )
        try:
            response = await client.request(
                target.host,
                target.port,
                "POST",
                target.target,
                headers,
                body,
                timeout=self._timeout,
            )
        except Exception as exc:  # the transport's errors and anything else: drop, never raise
            return f"{type(exc).__name__}: {exc}"
        if 200 <= response.status < 300:
            return None
        detail = response.body[:200].decode("utf-8", "replace")
        return f"HTTP {response.status} from {target.url}: {detail}"

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


class _HttpExporter:
    """POSTs each batch, encoded by the subclass, to one target; failures only warn."""

    __slots__ = ("_headers", "_poster", "_warner", "target")

    def __init__(
        self, target: _HttpTarget, headers: Sequence[tuple[bytes, bytes]], timeout: float, what: str
    ) -> None:
        self.target = target
        self._headers = headers
        self._poster = _HttpPoster(target, timeout)
        self._warner = _Warner(f"{what} {target.url}")

    def _encode(self, spans: Sequence[Span], service_name: str) -> bytes:
        raise NotImplementedError

    async def export(self, spans: Sequence[Span], service_name: str) -> None:
        if not spans:
            return
        error = await self._poster.post(self._headers, self._encode(spans, service_name))
        if error is not None:
            self._warner.failed(len(spans), error)

    async def close(self) -> None:
        await self._poster.close()


class OtlpHttpExporter(_HttpExporter):
    """OTLP/HTTP with protobuf bodies: POST {endpoint}/v1/traces."""

    __slots__ = ()

    def __init__(
        self,
        host: str,
        port: int,
        *,
        path: str = "/v1/traces",
        secure: bool = False,
        headers: Sequence[tuple[str, str]] = (),
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        encoded = [(b"content-type", b"application/x-protobuf")] + [
            (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers
        ]
        target = _HttpTarget(host, port, path.encode(), secure)
        super().__init__(target, encoded, timeout, "OTLP/HTTP")

    def _encode(self, spans: Sequence[Span], service_name: str) -> bytes:
        return encode_export_request(spans, service_name)


# ---- OTLP over gRPC ---------------------------------------------------------------------------


class OtlpGrpcExporter:
    """OTLP/gRPC: TraceService/Export with the hand-encoded request bytes as they are."""

    __slots__ = ("_call", "_channel", "_metadata", "_timeout", "_warner", "secure", "target")

    def __init__(
        self,
        target: str,
        *,
        secure: bool = False,
        headers: Sequence[tuple[str, str]] = (),
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.target = target
        self.secure = secure
        # gRPC metadata keys must be lowercase.
        self._metadata = tuple((name.lower(), value) for name, value in headers)
        self._timeout = timeout
        self._channel: Any = None
        self._call: Any = None
        self._warner = _Warner(f"OTLP/gRPC {target}")

    def _connect(self) -> Any:
        # Imported here so that a sidecar without an OTLP/gRPC exporter never loads grpc for it;
        # the channel is made on first export because grpc.aio binds it to the running loop.
        import grpc

        if self.secure:
            channel = grpc.aio.secure_channel(self.target, grpc.ssl_channel_credentials())
        else:
            channel = grpc.aio.insecure_channel(self.target)
        self._channel = channel
        # No (de)serializers: the request is already bytes and the response is not needed.
        self._call = channel.unary_unary(TRACE_SERVICE_EXPORT)
        return self._call

    async def export(self, spans: Sequence[Span], service_name: str) -> None:
        if not spans:
            return
        body = encode_export_request(spans, service_name)
        call = self._call or self._connect()
        try:
            await call(body, timeout=self._timeout, metadata=self._metadata or None)
        except Exception as exc:  # grpc.aio.AioRpcError and anything else: drop, never raise
            code = getattr(exc, "code", None)
            details = getattr(exc, "details", None)
            if callable(code) and callable(details):
                reason = f"{code()}: {details()}"
            else:
                reason = f"{type(exc).__name__}: {exc}"
            self._warner.failed(len(spans), reason)

    async def close(self) -> None:
        channel = self._channel
        self._channel = self._call = None
        if channel is not None:
            await channel.close()


# ---- Zipkin -----------------------------------------------------------------------------------


def _tag(value: object) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    return value if isinstance(value, str) else str(value)


def zipkin_json(spans: Sequence[Span], service_name: str) -> list[dict[str, Any]]:
    """Spans as Zipkin v2 span objects (ids in hex, times in microseconds, tags as strings)."""
    endpoint = {"serviceName": service_name}
    out: list[dict[str, Any]] = []
    for span in spans:
        tp = span.traceparent
        start_us = span.start_ns // 1000
        end_ns = span.end_ns or span.start_ns
        tags = {key: _tag(value) for key, value in span.attributes.items()}
        if span.status_code == 2:
            tags["otel.status_code"] = "ERROR"
            tags["error"] = span.status_message or "true"
        elif span.status_code == 1:
            tags["otel.status_code"] = "OK"
        item: dict[str, Any] = {
            "traceId": tp[3:35].decode(),
            "id": tp[36:52].decode(),
            "name": span.name,
            "timestamp": start_us,
            # Zipkin reads a 0 duration as "unknown"; a finished span lasted at least 1 µs.
            "duration": max(end_ns // 1000 - start_us, 1),
            "localEndpoint": endpoint,
            "tags": tags,
        }
        if span.parent:
            item["parentId"] = span.parent.decode()
        kind = KIND_NAMES.get(span.kind)
        if kind is not None and kind != "INTERNAL":
            item["kind"] = kind
        out.append(item)
    return out


class ZipkinExporter(_HttpExporter):
    """Zipkin v2 JSON: POST the list of spans to the configured URL."""

    __slots__ = ()

    _HEADERS = ((b"content-type", b"application/json"),)

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        target = _parse_http_url(url, "spec.tracing.zipkin.endpointAddress")
        super().__init__(target, self._HEADERS, timeout, "Zipkin")

    def _encode(self, spans: Sequence[Span], service_name: str) -> bytes:
        return json.dumps(
            zipkin_json(spans, service_name), separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8", "surrogatepass")


# ---- stdout -----------------------------------------------------------------------------------


class StdoutExporter:
    """One JSON line per span on the "pillion.observability.stdout" logger, for debugging."""

    __slots__ = ("_logger",)

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger(STDOUT_LOGGER)

    async def export(self, spans: Sequence[Span], service_name: str) -> None:
        logger = self._logger
        if not logger.isEnabledFor(logging.INFO):
            return
        for span in spans:
            tp = span.traceparent
            record = {
                "service": service_name,
                "name": span.name,
                "kind": KIND_NAMES.get(span.kind, str(span.kind)),
                "traceId": tp[3:35].decode(),
                "spanId": tp[36:52].decode(),
                "parentId": span.parent.decode(),
                "traceState": span.tracestate,
                "start": span.start_ns,
                "end": span.end_ns,
                "durationMs": (span.end_ns - span.start_ns) / 1e6 if span.end_ns else 0.0,
                "attributes": span.attributes,
                "status": {0: "UNSET", 1: "OK", 2: "ERROR"}.get(span.status_code, "UNSET"),
                "statusMessage": span.status_message,
            }
            logger.info("%s", json.dumps(record, separators=(",", ":"), default=str))

    async def close(self) -> None:
        return None


# ---- configuration ----------------------------------------------------------------------------


def exporters_from_config(tracing: Mapping[str, Any] | None) -> list[Exporter]:
    """Build the exporters Configuration spec.tracing asks for (parsed YAML), as daprd does.

    stdout: true -> StdoutExporter; zipkin.endpointAddress (full URL) -> ZipkinExporter;
    otel.endpointAddress + protocol (grpc | http) + isSecure (default true) + headers
    ("k=v,k2=v2", or a list of {name, value}) + timeout (milliseconds, or a duration string)
    -> an OTLP exporter. Invalid values raise ValueError naming the field.
    """
    if tracing is None:
        return []
    if not isinstance(tracing, Mapping):
        raise ValueError("spec.tracing: must be a mapping")
    out: list[Exporter] = []
    if _bool(tracing.get("stdout"), "spec.tracing.stdout", False):
        out.append(StdoutExporter())
    zipkin = _section(tracing, "zipkin")
    if zipkin is not None:
        url = _str(zipkin.get("endpointAddress"), "spec.tracing.zipkin.endpointAddress")
        if url:
            out.append(ZipkinExporter(url))
    otel = _section(tracing, "otel")
    if otel is not None:
        exporter = _otel_exporter(otel)
        if exporter is not None:
            out.append(exporter)
    return out


def _otel_exporter(otel: Mapping[str, Any]) -> Exporter | None:
    field = "spec.tracing.otel"
    address = _str(otel.get("endpointAddress"), f"{field}.endpointAddress")
    protocol = _str(otel.get("protocol"), f"{field}.protocol").lower()
    if protocol and protocol not in ("grpc", "http"):
        raise ValueError(f"{field}.protocol: must be grpc or http, not {protocol!r}")
    secure = _bool(otel.get("isSecure"), f"{field}.isSecure", True)  # daprd's default
    headers = parse_headers(otel.get("headers"), f"{field}.headers")
    timeout = _timeout(otel.get("timeout"), f"{field}.timeout")
    if not address:
        return None
    if not protocol:
        # daprd registers no OTLP exporter without a protocol; say so instead of staying silent.
        _log.warning("tracing: %s.protocol is not set (grpc or http): no OTLP exporter", field)
        return None
    scheme, rest = _split_scheme(address, f"{field}.endpointAddress")
    if scheme is not None:
        secure = scheme == "https"
    host, port, path = _host_port_path(rest, f"{field}.endpointAddress")
    if protocol == "grpc":
        if path not in ("", "/"):
            raise ValueError(f"{field}.endpointAddress: a gRPC endpoint is host:port, no path")
        bracketed = f"[{host}]" if ":" in host else host
        target = bracketed if port is None else f"{bracketed}:{port}"
        return OtlpGrpcExporter(target, secure=secure, headers=headers, timeout=timeout)
    path = path.rstrip("/")
    if not path.endswith("/v1/traces"):
        path += "/v1/traces"
    if port is None:
        port = 443 if secure else 80
    return OtlpHttpExporter(host, port, path=path, secure=secure, headers=headers, timeout=timeout)


def parse_headers(value: object, field: str = "headers") -> list[tuple[str, str]]:
    """Headers for the OTLP exporter.

    daprd's form is a string "name=value,name2=value2" (values percent-decoded, both trimmed,
    as OpenTelemetry's OTEL_EXPORTER_OTLP_HEADERS); a list of {name, value} and a plain
    mapping are accepted too.
    """
    if value is None or value == "":
        return []
    pairs: list[tuple[str, str]] = []
    if isinstance(value, str):
        for item in value.split(","):
            name, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"{field}: {item.strip()!r} is not name=value")
            pairs.append((name.strip(), unquote(raw).strip()))
    elif isinstance(value, Mapping):
        pairs = [(str(k).strip(), _header_value(v, field)) for k, v in value.items()]
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, Mapping) or "name" not in item:
                raise ValueError(f"{field}[{i}]: must be a mapping with name and value")
            pairs.append((str(item["name"]).strip(), _header_value(item.get("value"), field)))
    else:
        raise ValueError(f"{field}: must be a 'name=value,...' string or a list of name/value")
    for name, header_value in pairs:
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"{field}: invalid header name {name!r}")
        if any(c in header_value for c in "\r\n\0"):
            raise ValueError(f"{field}: the value of {name!r} contains a line break")
        try:
            header_value.encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"{field}: the value of {name!r} is not latin-1") from None
    return pairs


def _header_value(value: object, field: str) -> str:
    if value is None:
        return ""
    if isinstance(value, bool | int | float | str):
        return _tag(value).strip()
    raise ValueError(f"{field}: header values must be strings")


def _section(tracing: Mapping[str, Any], key: str) -> Mapping[str, Any] | None:
    value = tracing.get(key)
    if value is not None and not isinstance(value, Mapping):
        raise ValueError(f"spec.tracing.{key}: must be a mapping")
    return value


def _str(value: object, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{field}: must be a string")
    return value.strip()


def _bool(value: object, field: str, default: bool) -> bool:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{field}: must be true or false")


def _timeout(value: object, field: str) -> float:
    """daprd's otel.timeout is an integer of milliseconds; "10s"-style durations are accepted."""
    if value is None or value == "" or value == 0:
        return DEFAULT_TIMEOUT
    seconds: float
    if isinstance(value, bool):
        raise ValueError(f"{field}: must be milliseconds or a duration such as 10s")
    if isinstance(value, int | float):
        seconds = value / 1000.0
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text) / 1000.0
        except ValueError:
            try:
                seconds = parse_duration(text)
            except ValueError:
                raise ValueError(
                    f"{field}: must be milliseconds or a duration such as 10s, not {value!r}"
                ) from None
    else:
        raise ValueError(f"{field}: must be milliseconds or a duration such as 10s")
    if not seconds > 0:
        raise ValueError(f"{field}: must be positive")
    return seconds


def _split_scheme(address: str, field: str) -> tuple[str | None, str]:
    scheme, sep, rest = address.partition("://")
    if not sep:
        return None, address
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"{field}: scheme must be http or https, not {scheme!r}")
    return scheme, rest


def _netloc(rest: str, field: str, shown: str) -> tuple[SplitResult, str | None, int | None]:
    """`rest` (what follows "scheme://") split, its host and port; errors name it as `shown`."""
    parts = urlsplit("//" + rest)
    try:
        return parts, parts.hostname, parts.port
    except ValueError:
        raise ValueError(f"{field}: invalid port in {shown!r}") from None


def _host_port_path(rest: str, field: str) -> tuple[str, int | None, str]:
    parts, host, port = _netloc(rest, field, rest)
    if not host or parts.username is not None or parts.query or parts.fragment:
        raise ValueError(f"{field}: expected host[:port][/path], not {rest!r}")
    return host, port, parts.path


def _parse_http_url(url: str, field: str) -> _HttpTarget:
    scheme, rest = _split_scheme(url.strip(), field)
    if scheme is None:
        raise ValueError(f"{field}: must be an http:// or https:// URL, not {url!r}")
    parts, host, port = _netloc(rest, field, url)
    if not host:
        raise ValueError(f"{field}: no host in {url!r}")
    secure = scheme == "https"
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return _HttpTarget(host, port or (443 if secure else 80), target.encode(), secure)
