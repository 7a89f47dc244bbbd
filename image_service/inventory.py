"""Rows as the contract's inventories (section 3): what callers and events see.

The image query formats its dates in SQL (`images.sql`, `image_inventories`): formatting
hundreds of them in Python showed in the profile of queries returning many inventories.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from image_service.store import Tx

Row = Mapping[str, Any]
_ZERO = timedelta(0)


def iso(value: datetime | None) -> str | None:
    """`2024-01-31T08:00:00.000000Z`. isoformat is C code, several times faster than strftime."""
    if value is None:
        return None
    if value.utcoffset() != _ZERO:
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def image_inventory(row: Row) -> dict[str, Any]:
    """A row of the `image_inventories` query."""
    return {
        "uuid": row["uuid"],
        "name": row["name"],
        "description": row["description"],
        "state": row["state"],
        "status": row["status"],
        "size": row["size"],
        "actualSize": row["actual_size"],
        "virtualSize": row["virtual_size"],
        "url": row["url"],
        "mediaType": row["media_type"],
        "guestOsType": row["guest_os_type"],
        "platform": row["platform"],
        "system": row["system"],
        "format": row["format"],
        "md5Sum": row["md5_sum"],
        "sha256Sum": row["sha256_sum"],
        "type": row["type"],
        "backupStorageRefs": list(row["refs"]),
        "createDate": row["created_iso"],
        "lastOpDate": row["last_op_iso"],
    }


def backup_storage_inventory(row: Row) -> dict[str, Any]:
    return {
        "uuid": row["uuid"],
        "name": row["name"],
        "description": row["description"],
        "url": row["url"],
        "hostname": row["hostname"],
        "type": row["type"],
        "state": row["state"],
        "status": row["status"],
        "totalCapacity": row["total_capacity"],
        "availableCapacity": row["available_capacity"],
        "createDate": iso(row["create_date"]),
        "lastOpDate": iso(row["last_op_date"]),
    }


def user_tag_inventory(row: Row) -> dict[str, Any]:
    return {
        "uuid": row["uuid"],
        "resourceType": row["resource_type"],
        "resourceUuid": row["resource_uuid"],
        "tag": row["tag"],
        "type": row["type"],
        "createDate": iso(row["create_date"]),
        "lastOpDate": iso(row["last_op_date"]),
    }


async def image_inventories(tx: Tx, uuids: list[str]) -> list[dict[str, Any]]:
    """Inventories of `uuids`, in that order (missing ones are skipped)."""
    rows = await tx.images.inventory_rows(uuids)
    by_uuid = {row["uuid"]: image_inventory(row) for row in rows}
    return [by_uuid[u] for u in uuids if u in by_uuid]


async def image_inventory_of(tx: Tx, image_uuid: str) -> dict[str, Any] | None:
    found = await image_inventories(tx, [image_uuid])
    return found[0] if found else None
