"""Tracing (W3C trace context, OTLP/Zipkin export) and metrics for the sidecar."""
