"""The import rules of DESIGN.md §2, checked on the source: each layer imports only downwards."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "pillion"

# package -> pillion packages it must never import
FORBIDDEN = {
    "components": {"blocks", "api", "runtime", "transport", "coordination", "cli", "manifests"},
    "blocks": {"api", "runtime", "transport", "cli", "coordination", "manifests"},
    "api": {"runtime", "cli", "coordination", "manifests"},
    "transport": {"blocks", "api", "runtime", "cli", "components", "coordination", "manifests"},
    "coordination": {"blocks", "api", "runtime", "cli", "components", "transport", "manifests"},
    "manifests": {"blocks", "api", "runtime", "cli", "components", "transport", "coordination"},
    "observability": {"blocks", "api", "runtime", "cli", "components", "coordination"},
    "resiliency": {"blocks", "api", "runtime", "cli", "components", "transport", "coordination"},
}
THIRD_PARTY_FORBIDDEN = {"blocks": {"grpc", "httptools", "aiohttp"}}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports(layer: str) -> None:
    bad: list[str] = []
    for path in (PKG / layer).rglob("*.py"):
        for mod in _imports(path):
            parts = mod.split(".")
            if parts[0] == "pillion" and len(parts) > 1 and parts[1] in FORBIDDEN[layer]:
                bad.append(f"{path.relative_to(PKG)} imports {mod}")
            if parts[0] in THIRD_PARTY_FORBIDDEN.get(layer, set()):
                bad.append(f"{path.relative_to(PKG)} imports {mod}")
    assert not bad, "\n".join(bad)
