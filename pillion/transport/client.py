"""Pooled HTTP/1.1 client on asyncio Protocols and httptools, for calls to apps and sidecars."""

from __future__ import annotations

import asyncio
import contextlib
import ssl as _ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import httptools

__all__ = [
    "ClientResponse",
    "ConnectError",
    "ConnectionClosed",
    "HttpClient",
    "ResponseTimeout",
    "ResponseTooLarge",
    "TransportError",
]

# Bodies below this are copied behind the head so the request leaves in one send.
_COPY_LIMIT = 64 * 1024
# Methods that carry a body by definition: they always get a content-length, even 0, because
# some servers answer 411 to a bodiless POST.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_METHOD_BYTES: dict[str, bytes] = {}


@dataclass(slots=True)
class ClientResponse:
    """A complete HTTP response as the client received it."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        """Return the first value of header `name` (given lowercase), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


class TransportError(Exception):
    """Base of every error the client raises."""


class ConnectError(TransportError):
    """The connection could not be made (refused, unreachable, timed out, TLS failure)."""


class ConnectionClosed(TransportError):
    """The peer closed or reset the connection before a full response arrived."""


class ResponseTimeout(TransportError):
    """No full response within the request's timeout."""


class ResponseTooLarge(TransportError):
    """The response body is larger than max_response_size."""


class _Stop(Exception):
    """Raised in a parser callback to stop parsing; the protocol has recorded why."""


class _ClientProtocol(asyncio.Protocol):
    """One pooled connection; carries one request at a time and resolves a future per response."""

    __slots__ = (
        "_body",
        "_declared",
        "_error",
        "_got_bytes",
        "_has_length",
        "_head",
        "_head_done",
        "_headers",
        "_headers_done",
        "_idle",
        "_keep_alive",
        "_loop",
        "_lost",
        "_max_size",
        "_parser",
        "_pool",
        "_reason",
        "_size",
        "_status",
        "_timer",
        "_transport",
        "_waiter",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pool: deque[_ClientProtocol],
        max_size: int,
    ) -> None:
        self._loop = loop
        self._pool = pool
        self._max_size = max_size
        self._transport: asyncio.Transport = None  # type: ignore[assignment]  # set on connect
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[ClientResponse] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._idle = False
        self._lost = False
        self._keep_alive = False
        self._head = False
        self._head_done = False
        self._got_bytes = False
        self._error: TransportError | None = None
        self._reset()

    def _reset(self) -> None:
        self._status = 0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] | None = None
        self._size = 0
        self._declared = -1
        self._headers_done = False
        self._has_length = False

    # ---- used by HttpClient ----------------------------------------------------------------

    def send(
        self, data: bytes | list[bytes], head: bool, deadline: float | None
    ) -> asyncio.Future[ClientResponse]:
        """Write one request and return the future its response resolves."""
        if self._lost:
            raise ConnectionClosed("connection closed before the request was sent")
        self._reset()
        self._head = head
        self._got_bytes = False
        self._keep_alive = False
        self._error = None
        loop = self._loop
        waiter: asyncio.Future[ClientResponse] = loop.create_future()
        self._waiter = waiter
        if isinstance(data, bytes):
            self._transport.write(data)
        else:
            self._transport.writelines(data)
        if deadline is not None:
            self._timer = loop.call_at(deadline, self._on_timeout)
        return waiter

    def close(self) -> None:
        if not self._lost:
            self._transport.close()

    def abort(self) -> None:
        if not self._lost:
            self._transport.abort()

    # ---- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._idle:
            self._idle = False
            with contextlib.suppress(ValueError):
                self._pool.remove(self)
        waiter = self._waiter
        if waiter is None or waiter.done():
            timer = self._timer
            if timer is not None:  # the caller gave up (cancelled); drop its timer too
                timer.cancel()
                self._timer = None
            return
        if (
            self._headers_done
            and not self._has_length
            and not self._head
            and self._status >= 200
            and self._status not in (204, 304)
        ):
            # No content-length and not chunked: the body is delimited by the close.
            self._keep_alive = False
            self._complete()
            return
        detail = f": {exc}" if exc is not None else ""
        self._reject(ConnectionClosed(f"connection closed before a full response{detail}"))

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost decides what the EOF meant

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            # Bytes nobody asked for (an idle connection): its framing can no longer be trusted.
            self._keep_alive = False
            self._transport.abort()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self._head_done:
                self._head_done = False
                # The parser still expects the body a HEAD response never sends; start afresh.
                self._parser = httptools.HttpResponseParser(self)
                # Anything after the head would be unframed, so only a clean end is reusable.
                self._keep_alive = self._keep_alive and data.endswith(b"\r\n\r\n")
                self._complete()
                return
            error = self._error or TransportError(f"malformed HTTP response: {exc}")
            self._reject(error)
            self._transport.abort()

    # ---- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None:
            # A second response to one request: the connection's framing is broken.
            self._keep_alive = False

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        self._headers.append((name, value))
        if name == b"content-length":
            self._has_length = True
            if value.isdigit():  # anything else the parser rejects as malformed
                self._declared = int(value)
        elif name == b"transfer-encoding":
            self._has_length = True

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        self._status = status
        self._headers_done = True
        if status < 200:
            return  # informational; the real response follows
        if self._head:
            # httptools cannot be told that a HEAD response has no body: stop it here.
            self._keep_alive = self._parser.should_keep_alive()
            self._head_done = True
            raise _Stop
        if self._declared > self._max_size:
            self._error = ResponseTooLarge(self._too_large())
            raise _Stop

    def on_body(self, chunk: bytes) -> None:
        size = self._size + len(chunk)
        if size > self._max_size:
            self._error = ResponseTooLarge(self._too_large())
            raise _Stop
        self._size = size
        body = self._body
        if body is None:
            self._body = [chunk]
        else:
            body.append(chunk)

    def on_message_complete(self) -> None:
        if self._status < 200:
            self._reset()  # 100 Continue and friends: wait for the final response
            return
        self._keep_alive = self._parser.should_keep_alive()
        self._complete()

    # ---- completion ------------------------------------------------------------------------

    def _too_large(self) -> str:
        return f"response body larger than {self._max_size} bytes"

    def _complete(self) -> None:
        waiter = self._waiter
        self._waiter = None
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
        if waiter is None or waiter.done():
            return
        chunks = self._body
        if chunks is None:
            body = b""
        elif len(chunks) == 1:
            body = chunks[0]
        else:
            body = b"".join(chunks)
        waiter.set_result(ClientResponse(self._status, self._reason, self._headers, body))

    def _reject(self, exc: TransportError) -> None:
        waiter = self._waiter
        self._waiter = None
        self._keep_alive = False
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _on_timeout(self) -> None:
        self._timer = None
        self._reject(ResponseTimeout("no response within the timeout"))
        # The response may still arrive later and would be mistaken for the next one's.
        self.abort()


class HttpClient:
    """HTTP/1.1 client with a LIFO keep-alive pool per (host, port)."""

    __slots__ = (
        "_closed",
        "_connect_timeout",
        "_host_lines",
        "_max_idle",
        "_max_response_size",
        "_pools",
        "_server_hostname",
        "_ssl",
    )

    def __init__(
        self,
        *,
        ssl: _ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        max_idle_per_host: int = 64,
        connect_timeout: float = 5.0,
        max_response_size: int = 64 * 1024 * 1024,
    ) -> None:
        self._ssl = ssl
        self._server_hostname = server_hostname
        self._max_idle = max_idle_per_host
        self._connect_timeout = connect_timeout
        self._max_response_size = max_response_size
        self._pools: dict[tuple[str, int], deque[_ClientProtocol]] = {}
        self._host_lines: dict[tuple[str, int], bytes] = {}
        self._closed = False

    async def request(
        self,
        host: str,
        port: int,
        method: str,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes = b"",
        timeout: float | None = None,
    ) -> ClientResponse:
        """Send one request to host:port and return the whole response.

        `target` is the encoded path and query; `headers` are sent as given (hop-by-hop ones
        already removed by the caller) plus host and content-length.
        """
        if self._closed:
            raise TransportError("client is closed")
        # get_running_loop() costs a getpid() system call on 3.11: only when it is needed.
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        key = (host, port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = deque()
        data = self._encode(key, method, target, headers, body)
        head = method == "HEAD"
        conn = None
        while pool:
            candidate = pool.pop()
            candidate._idle = False
            # is_closing(): the server's FIN may be processed while connection_lost is pending.
            if not candidate._lost and not candidate._transport.is_closing():
                conn = candidate
                break
        if conn is not None:
            try:
                response = await conn.send(data, head, deadline)
            except ConnectionClosed:
                if conn._got_bytes:
                    raise
                # A reused connection died before any answer: the server closed it while idle
                # and never saw this request, so one retry on a fresh connection is safe.
                conn = None
            except BaseException:
                # Timeout, cancellation, oversize or broken framing: the connection is unusable.
                conn.abort()
                raise
        if conn is None:
            conn = await self._connect(asyncio.get_running_loop(), key, pool, deadline)
            try:
                response = await conn.send(data, head, deadline)
            except BaseException:
                conn.abort()
                raise
        if conn._keep_alive and not conn._lost and not self._closed and len(pool) < self._max_idle:
            conn._idle = True
            pool.append(conn)
        else:
            conn.close()
        return response

    async def close(self) -> None:
        """Close every idle connection; connections in use close when their response is done."""
        self._closed = True
        for pool in self._pools.values():
            while pool:
                conn = pool.pop()
                conn._idle = False
                conn.close()
        self._pools.clear()
        await asyncio.sleep(0)  # let the transports run their close callbacks

    async def _connect(
        self,
        loop: asyncio.AbstractEventLoop,
        key: tuple[str, int],
        pool: deque[_ClientProtocol],
        deadline: float | None,
    ) -> _ClientProtocol:
        host, port = key
        limit = self._connect_timeout
        overall = False
        if deadline is not None:
            remaining = deadline - loop.time()
            if remaining < limit:
                limit = remaining
                overall = True
        ssl = self._ssl
        hostname = (self._server_hostname or host) if ssl is not None else None
        max_size = self._max_response_size
        try:
            async with asyncio.timeout(limit):
                _, conn = await loop.create_connection(
                    lambda: _ClientProtocol(loop, pool, max_size),
                    host,
                    port,
                    ssl=ssl,
                    server_hostname=hostname,
                )
        except TimeoutError:
            if overall:
                raise ResponseTimeout(f"timed out connecting to {host}:{port}") from None
            raise ConnectError(
                f"cannot connect to {host}:{port}: timed out after {limit:g}s"
            ) from None
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise ConnectError(f"cannot connect to {host}:{port}: {reason}") from exc
        return conn

    def _encode(
        self,
        key: tuple[str, int],
        method: str,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
    ) -> bytes | list[bytes]:
        method_bytes = _METHOD_BYTES.get(method)
        if method_bytes is None:
            method_bytes = method.encode("ascii")
            if len(_METHOD_BYTES) < 64:  # bounded: callers may pass arbitrary extension methods
                _METHOD_BYTES[method] = method_bytes
        # parts[1] is the host line unless the caller gave one.
        parts = [b"%s %s HTTP/1.1\r\n" % (method_bytes, target), b""]
        has_host = False
        for name, value in headers:
            if not has_host and name.lower() == b"host":
                has_host = True
            parts += (name, b": ", value, b"\r\n")
        if not has_host:
            line = self._host_lines.get(key)
            if line is None:
                host, port = key
                if ":" in host and not host.startswith("["):
                    host = f"[{host}]"  # IPv6 literal
                try:
                    encoded = host.encode("ascii")
                except UnicodeEncodeError:
                    encoded = host.encode("idna")
                line = self._host_lines[key] = b"host: %s:%d\r\n" % (encoded, port)
            parts[1] = line
        if body or method in _BODY_METHODS:
            parts.append(b"content-length: %d\r\n\r\n" % len(body))
        else:
            parts.append(b"\r\n")
        if not body:
            return b"".join(parts)
        if len(body) < _COPY_LIMIT:
            parts.append(body)
            return b"".join(parts)
        return [b"".join(parts), body]
