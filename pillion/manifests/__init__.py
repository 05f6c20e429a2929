"""Typed Dapr YAML resources and their loader."""
