"""The `bindings.cron` input binding and a small evaluator of Dapr's (robfig/cron) schedules."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pillion.components.bindings.api import InputBinding, InputHandler
from pillion.components.metadata import ComponentConfigError, ComponentInfo, decode
from pillion.durations import parse_duration

log = logging.getLogger(__name__)

_MONTH_NAMES = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_MONTHS = {m: i + 1 for i, m in enumerate(_MONTH_NAMES)}
_DAYS = {d: i for i, d in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))}
_DESCRIPTORS = {
    "@yearly": "0 0 0 1 1 *",
    "@annually": "0 0 0 1 1 *",
    "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 0",
    "@daily": "0 0 0 * * *",
    "@midnight": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
}
# (low, high, names) for second, minute, hour, day of month, month, day of week.
_FIELDS: tuple[tuple[int, int, dict[str, int]], ...] = (
    (0, 59, {}),
    (0, 59, {}),
    (0, 23, {}),
    (1, 31, {}),
    (1, 12, _MONTHS),
    (0, 6, _DAYS),
)


class CronSyntaxError(ValueError):
    """The schedule is not a valid cron expression."""


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule: either a fixed interval (`@every`) or six sets of allowed values."""

    every: float = 0.0
    fields: tuple[frozenset[int], ...] = ()
    # Day of month and day of week match with OR when both are restricted (as cron does).
    dom_star: bool = True
    dow_star: bool = True

    def next(self, after: datetime) -> datetime:
        """The first activation strictly after `after` (naive local time)."""
        if self.every:
            return after + timedelta(seconds=self.every)
        sec, minute, hour, _dom, month, _dow = self.fields
        t = after.replace(microsecond=0) + timedelta(seconds=1)
        limit = after + timedelta(days=366 * 5)
        while t <= limit:
            if t.month not in month:
                t = (t.replace(day=1, hour=0, minute=0, second=0) + timedelta(days=32)).replace(
                    day=1
                )
                continue
            if not self._day_ok(t):
                t = t.replace(hour=0, minute=0, second=0) + timedelta(days=1)
                continue
            if t.hour not in hour:
                t = t.replace(minute=0, second=0) + timedelta(hours=1)
                continue
            if t.minute not in minute:
                t = t.replace(second=0) + timedelta(minutes=1)
                continue
            if t.second not in sec:
                t += timedelta(seconds=1)
                continue
            return t
        raise CronSyntaxError("schedule never fires")

    def _day_ok(self, t: datetime) -> bool:
        dom_ok = t.day in self.fields[3]
        dow_ok = (t.isoweekday() % 7) in self.fields[5]
        if self.dom_star or self.dow_star:
            return dom_ok and dow_ok
        return dom_ok or dow_ok


def parse(spec: str) -> Schedule:
    """Dapr's cron syntax: 6 fields (with seconds) or 5, `@every <duration>`, `@daily` etc."""
    s = spec.strip()
    if not s:
        raise CronSyntaxError("empty schedule")
    if s.startswith("@every"):
        rest = s[len("@every") :].strip()
        try:
            every = parse_duration(rest)
        except ValueError as exc:
            raise CronSyntaxError(f"invalid @every duration {rest!r}") from exc
        if every <= 0:
            raise CronSyntaxError(f"@every duration must be positive, got {rest!r}")
        # robfig/cron rounds intervals below a second up to one second.
        return Schedule(every=max(1.0, every))
    if s.startswith("@"):
        expanded = _DESCRIPTORS.get(s.lower())
        if expanded is None:
            raise CronSyntaxError(f"unrecognized descriptor {s!r}")
        s = expanded
    parts = s.split()
    if len(parts) == 5:
        parts = ["0", *parts]
    if len(parts) != 6:
        raise CronSyntaxError(f"expected 5 or 6 fields, found {len(parts)}: {spec!r}")
    sets = tuple(_field(p, *_FIELDS[i]) for i, p in enumerate(parts))
    return Schedule(fields=sets, dom_star=parts[3] in ("*", "?"), dow_star=parts[5] in ("*", "?"))


def _field(text: str, low: int, high: int, names: dict[str, int]) -> frozenset[int]:
    out: set[int] = set()
    for item in text.split(","):
        rng, _, step_s = item.partition("/")
        step = 1
        if step_s:
            if not step_s.isdigit() or int(step_s) == 0:
                raise CronSyntaxError(f"invalid step in {item!r}")
            step = int(step_s)
        if rng in ("*", "?"):
            lo, hi = low, high
        else:
            a, dash, b = rng.partition("-")
            lo = _value(a, names)
            hi = _value(b, names) if dash else (high if step_s else lo)
        top = 7 if names is _DAYS else high  # Sunday may be written 7
        if lo < low or hi > top or lo > hi:
            raise CronSyntaxError(f"value out of range ({low}-{high}) in {item!r}")
        out.update(v % 7 if names is _DAYS else v for v in range(lo, hi + 1, step))
    return frozenset(out)


def _value(text: str, names: dict[str, int]) -> int:
    up = text.upper()
    if up in names:
        return names[up]
    if not text.isdigit():
        raise CronSyntaxError(f"invalid value {text!r}")
    return int(text)


@dataclass(frozen=True)
class CronMetadata:
    """Dapr's `bindings.cron` metadata."""

    schedule: str = field(default="", metadata={"name": "schedule"})


class CronBinding(InputBinding):
    """Calls the handler with empty data at each activation of `schedule` until closed."""

    def __init__(self) -> None:
        self.name = ""
        self.schedule = Schedule(every=1.0)
        self._task: asyncio.Task[None] | None = None

    async def init(self, info: ComponentInfo) -> None:
        self.name = info.name
        md = decode(CronMetadata, info.properties)
        if not md.schedule:
            raise ComponentConfigError("schedule", "is required")
        try:
            self.schedule = parse(md.schedule)
        except CronSyntaxError as exc:
            raise ComponentConfigError("schedule", str(exc)) from exc

    async def read(self, handler: InputHandler) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(handler))

    async def _run(self, handler: InputHandler) -> None:
        nxt = self.schedule.next(datetime.now())
        while True:
            await asyncio.sleep(max(0.0, nxt.timestamp() - time.time()))
            now = datetime.now().astimezone()
            metadata = {
                "timeZone": now.tzname() or "Local",
                "readTimeUTC": now.astimezone(UTC).isoformat(),
            }
            try:
                await handler(b"", metadata)
            except Exception as exc:  # the app failing an event does not stop the schedule
                log.error("error delivering cron event of binding %s: %s", self.name, exc)
            nxt = self.schedule.next(max(nxt, datetime.now()))

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
