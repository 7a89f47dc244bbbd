"""Every state machine of the service, written down once.

Each `Machine` names the PostgreSQL ENUM that stores it and which state may follow which. The
store feeds its guarded statements (`UPDATE ... WHERE status = ANY(:allowed)`) from
`allowed_from`, so code and database agree; a unit test checks these tables against the ENUMs of
a migrated database. Inventories (how the states are shown) live in `inventory`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar


class ImageStatus(StrEnum):
    Creating = "Creating"
    Downloading = "Downloading"
    Ready = "Ready"
    # Deleted under the Delay or Never deletion policy: its files stay until an expunge, and
    # RecoverImage can make it Ready again (contract section 10).
    Deleted = "Deleted"


# The status of an image on one backup storage: the same values, in the same ENUM, as the image's.
RefStatus = ImageStatus


class ImageState(StrEnum):
    Enabled = "Enabled"
    Disabled = "Disabled"


class OpStatus(StrEnum):
    Pending = "Pending"
    Succeeded = "Succeeded"
    Failed = "Failed"


class OpKind(StrEnum):
    download = "download"
    create = "create"
    delete = "delete"
    # Measure (and, to recover it, hash) a stored file: RecoverImage, SyncImageSize.
    inspect = "inspect"


class BackupStorageStatus(StrEnum):
    Connecting = "Connecting"
    Connected = "Connected"
    Disconnected = "Disconnected"


class BackupStorageState(StrEnum):
    Enabled = "Enabled"
    Disabled = "Disabled"


S = TypeVar("S", bound=StrEnum)


@dataclass(frozen=True, slots=True)
class Machine(Generic[S]):
    name: str
    db_type: str  # the ENUM type of the column
    states: type[S]
    transitions: Mapping[S, frozenset[S]]

    def allowed_from(self, target: S) -> list[str]:
        """The states from which `target` may be entered (for the SQL guard)."""
        return [str(src) for src, targets in self.transitions.items() if target in targets]

    def allows(self, source: S, target: S) -> bool:
        return target in self.transitions[source]

    def final(self) -> list[str]:
        """The states nothing leaves."""
        return [str(s) for s, targets in self.transitions.items() if not targets]


_IS, _OS = ImageStatus, OpStatus
_BS, _ST, _IM = BackupStorageStatus, BackupStorageState, ImageState

# An image is born Downloading (from a url) or Creating (from a volume or snapshot) and becomes
# Ready once one of its references is; failure or a Direct deletion removes the row instead of
# moving it to another status. Under the Delay and Never deletion policies an image turns
# Deleted when every reference is (while still Downloading, too, when a reference stored before
# the deletion is kept), and Ready again when RecoverImage brings one back; an expunge of its
# last reference removes it.
IMAGE_STATUS = Machine(
    "image status",
    "image_status",
    ImageStatus,
    {
        _IS.Downloading: frozenset({_IS.Ready, _IS.Deleted}),
        _IS.Creating: frozenset({_IS.Ready, _IS.Deleted}),
        _IS.Ready: frozenset({_IS.Deleted}),
        _IS.Deleted: frozenset({_IS.Ready}),
    },
)
# A reference: Ready once its file is stored; Deleted and back (RecoverImage) under the Delay
# and Never policies. A reference still Downloading or Creating is never Deleted: deleting it
# cancels the work and removes it.
REF_STATUS = Machine(
    "reference status",
    "image_status",
    RefStatus,
    {
        _IS.Downloading: frozenset({_IS.Ready}),
        _IS.Creating: frozenset({_IS.Ready}),
        _IS.Ready: frozenset({_IS.Deleted}),
        _IS.Deleted: frozenset({_IS.Ready}),
    },
)
# An op is the lease on one agent command: Pending until its result (or a cancellation).
OP_STATUS = Machine(
    "op status",
    "op_status",
    OpStatus,
    {
        _OS.Pending: frozenset({_OS.Succeeded, _OS.Failed}),
        _OS.Succeeded: frozenset(),
        _OS.Failed: frozenset(),
    },
)
# Registered by a first heartbeat (Connected), Disconnected after missed heartbeats, Connected
# again by the next one. Connecting is where a backup storage waits for its first heartbeat.
BACKUP_STORAGE_STATUS = Machine(
    "backup storage status",
    "bs_status",
    BackupStorageStatus,
    {
        _BS.Connecting: frozenset({_BS.Connected, _BS.Disconnected}),
        _BS.Connected: frozenset({_BS.Disconnected}),
        _BS.Disconnected: frozenset({_BS.Connected}),
    },
)
BACKUP_STORAGE_STATE = Machine(
    "backup storage state",
    "bs_state",
    BackupStorageState,
    {_ST.Enabled: frozenset({_ST.Disabled}), _ST.Disabled: frozenset({_ST.Enabled})},
)
IMAGE_STATE = Machine(
    "image state",
    "image_state",
    ImageState,
    {_IM.Enabled: frozenset({_IM.Disabled}), _IM.Disabled: frozenset({_IM.Enabled})},
)

MACHINES: tuple[Machine[Any], ...] = (
    IMAGE_STATUS,
    REF_STATUS,
    OP_STATUS,
    BACKUP_STORAGE_STATUS,
    BACKUP_STORAGE_STATE,
    IMAGE_STATE,
)
# Enumerations stored as ENUMs that are not state machines (a kind never changes).
DB_ENUMS: dict[str, type[StrEnum]] = {"op_kind": OpKind}
