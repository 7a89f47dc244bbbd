"""What the service's and the agent's /metrics share: a registry with the process's own
collectors (CPU, memory, file descriptors, garbage collection), and its text exposition."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)


def process_registry() -> CollectorRegistry:
    """A registry of its own (never the global one, which tests and libraries share) that
    also reports the process."""
    registry = CollectorRegistry(auto_describe=True)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The body of GET /metrics and its Content-Type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
