"""The hand-written OTLP encoder, checked by decoding its bytes with the official protos."""

from __future__ import annotations

import random

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1 import trace_pb2

from pillion.observability.otlp import SCOPE_NAME, encode_export_request
from pillion.observability.tracing import (
    CLIENT,
    CONSUMER,
    INTERNAL,
    PRODUCER,
    SERVER,
    Attribute,
    Span,
    SpanContext,
)

TRACE_ID = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
SPAN_ID = bytes.fromhex("00f067aa0ba902b7")
PARENT_ID = bytes.fromhex("1122334455667788")


def make_span(
    name: str = "/v1.0/state/statestore",
    *,
    kind: int = SERVER,
    parent_id: bytes = PARENT_ID,
    tracestate: str = "",
    attributes: dict[str, Attribute] | None = None,
    start_ns: int = 1_700_000_000_123_456_789,
    end_ns: int = 1_700_000_000_223_456_789,
    status: tuple[int, str] = (0, ""),
    trace_id: bytes = TRACE_ID,
    span_id: bytes = SPAN_ID,
) -> Span:
    ctx = SpanContext(trace_id, span_id, True, tracestate)
    span = Span(None, name, ctx.traceparent, tracestate, parent_id.hex().encode(), kind, start_ns)
    span.end_ns = end_ns
    span.attributes = dict(attributes or {})
    span.status_code, span.status_message = status
    return span


def decode(data: bytes) -> ExportTraceServiceRequest:
    request: ExportTraceServiceRequest = ExportTraceServiceRequest.FromString(data)
    # Re-encoding with the official library must give what we wrote: no unknown fields, and
    # the same canonical field order protobuf uses.
    assert request.SerializeToString() == data
    return request


def attribute_value(any_value: AnyValue) -> Attribute:
    which = any_value.WhichOneof("value")
    assert which in ("string_value", "bool_value", "int_value", "double_value")
    value: Attribute = getattr(any_value, which)
    return value


def check_span(decoded: trace_pb2.Span, span: Span) -> None:
    """Compare every field of the decoded span with the pillion span."""
    assert decoded.trace_id == span.context.trace_id
    assert decoded.span_id == span.context.span_id
    assert decoded.trace_state == span.context.tracestate
    assert decoded.parent_span_id == span.parent_id
    assert decoded.flags == 1  # sampled
    assert decoded.name == span.name
    assert decoded.kind == span.kind
    assert decoded.start_time_unix_nano == span.start_ns
    assert decoded.end_time_unix_nano == span.end_ns
    got = {kv.key: attribute_value(kv.value) for kv in decoded.attributes}
    assert got == span.attributes
    # bool and int compare equal in Python: check the wire types too.
    for kv in decoded.attributes:
        expected = span.attributes[kv.key]
        kind = {bool: "bool_value", int: "int_value", float: "double_value", str: "string_value"}
        assert kv.value.WhichOneof("value") == kind[type(expected)]
    assert decoded.status.code == span.status_code
    assert decoded.status.message == span.status_message
    assert decoded.dropped_attributes_count == 0
    assert list(decoded.events) == [] and list(decoded.links) == []


def test_request_shape_and_resource() -> None:
    spans = [make_span(), make_span("second", kind=CLIENT, span_id=PARENT_ID[::-1])]
    request = decode(encode_export_request(spans, "orders"))
    assert len(request.resource_spans) == 1
    resource_spans = request.resource_spans[0]
    attributes = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
    assert attributes == {"service.name": "orders"}
    assert resource_spans.schema_url == ""
    assert len(resource_spans.scope_spans) == 1
    scope_spans = resource_spans.scope_spans[0]
    assert scope_spans.scope.name == SCOPE_NAME == "pillion"
    assert len(scope_spans.spans) == 2
    for decoded, span in zip(scope_spans.spans, spans, strict=True):
        check_span(decoded, span)


def test_empty_batch() -> None:
    request = decode(encode_export_request([], "svc"))
    assert list(request.resource_spans[0].scope_spans[0].spans) == []


def test_all_attribute_types() -> None:
    attributes: dict[str, Attribute] = {
        "dapr.api": "GET /v1.0/state/statestore",
        "empty": "",
        "unicode": "héllo wörld ✓ 🚀",
        "true": True,
        "false": False,
        "zero": 0,
        "small": 7,
        "status": 200,
        "negative": -1,
        "min64": -(1 << 63),
        "max64": (1 << 63) - 1,
        "pi": 3.14159,
        "negative_float": -2.5,
        "float_zero": 0.0,
        "long": "x" * 300,
        "ключ": "значение",
        "": "empty key",
    }
    span = make_span(attributes=attributes)
    request = decode(encode_export_request([span], "svc"))
    check_span(request.resource_spans[0].scope_spans[0].spans[0], span)


def test_int_beyond_int64_is_sent_as_text() -> None:
    span = make_span(attributes={"big": 1 << 70})
    decoded = decode(encode_export_request([span], "svc")).resource_spans[0].scope_spans[0]
    value = decoded.spans[0].attributes[0].value
    assert value.string_value == str(1 << 70)


@pytest.mark.parametrize(
    ("status", "tracestate"),
    [
        ((2, "boom: store unavailable"), "rojo=1,congo=2"),
        ((1, ""), ""),
        ((2, ""), ""),
        ((0, ""), "a=b"),
    ],
)
def test_status_and_tracestate(status: tuple[int, str], tracestate: str) -> None:
    span = make_span(status=status, tracestate=tracestate)
    decoded = decode(encode_export_request([span], "svc")).resource_spans[0].scope_spans[0]
    check_span(decoded.spans[0], span)


@pytest.mark.parametrize("kind", [INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER])
def test_kinds_and_root_spans(kind: int) -> None:
    span = make_span(kind=kind, parent_id=b"")
    decoded = decode(encode_export_request([span], "svc")).resource_spans[0].scope_spans[0]
    check_span(decoded.spans[0], span)
    assert decoded.spans[0].kind == getattr(
        trace_pb2.Span.SpanKind,
        {1: "SPAN_KIND_INTERNAL", 2: "SPAN_KIND_SERVER", 3: "SPAN_KIND_CLIENT"}.get(
            kind, {4: "SPAN_KIND_PRODUCER", 5: "SPAN_KIND_CONSUMER"}.get(kind, "")
        ),
    )


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16383, 16384, 70000])
def test_lengths_across_varint_boundaries(size: int) -> None:
    span = make_span(name="n" * size, attributes={"k": "v" * size})
    decoded = decode(encode_export_request([span], "s" * size)).resource_spans[0]
    assert decoded.resource.attributes[0].value.string_value == "s" * size
    check_span(decoded.scope_spans[0].spans[0], span)


def test_extreme_timestamps() -> None:
    span = make_span(start_ns=0, end_ns=(1 << 64) - 1)
    decoded = decode(encode_export_request([span], "svc")).resource_spans[0].scope_spans[0]
    check_span(decoded.spans[0], span)


def test_unended_span_reports_its_start_as_end() -> None:
    span = make_span(end_ns=0)
    decoded = decode(encode_export_request([span], "svc")).resource_spans[0].scope_spans[0]
    assert decoded.spans[0].end_time_unix_nano == span.start_ns


def test_cached_encodings_stay_exact() -> None:
    # The same (key, value) pairs go through the attribute cache on later spans; 1 and True
    # compare equal in Python but must keep their own wire types.
    rng = random.Random(3)
    spans = []
    mixed: list[Attribute] = [1, 1.0, True, "1"]
    for i in range(50):
        attributes: dict[str, Attribute] = {
            "dapr.protocol": rng.choice(["http", "grpc"]),
            "flag": rng.choice([True, False, 1, 0]),
            "n": rng.choice(mixed),
            "i": i,
        }
        spans.append(make_span(f"op{i}", attributes=attributes, span_id=rng.randbytes(8)))
    for _ in range(2):
        decoded = decode(encode_export_request(spans, "svc")).resource_spans[0].scope_spans[0]
        for got, span in zip(decoded.spans, spans, strict=True):
            check_span(got, span)


@pytest.mark.parametrize("code", [0, 1, 2])
@pytest.mark.parametrize("parent", [b"", b"\x01" * 8])
def test_plain_span_fast_path_matches_the_general_encoding(code: int, parent: bytes) -> None:
    """Spans with shared attributes take a fast path; its bytes must be the general path's."""
    from pillion.observability.otlp import _delimited, encode_span, encode_spans
    from pillion.observability.tracing import SharedAttributes, Span, SpanContext

    ctx = SpanContext(b"\x02" * 16, b"\x03" * 8, True)
    attrs = SharedAttributes({"dapr.api": "GET /x", "dapr.status_code": 200})
    spans = []
    for _ in range(2):  # the first fills the caches, the second takes the fast path
        span = Span(
            None, "CallLocal/a/x", ctx.traceparent, "", parent.hex().encode(), SERVER, 1_000
        )
        span.attributes = attrs
        span.end_ns = 2_000
        span.status_code = code
        spans.append(span)
    first = encode_spans(spans[:1])
    second = encode_spans(spans[1:])
    assert first == second == _delimited(b"\x12", encode_span(spans[1]))
    request = ExportTraceServiceRequest.FromString(encode_export_request(spans, "svc"))
    got = request.resource_spans[0].scope_spans[0].spans
    assert [s.status.code for s in got] == [code, code]
    assert [s.parent_span_id for s in got] == [parent, parent]
