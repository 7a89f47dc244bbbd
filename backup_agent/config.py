"""The settings of `backup-agent` (contract section 1 and PROTOCOL.md A.10).

Every flag's environment variable is `IMAGE_` plus its name (`--root`: `IMAGE_ROOT`), as for the
service; the connection settings are the service's own (`IMAGE_AMQP_URL`, `IMAGE_NAMESPACE`).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field

from backup_agent.fetchers import FetchSettings
from backup_agent.netpolicy import NetworkPolicy, parse_networks
from backup_agent.transfer import Limits
from image_service.protocol.agent import Uuid32
from image_service.protocol.config import BusSettings, HostPort, LogLevel

Seconds = Annotated[float, Field(gt=0, le=3600)]
ByteCount = Annotated[int, Field(ge=1, lt=2**63)]


def _networks(value: str) -> str:
    parse_networks(value)  # ValueError names the entry
    return value


Networks = Annotated[str, AfterValidator(_networks)]


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
    allow_networks: Networks = Field(
        "",
        description="CIDR[,CIDR...] image sources may be fetched from, overriding the default"
        " denials (loopback, link-local, multicast, unspecified, reserved); the longest"
        " matching prefix of the two lists decides, a denial wins a tie",
    )
    deny_networks: Networks = Field(
        "", description="CIDR[,CIDR...] image sources are never fetched from"
    )
    max_image_size: ByteCount = Field(
        2 << 40, description="bytes an image file may have (CAPACITY_EXCEEDED beyond)"
    )
    max_virtual_size: ByteCount = Field(
        16 << 40, description="bytes an image's virtual disk may have (UNSAFE_IMAGE beyond)"
    )
    download_deadline: Annotated[float, Field(gt=0, le=30 * 86400)] = Field(
        21600.0, description="seconds a download may take, retries included"
    )
    min_throughput: Annotated[int, Field(ge=0, lt=2**40)] = Field(
        65536,
        description="bytes/s a source must sustain over --throughput-window; slower fails, and"
        " gives its download slot to a waiting download after a second",
    )
    throughput_window: Seconds = Field(
        60.0, description="seconds over which --min-throughput is averaged"
    )
    download_retries: Annotated[int, Field(ge=0, le=100)] = Field(
        4, description="further tries after a transient failure (resumed with Range if possible)"
    )
    retry_backoff: Annotated[float, Field(gt=0, le=600)] = Field(
        1.0, description="seconds of the first backoff; doubled each try, with jitter"
    )
    service_user: Annotated[str, Field(min_length=1, max_length=255)] | None = Field(
        None,
        description="the only broker user whose commands are obeyed (default: the user of"
        " --amqp-url, so that one shared development account keeps working)",
    )
    http_listen: HostPort | None = Field(
        None, description="HOST:PORT of this agent's /metrics and /healthz (default: no HTTP)"
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
            policy=NetworkPolicy.of(self.allow_networks, self.deny_networks),
        )

    @property
    def limits(self) -> Limits:
        return Limits(
            max_image_size=self.max_image_size,
            max_virtual_size=self.max_virtual_size,
            deadline=self.download_deadline,
            min_throughput=self.min_throughput,
            throughput_window=self.throughput_window,
            retries=self.download_retries,
            backoff=self.retry_backoff,
        )
