"""Builds the sidecar from options and manifests and runs its lifecycle."""
