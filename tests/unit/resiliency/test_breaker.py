"""CircuitBreaker: gobreaker's transitions on a fake clock, and CEL trip expressions."""

from __future__ import annotations

import logging

import pytest

from pillion.resiliency.breaker import (
    CircuitBreaker,
    CircuitOpen,
    Counts,
    State,
    TripError,
    compile_trip,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state_of(cb: CircuitBreaker | None) -> State:
    """The state, read through a call so mypy does not narrow it across transitions."""
    assert cb is not None
    return cb.state


def fail(cb: CircuitBreaker, n: int = 1) -> None:
    for _ in range(n):
        cb.after(cb.before(), False)


def succeed(cb: CircuitBreaker, n: int = 1) -> None:
    for _ in range(n):
        cb.after(cb.before(), True)


def test_closed_open_half_open_closed_with_exactly_max_requests_probes() -> None:
    clock = Clock()
    changes: list[tuple[State, State]] = []
    cb = CircuitBreaker(
        "cb",
        max_requests=3,
        timeout=30.0,
        trip="consecutiveFailures >= 2",
        clock=clock,
        on_change=lambda a, b: changes.append((a, b)),
    )
    assert state_of(cb) is State.CLOSED
    fail(cb)
    assert state_of(cb) is State.CLOSED
    fail(cb)
    assert state_of(cb) is State.OPEN

    with pytest.raises(CircuitOpen, match=r"^circuit breaker is open$"):
        cb.before()
    clock.now += 30.0
    assert state_of(cb) is State.OPEN  # gobreaker: the expiry instant itself is still open
    clock.now += 0.001
    assert state_of(cb) is State.HALF_OPEN

    probes = [cb.before() for _ in range(3)]
    with pytest.raises(CircuitOpen, match=r"^too many requests$"):
        cb.before()
    cb.after(probes[0], True)
    cb.after(probes[1], True)
    assert state_of(cb) is State.HALF_OPEN
    cb.after(probes[2], True)
    assert state_of(cb) is State.CLOSED
    assert changes == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]


def test_any_failure_when_half_open_opens_again() -> None:
    clock = Clock()
    cb = CircuitBreaker("cb", max_requests=2, timeout=1.0, trip="totalFailures > 0", clock=clock)
    fail(cb)
    clock.now += 2
    succeed(cb)
    assert state_of(cb) is State.HALF_OPEN
    fail(cb)
    assert state_of(cb) is State.OPEN
    with pytest.raises(CircuitOpen):
        cb.before()


def test_results_from_an_older_generation_are_ignored() -> None:
    clock = Clock()
    cb = CircuitBreaker("cb", timeout=1.0, trip="consecutiveFailures >= 1", clock=clock)
    slow = cb.before()
    fail(cb)
    assert state_of(cb) is State.OPEN
    cb.after(slow, True)  # admitted while closed, finished after the trip
    assert state_of(cb) is State.OPEN


def test_interval_resets_counts_while_closed() -> None:
    clock = Clock()
    cb = CircuitBreaker("cb", interval=10.0, trip="consecutiveFailures >= 3", clock=clock)
    fail(cb, 2)
    assert cb.counts.consecutive_failures == 2
    clock.now += 10.5
    fail(cb)
    assert state_of(cb) is State.CLOSED and cb.counts.consecutive_failures == 1
    fail(cb, 2)
    assert state_of(cb) is State.OPEN


def test_no_interval_never_resets() -> None:
    clock = Clock()
    cb = CircuitBreaker("cb", trip="totalFailures >= 3", clock=clock)
    fail(cb)
    succeed(cb)
    clock.now += 10_000
    fail(cb)
    succeed(cb)
    fail(cb)
    assert state_of(cb) is State.OPEN


def test_default_trip_is_more_than_five_consecutive_failures() -> None:
    cb = CircuitBreaker("cb", clock=Clock())
    fail(cb, 5)
    assert state_of(cb) is State.CLOSED
    fail(cb)
    assert state_of(cb) is State.OPEN


def test_zero_settings_take_gobreaker_defaults() -> None:
    cb = CircuitBreaker("cb", max_requests=0, interval=0, timeout=0, clock=Clock())
    assert (cb.max_requests, cb.interval, cb.timeout) == (1, 0.0, 60.0)


def counts(**kw: int) -> Counts:
    return Counts(**kw)


@pytest.mark.parametrize(
    ("expression", "value", "expected"),
    [
        ("consecutiveFailures > 5", 5, False),
        ("consecutiveFailures > 5", 6, True),
        ("consecutiveFailures>=5", 5, True),
        (" consecutiveFailures < 5 ", 4, True),
        ("consecutiveFailures <= 5", 6, False),
        ("consecutiveFailures == 5", 5, True),
        ("consecutiveFailures != 5", 5, False),
    ],
)
def test_fast_path(expression: str, value: int, expected: bool) -> None:
    trip = compile_trip(expression)
    # The fast path is a lambda over Counts, not a celpy program.
    assert trip.__name__ == "<lambda>"
    assert trip(counts(consecutive_failures=value)) is expected


def test_cel_fallback_for_richer_expressions() -> None:
    trip = compile_trip("requests >= 10 && totalFailures * 2 > requests")
    assert trip.__name__ == "trip"
    assert trip(counts(requests=10, total_failures=6))
    assert not trip(counts(requests=10, total_failures=5))
    assert not trip(counts(requests=4, total_failures=4))
    either = compile_trip("consecutiveFailures > 3 || totalFailures > 10")
    assert either(counts(total_failures=11)) and not either(counts(total_failures=3))


def test_cel_errors_do_not_trip(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "pillion.resiliency.breaker"):
        trip = compile_trip("consecutiveFailure > 3 || false")  # misspelt name
    assert "cannot be evaluated" in caplog.text
    assert not trip(counts(consecutive_failures=100))
    # Not a boolean: never trips either.
    assert not compile_trip("consecutiveFailures + 1")(counts(consecutive_failures=9))


@pytest.mark.parametrize("bad", ["consecutiveFailures >", "&& true", "(requests"])
def test_trip_that_does_not_compile(bad: str) -> None:
    with pytest.raises(TripError, match="invalid trip expression"):
        compile_trip(bad)
