"""TTL parsing, expiry metadata and etag helpers shared by the state stores."""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Mapping

from pillion.components.state.api import TTL_EXPIRE_KEY, TTL_KEY

# Dapr parses the TTL as a base-10 integer; Python's int() would also take "1_0" and " 5 ".
_INT = re.compile(r"[+-]?\d+")
# Dapr rejects TTLs that overflow an int32.
_MAX_TTL = 2**31 - 1


def parse_ttl(metadata: Mapping[str, str]) -> int | None:
    """Seconds until expiry from `metadata["ttlInSeconds"]`, or None for "never expires".

    Absent, empty and -1 mean never; 0, other negatives and non-integers raise ValueError.
    """
    raw = metadata.get(TTL_KEY)
    if not raw:
        return None
    if _INT.fullmatch(raw) is None:
        raise ValueError(f"metadata {TTL_KEY!r} must be an integer number of seconds, got {raw!r}")
    ttl = int(raw)
    if ttl == -1:
        return None
    if ttl <= 0 or ttl > _MAX_TTL:
        raise ValueError(
            f"metadata {TTL_KEY!r} must be -1 (never expire) or between 1 and {_MAX_TTL}, "
            f"got {raw!r}"
        )
    return ttl


def rfc3339(epoch: float) -> str:
    """`epoch` as RFC 3339 UTC with whole seconds, the form Dapr's stores return."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def expiry_metadata(expire: float | None) -> dict[str, str]:
    """Response metadata for an item expiring at `expire` (epoch seconds); {} for never."""
    return {} if expire is None else {TTL_EXPIRE_KEY: rfc3339(expire)}


class RandomETags:
    """Unique, unguessable-prefix etags: a random per-instance prefix plus a counter.

    uuid4() reads the OS random source on every call; a counter behind a random prefix is just as
    unique across processes and restarts and costs a fraction of that on the write path.
    """

    __slots__ = ("_counter", "_prefix")

    def __init__(self) -> None:
        self._prefix = os.urandom(10).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):012x}"
