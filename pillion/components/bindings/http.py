"""The `bindings.http` output binding: HTTP requests to a base URL, over aiohttp."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pillion.components.bindings.api import BindingError, BindingResponse, OutputBinding
from pillion.components.metadata import ComponentConfigError, ComponentInfo, Seconds, decode
from pillion.durations import parse_duration

# Operation -> HTTP method; `create` is POST, as in Dapr.
_METHODS = {
    "get": "GET",
    "head": "HEAD",
    "post": "POST",
    "put": "PUT",
    "patch": "PATCH",
    "delete": "DELETE",
    "options": "OPTIONS",
    "trace": "TRACE",
    "create": "POST",
}
# Request metadata the binding reads itself; the rest is sent as request headers.
_NOT_HEADERS = frozenset({"path", "responsetimeout", "errorifnot2xx"})


@dataclass(frozen=True)
class HttpMetadata:
    """Dapr's `bindings.http` metadata."""

    url: str = field(default="", metadata={"name": "url"})
    response_timeout: Seconds | None = field(default=None, metadata={"name": "responseTimeout"})
    error_if_not_2xx: bool = field(default=True, metadata={"name": "errorIfNot2XX"})


class HttpBinding(OutputBinding):
    """Each operation is one request to `url` + the `path` metadata; the answer's body is the
    data and its status and headers are the metadata (`statusCode`, `status`, headers)."""

    def __init__(self) -> None:
        self.md = HttpMetadata()
        self._session: Any = None  # aiohttp.ClientSession, created on first use in the loop

    async def init(self, info: ComponentInfo) -> None:
        self.md = decode(HttpMetadata, info.properties)
        if not self.md.url.startswith(("http://", "https://")):
            raise ComponentConfigError("url", f"must be an http(s) URL, got {self.md.url!r}")

    def operations(self) -> list[str]:
        return list(_METHODS)

    async def invoke(
        self, operation: str, data: bytes, metadata: Mapping[str, str]
    ) -> BindingResponse:
        import aiohttp  # a dependency of the dapr SDK; imported when the binding is used

        low = {k.lower(): v for k, v in metadata.items()}
        url = self.md.url.rstrip("/")
        path = low.get("path", "")
        if path:
            url += path if path.startswith("/") else "/" + path
        timeout = self.md.response_timeout
        if low.get("responsetimeout"):
            try:
                timeout = Seconds(parse_duration(low["responsetimeout"]))
            except ValueError as exc:
                raise BindingError(f"invalid responseTimeout {low['responsetimeout']!r}") from exc
        error_if_not_2xx = self.md.error_if_not_2xx
        if "errorifnot2xx" in low:
            error_if_not_2xx = low["errorifnot2xx"].strip().lower() in ("true", "1", "yes")
        headers = {k: v for k, v in metadata.items() if k.lower() not in _NOT_HEADERS}
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        try:
            async with self._session.request(
                _METHODS[operation],
                url,
                data=data if data else None,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                body = await resp.read()
                out = {k: v for k, v in resp.headers.items()}
                out["statusCode"] = str(resp.status)
                out["status"] = f"{resp.status} {resp.reason or ''}".strip()
        except TimeoutError as exc:
            raise BindingError(f"request to {url} timed out") from exc
        except aiohttp.ClientError as exc:
            raise BindingError(f"error invoking {url}: {exc}") from exc
        if resp.status >= 400 and error_if_not_2xx:
            # Dapr's message; the body is kept in the error for the caller to see.
            raise BindingError(
                f"received status code {resp.status}"
                + (f": {body.decode('utf-8', 'replace')}" if body else "")
            )
        return BindingResponse(body, out)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()
