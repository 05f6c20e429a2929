"""Prometheus metric families with precomputed per-series state and text exposition 0.0.4."""

from __future__ import annotations

import logging
import math
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from itertools import pairwise
from typing import TypeVar

__all__ = [
    "DROPPED_METRIC",
    "Counter",
    "Gauge",
    "Histogram",
    "Registry",
    "format_value",
]

_log = logging.getLogger("pillion.observability.metrics")

# The family that reports samples refused by the series cap, so an operator can see the loss.
DROPPED_METRIC = "pillion_metrics_dropped_total"

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


def format_value(value: float) -> str:
    """Format a sample the way Go's client_golang does (strconv 'g', shortest), e.g. 1e+06.

    Dapr's /metrics is written by client_golang; matching its number format keeps the two
    byte-comparable and keeps dashboards' regexes working.
    """
    v = float(value)
    if v.is_integer() and -1e6 < v < 1e6:
        return str(int(v))  # also turns -0.0 into "0", as Go's writeFloat does
    if v != v:
        return "NaN"
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    # repr() gives the shortest digits that round-trip, the same digits Go picks.
    sign, digits, exponent = Decimal(repr(v)).normalize().as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits))
    nd = len(text)
    dp = nd + exponent  # position of the decimal point relative to the first digit
    exp = dp - 1
    if exp < -4 or exp >= 6:  # Go: %e when exp < -4 || exp >= eprec, eprec = 6 for shortest
        mantissa = text[0] + ("." + text[1:] if nd > 1 else "")
        out = f"{mantissa}e{'+' if exp >= 0 else '-'}{abs(exp):02d}"
    elif dp <= 0:
        out = "0." + "0" * -dp + text
    elif dp >= nd:
        out = text + "0" * (dp - nd)
    else:
        out = text[:dp] + "." + text[dp:]
    return "-" + out if sign else out


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


class _Family:
    """One metric name: its label names and a dict from label values to a mutable state list.

    The state is a plain list so a hot path can hold a reference and update it with one
    indexed add; all formatting waits for render().
    """

    kind = ""

    __slots__ = (
        "_arity",
        "_dropped",
        "_label_names",
        "_layout",
        "_registry",
        "_series",
        "_sort_index",
        "_text",
        "_warned",
        "help",
        "name",
    )

    def __init__(
        self,
        registry: Registry,
        name: str,
        help: str,
        labels: Sequence[str],
        const_labels: Mapping[str, str],
    ) -> None:
        if not _METRIC_NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        names = tuple(labels)
        every = list(names) + list(const_labels)
        for label in every:
            if not _LABEL_NAME.match(label) or label.startswith("__"):
                raise ValueError(f"metric {name}: invalid label name {label!r}")
            if label == "le" and self.kind == "histogram":
                raise ValueError(f"metric {name}: 'le' is reserved for histogram buckets")
        if len(set(every)) != len(every):
            raise ValueError(f"metric {name}: duplicate label names in {every}")
        self._registry = registry
        self.name = name
        self.help = help
        self._label_names = names
        self._arity = len(names)
        # client_golang writes label pairs sorted by name; precompute that order once: each
        # entry is (name, index into the label tuple) or (name, constant value).
        layout: list[tuple[str, int | str]] = [(n, i) for i, n in enumerate(names)]
        layout += [(n, v) for n, v in const_labels.items()]
        layout.sort(key=lambda item: item[0])
        self._layout = tuple(layout)
        self._sort_index = tuple(ref for _, ref in layout if isinstance(ref, int))
        self._series: dict[tuple[str, ...], list[float]] = {}
        self._text: dict[tuple[str, ...], str] = {}
        self._dropped = 0
        self._warned = False

    @property
    def label_names(self) -> tuple[str, ...]:
        """The declared label names, in the order label tuples are given."""
        return self._label_names

    @property
    def dropped(self) -> int:
        """Samples refused because the family had reached the series cap."""
        return self._dropped

    def __len__(self) -> int:
        return len(self._series)

    def blank_state(self) -> list[float]:
        """A fresh state list, not stored: what a series starts from."""
        return [0]

    def state(self, labels: tuple[str, ...]) -> list[float] | None:
        """The state list for `labels`, created on first use; None once the cap is reached."""
        cell = self._series.get(labels)
        if cell is not None:
            return cell
        if type(labels) is not tuple or len(labels) != self._arity:
            raise ValueError(
                f"metric {self.name}: expected labels {self._label_names}, got {labels!r}"
            )
        for value in labels:
            if type(value) is not str:
                raise TypeError(f"metric {self.name}: label values must be str, got {value!r}")
        if len(self._series) >= self._registry.max_series:
            self._dropped += 1
            if not self._warned:
                self._warned = True
                _log.warning(
                    "metric %s reached %d series: new label sets are dropped (counted in %s)",
                    self.name,
                    self._registry.max_series,
                    DROPPED_METRIC,
                )
            return None
        cell = self._series[labels] = self.blank_state()
        return cell

    def _label_text(self, labels: tuple[str, ...]) -> str:
        text = self._text.get(labels)
        if text is None:
            parts = []
            for name, ref in self._layout:
                value = labels[ref] if isinstance(ref, int) else ref
                parts.append(f'{name}="{_escape_label(value)}"')
            text = self._text[labels] = ",".join(parts)
        return text

    def _header_and_series(self, out: list[str]) -> list[tuple[str, list[float]]]:
        """(label text, state) per series in label order, after the HELP and TYPE lines."""
        # Copy first: a recorder on another thread may add a series while we iterate.
        items = list(self._series.items())
        if items:  # client_golang omits families without samples
            out.append(f"# HELP {self.name} {_escape_help(self.help)}")
            out.append(f"# TYPE {self.name} {self.kind}")
        index = self._sort_index
        items.sort(key=lambda item: tuple(item[0][i] for i in index))
        return [(self._label_text(labels), state) for labels, state in items]

    def _render(self, out: list[str]) -> None:
        name = self.name
        for text, state in self._header_and_series(out):
            if text:
                out.append(f"{name}{{{text}}} {format_value(state[0])}")
            else:
                out.append(f"{name} {format_value(state[0])}")


_F = TypeVar("_F", bound=_Family)


class Counter(_Family):
    """A monotonically increasing value per label set."""

    kind = "counter"
    __slots__ = ()

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        """Add `amount` (>= 0) to the series for `labels`."""
        if amount < 0:
            raise ValueError(f"counter {self.name} cannot decrease (amount {amount})")
        cell = self.state(labels)
        if cell is not None:
            cell[0] += amount


class Gauge(_Family):
    """A value per label set that can go up and down."""

    kind = "gauge"
    __slots__ = ()

    def set(self, labels: tuple[str, ...], value: float) -> None:
        """Set the series for `labels` to `value`."""
        cell = self.state(labels)
        if cell is not None:
            cell[0] = value

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        """Add `amount` to the series for `labels`."""
        cell = self.state(labels)
        if cell is not None:
            cell[0] += amount

    def dec(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        """Subtract `amount` from the series for `labels`."""
        self.inc(labels, -amount)


class Histogram(_Family):
    """Bucketed observations per label set; state is [sum, count of bucket 0, ..., +Inf]."""

    kind = "histogram"
    __slots__ = ("_bisect", "_bounds", "_le", "upper_inclusive")

    def __init__(
        self,
        registry: Registry,
        name: str,
        help: str,
        labels: Sequence[str],
        const_labels: Mapping[str, str],
        buckets: Sequence[float],
        upper_inclusive: bool,
    ) -> None:
        super().__init__(registry, name, help, labels, const_labels)
        bounds = [float(b) for b in buckets]
        if bounds and bounds[-1] == math.inf:
            bounds.pop()  # +Inf is always present
        if not bounds:
            raise ValueError(f"histogram {name}: at least one finite bucket is required")
        for lo, hi in pairwise(bounds):
            if not lo < hi:
                raise ValueError(f"histogram {name}: buckets must be strictly increasing")
        if any(math.isnan(b) or math.isinf(b) for b in bounds):
            raise ValueError(f"histogram {name}: buckets must be finite numbers")
        self._bounds = bounds
        self.upper_inclusive = upper_inclusive
        # Prometheus counts v in bucket `le=b` when v <= b. OpenCensus (Dapr) puts v in the
        # first bucket whose bound is > v, so a value equal to a bound lands one bucket up.
        self._bisect: Callable[[Sequence[float], float], int] = (
            bisect_left if upper_inclusive else bisect_right
        )
        self._le = [f'le="{format_value(b)}"}} ' for b in bounds] + ['le="+Inf"} ']

    @property
    def bounds(self) -> list[float]:
        """The finite bucket upper bounds (+Inf is implicit)."""
        return self._bounds

    def bucket_index(self, value: float) -> int:
        """Index into the state list of the bucket that `value` falls in."""
        return self._bisect(self._bounds, value) + 1

    def blank_state(self) -> list[float]:
        return [0] * (len(self._bounds) + 2)

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        """Record one observation of `value` in the series for `labels`."""
        cell = self.state(labels)
        if cell is not None:
            cell[self._bisect(self._bounds, value) + 1] += 1
            cell[0] += value

    def _render(self, out: list[str]) -> None:
        name = self.name
        le = self._le
        append = out.append
        for text, state in self._header_and_series(out):
            bucket = f"{name}_bucket{{{text}," if text else f"{name}_bucket{{"
            cumulative: float = 0
            for i, le_pair in enumerate(le, 1):
                cumulative += state[i]  # bucket counts are ints: str() is Go's format below 1e6
                if cumulative < 1_000_000 and type(cumulative) is int:
                    append(f"{bucket}{le_pair}{cumulative}")
                else:
                    append(f"{bucket}{le_pair}{format_value(cumulative)}")
            labels = f"{{{text}}}" if text else ""
            out.append(f"{name}_sum{labels} {format_value(state[0])}")
            out.append(f"{name}_count{labels} {format_value(cumulative)}")


class Registry:
    """A set of metric families rendered together as one Prometheus text page.

    `const_labels` (app_id and the like) are stored once and written into every series.
    Each family keeps at most `max_series` label sets; past that new label sets are
    dropped, counted in pillion_metrics_dropped_total and warned about once, so a label
    fed from request data cannot grow memory without bound.
    """

    __slots__ = ("_const_labels", "_families", "max_series")

    def __init__(
        self, *, const_labels: Mapping[str, str] | None = None, max_series: int = 10_000
    ) -> None:
        if max_series < 1:
            raise ValueError("max_series must be at least 1")
        self._const_labels = dict(const_labels or {})
        for value in self._const_labels.values():
            if type(value) is not str:
                raise TypeError(f"constant label values must be str, got {value!r}")
        self.max_series = max_series
        self._families: dict[str, _Family] = {}

    def _add(self, family: _F) -> _F:
        if family.name in self._families or family.name == DROPPED_METRIC:
            raise ValueError(f"metric {family.name} is already registered")
        self._families[family.name] = family
        return family

    def _consts(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        merged = dict(self._const_labels)
        if extra:
            merged.update(extra)
        return merged

    def counter(
        self,
        name: str,
        help: str,
        labels: Sequence[str],
        *,
        const_labels: Mapping[str, str] | None = None,
    ) -> Counter:
        """Register and return a counter family."""
        return self._add(Counter(self, name, help, labels, self._consts(const_labels)))

    def gauge(
        self,
        name: str,
        help: str,
        labels: Sequence[str],
        *,
        const_labels: Mapping[str, str] | None = None,
    ) -> Gauge:
        """Register and return a gauge family."""
        return self._add(Gauge(self, name, help, labels, self._consts(const_labels)))

    def histogram(
        self,
        name: str,
        help: str,
        labels: Sequence[str],
        buckets: Sequence[float],
        *,
        const_labels: Mapping[str, str] | None = None,
        upper_inclusive: bool = True,
    ) -> Histogram:
        """Register and return a histogram family; `upper_inclusive=False` is OpenCensus's rule."""
        consts = self._consts(const_labels)
        return self._add(Histogram(self, name, help, labels, consts, buckets, upper_inclusive))

    def families(self) -> Iterable[_Family]:
        """The registered families, in registration order."""
        return self._families.values()

    def dropped(self) -> dict[str, int]:
        """Samples dropped by the series cap, per metric name (only metrics that dropped)."""
        return {f.name: f.dropped for f in self._families.values() if f.dropped}

    def render(self) -> bytes:
        """The whole registry in Prometheus text format 0.0.4, families sorted by name."""
        out: list[str] = []
        dropped = self.dropped()
        names = sorted(self._families)
        if dropped:
            names.append(DROPPED_METRIC)
            names.sort()
        for name in names:
            if name == DROPPED_METRIC:
                self._render_dropped(out, dropped)
            else:
                self._families[name]._render(out)
        if not out:
            return b""
        out.append("")
        return "\n".join(out).encode()

    def _render_dropped(self, out: list[str], dropped: Mapping[str, int]) -> None:
        report = Counter(
            self,
            DROPPED_METRIC,
            "Samples dropped because their metric had reached its series limit.",
            ("metric",),
            self._const_labels,
        )
        for metric, count in dropped.items():
            report._series[(metric,)] = [count]
        report._render(out)
