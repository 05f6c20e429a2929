"""Adapters from the transport to the invoke block: the app channel and the sidecar link."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

from pillion.blocks.invoke import (
    NO_VERB_HEADER,
    Address,
    CallFailed,
    Headers,
    InvokeResponse,
    Unreachable,
    app_response_headers,
    response_headers,
)
from pillion.errors import GrpcCode, PillionError, direct_invoke
from pillion.observability.dapr_metrics import DaprMetrics
from pillion.transport.client import ConnectError, HttpClient, TransportError
from pillion.transport.dial import wait_for_port

log = logging.getLogger("pillion.runtime.channels")


def insecure_client_context() -> ssl.SSLContext:
    """`--app-protocol https`: TLS to the app without certificate checks, as daprd does."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class SidecarLink:
    """Caller sidecar -> callee sidecar over HTTP/1.1 on the internal port (TLS-ready)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.client = HttpClient(ssl=tls, max_idle_per_host=256)

    async def forward(
        self, addr: Address, verb: str, target: bytes, headers: Headers, body: bytes
    ) -> InvokeResponse:
        try:
            r = await self.client.request(addr.host, addr.port, verb, target, headers, body)
        except ConnectError as exc:
            raise Unreachable(str(exc)) from exc
        except TransportError as exc:
            raise CallFailed(str(exc) or type(exc).__name__) from exc
        return InvokeResponse(r.status, r.reason, response_headers(r.headers), r.body)

    async def close(self) -> None:
        await self.client.close()


def _strip_internal(headers: Headers) -> Headers:
    """Drop pillion's link headers before an HTTP app sees the call."""
    if any(k == NO_VERB_HEADER for k, _ in headers):
        # gRPC InvokeService without http_extension cannot reach an HTTP app (as in Dapr).
        raise PillionError(
            "ERR_DIRECT_INVOKE",
            "missing HTTP extension field",
            400,
            GrpcCode.INVALID_ARGUMENT,
        )
    return [(k, v) for k, v in headers if not k.startswith(b"pillion-")]


class HttpAppChannel:
    """Sidecar -> app over HTTP/1.1, bounded by --app-max-concurrency."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: bool = False,
        max_concurrency: int = -1,
        app_token: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.client = HttpClient(
            ssl=insecure_client_context() if tls else None, max_idle_per_host=256
        )
        self._sem = asyncio.Semaphore(max_concurrency) if max_concurrency > 0 else None
        self._token = app_token.encode() if app_token else None
        self.healthy = True
        self.metrics: DaprMetrics | None = None  # dapr_http_client_* for calls to the app
        self._paths: dict[bytes, str] = {}  # request target -> the path label, bounded

    async def invoke(
        self, verb: str, target: bytes, headers: Headers, body: bytes
    ) -> InvokeResponse:
        if not self.healthy:
            raise direct_invoke("app is not in a healthy state")
        if verb == "CONNECT":
            raise PillionError(
                "ERR_DIRECT_INVOKE", "invalid HTTP verb: CONNECT", 400, GrpcCode.INVALID_ARGUMENT
            )
        if any(k.startswith(b"pillion-") for k, _ in headers):
            headers = _strip_internal(headers)
        if self._token is not None:
            headers = [*headers, (b"dapr-api-token", self._token)]
        if self._sem is None:
            return await self._call(verb, target, headers, body)
        async with self._sem:
            return await self._call(verb, target, headers, body)

    async def _call(
        self, verb: str, target: bytes, headers: Headers, body: bytes
    ) -> InvokeResponse:
        metrics = self.metrics
        t0 = time.perf_counter()
        try:
            r = await self.client.request(self.host, self.port, verb, target, headers, body)
        except ConnectError as exc:
            raise Unreachable(f"app at {self.host}:{self.port} is not reachable: {exc}") from exc
        except TransportError as exc:
            raise CallFailed(
                f"app at {self.host}:{self.port}: {exc or type(exc).__name__}"
            ) from exc
        if metrics is not None:
            path = self._paths.get(target)
            if path is None:
                path = target.split(b"?", 1)[0].decode("latin-1")
                if len(self._paths) < 4096:
                    self._paths[target] = path
            metrics.http_client(
                verb,
                path,
                r.status,
                (time.perf_counter() - t0) * 1000,
                len(body),
                len(r.body),
            )
        return InvokeResponse(r.status, r.reason, app_response_headers(r.headers), r.body)

    async def wait_ready(self, interval: float = 0.1) -> None:
        """TCP-dial the app port every `interval` until it accepts (daprd's start-up probe)."""
        await wait_for_port(self.host, self.port, interval)

    async def probe(self, path: str, timeout: float) -> bool:
        """One app health probe: GET path, 2xx = healthy."""
        t0 = time.perf_counter()
        try:
            r = await self.client.request(
                self.host, self.port, "GET", path.encode(), [], b"", timeout=timeout
            )
        except TransportError:
            if self.metrics is not None:
                self.metrics.health_probe("http", "failed", (time.perf_counter() - t0) * 1000)
            return False
        if self.metrics is not None:
            self.metrics.health_probe("http", str(r.status), (time.perf_counter() - t0) * 1000)
        return 200 <= r.status < 300

    async def close(self) -> None:
        await self.client.close()
