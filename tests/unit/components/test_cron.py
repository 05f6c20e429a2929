"""The cron schedule evaluator of `bindings.cron`: Dapr's (robfig/cron) syntax."""

from __future__ import annotations

from datetime import datetime

import pytest

from pillion.components.bindings.cron import CronSyntaxError, parse

T0 = datetime(2024, 1, 31, 23, 59, 58)  # a Wednesday


@pytest.mark.parametrize(
    ("spec", "after", "expected"),
    [
        ("* * * * * *", T0, datetime(2024, 1, 31, 23, 59, 59)),
        ("*/15 * * * * *", datetime(2024, 1, 1, 0, 0, 1), datetime(2024, 1, 1, 0, 0, 15)),
        ("0 */5 * * * *", datetime(2024, 1, 1, 0, 3), datetime(2024, 1, 1, 0, 5)),
        ("*/5 * * * *", datetime(2024, 1, 1, 0, 3), datetime(2024, 1, 1, 0, 5)),
        ("0 30 9 * * MON-FRI", datetime(2024, 1, 5, 10), datetime(2024, 1, 8, 9, 30)),
        ("0 0 12 1 * *", T0, datetime(2024, 2, 1, 12)),
        ("0 0 0 29 FEB *", T0, datetime(2024, 2, 29)),
        ("0 0 0 29 2 *", datetime(2024, 3, 1), datetime(2028, 2, 29)),
        ("0 0 0 * * 7", T0, datetime(2024, 2, 4)),
        ("0 0 0 * * SUN", T0, datetime(2024, 2, 4)),
        ("0 0 0 1 * 1", datetime(2024, 1, 2), datetime(2024, 1, 8)),  # dom OR dow
        ("0 0 8-10/2 * * *", datetime(2024, 1, 1, 8, 30), datetime(2024, 1, 1, 10)),
        ("0 0,30 * * * ?", datetime(2024, 1, 1, 0, 10), datetime(2024, 1, 1, 0, 30)),
        ("0 0 0 1 jan *", T0, datetime(2025, 1, 1)),
        ("@daily", T0, datetime(2024, 2, 1)),
        ("@midnight", T0, datetime(2024, 2, 1)),
        ("@hourly", datetime(2024, 1, 1, 5, 1), datetime(2024, 1, 1, 6)),
        ("@weekly", T0, datetime(2024, 2, 4)),
        ("@monthly", T0, datetime(2024, 2, 1)),
        ("@yearly", T0, datetime(2025, 1, 1)),
        ("@annually", T0, datetime(2025, 1, 1)),
        ("@every 15s", T0, datetime(2024, 2, 1, 0, 0, 13)),
        ("@every 1h30m", T0, datetime(2024, 2, 1, 1, 29, 58)),
        ("@every 100ms", T0, datetime(2024, 1, 31, 23, 59, 59)),
    ],
)
def test_next(spec: str, after: datetime, expected: datetime) -> None:
    assert parse(spec).next(after) == expected


def test_successive_activations() -> None:
    s = parse("*/20 * * * * *")
    t = datetime(2024, 1, 1, 0, 0, 0)
    seen = []
    for _ in range(4):
        t = s.next(t)
        seen.append(t.second)
    assert seen == [20, 40, 0, 20]


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "* * * *",
        "* * * * * * *",
        "60 * * * * *",
        "* 60 * * * *",
        "* * 24 * * *",
        "* * * 0 * *",
        "* * * 32 * *",
        "* * * * 13 *",
        "* * * * * 8",
        "*/0 * * * * *",
        "5-1 * * * * *",
        "x * * * * *",
        "@often",
        "@every",
        "@every soon",
        "@every -1s",
        "0 0 0 30 2 *",  # never fires
    ],
)
def test_invalid(spec: str) -> None:
    with pytest.raises(CronSyntaxError):
        parse(spec).next(T0)
