"""OTLP ExportTraceServiceRequest encoded by hand, so the runtime needs no opentelemetry packages.

Field numbers follow opentelemetry-proto (collector/trace/v1, trace/v1, common/v1, resource/v1);
the tests decode this output with the official generated classes.
"""

from __future__ import annotations

import struct
from binascii import unhexlify as _unhexlify
from collections.abc import Sequence

from pillion.observability.tracing import Attribute, SharedAttributes, Span

__all__ = ["SCOPE_NAME", "encode_export_request", "encode_span", "encode_spans"]

SCOPE_NAME = "pillion"

_MASK64 = (1 << 64) - 1
_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_pack_fixed64 = struct.Struct("<Q").pack
_pack_double = struct.Struct("<d").pack
_BYTE = [bytes((i,)) for i in range(256)]

# Encoded KeyValue prefixes (tag, length, key, value tag) per attribute key: the same few keys
# recur on every span. Bounded so that arbitrary keys cannot grow it without limit.
_KEY_CACHE: dict[str, bytes] = {}
_KEY_CACHE_MAX = 1024
# Whole encoded Span.attributes fields for short string values: "dapr.protocol"="http" and the
# like repeat on most spans. Bounded; once full, new pairs are encoded each time.
_ATTR_CACHE: dict[tuple[str, str], bytes] = {}
_ATTR_CACHE_MAX = 4096
_ATTR_CACHE_VALUE_MAX = 128
# Encoded Resource + InstrumentationScope per service name: one entry in practice.
_HEAD_CACHE: dict[str, tuple[bytes, bytes]] = {}

_LEAD: dict[int, bytes] = {}  # a span field's tag and size, by size (few: spans share shapes)

# Span.flags (field 16, fixed32): the W3C trace flags; every exported span is sampled.
_FLAGS = b"\x85\x01\x01\x00\x00\x00"


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _BYTE[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _delimited(tag: bytes, payload: bytes) -> bytes:
    size = len(payload)
    return b"".join((tag, _BYTE[size] if size < 0x80 else _varint(size), payload))


def _any_value(value: Attribute) -> bytes:
    """AnyValue: 1 string, 2 bool, 3 int64 (varint), 4 double (fixed64)."""
    if isinstance(value, str):
        return _delimited(b"\x0a", value.encode("utf-8", "surrogatepass"))
    if value is True:
        return b"\x10\x01"
    if value is False:
        return b"\x10\x00"
    if isinstance(value, int):
        if _INT64_MIN <= value <= _INT64_MAX:
            # Negative int64 is the 10-byte two's complement varint, as protobuf writes it.
            return b"\x18" + _varint(value & _MASK64)
        return _delimited(b"\x0a", str(value).encode())  # beyond int64: keep it readable
    if isinstance(value, float):
        return b"\x21" + _pack_double(value)
    return _delimited(b"\x0a", str(value).encode("utf-8", "surrogatepass"))


def _key_prefix(key: str) -> bytes:
    prefix = _KEY_CACHE.get(key)
    if prefix is None:
        # proto3 leaves an empty string out; writing it would still decode, but differently.
        prefix = _delimited(b"\x0a", key.encode("utf-8", "surrogatepass")) if key else b""
        if len(_KEY_CACHE) < _KEY_CACHE_MAX:
            _KEY_CACHE[key] = prefix
    return prefix


def _key_value(key: str, value: Attribute) -> bytes:
    """KeyValue: 1 key, 2 AnyValue."""
    any_value = _any_value(value)
    size = len(any_value)
    return b"".join(
        (_key_prefix(key), b"\x12", _BYTE[size] if size < 0x80 else _varint(size), any_value)
    )


# Encoded name + kind (fields 5, 6) and attributes (field 9) of a span, each keyed by exactly
# what it encodes: a sidecar's spans repeat a few shapes (same route, same status), so most
# spans only add ids, times and status. The times (7, 8) sit between the two in field order.
_NAME_CACHE: dict[tuple[str, int], bytes] = {}
_ATTRS_CACHE: dict[tuple[object, ...], bytes] = {}
_SHAPE_CACHE_MAX = 4096


def _name_kind(name: str, kind: int) -> bytes:
    out = _delimited(b"\x2a", name.encode("utf-8", "surrogatepass")) if name else b""
    if kind:
        out += b"\x30" + (_BYTE[kind] if 0 < kind < 0x80 else _varint(kind & _MASK64))
    return out


def _attributes(attributes: dict[str, Attribute]) -> bytes:
    parts: list[bytes] = []
    for key, value in attributes.items():
        if value.__class__ is str and len(value) <= _ATTR_CACHE_VALUE_MAX:
            pair = (key, value)
            field = _ATTR_CACHE.get(pair)
            if field is None:
                field = _delimited(b"\x4a", _key_value(key, value))
                if len(_ATTR_CACHE) < _ATTR_CACHE_MAX:
                    _ATTR_CACHE[pair] = field
            parts.append(field)
        else:
            parts.append(_delimited(b"\x4a", _key_value(key, value)))
    return b"".join(parts)


def encode_span(span: Span) -> bytes:
    """One trace.v1.Span message (without its field tag)."""
    parts = [b"\x0a\x10", span.trace_id, b"\x12\x08", span.span_id]
    if span.tracestate:
        parts.append(_delimited(b"\x1a", span.tracestate.encode()))
    if span.parent:
        parts += (b"\x22\x08", span.parent_id)
    shape = (span.name, span.kind)
    head = _NAME_CACHE.get(shape)
    if head is None:
        head = _name_kind(*shape)
        if len(_NAME_CACHE) < _SHAPE_CACHE_MAX:
            _NAME_CACHE[shape] = head
    parts.append(head)
    start = span.start_ns
    end = span.end_ns or start
    if start:
        parts += (b"\x39", _pack_fixed64(start))
    if end:
        parts += (b"\x41", _pack_fixed64(end))
    attributes = span.attributes
    if attributes.__class__ is SharedAttributes:
        # One dict many spans share and nobody changes: its encoding is kept on it.
        encoded = attributes.encoded
        if encoded is None:
            encoded = attributes.encoded = _attributes(attributes)
    else:
        try:
            key: tuple[object, ...] = tuple(attributes.items())
            encoded = _ATTRS_CACHE.get(key)
        except TypeError:  # an unhashable value (not an Attribute, but never fail the export)
            key, encoded = (), None
        if encoded is None:
            encoded = _attributes(attributes)
            if key and len(_ATTRS_CACHE) < _SHAPE_CACHE_MAX:
                _ATTRS_CACHE[key] = encoded
    parts.append(encoded)
    code = span.status_code
    message = span.status_message
    if code or message:
        # Status: 2 message, 3 code.
        status = b""
        if message:
            status = _delimited(b"\x12", message.encode("utf-8", "surrogatepass"))
        if code:
            status += b"\x18" + _BYTE[code & 0x7F]
        parts.append(_delimited(b"\x7a", status))
    parts.append(_FLAGS)
    return b"".join(parts)


def _head(service_name: str) -> tuple[bytes, bytes]:
    head = _HEAD_CACHE.get(service_name)
    if head is None:
        # ResourceSpans.resource (1) = Resource{attributes (1) = [service.name]}.
        resource = _delimited(
            b"\x0a", _delimited(b"\x0a", _key_value("service.name", service_name))
        )
        # ScopeSpans.scope (1) = InstrumentationScope{name (1)}.
        scope = _delimited(b"\x0a", _delimited(b"\x0a", SCOPE_NAME.encode()))
        head = (resource, scope)
        if len(_HEAD_CACHE) < 16:
            _HEAD_CACHE[service_name] = head
    return head


_pack_times = struct.Struct("<BQBQ").pack  # start (field 7) and end (field 8), both fixed64


def _encode_plain(span: Span) -> bytes | None:
    """The common span, fast: shared attributes already encoded, no tracestate, no status
    message, both times set. None for any other span (encode_span handles every case)."""
    attributes = span.attributes
    if attributes.__class__ is not SharedAttributes:
        return None
    encoded = attributes.encoded
    start = span.start_ns
    end = span.end_ns
    if encoded is None or span.tracestate or span.status_message or not start or not end:
        return None
    head = _NAME_CACHE.get((span.name, span.kind))
    status = _STATUS_CODE.get(span.status_code)
    if head is None or status is None:
        return None
    tp = span.traceparent
    parent = span.parent
    # trace_id (1), span_id (2) and parent_span_id (4) written in hex, then decoded at once.
    if parent:
        ids = b"0a10%s1208%s2208%s" % (tp[3:35], tp[36:52], parent)
        size = 62 + len(head) + len(encoded) + len(status)  # ids 38, times 18, flags 6
    else:
        ids = b"0a10%s1208%s" % (tp[3:35], tp[36:52])
        size = 52 + len(head) + len(encoded) + len(status)
    lead = _LEAD.get(size)
    if lead is None:
        lead = b"\x12" + _varint(size)  # ScopeSpans.spans (2) and the size
        if len(_LEAD) < _SHAPE_CACHE_MAX:
            _LEAD[size] = lead
    return b"".join(
        (lead, _unhexlify(ids), head, _pack_times(0x39, start, 0x41, end), encoded, status, _FLAGS)
    )


# Status (field 15) with only a code: 0 is left out, as proto3 does.
_STATUS_CODE = {0: b"", 1: b"\x7a\x02\x18\x01", 2: b"\x7a\x02\x18\x02"}


def encode_spans(spans: Sequence[Span]) -> bytes:
    """`spans` as ScopeSpans.spans (2) fields."""
    out: list[bytes] = []
    for span in spans:
        field = _encode_plain(span)
        out.append(field if field is not None else _delimited(b"\x12", encode_span(span)))
    return b"".join(out)


def encode_export_request(spans: Sequence[Span], service_name: str) -> bytes:
    """ExportTraceServiceRequest{resource_spans: [one resource, one scope, all `spans`]}."""
    resource, scope = _head(service_name)
    scope_spans = scope + encode_spans(spans)
    resource_spans = b"".join((resource, _delimited(b"\x12", scope_spans)))  # .scope_spans (2)
    return _delimited(b"\x0a", resource_spans)  # ExportTraceServiceRequest.resource_spans (1)
