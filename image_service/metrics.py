"""The service's Prometheus series (contract section 11), served by `portal.server` at /metrics.

Counters and the latency histogram are this replica's own (Prometheus sums replicas); the
figures that belong to the whole deployment (operations in flight, backup storages, the
outbox) are read from the database at each scrape (`refresh_from`), so that every replica
reports the same values.

Label values come from closed sets only: an API name a caller made up is counted as "other",
and an outcome is "success" or one of the contract's error codes, so no request can grow the
number of series.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from image_service.protocol.errors import ErrorCode
from image_service.protocol.exposition import process_registry

OTHER = "other"
# The portal's own answers (contract section 11) add ZStack's codes for what it refuses before
# an API runs: a wrong password, a missing session, a bad request, an unavailable database.
PORTAL_OUTCOMES = frozenset({"ID.1000", "ID.1001", "SYS.1007", "SYS.1008", "SYS.1012"})
_OUTCOMES = frozenset({"success", *(code.value for code in ErrorCode), *PORTAL_OUTCOMES})
PORTAL_APIS = frozenset({"LogIn", "LogOut", "ValidateSession"})
# From a cached query to an image download of several minutes.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class BackupStorageFigures(Protocol):
    @property
    def uuid(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def total_capacity(self) -> int: ...
    @property
    def available_capacity(self) -> int: ...


class ServiceMetrics:
    def __init__(self) -> None:
        registry = self.registry = process_registry()
        self._apis: frozenset[str] = frozenset()
        self.api_calls = Counter(
            "image_api_calls",
            "API calls answered, by API and outcome (success, the contract's error code, or"
            " ZStack's code for a portal call refused before it ran)",
            ["api", "outcome"],
            registry=registry,
        )
        self.api_seconds = Histogram(
            "image_api_duration_seconds",
            "Seconds from receiving an API call to its final reply",
            ["api"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.downloaded_bytes = Counter(
            "image_downloaded_bytes",
            "Bytes of images downloaded to backup storages, counted when a download completes",
            registry=registry,
        )
        self.ops_in_flight = Gauge(
            "image_operations_in_flight",
            "Agent operations sent and not yet answered, by kind",
            ["kind"],
            registry=registry,
        )
        self.backup_storages = Gauge(
            "image_backup_storages",
            "Backup storages by status",
            ["status"],
            registry=registry,
        )
        self.total_capacity = Gauge(
            "image_backup_storage_total_capacity_bytes",
            "A backup storage's total capacity",
            ["uuid", "name"],
            registry=registry,
        )
        self.available_capacity = Gauge(
            "image_backup_storage_available_capacity_bytes",
            "A backup storage's available capacity",
            ["uuid", "name"],
            registry=registry,
        )
        self.outbox_depth = Gauge(
            "image_outbox_depth",
            "Replies, events and commands committed and not yet published",
            registry=registry,
        )
        self.database_up = Gauge(
            "image_database_up",
            "1 when the last scrape could read the database, else 0",
            registry=registry,
        )
        self.http_requests = Counter(
            "image_http_requests",
            "HTTP requests served, by route and status",
            ["route", "status"],
            registry=registry,
        )

    def know_apis(self, names: Iterable[str]) -> None:
        """The API names that get a label of their own; any other is counted as "other"."""
        self._apis = frozenset(names) | PORTAL_APIS

    def answered(self, api: str | None, outcome: str, seconds: float | None) -> None:
        label = api if api in self._apis else OTHER
        self.api_calls.labels(label, outcome if outcome in _OUTCOMES else OTHER).inc()
        if seconds is not None and seconds >= 0:
            self.api_seconds.labels(label).observe(seconds)

    def refresh(
        self,
        ops: dict[str, int],
        backup_storages: Iterable[BackupStorageFigures],
        outbox_depth: int,
    ) -> None:
        """The deployment's figures, as read from the database for this scrape."""
        self.ops_in_flight.clear()
        for kind, count in ops.items():
            self.ops_in_flight.labels(kind).set(count)
        self.backup_storages.clear()
        self.total_capacity.clear()
        self.available_capacity.clear()
        by_status: dict[str, int] = dict.fromkeys(("Connecting", "Connected", "Disconnected"), 0)
        for bs in backup_storages:
            by_status[bs.status] = by_status.get(bs.status, 0) + 1
            self.total_capacity.labels(bs.uuid, bs.name).set(bs.total_capacity)
            self.available_capacity.labels(bs.uuid, bs.name).set(bs.available_capacity)
        for status, count in by_status.items():
            self.backup_storages.labels(status).set(count)
        self.outbox_depth.set(outbox_depth)
        self.database_up.set(1)

    def unavailable(self) -> None:
        """The database could not be read for this scrape: no stale figures are served."""
        for gauge in (
            self.ops_in_flight,
            self.backup_storages,
            self.total_capacity,
            self.available_capacity,
        ):
            gauge.clear()
        self.outbox_depth.set(float("nan"))
        self.database_up.set(0)


def outcome_of(reply: dict[str, object]) -> str:
    """ "success", or the error code of a contract reply."""
    if reply.get("success"):
        return "success"
    error = reply.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    return str(code) if code in _OUTCOMES else OTHER


# The process's one set of series: every part of a replica counts into it.
METRICS = ServiceMetrics()
