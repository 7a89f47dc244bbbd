"""What the store's queries return: frozen dataclasses, one per row shape.

Statuses and states come back as the enums of `image_service.lifecycle`. Inventory queries are
the exception: they return the database's rows as read-only mappings (`InventoryRow`), which
`image_service.inventory` turns into the contract's inventories, because they are the hot path
of every query reply.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from image_service.lifecycle import (
    BackupStorageState,
    BackupStorageStatus,
    ImageState,
    ImageStatus,
    OpKind,
    RefStatus,
)

InventoryRow = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class InboxRow:
    message_id: str
    api: str
    reply_to: str | None
    correlation_id: str | None
    image_uuid: str | None
    reply: Any


@dataclass(frozen=True, slots=True)
class ReplyTarget:
    reply_to: str | None
    correlation_id: str | None


@dataclass(frozen=True, slots=True)
class Finished:
    """A message whose final reply was just stored: its caller, API and age in seconds."""

    caller: ReplyTarget
    api: str
    elapsed: float


@dataclass(frozen=True, slots=True)
class InboxResult:
    """A message as a poll of the HTTP portal sees it; `reply` is None while it runs."""

    api: str
    reply: Any
    received_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    exchange: str
    routing_key: str
    body: Any
    correlation_id: str | None
    message_id: str | None
    persistent: bool


@dataclass(frozen=True, slots=True)
class BackupStorageRow:
    uuid: str
    name: str
    url: str
    hostname: str
    state: BackupStorageState
    status: BackupStorageStatus
    available_capacity: int


@dataclass(frozen=True, slots=True)
class ImageRow:
    uuid: str
    name: str
    state: ImageState
    status: ImageStatus
    media_type: str
    platform: str
    system: bool
    format: str


@dataclass(frozen=True, slots=True)
class RefRow:
    """A reference of one image, with what its backup storage looks like now."""

    backup_storage_uuid: str
    install_path: str
    status: RefStatus
    bs_status: BackupStorageStatus
    hostname: str
    # The op working on this Deleted reference (an expunge or a recovery), if any.
    ref_op: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class StoredFacts:
    """What an image's stored file is, as recorded when it turned Ready."""

    size: int | None
    actual_size: int | None
    virtual_size: int | None
    md5_sum: str | None
    sha256_sum: str | None


@dataclass(frozen=True, slots=True)
class Origin:
    """The root image of a volume, as a template made from the volume inherits it."""

    status: ImageStatus
    platform: str
    guest_os_type: str | None


@dataclass(frozen=True, slots=True)
class HeldImage:
    """A reference seen from its backup storage."""

    image_uuid: str
    install_path: str


@dataclass(frozen=True, slots=True)
class OpRow:
    op_id: uuid.UUID
    kind: OpKind
    message_id: str | None
    image_uuid: str
    backup_storage_uuid: str
    command: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Stranded:
    """A Pending op whose backup storage went away; `gone`: it was deleted."""

    op: OpRow
    gone: bool


@dataclass(frozen=True, slots=True)
class Cause:
    """Why an op failed on one backup storage (an entry of a reply's `causes`)."""

    backup_storage_uuid: str
    code: str
    details: str | None

    def to_reply(self) -> dict[str, Any]:
        return {
            "backupStorageUuid": self.backup_storage_uuid,
            "code": self.code,
            "details": self.details,
        }


@dataclass(frozen=True, slots=True)
class Succeeded:
    backup_storage_uuid: str
    result: dict[str, Any]


@dataclass(frozen=True, slots=True)
class TemplateSource:
    """A volume or snapshot of the read model, as a template is made from it."""

    uuid: str
    type: str | None
    install_path: str | None
    format: str | None
    root_image_uuid: str | None


@dataclass(frozen=True, slots=True)
class Owner:
    """A backup storage's status and the broker user it belongs to (None: not bound yet)."""

    status: BackupStorageStatus
    agent_user: str | None
