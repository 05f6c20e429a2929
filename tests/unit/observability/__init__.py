"""Tests of pillion.observability."""
