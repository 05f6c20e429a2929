"""Service invocation: target parsing, header rules, caller -> callee sidecar -> app."""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote

from pillion.errors import PillionError, direct_invoke

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

    # --- caller side ------------------------------------------------------------------------------

    async def invoke(self, req: InvokeRequest) -> InvokeResponse:
        target, ns = split_app_id(req.app_id)
        ns = ns or self.namespace
        method = clean_method(req.method)
        path = "/" + method
        target_bytes = path.encode("latin-1") + (b"?" + req.query if req.query else b"")
        headers = self._outbound_headers(req, target)
        if target == self.app_id and ns == self.namespace:
            return await self._deliver(req.app_id, req.verb, target_bytes, headers, req.body)
        if self.resolver is None or self.link is None:
            raise direct_invoke(
                f"failed to invoke, id: {req.app_id}, err: no name resolution is configured"
            )
        addr = await self._resolve(req.app_id, target, ns)
        try:
            return await self.link.forward(addr, req.verb, target_bytes, headers, req.body)
        except Unreachable:
            # The entry may be stale (a sidecar restarted on another port): look again once.
            self.resolver.invalidate(target, ns)
            addr = await self._resolve(req.app_id, target, ns)
            try:
                return await self.link.forward(addr, req.verb, target_bytes, headers, req.body)
            except (Unreachable, CallFailed) as exc:
                raise direct_invoke(f"failed to invoke, id: {req.app_id}, err: {exc}") from exc
        except CallFailed as exc:
            raise direct_invoke(f"failed to invoke, id: {req.app_id}, err: {exc}") from exc

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
        callee = b""
        for k, v in headers:
            if k == CALLEE_HEADER:
                callee = v
                break
        if callee.decode("utf-8", "replace") != self.app_id:
            raise direct_invoke(
                f"failed to invoke, id: {callee.decode('utf-8', 'replace')}, err: this sidecar "
                f"serves app id {self.app_id!r}",
                404,
            )
        return await self._deliver(self.app_id, verb, target, headers, body)

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
