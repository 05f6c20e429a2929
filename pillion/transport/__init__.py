"""The fast HTTP/1.1 data plane: server, pooled client, sidecar-to-sidecar link."""
