"""Dapr's gRPC API (`dapr.proto.runtime.v1.Dapr`) over the blocks, via the SDK's stubs."""
