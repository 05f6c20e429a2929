"""Resiliency policies (timeout, retry, circuit breaker) resolved per target, with one runner."""

from pillion.resiliency.breaker import BreakerSpec, CircuitBreaker, CircuitOpen, Counts, State
from pillion.resiliency.policy import BUILTIN_POLICIES, COMPONENT_TYPES, Resiliency
from pillion.resiliency.runner import Observer, Policy, Retry

__all__ = [
    "BUILTIN_POLICIES",
    "COMPONENT_TYPES",
    "BreakerSpec",
    "CircuitBreaker",
    "CircuitOpen",
    "Counts",
    "Observer",
    "Policy",
    "Resiliency",
    "Retry",
    "State",
]
