"""Component plug-ins: one contract per kind, one module per backend."""
