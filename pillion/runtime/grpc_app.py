"""Sidecar -> app over gRPC (`--app-protocol grpc|grpcs`): OnInvoke and the health probe."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http
import json
import logging
import socket
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import grpc.aio
from dapr.proto.common.v1 import common_pb2
from dapr.proto.runtime.v1 import appcallback_pb2
from google.protobuf import any_pb2, empty_pb2, json_format
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from pillion.blocks.invoke import (
    ANY_TYPE_HEADER,
    APP_PROTOCOL_HEADER,
    GRPC_DETAILS_HEADER,
    GRPC_MESSAGE_HEADER,
    GRPC_STATUS_HEADER,
    NO_VERB_HEADER,
    CallFailed,
    Headers,
    InvokeResponse,
    Unreachable,
    encode_grpc_message,
)
from pillion.errors import direct_invoke
from pillion.observability.dapr_metrics import DaprMetrics
from pillion.observability.tracing import format_grpc_trace_bin, parse_traceparent
from pillion.transport.dial import wait_for_port

log = logging.getLogger("pillion.runtime.grpc_app")

ON_INVOKE = "/dapr.proto.runtime.v1.AppCallback/OnInvoke"

# Importing the standard detail types registers them, so JSON of a google.rpc.Status can
# render ErrorInfo, BadRequest, ... details the way Dapr's protojson does.
del error_details_pb2

Metadata = list[tuple[str, str | bytes]]

DEFAULT_MAX_MESSAGE_SIZE = 4 * 1024 * 1024
STATUS_DETAILS_KEY = "grpc-status-details-bin"

# Dapr's HTTP status for each gRPC code (invokev1.HTTPStatusFromCode).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 408,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

_NONE = common_pb2.HTTPExtension.Verb.NONE
_VERBS = {name: number for name, number in common_pb2.HTTPExtension.Verb.items() if name != "NONE"}

# Never sent as metadata: hop-by-hop, recomputed by HTTP/2, carried in InvokeRequest fields,
# or replaced by this channel (the app token).
_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "http2-settings",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-authenticate",
        "content-length",
        "content-type",
        "host",
        "dapr-api-token",
    }
)
# Dapr's isPermanentHTTPHeader list (pkg/messaging/v1/util.go, minus the names dropped above):
# these reach a gRPC app as `dapr-<name>`. grpc-core also strips `user-agent` (it sends its own),
# so the caller's value is kept under `dapr-user-agent`.
_RENAME = frozenset(
    {
        "accept",
        "accept-charset",
        "accept-language",
        "accept-ranges",
        "cache-control",
        "cookie",
        "date",
        "expect",
        "from",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-schedule-tag-match",
        "if-unmodified-since",
        "max-forwards",
        "origin",
        "pragma",
        "referer",
        "via",
        "warning",
        "user-agent",
    }
)
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")

# Details text grpc-core writes when it could not open a connection at all (the call never left).
_CONNECT_FAILURES = ("failed to connect to all addresses", "dns resolution failed")


def to_metadata(headers: Sequence[tuple[bytes, bytes]]) -> Metadata:
    """HTTP-shaped headers -> gRPC metadata for the app, renamed and filtered as Dapr does.

    Keys are lower-cased; `-bin` keys carry their value as raw bytes; any other value that is
    not printable ASCII (what gRPC allows) is dropped rather than failing the whole call.
    """
    out: Metadata = []
    for raw_key, raw_value in headers:
        try:
            key = _KEYS[raw_key]
        except KeyError:
            key = _metadata_key(raw_key)
        if key is None:
            continue
        if key.endswith("-bin"):
            out.append((key, bytes(raw_value)))
            continue
        try:
            value = raw_value.decode("ascii")
        except UnicodeDecodeError:
            value = "\x00"  # not printable: dropped below
        if value.isprintable():  # for ASCII: exactly 0x20..0x7E, what gRPC allows
            out.append((key, value))
        else:
            log.debug("dropping header %s: its value is not valid gRPC metadata", key)
    return out


# Header name -> metadata key (None: dropped). The same few names recur on every call.
_KEYS: dict[bytes, str | None] = {}


def _metadata_key(raw_key: bytes) -> str | None:
    key: str | None = raw_key.decode("latin-1").lower()
    assert key is not None
    if (
        not key
        or key in _DROP
        or key.startswith(("pillion-", ":"))
        or not _KEY_CHARS.issuperset(key)
    ):
        key = None
    elif key in _RENAME or key.startswith("grpc-"):
        key = "dapr-" + key
    if len(_KEYS) < 4096:  # bounded: callers choose header names
        _KEYS[raw_key] = key
    return key


def _from_metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> Headers:
    """App response metadata -> headers, without gRPC's own keys or binary values."""
    out: Headers = []
    for key, value in metadata or ():
        if (
            key.startswith(("grpc-", ":"))
            or key.endswith("-bin")
            or key in ("content-type", "content-length")
            or isinstance(value, bytes)
        ):
            continue
        out.append((key.encode("latin-1"), value.encode("utf-8")))
    return out


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def build_request(
    verb: str, target: bytes, headers: Sequence[tuple[bytes, bytes]], body: bytes
) -> common_pb2.InvokeRequest:
    """The common.InvokeRequest daprd sends to AppCallback/OnInvoke for this call."""
    path, _, query = target.partition(b"?")
    method = urllib.parse.unquote(path.decode("latin-1").lstrip("/"), errors="replace")
    verb_number = (
        _NONE if _header(headers, NO_VERB_HEADER) is not None else _VERBS.get(verb.upper(), _NONE)
    )
    content_type = _header(headers, b"content-type") or b""
    type_url = _header(headers, ANY_TYPE_HEADER) or b""
    return common_pb2.InvokeRequest(
        method=method,
        data=any_pb2.Any(type_url=type_url.decode("utf-8", "replace"), value=body),
        content_type=content_type.decode("utf-8", "replace"),
        http_extension=common_pb2.HTTPExtension(
            verb=verb_number, querystring=query.decode("utf-8", "replace")
        ),
    )


def _status_json(st: status_pb2.Status) -> bytes:
    """JSON of a google.rpc.Status as Dapr's protojson writes it (camelCase, no empty fields)."""
    try:
        doc: dict[str, Any] = json_format.MessageToDict(st)
    except (TypeError, KeyError, json_format.Error):
        # A detail type this process does not know: keep its bytes instead of failing.
        doc = {"code": st.code}
        if st.message:
            doc["message"] = st.message
        doc["details"] = [
            {"@type": d.type_url, "value": base64.b64encode(d.value).decode()} for d in st.details
        ]
    return json.dumps(doc, separators=(",", ":")).encode()


def error_response(exc: grpc.aio.AioRpcError) -> InvokeResponse:
    """The app's gRPC error as an HTTP-shaped response (status + JSON) with the exact status."""
    code = exc.code()
    number = int(code.value[0])
    message = exc.details() or ""
    st: status_pb2.Status | None = None
    raw: bytes | None = None
    for key, value in exc.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            parsed = status_pb2.Status()
            try:
                parsed.ParseFromString(value)
            except DecodeError:  # a malformed detail blob: fall back to the plain status
                log.debug("ignoring an unparsable %s from the app", STATUS_DETAILS_KEY)
                break
            if parsed.code == number:
                st, raw = parsed, value
            break
    if st is None:
        st = status_pb2.Status(code=number, message=message)
    status = HTTP_STATUS.get(code, 500)
    headers: Headers = [
        (APP_PROTOCOL_HEADER, b"grpc"),
        (b"content-type", b"application/json"),
        (GRPC_STATUS_HEADER, str(number).encode()),
        (GRPC_MESSAGE_HEADER, encode_grpc_message(message)),
    ]
    if raw is not None:
        headers.append((GRPC_DETAILS_HEADER, base64.b64encode(raw)))
    headers += _from_metadata(exc.initial_metadata())
    return InvokeResponse(
        status, http.HTTPStatus(status).phrase.encode(), headers, _status_json(st)
    )


def _peer_name(host: str, port: int, pem: str) -> str:
    """A name the app's certificate is valid for (DNS SAN, IP SAN, then CN)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    ctx.load_verify_locations(cadata=pem)
    with (
        socket.create_connection((host, port), timeout=5) as sock,
        ctx.wrap_socket(sock) as tls,
    ):
        cert: Any = tls.getpeercert() or {}
    sans = cert.get("subjectAltName", ())
    names = [v for k, v in sans if k == "DNS"] + [v for k, v in sans if k == "IP Address"]
    names += [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    if not names:
        return host
    name = str(names[0])
    return "pillion" + name[1:] if name.startswith("*.") else name


class GrpcAppChannel:
    """Sidecar -> app over gRPC, bounded by --app-max-concurrency.

    `grpcs` skips certificate verification the way daprd does, by pinning: on first connect the
    app's own certificate is fetched and trusted, with the target name set to one it carries.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: bool = False,
        max_concurrency: int = -1,
        app_token: str | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.app_token = app_token or None
        self.max_message_size = max_message_size
        self.healthy = True
        self._sem = asyncio.Semaphore(max_concurrency) if max_concurrency > 0 else None
        self._channel: grpc.aio.Channel | None = None
        self._lock = asyncio.Lock()
        self._invoke: Any = None
        self._health: Any = None
        self.metrics: DaprMetrics | None = None  # dapr_grpc_io_client_* for calls to the app

    # --- the channel ------------------------------------------------------------------------------

    def open_channel(self) -> grpc.aio.Channel | None:
        """The channel if `get_channel` already opened it (the gRPC proxy borrows it)."""
        return self._channel

    async def get_channel(self) -> grpc.aio.Channel:
        """The one channel to the app (created on first use; for grpcs, after a TLS handshake).

        Raises Unreachable when grpcs cannot fetch the app's certificate.
        """
        if self._channel is not None:
            return self._channel
        async with self._lock:
            if self._channel is None:
                self._channel = await self._open()
                self._invoke = self._channel.unary_unary(
                    ON_INVOKE,
                    request_serializer=common_pb2.InvokeRequest.SerializeToString,
                    response_deserializer=common_pb2.InvokeResponse.FromString,
                )
                self._health = self._channel.unary_unary(
                    "/dapr.proto.runtime.v1.AppCallbackHealthCheck/HealthCheck",
                    request_serializer=empty_pb2.Empty.SerializeToString,
                    response_deserializer=appcallback_pb2.HealthCheckResponse.FromString,
                )
        return self._channel

    async def _open(self) -> grpc.aio.Channel:
        target = f"{self.host}:{self.port}"
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", self.max_message_size),
            ("grpc.max_receive_message_length", self.max_message_size),
            # grpc's default reconnect backoff grows to 120 s: an app that restarts must be
            # reachable again within about a second, as with the HTTP channel.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if not self.tls:
            return grpc.aio.insecure_channel(target, options=options)
        try:
            pem = await asyncio.to_thread(ssl.get_server_certificate, (self.host, self.port))
            name = await asyncio.to_thread(_peer_name, self.host, self.port, pem)
        except (OSError, ssl.SSLError) as exc:
            raise Unreachable(f"app at {target} is not reachable over TLS: {exc}") from exc
        options.append(("grpc.ssl_target_name_override", name))
        creds = grpc.ssl_channel_credentials(root_certificates=pem.encode())
        return grpc.aio.secure_channel(target, creds, options=options)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the --app-max-concurrency slots (for callers using the raw channel)."""
        if self._sem is None:
            yield
            return
        async with self._sem:
            yield

    # --- AppChannel -------------------------------------------------------------------------------

    async def invoke(
        self, verb: str, target: bytes, headers: Headers, body: bytes
    ) -> InvokeResponse:
        if not self.healthy:
            raise direct_invoke("app is not in a healthy state")
        request = build_request(verb, target, headers, body)
        metadata = to_metadata(headers)
        for k, v in headers:
            if k == b"traceparent":
                # gRPC apps may read the binary form (OpenCensus) too, as daprd sends it.
                ctx = parse_traceparent(v)
                if ctx is not None:
                    metadata.append(("grpc-trace-bin", format_grpc_trace_bin(ctx)))
                break
        if self.app_token is not None:
            metadata.append(("dapr-api-token", self.app_token))
        async with self.slot():
            return await self._call(request, metadata)

    async def _call(self, request: common_pb2.InvokeRequest, metadata: Metadata) -> InvokeResponse:
        metrics = self.metrics
        if metrics is None:
            return await self._call_app(request, metadata)
        t0 = time.perf_counter()
        status = "UNKNOWN"
        sent = request.ByteSize()
        received = 0
        try:
            resp = await self._call_app(request, metadata)
            grpc_status = next((v for k, v in resp.headers if k == GRPC_STATUS_HEADER), b"0")
            status = "OK" if grpc_status == b"0" else _code_name(grpc_status)
            received = len(resp.body)
            return resp
        finally:
            metrics.grpc_client(
                ON_INVOKE, status, (time.perf_counter() - t0) * 1000, sent, received
            )

    async def _call_app(
        self, request: common_pb2.InvokeRequest, metadata: Metadata
    ) -> InvokeResponse:
        await self.get_channel()
        where = f"app at {self.host}:{self.port}"
        try:
            call = self._invoke(request, metadata=tuple(metadata))
            resp: common_pb2.InvokeResponse = await call
            initial = await call.initial_metadata()
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or ""
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                lowered = details.lower()
                if lowered.startswith(_CONNECT_FAILURES):
                    raise Unreachable(f"{where} is not reachable: {details}") from exc
                if _transport_failure(lowered):
                    raise CallFailed(f"{where}: {details}") from exc
            return error_response(exc)
        except grpc.RpcError as exc:  # a non-call error from grpc (e.g. a usage error)
            raise CallFailed(f"{where}: {exc}") from exc
        headers: Headers = [(APP_PROTOCOL_HEADER, b"grpc")]
        if resp.content_type:
            headers.append((b"content-type", resp.content_type.encode("utf-8")))
        headers += _from_metadata(initial)
        if resp.data.type_url:
            headers.append((ANY_TYPE_HEADER, resp.data.type_url.encode("utf-8")))
        return InvokeResponse(200, b"OK", headers, resp.data.value)

    async def wait_ready(self, interval: float = 0.1) -> None:
        """TCP-dial the app port every `interval` until it accepts (daprd's start-up probe)."""
        await wait_for_port(self.host, self.port, interval)

    async def probe(self, path: str, timeout: float) -> bool:
        """One app health probe: AppCallbackHealthCheck/HealthCheck; only OK is healthy.

        `path` is the HTTP probe's and is ignored. UNIMPLEMENTED (the Python SDK's `App` without
        `register_health_check`) counts as unhealthy, as in daprd (dapr-api.md §13.3).
        """
        del path
        t0 = time.perf_counter()
        status = "OK"
        try:
            await self.get_channel()
            await self._health(empty_pb2.Empty(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            status = str(exc.code().name)
        except (grpc.RpcError, Unreachable):
            status = "UNAVAILABLE"
        if self.metrics is not None:
            self.metrics.health_probe("grpc", status, (time.perf_counter() - t0) * 1000)
        return status == "OK"

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def _code_name(number: bytes) -> str:
    """A gRPC status number (as the link header carries it) -> its code name."""
    try:
        value = int(number)
    except ValueError:
        return "UNKNOWN"
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return str(code.name)
    return "UNKNOWN"


def _transport_failure(details: str) -> bool:
    """grpc-core's own words for a connection lost mid-call (not a status the app chose)."""
    return any(
        s in details
        for s in (
            "socket closed",
            "stream removed",
            "connection reset",
            "broken pipe",
            "goaway received",
            "keepalive watchdog timeout",
            "connection aborted",
        )
    )
