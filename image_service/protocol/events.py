"""Bodies of the events on `NS.events` (contract section 7), each with its routing key.

The service publishes image and backup storage events (through its outbox); agents publish
download progress; the volume service publishes volume and snapshot facts, which the service
consumes into its read model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from image_service.protocol.agent import Uuid32

Inventory = dict[str, Any]


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    uuid: Uuid32

    @property
    def routing_key(self) -> str:
        raise NotImplementedError


class ImageStatusChanged(_Event):
    oldStatus: str | None
    newStatus: str
    inventory: Inventory | None

    @property
    def routing_key(self) -> str:
        return f"image.status.{self.uuid}"


class ImageStateChanged(_Event):
    oldState: str
    newState: str
    inventory: Inventory | None

    @property
    def routing_key(self) -> str:
        return f"image.state.{self.uuid}"


class ImageDeleted(_Event):
    inventory: Inventory | None

    @property
    def routing_key(self) -> str:
        return f"image.deleted.{self.uuid}"


class ImageProgress(_Event):
    """Published by the agent while it receives an image (best effort: a failed publish is not
    retried). Any agent's user may publish `image.progress.*`: it tells, it proves nothing."""

    backupStorageUuid: Uuid32
    downloadedBytes: Annotated[int, Field(ge=0)]
    totalBytes: Annotated[int, Field(ge=0)] | None

    @property
    def routing_key(self) -> str:
        return f"image.progress.{self.uuid}"


class BackupStorageStatusChanged(_Event):
    oldStatus: str | None
    newStatus: str
    inventory: Inventory | None

    @property
    def routing_key(self) -> str:
        return f"backupStorage.status.{self.uuid}"


Event = (
    ImageStatusChanged
    | ImageStateChanged
    | ImageDeleted
    | ImageProgress
    | BackupStorageStatusChanged
)

# --- consumed: the volume service's facts ---------------------------------------------------

OptionalUuid = Uuid32 | None
FilePath = Annotated[str, Field(max_length=4096)]
VolumeFormat = Annotated[str, Field(max_length=32)]
Size = Annotated[int, Field(ge=0, lt=2**63)]


class VolumeEvent(BaseModel):
    """A volume fact (`volume.created|updated|deleted.UUID`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    uuid: Uuid32
    name: Annotated[str, Field(max_length=255)] | None = None
    type: Literal["Root", "Data"] | None = None
    vmInstanceUuid: OptionalUuid = None
    rootImageUuid: OptionalUuid = None
    primaryStorageUuid: OptionalUuid = None
    installPath: FilePath | None = None
    format: VolumeFormat | None = None
    size: Size | None = None


class SnapshotEvent(BaseModel):
    """A snapshot fact (`volumeSnapshot.created|deleted.UUID`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    uuid: Uuid32
    volumeUuid: OptionalUuid = None
    installPath: FilePath | None = None
    format: VolumeFormat | None = None
    size: Size | None = None
