"""Dapr's state query language, parsed and validated into a small typed AST for the stores.

A query document is `{"filter": ..., "sort": [...], "page": {"limit": n, "token": "..."}}`.
Filters are EQ, NEQ, IN, GT, GTE, LT, LTE over one dot path each (`a.b.1`: digit-only
segments may index arrays), combined with AND/OR. The page token is the offset of the next page.
Every problem raises InvalidQuery; the stores translate the AST to their own SQL.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pillion.components.state.api import InvalidQuery

CompareOp = Literal["EQ", "NEQ", "GT", "GTE", "LT", "LTE"]
COMPARE_OPS: tuple[CompareOp, ...] = ("EQ", "NEQ", "GT", "GTE", "LT", "LTE")
RANGE_OPS = frozenset({"GT", "GTE", "LT", "LTE"})


@dataclass(frozen=True, slots=True)
class Compare:
    """`op` between the value at `path` and `value` (a number for the range operators)."""

    op: CompareOp
    path: tuple[str, ...]
    value: Any


@dataclass(frozen=True, slots=True)
class In:
    """The value at `path` equals one of `values` (never empty)."""

    path: tuple[str, ...]
    values: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Logical:
    """AND or OR over at least one filter."""

    op: Literal["AND", "OR"]
    filters: tuple[Filter, ...]


Filter = Compare | In | Logical


@dataclass(frozen=True, slots=True)
class SortKey:
    path: tuple[str, ...]
    descending: bool = False


@dataclass(frozen=True, slots=True)
class Query:
    """A validated query; `limit` 0 means no page limit, `offset` comes from the page token."""

    filter: Filter | None = None
    sort: tuple[SortKey, ...] = ()
    limit: int = 0
    offset: int = 0

    def next_token(self, returned: int) -> str:
        """The token continuing after a page of `returned` results ("" without a page limit)."""
        return str(self.offset + returned) if self.limit else ""


def parse_query(q: Mapping[str, Any] | bytes | str) -> Query:
    """Parse the query JSON (raw or decoded); raise InvalidQuery when it is malformed."""
    spec = _load(q)
    raw_filter = spec.get("filter")
    flt = parse_filter(raw_filter) if raw_filter else None
    sort = _sort(spec.get("sort") or [])
    limit, offset = _page(spec.get("page"))
    return Query(flt, sort, limit, offset)


def parse_path(key: Any) -> tuple[str, ...]:
    """A dot path's segments; none may be empty."""
    if not isinstance(key, str) or not key:
        raise InvalidQuery(f"invalid field path {key!r}")
    parts = tuple(key.split("."))
    if any(p == "" for p in parts):
        raise InvalidQuery(f"invalid field path {key!r}")
    return parts


def _json_value(v: Any) -> Any:
    try:
        json.dumps(v, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidQuery(f"invalid filter value {v!r}") from exc
    return v


def parse_filter(f: Any) -> Filter:
    if not isinstance(f, Mapping) or len(f) != 1:
        raise InvalidQuery(f"a filter must be an object with exactly one operator, got {f!r}")
    op, arg = next(iter(f.items()))
    if op in ("AND", "OR"):
        if not isinstance(arg, list) or not arg:
            raise InvalidQuery(f"{op} needs a non-empty array of filters")
        return Logical(op, tuple(parse_filter(x) for x in arg))
    if op not in COMPARE_OPS and op != "IN":
        raise InvalidQuery(
            f"unsupported filter operator {op!r} (EQ, NEQ, GT, GTE, LT, LTE, IN, AND, OR)"
        )
    if not isinstance(arg, Mapping) or len(arg) != 1:
        raise InvalidQuery(f"{op} needs an object with exactly one field")
    key, v = next(iter(arg.items()))
    if op == "IN":
        if not isinstance(v, list) or not v:
            raise InvalidQuery(f"IN on {key!r} needs a non-empty array of values")
        path = parse_path(key)
        return In(path, tuple(_json_value(x) for x in v))
    path = parse_path(key)
    if op in RANGE_OPS and (isinstance(v, bool) or not isinstance(v, int | float)):
        raise InvalidQuery(f"{op} on {key!r} needs a number, got {v!r}")
    for cop in COMPARE_OPS:
        if cop == op:
            return Compare(cop, path, _json_value(v))
    raise AssertionError(op)  # pragma: no cover


def _sort(items: Any) -> tuple[SortKey, ...]:
    if not isinstance(items, list):
        raise InvalidQuery("sort must be an array")
    out = []
    for s in items:
        if not isinstance(s, Mapping):
            raise InvalidQuery(f"invalid sort item {s!r}")
        order = s.get("order") or "ASC"
        if not isinstance(order, str) or order.upper() not in ("ASC", "DESC"):
            raise InvalidQuery(f"sort order must be ASC or DESC, got {order!r}")
        out.append(SortKey(parse_path(s.get("key")), order.upper() == "DESC"))
    return tuple(out)


def _page(page: Any) -> tuple[int, int]:
    if page is None:
        return 0, 0
    if not isinstance(page, Mapping):
        raise InvalidQuery("page must be an object")
    limit = page.get("limit", 0)
    if limit is None:
        limit = 0
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise InvalidQuery(f"page limit must be a non-negative integer, got {limit!r}")
    token = page.get("token") or ""
    if not isinstance(token, str) or (token and not (token.isascii() and token.isdigit())):
        raise InvalidQuery(f"invalid page token {token!r}")
    return limit, int(token) if token else 0


def _load(q: Mapping[str, Any] | bytes | str) -> Mapping[str, Any]:
    if isinstance(q, bytes | str):
        try:
            q = json.loads(q)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidQuery(f"query is not valid JSON: {exc}") from exc
    if not isinstance(q, Mapping):
        raise InvalidQuery("query must be a JSON object")
    return q
