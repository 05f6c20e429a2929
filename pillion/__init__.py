"""pillion: a Dapr-compatible distributed application runtime."""

__version__ = "0.1.0"
# The Dapr runtime version pillion answers as, so SDK feature checks behave.
DAPR_RUNTIME_VERSION = "1.16.0"
