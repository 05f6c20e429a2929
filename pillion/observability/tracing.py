"""Trace context (W3C traceparent, grpc-trace-bin), Dapr's sampler, spans and the tracer."""

from __future__ import annotations

import asyncio
import binascii
import logging
import random
import re
import time
from collections.abc import Awaitable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pillion.observability.exporters import Exporter


__all__ = [
    "CLIENT",
    "CONSUMER",
    "INTERNAL",
    "KIND_NAMES",
    "PRODUCER",
    "SERVER",
    "Attribute",
    "SharedAttributes",
    "Span",
    "SpanContext",
    "Tracer",
    "canonical_traceparent",
    "format_grpc_trace_bin",
    "format_traceparent",
    "parse_grpc_trace_bin",
    "parse_traceparent",
    "parse_tracestate",
    "sampling_rate",
    "start_with_carrier",
]

_log = logging.getLogger("pillion.observability.tracing")

# OTLP SpanKind numbers, so the encoder writes them as they are.
INTERNAL = 1
SERVER = 2
CLIENT = 3
PRODUCER = 4
CONSUMER = 5
KIND_NAMES: dict[int, str] = {
    INTERNAL: "INTERNAL",
    SERVER: "SERVER",
    CLIENT: "CLIENT",
    PRODUCER: "PRODUCER",
    CONSUMER: "CONSUMER",
}

Attribute = str | int | float | bool

# Dapr's rate when samplingRate is absent or unparsable (pkg/diagnostics/utils).
DEFAULT_SAMPLING_RATE = 0.0001

_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)
_ZERO_TRACE_HEX = b"0" * 32
_ZERO_SPAN_HEX = b"0" * 16
_HEX_DIGITS = b"0123456789abcdef"
_ODD_DIGITS = b"13579bdf"  # a flags field's last hex digit when its low bit (sampled) is set
_new = object.__new__
_MASK64 = (1 << 64) - 1
_getrandbits = random.getrandbits
_time_ns = time.time_ns
_hexlify = binascii.hexlify
_unhexlify = binascii.unhexlify

# version "-" trace-id "-" parent-id "-" flags, lowercase hex only (W3C trace-context §3.2).
_TRACEPARENT = re.compile(rb"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
# One tracestate list-member (W3C trace-context §3.3.1): simple or multi-tenant key, then value.
_TS_MEMBER = re.compile(
    r"(?:[a-z][_0-9a-z\-*/]{0,255}|[a-z0-9][_0-9a-z\-*/]{0,240}@[a-z][_0-9a-z\-*/]{0,13})"
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"
)
_TS_MAX_MEMBERS = 32
_OWS = " \t"


class _TraceIds:
    """The ids a version-00 traceparent holds, decoded from its hex."""

    __slots__ = ()

    traceparent: bytes

    @property
    def trace_id(self) -> bytes:
        return _unhexlify(self.traceparent[3:35])

    @property
    def span_id(self) -> bytes:
        return _unhexlify(self.traceparent[36:52])


class SpanContext(_TraceIds):
    """The part of a span that crosses process boundaries, kept as the version-00 traceparent
    that carries it (so sending it on formats nothing); immutable by convention."""

    __slots__ = ("traceparent", "tracestate")

    traceparent: bytes
    tracestate: str

    def __init__(
        self, trace_id: bytes, span_id: bytes, sampled: bool, tracestate: str = ""
    ) -> None:
        self.traceparent = b"00-%s-%s-%s" % (
            _hexlify(trace_id),
            _hexlify(span_id),
            b"01" if sampled else b"00",
        )
        self.tracestate = tracestate

    @classmethod
    def of(cls, traceparent: bytes, tracestate: str = "") -> SpanContext:
        """The context a canonical traceparent (version 00, flags 00 or 01) already holds."""
        ctx = _new(cls)
        ctx.traceparent = traceparent
        ctx.tracestate = tracestate
        return ctx

    @property
    def sampled(self) -> bool:
        return self.traceparent[54] == 0x31

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SpanContext):
            return NotImplemented
        return self.traceparent == other.traceparent and self.tracestate == other.tracestate

    def __hash__(self) -> int:
        return hash((self.traceparent, self.tracestate))

    def __repr__(self) -> str:
        return (
            f"SpanContext({self.trace_id.hex()}, {self.span_id.hex()}, "
            f"sampled={self.sampled}, tracestate={self.tracestate!r})"
        )


# ---- W3C trace context ------------------------------------------------------------------------


def parse_traceparent(
    value: bytes | str | None, tracestate: bytes | str | None = None
) -> SpanContext | None:
    """Decode a W3C traceparent (and its tracestate); None when absent or invalid.

    Future versions are read as version 00 is, as the spec asks: the first four fields must be
    well formed and anything after them must start with "-".
    """
    if value is None:
        return None
    canonical = canonical_traceparent(value)
    if canonical is None:
        return None
    return SpanContext.of(canonical, parse_tracestate(tracestate) if tracestate else "")


def canonical_traceparent(value: bytes | str) -> bytes | None:
    """A traceparent header as the version-00 value its context is sent on with (flags 00 or
    01); None when invalid. A valid version-00 header with those flags is returned as is."""
    if isinstance(value, str):  # a CloudEvent's or a binding event's field
        try:
            value = value.encode("ascii")
        except UnicodeEncodeError:
            return None
    canonical = _canonical(value)
    return canonical if canonical is not None else _canonical_slow(value)


def _canonical(value: bytes) -> bytes | None:
    """A version-00 traceparent header as pillion sends it on (flags 00 or 01); None when it
    is not one, or is invalid (the general path decides)."""
    if (
        len(value) == 55
        and value[:3] == b"00-"
        and value[35] == 0x2D
        and value[52] == 0x2D
        and value.translate(None, _HEX_DIGITS) == b"---"  # the rest is lowercase hex
        and value[3:35] != _ZERO_TRACE_HEX
        and value[36:52] != _ZERO_SPAN_HEX
    ):
        if value[53] == 0x30 and (value[54] == 0x31 or value[54] == 0x30):
            return value
        return value[:53] + (b"01" if value[54] in _ODD_DIGITS else b"00")
    return None


def _canonical_slow(value: bytes) -> bytes | None:
    """What _canonical leaves: surrounding whitespace, later versions, and invalid values."""
    size = len(value)
    if size != 55:
        value = value.strip(b" \t")
        size = len(value)
        if size < 55:
            return None
    if _TRACEPARENT.match(value) is None:
        return None
    version = value[:2]
    if version == b"00":
        if size != 55:
            return None
    elif version == b"ff" or (size > 55 and value[55] != 0x2D):  # "-" after the known fields
        return None
    if value[3:35] == _ZERO_TRACE_HEX or value[36:52] == _ZERO_SPAN_HEX:
        return None
    return b"00" + value[2:53] + (b"01" if value[54] in _ODD_DIGITS else b"00")


def parse_tracestate(value: bytes | str | None) -> str:
    """Normalise a tracestate header; "" when absent or invalid (the spec says drop it whole)."""
    if not value:
        return ""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return ""
    members: list[str] = []
    keys: set[str] = set()
    for part in value.split(","):
        member = part.strip(_OWS)
        if not member:
            continue  # empty list-members are allowed and ignored
        if _TS_MEMBER.fullmatch(member) is None:
            return ""
        key = member.partition("=")[0]
        if key in keys:
            return ""
        keys.add(key)
        members.append(member)
    if len(members) > _TS_MAX_MEMBERS:
        return ""
    return ",".join(members)


def format_traceparent(ctx: SpanContext) -> bytes:
    """Encode `ctx` as a version 00 traceparent value."""
    return ctx.traceparent


# ---- grpc-trace-bin (OpenCensus binary format) ------------------------------------------------


def start_with_carrier(
    tracer: Tracer, name: str, carrier: Mapping[str, object], kind: int
) -> tuple[Span | None, dict[str, str]]:
    """A span under the W3C context a string carrier holds (a CloudEvent's fields, an event's
    metadata), and the carrier entries that send the span's own context on ({} when off)."""
    tp, ts = carrier.get("traceparent"), carrier.get("tracestate")
    parent = parse_traceparent(
        tp if isinstance(tp, str) else None, ts if isinstance(ts, str) else None
    )
    span, ctx = tracer.start(name, parent, kind)
    if ctx is None:
        return span, {}
    out = {"traceparent": format_traceparent(ctx).decode()}
    if ctx.tracestate:
        out["tracestate"] = ctx.tracestate
    return span, out


def parse_grpc_trace_bin(value: bytes | None) -> SpanContext | None:
    """Decode OpenCensus' binary trace context as gRPC clients send it; None when invalid.

    Version 0 only: field 0 (trace id) is required, field 1 (span id) and field 2 (options)
    follow in that order, as OpenCensus and Dapr read them.
    """
    if not value or value[0] != 0 or len(value) < 18 or value[1] != 0:
        return None
    trace_id = bytes(value[2:18])
    rest = value[18:]
    span_id = _ZERO_SPAN
    if len(rest) >= 9 and rest[0] == 1:
        span_id = bytes(rest[1:9])
        rest = rest[9:]
    sampled = len(rest) >= 2 and rest[0] == 2 and bool(rest[1] & 1)
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return SpanContext(trace_id, span_id, sampled)


def format_grpc_trace_bin(ctx: SpanContext) -> bytes:
    """Encode `ctx` in OpenCensus' binary format (29 bytes)."""
    return b"".join(
        (
            b"\x00\x00",
            ctx.trace_id,
            b"\x01",
            ctx.span_id,
            b"\x02\x01" if ctx.sampled else b"\x02\x00",
        )
    )


# ---- sampling ---------------------------------------------------------------------------------


def sampling_rate(value: object) -> float:
    """Configuration spec.tracing.samplingRate as Dapr reads it.

    Absent or unparsable means Dapr's default 0.0001; the result is clamped to [0, 1].
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return DEFAULT_SAMPLING_RATE
    try:
        rate = float(value)
    except ValueError:
        return DEFAULT_SAMPLING_RATE
    if rate != rate:  # NaN
        return DEFAULT_SAMPLING_RATE
    return min(max(rate, 0.0), 1.0)


# ---- spans ------------------------------------------------------------------------------------


class SharedAttributes(dict[str, Attribute]):
    """Attributes that many spans share (one per route, say) and nobody changes once made:
    exporters may keep their encoding on the object."""

    __slots__ = ("encoded",)

    def __init__(self, *args: object, **kwargs: Attribute) -> None:
        super().__init__(*args, **kwargs)
        self.encoded: bytes | None = None


class Span(_TraceIds):
    """One sampled operation; end() hands it to its tracer's export queue.

    Its ids stay in hex, as its traceparent carries them (the request path formats nothing);
    exporters decode them in batches. `parent` is the parent's span id in hex, b"" for a root.
    """

    __slots__ = (
        "_tracer",
        "attributes",
        "end_ns",
        "kind",
        "name",
        "parent",
        "start_ns",
        "status_code",
        "status_message",
        "traceparent",
        "tracestate",
    )

    name: str
    traceparent: bytes
    tracestate: str
    parent: bytes
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Attribute]
    status_code: int
    status_message: str

    def __init__(
        self,
        tracer: Tracer | None,
        name: str,
        traceparent: bytes,
        tracestate: str,
        parent: bytes,
        kind: int,
        start_ns: int,
    ) -> None:
        self._tracer = tracer
        self.name = name
        self.traceparent = traceparent
        self.tracestate = tracestate
        self.parent = parent
        self.kind = kind
        self.start_ns = start_ns
        self.end_ns = 0
        self.attributes = {}
        self.status_code = 0
        self.status_message = ""

    @property
    def context(self) -> SpanContext:
        return SpanContext.of(self.traceparent, self.tracestate)

    @property
    def parent_id(self) -> bytes:
        """The parent's span id (b"" for a root)."""
        return _unhexlify(self.parent)

    def set(self, key: str, value: Attribute) -> None:
        """Set one attribute (last write wins)."""
        self.attributes[key] = value

    def end(self, error: str | None = None) -> None:
        """Stamp the end time, mark an error if given, and queue the span for export (once)."""
        if self.end_ns:
            return
        self.end_ns = _time_ns()
        if error is not None:
            self.status_code = 2
            self.status_message = error
        tracer = self._tracer
        if tracer is None:
            return
        queue = tracer._queue
        size = len(queue)
        if size >= tracer._max_queue:
            tracer.dropped += 1  # never block the request path: drop the newest
            return
        queue.append(self)
        if size + 1 == tracer._batch_size:
            tracer._wake.set()

    def __repr__(self) -> str:
        return (
            f"Span({self.name!r}, kind={KIND_NAMES.get(self.kind, self.kind)}, "
            f"traceparent={self.traceparent.decode()}, parent={self.parent.decode()}, "
            f"status={self.status_code})"
        )


class Tracer:
    """Starts spans with Dapr's sampler and exports ended ones in batches from run()."""

    __slots__ = (
        "_batch_size",
        "_bound",
        "_closed",
        "_exporters",
        "_flush_interval",
        "_lock",
        "_max_queue",
        "_queue",
        "_record",
        "_wake",
        "_warned_at",
        "dropped",
        "enabled",
        "sampling_rate",
        "service_name",
    )

    def __init__(
        self,
        service_name: str,
        sampling_rate: float,
        exporters: Sequence[Exporter] = (),
        *,
        flush_interval: float = 1.0,
        batch_size: int = 512,
        max_queue: int = 8192,
        record: bool = True,
    ) -> None:
        if batch_size < 1 or max_queue < 1 or flush_interval <= 0:
            raise ValueError("batch_size, max_queue and flush_interval must be positive")
        self.service_name = service_name
        # False: sampled contexts still propagate, but no span is built (nowhere to export it).
        self._record = record
        self.sampling_rate = sampling_rate
        self.enabled = sampling_rate > 0
        # TraceIDRatioBased as OpenTelemetry computes it, so pillion and daprd sidecars with the
        # same rate make the same decision for a trace: sample when the trace id's low 64 bits
        # (bytes 8..16, big-endian) shifted right once fall under rate * 2**63, i.e. when the
        # low 64 bits are under rate * 2**64 (a bound of 2**64 samples everything).
        rate = min(max(sampling_rate, 0.0), 1.0)
        self._bound = 1 << 64 if rate >= 1 else int(rate * (1 << 63)) << 1
        self._exporters = tuple(exporters)
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._max_queue = max_queue
        self._queue: list[Span] = []
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._closed = False
        self._warned_at = -1e9
        self.dropped = 0

    def start(
        self, name: str, parent: SpanContext | None, kind: int = INTERNAL
    ) -> tuple[Span | None, SpanContext | None]:
        """Start a span under `parent` (None: a new trace).

        Returns the span (None when unsampled: nothing is built) and the context to send
        downstream, a child of `parent` with a fresh span id. Disabled tracing returns
        (None, parent) and does nothing else.
        """
        if not self.enabled:
            return None, parent
        wire, state = (None, "") if parent is None else (parent.traceparent, parent.tracestate)
        span, traceparent = self.continue_header(name, wire, state, kind)
        return span, SpanContext.of(traceparent, state)

    def continue_header(
        self, name: str, parent: bytes | None, tracestate: str, kind: int = INTERNAL
    ) -> tuple[Span | None, bytes]:
        """start() on the wire form: `parent` a canonical traceparent (see parse_traceparent;
        None: a new trace), `tracestate` its parsed tracestate. Returns the span (None when
        unsampled) and the child's traceparent. The tracer must be enabled."""
        if parent is None:
            bits = _getrandbits(128) or _nonzero(128)
            sampled = (bits & _MASK64) < self._bound
            traceparent = b"".join(
                (
                    b"00-",
                    _hexlify(bits.to_bytes(16, "big")),
                    b"-",
                    _hexlify((_getrandbits(64) or _nonzero(64)).to_bytes(8, "big")),
                    b"-01" if sampled else b"-00",
                )
            )
            parent_id = b""
        else:
            sampled = parent[54] == 0x31
            span_id = (_getrandbits(64) or _nonzero(64)).to_bytes(8, "big")
            traceparent = parent[:36] + _hexlify(span_id) + parent[52:]
            parent_id = parent[36:52]
        if not sampled or not self._record:
            # Nothing to record (or nowhere to send it): the context still travels on.
            return None, traceparent
        return Span(self, name, traceparent, tracestate, parent_id, kind, _time_ns()), traceparent

    @property
    def queued(self) -> int:
        """Spans ended and waiting for export."""
        return len(self._queue)

    async def run(self) -> None:
        """Export queued spans every flush_interval, or as soon as batch_size are queued.

        Runs until close(); owned by the runtime's task group.
        """
        wake = self._wake
        while not self._closed:
            if len(self._queue) < self._batch_size:
                wake.clear()
                try:
                    async with asyncio.timeout(self._flush_interval):
                        await wake.wait()
                except TimeoutError:
                    pass
                if self._closed:
                    return
            await self.flush()

    async def flush(self) -> None:
        """Export everything queued now, batch_size spans per export call."""
        async with self._lock:
            queue = self._queue
            if not queue:
                return
            self._queue = []
            if not self._exporters:
                return
            size = self._batch_size
            for i in range(0, len(queue), size):
                await self._export(queue[i : i + size], self._exporters)

    async def close(self, timeout: float = 2.0) -> None:
        """Stop run(), flush what is queued (bounded by `timeout`) and close the exporters."""
        if self._closed:
            return
        self._closed = True
        self._max_queue = 0  # spans that end from now on are dropped (and counted), not kept
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                await self.flush()
        except TimeoutError:
            _log.warning(
                "tracing: spans still queued after %.1fs at shutdown were dropped", timeout
            )
        self._queue = []
        for exporter in self._exporters:
            try:
                async with asyncio.timeout(timeout):
                    await exporter.close()
            except Exception as exc:
                _log.warning("tracing: closing %s failed: %s", type(exporter).__name__, exc)

    async def _export(self, batch: list[Span], exporters: Sequence[Exporter]) -> None:
        await asyncio.gather(
            *(self._guard(e, len(batch), e.export(batch, self.service_name)) for e in exporters)
        )

    async def _guard(self, exporter: object, spans: int, call: Awaitable[None]) -> None:
        # Exporters report their own failures; this guards the loop against a broken one.
        try:
            await call
        except Exception as exc:
            now = time.monotonic()
            if now - self._warned_at >= 60.0:
                self._warned_at = now
                _log.warning(
                    "tracing: %s failed, %d spans dropped: %r",
                    type(exporter).__name__,
                    spans,
                    exc,
                )


def _nonzero(bits: int) -> int:
    # All-zero ids are invalid in W3C trace context; getrandbits returns 0 about never.
    value = 0
    while not value:
        value = _getrandbits(bits)
    return value
