"""Dapr's HTTP API over the transport's HTTP/1.1 server."""
