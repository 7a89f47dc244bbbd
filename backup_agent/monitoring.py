"""`backup-agent --http-listen HOST:PORT`: the agent's /metrics and /healthz (contract
section 11). The agent answers nothing else over HTTP: its commands come over the broker only.

Labels come from closed sets (the command kinds, the contract's error codes), so no command can
grow the number of series.
"""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import Counter, Gauge

from image_service.protocol.errors import ErrorCode
from image_service.protocol.exposition import exposition, process_registry

log = logging.getLogger(__name__)

KINDS = ("download", "create", "delete", "inspect")
_CODES = frozenset(code.value for code in ErrorCode)


class AgentMetrics:
    def __init__(self) -> None:
        registry = self.registry = process_registry()
        self.in_flight = Gauge(
            "backup_agent_transfers_in_flight",
            "Commands running now, by kind (download, create, delete, inspect)",
            ["kind"],
            registry=registry,
        )
        self.stored_bytes = Counter(
            "backup_agent_stored_bytes",
            "Bytes of images stored by downloads and template creations that succeeded",
            ["kind"],
            registry=registry,
        )
        self.completed = Counter(
            "backup_agent_commands",
            "Commands finished, by kind and outcome (success or the contract's error code)",
            ["kind", "outcome"],
            registry=registry,
        )
        self.failures = Counter(
            "backup_agent_failures",
            "Commands that failed, by the contract's error code",
            ["code"],
            registry=registry,
        )
        self.total_capacity = Gauge(
            "backup_agent_total_capacity_bytes",
            "This backup storage's total capacity",
            registry=registry,
        )
        self.available_capacity = Gauge(
            "backup_agent_available_capacity_bytes",
            "This backup storage's available capacity",
            registry=registry,
        )
        for kind in KINDS:
            self.in_flight.labels(kind)
            self.stored_bytes.labels(kind)

    def started(self, kind: str) -> None:
        self.in_flight.labels(_kind(kind)).inc()

    def finished(self, kind: str, code: str | None, stored: int | None) -> None:
        """A command ended: `code` None for success, "cancelled" when the service cancelled
        it (not a failure), else the contract's error code; `stored` the bytes it stored."""
        label = _kind(kind)
        self.in_flight.labels(label).dec()
        if code is None:
            outcome = "success"
        elif code == "cancelled":
            outcome = code
        else:
            outcome = code if code in _CODES else "other"
            self.failures.labels(outcome).inc()
        self.completed.labels(label, outcome).inc()
        if code is None and stored and label in ("download", "create"):
            self.stored_bytes.labels(label).inc(stored)

    def capacity(self, total: int, available: int) -> None:
        self.total_capacity.set(total)
        self.available_capacity.set(available)


def _kind(kind: str) -> str:
    return kind if kind in KINDS else "other"


class MetricsServer:
    """The agent's HTTP listener."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        app = web.Application(client_max_size=4096)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, shutdown_timeout=2.0).start()
        log.info("metrics and health on http://%s:%d/", host, port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = exposition(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})
