"""The `pillion` command line."""
