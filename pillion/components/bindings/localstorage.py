"""The `bindings.localstorage` output binding: files under `rootPath`."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pillion.components.bindings.api import BindingError, BindingResponse, OutputBinding
from pillion.components.metadata import ComponentConfigError, ComponentInfo, decode


@dataclass(frozen=True)
class LocalStorageMetadata:
    """Dapr's `bindings.localstorage` metadata."""

    root_path: str = field(default="", metadata={"name": "rootPath"})


class LocalStorageBinding(OutputBinding):
    """create/get/list/delete of files under rootPath; names that escape it are rejected."""

    def __init__(self) -> None:
        self.root = Path()

    async def init(self, info: ComponentInfo) -> None:
        md = decode(LocalStorageMetadata, info.properties)
        if not md.root_path:
            raise ComponentConfigError("rootPath", "is required")
        self.root = Path(md.root_path).resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ComponentConfigError("rootPath", f"cannot create {self.root}: {exc}") from exc

    def operations(self) -> list[str]:
        return ["create", "get", "list", "delete"]

    def _path(self, name: str) -> Path:
        if not name:
            raise BindingError("required metadata 'fileName' is missing")
        p = (self.root / name).resolve()
        if p == self.root or self.root not in p.parents:
            raise BindingError(f"fileName {name!r} is outside of rootPath")
        return p

    async def invoke(
        self, operation: str, data: bytes, metadata: Mapping[str, str]
    ) -> BindingResponse:
        name = {k.lower(): v for k, v in metadata.items()}.get("filename", "")
        try:
            if operation == "create":
                name = name or str(uuid.uuid4())
                path = self._path(name)
                await asyncio.to_thread(_write, path, data)
                return BindingResponse(json.dumps({"fileName": name}).encode())
            if operation == "get":
                path = self._path(name)
                if not path.is_file():
                    raise BindingError(f"file not found: {name}")
                return BindingResponse(await asyncio.to_thread(path.read_bytes))
            if operation == "delete":
                path = self._path(name)
                if not path.is_file():
                    raise BindingError(f"file not found: {name}")
                await asyncio.to_thread(path.unlink)
                return BindingResponse()
            if operation == "list":
                files = await asyncio.to_thread(_walk, self.root)
                return BindingResponse(json.dumps(files).encode())
        except OSError as exc:
            raise BindingError(f"{operation} {name}: {exc.strerror or exc}") from exc
        raise BindingError(f"unsupported operation {operation}")


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _walk(root: Path) -> list[str]:
    """Every file under root as its full path, sorted (Dapr's list answer)."""
    out: list[str] = []
    for d, _, files in os.walk(root):
        out.extend(os.path.join(d, f) for f in files)
    return sorted(out)
