"""Subscription routes: CEL rules over the CloudEvent choose the app path, first match wins."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import celpy

__all__ = ["RouteError", "RouteEvalError", "Routes"]

# Long celpy messages (an undeclared name dumps the whole activation) are cut to this length.
_MESSAGE_LIMIT = 300


class RouteError(ValueError):
    """A route rule whose CEL `match` expression does not parse."""


class RouteEvalError(RouteError):
    """A rule's expression failed on an event or did not yield a boolean.

    Dapr stops at such a rule and fails the delivery (dead-letter topic if set, else retry)
    rather than trying the next rule.
    """


def _short(exc: BaseException) -> str:
    text = str(exc.args[0]) if exc.args else str(exc)
    text = text.split(" (in activation", 1)[0].strip()
    return text if len(text) <= _MESSAGE_LIMIT else text[: _MESSAGE_LIMIT - 3] + "..."


class _Cel:
    """celpy, imported and set up once on first use; it costs ~0.2 s, which most sidecars skip."""

    def __init__(self) -> None:
        import celpy
        from celpy import celtypes
        from celpy.evaluation import base_functions

        self.celtypes = celtypes
        self.env = celpy.Environment()
        number_types = (celtypes.IntType, celtypes.UintType, celtypes.DoubleType)

        def is_number(value: Any) -> bool:
            return isinstance(value, number_types)

        def plain(value: Any) -> int | float:
            return float(value) if isinstance(value, celtypes.DoubleType) else int(value)

        def mixed(a: Any, b: Any) -> bool:
            return type(a) is not type(b) and is_number(a) and is_number(b)

        # Dapr (cel-go) compares int, uint and double with each other; celpy refuses mixed types.
        # Every JSON number is a double there, so `event.data.n > 5` relies on this.
        def heterogeneous(
            name: str, compare: Callable[[int | float, int | float], bool]
        ) -> Callable[[Any, Any], Any]:
            default = base_functions[name]

            def operator(a: Any, b: Any) -> Any:
                if mixed(a, b):
                    return celtypes.BoolType(compare(plain(a), plain(b)))
                return default(a, b)

            operator.__name__ = default.__name__
            return operator

        default_in = base_functions["_in_"]

        def operator_in(item: Any, container: Any) -> Any:
            if is_number(item) and isinstance(container, list):
                if any(is_number(x) and plain(x) == plain(item) for x in container):
                    return celtypes.BoolType(True)
                if all(is_number(x) for x in container):
                    return celtypes.BoolType(False)
            return default_in(item, container)

        self.functions: dict[str, Any] = {
            "_==_": heterogeneous("_==_", lambda a, b: a == b),
            "_!=_": heterogeneous("_!=_", lambda a, b: a != b),
            "_<_": heterogeneous("_<_", lambda a, b: a < b),
            "_<=_": heterogeneous("_<=_", lambda a, b: a <= b),
            "_>_": heterogeneous("_>_", lambda a, b: a > b),
            "_>=_": heterogeneous("_>=_", lambda a, b: a >= b),
            "_in_": operator_in,
        }

    def compile(self, expression: str) -> celpy.Runner:
        try:
            return self.env.program(self.env.compile(expression), functions=self.functions)
        except Exception as exc:
            raise RouteError(f"invalid route match expression {expression!r}: {exc}") from exc

    def value(self, value: Any) -> Any:
        """A JSON-shaped Python value as celpy values."""
        t = self.celtypes
        if value is None:
            return None
        if isinstance(value, str):
            return t.StringType(value)
        if isinstance(value, bool):
            return t.BoolType(value)
        if isinstance(value, int | float):
            # Dapr decodes the event with Go's encoding/json, so every number is a double.
            try:
                return t.DoubleType(value)
            except OverflowError:
                return t.DoubleType(float("inf") if value > 0 else float("-inf"))
        if isinstance(value, Mapping):
            return t.MapType({t.StringType(str(k)): self.value(v) for k, v in value.items()})
        if isinstance(value, list | tuple):
            return t.ListType([self.value(v) for v in value])
        if isinstance(value, bytes | bytearray):
            return t.BytesType(bytes(value))
        return t.StringType(str(value))

    def is_bool(self, value: Any) -> bool:
        return isinstance(value, bool | self.celtypes.BoolType)


_cel_support: _Cel | None = None


def _cel() -> _Cel:
    global _cel_support
    if _cel_support is None:
        _cel_support = _Cel()
    return _cel_support


class Routes:
    """The routing rules of one subscription (dapr-api §3.5).

    `rules` are `(match, path)` pairs tried in order; a blank `match` always matches, as in
    Dapr. `default` is the catch-all tried last (`routes.default`, else `route`); None means
    there is none. Bad expressions raise RouteError here, when subscriptions load.
    `leading_slash` puts a `/` in front of paths for HTTP apps; gRPC apps get the path verbatim
    (the SDKs key handlers by it, and the gRPC default path is "").
    """

    __slots__ = ("_default", "_rules", "_steps")

    def __init__(
        self,
        rules: Iterable[tuple[str, str]] = (),
        default: str | None = None,
        *,
        leading_slash: bool = True,
    ) -> None:
        def fix(path: str) -> str:
            return path if not leading_slash or path.startswith("/") else "/" + path

        self._rules = tuple((match.strip(), fix(path)) for match, path in rules)
        self._default = None if default is None else fix(default)
        # (expression, compiled program or None for "always", path); celpy is only loaded
        # when some rule has an expression.
        steps: list[tuple[str, Any, str]] = []
        for match, path in self._rules:
            steps.append((match, _cel().compile(match) if match else None, path))
        if self._default is not None:
            steps.append(("", None, self._default))
        self._steps = tuple(steps)

    @property
    def rules(self) -> tuple[tuple[str, str], ...]:
        """The `(match, path)` rules as used: matches trimmed, paths fixed."""
        return self._rules

    @property
    def default(self) -> str | None:
        return self._default

    def __repr__(self) -> str:
        return f"Routes({list(self._rules)!r}, default={self._default!r})"

    def select(self, envelope: Mapping[str, Any]) -> str | None:
        """The path for this CloudEvent, or None when no rule matches and there is no default.

        Raises RouteEvalError when a rule's expression fails (a missing field, a type mismatch)
        or yields a non-boolean; Dapr then fails the delivery instead of trying later rules.
        """
        activation: dict[str, Any] | None = None
        for expression, program, path in self._steps:
            if program is None:
                return path
            cel = _cel()
            if activation is None:
                activation = {"event": cel.value(envelope)}
            try:
                result = program.evaluate(activation)
            except Exception as exc:
                raise RouteEvalError(
                    f"error evaluating route match expression {expression!r}: {_short(exc)}"
                ) from exc
            if not cel.is_bool(result):
                raise RouteEvalError(
                    f"the result of match expression {expression!r} was not a boolean"
                )
            if result:
                return path
        return None
