"""Typed component metadata decoded from a manifest's name/value list."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pillion.durations import parse_duration


class ComponentConfigError(ValueError):
    """A metadata value is missing or invalid; `field` names the metadata entry."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"metadata {field!r}: {message}")
        self.field = field


class Properties(Mapping[str, str]):
    """Metadata properties with Dapr's case-insensitive names."""

    def __init__(self, values: Mapping[str, str] | None = None) -> None:
        self._values: dict[str, tuple[str, str]] = {}
        for k, v in (values or {}).items():
            self._values[k.lower()] = (k, v)

    def __getitem__(self, key: str) -> str:
        return self._values[key.lower()][1]

    def __iter__(self) -> Iterator[str]:
        return (orig for orig, _ in self._values.values())

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._values

    def __repr__(self) -> str:
        return f"Properties({dict(self)!r})"


@dataclass(frozen=True)
class ComponentInfo:
    """What a component is told about itself at init."""

    name: str
    type: str
    version: str
    app_id: str
    properties: Properties
    namespace: str = ""


class Seconds(float):
    """Marks a metadata field as a Go duration, decoded to seconds."""


T = TypeVar("T")

_TRUE = {"true", "1", "yes", "on", "y"}
_FALSE = {"false", "0", "no", "off", "n", ""}


def parse_bool(field: str, raw: str) -> bool:
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ComponentConfigError(field, f"expected true or false, got {raw!r}")


def decode(cls: type[T], props: Mapping[str, str]) -> T:
    """Build the dataclass `cls` from `props`.

    Each field is looked up by its name, then by the names in
    `field(metadata={"aliases": (...)})`; case does not matter. Types: str, int, float, bool,
    Seconds (a Go duration) and their `| None` forms.
    """
    if not isinstance(props, Properties):
        props = Properties(props)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        names = (f.metadata.get("name", f.name), *f.metadata.get("aliases", ()))
        raw: str | None = None
        used = names[0]
        for n in names:
            if n in props:
                raw, used = props[n], n
                break
        if raw is None:
            continue
        kwargs[f.name] = _convert(used, raw, hints[f.name])
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field was not given
        raise ComponentConfigError(
            str(exc).split("'")[-2] if "'" in str(exc) else "?", "is required"
        ) from exc


def _convert(field: str, raw: str, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0]
    if hint is bool:
        return parse_bool(field, raw)
    if hint is Seconds:
        try:
            return Seconds(parse_duration(raw))
        except ValueError as exc:
            raise ComponentConfigError(field, f"expected a duration like 5s, got {raw!r}") from exc
    if hint is int:
        try:
            return int(raw.strip())
        except ValueError as exc:
            raise ComponentConfigError(field, f"expected an integer, got {raw!r}") from exc
    if hint is float:
        try:
            return float(raw.strip())
        except ValueError as exc:
            raise ComponentConfigError(field, f"expected a number, got {raw!r}") from exc
    return raw
