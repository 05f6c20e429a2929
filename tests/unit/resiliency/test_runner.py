"""Policy.run: exact retry counts, per-attempt timeouts, breaker admission and observer hooks."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from pillion.resiliency import BreakerSpec, CircuitBreaker, CircuitOpen, Policy, Retry, State
from pillion.resiliency.breaker import compile_trip

T = TypeVar("T")


def run(aw: Awaitable[T]) -> T:
    async def go() -> T:
        return await aw

    return asyncio.run(go())


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Sleeps:
    """Records the waits between retries and advances a fake clock instead of sleeping."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.delays: list[float] = []
        self.clock = clock

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.clock is not None:
            self.clock.now += delay


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def activation(self, policy: Policy, kind: str) -> None:
        self.events.append(("activation", kind))

    def breaker_state(self, policy: Policy, state: str) -> None:
        self.events.append(("state", state))

    def executed(self, policy: Policy, kind: str) -> None:
        self.events.append(("executed", kind))


class Flaky:
    """Fails (raises, or returns 500) for the first `failures` calls, then returns 200."""

    def __init__(self, failures: int, *, raises: bool = True) -> None:
        self.failures = failures
        self.raises = raises
        self.calls = 0

    async def __call__(self) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            if self.raises:
                raise ConnectionError(f"attempt {self.calls}")
            return 500
        return 200


def state_of(cb: CircuitBreaker | None) -> State:
    """The state, read through a call so mypy does not narrow it across transitions."""
    assert cb is not None
    return cb.state


def policy(
    *,
    retry: Retry | None = None,
    timeout: float | None = None,
    breaker: BreakerSpec | None = None,
    sleep: Sleeps | None = None,
    clock: Callable[[], float] = time.monotonic,
    observer: Recorder | None = None,
) -> Policy:
    extra: dict[str, Any] = {"sleep": sleep} if sleep is not None else {}
    return Policy(
        "appB",
        "app_appB",
        "outbound",
        timeout=timeout,
        retry=retry,
        breaker=breaker,
        clock=clock,
        observer=observer,
        **extra,
    )


FIVE = Retry("constant", duration=0.001, max_retries=5, name="five")


@pytest.mark.parametrize("failures", [0, 3, 10])
def test_retry_count_is_exact_for_errors(failures: int) -> None:
    sleeps = Sleeps()
    p = policy(retry=FIVE, sleep=sleeps)
    op = Flaky(failures)
    if failures > 5:
        with pytest.raises(ConnectionError, match="attempt 6"):
            run(p.run(op))
    else:
        assert run(p.run(op)) == 200
    assert op.calls == min(failures, 5) + 1
    assert sleeps.delays == [0.001] * min(failures, 5)


@pytest.mark.parametrize("failures", [0, 3, 10])
def test_retry_count_is_exact_for_failed_results(failures: int) -> None:
    p = policy(retry=FIVE, sleep=Sleeps())
    op = Flaky(failures, raises=False)
    result = run(p.run(op, failed=lambda status: status >= 500))
    # Out of retries: the last failed result comes back as it is.
    assert result == (500 if failures > 5 else 200)
    assert op.calls == min(failures, 5) + 1


def test_real_sleep_between_retries() -> None:
    p = policy(retry=Retry("constant", duration=0.001, max_retries=2))
    op = Flaky(2)
    assert run(p.run(op)) == 200 and op.calls == 3


def test_no_retry_policy_means_one_attempt() -> None:
    op = Flaky(1)
    with pytest.raises(ConnectionError):
        run(policy(timeout=1.0).run(op))
    assert op.calls == 1
    op = Flaky(1, raises=False)
    assert run(policy(timeout=1.0).run(op, failed=lambda s: s >= 500)) == 500


def test_retry_forever() -> None:
    p = policy(retry=Retry("constant", duration=0.0, max_retries=-1), sleep=Sleeps())
    op = Flaky(50)
    assert run(p.run(op)) == 200 and op.calls == 51


def test_errors_that_are_not_retryable_propagate_at_once() -> None:
    p = policy(retry=FIVE, sleep=Sleeps())
    op = Flaky(3)
    with pytest.raises(ConnectionError, match="attempt 1"):
        run(p.run(op, retryable_error=lambda exc: not isinstance(exc, ConnectionError)))
    assert op.calls == 1


def test_results_that_are_not_retryable_return_at_once() -> None:
    """Dapr's matching: a failure whose code is not listed is not retried (still a failure)."""
    retry = Retry("constant", duration=0.0, max_retries=5, http_codes=((429, 429), (500, 599)))
    p = policy(retry=retry, sleep=Sleeps())
    statuses = iter([503, 429, 404, 200])
    calls = 0

    async def op() -> int:
        nonlocal calls
        calls += 1
        return next(statuses)

    result = run(
        p.run(op, failed=lambda s: s >= 400, retryable_result=lambda s: retry.retry_http(s))
    )
    assert (result, calls) == (404, 3)


def test_timeout_fires_per_attempt_within_tolerance() -> None:
    recorder = Recorder()
    p = policy(timeout=0.05, observer=recorder)
    started = asyncio.Event()

    async def slow() -> int:
        started.set()
        await asyncio.sleep(5)
        return 1

    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        run(p.run(slow))
    elapsed = time.monotonic() - t0
    assert 0.045 <= elapsed < 0.5
    assert ("activation", "timeout") in recorder.events


def test_timeout_is_retried_and_counted_once_per_run() -> None:
    recorder = Recorder()
    p = policy(
        timeout=0.02,
        retry=Retry("constant", duration=0.0, max_retries=2),
        sleep=Sleeps(),
        observer=recorder,
    )
    calls = 0

    async def slow_then_fast() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            await asyncio.sleep(5)
        return "ok"

    assert run(p.run(slow_then_fast)) == "ok"
    assert calls == 3
    assert recorder.events.count(("activation", "timeout")) == 1
    assert recorder.events.count(("activation", "retry")) == 1

    calls = -10  # always slow now: three timeouts, then TimeoutError
    with pytest.raises(TimeoutError):
        run(p.run(slow_then_fast))
    assert calls == -7


def test_op_raising_timeout_error_itself_is_not_a_timeout_activation() -> None:
    recorder = Recorder()
    p = policy(timeout=5.0, observer=recorder)

    async def op() -> None:
        raise TimeoutError("from the op")

    with pytest.raises(TimeoutError, match="from the op"):
        run(p.run(op))
    assert ("activation", "timeout") not in recorder.events


def breaker_spec(**kw: Any) -> BreakerSpec:
    expression = kw.pop("trip", "consecutiveFailures >= 2")
    return BreakerSpec("cb", trip_expression=expression, trip=compile_trip(expression), **kw)


def test_open_breaker_rejects_without_calling_op_and_stops_retries() -> None:
    clock = Clock()
    recorder = Recorder()
    p = policy(
        retry=FIVE,
        breaker=breaker_spec(timeout=10.0),
        sleep=Sleeps(),
        clock=clock,
        observer=recorder,
    )
    op = Flaky(100)
    with pytest.raises(CircuitOpen, match="circuit breaker is open"):
        run(p.run(op))
    assert op.calls == 2  # the second failure tripped it; the first retry after that was refused
    assert p.breaker is not None and state_of(p.breaker) is State.OPEN
    with pytest.raises(CircuitOpen):
        run(p.run(op))
    assert op.calls == 2
    assert ("state", "open") in recorder.events
    assert recorder.events.count(("activation", "circuitbreaker")) == 1

    clock.now += 11
    ok = Flaky(0)
    assert run(p.run(ok)) == 200 and ok.calls == 1
    assert state_of(p.breaker) is State.CLOSED
    states = [e[1] for e in recorder.events if e[0] == "state"]
    assert states == ["open", "half-open", "closed"]


def test_half_open_admits_exactly_max_requests_concurrent_probes() -> None:
    clock = Clock()
    p = policy(breaker=breaker_spec(max_requests=2, timeout=10.0), clock=clock)
    assert p.breaker is not None
    p.breaker.after(p.breaker.before(), False)
    p.breaker.after(p.breaker.before(), False)
    assert state_of(p.breaker) is State.OPEN
    clock.now += 11

    calls = 0
    release = asyncio.Event()

    async def probe() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "ok"

    async def scenario() -> list[Any]:
        tasks = [asyncio.ensure_future(p.run(probe)) for _ in range(3)]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = run(scenario())
    assert calls == 2
    assert results[:2] == ["ok", "ok"]
    assert isinstance(results[2], CircuitOpen) and str(results[2]) == "too many requests"
    assert state_of(p.breaker) is State.CLOSED


def test_failed_results_and_non_retryable_errors_count_against_the_breaker() -> None:
    p = policy(breaker=breaker_spec(), clock=Clock())
    assert p.breaker is not None

    async def bad() -> int:
        return 503

    run(p.run(bad, failed=lambda s: s >= 500))
    assert p.breaker.counts.consecutive_failures == 1
    with pytest.raises(ConnectionError):
        run(p.run(Flaky(1), retryable_error=lambda exc: False))
    assert state_of(p.breaker) is State.OPEN


def test_breaker_with_timeout_counts_the_timeout_as_failure() -> None:
    p = policy(timeout=0.01, breaker=breaker_spec(trip="consecutiveFailures >= 1"))

    async def slow() -> None:
        await asyncio.sleep(5)

    with pytest.raises(TimeoutError):
        run(p.run(slow))
    assert p.breaker is not None and state_of(p.breaker) is State.OPEN


def test_executed_hook_once_per_kind_per_run() -> None:
    recorder = Recorder()
    p = policy(timeout=1.0, retry=FIVE, breaker=breaker_spec(), sleep=Sleeps(), observer=recorder)
    run(p.run(Flaky(0)))
    assert recorder.events == [
        ("executed", "timeout"),
        ("executed", "retry"),
        ("executed", "circuitbreaker"),
    ]


def test_constant_delays() -> None:
    assert list(Retry("constant", duration=2.0, max_retries=3).delays()) == [2.0, 2.0, 2.0]
    assert list(Retry("constant", duration=2.0, max_retries=0).delays()) == []
    forever = Retry("constant", duration=1.0, max_retries=-1).delays()
    assert list(itertools.islice(forever, 100)) == [1.0] * 100


def test_exponential_delays_grow_and_cap() -> None:
    retry = Retry("exponential", max_interval=2.0, max_retries=6)
    assert list(retry.delays(rand=lambda: 0.5)) == pytest.approx(
        [0.5, 0.75, 1.125, 1.6875, 2.0, 2.0]
    )
    low = list(retry.delays(rand=lambda: 0.0))
    high = list(retry.delays(rand=lambda: 1.0))
    assert low[0] == pytest.approx(0.25) and high[0] == pytest.approx(0.75)
    assert all(lo <= hi for lo, hi in zip(low, high, strict=True))
    assert all(0.25 <= d <= 3.0 for d in retry.delays())


def test_exponential_gives_up_after_max_elapsed() -> None:
    clock = Clock()
    sleeps = Sleeps(clock)
    retry = Retry("exponential", max_interval=1.0, max_retries=-1, max_elapsed=5.0)
    p = policy(retry=retry, sleep=sleeps, clock=clock)
    op = Flaky(1000)
    with pytest.raises(ConnectionError):
        run(p.run(op))
    assert sum(sleeps.delays) <= 5.0
    assert op.calls == len(sleeps.delays) + 1
    assert op.calls < 20
