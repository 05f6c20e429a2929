"""Service invocation: target parsing, header rules, caller -> callee sidecar -> app."""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote

from pillion.errors import PillionError, direct_invoke
from pillion.observability.tracing import (
    SERVER,
    SharedAttributes,
    SpanContext,
    canonical_traceparent,
    format_traceparent,
    parse_tracestate,
)
from pillion.resiliency import CircuitOpen

if TYPE_CHECKING:
    from pillion.observability.dapr_metrics import DaprMetrics
    from pillion.observability.tracing import Span, Tracer
    from pillion.resiliency import Resiliency

log = logging.getLogger("pillion.blocks.invoke")

Headers = list[tuple[bytes, bytes]]

# Headers a sidecar never forwards (hop-by-hop, recomputed, or sidecar-only).
_DROP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
        b"te",
        b"trailer",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"content-length",
        b"host",
        b"dapr-app-id",
        b"dapr-api-token",
        b"dapr-caller-app-id",
        b"dapr-caller-namespace",
        b"dapr-callee-app-id",
    }
)
# Response headers not passed back: the server writes its own framing.
_DROP_RESPONSE = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"trailer",
        b"content-length",
    }
)

# Headers pillion adds between its own sidecars and channels (never seen by apps over HTTP):
# the protobuf Any type URL of a gRPC payload, so `Any` values survive the HTTP link intact,
# and a gRPC app's status code and message, so a gRPC caller gets the app's own status back.
ANY_TYPE_HEADER = b"pillion-any-type-url"
GRPC_STATUS_HEADER = b"pillion-grpc-status"
GRPC_MESSAGE_HEADER = b"pillion-grpc-message"
GRPC_DETAILS_HEADER = b"pillion-grpc-details"  # base64 of a google.rpc.Status
# InvokeService without an HTTP verb: an HTTP app cannot take it (InvalidArgument at the callee).
NO_VERB_HEADER = b"pillion-no-http-verb"
# On an answer that a gRPC app gave: a gRPC caller then gets the app's headers as they are,
# without `dapr-http-status` (daprd sets that only for HTTP apps).
APP_PROTOCOL_HEADER = b"pillion-app-protocol"


def encode_grpc_message(text: str) -> bytes:
    """grpc-message's encoding: `%` and bytes outside printable ASCII percent-escaped."""
    out = bytearray()
    for b in text.encode("utf-8"):
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def decode_grpc_message(raw: bytes) -> str:
    return unquote(raw.decode("ascii", "replace"))


CALLEE_HEADER = b"dapr-callee-app-id"
CALLER_HEADER = b"dapr-caller-app-id"
CALLER_NS_HEADER = b"dapr-caller-namespace"


@dataclass(slots=True)
class InvokeRequest:
    """A call as the caller's sidecar received it (HTTP shape; gRPC maps onto it)."""

    app_id: str  # target as written: "app" or "app.namespace"
    method: str  # path after /method/, raw (percent-encoding kept), no leading slash
    verb: str
    query: bytes
    headers: Headers
    body: bytes
    peer: str = ""
    protocol: str = "http"  # the API the caller used: "http" | "grpc" (a metrics label)


@dataclass(slots=True)
class InvokeResponse:
    status: int
    reason: bytes
    headers: Headers
    body: bytes


class Address(Protocol):
    """Where a callee sidecar's internal link listens."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


class Unreachable(Exception):
    """The call never reached the peer (connect failed): safe to retry elsewhere."""


class CallFailed(Exception):
    """The call may have reached the peer but no complete answer came back."""


class Resolver(Protocol):
    async def resolve(self, app_id: str, namespace: str = "") -> Address: ...

    def invalidate(self, app_id: str, namespace: str = "") -> None: ...


class Link(Protocol):
    """Caller sidecar -> callee sidecar transport (the internal port)."""

    async def forward(
        self, addr: Address, verb: str, target: bytes, headers: Headers, body: bytes
    ) -> InvokeResponse: ...


class AppChannel(Protocol):
    """Sidecar -> its own app."""

    async def invoke(
        self, verb: str, target: bytes, headers: Headers, body: bytes
    ) -> InvokeResponse: ...


def set_trace_context(headers: Headers, ctx: SpanContext) -> bytes:
    """Make `headers` (changed in place) carry `ctx`: its traceparent, and its tracestate when
    they had none (a child keeps its parent's tracestate, so an existing one stays right).
    Returns the traceparent value."""
    value = traceparent = format_traceparent(ctx)
    has_state = False
    for i, (k, _) in enumerate(headers):
        if k == b"traceparent":
            headers[i] = (k, value)
            value = b""
        elif k == b"tracestate":
            has_state = True
    if value:
        headers.append((b"traceparent", value))
    if ctx.tracestate and not has_state:
        headers.append((b"tracestate", ctx.tracestate.encode("latin-1")))
    return traceparent


def continue_trace(
    tracer: Tracer, headers: Headers, name: str, kind: int
) -> tuple[Span | None, bytes]:
    """Start a span under the context `headers` carry and make them (in place) carry the span's
    own context on; one pass over the headers. Returns the span (None: not sampled) and the
    traceparent value sent on. The tracer must be enabled."""
    at = -1
    traceparent = tracestate = None
    for i, (k, v) in enumerate(headers):
        if k == b"traceparent":
            at = i
            traceparent = v
        elif k == b"tracestate":
            tracestate = v
    parent = None if traceparent is None else canonical_traceparent(traceparent)
    # A child keeps its parent's tracestate, so the header (if any) goes on as it came.
    state = parse_tracestate(tracestate) if tracestate and parent is not None else ""
    span, value = tracer.continue_header(name, parent, state, kind)
    if at >= 0:
        headers[at] = (b"traceparent", value)
    else:
        headers.append((b"traceparent", value))
    return span, value


def header_value(headers: Headers, name: bytes) -> bytes | None:
    for k, v in headers:
        if k == name:
            return v
    return None


def split_app_id(raw: str) -> tuple[str, str]:
    """("app", "ns") from "app.ns"; more than one dot is an invalid id."""
    if raw.count(".") > 1:
        raise direct_invoke(f"failed to invoke, id: {raw}, err: invalid app id {raw}")
    app, _, ns = raw.partition(".")
    if not app:
        raise direct_invoke(
            "failed getting app id either from the URL path or the header dapr-app-id", 404
        )
    return app, ns


def clean_method(method: str) -> str:
    """Go's path.Clean of the method, without the leading slash."""
    if not method:
        return ""
    cleaned = posixpath.normpath("/" + method)
    if cleaned.startswith("//"):
        cleaned = "/" + cleaned.lstrip("/")
    out = cleaned[1:]
    # path.Clean keeps no trailing slash; Dapr forwards the cleaned path.
    return out


def response_headers(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """A peer sidecar's response headers, minus framing (pillion's link headers kept)."""
    return [(k, v) for k, v in headers if k not in _DROP_RESPONSE]


def app_response_headers(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    """An app's response headers, minus framing and any spoofed pillion link header."""
    return [(k, v) for k, v in headers if k not in _DROP_RESPONSE and not k.startswith(b"pillion-")]


class InvokeBlock:
    """Both halves of service invocation: the caller side and the callee side."""

    def __init__(
        self,
        app_id: str,
        namespace: str,
        resolver: Resolver | None,
        link: Link | None,
        app: AppChannel | None,
        *,
        own_address: str = "",
    ) -> None:
        self.app_id = app_id
        self.namespace = namespace
        self.resolver = resolver
        self.link = link
        self.app = app
        self.own_address = own_address
        # Set by the runtime when tracing, metrics or resiliency policies are on.
        self.tracer: Tracer | None = None
        self.metrics: DaprMetrics | None = None
        self.resiliency: Resiliency | None = None
        self._hop_shapes: dict[tuple[str, bytes, int], tuple[str, SharedAttributes]] = {}

    # --- caller side ------------------------------------------------------------------------------

    async def invoke(self, req: InvokeRequest) -> InvokeResponse:
        target, ns = split_app_id(req.app_id)
        ns = ns or self.namespace
        method = clean_method(req.method)
        path = "/" + method
        target_bytes = path.encode("latin-1") + (b"?" + req.query if req.query else b"")
        headers = self._outbound_headers(req, target)
        if target == self.app_id and ns == self.namespace:
            call: Callable[[], Awaitable[InvokeResponse]] = lambda: self._deliver(  # noqa: E731
                req.app_id, req.verb, target_bytes, headers, req.body
            )
        else:
            call = lambda: self._forward(  # noqa: E731
                req.app_id, target, ns, req.verb, target_bytes, headers, req.body
            )
        metrics = self.metrics
        if metrics is None:
            return await self._guarded(req.app_id, target, call)
        metrics.invoke_req_sent(target, req.protocol)
        t0 = time.perf_counter()
        status = "500"
        try:
            resp = await self._guarded(req.app_id, target, call)
            status = str(resp.status)
            return resp
        except PillionError as err:
            status = str(err.http_status)
            raise
        finally:
            metrics.invoke_res_recv(target, status, req.protocol, (time.perf_counter() - t0) * 1000)

    async def _guarded(
        self, raw_id: str, target: str, call: Callable[[], Awaitable[InvokeResponse]]
    ) -> InvokeResponse:
        """`call` under the app's resiliency policy, if it has one (none: one plain attempt)."""
        policy = self.resiliency.app(target) if self.resiliency is not None else None
        if policy is None:
            return await call()
        try:
            retry = policy.retry
            return await policy.run(
                call,
                failed=_failed,
                retryable_result=None if retry is None else lambda r: retry.retry_http(r.status),
            )
        except TimeoutError as exc:
            raise direct_invoke(
                f"failed to invoke, id: {raw_id}, err: context deadline exceeded"
            ) from exc
        except CircuitOpen as exc:
            raise direct_invoke(f"failed to invoke, id: {raw_id}, err: {exc}") from exc

    async def _forward(
        self,
        raw_id: str,
        target: str,
        ns: str,
        verb: str,
        path: bytes,
        headers: Headers,
        body: bytes,
    ) -> InvokeResponse:
        if self.resolver is None or self.link is None:
            raise direct_invoke(
                f"failed to invoke, id: {raw_id}, err: no name resolution is configured"
            )
        addr = await self._resolve(raw_id, target, ns)
        try:
            return await self.link.forward(addr, verb, path, headers, body)
        except Unreachable:
            # The entry may be stale (a sidecar restarted on another port): look again once.
            self.resolver.invalidate(target, ns)
            addr = await self._resolve(raw_id, target, ns)
            try:
                return await self.link.forward(addr, verb, path, headers, body)
            except (Unreachable, CallFailed) as exc:
                raise direct_invoke(f"failed to invoke, id: {raw_id}, err: {exc}") from exc
        except CallFailed as exc:
            raise direct_invoke(f"failed to invoke, id: {raw_id}, err: {exc}") from exc

    async def _resolve(self, raw: str, app: str, ns: str) -> Address:
        assert self.resolver is not None
        try:
            return await self.resolver.resolve(app, ns)
        except LookupError as exc:
            raise direct_invoke(
                f"failed to invoke, id: {raw}, err: couldn't find service: {raw}"
            ) from exc

    def _outbound_headers(self, req: InvokeRequest, target: str) -> Headers:
        out: Headers = []
        host = b""
        named: frozenset[bytes] = frozenset()
        for k, v in req.headers:
            if k == b"connection":
                # Headers listed in Connection are hop-by-hop too.
                named = frozenset(t.strip().lower() for t in v.split(b",") if t.strip())
        for k, v in req.headers:
            if k in _DROP or k in named or k.endswith(b"-bin"):
                if k == b"host":
                    host = v
                continue
            out.append((k, v))
        out.append((CALLER_HEADER, self.app_id.encode()))
        out.append((CALLER_NS_HEADER, self.namespace.encode()))
        out.append((CALLEE_HEADER, target.encode()))
        if req.peer:
            out.append((b"x-forwarded-for", req.peer.encode()))
        if host:
            out.append((b"x-forwarded-host", host))
        fwd = b"for=" + req.peer.encode()
        if self.own_address:
            fwd += b";by=" + self.own_address.encode()
        if host:
            fwd += b";host=" + host
        out.append((b"forwarded", fwd))
        return out

    # --- callee side ------------------------------------------------------------------------------

    async def on_remote_call(
        self, verb: str, target: bytes, headers: Headers, body: bytes
    ) -> InvokeResponse:
        """A call from another sidecar over the internal link; deliver it to our app."""
        callee = caller = b""
        for k, v in headers:
            if k == CALLEE_HEADER:
                callee = v
            elif k == CALLER_HEADER:
                caller = v
        if callee.decode("utf-8", "replace") != self.app_id:
            raise direct_invoke(
                f"failed to invoke, id: {callee.decode('utf-8', 'replace')}, err: this sidecar "
                f"serves app id {self.app_id!r}",
                404,
            )
        tracer = self.tracer
        span = None
        if tracer is not None and tracer.enabled:
            # daprd's model: one server span covers the hop and the call to the app, and the app
            # gets its context (a call to the own app continues the API span, as the router set).
            span, _ = continue_trace(tracer, headers, "", SERVER)
        metrics = self.metrics
        src = caller.decode("utf-8", "replace")
        if metrics is not None:
            metrics.invoke_req_recv(src)
        status = 500
        error: str | None = None
        try:
            resp = await self._deliver(self.app_id, verb, target, headers, body)
            status = resp.status
            if status >= 500:
                error = f"status {status}"
            return resp
        except PillionError as err:
            status = err.http_status
            error = err.message
            raise
        finally:
            if metrics is not None:
                metrics.invoke_res_sent(src, str(status))
            if span is not None:
                span.name, span.attributes = self._hop_shape(verb, target, status)
                span.end(error)

    def _hop_shape(self, verb: str, target: bytes, status: int) -> tuple[str, SharedAttributes]:
        """The callee span's name and attributes, shared by every call with the same shape."""
        key = (verb, target, status)
        shape = self._hop_shapes.get(key)
        if shape is None:
            method = target.split(b"?", 1)[0].decode("latin-1")
            shape = (
                f"CallLocal/{self.app_id}{method}",
                SharedAttributes(
                    {
                        "dapr.protocol": "http",
                        "rpc.service": "ServiceInvocation",
                        "dapr.invoke_method": method[1:],
                        "dapr.api": f"{verb} {method}",
                        "dapr.status_code": status,
                    }
                ),
            )
            if len(self._hop_shapes) < 4096:
                self._hop_shapes[key] = shape
        return shape

    async def _deliver(
        self, raw_id: str, verb: str, target: bytes, headers: Headers, body: bytes
    ) -> InvokeResponse:
        if self.app is None:
            raise direct_invoke(
                f"failed to invoke, id: {raw_id}, err: app channel is not initialized: "
                "the sidecar was started without --app-port"
            )
        try:
            return await self.app.invoke(verb, target, headers, body)
        except PillionError:
            raise
        except (Unreachable, CallFailed) as exc:
            raise direct_invoke(f"failed to invoke, id: {raw_id}, err: {exc}") from exc


def _failed(resp: InvokeResponse) -> bool:
    """Dapr's rule: an app's answer outside 2xx/3xx is a failure (a gRPC app's never is)."""
    if header_value(resp.headers, APP_PROTOCOL_HEADER) is not None:
        return False
    return not 200 <= resp.status < 400
