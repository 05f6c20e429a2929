"""Request and response types shared by the HTTP/1.1 server and client, with header helpers."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus

__all__ = [
    "HOP_BY_HOP",
    "Request",
    "Response",
    "error_body",
    "reason_phrase",
    "status_line",
    "strip_hop_by_hop",
]

# Headers that describe one connection, not the message: a proxy must not forward them.
# content-length is here too because whoever writes the next hop computes its own.
HOP_BY_HOP: frozenset[bytes] = frozenset(
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
    }
)


@dataclass(slots=True)
class Request:
    """One parsed HTTP request as the server hands it to a handler."""

    method: str
    # Raw request-target path, percent-encoding kept, decoded as latin-1 so that
    # path.encode("latin-1") gives back the exact bytes received.
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    http_version: str = "1.1"
    keep_alive: bool = True
    peer: str = ""

    def header(self, name: bytes) -> bytes | None:
        """Return the first value of header `name` (given lowercase), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(slots=True)
class Response:
    """What a handler returns; the server adds content-length and connection itself."""

    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    reason: bytes | None = None


_PHRASES: dict[int, bytes] = {s.value: s.phrase.encode("latin-1") for s in HTTPStatus}
_STATUS_LINES: dict[int, bytes] = {}


def reason_phrase(status: int) -> bytes:
    """Return the standard reason phrase for `status`, b"Unknown" when there is none."""
    return _PHRASES.get(status, b"Unknown")


def status_line(status: int) -> bytes:
    """Return b"HTTP/1.1 <status> <phrase>\\r\\n", cached because every response needs one."""
    line = _STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status))
        # Bounded: only valid three-digit codes are cached, so a handler cannot grow the cache.
        if 100 <= status <= 999:
            _STATUS_LINES[status] = line
    return line


def error_body(code: str, message: str) -> bytes:
    """Encode the JSON error body every pillion 4xx/5xx carries."""
    return json.dumps({"errorCode": code, "message": message}, separators=(",", ":")).encode()


def strip_hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers, including any listed in a Connection header's value."""
    headers = headers if isinstance(headers, list) else list(headers)
    named: set[bytes] | None = None
    for name, value in headers:
        if name.lower() == b"connection":
            if named is None:
                named = set()
            for token in value.split(b","):
                token = token.strip().lower()
                if token:
                    named.add(token)
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP or (named is not None and lname in named):
            continue
        out.append((name, value))
    return out
