"""Pydantic models of the contract's API parameters and envelope (the validation boundary).

Every model forbids unknown fields and is strict about types, so a mistyped or unknown
parameter is an INVALID_ARGUMENT that names the offending field, never a silent coercion.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from image_service.protocol.agent import check_hex32, check_hex64

# Characters that would let a name escape the directory it is stored in, or confuse a shell.
NAME_FORBIDDEN_RE = re.compile(r"[/\\\x00-\x1f\x7f]")


def _check_name(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    if NAME_FORBIDDEN_RE.search(value) or value in (".", ".."):
        raise ValueError("must not contain path separators or control characters")
    return value


def _check_text(value: str) -> str:
    """Free text may hold any character PostgreSQL can store: not NUL, not a lone surrogate
    (neither can be a `text` value; either would fail the statement, not the request)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\u0000)")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


def _check_md5(value: str) -> str:
    try:
        return check_hex32(value.lower())
    except ValueError:
        raise ValueError("must be 32 hex characters") from None


def _check_sha256(value: str) -> str:
    try:
        return check_hex64(value.lower())
    except ValueError:
        raise ValueError("must be 64 hex characters") from None


def _check_url(value: str) -> str:
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^\s/]+", value):
        raise ValueError("must be a url: scheme://host/path")
    if any(ch in value for ch in "\x00\r\n\t "):
        raise ValueError("must not contain whitespace or control characters")
    return value


Uuid = Annotated[str, Field(min_length=32, max_length=32), AfterValidator(check_hex32)]
Name = Annotated[str, Field(min_length=1, max_length=255), AfterValidator(_check_name)]
Description = Annotated[str, Field(max_length=2048), AfterValidator(_check_text)]
GuestOsType = Annotated[str, Field(max_length=255), AfterValidator(_check_text)]
Text = Annotated[str, AfterValidator(_check_text)]
Md5 = Annotated[str, Field(min_length=32, max_length=32), AfterValidator(_check_md5)]
Sha256 = Annotated[str, Field(min_length=64, max_length=64), AfterValidator(_check_sha256)]
ImageUrl = Annotated[str, Field(min_length=8, max_length=2048), AfterValidator(_check_url)]
UuidList = Annotated[list[Uuid], Field(min_length=1, max_length=100)]


class MediaType(StrEnum):
    RootVolumeTemplate = "RootVolumeTemplate"
    DataVolumeTemplate = "DataVolumeTemplate"
    ISO = "ISO"


class Platform(StrEnum):
    Linux = "Linux"
    Windows = "Windows"
    Paravirtualization = "Paravirtualization"
    Other = "Other"


class ImageFormat(StrEnum):
    qcow2 = "qcow2"
    raw = "raw"
    iso = "iso"


class StateEvent(StrEnum):
    enable = "enable"
    disable = "disable"


class DeleteMode(StrEnum):
    Permissive = "Permissive"
    Enforcing = "Enforcing"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class AddImage(Params):
    name: Name
    url: ImageUrl
    format: ImageFormat | None = None
    backupStorageUuids: UuidList
    mediaType: MediaType = MediaType.RootVolumeTemplate
    platform: Platform = Platform.Linux
    system: bool = False
    guestOsType: GuestOsType | None = None
    description: Description | None = None
    resourceUuid: Uuid | None = None
    type: Literal["zstack"] = "zstack"
    md5Sum: Md5 | None = None
    sha256Sum: Sha256 | None = None

    @model_validator(mode="after")
    def _media_and_format(self) -> AddImage:
        if self.mediaType is MediaType.ISO:
            if self.format not in (None, ImageFormat.iso):
                raise ValueError("format: an ISO image has format iso")
            if self.system:
                raise ValueError("system: an ISO cannot be a system image")
        else:
            if self.format is None:
                raise ValueError("format: required (qcow2 or raw)")
            if self.format is ImageFormat.iso:
                raise ValueError("format: iso requires mediaType ISO")
        if len(set(self.backupStorageUuids)) != len(self.backupStorageUuids):
            raise ValueError("backupStorageUuids: duplicate uuid")
        return self

    @property
    def effective_format(self) -> ImageFormat:
        return self.format or ImageFormat.iso


class DeleteImage(Params):
    uuid: Uuid
    backupStorageUuids: UuidList | None = None
    deleteMode: DeleteMode = DeleteMode.Permissive


class ChangeImageState(Params):
    uuid: Uuid
    stateEvent: StateEvent


class UpdateImage(Params):
    uuid: Uuid
    name: Name | None = None
    description: Description | None = None
    guestOsType: GuestOsType | None = None
    platform: Platform | None = None
    mediaType: MediaType | None = None
    system: bool | None = None


class CreateTemplateParams(Params):
    """What the three Create*Template APIs share."""

    name: Name
    backupStorageUuids: UuidList | None = None
    description: Description | None = None
    resourceUuid: Uuid | None = None

    @model_validator(mode="after")
    def _distinct_storages(self) -> CreateTemplateParams:
        uuids = self.backupStorageUuids or []
        if len(set(uuids)) != len(uuids):
            raise ValueError("backupStorageUuids: duplicate uuid")
        return self


class CreateRootTemplateParams(CreateTemplateParams):
    # Not given: inherited from the root image of the volume (contract section 10), or
    # Linux and none when it has none.
    platform: Platform | None = None
    guestOsType: GuestOsType | None = None
    system: bool = False


class CreateRootVolumeTemplateFromRootVolume(CreateRootTemplateParams):
    rootVolumeUuid: Uuid


class CreateRootVolumeTemplateFromVolumeSnapshot(CreateRootTemplateParams):
    snapshotUuid: Uuid


class CreateDataVolumeTemplateFromVolume(CreateTemplateParams):
    """The seed gives data templates no platform, guestOsType or system: they keep defaults."""

    volumeUuid: Uuid


class GetImageSource(Params):
    uuid: Uuid
    forSystemVm: bool = False


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    name: Annotated[str, Field(min_length=1, max_length=128)]
    op: Annotated[str, Field(min_length=1, max_length=8)]
    value: Any = None


# Contract section 8: bounds on every query.
MAX_CONDITIONS = 64
MAX_INT32 = 2**31 - 1


class Query(Params):
    conditions: Annotated[list[Condition], Field(max_length=MAX_CONDITIONS)] = []
    limit: Annotated[int, Field(ge=0, le=MAX_INT32)] = 1000
    start: Annotated[int, Field(ge=0, le=MAX_INT32)] = 0
    count: bool = False
    replyWithCount: bool = False
    sortBy: Annotated[str, Field(max_length=128)] | None = None
    sortDirection: Literal["asc", "desc"] = "asc"
    fields: Annotated[list[Annotated[str, Field(max_length=128)]], Field(max_length=100)] | None = (
        None
    )


class ChangeBackupStorageState(Params):
    uuid: Uuid
    stateEvent: StateEvent


class DeleteBackupStorage(Params):
    uuid: Uuid


class CreateUserTag(Params):
    resourceType: Literal["ImageVO"]
    resourceUuid: Uuid
    tag: Annotated[Text, Field(min_length=1, max_length=2048)]


class DeleteTag(Params):
    uuid: Uuid


class UpdateGlobalConfig(Params):
    category: Annotated[Text, Field(min_length=1, max_length=64)]
    name: Annotated[Text, Field(min_length=1, max_length=128)]
    # Text, as ZStack's; a number is taken as its decimal text (`"value": 3600`).
    value: Annotated[Text, Field(max_length=1024)] | Annotated[int, Field(ge=-(2**63), lt=2**63)]

    @property
    def text(self) -> str:
        return str(self.value)


class ExpungeImage(Params):
    uuid: Uuid
    backupStorageUuids: UuidList | None = None


class RecoverImage(Params):
    uuid: Uuid
    backupStorageUuids: UuidList | None = None


class SyncImageSize(Params):
    uuid: Uuid


class Envelope(BaseModel):
    """The message body: `{"api": NAME, "params": {...}}`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    api: Annotated[str, Field(min_length=1, max_length=128)]
    params: dict[str, Any] = {}
