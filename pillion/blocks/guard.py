"""One way into a component: its resiliency policy, then a metric of how the call went.

Every block calls its components through `component_call`, so a policy written for any
component applies the same way, and a call is never retried unless a policy says so.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from pillion.resiliency import Resiliency

T = TypeVar("T")

# Called with (succeeded, latency in milliseconds) after each call.
Record = Callable[[bool, float], None]


def recorder(metrics: Any, name: str, *labels: str) -> Record | None:
    """`metrics.<name>(*labels, ok, ms)` as a Record; None (no timing at all) without metrics."""
    return None if metrics is None else functools.partial(getattr(metrics, name), *labels)


async def component_call(
    resiliency: Resiliency | None,
    name: str,
    kind: str,
    fn: Callable[[], Awaitable[T]],
    *,
    record: Record | None = None,
    retryable: Callable[[BaseException], bool] | None = None,
    inbound: bool = False,
) -> T:
    """`fn()` under component `name`'s outbound (or inbound) policy of `kind` ("state", ...).

    A policy's timeout raises TimeoutError and an open breaker CircuitOpen: the caller maps
    them to its block's error, like any other failure of the component.
    """
    policy = None
    if resiliency is not None:
        policy = (
            resiliency.component_inbound(name, kind)
            if inbound
            else resiliency.component_outbound(name, kind)
        )
    if policy is None and record is None:
        return await fn()
    t0 = time.perf_counter()
    ok = False
    try:
        out = await (fn() if policy is None else policy.run(fn, retryable_error=retryable))
        ok = True
        return out
    finally:
        if record is not None:
            record(ok, (time.perf_counter() - t0) * 1000)
