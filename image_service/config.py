"""The settings of `image-service` (contract section 1 and PROTOCOL.md A.10)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field, SecretStr

from image_service.protocol.config import BusSettings, HostPort, LogLevel


def _postgres_url(value: str) -> str:
    if not value.startswith(("postgresql://", "postgres://")):
        raise ValueError("must start with postgresql://")
    return value


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None
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
        64, description="deliveries each consumer handles at once"
    )
    query_timeout: Seconds = Field(
        10.0, description="seconds a query may run before it is cancelled (TIMEOUT)"
    )
    agent_user_pattern: Annotated[str, AfterValidator(_regex)] = Field(
        ".*",
        description="broker users allowed to register a new backup storage (a regular"
        " expression the whole user name must match)",
    )
    http_listen: HostPort | None = Field(
        None,
        description="HOST:PORT of ZStack's API portal, /metrics, /healthz and /readyz"
        " (default: no HTTP)",
    )
    # At most 50 s: ZStack clients give up on a request after 60.
    http_wait: Annotated[float, Field(ge=0, le=50)] = Field(
        5.0,
        description="seconds a portal call may take and still be answered Done at once (longer"
        " ones answer Processing, polled at /zstack/api/result/UUID)",
    )
    session_timeout: Seconds = Field(
        7200.0, description="seconds a portal session lives without being used"
    )
    admin_password: SecretStr = Field(
        SecretStr("password"),
        description="the password of account admin, created at the first start (later:"
        " image-service set-password admin)",
        # Never a flag: a command line is visible to every user of the host (ps).
        json_schema_extra={"env_only": True},
    )
    log_level: LogLevel = Field("INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL")

    @property
    def agent_users(self) -> re.Pattern[str]:
        return re.compile(self.agent_user_pattern)
