"""The read model of volumes and snapshots."""

from __future__ import annotations

from image_service.protocol.events import SnapshotEvent, VolumeEvent
from image_service.store.group import QueryGroup, Record
from image_service.store.rows import TemplateSource


def _source(row: Record | None) -> TemplateSource | None:
    return TemplateSource(**row) if row is not None else None


class Volumes(QueryGroup, sql_file="volumes.sql"):
    __slots__ = ()

    async def upsert_volume(self, event: VolumeEvent) -> None:
        """Insert or refresh a volume; a tombstone stays (a late `created` cannot revive it)."""
        await self._execute(
            "volume_upsert",
            uuid=event.uuid,
            name=event.name,
            type=event.type,
            vm_instance_uuid=event.vmInstanceUuid,
            root_image_uuid=event.rootImageUuid,
            primary_storage_uuid=event.primaryStorageUuid,
            install_path=event.installPath,
            format=event.format,
            size=event.size,
        )

    async def upsert_snapshot(self, event: SnapshotEvent) -> None:
        await self._execute(
            "snapshot_upsert",
            uuid=event.uuid,
            volume_uuid=event.volumeUuid,
            install_path=event.installPath,
            format=event.format,
            size=event.size,
        )

    async def delete_volume(self, uuid: str) -> None:
        await self._execute("volume_tombstone", uuid=uuid)

    async def delete_snapshot(self, uuid: str) -> None:
        await self._execute("snapshot_tombstone", uuid=uuid)

    async def volume(self, uuid: str) -> TemplateSource | None:
        return _source(await self._row("volume_get", uuid=uuid))

    async def snapshot(self, uuid: str) -> TemplateSource | None:
        return _source(await self._row("snapshot_get", uuid=uuid))
