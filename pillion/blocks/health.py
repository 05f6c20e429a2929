"""Sidecar readiness as `healthz` and `healthz/outbound` report it."""

from __future__ import annotations

from dataclasses import dataclass, field

from pillion.errors import Code, GrpcCode, PillionError


@dataclass
class Health:
    """Outbound-ready: components and API servers up. Ready: the app was found too."""

    app_id: str
    outbound_ready: bool = False
    ready: bool = False
    waiting_for: list[str] = field(default_factory=lambda: ["components", "app"])

    def check(self, appid: str | None = None) -> None:
        if not self.ready:
            raise PillionError(
                Code.HEALTH_NOT_READY,
                f"dapr is not ready: [{' '.join(self.waiting_for)}]",
                500,
                GrpcCode.INTERNAL,
            )
        if appid is not None and appid != self.app_id:
            raise PillionError(
                Code.HEALTH_APPID_NOT_MATCH,
                "dapr app-id does not match",
                500,
                GrpcCode.INTERNAL,
            )

    def check_outbound(self) -> None:
        if not self.outbound_ready:
            raise PillionError(
                Code.OUTBOUND_HEALTH_NOT_READY,
                "dapr outbound is not ready",
                500,
                GrpcCode.INTERNAL,
            )
