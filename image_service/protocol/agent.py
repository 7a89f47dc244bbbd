"""The agent's messages: one model per command, its result, and its heartbeat (PROTOCOL.md
A.2-A.4). The service builds commands with these models and validates results and heartbeats
with them; the agent validates commands with them and builds its results with them, so both
sides read one definition."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from image_service.protocol.errors import ErrorCode

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def check_hex32(value: str) -> str:
    """A resource uuid or an md5: 32 lowercase hex characters (the API parameters use it too)."""
    if not _HEX32.fullmatch(value):
        raise ValueError("must be 32 lowercase hex characters")
    return value


def check_hex64(value: str) -> str:
    """A SHA-256: 64 lowercase hex characters."""
    if not _HEX64.fullmatch(value):
        raise ValueError("must be 64 lowercase hex characters")
    return value


def _op_id(value: str) -> str:
    """Op ids are UUIDs; one spelling (lowercase, with dashes) so journal files and the
    service's `op` rows always match."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError("must be a UUID") from None


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL")
    return value


Uuid32 = Annotated[str, AfterValidator(check_hex32)]
OpId = Annotated[str, Field(max_length=64), AfterValidator(_op_id)]
Md5 = Annotated[str, AfterValidator(check_hex32)]
Sha256 = Annotated[str, AfterValidator(check_hex64)]
FilePath = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_no_nul)]
Bytes = Annotated[int, Field(ge=0, lt=2**63)]
ImageFormat = Literal["qcow2", "raw", "iso"]
SourceFormat = Literal["qcow2", "raw"]


class _Message(BaseModel):
    # Strict: "10" is not a size. Unknown fields are ignored: a newer service or agent may add
    # some during a rolling upgrade.
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class _Command(_Message):
    opId: OpId
    imageUuid: Uuid32
    backupStorageUuid: Uuid32
    installPath: FilePath


class DownloadCommand(_Command):
    """Fetch `url` into `installPath`, checking `md5Sum` and `sha256Sum` when given, then
    inspect it."""

    command: Literal["download"] = "download"
    url: Annotated[str, Field(min_length=1, max_length=2048)]
    format: ImageFormat
    md5Sum: Md5 | None = None
    sha256Sum: Sha256 | None = None


class CreateCommand(_Command):
    """Flatten the volume or snapshot at `source` into `installPath` (the Create*Template APIs)."""

    command: Literal["create"] = "create"
    source: FilePath
    sourceFormat: SourceFormat
    format: ImageFormat


class DeleteCommand(_Command):
    """Cancel `cancelOpIds`, then remove `installPath` (and its directory when empty)."""

    command: Literal["delete"] = "delete"
    cancelOpIds: Annotated[list[OpId], Field(max_length=1000)] = []


class InspectCommand(_Command):
    """Measure the stored file at `installPath` and, with `checksums`, hash it: RecoverImage
    confirms with it that a Deleted image's file is still whole, SyncImageSize re-measures.
    A file whose size is not `size` (when given) is not hashed: it cannot match."""

    command: Literal["inspect"] = "inspect"
    format: ImageFormat
    checksums: bool = False
    size: Bytes | None = None


AgentCommand = Annotated[
    DownloadCommand | CreateCommand | DeleteCommand | InspectCommand,
    Field(discriminator="command"),
]
_COMMAND = TypeAdapter[AgentCommand](AgentCommand)


def parse_command(body: bytes | str) -> AgentCommand:
    """A command off the agent's queue; raises pydantic's ValidationError naming the field."""
    return _COMMAND.validate_json(body)


def command_from_dict(data: dict[str, Any]) -> AgentCommand:
    """A command as journalled or stored in the service's `op` table."""
    return _COMMAND.validate_python(data)


class StoredFile(_Message):
    """What a download or create left at `installPath`."""

    installPath: FilePath
    size: Bytes
    actualSize: Bytes
    virtualSize: Bytes
    md5Sum: Md5
    format: ImageFormat
    # Optional on the wire: an agent from before section 9 reports md5 only.
    sha256Sum: Sha256 | None = None


class FileFacts(_Message):
    """What an inspect found: the file's sizes, and its checksums when it was asked to hash
    them (and the size was the expected one)."""

    size: Bytes
    actualSize: Bytes
    virtualSize: Bytes
    md5Sum: Md5 | None = None
    sha256Sum: Sha256 | None = None


MAX_DETAILS = 65536
_STORED_FIELDS = ("installPath", "size", "actualSize", "virtualSize", "md5Sum", "format")


class AgentResult(_Message):
    """What an agent publishes on `NS.results` when an op has finished. A successful download
    or create carries every field of `StoredFile`; a failure carries a contract error code."""

    opId: OpId
    backupStorageUuid: Uuid32
    success: bool
    installPath: FilePath | None = None
    size: Bytes | None = None
    actualSize: Bytes | None = None
    virtualSize: Bytes | None = None
    md5Sum: Md5 | None = None
    format: ImageFormat | None = None
    sha256Sum: Sha256 | None = None
    # A code the service does not know becomes OPERATION_ERROR there (PROTOCOL.md A.3).
    code: Annotated[str, Field(max_length=64)] | None = None
    details: Annotated[str, Field(max_length=MAX_DETAILS)] | None = None
    # An inspect's findings.
    inspected: FileFacts | None = None
    # The agent's capacity when it published the result (contract section 10), with the
    # sequence number that orders its measurements (heartbeats carry it too). Optional on the
    # wire: an agent from before section 10 reports capacity in heartbeats only.
    totalCapacity: Bytes | None = None
    availableCapacity: Bytes | None = None
    capacitySeq: Bytes | None = None

    @model_validator(mode="after")
    def _stored_file_is_whole(self) -> AgentResult:
        given = [getattr(self, name) is not None for name in _STORED_FIELDS]
        if any(given) and not all(given):
            missing = [n for n, g in zip(_STORED_FIELDS, given, strict=True) if not g]
            raise ValueError(f"a stored file needs {', '.join(missing)} too")
        if any(given) and not self.success:
            raise ValueError("a failed op stores no file")
        if self.sha256Sum is not None and not all(given):
            raise ValueError("sha256Sum belongs to a stored file")
        if self.inspected is not None and (not self.success or any(given)):
            raise ValueError("inspected belongs to a successful inspect only")
        capacity = (self.totalCapacity, self.availableCapacity, self.capacitySeq)
        if any(c is not None for c in capacity) and not all(c is not None for c in capacity):
            raise ValueError("totalCapacity, availableCapacity and capacitySeq go together")
        return self

    @property
    def capacity(self) -> Capacity | None:
        if self.totalCapacity is None or self.availableCapacity is None:
            return None
        if self.capacitySeq is None:
            return None
        return Capacity(self.totalCapacity, self.availableCapacity, self.capacitySeq)

    @property
    def stored(self) -> StoredFile | None:
        if self.installPath is None:
            return None
        return StoredFile.model_validate(
            {name: getattr(self, name) for name in (*_STORED_FIELDS, "sha256Sum")}, strict=False
        )

    @property
    def error_code(self) -> ErrorCode:
        try:
            return ErrorCode(self.code or "")
        except ValueError:
            return ErrorCode.OPERATION_ERROR

    @classmethod
    def done(cls, command: AgentCommand, backup_storage_uuid: str) -> AgentResult:
        return cls(opId=command.opId, backupStorageUuid=backup_storage_uuid, success=True)

    @classmethod
    def stored_as(
        cls, command: AgentCommand, backup_storage_uuid: str, file: StoredFile
    ) -> AgentResult:
        return cls(
            opId=command.opId,
            backupStorageUuid=backup_storage_uuid,
            success=True,
            **file.model_dump(),
        )

    @classmethod
    def failed(
        cls, op_id: str, backup_storage_uuid: str, code: ErrorCode, details: str
    ) -> AgentResult:
        """A failure; details beyond the field's limit are cut, never refused (an agent must
        always be able to report a failure)."""
        if len(details) > MAX_DETAILS:
            details = details[: MAX_DETAILS - 1] + "…"
        return cls(
            opId=op_id,
            backupStorageUuid=backup_storage_uuid,
            success=False,
            code=code.value,
            details=details,
        )

    def to_json(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


@dataclass(frozen=True, slots=True)
class Capacity:
    """One measurement of a backup storage's capacity; a larger `seq` is a later one."""

    total: int
    available: int
    seq: int


class Heartbeat(_Message):
    """What an agent publishes on `NS.heartbeats` every interval."""

    uuid: Uuid32
    name: Annotated[str, Field(min_length=1, max_length=255)]
    url: Annotated[str, Field(min_length=1, max_length=4096)]
    hostname: Annotated[str, Field(min_length=1, max_length=255)]
    totalCapacity: Bytes
    availableCapacity: Bytes
    heartbeatInterval: Annotated[float, Field(gt=0, le=3600)] = 10.0
    sentAt: float | None = None
    # Orders this measurement among the agent's results (AgentResult.capacitySeq).
    capacitySeq: Bytes | None = None
