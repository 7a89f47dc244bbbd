"""The inventories of the contract (section 3, and sections 10 and 11 for the global
configuration and the portal's session), as models: the published JSON Schema of docs/schema/
is generated from them (`image_service.schema`), and tests validate the service's real replies
against them, so the schema cannot say one thing while the service sends another.

The service builds its inventories as plain dicts (`image_service.inventory`), on the hot path
of every query; these models describe them, they are not on that path.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Uuid = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
Date = Annotated[str, Field(description="ISO 8601, UTC: 2024-01-31T08:00:00.000000Z")]
Bytes = Annotated[int, Field(ge=0)]


class _Inventory(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class BackupStorageRefInventory(_Inventory):
    """Where an image is stored: one per backup storage that holds (or is getting) it."""

    imageUuid: Uuid
    backupStorageUuid: Uuid
    installPath: str
    status: Literal["Downloading", "Creating", "Ready", "Deleted"]
    createDate: Date
    lastOpDate: Date


class ImageInventory(_Inventory):
    uuid: Uuid
    name: str
    description: str | None
    state: Literal["Enabled", "Disabled"]
    status: Literal["Creating", "Downloading", "Ready", "Deleted"]
    size: Bytes | None = Field(description="bytes of the image file")
    actualSize: Bytes | None = Field(description="bytes the file occupies on disk")
    virtualSize: Bytes | None = Field(description="bytes of the disk a VM sees (qemu-img info)")
    url: str
    mediaType: Literal["RootVolumeTemplate", "DataVolumeTemplate", "ISO"]
    guestOsType: str | None
    platform: Literal["Linux", "Windows", "Paravirtualization", "Other"]
    system: bool
    format: Literal["qcow2", "raw", "iso"]
    md5Sum: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")] | None
    sha256Sum: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None
    type: Literal["zstack"]
    backupStorageRefs: list[BackupStorageRefInventory]
    createDate: Date
    lastOpDate: Date


class BackupStorageInventory(_Inventory):
    uuid: Uuid
    name: str
    description: str | None
    url: str = Field(description="the agent's root directory")
    hostname: str
    type: str
    state: Literal["Enabled", "Disabled"]
    status: Literal["Connecting", "Connected", "Disconnected"]
    totalCapacity: Bytes
    availableCapacity: Bytes
    createDate: Date
    lastOpDate: Date


class UserTagInventory(_Inventory):
    uuid: Uuid
    resourceType: Literal["ImageVO"]
    resourceUuid: Uuid
    tag: str
    type: Literal["User"]
    createDate: Date
    lastOpDate: Date


class GlobalConfigInventory(_Inventory):
    category: str
    name: str
    value: str
    defaultValue: str
    description: str | None


class SessionInventory(_Inventory):
    """The HTTP portal's login (section 11), as ZStack's SessionInventory."""

    uuid: Uuid
    accountUuid: Uuid
    userUuid: Uuid
    expiredDate: Date
    createDate: Date


INVENTORIES: tuple[type[_Inventory], ...] = (
    ImageInventory,
    BackupStorageRefInventory,
    BackupStorageInventory,
    UserTagInventory,
    GlobalConfigInventory,
    SessionInventory,
)
