"""The building-block core: transport-agnostic behaviour of every Dapr API."""
