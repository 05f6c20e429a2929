"""Tests of the metric registry and its Prometheus text exposition."""

from __future__ import annotations

import logging
import math

import pytest

from pillion.observability.metrics import DROPPED_METRIC, Registry, format_value


def text(registry: Registry) -> str:
    return registry.render().decode()


# ---- exposition -----------------------------------------------------------------------------


def test_counter_exposition_is_exact() -> None:
    r = Registry(const_labels={"app_id": "app"})
    c = r.counter("requests_count", "Requests served.", ("method", "code"))
    c.inc(("GET", "200"))
    c.inc(("GET", "200"), 2)
    c.inc(("POST", "500"), 0.5)
    assert text(r) == (
        "# HELP requests_count Requests served.\n"
        "# TYPE requests_count counter\n"
        'requests_count{app_id="app",code="200",method="GET"} 3\n'
        'requests_count{app_id="app",code="500",method="POST"} 0.5\n'
    )


def test_gauge_set_inc_dec() -> None:
    r = Registry()
    g = r.gauge("in_flight", "Work in flight.", ("queue",))
    g.set(("a",), 5)
    g.inc(("a",))
    g.dec(("a",), 2.5)
    g.dec(("b",))
    assert text(r) == (
        "# HELP in_flight Work in flight.\n"
        "# TYPE in_flight gauge\n"
        'in_flight{queue="a"} 3.5\n'
        'in_flight{queue="b"} -1\n'
    )


def test_histogram_buckets_are_cumulative_with_inf_sum_and_count() -> None:
    r = Registry()
    h = r.histogram("latency_ms", "Latency.", ("op",), [1, 5, 10])
    for v in (0.5, 1, 3, 7, 50):
        h.observe(("get",), v)
    assert text(r) == (
        "# HELP latency_ms Latency.\n"
        "# TYPE latency_ms histogram\n"
        'latency_ms_bucket{op="get",le="1"} 2\n'
        'latency_ms_bucket{op="get",le="5"} 3\n'
        'latency_ms_bucket{op="get",le="10"} 4\n'
        'latency_ms_bucket{op="get",le="+Inf"} 5\n'
        'latency_ms_sum{op="get"} 61.5\n'
        'latency_ms_count{op="get"} 5\n'
    )


def test_histogram_opencensus_rule_puts_a_bound_in_the_next_bucket() -> None:
    r = Registry()
    h = r.histogram("oc", "OpenCensus buckets.", (), [1, 2], upper_inclusive=False)
    h.observe((), 1)  # OpenCensus: first bound > value, so le="2"
    h.observe((), 0.5)
    assert 'oc_bucket{le="1"} 1\n' in text(r)
    assert 'oc_bucket{le="2"} 2\n' in text(r)
    assert h.bucket_index(2) == 3  # the +Inf slot


def test_metric_without_labels_has_no_braces() -> None:
    r = Registry()
    r.counter("up_total", "Up.", ()).inc(())
    h = r.histogram("size", "Size.", (), [10])
    h.observe((), 3)
    out = text(r)
    assert "\nup_total 1\n" in out
    assert 'size_bucket{le="10"} 1\n' in out
    assert "\nsize_sum 3\nsize_count 1\n" in out


def test_label_values_and_help_are_escaped() -> None:
    r = Registry()
    c = r.counter("esc", 'Help with \\ and\nnewline and "quotes".', ("v",))
    c.inc(('a\\b"c\nd',))
    assert text(r) == (
        '# HELP esc Help with \\\\ and\\nnewline and "quotes".\n'
        "# TYPE esc counter\n"
        'esc{v="a\\\\b\\"c\\nd"} 1\n'
    )


def test_families_sorted_by_name_and_series_by_label_values() -> None:
    r = Registry()
    b = r.counter("b_metric", "B.", ("z", "a"))
    a = r.counter("a_metric", "A.", ())
    b.inc(("1", "y"))
    b.inc(("2", "x"))
    b.inc(("0", "y"))
    a.inc(())
    lines = text(r).splitlines()
    assert lines[0] == "# HELP a_metric A."
    samples = [line for line in lines if line.startswith("b_metric")]
    # Labels are written sorted by name (a before z) and series ordered by those values.
    assert samples == [
        'b_metric{a="x",z="2"} 1',
        'b_metric{a="y",z="0"} 1',
        'b_metric{a="y",z="1"} 1',
    ]


def test_empty_families_are_omitted_and_empty_registry_renders_nothing() -> None:
    r = Registry()
    r.counter("never", "Never recorded.", ("x",))
    assert r.render() == b""


def test_per_family_const_labels_merge_with_registry_ones() -> None:
    r = Registry(const_labels={"app_id": "a"})
    c = r.counter("c", "C.", ("x",), const_labels={"namespace": "ns"})
    c.inc(("1",))
    assert 'c{app_id="a",namespace="ns",x="1"} 1' in text(r)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "0"),
        (-0.0, "0"),
        (1, "1"),
        (-1, "-1"),
        (5.0, "5"),
        (0.5, "0.5"),
        (123456.75, "123456.75"),
        (999999, "999999"),
        (1_000_000, "1e+06"),
        (1_048_576, "1.048576e+06"),
        (4_294_967_296, "4.294967296e+09"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (1.5e-7, "1.5e-07"),
        (1e21, "1e+21"),
        (-2.5e6, "-2.5e+06"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_format_value_matches_go_strconv_g(value: float, expected: str) -> None:
    assert format_value(value) == expected


# ---- series cap -----------------------------------------------------------------------------


def test_series_cap_drops_new_label_sets_counts_and_warns_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    r = Registry(const_labels={"app_id": "a"}, max_series=2)
    c = r.counter("capped", "Capped.", ("id",))
    h = r.histogram("capped_hist", "Capped too.", ("id",), [1])
    with caplog.at_level(logging.WARNING, logger="pillion.observability.metrics"):
        for i in range(5):
            c.inc((str(i),))
            h.observe((str(i),), 0.5)
        c.inc(("0",))  # existing series keep counting
    assert len(c) == 2
    assert c.dropped == 3
    assert r.dropped() == {"capped": 3, "capped_hist": 3}
    warnings = [rec for rec in caplog.records if "capped reached 2 series" in rec.getMessage()]
    assert len(warnings) == 1
    out = text(r)
    assert 'capped{app_id="a",id="0"} 2\n' in out
    assert 'capped{app_id="a",id="4"}' not in out
    assert f"# TYPE {DROPPED_METRIC} counter\n" in out
    assert f'{DROPPED_METRIC}{{app_id="a",metric="capped"}} 3\n' in out
    assert f'{DROPPED_METRIC}{{app_id="a",metric="capped_hist"}} 3\n' in out


def test_default_cap_is_ten_thousand() -> None:
    assert Registry().max_series == 10_000


# ---- validation -----------------------------------------------------------------------------


def test_invalid_names_and_duplicates_are_rejected() -> None:
    r = Registry()
    with pytest.raises(ValueError, match="invalid metric name"):
        r.counter("bad-name", "x", ())
    with pytest.raises(ValueError, match="invalid label name"):
        r.counter("ok", "x", ("bad-label",))
    with pytest.raises(ValueError, match="invalid label name"):
        r.counter("ok2", "x", ("__reserved",))
    with pytest.raises(ValueError, match="duplicate label"):
        r.counter("ok3", "x", ("a", "a"))
    with pytest.raises(ValueError, match="reserved"):
        r.histogram("ok4", "x", ("le",), [1])
    r.counter("taken", "x", ())
    with pytest.raises(ValueError, match="already registered"):
        r.gauge("taken", "x", ())
    with pytest.raises(ValueError, match="already registered"):
        r.counter(DROPPED_METRIC, "x", ())


def test_invalid_buckets_are_rejected() -> None:
    r = Registry()
    with pytest.raises(ValueError, match="strictly increasing"):
        r.histogram("h1", "x", (), [1, 1])
    with pytest.raises(ValueError, match="strictly increasing"):
        r.histogram("h2", "x", (), [2, 1])
    with pytest.raises(ValueError, match="at least one"):
        r.histogram("h3", "x", (), [])
    with pytest.raises(ValueError, match="finite"):
        r.histogram("h4", "x", (), [math.nan])
    h = r.histogram("h5", "x", (), [1, math.inf])  # an explicit +Inf is folded in
    assert h.bounds == [1.0]


def test_wrong_label_tuples_are_rejected() -> None:
    r = Registry()
    c = r.counter("c", "x", ("a", "b"))
    with pytest.raises(ValueError, match="expected labels"):
        c.inc(("only-one",))
    with pytest.raises(TypeError, match="must be str"):
        c.inc(("a", 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot decrease"):
        c.inc(("a", "b"), -1)
    with pytest.raises(ValueError):
        Registry(max_series=0)
