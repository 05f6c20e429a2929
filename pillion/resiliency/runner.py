"""Resolved policies and the runner that applies timeout, retry and circuit breaker to a call."""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

from pillion.resiliency.breaker import BreakerSpec, CircuitBreaker, CircuitOpen, State

__all__ = ["Observer", "Policy", "Retry"]

T = TypeVar("T")

# Codes are inclusive (start, end) ranges; None means "no list: every code is retried".
CodeRanges = tuple[tuple[int, int], ...]


class Observer(Protocol):
    """Hooks for metrics; pillion's runtime feeds them to the dapr_resiliency_* series."""

    def activation(self, policy: Policy, kind: str) -> None:
        """`kind` ("timeout" | "retry" | "circuitbreaker") changed the outcome of a run."""

    def breaker_state(self, policy: Policy, state: str) -> None:
        """The policy's breaker moved to `state` ("closed" | "open" | "half-open")."""

    def executed(self, policy: Policy, kind: str) -> None:
        """A run started under a policy that has `kind`."""


def _matches(code: int, ranges: CodeRanges | None) -> bool:
    if ranges is None:
        return True
    return any(lo <= code <= hi for lo, hi in ranges)


@dataclass(frozen=True)
class Retry:
    """One `retries.<name>` entry as daprd runs it (dapr/kit retry.Config + matching).

    `duration` paces `constant`; `exponential` starts at `initial_interval` (500 ms; daprd
    does not let a manifest change it), grows by `multiplier` up to `max_interval`, each delay
    jittered by +-`randomization`, and gives up once `max_elapsed` has passed since the first
    attempt. `max_retries` -1 retries forever.
    """

    policy: str = "constant"
    duration: float = 5.0
    max_interval: float = 60.0
    max_retries: int = -1
    name: str = ""
    initial_interval: float = 0.5
    multiplier: float = 1.5
    randomization: float = 0.5
    max_elapsed: float | None = None
    http_codes: CodeRanges | None = None
    grpc_codes: CodeRanges | None = None

    def retry_http(self, status: int) -> bool:
        """Whether `matching.httpStatusCodes` lets a failure with this HTTP status retry."""
        return _matches(status, self.http_codes)

    def retry_grpc(self, code: int) -> bool:
        """Whether `matching.gRPCStatusCodes` lets a failure with this gRPC code retry."""
        return _matches(code, self.grpc_codes)

    def delays(self, rand: Callable[[], float] = random.random) -> Iterator[float]:
        """The wait before each retry: `max_retries` values, endless for -1."""
        n = 0
        current = self.initial_interval
        while self.max_retries < 0 or n < self.max_retries:
            n += 1
            if self.policy != "exponential":
                yield self.duration
                continue
            # cenkalti/backoff ExponentialBackOff.NextBackOff: jitter, then grow the interval.
            delta = self.randomization * current
            yield current - delta + rand() * 2 * delta
            if current >= self.max_interval / self.multiplier:
                current = self.max_interval
            else:
                current *= self.multiplier


class _Run:
    """Per-run flags: daprd counts timeout and retry activations once per run."""

    __slots__ = ("timed_out",)

    def __init__(self) -> None:
        self.timed_out = False


class Policy:
    """The timeout, retry and breaker that apply to one target, and the runner for them.

    The same object is returned for a target on every lookup: the breaker state lives here.
    """

    __slots__ = (
        "_breaker_spec",
        "_cache_size",
        "_clock",
        "_keyed",
        "_kinds",
        "_per_key",
        "_sleep",
        "breaker",
        "direction",
        "name",
        "observer",
        "resiliency",
        "retry",
        "target",
        "timeout",
    )

    def __init__(
        self,
        name: str,
        target: str,
        direction: str,
        *,
        timeout: float | None = None,
        retry: Retry | None = None,
        breaker: BreakerSpec | None = None,
        breaker_name: str | None = None,
        per_key_breakers: int = 0,
        resiliency: str = "",
        observer: Observer | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.name = name
        self.target = target
        self.direction = direction
        self.timeout = timeout if timeout is not None and timeout > 0 else None
        self.retry = retry
        self.resiliency = resiliency
        self.observer = observer
        self._clock = clock
        self._sleep = sleep
        self._breaker_spec = breaker
        # per_key_breakers > 0: `for_key` hands out a Policy with its own breaker per key,
        # at most that many kept (least recently used dropped), like daprd's actor id scope.
        self._keyed = per_key_breakers > 0 and breaker is not None
        self._cache_size = per_key_breakers
        self._per_key: OrderedDict[str, Policy] = OrderedDict()
        self.breaker: CircuitBreaker | None = None
        if breaker is not None and not self._keyed:
            self.breaker = self._new_breaker(breaker, breaker_name or name)
        kinds: list[str] = []
        if self.timeout is not None:
            kinds.append("timeout")
        if retry is not None:
            kinds.append("retry")
        if breaker is not None:
            kinds.append("circuitbreaker")
        self._kinds = tuple(kinds)

    def __repr__(self) -> str:
        return (
            f"Policy({self.target!r}, direction={self.direction!r}, timeout={self.timeout}, "
            f"retry={self.retry.name if self.retry else None!r}, "
            f"breaker={self._breaker_spec.name if self._breaker_spec else None!r})"
        )

    @property
    def breaker_spec(self) -> BreakerSpec | None:
        """The `circuitBreakers` entry this policy's breaker(s) are built from."""
        return self._breaker_spec

    def _new_breaker(self, spec: BreakerSpec, instance: str) -> CircuitBreaker:
        def on_change(_prev: State, new: State) -> None:
            if self.observer is not None:
                self.observer.breaker_state(self, new.value)

        return spec.build(instance, clock=self._clock, on_change=on_change)

    def for_key(self, key: str) -> Policy:
        """This policy with the breaker of one key (an actor id); itself when not keyed."""
        if not self._keyed:
            return self
        cache = self._per_key
        policy = cache.get(key)
        if policy is not None:
            cache.move_to_end(key)
            return policy
        policy = Policy(
            self.name,
            self.target,
            self.direction,
            timeout=self.timeout,
            retry=self.retry,
            breaker=self._breaker_spec,
            breaker_name=f"{self.name}-{key}",
            resiliency=self.resiliency,
            observer=self.observer,
            clock=self._clock,
            sleep=self._sleep,
        )
        cache[key] = policy
        if len(cache) > self._cache_size:
            cache.popitem(last=False)
        return policy

    async def run(
        self,
        op: Callable[[], Awaitable[T]],
        *,
        failed: Callable[[T], bool] | None = None,
        retryable_error: Callable[[BaseException], bool] | None = None,
        retryable_result: Callable[[T], bool] | None = None,
    ) -> T:
        """`op` under this policy.

        Each attempt passes the breaker, then runs under the timeout (TimeoutError when it
        fires). An exception fails the attempt and is retried when `retryable_error` allows
        (default: always); a result for which `failed` is true fails it too and is retried when
        `retryable_result` allows (default: always), and once retries run out that last result
        is returned rather than raised. CircuitOpen, and any exception not retryable, propagate
        at once. Every failure counts against the breaker.
        """
        observer = self.observer
        if observer is not None:
            for kind in self._kinds:
                observer.executed(self, kind)
        run = _Run()
        retry = self.retry
        if retry is None:
            result, _ = await self._attempt(op, failed, run)
            return result
        delays = retry.delays()
        start = self._clock()
        retried = False
        while True:
            try:
                result, bad = await self._attempt(op, failed, run)
            except CircuitOpen:
                raise
            except Exception as exc:
                if retryable_error is not None and not retryable_error(exc):
                    raise
                delay = self._next_delay(delays, retry, start)
                if delay is None:
                    raise
            else:
                if not bad:
                    return result
                if retryable_result is not None and not retryable_result(result):
                    return result
                delay = self._next_delay(delays, retry, start)
                if delay is None:
                    return result
            if not retried:
                # dapr/kit NotifyRecover: the retry activation is recorded once per run.
                retried = True
                if observer is not None:
                    observer.activation(self, "retry")
            await self._sleep(delay)

    def _next_delay(self, delays: Iterator[float], retry: Retry, start: float) -> float | None:
        delay = next(delays, None)
        if delay is None:
            return None
        if retry.max_elapsed is not None and self._clock() - start + delay > retry.max_elapsed:
            return None
        return delay

    async def _attempt(
        self, op: Callable[[], Awaitable[T]], failed: Callable[[T], bool] | None, run: _Run
    ) -> tuple[T, bool]:
        breaker = self.breaker
        if breaker is None:
            result = await self._timed(op, run)
            return result, failed is not None and failed(result)
        before = breaker.state
        generation = breaker.before()
        try:
            result = await self._timed(op, run)
        except BaseException:
            breaker.after(generation, False)
            self._breaker_moved(breaker, before)
            raise
        bad = failed is not None and failed(result)
        breaker.after(generation, not bad)
        self._breaker_moved(breaker, before)
        return result, bad

    def _breaker_moved(self, breaker: CircuitBreaker, before: State) -> None:
        # daprd records a breaker activation whenever the state differs after an attempt.
        if self.observer is not None and breaker.state is not before:
            self.observer.activation(self, "circuitbreaker")

    async def _timed(self, op: Callable[[], Awaitable[T]], run: _Run) -> T:
        timeout = self.timeout
        if timeout is None:
            return await op()
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                return await op()
        except TimeoutError:
            if scope.expired() and not run.timed_out:
                run.timed_out = True
                if self.observer is not None:
                    self.observer.activation(self, "timeout")
            raise
