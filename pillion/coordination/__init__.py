"""Cross-sidecar coordination: membership and the name registry."""
