"""The `secretstores.local.file` store: secrets read once from a JSON file at init."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pillion.components.metadata import ComponentConfigError, ComponentInfo, decode
from pillion.components.secretstores.api import Feature, SecretNotFound, SecretStore


@dataclass(frozen=True)
class LocalFileMetadata:
    """Dapr's `secretstores.local.file` metadata."""

    secrets_file: str = field(default="", metadata={"name": "secretsFile"})
    nested_separator: str = field(default=":", metadata={"name": "nestedSeparator"})
    multi_valued: bool = field(default=False, metadata={"name": "multiValued"})


class LocalFileSecretStore(SecretStore):
    """Nested JSON objects and arrays are flattened to `a:b` / `a:0` names (nestedSeparator).

    With `multiValued`, each top-level key is one secret whose map is its (flattened) object;
    otherwise every flattened name is a secret of one value, named like the secret.
    """

    def __init__(self) -> None:
        self._secrets: dict[str, dict[str, str]] = {}
        self._features: frozenset[Feature] = frozenset()

    async def init(self, info: ComponentInfo) -> None:
        md = decode(LocalFileMetadata, info.properties)
        if not md.secrets_file:
            raise ComponentConfigError("secretsFile", "is required: the path of a JSON file")
        # Relative to the sidecar's working directory, as daprd opens it.
        path = Path(os.getcwd(), md.secrets_file)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ComponentConfigError(
                "secretsFile", f"cannot read {path}: {exc.strerror or exc}"
            ) from exc
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ComponentConfigError("secretsFile", f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ComponentConfigError("secretsFile", f"{path} must hold a JSON object")
        sep = md.nested_separator or ":"
        try:
            if md.multi_valued:
                self._secrets = {k: _secret_map(k, v, sep) for k, v in doc.items()}
                self._features = frozenset({Feature.MULTIPLE_KEY_VALUES_PER_SECRET})
            else:
                self._secrets = {k: {k: v} for k, v in _flatten(doc, sep).items()}
                self._features = frozenset()
        except ValueError as exc:
            raise ComponentConfigError("secretsFile", f"{path}: {exc}") from exc

    def features(self) -> frozenset[Feature]:
        return self._features

    async def get(self, key: str, metadata: Mapping[str, str]) -> dict[str, str]:
        secret = self._secrets.get(key)
        if secret is None:
            raise SecretNotFound(key)
        return dict(secret)

    async def bulk_get(self, metadata: Mapping[str, str]) -> dict[str, dict[str, str]]:
        return {name: dict(secret) for name, secret in self._secrets.items()}


def _secret_map(name: str, value: Any, sep: str) -> dict[str, str]:
    """One top-level entry of a multi-valued file as the secret's map."""
    if isinstance(value, dict | list):
        return _flatten(value, sep)
    return {name: _text(value)}


def _flatten(node: dict[str, Any] | list[Any], sep: str) -> dict[str, str]:
    out: dict[str, str] = {}

    def visit(path: str, value: Any) -> None:
        if isinstance(value, dict):
            items: list[tuple[str, Any]] = list(value.items())
        elif isinstance(value, list):
            items = [(str(i), v) for i, v in enumerate(value)]
        else:
            if path in out:
                # e.g. {"a:b": 1, "a": {"b": 2}}: Dapr refuses the file too.
                raise ValueError(f"duplicate secret name {path!r} after flattening")
            out[path] = _text(value)
            return
        for key, child in items:
            visit(f"{path}{sep}{key}" if path else key, child)

    visit("", node)
    return out


def _text(value: Any) -> str:
    """A JSON scalar as the secret's string: JSON's spelling for booleans, numbers and null."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else json.dumps(value)
    return json.dumps(value)
