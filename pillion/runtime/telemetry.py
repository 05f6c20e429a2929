"""Builds the sidecar's tracer, metrics and resiliency policies from its options and manifests."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pillion.manifests.model import Configuration, ManifestError, Resources
from pillion.observability.dapr_metrics import DaprMetrics
from pillion.observability.exporters import exporters_from_config
from pillion.observability.tracing import Tracer
from pillion.resiliency import Policy, Resiliency

log = logging.getLogger("pillion.runtime.telemetry")


@dataclass
class Telemetry:
    """What rides every call: None means that feature is off and costs nothing."""

    tracer: Tracer | None
    metrics: DaprMetrics | None
    resiliency: Resiliency


class _ResiliencyMetrics:
    """Resiliency's observer hooks as Dapr's dapr_resiliency_* metrics (labels as daprd's:
    `name` is the Resiliency document's, `status` a breaker's state or "")."""

    def __init__(self, metrics: DaprMetrics) -> None:
        self.metrics = metrics

    @staticmethod
    def _status(policy: Policy, kind: str) -> str:
        if kind == "circuitbreaker" and policy.breaker is not None:
            return str(policy.breaker.state)
        return ""

    def activation(self, policy: Policy, kind: str) -> None:
        self.metrics.resiliency_activation(
            policy.resiliency, kind, policy.direction, policy.target, self._status(policy, kind)
        )

    def executed(self, policy: Policy, kind: str) -> None:
        self.metrics.resiliency_executed(
            policy.resiliency, kind, policy.direction, policy.target, self._status(policy, kind)
        )

    def breaker_state(self, policy: Policy, state: str) -> None:
        self.metrics.resiliency_cb_state(policy.resiliency, policy.direction, policy.target, state)


def build_telemetry(
    *,
    app_id: str,
    namespace: str,
    config: Configuration | None,
    resources: Resources,
    enable_metrics: bool,
) -> Telemetry:
    """Raises ManifestError naming the file and field of a bad tracing, metrics or resiliency
    spec."""
    spec: Mapping[str, Any] = config.spec if config is not None else {}
    source = config.source if config is not None else ""
    tracer: Tracer | None = None
    tracing = spec.get("tracing")
    rate = config.tracing_sampling_rate if config is not None else 0.0
    if isinstance(tracing, Mapping) and rate > 0:
        try:
            exporters = exporters_from_config(tracing)
        except ValueError as exc:
            raise ManifestError(source, None, None, str(exc)) from exc
        # No exporter (`pillion init`'s config): contexts propagate, no span is built.
        tracer = Tracer(app_id or "pillion", rate, exporters, record=bool(exporters))
    metrics: DaprMetrics | None = None
    if enable_metrics and (config is None or config.metrics_enabled):
        metrics_spec = spec.get("metrics", spec.get("metric"))
        try:
            metrics = DaprMetrics.from_config(
                app_id, namespace, metrics_spec if isinstance(metrics_spec, Mapping) else None
            )
        except ValueError as exc:
            raise ManifestError(source, None, None, str(exc)) from exc
    observer = _ResiliencyMetrics(metrics) if metrics is not None else None
    resiliency = Resiliency.from_documents(
        resources.of_kind("Resiliency"), app_id=app_id, observer=observer
    )
    if metrics is not None:
        for name in resiliency.names:
            metrics.resiliency_loaded(name, namespace)
    if resiliency.names:
        log.info("Loaded resiliency policies: %s", ", ".join(resiliency.names))
    return Telemetry(tracer, metrics, resiliency)
