"""The settings of `backup-agent` (contract section 1 and PROTOCOL.md A.10).

Every flag's environment variable is `IMAGE_` plus its name (`--root`: `IMAGE_ROOT`), as for the
service; the connection settings are the service's own (`IMAGE_AMQP_URL`, `IMAGE_NAMESPACE`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated

from pydantic import Field

from backup_agent.fetchers import FetchSettings
from image_service.protocol.agent import Uuid32
from image_service.protocol.config import BusSettings, LogLevel

Seconds = Annotated[float, Field(gt=0, le=3600)]


class AgentSettings(BusSettings):
    root: Path = Field(description="where images are stored (created when missing)")
    name: Annotated[str, Field(min_length=1, max_length=255)] = Field(
        description="the backup storage's name"
    )
    backup_storage_uuid: Uuid32 | None = Field(
        None,
        description="this backup storage's uuid, as its broker user was enrolled for"
        " (deploy/rabbitmq/setup-users.sh add-agent); default: a new one on first start",
    )
    heartbeat_interval: Seconds = Field(10.0, description="seconds between heartbeats")
    hostname: Annotated[str, Field(min_length=1, max_length=255)] = Field(
        default_factory=socket.getfqdn,
        description="how volume services reach this host (default: this host's FQDN)",
    )
    capacity: Annotated[int, Field(ge=0)] | None = Field(
        None, description="bytes this backup storage may hold (default: the disk)"
    )
    max_downloads: Annotated[int, Field(ge=1, le=256)] = Field(
        4, description="downloads and template creations at once"
    )
    volume_root: list[Path] = Field(
        default_factory=list,
        description="a directory whose volumes (file:// sources) may become templates; repeatable",
    )
    ssh_key: str | None = Field(None, description="private key used for sftp sources")
    known_hosts: str = Field(
        "~/.ssh/known_hosts", description="known_hosts file of the sftp hosts trusted"
    )
    trust_on_first_use: bool = Field(
        False,
        description="accept the host key of an sftp host not in --known-hosts yet, and record it",
    )
    connect_timeout: Seconds = Field(15.0, description="seconds to connect to an image source")
    stall_timeout: Seconds = Field(
        30.0, description="a source that sends nothing for this long fails the download"
    )
    service_user: Annotated[str, Field(min_length=1, max_length=255)] | None = Field(
        None,
        description="the only broker user whose commands are obeyed (default: the user of"
        " --amqp-url, so that one shared development account keeps working)",
    )
    log_level: LogLevel = Field("INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL")

    @property
    def volume_roots(self) -> tuple[Path, ...]:
        return tuple(Path(os.path.realpath(p)) for p in self.volume_root)

    @property
    def fetch(self) -> FetchSettings:
        return FetchSettings(
            connect_timeout=self.connect_timeout,
            stall_timeout=self.stall_timeout,
            ssh_key=self.ssh_key,
            known_hosts=self.known_hosts,
            trust_on_first_use=self.trust_on_first_use,
        )
