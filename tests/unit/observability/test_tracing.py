"""Tests of trace context parsing, Dapr's sampler, spans and the tracer's batching loop."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import pytest

from pillion.observability import tracing
from pillion.observability.tracing import (
    CLIENT,
    CONSUMER,
    INTERNAL,
    PRODUCER,
    SERVER,
    Span,
    SpanContext,
    Tracer,
    canonical_traceparent,
    format_grpc_trace_bin,
    format_traceparent,
    parse_grpc_trace_bin,
    parse_traceparent,
    parse_tracestate,
    sampling_rate,
)
from tests.polling import until

T = TypeVar("T")

# The example of W3C trace-context §3.2.
TRACE_ID = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
SPAN_ID = bytes.fromhex("00f067aa0ba902b7")
EXAMPLE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on a fresh loop, bounded so a bug cannot hang the suite."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, 30)

    return asyncio.run(bounded())


class Recorder:
    """An exporter that keeps every batch it is given."""

    def __init__(self, fail: bool = False, hang: bool = False) -> None:
        self.batches: list[list[Span]] = []
        self.services: list[str] = []
        self.closed = False
        self.fail = fail
        self.hang = hang

    @property
    def spans(self) -> list[Span]:
        return [span for batch in self.batches for span in batch]

    async def export(self, spans: Sequence[Span], service_name: str) -> None:
        if self.hang:
            await asyncio.Event().wait()
        if self.fail:
            raise RuntimeError("exporter broke")
        self.batches.append(list(spans))
        self.services.append(service_name)

    async def close(self) -> None:
        self.closed = True


# ---- traceparent -------------------------------------------------------------------------------


def test_parse_spec_example() -> None:
    ctx = parse_traceparent(EXAMPLE)
    assert ctx is not None
    assert ctx.trace_id == TRACE_ID
    assert ctx.span_id == SPAN_ID
    assert ctx.sampled is True
    assert ctx.tracestate == ""


def test_parse_bytes_and_tracestate() -> None:
    ctx = parse_traceparent(EXAMPLE.encode(), b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    assert ctx is not None
    assert ctx.tracestate == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"


@pytest.mark.parametrize(
    ("flags", "sampled"), [("00", False), ("01", True), ("02", False), ("03", True), ("ff", True)]
)
def test_sampled_is_the_low_bit_of_flags(flags: str, sampled: bool) -> None:
    ctx = parse_traceparent(EXAMPLE[:-2] + flags)
    assert ctx is not None
    assert ctx.sampled is sampled


@pytest.mark.parametrize("sampled", [True, False])
def test_format_round_trip(sampled: bool) -> None:
    ctx = SpanContext(TRACE_ID, SPAN_ID, sampled, "a=b")
    value = format_traceparent(ctx)
    assert value == (EXAMPLE[:-2] + ("01" if sampled else "00")).encode()
    back = parse_traceparent(value, ctx.tracestate)
    assert back == ctx


def test_random_round_trips() -> None:
    rng = random.Random(7)
    for _ in range(200):
        ctx = SpanContext(rng.randbytes(16), rng.randbytes(8), rng.random() < 0.5)
        assert parse_traceparent(format_traceparent(ctx)) == ctx


def test_surrounding_whitespace_is_allowed() -> None:
    assert parse_traceparent(f" \t{EXAMPLE} ") == parse_traceparent(EXAMPLE)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "00",
        EXAMPLE[:-1],  # too short
        EXAMPLE + "-extra",  # version 00 has exactly four fields
        EXAMPLE + "0",
        EXAMPLE.upper(),  # hex must be lowercase
        EXAMPLE.replace("4bf9", "4BF9"),
        EXAMPLE.replace("4bf9", "4bg9"),
        EXAMPLE.replace("-00f0", "_00f0"),
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff is invalid
        "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
        "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".replace("4736", "47é6"),
        "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",  # future: "-" must follow
    ],
)
def test_invalid_traceparent_is_rejected(value: str | None) -> None:
    assert parse_traceparent(value) is None
    if value is not None:  # headers arrive as bytes, which take a faster path
        assert parse_traceparent(value.encode()) is None


@pytest.mark.parametrize(
    "value",
    [
        "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-will-be-like",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09",
    ],
)
def test_future_versions_are_read_like_version_00(value: str) -> None:
    ctx = parse_traceparent(value)
    assert ctx is not None
    assert (ctx.trace_id, ctx.span_id, ctx.sampled) == (TRACE_ID, SPAN_ID, True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (EXAMPLE, EXAMPLE),
        (EXAMPLE[:-2] + "00", EXAMPLE[:-2] + "00"),
        (EXAMPLE[:-2] + "03", EXAMPLE),  # flags other than 00/01: only the sampled bit goes on
        (EXAMPLE[:-2] + "0a", EXAMPLE[:-2] + "00"),
        (EXAMPLE[:-2] + "ff", EXAMPLE),
        ("cc" + EXAMPLE[2:] + "-future", EXAMPLE),  # a future version is sent on as version 00
        (f" {EXAMPLE}\t", EXAMPLE),
        (EXAMPLE.upper(), None),
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),
    ],
)
def test_canonical_traceparent(value: str, expected: str | None) -> None:
    want = None if expected is None else expected.encode()
    assert canonical_traceparent(value) == want
    assert canonical_traceparent(value.encode()) == want


def test_canonical_header_is_used_as_it_came() -> None:
    header = EXAMPLE.encode()
    assert canonical_traceparent(header) is header
    ctx = parse_traceparent(header)
    assert ctx is not None and ctx.traceparent is header


@pytest.mark.parametrize("sampled", [True, False])
def test_continue_header_makes_a_child(sampled: bool) -> None:
    tracer = Tracer("app", 1.0)
    parent = (EXAMPLE[:-2] + ("01" if sampled else "00")).encode()
    span, child = tracer.continue_header("op", parent, "a=b", SERVER)
    assert len(child) == 55
    assert child[:36] == parent[:36]  # version and trace id
    assert child[52:] == parent[52:]  # flags
    assert child[36:52] not in (parent[36:52], b"0" * 16)
    assert canonical_traceparent(child) is child
    if not sampled:
        assert span is None
        return
    assert span is not None
    assert (span.traceparent, span.tracestate, span.parent) == (child, "a=b", parent[36:52])
    assert span.parent_id == SPAN_ID and span.trace_id == TRACE_ID
    assert span.span_id == bytes.fromhex(child[36:52].decode())


def test_continue_header_without_parent_starts_a_trace() -> None:
    span, child = Tracer("app", 1.0).continue_header("op", None, "", SERVER)
    assert span is not None and span.parent == b"" and span.parent_id == b""
    assert span.traceparent == child and child.endswith(b"-01")
    assert canonical_traceparent(child) is child
    unsampled, child = Tracer("app", 1e-9).continue_header("op", None, "", SERVER)
    assert unsampled is None and child.endswith(b"-00")


def test_invalid_traceparent_drops_tracestate_too() -> None:
    assert parse_traceparent("garbage", "a=b") is None


# ---- tracestate --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ""),
        ("", ""),
        ("rojo=00f067aa0ba902b7", "rojo=00f067aa0ba902b7"),
        ("rojo=1 , congo=2", "rojo=1,congo=2"),
        ("rojo=1,,\t,congo=2", "rojo=1,congo=2"),  # empty members are skipped
        ("tenant@vendor=x", "tenant@vendor=x"),
        (b"a=b", "a=b"),
        ("Rojo=1", ""),  # keys are lowercase
        ("rojo", ""),
        ("rojo=1,rojo=2", ""),  # duplicate keys invalidate the header
        ("rojo=a=b", ""),  # "=" is not allowed in values
        ("rojo=ü", ""),
        (b"rojo=\xff", ""),
        (",".join(f"k{i}=v" for i in range(33)), ""),  # at most 32 members
    ],
)
def test_tracestate(value: str | bytes | None, expected: str) -> None:
    assert parse_tracestate(value) == expected


def test_32_tracestate_members_are_kept() -> None:
    value = ",".join(f"k{i}=v" for i in range(32))
    assert parse_tracestate(value) == value


# ---- grpc-trace-bin ----------------------------------------------------------------------------


@pytest.mark.parametrize("sampled", [True, False])
def test_grpc_trace_bin_round_trip(sampled: bool) -> None:
    ctx = SpanContext(TRACE_ID, SPAN_ID, sampled)
    value = format_grpc_trace_bin(ctx)
    assert len(value) == 29
    assert value == b"\x00\x00" + TRACE_ID + b"\x01" + SPAN_ID + (
        b"\x02\x01" if sampled else b"\x02\x00"
    )
    assert parse_grpc_trace_bin(value) == ctx


def test_grpc_trace_bin_options_are_optional() -> None:
    ctx = parse_grpc_trace_bin(b"\x00\x00" + TRACE_ID + b"\x01" + SPAN_ID)
    assert ctx == SpanContext(TRACE_ID, SPAN_ID, False)


def test_grpc_trace_bin_ignores_trailing_fields() -> None:
    value = format_grpc_trace_bin(SpanContext(TRACE_ID, SPAN_ID, True)) + b"\x03\x07"
    assert parse_grpc_trace_bin(value) == SpanContext(TRACE_ID, SPAN_ID, True)


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        b"\x01\x00" + TRACE_ID + b"\x01" + SPAN_ID + b"\x02\x01",  # unknown version
        b"\x00\x01" + SPAN_ID + b"\x02\x01",  # no trace id
        b"\x00\x00" + TRACE_ID[:10],  # truncated
        b"\x00\x00" + TRACE_ID + b"\x02\x01",  # no span id
        b"\x00\x00" + bytes(16) + b"\x01" + SPAN_ID + b"\x02\x01",
        b"\x00\x00" + TRACE_ID + b"\x01" + bytes(8) + b"\x02\x01",
    ],
)
def test_invalid_grpc_trace_bin_is_rejected(value: bytes | None) -> None:
    assert parse_grpc_trace_bin(value) is None


# ---- sampler -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", 1.0),
        ("0", 0.0),
        ("0.5", 0.5),
        (1, 1.0),
        (0.25, 0.25),
        ("2", 1.0),
        ("-1", 0.0),
        (None, 0.0001),
        ("", 0.0001),
        ("abc", 0.0001),
        ("nan", 0.0001),
        (True, 0.0001),
        ([1], 0.0001),
    ],
)
def test_sampling_rate_from_configuration(value: object, expected: float) -> None:
    assert sampling_rate(value) == expected


SAMPLED_PARENT = SpanContext(TRACE_ID, SPAN_ID, True, "vendor=1")
UNSAMPLED_PARENT = SpanContext(TRACE_ID, SPAN_ID, False, "vendor=1")


@pytest.mark.parametrize("parent", [None, SAMPLED_PARENT, UNSAMPLED_PARENT])
def test_rate_0_is_off(parent: SpanContext | None) -> None:
    tracer = Tracer("app", 0.0)
    assert tracer.enabled is False
    span, ctx = tracer.start("op", parent, SERVER)
    assert span is None
    assert ctx is parent
    assert tracer.queued == 0


def test_rate_1_without_parent_starts_a_sampled_trace() -> None:
    tracer = Tracer("app", 1.0)
    span, ctx = tracer.start("op", None, SERVER)
    assert span is not None and ctx is not None
    assert span.context == ctx
    assert ctx.sampled is True
    assert len(ctx.trace_id) == 16 and ctx.trace_id != bytes(16)
    assert len(ctx.span_id) == 8 and ctx.span_id != bytes(8)
    assert ctx.tracestate == ""
    assert span.parent_id == b""
    assert span.kind == SERVER
    assert span.name == "op"
    assert span.start_ns > 0 and span.end_ns == 0
    assert (span.status_code, span.status_message, span.attributes) == (0, "", {})


@pytest.mark.parametrize("rate", [1.0, 0.5, 0.0001])
def test_sampled_parent_is_followed(rate: float) -> None:
    tracer = Tracer("app", rate)
    span, ctx = tracer.start("op", SAMPLED_PARENT, CLIENT)
    assert span is not None and ctx is not None
    assert ctx.trace_id == TRACE_ID
    assert ctx.span_id not in (SPAN_ID, bytes(8))
    assert ctx.sampled is True
    assert ctx.tracestate == "vendor=1"
    assert span.parent_id == SPAN_ID
    assert span.kind == CLIENT


@pytest.mark.parametrize("rate", [1.0, 0.5, 0.0001])
def test_unsampled_parent_is_followed_and_builds_no_span(
    rate: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[object] = []

    class CountingSpan(Span):
        __slots__ = ()

        def __init__(self, *args: Any) -> None:
            built.append(args)
            super().__init__(*args)

    monkeypatch.setattr(tracing, "Span", CountingSpan)
    tracer = Tracer("app", rate)
    span, ctx = tracer.start("op", UNSAMPLED_PARENT, SERVER)
    assert span is None
    assert ctx is not None
    assert ctx.trace_id == TRACE_ID
    assert ctx.span_id not in (SPAN_ID, bytes(8))
    assert ctx.sampled is False
    assert ctx.tracestate == "vendor=1"
    assert built == []
    sampled, _ = tracer.start("op", SAMPLED_PARENT, SERVER)
    assert isinstance(sampled, CountingSpan) and len(built) == 1


def _otel_decision(trace_id: bytes, rate: float) -> bool:
    # go.opentelemetry.io/otel/sdk/trace TraceIDRatioBased, written out independently.
    if rate >= 1:
        return True
    bound = int(rate * (1 << 63))
    return (int.from_bytes(trace_id[8:16], "big") >> 1) < bound


@pytest.mark.parametrize("rate", [0.5, 0.1, 0.9])
def test_ratio_without_parent_matches_opentelemetry(rate: float) -> None:
    tracer = Tracer("app", rate)
    sampled = 0
    total = 4000
    for _ in range(total):
        span, ctx = tracer.start("op", None, SERVER)
        assert ctx is not None
        assert ctx.sampled is _otel_decision(ctx.trace_id, rate)
        assert (span is not None) is ctx.sampled
        sampled += ctx.sampled
    assert abs(sampled / total - rate) < 0.05


def test_rate_1_samples_the_largest_trace_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracing, "_getrandbits", lambda bits: (1 << bits) - 1)
    span, ctx = Tracer("app", 1.0).start("op", None, SERVER)
    assert span is not None and ctx is not None and ctx.trace_id == b"\xff" * 16


def test_ids_are_never_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    values = iter([0, 5, 0, 7])
    monkeypatch.setattr(tracing, "_getrandbits", lambda bits: next(values))
    _, ctx = Tracer("app", 1.0).start("op", None, SERVER)
    assert ctx is not None
    assert int.from_bytes(ctx.trace_id, "big") == 5
    assert int.from_bytes(ctx.span_id, "big") == 7


def test_kind_numbers_are_otlp() -> None:
    assert (INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER) == (1, 2, 3, 4, 5)


# ---- spans -------------------------------------------------------------------------------------


def test_span_set_and_end() -> None:
    tracer = Tracer("app", 1.0)
    span, _ = tracer.start("op", None, SERVER)
    assert span is not None
    span.set("a", "x")
    span.set("b", 1)
    span.set("c", 1.5)
    span.set("d", True)
    span.set("a", "y")
    span.end()
    assert span.attributes == {"a": "y", "b": 1, "c": 1.5, "d": True}
    assert span.end_ns >= span.start_ns
    assert span.status_code == 0
    assert tracer.queued == 1


def test_span_end_with_error_and_idempotence() -> None:
    tracer = Tracer("app", 1.0)
    span, _ = tracer.start("op", None, SERVER)
    assert span is not None
    span.end("boom")
    first = span.end_ns
    span.end()
    span.end("again")
    assert (span.status_code, span.status_message, span.end_ns) == (2, "boom", first)
    assert tracer.queued == 1


def test_queue_overflow_drops_the_newest_and_counts() -> None:
    tracer = Tracer("app", 1.0, max_queue=3)
    spans = []
    for i in range(5):
        span, _ = tracer.start(f"op{i}", None, SERVER)
        assert span is not None
        span.end()
        spans.append(span)
    assert tracer.queued == 3
    assert tracer.dropped == 2
    assert [s.name for s in tracer._queue] == ["op0", "op1", "op2"]


# ---- the export loop ---------------------------------------------------------------------------


def _end(tracer: Tracer, count: int, prefix: str = "op") -> None:
    for i in range(count):
        span, _ = tracer.start(f"{prefix}{i}", None, SERVER)
        assert span is not None
        span.end()


def test_flush_on_batch_size() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        tracer = Tracer("svc", 1.0, [recorder], flush_interval=3600, batch_size=4)
        task = asyncio.create_task(tracer.run())
        await asyncio.sleep(0)
        _end(tracer, 3)
        for _ in range(20):
            await asyncio.sleep(0)
        assert recorder.batches == []  # below batch_size and long before the interval
        _end(tracer, 1, "last")
        await until(lambda: len(recorder.spans) == 4)
        assert [len(b) for b in recorder.batches] == [4]
        assert recorder.services == ["svc"]
        await tracer.close()
        await task

    run(scenario())


def test_flush_on_interval() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        tracer = Tracer("svc", 1.0, [recorder], flush_interval=0.05, batch_size=100)
        task = asyncio.create_task(tracer.run())
        _end(tracer, 2)
        await until(lambda: len(recorder.spans) == 2)
        _end(tracer, 1, "later")
        await until(lambda: len(recorder.spans) == 3)
        assert [s.name for s in recorder.spans] == ["op0", "op1", "later0"]
        await tracer.close()
        await asyncio.wait_for(task, 1)

    run(scenario())


def test_large_backlog_is_exported_in_batch_size_chunks() -> None:
    async def scenario() -> None:
        recorder = Recorder()
        tracer = Tracer("svc", 1.0, [recorder], flush_interval=3600, batch_size=4)
        _end(tracer, 10)
        await tracer.flush()
        assert [len(b) for b in recorder.batches] == [4, 4, 2]
        assert tracer.queued == 0

    run(scenario())


def test_close_flushes_and_closes_exporters() -> None:
    async def scenario() -> None:
        first, second = Recorder(), Recorder()
        tracer = Tracer("svc", 1.0, [first, second], flush_interval=3600)
        _end(tracer, 3)
        await tracer.close()
        assert len(first.spans) == 3 and len(second.spans) == 3
        assert first.closed and second.closed
        # Spans ending after close are dropped and counted, not kept.
        _end(tracer, 1)
        assert tracer.queued == 0 and tracer.dropped == 1
        await tracer.close()  # idempotent

    run(scenario())


def test_close_stops_run() -> None:
    async def scenario() -> None:
        tracer = Tracer("svc", 1.0, [Recorder()], flush_interval=3600)
        task = asyncio.create_task(tracer.run())
        await asyncio.sleep(0)
        await tracer.close()
        await asyncio.wait_for(task, 1)

    run(scenario())


def test_failing_exporter_does_not_break_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        broken, good = Recorder(fail=True), Recorder()
        tracer = Tracer("svc", 1.0, [broken, good], flush_interval=0.02)
        task = asyncio.create_task(tracer.run())
        _end(tracer, 1)
        await until(lambda: len(good.spans) == 1)
        _end(tracer, 1)
        await until(lambda: len(good.spans) == 2)
        assert not task.done()
        await tracer.close()
        await task

    with caplog.at_level(logging.WARNING, "pillion.observability.tracing"):
        run(scenario())
    warnings = [r for r in caplog.records if "exporter broke" in r.getMessage()]
    assert len(warnings) == 1  # at most one a minute


def test_close_is_bounded_when_an_exporter_hangs() -> None:
    async def scenario() -> None:
        hanging = Recorder(hang=True)
        tracer = Tracer("svc", 1.0, [hanging], flush_interval=3600)
        _end(tracer, 2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await tracer.close(timeout=0.1)
        assert loop.time() - started < 1.0
        assert hanging.closed

    run(scenario())


def test_no_exporters_discards() -> None:
    async def scenario() -> None:
        tracer = Tracer("svc", 1.0)
        _end(tracer, 3)
        await tracer.flush()
        assert tracer.queued == 0

    run(scenario())


def test_invalid_tracer_arguments() -> None:
    with pytest.raises(ValueError):
        Tracer("svc", 1.0, batch_size=0)
    with pytest.raises(ValueError):
        Tracer("svc", 1.0, flush_interval=0)


def test_record_false_propagates_without_spans() -> None:
    """A tracer with nowhere to export (record=False) builds no span but still propagates."""
    tracer = Tracer("svc", 1.0, record=False)
    span, ctx = tracer.start("op", None, SERVER)
    assert span is None and ctx is not None and ctx.sampled
    child_span, child = tracer.start("child", ctx, SERVER)
    assert child_span is None and child is not None
    assert child.trace_id == ctx.trace_id and child.span_id != ctx.span_id
