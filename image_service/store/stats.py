"""The database's figures for /metrics (portal.metrics turns them into series)."""

from __future__ import annotations

from dataclasses import dataclass

from image_service.store.group import QueryGroup


@dataclass(frozen=True, slots=True)
class BackupStorageFigures:
    uuid: str
    name: str
    status: str
    state: str
    total_capacity: int
    available_capacity: int


class Stats(QueryGroup, sql_file="stats.sql"):
    __slots__ = ()

    async def ops_in_flight(self) -> dict[str, int]:
        return {row["kind"]: row["count"] for row in await self._rows("ops_in_flight")}

    async def backup_storages(self) -> list[BackupStorageFigures]:
        return [BackupStorageFigures(**row) for row in await self._rows("backup_storages")]

    async def outbox_depth(self) -> int:
        value: int = await self._value("outbox_depth")
        return value

    async def ping(self) -> None:
        await self._value("ping")
