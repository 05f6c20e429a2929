"""Circuit breaker with gobreaker's semantics (what daprd uses), tripped by a CEL expression."""

from __future__ import annotations

import logging
import operator
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "DEFAULT_TRIP",
    "BreakerSpec",
    "CircuitBreaker",
    "CircuitOpen",
    "Counts",
    "State",
    "TripError",
    "compile_trip",
]

log = logging.getLogger("pillion.resiliency.breaker")

# gobreaker's ReadyToTrip when the policy sets no `trip`.
DEFAULT_TRIP = "consecutiveFailures > 5"

# The names a `trip` expression may use, mapped to the Counts attribute that holds each.
_COUNT_NAMES = {
    "requests": "requests",
    "totalSuccesses": "total_successes",
    "totalFailures": "total_failures",
    "consecutiveSuccesses": "consecutive_successes",
    "consecutiveFailures": "consecutive_failures",
}
_COMPARE: dict[str, Callable[[int, int], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
# `<name> <op> <int>`: nearly every trip expression written; evaluated without CEL.
_SIMPLE = re.compile(
    r"\s*(" + "|".join(_COUNT_NAMES) + r")\s*(>=|<=|==|!=|>|<)\s*(\d+)\s*",
)


class CircuitOpen(Exception):
    """The breaker refused the call without running it (gobreaker's two errors, same text)."""


class TripError(ValueError):
    """A `trip` expression that does not compile."""


class State(StrEnum):
    """Breaker states, spelled as Dapr's metrics label them."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(slots=True)
class Counts:
    """gobreaker's counters for the current generation (reset on every state change)."""

    requests: int = 0
    total_successes: int = 0
    total_failures: int = 0
    consecutive_successes: int = 0
    consecutive_failures: int = 0

    def clear(self) -> None:
        self.requests = 0
        self.total_successes = 0
        self.total_failures = 0
        self.consecutive_successes = 0
        self.consecutive_failures = 0


Trip = Callable[[Counts], bool]


def compile_trip(expression: str) -> Trip:
    """A predicate over Counts for a CEL `trip` expression; TripError if it does not parse.

    The common `<name> <op> <int>` form is a plain comparison; anything else goes through
    cel-python, imported only then because the import alone costs ~0.2 s.
    """
    m = _SIMPLE.fullmatch(expression)
    if m is not None:
        attr = _COUNT_NAMES[m.group(1)]
        compare = _COMPARE[m.group(2)]
        limit = int(m.group(3))
        getter = operator.attrgetter(attr)
        return lambda counts: compare(getter(counts), limit)
    return _cel_trip(expression)


def _cel_trip(expression: str) -> Trip:
    import celpy
    from celpy import celtypes

    env = celpy.Environment()
    try:
        program = env.program(env.compile(expression))
    except Exception as exc:
        raise TripError(f"invalid trip expression {expression!r}: {_short(exc)}") from exc

    def trip(counts: Counts) -> bool:
        activation: dict[str, Any] = {
            name: celtypes.IntType(getattr(counts, attr)) for name, attr in _COUNT_NAMES.items()
        }
        try:
            result = program.evaluate(activation)
        except Exception:
            # Dapr: "We cannot assume it is safe to trip if the eval returns an error."
            return False
        return isinstance(result, celtypes.BoolType) and bool(result)

    try:
        program.evaluate({n: celtypes.IntType(0) for n in _COUNT_NAMES})
    except Exception as exc:
        # daprd accepts it too and then never trips; say so once instead of failing start-up.
        log.warning("trip expression %r cannot be evaluated: %s", expression, _short(exc))
    return trip


def _short(exc: BaseException) -> str:
    text = str(exc.args[0]) if exc.args else str(exc)
    text = text.split(" (in activation", 1)[0].strip()
    return text if len(text) <= 300 else text[:297] + "..."


@dataclass(frozen=True)
class BreakerSpec:
    """One `circuitBreakers.<name>` entry; each target gets its own CircuitBreaker from it."""

    name: str
    max_requests: int = 1
    interval: float = 0.0
    timeout: float = 60.0
    trip_expression: str = DEFAULT_TRIP
    trip: Trip = field(default=compile_trip(DEFAULT_TRIP), compare=False, repr=False)

    def build(
        self,
        instance: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[State, State], None] | None = None,
    ) -> CircuitBreaker:
        """A fresh, closed breaker named `instance` with these settings."""
        return CircuitBreaker(
            instance,
            max_requests=self.max_requests,
            interval=self.interval,
            timeout=self.timeout,
            trip=self.trip,
            clock=clock,
            on_change=on_change,
        )


class CircuitBreaker:
    """gobreaker's state machine.

    Closed: every call runs; counts reset every `interval` (0: never); after a failure `trip`
    decides whether to open. Open: calls are refused for `timeout` seconds, then half-open.
    Half-open: at most `max_requests` calls are admitted per generation; `max_requests`
    consecutive successes close it, any failure opens it again. A result that arrives after the
    state moved on (another generation) is ignored, as in gobreaker.
    """

    __slots__ = (
        "_clock",
        "_expiry",
        "_generation",
        "_interval",
        "_max_requests",
        "_state",
        "_timeout",
        "_trip",
        "counts",
        "name",
        "on_change",
    )

    def __init__(
        self,
        name: str,
        *,
        max_requests: int = 1,
        interval: float = 0.0,
        timeout: float = 60.0,
        trip: Trip | str | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[State, State], None] | None = None,
    ) -> None:
        self.name = name
        # gobreaker's defaults for zero values.
        self._max_requests = max_requests if max_requests > 0 else 1
        self._interval = interval if interval > 0 else 0.0
        self._timeout = timeout if timeout > 0 else 60.0
        if trip is None:
            trip = DEFAULT_TRIP
        self._trip: Trip = compile_trip(trip) if isinstance(trip, str) else trip
        self._clock = clock
        self.on_change = on_change
        self.counts = Counts()
        self._state = State.CLOSED
        self._generation = 0
        self._expiry: float | None = None
        self._new_generation(clock())

    @property
    def max_requests(self) -> int:
        return self._max_requests

    @property
    def interval(self) -> float:
        return self._interval

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def state(self) -> State:
        """The state now (an open breaker whose timeout passed reads half-open)."""
        return self._current(self._clock())

    def before(self) -> int:
        """Admit one call or raise CircuitOpen; returns the generation to pass to `after`."""
        state = self._current(self._clock())
        if state is State.OPEN:
            raise CircuitOpen("circuit breaker is open")
        if state is State.HALF_OPEN and self.counts.requests >= self._max_requests:
            raise CircuitOpen("too many requests")
        self.counts.requests += 1
        return self._generation

    def after(self, generation: int, success: bool) -> None:
        """Record the outcome of a call admitted by `before`."""
        now = self._clock()
        state = self._current(now)
        if generation != self._generation:
            return
        c = self.counts
        if success:
            c.total_successes += 1
            c.consecutive_successes += 1
            c.consecutive_failures = 0
            if state is State.HALF_OPEN and c.consecutive_successes >= self._max_requests:
                self._set_state(State.CLOSED, now)
            return
        c.total_failures += 1
        c.consecutive_failures += 1
        c.consecutive_successes = 0
        if state is State.CLOSED:
            if self._trip(c):
                self._set_state(State.OPEN, now)
        elif state is State.HALF_OPEN:
            self._set_state(State.OPEN, now)

    def _current(self, now: float) -> State:
        state = self._state
        if state is State.CLOSED:
            # gobreaker compares with Before(now): the boundary instant itself does not count.
            if self._expiry is not None and self._expiry < now:
                self._new_generation(now)
        elif state is State.OPEN and self._expiry is not None and self._expiry < now:
            self._set_state(State.HALF_OPEN, now)
        return self._state

    def _set_state(self, state: State, now: float) -> None:
        if state is self._state:
            return
        prev = self._state
        self._state = state
        self._new_generation(now)
        log.info("circuit breaker %r changed state from %s to %s", self.name, prev, state)
        if self.on_change is not None:
            self.on_change(prev, state)

    def _new_generation(self, now: float) -> None:
        self._generation += 1
        self.counts.clear()
        if self._state is State.CLOSED:
            self._expiry = now + self._interval if self._interval else None
        elif self._state is State.OPEN:
            self._expiry = now + self._timeout
        else:
            self._expiry = None
