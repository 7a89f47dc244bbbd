"""The settings of `image-service` (contract section 1 and PROTOCOL.md A.10)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from image_service.protocol.config import BusSettings, LogLevel


def _postgres_url(value: str) -> str:
    if not value.startswith(("postgresql://", "postgres://")):
        raise ValueError("must start with postgresql://")
    return value


Seconds = Annotated[float, Field(gt=0, le=7 * 24 * 3600)]


class ServiceSettings(BusSettings):
    database_url: Annotated[str, AfterValidator(_postgres_url)] = Field(
        "postgresql://postgres@127.0.0.1:5432/images",
        description="the PostgreSQL database (created when missing)",
    )
    resend_after: Seconds = Field(
        30.0, description="seconds before an unanswered agent command is sent again"
    )
    monitor_interval: Seconds = Field(
        1.0, description="seconds between heartbeat checks and lease sweeps"
    )
    missed_heartbeats: Annotated[int, Field(ge=1, le=100)] = Field(
        3, description="heartbeat intervals of silence after which a backup storage is Disconnected"
    )
    retention: Seconds = Field(
        7 * 24 * 3600.0, description="seconds that replies and finished ops are kept"
    )
    prefetch: Annotated[int, Field(ge=1, le=1000)] = Field(
        16, description="deliveries each consumer handles at once"
    )
    log_level: LogLevel = Field("INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL")
