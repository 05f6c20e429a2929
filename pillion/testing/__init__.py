"""Helpers to start sidecars and apps in tests."""
