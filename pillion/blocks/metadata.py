"""The metadata block: what `GET /v1.0/metadata` reports, and the writable `extended` map."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pillion import DAPR_RUNTIME_VERSION


@dataclass(frozen=True)
class ComponentView:
    name: str
    type: str
    version: str
    capabilities: tuple[str, ...] = ()


@dataclass(frozen=True)
class AppConnection:
    port: int
    protocol: str
    channel_address: str
    max_concurrency: int = -1
    health_check_path: str = ""
    health_probe_interval: float = 0.0
    health_probe_timeout: float = 0.0
    health_threshold: int = 0


@dataclass
class MetadataBlock:
    """Live metadata; `components` is a callable so hot reload can change the answer."""

    app_id: str
    components: Callable[[], list[ComponentView]]
    app: AppConnection | None = None
    enabled_features: tuple[str, ...] = ()
    extended: dict[str, str] = field(default_factory=dict)
    # The app's subscriptions as the metadata API lists them (set once pub/sub starts).
    subscriptions: Callable[[], list[dict[str, Any]]] = lambda: []

    def set(self, key: str, value: str) -> None:
        self.extended[key] = value

    def snapshot(self) -> dict[str, Any]:
        """Dapr's JSON shape; empty members are omitted as Go's omitempty does."""
        out: dict[str, Any] = {"id": self.app_id, "runtimeVersion": DAPR_RUNTIME_VERSION}
        if self.enabled_features:
            out["enabledFeatures"] = list(self.enabled_features)
        comps = self.components()
        if comps:
            out["components"] = [
                {
                    "name": c.name,
                    "type": c.type,
                    "version": c.version,
                    **({"capabilities": list(c.capabilities)} if c.capabilities else {}),
                }
                for c in comps
            ]
        out["extended"] = {**self.extended, "daprRuntimeVersion": DAPR_RUNTIME_VERSION}
        subs = self.subscriptions()
        if subs:
            out["subscriptions"] = subs
        if self.app is not None:
            a = self.app
            props: dict[str, Any] = {"protocol": a.protocol, "channelAddress": a.channel_address}
            if a.port:
                props["port"] = a.port
            if a.max_concurrency > 0:
                props["maxConcurrency"] = a.max_concurrency
            if a.health_check_path:
                props["health"] = {
                    "healthCheckPath": a.health_check_path,
                    "healthProbeInterval": _go_duration(a.health_probe_interval),
                    "healthProbeTimeout": _go_duration(a.health_probe_timeout),
                    "healthThreshold": a.health_threshold,
                }
            out["appConnectionProperties"] = props
        out["actorRuntime"] = {"runtimeStatus": "DISABLED", "placement": "placement: disconnected"}
        return out


def _go_duration(seconds: float) -> str:
    """Go's time.Duration.String(): 1m30s, 500ms, 0s."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        ms = seconds * 1000
        return f"{ms:g}ms" if ms >= 1 else f"{seconds * 1e6:g}µs"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    out = f"{s:g}s"
    if m or h:
        out = f"{int(m)}m{out}"
    if h:
        out = f"{int(h)}h{out}"
    return out
