"""Backup storages: registered and kept Connected by heartbeats, Disconnected by silence."""

from __future__ import annotations

from image_service.lifecycle import (
    BACKUP_STORAGE_STATE,
    BACKUP_STORAGE_STATUS,
    BackupStorageState,
    BackupStorageStatus,
)
from image_service.protocol.agent import Capacity
from image_service.store.group import QueryGroup, Record
from image_service.store.rows import BackupStorageRow, InventoryRow, Owner

_CONNECTED = BackupStorageStatus.Connected
_DISCONNECTED = BackupStorageStatus.Disconnected


def _bs(row: Record) -> BackupStorageRow:
    return BackupStorageRow(
        uuid=row["uuid"],
        name=row["name"],
        url=row["url"],
        hostname=row["hostname"],
        state=BackupStorageState(row["state"]),
        status=BackupStorageStatus(row["status"]),
        available_capacity=row["available_capacity"],
    )


class BackupStorages(QueryGroup, sql_file="backup_storages.sql"):
    __slots__ = ()

    async def owner_for_update(self, uuid: str) -> Owner | None:
        """Status and owning broker user before a heartbeat is applied (row locked), None when
        the backup storage is not registered."""
        row = await self._row("bs_owner_for_update", uuid=uuid)
        if row is None:
            return None
        return Owner(BackupStorageStatus(row["status"]), row["agent_user"])

    async def agent_user(self, uuid: str) -> str | None:
        """The broker user whose heartbeats and results count for this backup storage."""
        value = await self._value("bs_agent_user", uuid=uuid)
        return str(value) if value is not None else None

    async def heartbeat(
        self,
        *,
        uuid: str,
        name: str,
        url: str,
        hostname: str,
        total_capacity: int,
        available_capacity: int,
        heartbeat_interval: float,
        agent_user: str,
        capacity_seq: int | None,
    ) -> bool | None:
        """Register or refresh a backup storage and make it Connected, for its owning broker
        user only. Returns whether this call registered it, or None when the backup storage
        was deleted or belongs to another user (ignored)."""
        row = await self._row(
            "bs_heartbeat",
            uuid=uuid,
            name=name,
            url=url,
            hostname=hostname,
            total_capacity=total_capacity,
            available_capacity=available_capacity,
            heartbeat_interval=heartbeat_interval,
            agent_user=agent_user,
            capacity_seq=capacity_seq,
            connected=_CONNECTED,
            connected_from=BACKUP_STORAGE_STATUS.allowed_from(_CONNECTED),
        )
        return bool(row["inserted"]) if row is not None else None

    async def record_capacity(self, uuid: str, capacity: Capacity) -> bool:
        """Store a measurement newer than the recorded one; False when it is not newer."""
        row = await self._row(
            "bs_record_capacity",
            uuid=uuid,
            total_capacity=capacity.total,
            available_capacity=capacity.available,
            capacity_seq=capacity.seq,
        )
        return row is not None

    async def mark_disconnected(self, *, missed: int, heard_for: float) -> list[str]:
        """Turn Disconnected those silent for `missed` intervals; only the caller whose update
        returned a uuid acts on it (several replicas run this)."""
        rows = await self._rows(
            "bs_mark_disconnected",
            missed=missed,
            heard_for=heard_for,
            disconnected=_DISCONNECTED,
            allowed=BACKUP_STORAGE_STATUS.allowed_from(_DISCONNECTED),
        )
        return [row["uuid"] for row in rows]

    async def get_many(self, uuids: list[str]) -> list[BackupStorageRow]:
        return [_bs(row) for row in await self._rows("bs_get_many", uuids=uuids)]

    async def all(self) -> list[BackupStorageRow]:
        return [_bs(row) for row in await self._rows("bs_all")]

    async def lock(self, uuid: str) -> BackupStorageRow | None:
        row = await self._row("bs_lock", uuid=uuid)
        return _bs(row) if row is not None else None

    async def change_state(self, *, uuid: str, state: BackupStorageState) -> bool:
        row = await self._row(
            "bs_change_state",
            uuid=uuid,
            state=state,
            allowed=BACKUP_STORAGE_STATE.allowed_from(state),
        )
        return row is not None

    async def delete(self, uuid: str) -> None:
        """Remove it, and remember it as deleted so that its agent's heartbeats are ignored."""
        await self._execute("bs_tombstone", uuid=uuid)
        await self._execute("bs_delete", uuid=uuid)

    async def inventory_rows(self, uuids: list[str]) -> list[InventoryRow]:
        return await self._inventory_rows("bs_inventories", uuids=uuids)
